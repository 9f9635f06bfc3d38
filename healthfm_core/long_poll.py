"""A poll answered when there is something to answer (a long poll), for Flower's HTTP APIs whose
clients ask again and again: a SuperNode asking the SuperLink for its next message, the ServerApp
asking for replies, a site's app guard asking its SuperNode for a task.

Flower 1.41 answers each of those at once, empty or not, and its clients ask again after a pause
(ours: client/deploy/supernode_pace.py, server/exchange.py, client/deploy/app_guard.py). A short
pause costs requests (three sites and a ServerApp made about 100 a second on the coordinator's
machine and the sites' SuperNodes, each a FastAPI request of several ms: a third of a core, on the
cores the sites train on); a long one costs the wait for the next message. Held, a call that would
answer empty waits on the server side until something arrives (`Waker.notify`, called where
Flower stores what it answers with) or `seconds` passed, so an idle client asks once per
`seconds`, and the answer leaves as soon as there is one. The client's request and its code are
Flower's own: a client that does not know of the hold sees a slower empty answer, nothing else.

What makes it safe:
- each held call still runs Flower's own handler to answer (the same state, the same checks),
  again after every wake-up and at least every `recheck` s (what arrives on a path that does not
  notify, e.g. a node declared dead, an expired message, is seen that late at worst);
- `slots` bounds how many calls wait at once: each holds a worker thread of the server's
  threadpool (FastAPI's, 40 by default); past the bound a call answers at once, as Flower's does;
- `seconds` stays far below every timeout on the way (Flower's HTTP clients: 30 s; nginx's proxy
  read timeout: server/deploy/proxy.py), so no client gives up on a call that is still held: an
  answer that is given (a message marked delivered) reaches a client that still waits for it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

RECHECK_S = 0.25  # a held call asks its handler again at least this often, notified or not
MARK = "__healthfm_long_poll__"  # on every wrapper made here: `unwrapped` finds the handler under it


class Waker:
    """Wakes the calls held on it: `notify()` once something arrived that one of them may answer
    with. A generation count, so that what arrives between a call's look and its wait is not missed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Until a notify after generation `seen`, or `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout)

    def sleep(self, seconds: float) -> None:
        """`time.sleep(seconds)` that a notify ends early: for a loop that looks, then sleeps
        (a notify between its look and this call is missed: that wait is the full `seconds`)."""
        self.wait(self._generation, seconds)


def held(
    handler: Callable[..., R],
    answered: Callable[[R], bool],
    seconds: float,
    waker: Waker,
    slots: threading.Semaphore,
    recheck: float = RECHECK_S,
) -> Callable[..., R]:
    """`handler` whose answer, while `answered(answer)` is False, is asked for again after each
    `waker` notify (at least every `recheck` s) until `seconds` passed; the last answer is returned.
    A call that finds no free slot in `slots` answers at once."""

    @functools.wraps(handler)
    def call(*args: Any, **kwargs: Any) -> R:
        if not slots.acquire(blocking=False):
            return handler(*args, **kwargs)
        try:
            deadline = time.monotonic() + seconds
            while True:
                seen = waker.generation
                answer = handler(*args, **kwargs)
                left = deadline - time.monotonic()
                if answered(answer) or left <= 0:
                    return answer
                waker.wait(seen, min(left, recheck))
        finally:
            slots.release()

    setattr(call, MARK, True)
    return call


def notifying(handler: Callable[..., R], waker: Waker, *, first: bool = False) -> Callable[..., R]:
    """`handler` that notifies `waker` after it ran (also when it raised: it may have stored part),
    or, `first`, before it runs (what it is called after is stored already)."""

    @functools.wraps(handler)
    def call(*args: Any, **kwargs: Any) -> R:
        if first:
            waker.notify()
        try:
            return handler(*args, **kwargs)
        finally:
            if not first:
                waker.notify()

    setattr(call, MARK, True)
    return call


def unwrapped(fn: Callable[..., R]) -> Callable[..., R]:
    """The handler under this module's wrappers of `fn` (`fn` itself if it is none): set twice in
    one process, a patch wraps Flower's handler again, not its own wrapper."""
    while getattr(fn, MARK, False):
        fn = fn.__wrapped__  # type: ignore[attr-defined]  # set by functools.wraps
    return fn
