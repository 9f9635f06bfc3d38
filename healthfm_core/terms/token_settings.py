"""How a federation turns EHR rows into tokens: one setting for every site (tokens.py applies it).

`token_window_days`: the length of a token's time bucket in days on the subject's own clock
(1: one token per day of record, the default; 0: one token per exact timestamp).
`max_codes_per_token`: the most distinct codes one token keeps (the rarest first).
The server sends both in the FederationSetup, so every site tokenises the same way; the run
configs (simulations, server/config.py) carry them under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.first_error import first_error

DEFAULT_TOKEN_WINDOW_DAYS = 1.0  # one EHR token per day of record (0: per exact timestamp)
DEFAULT_MAX_CODES_PER_TOKEN = 32

TokenWindowDays = Annotated[float, Field(ge=0, allow_inf_nan=False)]
MaxCodesPerToken = Annotated[int, Field(ge=1)]


class TokenSettings(BaseModel):
    """The tokenisation every site of a run uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_window_days: TokenWindowDays = DEFAULT_TOKEN_WINDOW_DAYS
    max_codes_per_token: MaxCodesPerToken = DEFAULT_MAX_CODES_PER_TOKEN

    def describe(self) -> str:
        """In words, for reports: "one per day of record, at most 32 codes each"."""
        w = self.token_window_days
        per = "exact timestamp" if w == 0 else ("day of record" if w == 1 else f"{w:g} days of record")
        return f"one per {per}, at most {self.max_codes_per_token} codes each"

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str) -> TokenSettings:
        """From a config mapping (absent keys: the defaults); a bad value raises a one-line
        ValueError naming `source`, the key and the value."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ValueError(first_error(err, source)) from None


DEFAULT_TOKENS = TokenSettings()

__all__ = [
    "DEFAULT_MAX_CODES_PER_TOKEN",
    "DEFAULT_TOKENS",
    "DEFAULT_TOKEN_WINDOW_DAYS",
    "MaxCodesPerToken",
    "TokenSettings",
    "TokenWindowDays",
]
