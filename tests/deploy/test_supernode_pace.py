"""The SuperNode's pace (client/deploy/supernode_pace.py, set by client/deploy/supernode_main.py): it pulls again
every poll interval instead of Flower's 3 s (faster for a while after a reply left), sees its
ClientApp's reply within a short step instead of Flower's 0.5 s, and retries a message's objects
with a short backoff. These fail if Flower's loop stops calling the names the launcher rebinds
(then the pace would silently stop taking effect)."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flwr.supernode.servicer.runtime.runtime_handlers as flower_node_runtime
import flwr.supernode.start_client_internal as flower_loop
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.task_identity import TaskIdentity

from client.deploy.flower_patches import set_pace, telling, until_message
from client.deploy.heartbeat import HEARTBEAT_INTERVAL_S
from client.deploy.join import JoinConfig, supernode_command
from client.deploy.supernode_main import parse
from client.deploy.supernode_pace import POLL_INTERVAL_S, CappedSleepTime, PollSchedule, SupernodePace
from healthfm_core.long_poll import MARK, Waker


@pytest.fixture
def flower_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's module names as they were, restored after the test."""
    monkeypatch.setattr(flower_loop, "_pull_and_store_message", flower_loop._pull_and_store_message)
    monkeypatch.setattr(flower_loop, "pull_objects", flower_loop.pull_objects)
    monkeypatch.setattr(flower_loop, "_push_messages", flower_loop._push_messages)
    monkeypatch.setattr(flower_loop, "time", flower_loop.time)
    monkeypatch.setattr(flower_node_runtime, "acquire_task", flower_node_runtime.acquire_task)
    monkeypatch.setattr(flower_node_runtime, "pull_object", flower_node_runtime.pull_object)
    monkeypatch.setattr(flower_node_runtime, "push_messages", flower_node_runtime.push_messages)
    monkeypatch.setattr(flower_node_runtime, "push_object", flower_node_runtime.push_object)


def test_flowers_loop_still_calls_the_names_the_launcher_rebinds() -> None:
    # The loop pulls through the module's `_pull_and_store_message` and sleeps 3 s after an empty
    # pull; that function pulls a message's objects through the module's `pull_objects`; the loop
    # sends the reply through the module's `_push_messages`, which waits through its `time`.
    loop_names = flower_loop.start_client_internal.__code__.co_names
    assert "_pull_and_store_message" in loop_names and "_push_messages" in loop_names
    original = getattr(flower_loop._pull_and_store_message, "__wrapped__", flower_loop._pull_and_store_message)
    assert "pull_objects" in original.__code__.co_names
    push = getattr(flower_loop._push_messages, "__wrapped__", flower_loop._push_messages)
    assert "time" in push.__code__.co_names


@pytest.mark.usefixtures("flower_names")
def test_set_pace_rebinds_the_pull_the_push_the_waits_and_the_object_backoff_once() -> None:
    flower_pull, flower_push = flower_loop._pull_and_store_message, flower_loop._push_messages
    set_pace(SupernodePace(poll_interval=0.2, pull_initial_backoff=0.01, pull_backoff_cap=0.3))
    set_pace(SupernodePace(poll_interval=0.2, reply_poll=0.03, pull_initial_backoff=0.02, pull_backoff_cap=0.4))
    wrapped = flower_loop._pull_and_store_message
    assert wrapped is not flower_pull and wrapped.__wrapped__ is flower_pull  # type: ignore[attr-defined]  # not wrapped twice (set_pace's functools.wraps)
    assert flower_loop._push_messages.__wrapped__ is flower_push  # type: ignore[attr-defined]  # set_pace's wrapper (functools.wraps)
    assert isinstance(flower_loop.time, CappedSleepTime) and flower_loop.time.cap == 0.03
    backoff = flower_loop.pull_objects.__wrapped__  # type: ignore[attr-defined]  # the app guard's held call is woken first
    assert getattr(flower_loop.pull_objects, MARK) and isinstance(backoff, functools.partial)
    assert backoff.func is pull_objects
    assert backoff.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.4}
    acquire = flower_node_runtime.acquire_task  # held once, over Flower's handler
    assert getattr(acquire, MARK) and not getattr(acquire.__wrapped__, MARK, False)  # type: ignore[attr-defined]  # set_pace's wrapper (functools.wraps)
    pull_object = flower_node_runtime.pull_object  # the ClientApp's object pulls: held once too
    assert getattr(pull_object, MARK) and not getattr(pull_object.__wrapped__, MARK, False)  # type: ignore[attr-defined]  # set_pace's wrapper (functools.wraps)


def test_the_pull_returns_only_once_a_message_came_and_waits_the_interval_between() -> None:
    answers = iter([None, None, 42])
    calls: list[tuple] = []
    slept: list[float] = []

    def pull_and_store(*args: object, **kwargs: object) -> int | None:
        calls.append((args, kwargs))
        return next(answers)

    pull = until_message(pull_and_store, lambda: 0.2, sleep=slept.append)
    assert pull("state", receive="fn") == 42
    assert calls == [(("state",), {"receive": "fn"})] * 3
    assert slept == [0.2, 0.2]


def test_a_pulled_message_wakes_the_held_object_pulls_and_an_empty_pull_does_not() -> None:
    answers = iter([None, 7])
    stored = Waker()
    wakes: list[int] = []

    def pull_and_store() -> int | None:
        wakes.append(stored.generation)  # Flower stores the objects inside this call
        return next(answers)

    assert until_message(pull_and_store, lambda: 0.0, sleep=lambda s: None, stored=stored)() == 7
    assert wakes == [0, 0] and stored.generation == 1  # woken once, after the message's store


def test_the_held_object_pulls_wake_before_the_message_is_confirmed_to_the_superlink() -> None:
    # Flower stores the message's objects, then confirms the message with a round trip to the
    # SuperLink: the ClientApp's held pulls are woken before that round trip, not after it.
    stored = Waker()
    at_confirm: list[tuple] = []

    def confirm(run_id: int, message_id: str) -> None:
        at_confirm.append((run_id, message_id, stored.generation))

    def pull_and_store(*, confirm_message_received: object) -> int | None:
        confirm_message_received(7, "m")  # type: ignore[operator]
        return 7

    pull = until_message(pull_and_store, lambda: 0.0, sleep=lambda s: None, stored=stored)
    assert pull(confirm_message_received=confirm) == 7
    assert at_confirm == [(7, "m", 1)]  # woken once before the confirm ran, and once more after
    assert stored.generation == 2


def test_an_error_still_ends_the_pull_at_once() -> None:
    def pull_and_store() -> int | None:
        raise RuntimeError("500 database is locked")

    slept: list[float] = []
    with pytest.raises(RuntimeError, match="database is locked"):
        until_message(pull_and_store, lambda: 0.2, sleep=slept.append)()
    assert slept == []


def test_the_pull_is_fast_for_a_window_after_a_reply_left_and_idle_otherwise() -> None:
    now = [100.0]
    schedule = PollSchedule(idle=0.5, fast=0.1, window=20.0, clock=lambda: now[0])
    assert schedule.interval() == 0.5  # no reply yet: idle
    pushed: list[str] = []
    push = telling(lambda *a: pushed.append("sent"), schedule)
    push("state")
    assert pushed == ["sent"] and schedule.interval() == 0.1
    now[0] += 19.9
    assert schedule.interval() == 0.1
    now[0] += 0.2  # the run's next message did not come: back to the idle pace
    assert schedule.interval() == 0.5
    assert PollSchedule(idle=0.05, fast=0.1, window=20.0).fast == 0.05  # never slower than idle


def test_a_reply_that_failed_to_leave_still_starts_the_fast_window() -> None:
    now = [0.0]
    schedule = PollSchedule(idle=0.5, fast=0.1, window=20.0, clock=lambda: now[0])

    def push(*args: object) -> None:
        raise RuntimeError("send failed")

    with pytest.raises(RuntimeError, match="send failed"):
        telling(push, schedule)()
    assert schedule.interval() == 0.1


def _stored_reply() -> Message:
    instruction = Message(RecordDict(), dst_node_id=7, message_type="train")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    reply = Message(RecordDict(), reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.usefixtures("flower_names", "identity")
def test_flowers_push_waits_for_the_clientapps_reply_and_its_objects_in_short_steps() -> None:
    # Flower's own _push_messages, run with the paced `time`: a reply that appears after two looks
    # and an object that appears after one more are waited for in reply_poll steps, not 0.5 s.
    slept: list[float] = []
    schedule = set_pace(SupernodePace(reply_poll=0.03), sleep=slept.append)
    reply = _stored_reply()
    replies = iter([[], [], [reply]])
    contents = iter([b"", b"content"])
    state: Any = SimpleNamespace(  # stand-ins for the SuperNode's state and object store
        get_messages_legacy=lambda is_reply: next(replies),
        get_message_processing_duration=lambda message_id: 1.0,
        delete_messages=lambda message_ids: None,
    )
    store: Any = SimpleNamespace(
        get_object_tree=lambda message_id: flower_loop.get_object_tree(reply),
        get=lambda object_id: next(contents),
        delete=lambda object_id: None,
    )
    pushed: list[str] = []

    def send(message: Message, tree: object, runtime: float) -> tuple[set[str], str]:
        return {reply.object_id}, "session"

    flower_loop._push_messages(
        state=state, object_store=store, send=send, push_object=lambda run, session, oid, c: pushed.append(oid)
    )
    assert pushed == [reply.object_id]
    assert slept == [0.03, 0.03, 0.03]  # two looks for the reply, one for its object
    assert schedule.last_reply is not None and schedule.interval() == SupernodePace().fast_poll_interval


@pytest.mark.usefixtures("flower_names")
def test_the_reply_waits_end_when_the_clientapp_pushes_its_reply_or_an_object(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real waits (no `sleep` given): Flower's _push_messages sleeps through the loop's `time`;
    # a push by the ClientApp into the SuperNode's runtime ends that sleep long before its cap.
    calls: list[str] = []
    for name in ("push_messages", "push_object"):

        def record(*a: object, _n: str = name) -> str:
            calls.append(_n)
            return _n

        monkeypatch.setattr(flower_node_runtime, name, record)
    set_pace(SupernodePace(reply_poll=0.5))
    set_pace(SupernodePace(reply_poll=0.5))  # set twice: one layer over the handler
    for name in ("push_messages", "push_object"):
        handler = getattr(flower_node_runtime, name)
        assert getattr(handler, MARK) and not getattr(handler.__wrapped__, MARK, False)
        done = threading.Event()

        def push(handler: Any = handler, done: threading.Event = done) -> None:
            while not done.wait(0.01):  # until the sleeper returns: a notify before its wait is missed
                handler("request", "state")

        started = time.monotonic()
        pusher = threading.Thread(target=push)
        pusher.start()
        for _ in range(20):  # capped at 0.5 s each: woken, twenty sleeps take far less than 10 s
            flower_loop.time.sleep(60)
        done.set()
        pusher.join()
        assert time.monotonic() - started < 10 * 0.5, name
    assert set(calls) == {"push_messages", "push_object"}


def test_the_capped_time_is_the_time_module_but_for_sleep() -> None:
    slept: list[float] = []
    capped = CappedSleepTime(0.05, sleep=slept.append)
    capped.sleep(3)
    capped.sleep(0.01)
    assert slept == [0.05, 0.01]
    assert capped.monotonic is time.monotonic and capped.time is time.time


def test_the_launcher_reads_its_options_then_hands_flower_its_own() -> None:
    pace, heartbeat, argv = parse(
        [
            "--poll-interval",
            "0.3",
            "--reply-poll",
            "0.1",
            "--heartbeat-interval",
            "7",
            "/venv/bin/flower-supernode",
            "--superlink",
            "h:1",
            "--insecure",
        ]
    )
    assert pace == SupernodePace(poll_interval=0.3, reply_poll=0.1) and heartbeat == 7
    assert argv == ["/venv/bin/flower-supernode", "--superlink", "h:1", "--insecure"]
    pace, heartbeat, argv = parse(["/venv/bin/flower-supernode", "--poll-interval", "9"])  # after the path: Flower's
    assert pace == SupernodePace() and heartbeat == HEARTBEAT_INTERVAL_S
    assert argv == ["/venv/bin/flower-supernode", "--poll-interval", "9"]


@pytest.mark.parametrize(
    "args",
    [
        ["--poll-interval", "0"],
        ["--pull-backoff", "-1"],
        ["--reply-poll", "0"],
        ["--fast-poll-interval", "0.001"],
        ["--heartbeat-interval", "1"],
        ["--heartbeat-interval", "2000"],
        [],
    ],
)
def test_the_launcher_refuses_a_bad_pace_or_no_flower(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([*args, *(["/venv/bin/flower-supernode"] if args else [])])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    named = args[0] if args and args[0] == "--heartbeat-interval" else None  # ours, not a pace field
    assert (
        (f"{named} {float(args[1]):g}" in err)
        if named
        else (args[0].lstrip("-").replace("-", "_").replace("pull_backoff", "pull_initial_backoff") in err)
        if args
        else ("flower-supernode" in err)
    )


def test_join_starts_the_supernode_at_its_poll_interval(tmp_path: Path) -> None:
    def command(**extra: Any) -> list[str]:
        cfg = JoinConfig(site_root=tmp_path, superlink="127.0.0.1:9092", insecure=True, state_dir=tmp_path, **extra)
        return supernode_command(cfg, tmp_path / "node-config.toml", 9094)

    default, slow = command(), command(poll_interval=3.0)
    assert default[default.index("--poll-interval") + 1] == str(POLL_INTERVAL_S)
    assert parse(default[3:])[0] == SupernodePace()  # the whole pace, as the launcher reads it
    assert slow[slow.index("--poll-interval") + 1] == "3.0"
    # Our options come before Flower's executable, so Flower never sees them.
    assert slow.index("--poll-interval") < next(i for i, a in enumerate(slow) if a.endswith("flower-supernode"))
    with pytest.raises(ValueError, match="poll_interval"):
        command(poll_interval=0)
