"""Reply checks: which node a train reply answers for, and whether it may be averaged at all.

A peer's reply is untrusted input: nothing in it may stop the round. `judge_replies` takes one
round's replies and returns each that parsed (`TrainReply`), those that may be averaged, and every
other one with its reason (`RejectedReply`): an error reply, a site's refusal, a reply to no
message sent, a second reply from one node, or a reply that does not fit the round
(`parse_reply`: size, the packed blobs, keys, shapes, dtypes, int8 scales, groups sent, values,
counts). Update norms are checked after these, by the strategy's bounds (server/influence.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from healthfm_core.protocol import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    SETUP_NEEDED_RECORD,
    STATUS_RECORD,
    RoundConfig,
    TrainReply,
)
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.protocol.transport import SCALES_RECORD, decode_update, wire_dtype_ok
from healthfm_core.terms.groups import GROUPS
from server.influence import Accepted, count_problem
from server.limits import array_record_bytes
from server.runlog import message_size

# Under "healthfm": the ServerApp's server.log (server_app.py) keeps its rejections.
log = logging.getLogger("healthfm.server.replies")

# Why a reply was left out: the round records a site as "error", "refused" or "rejected" (the rest).
RejectionKind = Literal["error", "refused", "invalid", "unsolicited", "duplicate", "outlier"]


@dataclass(frozen=True)
class RejectedReply:
    """Why one reply was left out of a round (kept for the audit log)."""

    node_id: int
    reason: str
    kind: RejectionKind = "invalid"


@dataclass(frozen=True)
class ReplyLimits:
    """What a reply may hold besides the round's keys and shapes (the strategy's configuration)."""

    max_reply_bytes: int | None  # checked before any array is decoded (server/limits.py; None: no limit)
    max_abs_value: float | None  # no trained weight is anywhere near it (None: no limit)
    group_of: Callable[[str], str]


@dataclass
class JudgedReplies:
    """One round's replies sorted: parsed (accepted, refused or rejected later), acceptable, left out."""

    parsed: dict[int, TrainReply] = field(default_factory=dict)
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[RejectedReply] = field(default_factory=list)


def groups_for_node(node_id: int, node_groups: Mapping[int, Sequence[str]] | None) -> list[str]:
    """The groups a node may train: every group without a capabilities map, else its entry."""
    if node_groups is None:
        return list(GROUPS)
    return list(node_groups.get(node_id, []))


def origin(reply: Message, sent: Sequence[Message]) -> int:
    """The node a reply answers for. Error replies the SuperLink generates itself (node
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


def setup_needed(replies: Iterable[Message], sent: Sequence[Message]) -> set[int]:
    """The nodes whose reply says they lack the run's setup (their SuperNode restarted)."""
    return {origin(r, sent) for r in replies if not r.has_error() and SETUP_NEEDED_RECORD in r.content.config_records}


def judge_replies(
    server_round: int,
    replies: Iterable[Message],
    previous: Mapping[str, np.ndarray],
    node_groups: Mapping[int, Sequence[str]] | None,
    sent: Sequence[Message],
    round_config: RoundConfig | None,
    limits: ReplyLimits,
    read: EarlyReads | None = None,
) -> JudgedReplies:
    """Parse and check one round's replies against the messages sent. Never raises for anything
    in a reply. `read`: the replies already parsed as they arrived (`EarlyReads`), not parsed again."""
    addressed = {m.metadata.dst_node_id for m in sent}
    out = JudgedReplies()
    seen: set[int] = set()
    for msg in replies:
        node_id = origin(msg, sent)
        if node_id not in addressed:
            out.rejected.append(
                RejectedReply(node_id, f"no train message was sent to node {node_id} this round", "unsolicited")
            )
            continue
        if node_id in seen:
            out.rejected.append(
                RejectedReply(node_id, f"a second reply from node {node_id} (one per message)", "duplicate")
            )
            continue
        seen.add(node_id)
        if msg.has_error():
            out.rejected.append(RejectedReply(node_id, f"error reply: {msg.error.reason}", "error"))
            continue
        reply = read.get(msg) if read is not None else None
        if reply is None:
            reply = read_reply(server_round, msg, node_id, previous, node_groups, round_config, limits)
        if isinstance(reply, RejectedReply):
            out.rejected.append(reply)
            continue
        out.parsed[node_id] = reply
        if reply.status == "refused":
            # The site's own policy said no (e.g. its epsilon cap): it contributes nothing.
            out.rejected.append(RejectedReply(node_id, f"refused by the site: {reply.reason}", "refused"))
            continue
        out.accepted.append((node_id, reply, {g: float(n) for g, n in reply.group_examples.items()}))
    return out


def read_reply(
    server_round: int,
    msg: Message,
    node_id: int,
    previous: Mapping[str, np.ndarray],
    node_groups: Mapping[int, Sequence[str]] | None,
    round_config: RoundConfig | None,
    limits: ReplyLimits,
) -> TrainReply | RejectedReply:
    """One reply (not an error reply) of `node_id` parsed, or why it does not parse. Never raises."""
    try:
        return parse_reply(msg.content, previous, groups_for_node(node_id, node_groups), round_config, limits)
    except Exception as err:  # a peer's reply: nothing in it may stop the round
        if not isinstance(err, ValueError):
            log.exception("round %d: unexpected error parsing node %d's reply", server_round, node_id)
            err = ValueError(f"invalid reply ({type(err).__name__}: {err})")
        return RejectedReply(node_id, str(err))


class EarlyReads:
    """A round's replies taken in the moment each arrives (server/exchange.py's `on_reply`), while
    the server waits for the slowest site: each reply's size (server/runlog.py `message_size`) and
    its reading, so that after the last reply only that one is sized, parsed and checked
    (`judge_replies`). Replies that judge_replies leaves out before parsing (error replies,
    replies to no message sent) are sized but not read. What is read is exactly what
    judge_replies would read: the same function (`read_reply`) on the same inputs."""

    def __init__(
        self,
        server_round: int,
        previous: Mapping[str, np.ndarray],
        node_groups: Mapping[int, Sequence[str]] | None,
        sent: Sequence[Message],
        round_config: RoundConfig | None,
        limits: ReplyLimits,
    ) -> None:
        self.server_round, self.previous, self.node_groups = server_round, previous, node_groups
        self.sent, self.round_config, self.limits = sent, round_config, limits
        # by id(): Message is unhashable; the message is kept, so that its id stays its own
        self._taken: dict[int, tuple[Message, tuple[int, int], TrainReply | RejectedReply | None]] = {}

    def __call__(self, msg: Message) -> None:
        node_id = origin(msg, self.sent)
        result = None
        if not msg.has_error() and any(m.metadata.dst_node_id == node_id for m in self.sent):
            result = read_reply(
                self.server_round, msg, node_id, self.previous, self.node_groups, self.round_config, self.limits
            )
        self._taken[id(msg)] = (msg, message_size(msg), result)

    def _entry(self, msg: Message) -> tuple[Message, tuple[int, int], TrainReply | RejectedReply | None] | None:
        entry = self._taken.get(id(msg))
        return entry if entry is not None and entry[0] is msg else None  # the message itself, not one alike

    def get(self, msg: Message) -> TrainReply | RejectedReply | None:
        """`msg` as it was read on arrival; None if it was not."""
        entry = self._entry(msg)
        return entry[2] if entry is not None else None

    def size(self, msg: Message) -> tuple[int, int]:
        """(bytes, objects) of `msg`, as taken on arrival or now."""
        entry = self._entry(msg)
        return entry[1] if entry is not None else message_size(msg)


def parse_reply(
    content: RecordDict,
    previous: Mapping[str, np.ndarray],
    allowed: Sequence[str],
    round_config: RoundConfig | None,
    limits: ReplyLimits,
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
        if limits.max_reply_bytes is not None and size > limits.max_reply_bytes:
            raise ValueError(f"reply of {size:,} B exceeds the limit of {limits.max_reply_bytes:,} B")
        packed = unpack_record(records, where=f"record {ARRAYS_RECORD!r}", max_bytes=limits.max_reply_bytes)
        wire = {key: _check_wire(key, value, previous) for key, value in packed.items()}
        # fp16 upcast, int8 de-quantised against this round's global arrays (what was sent)
        arrays = decode_update(wire, dict(scales) if scales is not None else None, previous)
    reply = TrainReply.from_records(
        arrays, dict(metrics), dict(status) if status is not None else None, group_of=limits.group_of
    )
    if reply.status == "ok":
        if round_config is not None and (problem := count_problem(reply, round_config)):
            raise ValueError(problem)
        check_arrays(reply, previous, allowed, limits)
    return reply


def _check_wire(key: str, value: np.ndarray, previous: Mapping[str, np.ndarray]) -> np.ndarray:
    """One unpacked array of a reply as it travelled, against the global model's: a key it has,
    its shape, a dtype healthfm_core.protocol.transport accepts for it."""
    if key not in previous:
        raise ValueError(f"unknown key {key!r}")
    expected = previous[key]
    if value.shape != expected.shape:
        raise ValueError(f"key {key!r}: shape {value.shape} != {expected.shape}")
    if not wire_dtype_ok(str(value.dtype), expected.dtype):
        raise ValueError(f"key {key!r}: dtype {value.dtype} != {expected.dtype}")
    return value


def check_arrays(
    reply: TrainReply, previous: Mapping[str, np.ndarray], allowed: Sequence[str], limits: ReplyLimits
) -> None:
    """A parsed reply's arrays against the round: groups sent, whole groups, magnitudes."""
    allowed_set = set(allowed)
    for key, value in reply.arrays.items():
        group = limits.group_of(key)
        if group not in allowed_set:
            raise ValueError(f"key {key!r} of group {group!r} was not sent to this node")
        if limits.max_abs_value is not None and value.size:
            peak = float(np.max(np.abs(value.astype(np.float64))))
            if peak > limits.max_abs_value:
                raise ValueError(f"key {key!r}: |value| up to {peak:.3g} > limit {limits.max_abs_value:.3g}")
    for group in reply.groups:
        missing = [k for k in previous if limits.group_of(k) == group and k not in reply.arrays]
        if missing:
            raise ValueError(f"partial group {group!r}: missing {len(missing)} keys, e.g. {missing[0]!r}")
