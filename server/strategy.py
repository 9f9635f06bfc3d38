"""ModalityAwareFedAvg: federated averaging over sites that hold different modalities.

Configuration, the server optimiser's state and the averaging rule; nothing of a round in flight.
Who is sent what and which replies are acceptable at all is the round's (server/round.py,
server/replies.py); the arithmetic of the update-norm bounds is server/influence.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord

from healthfm_core.model.groups import GROUPS, parameter_group
from healthfm_core.protocol import RoundConfig
from healthfm_core.protocol.packing import pack_arrays, pack_group_sets
from server.clipping import DEFAULT_NORM_CLIP_FACTOR, Clipped, clip_to_holders
from server.influence import (
    DEFAULT_NORM_HISTORY_FACTOR,
    DEFAULT_NORM_HISTORY_ROUNDS,
    DEFAULT_NORM_STEP_FACTOR,
    Accepted,
    NormBounds,
    NormHistory,
    drop_norm_outliers,
)
from server.replies import ReplyLimits

# Under "healthfm": the ServerApp's server.log (server_app.py) keeps what the strategy decided.
log = logging.getLogger("healthfm.server.strategy")


@dataclass
class GroupAdam:
    """FedAdam-style server optimiser state, per key (so per group)."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, key: str, previous: np.ndarray, averaged: np.ndarray) -> np.ndarray:
        delta = averaged - previous
        m = self.beta1 * self.m.get(key, np.zeros_like(delta)) + (1 - self.beta1) * delta
        v = self.beta2 * self.v.get(key, np.zeros_like(delta)) + (1 - self.beta2) * delta * delta
        self.m[key], self.v[key] = m, v
        updated: np.ndarray = previous + self.lr * m / (np.sqrt(v) + self.tau)
        return updated.astype(previous.dtype)


def pack_record(arrays: Mapping[str, np.ndarray], part_of: Callable[[str], str] | None = None) -> ArrayRecord:
    """Arrays as a message carries them (healthfm_core/protocol/packing.py): one Flower Array per part."""
    return ArrayRecord({label: Array(blob) for label, blob in pack_arrays(arrays, part_of).items()})


class ModalityAwareFedAvg:
    """FedAvg where each parameter is averaged only over the sites that trained it, where no
    reply weighs or moves the model more than an honest site could in one round, and where over
    rounds no site pushes a group of 3+ holders much further than a coherent honest site.

    Every state_dict key belongs to one group (``shared``, ``ehr``, ``wearables``,
    ``genomics``; see ``healthfm_core.model.groups.parameter_group``). A site receives and
    returns only the groups it has data for, and reports its examples per group
    (``TrainReply.group_examples``). For each key k of group g, with R_k the accepted replies
    holding k:

        w_k <- sum_{r in R_k} n_{r,g} w_{r,k} / sum_{r in R_k} n_{r,g}

    A key no accepted reply holds, or whose group has fewer than ``min_sites_per_group``
    contributing sites, keeps its previous value. With every site holding every group (each
    group's count equal to ``num_examples``, and no update clipped: below) this is FedAvg exactly.

    Bounded influence (server/influence.py has the arithmetic and the measurements). Of round t's
    RoundConfig (the server's own: local_steps S, batch_size B, lr, weight_decay wd), a reply is
    accepted only if:

      1. counts: num_examples and every n_{r,g} are integers in [1, S x B] (a site trains S
         batches of at most B samples; a DP site reports its expected counts, never more). A
         larger count is a malformed reply: rejected ("invalid"), like any reply that does not
         parse. So one site weighs at most S x B against the others' counts in any average.
      2. update norm: for every group g it returns, ||w_{r,g} - w_g|| (its change of the round's
         global weights w_g, P_g values) is at most the smallest of
           - the step bound  c_step x lr x S x (sqrt(P_g) + wd ||w_g||) + 2^-10 ||w_g||: no
             AdamW training moves a value by more than 7.27 lr a step (whatever its gradients or
             DP noise); c_step = ``norm_step_factor``, default 10 (honest norms measured at most
             0.78 x lr S sqrt(P_g));
           - the history bound  c_hist x the median of g's accepted update norms over its last
             ``norm_history_rounds`` (default 5) aggregated rounds; c_hist = ``norm_history_factor``,
             default 10 (honest norms measured at most 1.27 x that median). None in a group's
             first round;
           - ``max_update_norm``, the coordinator's absolute cap (default none);
         and, with at least two other replies holding g, ``norm_outlier_factor`` (default 10) x
         the median of theirs. Any reply that breaks one is rejected ("outlier") whatever the
         number of g's holders: one holder alone cannot move g further than the bounds.
    Rejection, not rescaling, for a reply over these bounds. The accepted norms of round t join
    the history. A caller that passes no RoundConfig (tests with synthetic arrays) gets neither
    the count nor the step bound.

    Influence over rounds (server/clipping.py has the arithmetic and the measurements): the
    bounds above let a reply move a group by up to 10x an honest one, every round; a site doing
    so always in one direction adds up to ~9x a coherent honest site's push. So, with
    c = ``norm_clip_factor`` (default 1.5; None: off), in a group with at least 3 accepted
    holders an update over c x the median of the other holders' norms is scaled down to it
    (``clip_updates``, after ``bound_updates``): over any number of rounds a site then pushes
    a group about c times as far as a coherent honest site at most. An update within it is
    averaged as it came, so honest rounds within c x the median stay FedAvg to the last bit.
    Groups with 1-2 holders in a round are under those holders' control: no rule here bounds
    them beyond the per-reply bounds (the round record names them every round).

    Arrays travel packed (``healthfm_core/protocol/packing.py``): the global arrays go out as one packed
    part per message, packed once per distinct group set (``records_for_nodes``). Before the
    bounds, every reply has been parsed and checked (server/replies.py: size, the packed blobs,
    keys, shapes, dtypes, int8 scales, groups sent, values, counts; fp16 upcast and int8
    de-quantised against the round's global arrays); the round (server/round.py) calls
    ``bound_updates``, ``clip_updates``, then ``average``. Optionally a FedAdam-style server step is applied to the
    averaged pseudo-gradient.

    State: configuration, the server optimiser's moments and the groups' accepted update norms
    (both checkpointed: ``state_dict``); no round in flight: each round's inputs are arguments.
    The clip keeps no state (it reads only the round's replies), so a resumed run clips as the
    uninterrupted one.
    Not a Flower ``Strategy``: docs/architecture.md ("Names other tools rely on") says why and
    how to reuse it.
    """

    def __init__(
        self,
        *,
        min_sites_per_group: int = 1,
        norm_outlier_factor: float = 10.0,
        max_update_norm: float | None = None,
        norm_step_factor: float = DEFAULT_NORM_STEP_FACTOR,
        norm_history_factor: float = DEFAULT_NORM_HISTORY_FACTOR,
        norm_history_rounds: int = DEFAULT_NORM_HISTORY_ROUNDS,
        norm_clip_factor: float | None = DEFAULT_NORM_CLIP_FACTOR,
        max_reply_bytes: int | None = None,
        max_abs_value: float | None = 1e6,
        server_optimizer: GroupAdam | None = None,
        group_of: Callable[[str], str] = parameter_group,
    ) -> None:
        self.min_sites_per_group = min_sites_per_group
        self.norm_outlier_factor = norm_outlier_factor
        self.max_update_norm = max_update_norm
        self.norm_step_factor = norm_step_factor
        self.norm_history_factor = norm_history_factor
        self.norm_history = NormHistory(norm_history_rounds)  # checkpointed (state_dict)
        self.norm_clip_factor = norm_clip_factor
        # Checked before any array is decoded (server/limits.py; None: no limit).
        self.max_reply_bytes = max_reply_bytes
        # No trained weight is anywhere near this; values near float32's max would overflow the
        # weighted sum to Inf even though each reply is finite.
        self.max_abs_value = max_abs_value
        self.server_optimizer = server_optimizer
        self.group_of = group_of

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resumed run needs besides the global arrays: the server optimiser's moments, as
        ``m.<key>`` / ``v.<key>`` arrays (none without a server optimiser), and each group's
        accepted update norms, as ``norms.<group>`` (server/influence.py NormHistory)."""
        out = self.norm_history.state_dict()
        if self.server_optimizer is not None:
            out.update({f"m.{k}": v for k, v in self.server_optimizer.m.items()})
            out.update({f"v.{k}": v for k, v in self.server_optimizer.v.items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state_dict; state from a run without a server optimiser cannot be loaded
        into one with it (or the other way round) unless it holds no moments. A checkpoint written
        before the norm history existed loads with an empty one."""
        history = NormHistory(self.norm_history.rounds)
        history.load_state_dict({k: v for k, v in state.items() if NormHistory.owns(k)})
        state = {k: v for k, v in state.items() if not NormHistory.owns(k)}
        if self.server_optimizer is None:
            if state:
                raise ValueError(f"strategy has no server optimiser but the state holds {len(state)} arrays")
            self.norm_history = history
            return
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for name, value in state.items():
            kind, _, key = name.partition(".")
            if kind not in ("m", "v") or not key:
                raise ValueError(f"unexpected strategy state entry {name!r} (expected m.<key> or v.<key>)")
            (m if kind == "m" else v)[key] = np.asarray(value)
        if set(m) != set(v):
            raise ValueError(f"server optimiser state: m and v cover different keys ({sorted(set(m) ^ set(v))[:3]})")
        self.server_optimizer.m, self.server_optimizer.v = m, v
        self.norm_history = history

    # ------------------------------------------------------------------ the rule
    @property
    def reply_limits(self) -> ReplyLimits:
        """What a reply may hold (server/replies.py checks it before the bounds and the average)."""
        return ReplyLimits(self.max_reply_bytes, self.max_abs_value, self.group_of)

    def records_for_nodes(
        self, arrays: Mapping[str, np.ndarray], node_groups: Mapping[int, Sequence[str]]
    ) -> dict[int, ArrayRecord]:
        """Each node's ArrayRecord of the global arrays: its groups' arrays as one packed part
        (healthfm_core/protocol/packing.py pack_group_sets), packed once per distinct group set. Nodes of
        one set carry the same blob (its bytes shared, not copied: one content-addressed object,
        pushed and stored once); each gets its own ArrayRecord (Flower's copies the Array, not
        its bytes)."""
        packed = pack_group_sets(arrays, self.group_of, node_groups.values())
        parts = {groups: {label: Array(blob) for label, blob in flat.items()} for groups, flat in packed.items()}
        return {node: ArrayRecord(dict(parts[frozenset(groups)])) for node, groups in node_groups.items()}

    def bound_updates(
        self,
        accepted: list[Accepted],
        previous: Mapping[str, np.ndarray],
        server_round: int,
        round_config: RoundConfig | None,
        norms: Mapping[str, Mapping[int, float]] | None = None,
    ) -> tuple[list[Accepted], dict[int, str], dict[str, float]]:
        """The replies within every bound of the class docstring, why each other is not (by node),
        and each group's bound; the kept replies' norms join the history. `norms`: the replies'
        update norms (server/influence.py update_norms), where the caller has them."""
        settings = NormBounds(
            self.norm_step_factor, self.norm_history_factor, self.norm_outlier_factor, self.max_update_norm
        )
        return drop_norm_outliers(
            accepted, previous, server_round, round_config, settings, self.norm_history, self.group_of, norms
        )

    def clip_updates(
        self,
        accepted: list[Accepted],
        previous: Mapping[str, np.ndarray],
        server_round: int,
        norms: Mapping[str, Mapping[int, float]] | None = None,
    ) -> tuple[list[Accepted], Clipped]:
        """The replies with every update over norm_clip_factor x the median of its group's other
        holders' norms scaled down to it (groups of 3+ holders; the class docstring), and what was
        clipped, by node; the replies unchanged when norm_clip_factor is None. `norms`: as
        bound_updates'."""
        if self.norm_clip_factor is None:
            return accepted, {}
        return clip_to_holders(accepted, previous, self.norm_clip_factor, self.group_of, server_round, norms)

    def average(
        self, accepted: list[Accepted], previous: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
        """The new global arrays (the class docstring's average, then the server optimiser) and
        the nodes averaged into each group that was updated."""
        contributors: dict[str, list[int]] = {g: [] for g in GROUPS}
        for node_id, _, counts in accepted:
            for group in counts:
                contributors.setdefault(group, []).append(node_id)
        updated_groups = {g for g, nodes in contributors.items() if len(nodes) >= self.min_sites_per_group}
        for group, nodes in contributors.items():
            if nodes and group not in updated_groups:
                log.info(
                    "group %r: %d contributing sites < minimum %d; kept unchanged",
                    group,
                    len(nodes),
                    self.min_sites_per_group,
                )
        averaged: dict[str, np.ndarray] = {}
        for key, old in previous.items():
            group = self.group_of(key)
            # Decoded replies hold the global dtype already (parse_reply); astype is a no-op guard.
            holders = [
                (reply.arrays[key].astype(old.dtype, copy=False), counts[group])
                for _, reply, counts in accepted
                if key in reply.arrays
            ]
            if group not in updated_groups or not holders:
                continue
            total = sum(n for _, n in holders)
            # Same arithmetic, in the same order, as flwr's aggregate_arrayrecords, so that with
            # every group everywhere the result is FedAvg's to the last bit.
            value = None
            for array, n in holders:
                term = array * (n / total)
                value = term if value is None else value + term
            averaged[key] = np.asarray(value)
        return self.apply_update(previous, averaged), {
            g: nodes for g, nodes in contributors.items() if g in updated_groups
        }

    def apply_update(
        self, previous: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """A round's new global arrays, plain or secure (server/secure_round.py): each key the round
        averaged takes its sites' average, then the server optimiser's step where there is one; every
        other key keeps its value. A plain round's average is of the sites' arrays (FedAvg's, to the
        last bit); a secure round's is the previous arrays plus the unmasked mean update."""
        out: dict[str, np.ndarray] = {}
        for key, old in previous.items():
            if key not in averaged:
                out[key] = old
                continue
            value = averaged[key]
            if self.server_optimizer is not None:
                value = self.server_optimizer.step(key, old, value)
            out[key] = value
        return out
