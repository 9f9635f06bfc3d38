"""How `coordinator launch` waits for its run (server/deploy/flwr_control.py wait_for_run): every status
is Flower's (`flwr ls`, a new ~1.2 CPU-second process each), so while the run's outcome.json says
nothing of an end the CLI is asked only every slow_poll seconds, and every `poll` seconds once
it does. A virtual clock replaces time: the test counts the asks, it does not time them. The
real `flwr ls` against a real SuperLink is exercised by the deployment tests (test_trust.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import server.deploy.flwr_control as control
from server.deploy.commands import _ending
from server.outcome import started, write_outcome


class VirtualTime:
    """The `time` module of flwr_control, on a clock that moves only when slept."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    fake = VirtualTime()
    monkeypatch.setattr(control, "time", fake)
    return fake


def _asks(
    monkeypatch: pytest.MonkeyPatch,
    clock: VirtualTime,
    finished_at: float,
    events: list[tuple[str, float]] | None = None,
) -> list[float]:
    """Record when run_status is asked (also into `events`); the run is finished from `finished_at` on."""
    asked: list[float] = []

    def status(paths: object, run_id: int) -> str:
        asked.append(clock.now)
        if events is not None:
            events.append(("ask", clock.now))
        return "finished:completed" if clock.now >= finished_at else "running"

    monkeypatch.setattr(control, "run_status", status)
    return asked


def test_without_a_local_sign_the_cli_is_asked_every_poll(monkeypatch, clock) -> None:
    asked = _asks(monkeypatch, clock, finished_at=10.0)
    assert control.wait_for_run(None, 1, timeout=100, poll=2.0) == "finished:completed"  # type: ignore[arg-type]
    assert asked == pytest.approx([0, 2, 4, 6, 8, 10])


def test_the_cli_is_asked_rarely_until_the_outcome_says_the_run_ended(monkeypatch, clock) -> None:
    events: list[tuple[str, float]] = []
    asked = _asks(monkeypatch, clock, finished_at=63.0, events=events)

    def ending() -> bool:
        events.append(("look", clock.now))
        return clock.now >= 61.0  # the ServerApp writes its outcome at 61 s, Flower says finished at 63 s

    status = control.wait_for_run(None, 1, timeout=1000, poll=2.0, ending=ending, slow_poll=15.0)  # type: ignore[arg-type]
    assert status == "finished:completed"
    before = [t for t in asked if t < 61.0]
    assert before == pytest.approx([0, 15, 30, 45, 60])  # five asks in a minute, not thirty
    after = [t for t in asked if t >= 61.0]
    assert after[0] == pytest.approx(62.0)  # then every `poll` s: the first ask once the sign is seen
    assert after[-1] >= 63.0 and len(after) <= 2
    # The outcome is looked at no sooner than `poll` s after the last ask.
    last_ask = 0.0
    for kind, t in events:
        if kind == "ask":
            last_ask = t
        else:
            assert t - last_ask >= 2.0 - 1e-9, events


def test_a_run_that_never_ends_still_times_out(monkeypatch, clock) -> None:
    asked = _asks(monkeypatch, clock, finished_at=float("inf"))
    with pytest.raises(control.CoordinatorError, match="not finished after 50 s"):
        control.wait_for_run(None, 1, timeout=50, poll=2.0, ending=lambda: False, slow_poll=15.0)  # type: ignore[arg-type]
    assert asked == pytest.approx([0, 15, 30, 45])


def test_only_an_ended_outcome_of_this_run_is_the_sign(tmp_path: Path) -> None:
    assert not _ending(tmp_path, 7)  # nothing written yet
    write_outcome(tmp_path, started(7, rounds=3, rounds_done=0))
    assert not _ending(tmp_path, 7)  # round 0 writes "running"
    write_outcome(tmp_path, started(6, rounds=3, rounds_done=3).model_copy(update={"status": "completed"}))
    assert not _ending(tmp_path, 7)  # another run's end
    write_outcome(tmp_path, started(7, rounds=3, rounds_done=1).model_copy(update={"status": "failed"}))
    assert _ending(tmp_path, 7)
    (tmp_path / "outcome.json").write_text("{not json")
    assert not _ending(tmp_path, 7)  # a bad file is no sign (report_outcome names it)
