"""Bounded influence: how much one train reply may weigh (its example counts) and move (its update
norm per parameter group), from what the server itself configured for the round and from the
group's accepted update norms in earlier rounds. The rule is stated once, in ModalityAwareFedAvg's
docstring (server/strategy.py); this module holds its arithmetic and its state (NormHistory).

The step bound. Every site trains with AdamW (healthfm_core/train/trainer.py), fresh each round,
at the round's constant learning rate lr for local_steps S. An Adam step moves each parameter by
lr x |m_hat| / sqrt(v_hat), and by Cauchy-Schwarz over the moments' weights that ratio is at most
ADAM_STEP_RATIO (7.27 with betas 0.9 / 0.999, whatever the gradients: DP noise included); the
decoupled weight decay moves a group by at most lr x weight_decay x its norm a step. So no honest
site moves a group of P values and norm |w| by more than about
    lr x S x (7.27 sqrt(P) + weight_decay |w|),
plus the transport's rounding (fp16: 2^-11 of each weight; int8: at most two quantisation steps per
value, ~0.12 lr S sqrt(P)). The bound uses factor (norm-step-factor, default 10) in place of 7.27.
Measured (real short federations of the default scenario through SiteRuntime, 2026-11-23; one DP
site): the honest update norm over lr x S x sqrt(P) was at most 0.61 (tiny, 10 steps x 16, lr 1e-3,
5 rounds), 0.78 (tiny, 2 steps x 8, lr 3e-3), 0.51 (small, 10 steps x 16, 3 rounds): a margin of 13x
or more at the default. (Relative to the group's weight norm the same updates ranged from 0.012
(ehr) to 1.04 (genomics, small weights): no single ratio to |w| bounds every group.)

The history bound: factor (norm-history-factor, default 10) x the median of the group's accepted
update norms over its last `rounds` (norm-history-rounds, default 5) aggregated rounds. Measured in
the same federations: an honest norm was at most 1.27x that median (at least 0.62x).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from healthfm_core.protocol import RoundConfig, TrainReply

# Under "healthfm": the ServerApp's server.log (server_app.py) keeps each group's norm bound.
log = logging.getLogger("healthfm.server.influence")

# max over t of sqrt(sum_i a_i^2 / b_i), a_i, b_i Adam's bias-corrected moment weights (betas 0.9,
# 0.999): the most one Adam step moves a parameter, in units of lr (t = 1: 1.0; t = 10: 1.04).
ADAM_STEP_RATIO = 7.27
FP16_ROUNDING = 2.0**-10  # of the weights' norm: twice float16's relative rounding (2^-11)
DEFAULT_NORM_STEP_FACTOR = 10.0
DEFAULT_NORM_HISTORY_FACTOR = 10.0
DEFAULT_NORM_HISTORY_ROUNDS = 5
_HISTORY_PREFIX = "norms."  # state_dict entries: norms.<group> -> float64 [[round, norm], ...]

# A reply that parsed and may be averaged: (node, its parsed reply, its example count per group).
Accepted = tuple[int, TrainReply, dict[str, float]]


def max_examples(cfg: RoundConfig) -> int:
    """The most samples a site trains in a round: local_steps batches of at most batch_size (a DP
    site reports its expected counts, sample rate x subjects x steps, never more)."""
    return cfg.local_steps * cfg.batch_size


def count_problem(reply: TrainReply, cfg: RoundConfig) -> str | None:
    """Why a trained reply's counts cannot be what this round asked for, or None."""
    limit = max_examples(cfg)
    claimed = {"num-examples": reply.num_examples, **{f"num-examples.{g}": n for g, n in reply.group_examples.items()}}
    for field, value in claimed.items():
        if value > limit:
            return (
                f"field {field}: value {value:,} > {limit:,}, the most samples a site trains this round "
                f"(local-steps {cfg.local_steps} x batch-size {cfg.batch_size})"
            )
    return None


def step_bound(cfg: RoundConfig, size: int, weight_norm: float, factor: float) -> float:
    """The step bound of a group of `size` values whose global weights have norm `weight_norm`."""
    steps = cfg.lr * cfg.local_steps
    return factor * steps * (math.sqrt(size) + cfg.weight_decay * weight_norm) + FP16_ROUNDING * weight_norm


class NormHistory:
    """Each group's accepted update norms in its last `rounds` aggregated rounds (strategy state:
    checkpointed with the run, so a resumed run bounds as the uninterrupted one)."""

    def __init__(self, rounds: int = DEFAULT_NORM_HISTORY_ROUNDS) -> None:
        if rounds < 1:
            raise ValueError(f"norm history: rounds {rounds} < 1")
        self.rounds = rounds
        self.norms: dict[str, dict[int, list[float]]] = {}  # group -> round -> accepted norms

    def reference(self, group: str, rnd: int) -> float | None:
        """The median accepted norm of the group over its last `rounds` rounds before `rnd`."""
        earlier = sorted(r for r in self.norms.get(group, {}) if r < rnd)[-self.rounds :]
        values = [n for r in earlier for n in self.norms[group][r]]
        return float(np.median(values)) if values else None

    def record(self, rnd: int, group: str, norms: Iterable[float]) -> None:
        """The group's accepted norms of round `rnd` (replacing any recorded for it)."""
        values = [float(n) for n in norms]
        if not values:
            return
        by_round = self.norms.setdefault(group, {})
        by_round[rnd] = values
        for old in sorted(by_round)[: -self.rounds]:
            del by_round[old]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            f"{_HISTORY_PREFIX}{group}": np.array(
                [[r, n] for r, values in sorted(by_round.items()) for n in values], dtype=np.float64
            ).reshape(-1, 2)
            for group, by_round in sorted(self.norms.items())
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Inverse of state_dict (entries norms.<group>); raises ValueError naming a bad entry."""
        norms: dict[str, dict[int, list[float]]] = {}
        for name, value in state.items():
            group = name.removeprefix(_HISTORY_PREFIX)
            table = np.asarray(value)
            if group == name or not group:
                raise ValueError(f"norm history: unexpected entry {name!r} (expected {_HISTORY_PREFIX}<group>)")
            if table.ndim != 2 or table.shape[1] != 2 or not np.isfinite(table).all() or (table[:, 1] < 0).any():
                raise ValueError(
                    f"norm history entry {name!r}: expected finite [round, norm >= 0] rows, got shape {table.shape}"
                )
            for rnd, norm in table:
                norms.setdefault(group, {}).setdefault(int(rnd), []).append(float(norm))
        self.norms = norms

    @staticmethod
    def owns(name: str) -> bool:
        """Whether a strategy state entry is the norm history's."""
        return name.startswith(_HISTORY_PREFIX)


@dataclass(frozen=True)
class NormBounds:
    """The coordinator's settings of the update-norm bounds (ModalityAwareFedAvg's docstring)."""

    step_factor: float = DEFAULT_NORM_STEP_FACTOR
    history_factor: float = DEFAULT_NORM_HISTORY_FACTOR
    outlier_factor: float = 10.0
    max_update_norm: float | None = None


def update_norms(
    accepted: list[Accepted], previous: Mapping[str, np.ndarray], group_of: Callable[[str], str]
) -> dict[str, dict[int, float]]:
    """Each reply's update norm per group it returned: group -> node -> ||w_{r,g} - w_g||."""
    norms: dict[str, dict[int, float]] = {}
    for node_id, reply, counts in accepted:
        # Summed in sorted key order: a reply's (or a checkpoint's) key order may differ
        # between processes, and the history must be bit for bit a resumed run's. One pass over
        # the reply's keys, each key's squared differences in float64, in place.
        sq = dict.fromkeys(counts, 0.0)
        for key in sorted(reply.arrays):
            group = group_of(key)
            if group in sq:
                diff = np.subtract(reply.arrays[key], previous[key], dtype=np.float64)
                sq[group] += float(np.sum(np.square(diff, out=diff)))
        for group, total in sq.items():
            norms.setdefault(group, {})[node_id] = total**0.5
    return norms


def drop_norm_outliers(
    accepted: list[Accepted],
    previous: Mapping[str, np.ndarray],
    server_round: int,
    round_config: RoundConfig | None,
    settings: NormBounds,
    history: NormHistory,
    group_of: Callable[[str], str],
    norms: Mapping[str, Mapping[int, float]] | None = None,
) -> tuple[list[Accepted], dict[int, str], dict[str, float]]:
    """Leave out replies whose update norm in some group is over the group's bound (step,
    history, max_update_norm) or absurd against the round's others. Returns the replies kept,
    why each other was left out (by node) and each group's bound; the kept replies' norms join
    `history`. `norms`: update_norms of `accepted`, where the caller has them."""
    norms = norms if norms is not None else update_norms(accepted, previous, group_of)
    bounds: dict[str, float] = {}
    bad: dict[int, str] = {}
    for group, by_node in norms.items():
        values = [previous[k] for k in sorted(previous) if group_of(k) == group]
        limits = norm_limits(values, round_config, settings, history.reference(group, server_round))
        # The group's bound is the tightest; a rejection names it and what set it.
        how, limit = min(limits.items(), key=lambda kv: kv[1]) if limits else ("", math.inf)
        if limits:
            bounds[group] = limit
        for node_id, norm in by_node.items():
            if norm > limit:
                bad.setdefault(node_id, f"group {group!r} update norm {norm:.3g} > {limit:.3g} ({how})")
            others = [n for other, n in by_node.items() if other != node_id]
            if len(others) >= 2:
                median = float(np.median(others))
                if median > 0 and norm > settings.outlier_factor * median:
                    bad.setdefault(
                        node_id,
                        f"group {group!r} update norm {norm:.3g} > {settings.outlier_factor:g} x "
                        f"median of the others ({median:.3g})",
                    )
    kept = [a for a in accepted if a[0] not in bad]
    for group, by_node in sorted(norms.items()):
        kept_norms = [by_node[node_id] for node_id, _, counts in kept if group in counts]
        history.record(server_round, group, kept_norms)
        log.info(
            "round %d: group %r: %d accepted update norms up to %s, bound %s",
            server_round,
            group,
            len(kept_norms),
            f"{max(kept_norms):.3g}" if kept_norms else "-",
            f"{bounds[group]:.3g}" if group in bounds else "none",
        )
    return kept, bad, bounds


def norm_limits(
    values: list[np.ndarray], round_config: RoundConfig | None, settings: NormBounds, reference: float | None
) -> dict[str, float]:
    """The bounds on the update norm of one group (its global `values`, in sorted key order) this
    round, by what sets each; `reference`: the median of its accepted norms in earlier rounds."""
    limits: dict[str, float] = {}
    if round_config is not None:
        size = sum(v.size for v in values)
        weight_norm = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in values) ** 0.5
        how = (
            f"step bound: norm-step-factor {settings.step_factor:g} x lr {round_config.lr:g} x local-steps "
            f"{round_config.local_steps} x (sqrt of {size:,} values + weight-decay x weight norm {weight_norm:.3g})"
        )
        limits[how] = step_bound(round_config, size, weight_norm, settings.step_factor)
    if reference is not None and reference > 0:
        how = (
            f"history bound: norm-history-factor {settings.history_factor:g} x median {reference:.3g} of the "
            "group's accepted norms in earlier rounds"
        )
        limits[how] = settings.history_factor * reference
    if settings.max_update_norm is not None:
        limits["max-update-norm"] = settings.max_update_norm
    return limits


__all__ = [
    "ADAM_STEP_RATIO",
    "Accepted",
    "NormBounds",
    "drop_norm_outliers",
    "norm_limits",
    "DEFAULT_NORM_HISTORY_FACTOR",
    "DEFAULT_NORM_HISTORY_ROUNDS",
    "DEFAULT_NORM_STEP_FACTOR",
    "NormHistory",
    "count_problem",
    "max_examples",
    "step_bound",
]
