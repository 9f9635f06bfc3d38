"""The SuperNode's pace (client/supernode_pace.py, set by client/supernode_main.py): it pulls again
every poll interval instead of Flower's 3 s, and retries a message's objects with a short backoff.
These fail if Flower's loop stops calling the names the launcher rebinds (then the pace would
silently stop taking effect)."""

from __future__ import annotations

import functools
from pathlib import Path

import flwr.supernode.start_client_internal as flower_loop
import pytest
from flwr.supercore.inflatable.inflatable_utils import pull_objects

from client.join import JoinConfig, supernode_command
from client.supernode_main import parse, set_pace, until_message
from client.supernode_pace import POLL_INTERVAL_S, SupernodePace


@pytest.fixture
def flower_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's module names as they were, restored after the test."""
    monkeypatch.setattr(flower_loop, "_pull_and_store_message", flower_loop._pull_and_store_message)
    monkeypatch.setattr(flower_loop, "pull_objects", flower_loop.pull_objects)


def test_flowers_loop_still_calls_the_names_the_launcher_rebinds() -> None:
    # The loop pulls through the module's `_pull_and_store_message` and sleeps 3 s after an empty
    # pull; that function pulls a message's objects through the module's `pull_objects`.
    assert "_pull_and_store_message" in flower_loop.start_client_internal.__code__.co_names
    original = getattr(flower_loop._pull_and_store_message, "__wrapped__", flower_loop._pull_and_store_message)
    assert "pull_objects" in original.__code__.co_names


@pytest.mark.usefixtures("flower_names")
def test_set_pace_rebinds_the_pull_and_the_object_backoff_once() -> None:
    flower_original = flower_loop._pull_and_store_message
    set_pace(SupernodePace(poll_interval=0.2, pull_initial_backoff=0.01, pull_backoff_cap=0.3))
    set_pace(SupernodePace(poll_interval=0.2, pull_initial_backoff=0.02, pull_backoff_cap=0.4))
    wrapped = flower_loop._pull_and_store_message
    assert wrapped is not flower_original and wrapped.__wrapped__ is flower_original  # not wrapped twice
    assert isinstance(flower_loop.pull_objects, functools.partial)
    assert flower_loop.pull_objects.func is pull_objects
    assert flower_loop.pull_objects.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.4}


def test_the_pull_returns_only_once_a_message_came_and_waits_the_interval_between() -> None:
    answers = iter([None, None, 42])
    calls: list[tuple] = []
    slept: list[float] = []

    def pull_and_store(*args: object, **kwargs: object) -> int | None:
        calls.append((args, kwargs))
        return next(answers)

    pull = until_message(pull_and_store, 0.2, sleep=slept.append)
    assert pull("state", receive="fn") == 42
    assert calls == [(("state",), {"receive": "fn"})] * 3
    assert slept == [0.2, 0.2]


def test_an_error_still_ends_the_pull_at_once() -> None:
    def pull_and_store() -> int | None:
        raise RuntimeError("500 database is locked")

    slept: list[float] = []
    with pytest.raises(RuntimeError, match="database is locked"):
        until_message(pull_and_store, 0.2, sleep=slept.append)()
    assert slept == []


def test_the_launcher_reads_its_options_then_hands_flower_its_own() -> None:
    pace, argv = parse(["--poll-interval", "0.3", "/venv/bin/flower-supernode", "--superlink", "h:1", "--insecure"])
    assert pace == SupernodePace(poll_interval=0.3)
    assert argv == ["/venv/bin/flower-supernode", "--superlink", "h:1", "--insecure"]
    pace, argv = parse(["/venv/bin/flower-supernode", "--poll-interval", "9"])  # after the path: Flower's
    assert pace == SupernodePace() and argv == ["/venv/bin/flower-supernode", "--poll-interval", "9"]


@pytest.mark.parametrize("args", [["--poll-interval", "0"], ["--pull-backoff", "-1"], []])
def test_the_launcher_refuses_a_bad_pace_or_no_flower(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([*args, *(["/venv/bin/flower-supernode"] if args else [])])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert ("poll_interval" in err or "pull_initial_backoff" in err) if args else "flower-supernode" in err


def test_join_starts_the_supernode_at_its_poll_interval(tmp_path: Path) -> None:
    def command(**extra: object) -> list[str]:
        cfg = JoinConfig(site_root=tmp_path, superlink="127.0.0.1:9092", insecure=True, state_dir=tmp_path, **extra)
        return supernode_command(cfg, tmp_path / "node-config.toml", 9094)

    default, slow = command(), command(poll_interval=3.0)
    assert default[default.index("--poll-interval") + 1] == str(POLL_INTERVAL_S)
    assert slow[slow.index("--poll-interval") + 1] == "3.0"
    # Our options come before Flower's executable, so Flower never sees them.
    assert slow.index("--poll-interval") < next(i for i, a in enumerate(slow) if a.endswith("flower-supernode"))
    with pytest.raises(ValueError, match="poll_interval"):
        command(poll_interval=0)
