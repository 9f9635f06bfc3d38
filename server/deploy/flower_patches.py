"""Every change the server makes to Flower's own code, in one place: names in Flower's modules
rebound in this process only (Flower's files are never touched), each applied once, at the start
of the process that needs it. Read from flwr 1.41 (FLWR_VERSION); tests/unit/test_flower_patches.py
fails when Flower changes under one of them (a name gone, a signature changed, a function that
stops calling the name rebound here).

The ServerApp (`set_reply_pull_backoff`, from make_server_app's main, server/server_app.py, and the
task head's, server/head_app.py):
- `flwr.superlink.grid.http_grid.pull_objects`: Flower's own function with a short backoff. A
  SuperNode pushes its reply message before the reply's objects (flwr/supernode/
  start_client_internal.py, _push_messages), so the ServerApp often sees a reply whose arrays are
  still uploading, and HttpGrid.pull_messages retried them after 1, 2, 4, 8, 10 s
  (flwr/supercore/constant.py): seconds past the upload's end per round.
The SuperLink (`set_sqlite_busy_timeout`, `set_min_heartbeat_interval`, from server/deploy/superlink_main.py,
which says why):
- `flwr.supercore.sql_mixin.SQLITE_PRAGMAS`: busy_timeout raised from Flower's 5000 ms, read by
  Flower at every new connection (_set_sqlite_pragmas).
- `flwr.superlink.servicer.fleet.fleet_handlers.HEARTBEAT_MIN_INTERVAL`: the shortest heartbeat
  interval a SuperNode may send (Flower: 10 s; a site's `join --heartbeat-interval`, default 4 s,
  client/deploy/heartbeat.py). Flower imports it by name, so that module's binding is the one read;
  if it is gone, the SuperLink refuses to start rather than refuse every site's heartbeat.
The SuperLink's pulls held until there is an answer (`hold_pulls`, healthfm_core/long_poll.py
says why and what keeps it safe), by rebinding the handlers Flower's routers look up at each call
(the Fleet router calls `fleet_handlers.X`; the Runtime router calls `handlers.X` on
flwr.superlink.main's _RUNTIME_HANDLERS, the runtime_handlers module):
- `fleet_handlers.pull_messages` (a SuperNode asking for its next message) and `pull_object` (for
  one of its objects, which the ServerApp may still be uploading: Flower registers a message
  before its objects) held up to FLEET_HOLD_S, woken by `runtime_handlers.push_messages` and
  `push_object` (the ServerApp's messages and objects stored);
- `runtime_handlers.pull_messages` and `pull_object` (the ServerApp asking for replies and their
  objects) held up to RUNTIME_HOLD_S, woken by `fleet_handlers.push_messages` and `push_object`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
import flwr.superlink.servicer.runtime.runtime_handlers as flower_runtime
from flwr.supercore import sql_mixin
from flwr.supercore.inflatable.inflatable_utils import pull_objects

from healthfm_core.long_poll import Waker, held, notifying, unwrapped
from healthfm_core.rebind import rebind

FLWR_VERSION = "1.41"  # the Flower these patches were read from (major.minor)
PULL_INITIAL_BACKOFF_S = 0.05  # a reply object still uploading is asked for again this soon (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.1  # and never waited for longer than this between tries (Flower: 10 s); local calls
# A SuperNode's pull waits this long for its next message or object (its HTTP client gives up
# after 30 s, nginx after server/deploy/proxy.py's TIMEOUT); up to FLEET_HOLD_SLOTS pulls of
# messages and as many of objects at once, each a thread of the SuperLink's 40 (with the runtime
# ones, 20 at most), the rest answered at once as by Flower.
FLEET_HOLD_S = 2.0
FLEET_HOLD_SLOTS = 8
# The ServerApp's pull for replies (server/exchange.py asks again 0.1 s after each answer): shorter,
# since a round's timeout is checked between its pulls.
RUNTIME_HOLD_S = 1.0
RUNTIME_HOLD_SLOTS = 2


def set_reply_pull_backoff(initial: float = PULL_INITIAL_BACKOFF_S, cap: float = PULL_BACKOFF_CAP_S) -> None:
    """HttpGrid.pull_messages in this process retries a reply's objects after `initial` s,
    doubling up to `cap`."""
    flower_http_grid.pull_objects = functools.partial(pull_objects, initial_backoff=initial, backoff_cap=cap)


def with_busy_timeout(pragmas: Sequence[tuple[str, str]], ms: int) -> tuple[tuple[str, str], ...]:
    """Flower's pragmas with busy_timeout set to `ms`; ValueError if Flower no longer sets one
    (then this patch no longer knows what it changes)."""
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise ValueError(
            f"flwr's SQLITE_PRAGMAS {pragmas!r} set no busy_timeout: update server/deploy/flower_patches.py"
        )
    return tuple((name, str(ms)) if name == "busy_timeout" else (name, value) for name, value in pragmas)


def set_sqlite_busy_timeout(ms: int) -> None:
    """Every SQLite connection the SuperLink of this process opens waits up to `ms` for a lock."""
    sql_mixin.SQLITE_PRAGMAS = with_busy_timeout(sql_mixin.SQLITE_PRAGMAS, ms)  # type: ignore[assignment]


def set_min_heartbeat_interval(seconds: float) -> None:
    """The SuperLink of this process accepts SuperNode heartbeat intervals from `seconds` up
    (Flower's maximum, 30 minutes, stays). Before flower_superlink() runs."""
    rebind(flower_fleet, {"HEARTBEAT_MIN_INTERVAL": seconds}, "server/deploy/flower_patches.py")


def _has_messages(response: Any) -> bool:
    return len(response.messages_list) > 0


def _object_there(response: Any) -> bool:
    """A pulled object's answer is final unless the object is known but not uploaded yet."""
    return not (response.object_found and not response.object_available)


def hold_pulls(
    fleet_seconds: float = FLEET_HOLD_S,
    runtime_seconds: float = RUNTIME_HOLD_S,
    fleet_slots: int = FLEET_HOLD_SLOTS,
    runtime_slots: int = RUNTIME_HOLD_SLOTS,
) -> None:
    """The SuperLink of this process holds the pulls of SuperNodes (`fleet_seconds`) and of the
    ServerApp (`runtime_seconds`) for messages and for objects still uploading, answering as soon
    as what they ask for is stored (healthfm_core/long_poll.py). Before flower_superlink() runs.
    Each kind of pull has its own `*_slots` (so at most 2 x (fleet + runtime) threads wait)."""
    here = "server/deploy/flower_patches.py hold_pulls"
    to_sites, to_server = Waker(), Waker()  # what the ServerApp stored / what a SuperNode stored

    def hold(module: Any, name: str, answered: Any, seconds: float, waker: Waker, slots: int) -> Any:
        return held(unwrapped(getattr(module, name)), answered, seconds, waker, threading.Semaphore(slots))

    rebind(
        flower_fleet,
        {
            "pull_messages": hold(flower_fleet, "pull_messages", _has_messages, fleet_seconds, to_sites, fleet_slots),
            "pull_object": hold(flower_fleet, "pull_object", _object_there, fleet_seconds, to_sites, fleet_slots),
            "push_messages": notifying(unwrapped(flower_fleet.push_messages), to_server),
            "push_object": notifying(unwrapped(flower_fleet.push_object), to_server),
        },
        here,
    )
    rebind(
        flower_runtime,
        {
            "pull_messages": hold(
                flower_runtime, "pull_messages", _has_messages, runtime_seconds, to_server, runtime_slots
            ),
            "pull_object": hold(
                flower_runtime, "pull_object", _object_there, runtime_seconds, to_server, runtime_slots
            ),
            "push_messages": notifying(unwrapped(flower_runtime.push_messages), to_sites),
            "push_object": notifying(unwrapped(flower_runtime.push_object), to_sites),
        },
        here,
    )
