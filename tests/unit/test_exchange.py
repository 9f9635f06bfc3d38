"""server/exchange.py: the ServerApp's push and pulls, with the times of each (a round's timing
line), and a short backoff for reply objects still uploading."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable

import flwr.superlink.grid.http_grid as flower_http_grid
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.message_pb2 import ObjectTree, PushObjectRequest, PushObjectResponse
from flwr.proto.runtime_pb2 import PushAppMessagesRequest, PushAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from server.deploy.flower_patches import set_reply_pull_backoff
from server.exchange import ExchangeTimes, push_first_alone, send_and_receive, slowest_first


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


def _tree_ids(tree: ObjectTree) -> list[str]:
    return [obj for child in tree.children for obj in _tree_ids(child)] + [tree.object_id]


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"node": n})}), dst_node_id=n, message_type="train") for n in nodes]


@pytest.mark.usefixtures("identity")
def test_the_site_that_replied_last_goes_first_and_unknown_sites_keep_their_order_after() -> None:
    messages = _messages([11, 12, 13, 14, 15])
    lags = {12: 4.0, 13: 9.5, 15: 4.0}  # 11 and 14: new, or silent last round
    order = [m.metadata.dst_node_id for m in slowest_first(messages, lags)]
    assert order == [13, 12, 15, 11, 14]  # 12 and 15 tie: as the strategy made them
    assert [m.metadata.dst_node_id for m in slowest_first(messages, {})] == [11, 12, 13, 14, 15]
    assert sorted(id(m) for m in slowest_first(messages, lags)) == sorted(id(m) for m in messages)


class RecordingClient:
    """The Runtime API as HttpGrid's push sees it: every message registered (each of its objects
    asked for), every object stored; `events` in order: ("register", message ids), ("object", id)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | list[str]]] = []
        self.lock = threading.Lock()

    def PushMessages(self, request: PushAppMessagesRequest) -> PushAppMessagesResponse:  # noqa: N802
        ids = [obj for tree in request.message_object_trees for obj in _tree_ids(tree)]
        with self.lock:
            self.events.append(("register", [t.object_id for t in request.message_object_trees]))
        return PushAppMessagesResponse(
            message_ids=[t.object_id for t in request.message_object_trees], objects_to_push=ids, session_id="s"
        )

    def PushObject(self, request: PushObjectRequest) -> PushObjectResponse:  # noqa: N802
        with self.lock:
            self.events.append(("object", request.object_id))
        time.sleep(0.002)  # a request's time, so that the two pushing threads interleave
        return PushObjectResponse(stored=True)


def _grid_and_objects(nodes: list[int]) -> tuple[HttpGrid, RecordingClient, list[Message], list[set[str]]]:
    """An HttpGrid of run 7 over a RecordingClient, messages to `nodes` with their ids set as
    HttpGrid sets them, and each message's object ids."""
    messages = _messages(nodes)
    own = []
    for m in messages:
        m.metadata.__dict__["_message_id"] = m.object_id
        own.append(set(get_all_nested_objects(m)))
    grid, client = HttpGrid(token="t"), RecordingClient()
    grid._client = client  # type: ignore[assignment]
    grid._run = type("Run", (), {"run_id": 7})()  # type: ignore[assignment]
    return grid, client, messages, own


@pytest.mark.usefixtures("identity")
def test_flower_pushes_a_batch_of_messages_objects_in_message_order() -> None:
    # slowest_first only helps because HttpGrid pushes the first message's objects first: if
    # Flower stops doing so, this fails and the order has to be made another way.
    grid, client, messages, own = _grid_and_objects([21, 22, 23])
    first, last = own[0] - own[1] - own[2], own[2] - own[0] - own[1]
    assert first and last
    grid._try_push_messages(7, messages)
    pushed = [obj for kind, obj in client.events if kind == "object"]
    position = {obj: i for i, obj in enumerate(pushed)}
    assert max(position[o] for o in first) < min(position[o] for o in last), pushed


@pytest.mark.usefixtures("identity")
def test_the_slowest_sites_message_is_registered_and_uploaded_before_the_others_are_registered() -> None:
    # push_first_alone: while the first message's objects upload, no other SuperNode has a message
    # to pull objects for (Flower registers a batch's messages in one call, then uploads).
    grid, client, messages, own = _grid_and_objects([31, 32, 33])
    ids = push_first_alone(grid, messages)
    assert ids == [m.metadata.message_id for m in messages]
    events = client.events
    registers = [i for i, (kind, _) in enumerate(events) if kind == "register"]
    assert len(registers) == 2
    assert events[registers[0]][1] == [messages[0].metadata.message_id]
    assert events[registers[1]][1] == [m.metadata.message_id for m in messages[1:]]
    only_first = own[0] - own[1] - own[2]
    first_objects = {i for i, (kind, obj) in enumerate(events) if kind == "object" and obj in only_first}
    assert len(first_objects) == len(only_first) and max(first_objects) < registers[1]
    assert push_first_alone(grid, messages[:1]) == [messages[0].metadata.message_id]


@pytest.mark.usefixtures("identity")
def test_the_caller_works_once_the_messages_left_and_on_each_reply_as_it_comes() -> None:
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12, 13)]
    calls: list[str] = []
    replies = send_and_receive(
        EchoGrid(),  # type: ignore[arg-type]
        messages,
        timeout=5,
        on_pushed=lambda: calls.append("pushed"),
        on_reply=lambda m: calls.append(m.metadata.reply_to_message_id),
    )
    assert calls == ["pushed", "m0", "m1", "m2"]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1", "m2"]
