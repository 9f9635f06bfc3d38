"""How often a site's SuperNode asks the SuperLink for work, how soon it sees its ClientApp's
reply, and how soon it retries a message's objects: the settings `join --poll-interval` passes to
client/deploy/supernode_main.py, which sets them in Flower's SuperNode loop.

Flower 1.41 fixes all of them, and all sit on every round's path (flwr/supernode/start_client_internal.py):
- its pull loop sleeps `time.sleep(3)` each time the SuperLink has no message for it, so a round's
  train message waited 1.5 s on average (up to 3 s) before its site saw it. Here it asks every
  `fast_poll_interval` s for `fast_window` s after its last reply left (the run's next message is
  due once the server has every site's reply), every `poll_interval` s otherwise: an idle site
  costs the SuperLink one call per `poll_interval`, a site in a run about ten per round more;
- `_push_messages` waits for the ClientApp's reply, then for each of the reply's objects, in
  `time.sleep(0.5)` steps: the ClientApp stores the reply before its objects (flwr/supernode/
  runtime/run_clientapp.py push_message), so a reply left on average 0.25 s, up to 0.5 s, after it
  was there, often twice. Each step is a look into the SuperNode's own in-memory state (no
  network): here it looks every `reply_poll` s;
- it stores the message and creates the ClientApp's task before pulling the message's objects,
  with `pull_objects` at its defaults (flwr/supercore/constant.py: PULL_INITIAL_BACKOFF 1 s,
  doubling up to PULL_BACKOFF_CAP 10 s) while the ServerApp may still be uploading them: an
  object not there yet was retried after 1, 2, 4, 8, 10... s, so an upload of a few seconds
  could cost twice as long. Each retry is a Fleet API call, so the cap stays above the local ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

POLL_INTERVAL_S = 0.5  # one small Fleet API call per idle SuperNode per interval (Flower: 3 s)
FAST_POLL_INTERVAL_S = 0.1  # ... while the run's next message is due
FAST_WINDOW_S = 20.0  # that long after a reply left (a round's gap is the slowest site's lag + aggregation)
REPLY_POLL_S = 0.05  # a look into the SuperNode's own state for the ClientApp's reply (Flower: 0.5 s)
PULL_INITIAL_BACKOFF_S = 0.05  # first retry of an object not there yet (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.2  # no retry waits longer than this (Flower: 10 s)


class SupernodePace(BaseModel):
    """The SuperNode's pull intervals, its look for the ClientApp's reply, and its object-retry
    backoff, in seconds. A fast interval above `poll_interval` is taken as `poll_interval`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poll_interval: float = Field(default=POLL_INTERVAL_S, gt=0, le=60)
    fast_poll_interval: float = Field(default=FAST_POLL_INTERVAL_S, ge=0.02, le=60)
    fast_window: float = Field(default=FAST_WINDOW_S, ge=0, le=3600)
    reply_poll: float = Field(default=REPLY_POLL_S, ge=0.01, le=0.5)
    pull_initial_backoff: float = Field(default=PULL_INITIAL_BACKOFF_S, gt=0, le=10)
    pull_backoff_cap: float = Field(default=PULL_BACKOFF_CAP_S, gt=0, le=60)

    def args(self) -> list[str]:
        """As client/deploy/supernode_main.py's options."""
        return [
            "--poll-interval",
            str(self.poll_interval),
            "--fast-poll-interval",
            str(self.fast_poll_interval),
            "--fast-window",
            str(self.fast_window),
            "--reply-poll",
            str(self.reply_poll),
            "--pull-backoff",
            str(self.pull_initial_backoff),
            "--pull-backoff-cap",
            str(self.pull_backoff_cap),
        ]


class PollSchedule:
    """When the SuperNode asks the SuperLink again after an empty pull: every `fast` s within
    `window` s of its last reply leaving (`reply_sent`), every `idle` s otherwise."""

    def __init__(self, idle: float, fast: float, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle, self.fast, self.window, self.clock = idle, min(fast, idle), window, clock
        self.last_reply: float | None = None

    def reply_sent(self) -> None:
        self.last_reply = self.clock()

    def interval(self) -> float:
        due = self.last_reply is not None and self.clock() - self.last_reply < self.window
        return self.fast if due else self.idle


class CappedSleepTime:
    """The `time` module, but `sleep` waits at most `cap` s: bound as Flower's SuperNode loop's
    `time`, it shortens the fixed waits of that module only (client/deploy/supernode_main.py)."""

    def __init__(self, cap: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cap, self._sleep = cap, sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
