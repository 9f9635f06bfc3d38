"""ModalityAwareFedAvg: federated averaging over sites that hold different modalities."""

from __future__ import annotations

import logging
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
    TrainReply,
    mean_losses,
    round_metrics,
)
from healthfm_core.model.groups import GROUPS, parameter_group
from healthfm_core.packing import pack_arrays, pack_group_sets, unpack_record
from healthfm_core.transport import SCALES_RECORD, decode_update, wire_dtype_ok
from server.limits import array_record_bytes

log = logging.getLogger(__name__)

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
    """FedAvg where each parameter is averaged only over the sites that trained it.

    Every state_dict key belongs to one group (``shared``, ``ehr``, ``wearables``,
    ``genomics``; see ``healthfm_core.model.groups.parameter_group``). A site receives and
    returns only the groups it has data for, and reports its examples per group
    (``TrainReply.group_examples``). For each key k of group g, with R_k the accepted replies
    holding k:

        w_k <- sum_{r in R_k} n_{r,g} w_{r,k} / sum_{r in R_k} n_{r,g}

    A key no accepted reply holds, or whose group has fewer than ``min_sites_per_group``
    contributing sites, keeps its previous value. With every site holding every group (and
    each group's count equal to ``num_examples``) this is FedAvg exactly.

    Arrays travel packed (``healthfm_core/packing.py``): the global arrays go out as one packed
    part per message, packed once per distinct group set (``records_for_nodes``), a reply comes
    back as packed parts, unpacked and checked
    before anything else is. A reply is accepted only if it parses as a TrainReply and its arrays
    fit the round (``parse_reply``: size, the packed blobs, keys, shapes, dtypes, int8 scales,
    groups sent, values) and its update norm is
    not absurd against the round's others; any other reply (error, refusal, a reply to no
    message sent, a second reply from one node) is rejected with its reason and logged, and
    the round goes on. Optionally a FedAdam-style server step is applied to the averaged
    pseudo-gradient. Replies come in their round's transport (healthfm_core/transport.py): fp16
    is upcast and int8 de-quantised against the round's global arrays before any check or average.

    State: configuration, and the server optimiser's moments (checkpointed: ``state_dict``).
    Each round's inputs (global arrays, the groups each node may train, the messages sent) are
    arguments of ``aggregate``. Flower's own ``start()`` loop hands the global arrays to
    ``configure_train`` only, so for that loop alone ``configure_train`` keeps the round in
    flight for ``aggregate_train``; FederationServer calls ``train_messages`` and ``aggregate``.
    """

    def __init__(
        self,
        *,
        min_sites_per_group: int = 1,
        norm_outlier_factor: float = 10.0,
        max_update_norm: float | None = None,
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
        """What a resumed run needs besides the global arrays: the server optimiser's moments,
        as ``m.<key>`` / ``v.<key>`` arrays (empty without a server optimiser)."""
        if self.server_optimizer is None:
            return {}
        out = {f"m.{k}": v for k, v in self.server_optimizer.m.items()}
        out.update({f"v.{k}": v for k, v in self.server_optimizer.v.items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state_dict; state from a run without a server optimiser cannot be loaded
        into one with it (or the other way round) unless it is empty."""
        if self.server_optimizer is None:
            if state:
                raise ValueError(f"strategy has no server optimiser but the state holds {len(state)} arrays")
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
        self._flower_round = _RoundInputs({k: v.numpy() for k, v in arrays.items()}, None, messages)
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
            server_round, replies, current_arrays=inputs.arrays, node_groups=inputs.node_groups, sent=inputs.sent
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
    ) -> RoundOutcome:
        """Parse, check and average one round's replies. Never raises for anything in a reply."""
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
                reply = self.parse_reply(msg.content, previous, allowed)
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
        accepted, outliers = self.drop_norm_outliers(accepted, previous)
        rejected.extend(outliers)
        for r in rejected:
            log.warning("round %d: rejected reply from node %d: %s", server_round, r.node_id, r.reason)
        if not accepted:
            log.warning("round %d: no acceptable reply; global arrays unchanged", server_round)
            return RoundOutcome(server_round, None, {}, rejected, parsed, [])
        new_arrays, contributors = self.average(accepted, previous)
        return RoundOutcome(server_round, new_arrays, contributors, rejected, parsed, [a[0] for a in accepted])

    def parse_reply(
        self, content: RecordDict, previous: Mapping[str, np.ndarray], allowed: Sequence[str]
    ) -> TrainReply:
        """The one place a train reply is validated: its records, their size, the TrainReply it
        parses as, then its arrays against the global model. Raises ValueError naming the
        first problem found."""
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
        self, accepted: list[_Accepted], previous: Mapping[str, np.ndarray]
    ) -> tuple[list[_Accepted], list[RejectedReply]]:
        """Reject replies whose update norm (per group) is absurd against the round's others."""
        norms: dict[str, dict[int, float]] = {}
        for node_id, reply, counts in accepted:
            for group in counts:
                sq = sum(
                    float(np.sum((reply.arrays[k].astype(np.float64) - previous[k]) ** 2))
                    for k in reply.arrays
                    if self.group_of(k) == group
                )
                norms.setdefault(group, {})[node_id] = sq**0.5
        bad: dict[int, str] = {}
        for group, by_node in norms.items():
            for node_id, norm in by_node.items():
                if self.max_update_norm is not None and norm > self.max_update_norm:
                    bad.setdefault(
                        node_id, f"group {group!r} update norm {norm:.3g} > limit {self.max_update_norm:.3g}"
                    )
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
        return kept, [RejectedReply(node_id, reason, "outlier") for node_id, reason in bad.items()]

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
