"""server/exchange.py: the ServerApp's push and pulls, with the times of each (a round's timing
line), and a short backoff for reply objects still uploading."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
import flwr.superlink.servicer.runtime.runtime_handlers as flower_runtime
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.message_pb2 import (
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.runtime_pb2 import PushAppMessagesRequest, PushAppMessagesResponse
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.object_store import ObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.http_grid import HttpGrid

from healthfm_core.long_poll import unwrapped
from server.deploy.flower_patches import set_reply_pull_backoff
from server.exchange import (
    HEAD_START_CAP_SECONDS,
    ExchangeTimes,
    head_start_seconds,
    push_first_alone,
    send_and_receive,
    slowest_first,
)


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
    asked for), every object stored; `events` in order: ("register", message ids), ("object", id),
    ("look", id) for each PullObject. A message's object is found until `delivered_after` looks
    (None: always found); `look_error` makes PullObject raise."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | list[str]]] = []
        self.lock = threading.Lock()
        self.delivered_after: int | None = None
        self.look_error: Exception | None = None

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        with self.lock:
            self.events.append(("look", request.object_id))
            looks = sum(kind == "look" for kind, _ in self.events)
        if self.look_error is not None:
            raise self.look_error
        if self.delivered_after is not None and looks >= self.delivered_after:
            return PullObjectResponse(object_found=False, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True, object_content=b"message")

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
    grid._run = Run.create_empty(7)
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


@pytest.mark.usefixtures("identity")
def test_the_first_message_goes_alone_for_half_the_gap_between_the_two_latest_replies() -> None:
    messages = slowest_first(_messages([11, 12, 13]), {11: 3.0, 12: 1.0, 13: 4.0})
    assert head_start_seconds(messages, {11: 3.0, 12: 1.0, 13: 4.0}) == pytest.approx(0.5)  # (4 - 3) / 2
    assert head_start_seconds(messages, {11: 1.0, 12: 1.0, 13: 40.0}) == HEAD_START_CAP_SECONDS
    assert head_start_seconds(messages, {11: 3.0, 12: 1.0, 13: 3.0}) == 0.0  # a tie: no site is the slowest
    assert head_start_seconds(messages, {11: 3.0, 13: 4.0}) == 0.0  # 12 has no lag: it may be the slowest
    assert head_start_seconds(messages[:1], {11: 3.0, 12: 1.0, 13: 4.0}) == 0.0  # nothing to hold back


def _registers(client: RecordingClient) -> list[int]:
    return [i for i, (kind, _) in enumerate(client.events) if kind == "register"]


@pytest.mark.usefixtures("identity")
def test_with_a_head_start_the_others_are_registered_once_the_first_sites_supernode_has_its_message() -> None:
    grid, client, messages, _ = _grid_and_objects([41, 42, 43])
    client.delivered_after = 3  # found twice, then gone: its SuperNode confirmed it
    ids = push_first_alone(grid, messages, head_start=60.0)
    assert ids == [m.metadata.message_id for m in messages]
    registers = _registers(client)
    looks = [i for i, (kind, _) in enumerate(client.events) if kind == "look"]
    assert len(registers) == 2 and len(looks) == 3  # no look once it was delivered
    assert {client.events[i][1] for i in looks} == {messages[0].metadata.message_id}
    last_object_of_first = max(i for i, (kind, _) in enumerate(client.events[: registers[1]]) if kind == "object")
    assert last_object_of_first < looks[0] and looks[-1] < registers[1]


@pytest.mark.usefixtures("identity")
def test_the_others_go_when_the_head_start_ends_or_a_look_fails() -> None:
    grid, client, messages, _ = _grid_and_objects([51, 52])
    push_first_alone(grid, messages, head_start=0.1)  # never delivered (a dead site): the bound ends it
    assert len(_registers(client)) == 2 and sum(kind == "look" for kind, _ in client.events) >= 1
    grid, client, messages, _ = _grid_and_objects([61, 62])
    client.look_error = ConnectionError("runtime api")
    push_first_alone(grid, messages, head_start=60.0)
    assert len(_registers(client)) == 2 and sum(kind == "look" for kind, _ in client.events) == 1
    grid, client, messages, _ = _grid_and_objects([71, 72])
    push_first_alone(grid, messages)  # no head start: no look
    assert len(_registers(client)) == 2 and not any(kind == "look" for kind, _ in client.events)


@pytest.mark.usefixtures("identity")
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_flowers_superlink_finds_a_message_until_its_supernode_confirms_it(store: str, tmp_path: Path) -> None:
    # What server/exchange.py `delivered` reads: the Runtime API's PullObject (Flower's own
    # handler, in Flower's own in-memory state) finds the message's object until the Fleet API's
    # ConfirmMessageReceived deletes it from the object store, in both of Flower's stores.
    objects: ObjectStore = InMemoryObjectStore() if store == "memory" else SqlObjectStore(str(tmp_path / "o.db"))
    if isinstance(objects, SqlObjectStore):
        objects.initialize()
    state = InMemoryLinkState(NoOpFederationManager(), objects)
    message = _messages([81])[0]
    run_id = 5
    objects.preregister(run_id, get_object_tree(message))
    for object_id, obj in get_all_nested_objects(message).items():
        objects.put(object_id, obj.deflate())
    pull = unwrapped(flower_runtime.pull_object)
    request = PullObjectRequest(node=HttpGrid(token="t").node, run_id=run_id, object_id=message.object_id)
    task = SimpleNamespace(run_id=run_id)
    assert pull(request, state, task).object_found
    assert "store.delete(request.message_object_id)" in inspect.getsource(flower_fleet.confirm_message_received)
    objects.delete(message.object_id)  # what ConfirmMessageReceived does
    assert not pull(request, state, task).object_found


class ScriptedHttpGrid(HttpGrid):
    """An HttpGrid whose SuperLink is a script: `arrive[i]` is the poll at which message i's reply
    comes (None: never)."""

    def __init__(self, arrive: list[int | None]) -> None:
        super().__init__(token="t")
        self.arrive, self.polls = arrive, 0
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            ids.append(msg.metadata.message_id)
            self.sent[msg.metadata.message_id] = msg
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.polls += 1
        return [
            Message(RecordDict(), reply_to=self.sent[mid])
            for mid in sorted(message_ids)
            if self.arrive[int(mid[1:])] == self.polls
        ]


@pytest.mark.usefixtures("identity")
def test_the_caller_works_while_the_sites_train_at_the_first_reply_once() -> None:
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12, 13)]
    calls: list[str] = []
    send_and_receive(
        ScriptedHttpGrid([3, 2, 5]),
        messages,
        timeout=30,
        on_pushed=lambda: calls.append("pushed"),
        on_reply=lambda m: calls.append(m.metadata.reply_to_message_id),
        on_idle=lambda: calls.append("idle"),
    )
    assert calls == ["pushed", "m1", "idle", "m0", "m2"]


@pytest.mark.usefixtures("identity")
def test_without_a_reply_the_caller_works_after_the_fallback_or_before_the_exchange_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    calls: list[str] = []
    record: dict[str, Any] = {
        "on_reply": lambda m: calls.append(m.metadata.reply_to_message_id),
        "on_idle": lambda: calls.append("idle"),
    }
    monkeypatch.setattr("server.exchange.IDLE_FALLBACK_SECONDS", 0.0)  # at the first poll
    send_and_receive(ScriptedHttpGrid([3, 4]), messages, timeout=30, **record)
    assert calls == ["idle", "m0", "m1"]
    monkeypatch.setattr("server.exchange.IDLE_FALLBACK_SECONDS", 60.0)
    calls.clear()
    replies = send_and_receive(ScriptedHttpGrid([None, None]), messages, timeout=0.25, **record)
    assert replies == [] and calls == ["idle"]  # nobody answered: still once, before it returns
    calls.clear()
    send_and_receive(EchoGrid(), messages, timeout=5, **record)  # type: ignore[arg-type]
    assert calls == ["m0", "m1", "idle"]
