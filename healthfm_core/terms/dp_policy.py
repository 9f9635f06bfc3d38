"""A site's DP budget: the `dp:` section of its policy file (client/policy.py reads the file).

It lives in healthfm_core, not the client, because what makes a budget valid (a finite, numeric
cap; a delta no larger than 1/n) is privacy knowledge and the private-training entry point
(healthfm_core.privacy.training) takes it as its input; and in terms/, below the wire protocol,
because a train reply's spend is checked against the same largest cap (EPSILON_CAP_MAX,
healthfm_core/protocol/privacy_spend.py).

Every number is strict and finite: `epsilon_cap: .inf`, `true` or "nan" would be a budget that
never refuses (YAML reads `.inf` as a float and `true` as 1 under lax parsing), so each is an
error naming the field and the value. A finite cap can still be no cap (`1.0e+308`): epsilon_cap
is at most EPSILON_CAP_MAX = 100, far above any meaningful guarantee (e^100 bounds the change of
any outcome's odds) yet low enough that a typo or a "disable the cap" value is refused.
"""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The largest epsilon_cap a policy may set (docs/site-admin.md, "Write your policy").
EPSILON_CAP_MAX = 100.0

# The largest max_grad_norm and noise_multiplier (docs/site-admin.md): far above any useful value
# (a clip of 1000 clips nothing; a multiplier of 1000 leaves no signal), so a typo is refused.
DP_SETTING_MAX = 1000.0

# The validation context key under which a caller who knows the site's train subjects passes
# their count, so that delta is checked against 1/n at load time.
TRAIN_SUBJECTS = "train_subjects"


def delta_problem(delta: float, n_subjects: int) -> str | None:
    """Why `delta` is too large for a dataset of `n_subjects` (None when it is not): a delta
    above 1/n permits releasing one subject's record outright with probability delta."""
    if n_subjects > 0 and delta > 1.0 / n_subjects:
        return f"delta {delta:g} is above 1/n = 1/{n_subjects} = {1.0 / n_subjects:.3g} (n: the site's train subjects)"
    return None


class DPPolicy(BaseModel):
    """The site's DP budget: DP mandatory or not, the lifetime epsilon cap, delta, clipping and
    the noise (a multiplier, or the epsilon one run's planned steps may reach)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mandatory: bool = False
    epsilon_cap: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, le=DP_SETTING_MAX, allow_inf_nan=False)
    noise_multiplier: float | None = Field(default=None, gt=0, le=DP_SETTING_MAX, allow_inf_nan=False)
    target_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @field_validator("epsilon_cap")
    @classmethod
    def _cap_at_most_the_maximum(cls, v: float) -> float:
        if v > EPSILON_CAP_MAX:
            raise ValueError(
                f"epsilon_cap {v:g} is above the maximum {EPSILON_CAP_MAX:g} (a cap that large guarantees nothing)"
            )
        return v

    @field_validator("delta")
    @classmethod
    def _delta_below_one_over_n(cls, v: float, info: ValidationInfo) -> float:
        n = (info.context or {}).get(TRAIN_SUBJECTS)
        if n is not None and (problem := delta_problem(v, int(n))):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPPolicy:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set noise_multiplier or target_epsilon, not both")
        if self.target_epsilon is not None and self.target_epsilon > self.epsilon_cap:
            raise ValueError(f"target_epsilon {self.target_epsilon} exceeds epsilon_cap {self.epsilon_cap}")
        return self


__all__ = ["EPSILON_CAP_MAX", "TRAIN_SUBJECTS", "DPPolicy", "delta_problem"]
