"""The federated task head's averaging step on the server: the sites' heads through
ModalityAwareFedAvg's own rule (server/strategy.py `average`), the head being one parameter
group (`shared`) that every participating site holds.

The calls into the strategy are here (its average, and its update-norm bounds in `bound_heads`),
so that a change of its API touches this module only. With every site holding the group the rule is FedAvg's n-weighted
mean, which is what the one-process driver computes (healthfm_core/eval/head_server.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from healthfm_core.eval.federated_head import SiteHead
from healthfm_core.protocol import TrainReply
from server.influence import Accepted
from server.strategy import ModalityAwareFedAvg

HEAD_GROUP = "shared"  # one group every site of the head holds
WEIGHT_KEY = "head.weight"
BIAS_KEY = "head.bias"


def _head_group(key: str) -> str:
    return HEAD_GROUP


def head_strategy() -> ModalityAwareFedAvg:
    """The strategy of one C's rounds of a head: its bounds' settings the pretraining's defaults,
    its norm history empty."""
    return ModalityAwareFedAvg(group_of=_head_group)


def head_arrays(w: np.ndarray, b: float) -> dict[str, np.ndarray]:
    return {WEIGHT_KEY: np.asarray(w, np.float64), BIAS_KEY: np.array([b], np.float64)}


def _accepted(heads: Mapping[str, SiteHead]) -> list[Accepted]:
    """The sites' heads as the strategy's accepted replies, numbered in `heads`' order."""
    out = []
    for i, (w, b, n) in enumerate(heads.values()):
        reply = TrainReply.model_validate(
            {"arrays": head_arrays(w, b), "num_examples": int(n), "group_examples": {HEAD_GROUP: int(n)}},
            context={"group_of": _head_group},
        )
        out.append((i, reply, {HEAD_GROUP: float(n)}))
    return out


def bound_heads(
    strategy: ModalityAwareFedAvg, heads: Mapping[str, SiteHead], w: np.ndarray, b: float, rnd: int
) -> tuple[dict[str, SiteHead], dict[str, str]]:
    """The sites' heads within the strategy's magnitude limit and its update-norm bounds (history,
    outlier, max-update-norm: ModalityAwareFedAvg.bound_updates, their semantics unchanged) from
    the round's global head (w, b), and why each other is left out; the kept norms join the
    strategy's history."""
    bad: dict[str, str] = {}
    limit = strategy.max_abs_value
    for name, (hw, hb, _) in heads.items():
        peak = float(np.max(np.abs(np.append(np.asarray(hw, np.float64), hb))))
        if limit is not None and not peak <= limit:
            bad[name] = f"|value| up to {peak:.3g} > limit {limit:.3g}"
    fine = {k: v for k, v in heads.items() if k not in bad}
    kept, dropped, _ = strategy.bound_updates(_accepted(fine), head_arrays(w, b), rnd, None)
    names = list(fine)  # the strategy numbers the replies in this order
    bad.update({names[i]: why for i, why in dropped.items()})
    return {names[i]: fine[names[i]] for i, _, _ in kept}, bad


def fedavg_heads(heads: Mapping[str, SiteHead], n_total: int) -> tuple[np.ndarray, float]:
    """The next head: ModalityAwareFedAvg's average of the sites' (weight, bias, n). `n_total` is
    the driver's; the strategy weighs by the answering sites' own counts (the same sum when
    every site answered). The heads were bounded first (bound_heads, server/head_app.py)."""
    width = len(next(iter(heads.values()))[0])
    previous = {WEIGHT_KEY: np.zeros(width), BIAS_KEY: np.zeros(1)}
    out, _ = head_strategy().average(_accepted(heads), previous)
    return np.asarray(out[WEIGHT_KEY], np.float64), float(out[BIAS_KEY][0])


__all__ = ["BIAS_KEY", "HEAD_GROUP", "WEIGHT_KEY", "bound_heads", "fedavg_heads", "head_arrays", "head_strategy"]
