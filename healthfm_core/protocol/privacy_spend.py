"""A site's DP spend as its train replies carry it (the `dp.*` metrics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from healthfm_core.protocol.wire import PeerReply
from healthfm_core.terms.dp_policy import EPSILON_CAP_MAX

# The spend's metric keys (MetricRecord) -> PrivacySpend's fields.
DP_FIELDS = {
    "dp.epsilon": "epsilon",
    "dp.delta": "delta",
    "dp.noise-multiplier": "noise_multiplier",
    "dp.new-budget-at": "new_budget_at",
    "dp.replaced-epsilon": "replaced_epsilon",
    "dp.epsilon-cap": "epsilon_cap",
}


class PrivacySpend(PeerReply):
    """A site's cumulative DP spend (its durable ledger: every round of every run at the site).
    `noise_multiplier` is set only when this round trained under DP. `new_budget_at` is set when
    the site's ledger was started anew by its admin (`join --new-privacy-budget`): its epsilon
    then counts from that time, and `replaced_epsilon` is what the given-up ledger had spent,
    where the site knows it; the server writes both into its audit log. `epsilon_cap` is the site
    policy's `dp.epsilon_cap` (finite, at most EPSILON_CAP_MAX), so the coordinator sees the spend
    against it; absent in replies from sites that predate it."""

    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    new_budget_at: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # unix time
    replaced_epsilon: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    epsilon_cap: float | None = Field(default=None, gt=0, le=EPSILON_CAP_MAX, allow_inf_nan=False)

    def to_metrics(self) -> dict[str, float]:
        """Its MetricRecord entries (`dp.*`), as a train reply carries them."""
        return {key: value for key, name in DP_FIELDS.items() if (value := getattr(self, name)) is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> PrivacySpend:
        """From a peer's `dp.*` MetricRecord entries alone; ValueError naming an unknown key."""
        unknown = sorted(set(metrics) - set(DP_FIELDS))
        if unknown:
            raise ValueError(f"privacy spend: unknown metric {unknown[0]!r}")
        return cls.model_validate({DP_FIELDS[k]: v for k, v in metrics.items()})
