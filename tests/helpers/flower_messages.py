"""Flower message metadata for tests that hand the strategy or the ServerApp messages by hand."""

from __future__ import annotations

import time

from flwr.app import MessageType, Metadata


def train_metadata(message_id: str, src: int, dst: int, reply_to: str = "") -> Metadata:
    """A train message's metadata in run 1 (reply_to: the id of the message it answers)."""
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
