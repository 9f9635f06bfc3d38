"""The federated task head's averaging step on the server: the sites' heads through
ModalityAwareFedAvg's own rule (server/strategy.py `average`), the head being one parameter
group (`shared`) that every participating site holds.

The one call into the strategy is here, so that a change of its API (a refactor is under way)
touches this function only. With every site holding the group the rule is FedAvg's n-weighted
mean, which is what the one-process driver computes (healthfm_core/eval/head_server.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from healthfm_core.eval.federated_head import SiteHead
from healthfm_core.federation import TrainReply
from server.strategy import ModalityAwareFedAvg

HEAD_GROUP = "shared"  # one group every site of the head holds
WEIGHT_KEY = "head.weight"
BIAS_KEY = "head.bias"


def _head_group(key: str) -> str:
    return HEAD_GROUP


def fedavg_heads(heads: Mapping[str, SiteHead], n_total: int) -> tuple[np.ndarray, float]:
    """The next head: ModalityAwareFedAvg's average of the sites' (weight, bias, n). `n_total` is
    the driver's; the strategy weighs by the answering sites' own counts (the same sum when
    every site answered)."""
    strategy = ModalityAwareFedAvg(group_of=_head_group)
    accepted = []
    for i, (w, b, n) in enumerate(heads.values()):
        arrays = {WEIGHT_KEY: np.asarray(w, np.float64), BIAS_KEY: np.array([b], np.float64)}
        reply = TrainReply.model_validate(
            {"arrays": arrays, "num_examples": int(n), "group_examples": {HEAD_GROUP: int(n)}},
            context={"group_of": _head_group},
        )
        accepted.append((i, reply, {HEAD_GROUP: float(n)}))
    width = len(next(iter(heads.values()))[0])
    previous = {WEIGHT_KEY: np.zeros(width), BIAS_KEY: np.zeros(1)}
    out, _ = strategy.average(accepted, previous)
    return np.asarray(out[WEIGHT_KEY], np.float64), float(out[BIAS_KEY][0])


__all__ = ["BIAS_KEY", "HEAD_GROUP", "WEIGHT_KEY", "fedavg_heads"]
