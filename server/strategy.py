"""ModalityAwareFedAvg: federated averaging over sites that hold different modalities."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from healthfm_core.federation import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    STATUS_RECORD,
    RoundConfig,
    TrainReply,
    mean_losses,
    round_metrics,
)
from healthfm_core.model.groups import GROUPS, parameter_group
from healthfm_core.packing import pack_arrays, pack_group_sets, unpack_record
from healthfm_core.transport import SCALES_RECORD, decode_update, wire_dtype_ok
from server.influence import (
    DEFAULT_NORM_HISTORY_FACTOR,
    DEFAULT_NORM_HISTORY_ROUNDS,
    DEFAULT_NORM_STEP_FACTOR,
    NormHistory,
    count_problem,
    step_bound,
)
from server.limits import array_record_bytes

# Under "healthfm": the ServerApp's server.log (server_app.py) keeps its rejections and norm bounds.
log = logging.getLogger("healthfm.server.strategy")

# Why a reply was left out: the ServerApp logs a site as "error", "refused" or "rejected" (the rest).
RejectionKind = Literal["error", "refused", "invalid", "unsolicited", "duplicate", "outlier"]


@dataclass(frozen=True)
class RejectedReply:
    """Why one reply was left out of a round (kept for the audit log)."""

    node_id: int
    reason: str
    kind: RejectionKind = "invalid"


@dataclass(frozen=True)
class RoundOutcome:
    """What one round of aggregation decided."""

    round: int
    arrays: dict[str, np.ndarray] | None  # the new global arrays; None: no acceptable reply (unchanged)
    contributors: dict[str, list[int]]  # group -> nodes averaged into it (groups that were updated)
    rejected: list[RejectedReply]  # every reply left out, with its reason
    replies: dict[int, TrainReply]  # every reply that parsed (accepted, refused or rejected later), by node
    accepted: list[int]  # nodes whose reply was averaged
    # group -> the update norm bound this round applied to it (groups some reply trained)
    norm_bounds: dict[str, float] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, float]:
        """The accepted replies' losses, each weighted by num_examples over the sites reporting it."""
        return mean_losses(self.replies[n] for n in self.accepted)


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


@dataclass(frozen=True)
class _RoundInputs:
    """What Flower's own start() loop hands configure_train but not aggregate_train."""

    arrays: dict[str, np.ndarray]
    node_groups: dict[int, list[str]] | None
    sent: list[Message]
    round_config: RoundConfig | None


# (node, its parsed reply, its decoded arrays, its count per group)
_Accepted = tuple[int, TrainReply, dict[str, float]]


def pack_record(arrays: Mapping[str, np.ndarray], part_of: Callable[[str], str] | None = None) -> ArrayRecord:
    """Arrays as a message carries them (healthfm_core/packing.py): one Flower Array per part."""
    return ArrayRecord({label: Array(blob) for label, blob in pack_arrays(arrays, part_of).items()})


def _as_numpy(arrays: Mapping[str, np.ndarray] | ArrayRecord) -> dict[str, np.ndarray]:
    # Flower's own start() loop hands over its ArrayRecord of one Array per key.
    if isinstance(arrays, ArrayRecord):
        return {k: v.numpy() for k, v in arrays.items()}
    return dict(arrays)


def origin(reply: Message, sent: Sequence[Message]) -> int:
    """The node a train reply answers for. Error replies the SuperLink generates itself (node
    unavailable: a dead SuperNode; message expired) come from the SuperLink's node id; they are
    matched to the addressee through reply_to_message_id (the Grid sets the id of every message
    it pushes)."""
    node = reply.metadata.src_node_id
    if any(m.metadata.dst_node_id == node for m in sent):
        return node
    for message in sent:
        if message.metadata.message_id and message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return node


class ModalityAwareFedAvg(FedAvg):
    """FedAvg where each parameter is averaged only over the sites that trained it, and where no
    reply weighs or moves the model more than an honest site could.

    Every state_dict key belongs to one group (``shared``, ``ehr``, ``wearables``,
    ``genomics``; see ``healthfm_core.model.groups.parameter_group``). A site receives and
    returns only the groups it has data for, and reports its examples per group
    (``TrainReply.group_examples``). For each key k of group g, with R_k the accepted replies
    holding k:

        w_k <- sum_{r in R_k} n_{r,g} w_{r,k} / sum_{r in R_k} n_{r,g}

    A key no accepted reply holds, or whose group has fewer than ``min_sites_per_group``
    contributing sites, keeps its previous value. With every site holding every group (and
    each group's count equal to ``num_examples``) this is FedAvg exactly.

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
    Rejection, never rescaling: an accepted reply is averaged as it came (so FedAvg stays FedAvg
    to the last bit). The accepted norms of round t join the history. A caller that passes no
    RoundConfig (tests with synthetic arrays) gets neither the count nor the step bound.

    Arrays travel packed (``healthfm_core/packing.py``): the global arrays go out as one packed
    part per message, packed once per distinct group set (``records_for_nodes``), a reply comes
    back as packed parts, unpacked and checked
    before anything else is. A reply is accepted only if it parses as a TrainReply and its arrays
    fit the round (``parse_reply``: size, the packed blobs, keys, shapes, dtypes, int8 scales,
    groups sent, values, counts) and its update norms are within the bounds above; any other
    reply (error, refusal, a reply to no message sent, a second reply from one node) is rejected
    with its reason and logged (and so in the round's event and the audit log), and the round
    goes on. Optionally a FedAdam-style server step is applied to the averaged
    pseudo-gradient. Replies come in their round's transport (healthfm_core/transport.py): fp16
    is upcast and int8 de-quantised against the round's global arrays before any check or average.

    State: configuration, the server optimiser's moments and the groups' accepted update norms
    (both checkpointed: ``state_dict``). Each round's inputs (global arrays, the groups each node
    may train, the messages sent, the RoundConfig) are arguments of ``aggregate``. Flower's own
    ``start()`` loop hands the global arrays to ``configure_train`` only, so for that loop alone
    ``configure_train`` keeps the round in flight for ``aggregate_train``; FederationServer calls
    ``train_messages`` and ``aggregate``.
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
        max_reply_bytes: int | None = None,
        max_abs_value: float | None = 1e6,
        server_optimizer: GroupAdam | None = None,
        group_of: Callable[[str], str] = parameter_group,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.min_sites_per_group = min_sites_per_group
        self.norm_outlier_factor = norm_outlier_factor
        self.max_update_norm = max_update_norm
        self.norm_step_factor = norm_step_factor
        self.norm_history_factor = norm_history_factor
        self.norm_history = NormHistory(norm_history_rounds)  # checkpointed (state_dict)
        # Checked before any array is decoded (server/limits.py; None: no limit).
        self.max_reply_bytes = max_reply_bytes
        # No trained weight is anywhere near this; values near float32's max would overflow the
        # weighted sum to Inf even though each reply is finite.
        self.max_abs_value = max_abs_value
        self.server_optimizer = server_optimizer
        self.group_of = group_of
        self._flower_round: _RoundInputs | None = None  # Flower's start() loop only (see above)

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

    # ------------------------------------------------------------------ sending
    @staticmethod
    def groups_for_node(node_id: int, node_groups: Mapping[int, Sequence[str]] | None) -> list[str]:
        """The groups a node may train: every group without a capabilities map, else its entry."""
        if node_groups is None:
            return list(GROUPS)
        return list(node_groups.get(node_id, []))

    def train_messages(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray] | ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        node_groups: Mapping[int, Sequence[str]] | None = None,
    ) -> list[Message]:
        """One train message per sampled node holding a group, with only its groups' arrays
        (one packed part per message, packed once per distinct group set: records_for_nodes)."""
        if self.fraction_train == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        sampled: dict[int, list[str]] = {}
        for node_id in node_ids:
            groups = self.groups_for_node(node_id, node_groups)
            if not groups:
                log.warning("round %d: node %d holds no trainable group; not sampled", server_round, node_id)
                continue
            sampled[node_id] = groups
        records = self.records_for_nodes(_as_numpy(arrays), sampled)
        messages = []
        for node_id, groups in sampled.items():
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config["groups"] = groups
            record = RecordDict(
                {
                    self.arrayrecord_key: records[node_id],
                    self.configrecord_key: node_config,
                }
            )
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node_id))
        log.info("round %d: training on %d nodes", server_round, len(messages))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's start() loop: train_messages for every node and every group, the round kept
        for aggregate_train."""
        messages = self.train_messages(server_round, arrays, config, grid)
        try:  # the counts and step bounds need the round's RoundConfig; another config has none
            round_config: RoundConfig | None = RoundConfig.from_flat(config)
        except ValueError:
            round_config = None
        self._flower_round = _RoundInputs({k: v.numpy() for k, v in arrays.items()}, None, messages, round_config)
        return messages

    def records_for_nodes(
        self, arrays: Mapping[str, np.ndarray], node_groups: Mapping[int, Sequence[str]]
    ) -> dict[int, ArrayRecord]:
        """Each node's ArrayRecord of the global arrays: its groups' arrays as one packed part
        (healthfm_core/packing.py pack_group_sets), packed once per distinct group set. Nodes of
        one set carry the same blob (its bytes shared, not copied: one content-addressed object,
        pushed and stored once); each gets its own ArrayRecord (Flower's copies the Array, not
        its bytes)."""
        packed = pack_group_sets(arrays, self.group_of, node_groups.values())
        parts = {groups: {label: Array(blob) for label, blob in flat.items()} for groups, flat in packed.items()}
        return {node: ArrayRecord(dict(parts[frozenset(groups)])) for node, groups in node_groups.items()}

    # ---------------------------------------------------------------- receiving
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's start() loop: aggregate() with the round configure_train sent."""
        if self._flower_round is None:
            raise RuntimeError(
                "aggregate_train called before configure_train: no global arrays to update "
                "(outside Flower's start() loop call aggregate())"
            )
        inputs, self._flower_round = self._flower_round, None
        outcome = self.aggregate(
            server_round,
            replies,
            current_arrays=inputs.arrays,
            node_groups=inputs.node_groups,
            sent=inputs.sent,
            round_config=inputs.round_config,
        )
        if outcome.arrays is None:
            return None, None
        n = sum(outcome.replies[node].num_examples for node in outcome.accepted)
        # MetricRecord takes the invariant dict of its value union; round_metrics gives int | float.
        values: dict[str, int | float | list[int] | list[float]] = dict(round_metrics(n, outcome.losses))
        metrics = MetricRecord(values)
        return ArrayRecord({k: Array(v) for k, v in outcome.arrays.items()}), metrics

    def aggregate(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        current_arrays: Mapping[str, np.ndarray],
        node_groups: Mapping[int, Sequence[str]] | None,
        sent: Sequence[Message],
        round_config: RoundConfig | None = None,
    ) -> RoundOutcome:
        """Parse, check and average one round's replies. Never raises for anything in a reply.
        `round_config`: what the server asked of every site this round (the counts and step
        bounds follow from it; see the class docstring); None only for callers that configured
        no round (tests with synthetic arrays)."""
        previous = dict(current_arrays)
        addressed = {m.metadata.dst_node_id for m in sent}
        parsed: dict[int, TrainReply] = {}
        accepted: list[_Accepted] = []
        rejected: list[RejectedReply] = []
        seen: set[int] = set()
        for msg in replies:
            node_id = origin(msg, sent)
            if node_id not in addressed:
                rejected.append(
                    RejectedReply(node_id, f"no train message was sent to node {node_id} this round", "unsolicited")
                )
                continue
            if node_id in seen:
                rejected.append(
                    RejectedReply(node_id, f"a second reply from node {node_id} (one per message)", "duplicate")
                )
                continue
            seen.add(node_id)
            if msg.has_error():
                rejected.append(RejectedReply(node_id, f"error reply: {msg.error.reason}", "error"))
                continue
            allowed = self.groups_for_node(node_id, node_groups)
            try:
                reply = self.parse_reply(msg.content, previous, allowed, round_config)
            except Exception as err:  # a peer's reply: nothing in it may stop the round
                if not isinstance(err, ValueError):
                    log.exception("round %d: unexpected error parsing node %d's reply", server_round, node_id)
                    err = ValueError(f"invalid reply ({type(err).__name__}: {err})")
                rejected.append(RejectedReply(node_id, str(err)))
                continue
            parsed[node_id] = reply
            if reply.status == "refused":
                # The site's own policy said no (e.g. its epsilon cap): it contributes nothing.
                rejected.append(RejectedReply(node_id, f"refused by the site: {reply.reason}", "refused"))
                continue
            accepted.append((node_id, reply, {g: float(n) for g, n in reply.group_examples.items()}))
        accepted, outliers, bounds = self.drop_norm_outliers(accepted, previous, server_round, round_config)
        rejected.extend(outliers)
        for r in rejected:
            log.warning("round %d: rejected reply from node %d: %s", server_round, r.node_id, r.reason)
        if not accepted:
            log.warning("round %d: no acceptable reply; global arrays unchanged", server_round)
            return RoundOutcome(server_round, None, {}, rejected, parsed, [], bounds)
        new_arrays, contributors = self.average(accepted, previous)
        return RoundOutcome(server_round, new_arrays, contributors, rejected, parsed, [a[0] for a in accepted], bounds)

    def parse_reply(
        self,
        content: RecordDict,
        previous: Mapping[str, np.ndarray],
        allowed: Sequence[str],
        round_config: RoundConfig | None = None,
    ) -> TrainReply:
        """The one place a train reply is validated: its records, their size, the TrainReply it
        parses as, its counts against the round's (round_config), then its arrays against the
        global model. Raises ValueError naming the first problem found."""
        names = set(content.keys())
        unexpected = sorted(names - {ARRAYS_RECORD, METRICS_RECORD, STATUS_RECORD, SCALES_RECORD})
        if unexpected:
            raise ValueError(
                f"unexpected record {unexpected[0]!r} (a train reply holds {ARRAYS_RECORD!r}, "
                f"{METRICS_RECORD!r}, with int8 arrays {SCALES_RECORD!r}, and, when refused, {STATUS_RECORD!r})"
            )
        records = content.array_records.get(ARRAYS_RECORD)
        metrics = content.metric_records.get(METRICS_RECORD)
        status = content.config_records.get(STATUS_RECORD)
        scales = content.metric_records.get(SCALES_RECORD)
        for name, kind, value in (
            (ARRAYS_RECORD, ArrayRecord, records),
            (METRICS_RECORD, MetricRecord, metrics),
            (STATUS_RECORD, ConfigRecord, status),
            (SCALES_RECORD, MetricRecord, scales),
        ):
            if name in names and value is None:
                raise ValueError(f"record {name!r} is not a {kind.__name__}")
        if metrics is None:
            raise ValueError(f"no MetricRecord {METRICS_RECORD!r}")
        if scales is not None and records is None:
            raise ValueError(f"record {SCALES_RECORD!r} without an ArrayRecord {ARRAYS_RECORD!r} to scale")
        arrays: dict[str, np.ndarray] | None = None
        if records is not None:
            size = array_record_bytes(records)
            if self.max_reply_bytes is not None and size > self.max_reply_bytes:
                raise ValueError(f"reply of {size:,} B exceeds the limit of {self.max_reply_bytes:,} B")
            packed = unpack_record(records, where=f"record {ARRAYS_RECORD!r}", max_bytes=self.max_reply_bytes)
            wire = {key: self._check_wire(key, value, previous) for key, value in packed.items()}
            # fp16 upcast, int8 de-quantised against this round's global arrays (what was sent)
            arrays = decode_update(wire, dict(scales) if scales is not None else None, previous)
        reply = TrainReply.from_records(
            arrays, dict(metrics), dict(status) if status is not None else None, group_of=self.group_of
        )
        if reply.status == "ok":
            if round_config is not None and (problem := count_problem(reply, round_config)):
                raise ValueError(problem)
            self.check_arrays(reply, previous, allowed)
        return reply

    @staticmethod
    def _check_wire(key: str, value: np.ndarray, previous: Mapping[str, np.ndarray]) -> np.ndarray:
        """One unpacked array of a reply as it travelled, against the global model's: a key it
        has, its shape, a dtype healthfm_core.transport accepts for it."""
        if key not in previous:
            raise ValueError(f"unknown key {key!r}")
        expected = previous[key]
        if value.shape != expected.shape:
            raise ValueError(f"key {key!r}: shape {value.shape} != {expected.shape}")
        if not wire_dtype_ok(str(value.dtype), expected.dtype):
            raise ValueError(f"key {key!r}: dtype {value.dtype} != {expected.dtype}")
        return value

    def check_arrays(self, reply: TrainReply, previous: Mapping[str, np.ndarray], allowed: Sequence[str]) -> None:
        """A parsed reply's arrays against the round: groups sent, whole groups, magnitudes."""
        allowed_set = set(allowed)
        for key, value in reply.arrays.items():
            group = self.group_of(key)
            if group not in allowed_set:
                raise ValueError(f"key {key!r} of group {group!r} was not sent to this node")
            if self.max_abs_value is not None and value.size:
                peak = float(np.max(np.abs(value.astype(np.float64))))
                if peak > self.max_abs_value:
                    raise ValueError(f"key {key!r}: |value| up to {peak:.3g} > limit {self.max_abs_value:.3g}")
        for group in reply.groups:
            missing = [k for k in previous if self.group_of(k) == group and k not in reply.arrays]
            if missing:
                raise ValueError(f"partial group {group!r}: missing {len(missing)} keys, e.g. {missing[0]!r}")

    def drop_norm_outliers(
        self,
        accepted: list[_Accepted],
        previous: Mapping[str, np.ndarray],
        server_round: int = 0,
        round_config: RoundConfig | None = None,
    ) -> tuple[list[_Accepted], list[RejectedReply], dict[str, float]]:
        """Reject replies whose update norm in some group is over the group's bound (the class
        docstring: step, history, max_update_norm) or absurd against the round's others. Returns
        the replies kept, the rejections and each group's bound; the kept replies' norms join
        the history."""
        norms: dict[str, dict[int, float]] = {}
        for node_id, reply, counts in accepted:
            for group in counts:
                # Summed in sorted key order: a reply's (or a checkpoint's) key order may differ
                # between processes, and the history must be bit for bit a resumed run's.
                sq = sum(
                    float(np.sum((reply.arrays[k].astype(np.float64) - previous[k]) ** 2))
                    for k in sorted(reply.arrays)
                    if self.group_of(k) == group
                )
                norms.setdefault(group, {})[node_id] = sq**0.5
        bounds: dict[str, float] = {}
        bad: dict[int, str] = {}
        for group, by_node in norms.items():
            limits = self.norm_limits(group, previous, server_round, round_config)
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
                    if median > 0 and norm > self.norm_outlier_factor * median:
                        bad.setdefault(
                            node_id,
                            f"group {group!r} update norm {norm:.3g} > {self.norm_outlier_factor:g} x "
                            f"median of the others ({median:.3g})",
                        )
        kept = [a for a in accepted if a[0] not in bad]
        for group, by_node in sorted(norms.items()):
            kept_norms = [by_node[node_id] for node_id, _, counts in kept if group in counts]
            self.norm_history.record(server_round, group, kept_norms)
            log.info(
                "round %d: group %r: %d accepted update norms up to %s, bound %s",
                server_round,
                group,
                len(kept_norms),
                f"{max(kept_norms):.3g}" if kept_norms else "-",
                f"{bounds[group]:.3g}" if group in bounds else "none",
            )
        return kept, [RejectedReply(node_id, reason, "outlier") for node_id, reason in bad.items()], bounds

    def norm_limits(
        self, group: str, previous: Mapping[str, np.ndarray], server_round: int, round_config: RoundConfig | None
    ) -> dict[str, float]:
        """The bounds on one group's update norm this round, by what sets each (class docstring)."""
        limits: dict[str, float] = {}
        if round_config is not None:
            values = [previous[k] for k in sorted(previous) if self.group_of(k) == group]
            size = sum(v.size for v in values)
            weight_norm = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in values) ** 0.5
            how = (
                f"step bound: norm-step-factor {self.norm_step_factor:g} x lr {round_config.lr:g} x local-steps "
                f"{round_config.local_steps} x (sqrt of {size:,} values + weight-decay x weight norm {weight_norm:.3g})"
            )
            limits[how] = step_bound(round_config, size, weight_norm, self.norm_step_factor)
        reference = self.norm_history.reference(group, server_round)
        if reference is not None and reference > 0:
            how = (
                f"history bound: norm-history-factor {self.norm_history_factor:g} x median {reference:.3g} of the "
                "group's accepted norms in earlier rounds"
            )
            limits[how] = self.norm_history_factor * reference
        if self.max_update_norm is not None:
            limits["max-update-norm"] = self.max_update_norm
        return limits

    def average(
        self, accepted: list[_Accepted], previous: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
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
        out: dict[str, np.ndarray] = {}
        for key, old in previous.items():
            group = self.group_of(key)
            # Decoded replies hold the global dtype already (parse_reply); astype is a no-op guard.
            holders = [
                (reply.arrays[key].astype(old.dtype, copy=False), counts[group])
                for _, reply, counts in accepted
                if key in reply.arrays
            ]
            if group not in updated_groups or not holders:
                out[key] = old
                continue
            total = sum(n for _, n in holders)
            # Same arithmetic, in the same order, as flwr's aggregate_arrayrecords, so that with
            # every group everywhere the result is FedAvg's to the last bit.
            value = None
            for array, n in holders:
                term = array * (n / total)
                value = term if value is None else value + term
            value = np.asarray(value)
            if self.server_optimizer is not None:
                value = self.server_optimizer.step(key, old, value)
            out[key] = value
        return out, {g: nodes for g, nodes in contributors.items() if g in updated_groups}
