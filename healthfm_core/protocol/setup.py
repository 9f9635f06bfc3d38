"""query.setup: the federation's setup, sent once per run to every site, and the modalities its
model holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError, model_validator

from healthfm_core.first_error import first_error
from healthfm_core.protocol.capabilities import groups_for_modalities
from healthfm_core.protocol.wire import StrictMessage
from healthfm_core.strict_files import strict_model
from healthfm_core.terms.model_config import ModelConfig, embedding_width, model_modalities
from healthfm_core.terms.site_layout import MODALITIES
from healthfm_core.terms.token_settings import (
    DEFAULT_MAX_CODES_PER_TOKEN,
    DEFAULT_TOKEN_WINDOW_DAYS,
    MaxCodesPerToken,
    TokenSettings,
    TokenWindowDays,
)
from healthfm_core.terms.vocabulary import Vocabulary

# Model options added after runs existed, with the value every run before them had (JSON form):
# left out of the setup's hash at that value, so those runs' checkpoints keep their hash.
OPTIONS_BEFORE: dict[tuple[str, str], Any] = {
    ("pretraining", "prs_reconstruct_shown"): False,  # issue 31
    ("pretraining", "separate_repeats"): True,  # issue 72: the objective ablations and the pitfall
    ("curriculum", "enabled"): True,
    ("curriculum", "objectives_off"): [],
}


def federation_modalities(site_modalities: Iterable[Sequence[str]], vocabulary: Vocabulary) -> list[str]:
    """The modalities the federation's model holds: every modality some site has (the union of
    the sites' `SiteCapabilities.modalities`, in MODALITIES order), genomics only when the
    vocabulary agreed at least one PRS trait. A modality a site has but trains on too few
    subjects (its policy) still gets its module, so that site's batches always fit the model."""
    declared = {m for modalities in site_modalities for m in modalities}
    if vocabulary.n_prs_traits == 0:
        declared.discard("genomics")
    return [m for m in MODALITIES if m in declared]


class FederationSetup(StrictMessage):
    """Sent once per run to every site: everything needed to build the same model.

    `modalities`: those the model is built with (`federation_modalities` of the sites'
    capabilities); left out, EHR and wearables plus genomics when the vocabulary has PRS traits.
    `token_window_days`, `max_codes_per_token`: how every site turns its EHR rows into tokens
    (token_settings.py); the site builds its sequences with `tokens`.
    """

    vocabulary: Vocabulary
    model: ModelConfig
    model_seed: int = 0
    # Left out (None), filled from the vocabulary by _default_modalities before validation: the
    # default lets callers leave it out; a validated setup always holds a list.
    modalities: list[str] = None  # type: ignore[assignment]
    token_window_days: TokenWindowDays = DEFAULT_TOKEN_WINDOW_DAYS
    max_codes_per_token: MaxCodesPerToken = DEFAULT_MAX_CODES_PER_TOKEN

    @model_validator(mode="before")
    @classmethod
    def _default_modalities(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("modalities") is None and "vocabulary" in data:
            vocab = data["vocabulary"]
            n_traits = vocab.n_prs_traits if isinstance(vocab, Vocabulary) else len(vocab.get("prs_traits", []))
            data = {**data, "modalities": list(model_modalities(n_traits))}
        return data

    @model_validator(mode="after")
    def _modalities_fit(self) -> FederationSetup:
        try:
            resolved = model_modalities(self.vocabulary.n_prs_traits, self.modalities)
        except ValueError as err:
            raise ValueError(f"FederationSetup.modalities: {err}") from None
        if list(resolved) != self.modalities:
            raise ValueError(
                f"FederationSetup.modalities={self.modalities} must be distinct and in the order "
                f"{list(MODALITIES)} (expected {list(resolved)})"
            )
        return self

    @property
    def groups(self) -> list[str]:
        """The parameter groups the model holds: shared plus one per modality."""
        return groups_for_modalities(self.modalities)

    @property
    def tokens(self) -> TokenSettings:
        """The tokenisation every site of the run uses."""
        return TokenSettings(token_window_days=self.token_window_days, max_codes_per_token=self.max_codes_per_token)

    def to_json(self) -> str:
        # Token settings at their defaults are left out: the setup reads back the same, and its
        # JSON (so its hash) is what it was before those fields existed (server checkpoints).
        default = {k for k, f in TokenSettings.model_fields.items() if getattr(self, k) == f.default}
        return self.model_dump_json(exclude=default)

    @classmethod
    def from_json(cls, text: str) -> FederationSetup:
        """A setup as a peer sent it; a bad field raises a one-line ValueError naming it and its value."""
        try:
            return strict_model(cls, text, "federation setup")
        except ValidationError as err:
            raise ValueError(first_error(err, "federation setup")) from None

    @property
    def sha256(self) -> str:
        # Canonical form: sorted keys, so the hash does not depend on field order; modalities
        # (and, in to_json, the token settings) left out when they are the default, so setups
        # written before those fields existed (server checkpoints) keep their hash.
        data = json.loads(self.to_json())
        if self.modalities == list(model_modalities(self.vocabulary.n_prs_traits)):
            data.pop("modalities")
        for (part, name), before in OPTIONS_BEFORE.items():  # later options at their defaults: as before them
            section = data["model"][part]
            if section.get(name, before) == before:
                section.pop(name, None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def embedding_width(self) -> int:
        """Width of this setup's model's embedding (HealthFM.embed): what a task head reads."""
        return embedding_width(self.model, self.modalities)
