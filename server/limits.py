"""Limits that keep one huge or silent site from stalling or swamping a round.

Reply size. A site's train reply carries at most the groups it was sent, so its ArrayRecord is
never larger than the global model's (float16 transport halves it). The server rejects a reply
whose ArrayRecord exceeds `max_reply_bytes` (FederationConfig.max_reply_bytes; 0 = derived:
`reply_size_margin` x the serialized size of the global ArrayRecord) before decoding a single
array, with the reason in the audit log.

What Flower 1.41 itself bounds (read from its source): every gRPC server and channel is created
with grpc.max_send/receive_message_length = flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH
(2 GiB - 1), hard-coded, not a command-line option of flower-superlink or flower-supernode.
Messages are not sent in one gRPC message: they are split into content-addressed objects and
arrays into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (env var, default 5 MiB), each
pushed and pulled on its own, so the gRPC limit bounds one chunk, not a reply. Flower therefore
puts no practical bound on a reply's total size; this check is the one that does (for what
reaches aggregation). Keep the chunk size at its default: a larger one only raises the memory a
single gRPC call may take.

Round wait. Every server -> sites exchange (capabilities, setup, each training round, evaluation)
waits at most FederationConfig.timeout_s for replies (Grid.send_and_receive(timeout=...)); the
round then completes with the replies that arrived, and a site that stayed silent is recorded as
"no reply". A SuperNode that dies stops sending heartbeats; after 2 x its heartbeat interval
(Flower's HEARTBEAT_PATIENCE; the interval is the site's `join --heartbeat-interval`, 4 s by default,
client/deploy/heartbeat.py; Flower's own 30 s) the SuperLink answers for it with an error reply
(NODE_UNAVAILABLE, sent from the SuperLink's node id), which ends the wait early.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, Message

DEFAULT_REPLY_SIZE_MARGIN = 1.25


def array_record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's array payloads (Array.data, as they travel), without decoding."""
    total = 0
    for item in record.values():
        data = getattr(item, "data", b"")
        total += len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
    return total


def default_max_reply_bytes(global_arrays: ArrayRecord, margin: float = DEFAULT_REPLY_SIZE_MARGIN) -> int:
    """The reply size limit derived from the model: margin x the global ArrayRecord's bytes."""
    if margin < 1.0:
        raise ValueError(f"reply size margin {margin} < 1 would reject a site sending its full groups")
    return int(array_record_bytes(global_arrays) * margin)


def reply_origins(sent: Iterable[Message], replies: Iterable[Message]) -> dict[int, int]:
    """For each reply (by id()), the node it answers for.

    A reply's src_node_id is the site's node, except for the error replies the SuperLink
    generates itself (node unavailable, message expired), whose source is the SuperLink; those
    are matched to the node the message went to through reply_to_message_id (Flower sets the
    sent messages' message_id when it pushes them)."""
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    out: dict[int, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in dst.values():
            node = dst.get(reply.metadata.reply_to_message_id, node)
        out[id(reply)] = node
    return out


def describe_limits(max_reply_bytes: int, timeout_s: float, counts: Mapping[str, int] | None = None) -> str:
    """One log line with the limits in force."""
    extra = "" if not counts else ", " + ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"limits: reply size <= {max_reply_bytes:,} B, round wait <= {timeout_s:g} s{extra}"


__all__ = [
    "DEFAULT_REPLY_SIZE_MARGIN",
    "array_record_bytes",
    "default_max_reply_bytes",
    "describe_limits",
    "reply_origins",
]
