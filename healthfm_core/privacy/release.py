"""Which train metrics may leave a site, with and without DP.

Under DP the guarantee covers the released weights and nothing else, so the rule is an
allowlist (a metric added later is dropped until it is shown safe, never leaked by default):
  - num-examples and num-examples.<group>: the runtime sets them to the *expected* counts
    (sample rate x samples x steps, public), never the Poisson draws;
  - dp.epsilon, dp.delta, dp.noise-multiplier: the site's spend and the mechanism;
  - rate-min, rate-max: read from the trained (noised) weights, post-processing of the release.
Everything else is dropped; in particular train-seconds and client-seconds (they grow with the
secret Poisson batch sizes), the actual example counts, losses and gradient norms.

Without DP the update is not private, so it carries no dp.* figure: a `dp.epsilon: 0.0` beside
a non-private update would claim a guarantee it does not have.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from healthfm_core.federation import DP_DELTA, DP_EPSILON, DP_NOISE

log = logging.getLogger(__name__)

DP_SAFE_METRICS = frozenset({"num-examples", DP_EPSILON, DP_DELTA, DP_NOISE, "rate-min", "rate-max"})
DP_SAFE_PREFIXES = ("num-examples.",)
DP_PREFIX = "dp."


def dp_safe_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics of a DP round that may leave the site (the allowlist above)."""
    kept = {k: v for k, v in metrics.items() if k in DP_SAFE_METRICS or k.startswith(DP_SAFE_PREFIXES)}
    if dropped := sorted(set(metrics) - set(kept)):
        log.debug("DP round: metrics %s stay at the site", dropped)
    return kept


def releasable_metrics(metrics: Mapping[str, float], private: bool) -> dict[str, float]:
    """A train reply's metrics as they may leave: `dp_safe_metrics` under DP; without DP every
    dp.* entry dropped."""
    if private:
        return dp_safe_metrics(metrics)
    return {k: v for k, v in metrics.items() if not k.startswith(DP_PREFIX)}


__all__ = ["DP_SAFE_METRICS", "DP_SAFE_PREFIXES", "dp_safe_metrics", "releasable_metrics"]
