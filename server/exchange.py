"""Messages out, replies in, without Flower's fixed pause: HttpGrid.send_and_receive (the grid a
deployed ServerApp gets, flwr/superlink/grid/http_grid.py) sleeps 3 s between pulls, so every
exchange (setup, each round, evaluation) waited on average 1.5 s past its last reply; a round of
a few seconds' training spent a third of its time there. Here the same push and pulls run with a
POLL_SECONDS pause. Any other grid (Flower's in-memory simulation grid, which polls at 0.1 s;
tests' in-process grids) keeps its own send_and_receive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

POLL_SECONDS = 0.25  # one small HTTP call to the local SuperLink per pause


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """Push `messages`, pull their replies until all arrived or `timeout` seconds passed."""
    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (timeout is not None and time.monotonic() >= end):
            return replies
        time.sleep(POLL_SECONDS)
