"""The site's own policy: a file the site's admin owns, enforced by the client whatever the
server asks.

Example (YAML or JSON; every key optional except where noted):

    min_subjects: 20            # no metric or statistic on fewer subjects leaves the site
    groups_allowed: [shared, ehr, wearables]   # parameter groups whose weights may leave
    dp:
      mandatory: true           # train only with DP, even if the server does not ask for it
      epsilon_cap: 8.0          # required: total epsilon over every round of every run
      delta: 1.0e-5             # required
      max_grad_norm: 1.0
      noise_multiplier: 1.1     # or target_epsilon (the epsilon one run's planned steps may reach)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from healthfm_core.model.groups import GROUPS


class PolicyError(ValueError):
    """A policy file that cannot be read or validated; the message names file, field and value."""


class DPPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mandatory: bool = False
    epsilon_cap: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPPolicy:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set noise_multiplier or target_epsilon, not both")
        if self.target_epsilon is not None and self.target_epsilon > self.epsilon_cap:
            raise ValueError(f"target_epsilon {self.target_epsilon} exceeds epsilon_cap {self.epsilon_cap}")
        return self


class SitePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_subjects: int = Field(default=10, ge=1)
    groups_allowed: list[str] = Field(default_factory=lambda: list(GROUPS))
    dp: DPPolicy | None = None

    @field_validator("groups_allowed")
    @classmethod
    def _known_groups(cls, v: list[str]) -> list[str]:
        unknown = [g for g in v if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; groups are {list(GROUPS)}")
        return list(dict.fromkeys(v))

    def allows(self, group: str) -> bool:
        return group in self.groups_allowed


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a policy file (.yaml/.yml or .json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the site policy ({err.strerror or err})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the policy must be a mapping of fields, got {type(data).__name__}")
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(x) for x in e["loc"]) or "(policy)"
            value = e.get("input")
            problems.append(f"{path}: field {field}: value {value!r}: {e['msg']}")
        raise PolicyError("invalid site policy:\n  " + "\n  ".join(problems)) from None


__all__ = ["DPPolicy", "PolicyError", "SitePolicy", "load_policy"]
