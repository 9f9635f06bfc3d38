"""server/exchange.py: the ServerApp's push and pulls, with the times of each (a round's timing
line), and a short backoff for reply objects still uploading."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import flwr.superlink.grid.http_grid as flower_http_grid
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from server.exchange import ExchangeTimes, send_and_receive, set_reply_pull_backoff


class EchoGrid:
    """An in-process grid that answers each message (not an HttpGrid: its own send_and_receive)."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            replies.append(Message(RecordDict({"echo": ConfigRecord({"i": i})}), reply_to=msg))
        return replies


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.usefixtures("identity")
def test_an_exchange_records_when_it_pushed_and_when_each_reply_came() -> None:
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    times = ExchangeTimes()
    replies = send_and_receive(EchoGrid(), messages, timeout=5, times=times)  # type: ignore[arg-type]
    assert len(replies) == 2
    assert set(times.arrivals) == {"m0", "m1"}
    assert all(times.push_start <= t for t in times.arrivals.values())
    assert times.push_end >= times.push_start > 0
    assert send_and_receive(EchoGrid(), messages, timeout=5)  # type: ignore[arg-type]  # times are optional


def test_reply_objects_are_pulled_with_a_short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # HttpGrid.pull_messages pulls a reply's objects through this module name: if it stops, the
    # backoff set here silently stops taking effect.
    assert "pull_objects" in HttpGrid.pull_messages.__code__.co_names
    monkeypatch.setattr(flower_http_grid, "pull_objects", pull_objects)
    set_reply_pull_backoff(0.05, 0.5)
    pull = flower_http_grid.pull_objects
    assert isinstance(pull, functools.partial) and pull.func is pull_objects
    assert pull.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
