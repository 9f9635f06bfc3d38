"""Every change this site makes to Flower's own code, in one place: names in Flower's modules
rebound in this process only (Flower's files are never touched), each applied once, at the start
of the process that needs it. Read from flwr 1.41 (FLWR_VERSION); tests/unit/test_flower_patches.py
fails when Flower changes under one of them (a name gone, a signature changed, a function that
stops calling the name rebound here).

The SuperNode (`python -m client.deploy.supernode_main`, `set_pace`; client/deploy/supernode_pace.py says why):
- `start_client_internal._pull_and_store_message`: returns only once a message came, polling at
  the PollSchedule's interval (Flower sleeps 3 s after every empty pull); it wakes the ClientApp's
  held object pulls (below) once the message's objects are stored, before Flower confirms the
  message to the SuperLink (a Fleet API round trip, 0.03-0.05 s on the round's path);
- `start_client_internal._push_messages`: tells the schedule when a reply left;
- `start_client_internal.time`: its sleep capped at `reply_poll` and ended early by the ClientApp
  pushing a message or an object (`...runtime_handlers.push_messages`, `push_object`): Flower
  waits for the ClientApp's reply and then for each of its objects in 0.5 s steps;
- `start_client_internal.pull_objects`: Flower's own function with a short backoff (Flower
  retries a message's objects after 1, 2, 4, 8, 10 s); called once the message's task exists and
  the message is stored, it first wakes the app guard's held call below;
- `flwr.supernode.servicer.runtime.runtime_handlers.acquire_task` (the app guard asking its
  SuperNode for a task; flwr/supernode/main.py's _RUNTIME_HANDLERS is that module): held up to
  TASK_HOLD_S until a task is there (healthfm_core/long_poll.py says why), so an idle guard asks
  once per hold, not twenty times a second, and a task waits for no poll;
- `...runtime_handlers.pull_object` (the ClientApp pulling the message's objects): held up to
  OBJECT_HOLD_S while the object is known but not stored yet, answered when the pull loop above
  has stored the message's objects.
The SuperNode's heartbeat (`set_heartbeat`, from client/deploy/supernode_main.py; client/deploy/heartbeat.py
says why): Flower imports its constants by name, so each module's own binding is set:
- `fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL`: the interval the node sends when it activates
  and with every heartbeat (the SuperLink expires it after 2 x this);
- `heartbeat.HEARTBEAT_DEFAULT_INTERVAL` and `heartbeat.HEARTBEAT_CALL_TIMEOUT`: how soon
  HeartbeatSender sends the next one (the HTTP call's own timeout, fleet_http_client's, stays 5 s).
A name gone in another Flower fails `set_heartbeat` (the SuperNode does not start): never a site
silently back on Flower's 60 s. Left at Flower's 30 s on purpose: `flwr.supercore.corestate`'s
HEARTBEAT_DEFAULT_INTERVAL (the SuperNode's expiry of its ClientApps' task claims), since the
ClientApp processes (Flower's, client/deploy/warm_clientapp.py) send their task heartbeats at
Flower's default, and one side changed alone would expire them.
The SuperNode's Runtime API (what its app guard and ClientApps call; `gate_tracing`, from
client/deploy/supernode_main.py): `flwr.supernode.main.RuntimeTracingMiddleware`, one of the three
BaseHTTPMiddleware layers in front of every call, which does nothing unless FLWR_TRACING_ENABLED=1,
behind a GatedMiddleware asking that (healthfm_core/middleware_gate.py says what a layer costs).
The warm ClientApp (`python -m client.deploy.warm_clientapp`, `set_pull_backoff`):
- `run_clientapp.pull_and_inflate_object_from_tree`: a short backoff too (client/deploy/warm_clientapp.py
  says why: the guard hands a task over before the SuperNode has the message's objects).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import flwr.supercore.heartbeat as flower_heartbeat
import flwr.supernode.fleet_http_connection as flower_connection
import flwr.supernode.main as flower_supernode_app
import flwr.supernode.servicer.runtime.runtime_handlers as flower_node_runtime
import flwr.supernode.start_client_internal as flower_loop
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree, pull_objects
from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
from flwr.supernode.runtime import run_clientapp
from starlette.middleware import Middleware

from client.deploy.heartbeat import call_budget
from client.deploy.supernode_pace import CappedSleepTime, PollSchedule, SupernodePace
from healthfm_core.long_poll import Waker, held, notifying, unwrapped
from healthfm_core.middleware_gate import GatedMiddleware, flower_tracing_enabled
from healthfm_core.rebind import rebind

FLWR_VERSION = "1.41"  # the Flower these patches were read from (major.minor)
WRAPPED = "__healthfm_pace__"  # marks our wrappers of Flower's functions

# The warm ClientApp's retries of a message's objects (client/deploy/warm_clientapp.py says why): the
# SuperNode is local, so asking again soon costs one local HTTP call.
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.1
# The app guard's call for a task waits this long (its HTTP client gives up after 30 s); one guard
# per SuperNode (two slots: Flower's own SuperExec, if a site runs it instead, holds the same way).
TASK_HOLD_S = 2.0
TASK_HOLD_SLOTS = 2
# The ClientApp's pull of an object its SuperNode has not stored yet waits this long (its retries
# then take over); a message's objects are pulled by a few threads at once.
OBJECT_HOLD_S = 2.0
OBJECT_HOLD_SLOTS = 8


def until_message(
    pull_and_store: Callable[..., int | None],
    interval: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
    stored: Waker | None = None,
) -> Callable[..., int | None]:
    """`pull_and_store` that returns only once it pulled a message (its run id), trying again
    after `interval()` s, and wakes `stored` once the message's objects are in the node's store:
    when Flower's function calls its `confirm_message_received` (after its puts, before that
    call's round trip to the SuperLink), and again as it returns. An exception still leaves at
    once (the SuperNode's loop ends on it)."""

    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        confirm = kwargs.get("confirm_message_received")
        if stored is not None and confirm is not None:
            kwargs["confirm_message_received"] = notifying(confirm, stored, first=True)
        while (run_id := pull_and_store(*args, **kwargs)) is None:
            sleep(interval())
        if stored is not None:
            stored.notify()
        return run_id

    setattr(pull, WRAPPED, True)
    return pull


def telling(push_messages: Callable[..., None], schedule: PollSchedule) -> Callable[..., None]:
    """`push_messages` (Flower's: waits for the reply, sends it) that tells `schedule` when it is
    done, even on an error (a reply that failed to leave still ends the site's part of the round)."""

    @functools.wraps(push_messages)
    def push(*args: Any, **kwargs: Any) -> None:
        try:
            push_messages(*args, **kwargs)
        finally:
            schedule.reply_sent()

    setattr(push, WRAPPED, True)
    return push


def _flowers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's function behind our wrapper, if it is one (set twice, the pace wraps Flower's again)."""
    return fn.__wrapped__ if getattr(fn, WRAPPED, False) else fn  # type: ignore[attr-defined]


def set_pace(pace: SupernodePace, sleep: Callable[[float], None] | None = None) -> PollSchedule:
    """Set `pace` in Flower's SuperNode loop of this process (before flower_supernode() runs);
    the schedule it polls by. `sleep`, when given, is what every wait calls (tests record them);
    by default the polls sleep and the reply's waits end early when the ClientApp pushes."""
    schedule = PollSchedule(pace.poll_interval, pace.fast_poll_interval, pace.fast_window)
    objects, replies = Waker(), Waker()  # the message's objects stored / the ClientApp pushed
    flower_loop._pull_and_store_message = until_message(
        _flowers(flower_loop._pull_and_store_message), schedule.interval, sleep or time.sleep, stored=objects
    )
    flower_loop._push_messages = telling(_flowers(flower_loop._push_messages), schedule)
    flower_loop.time = CappedSleepTime(pace.reply_poll, sleep or replies.sleep)  # type: ignore[assignment]
    tasks = Waker()
    flower_loop.pull_objects = notifying(
        functools.partial(pull_objects, initial_backoff=pace.pull_initial_backoff, backoff_cap=pace.pull_backoff_cap),
        tasks,
        first=True,
    )
    rebind(
        flower_node_runtime,
        {
            "acquire_task": held(
                unwrapped(flower_node_runtime.acquire_task),
                lambda res: res.HasField("task"),
                TASK_HOLD_S,
                tasks,
                threading.Semaphore(TASK_HOLD_SLOTS),
            ),
            # The guard hands the task over before the SuperNode has the message's objects: the
            # ClientApp's pull of one not stored yet (found, not available) waits for the store
            # instead of retrying 0.05-0.1 s later. An unknown object is answered at once.
            "pull_object": held(
                unwrapped(flower_node_runtime.pull_object),
                lambda res: res.object_available or not res.object_found,
                OBJECT_HOLD_S,
                objects,
                threading.Semaphore(OBJECT_HOLD_SLOTS),
            ),
            # The reply and its objects, stored: Flower's _push_messages looks again at once.
            "push_messages": notifying(unwrapped(flower_node_runtime.push_messages), replies),
            "push_object": notifying(unwrapped(flower_node_runtime.push_object), replies),
        },
        "client/deploy/flower_patches.py set_pace",
    )
    return schedule


def set_pull_backoff(initial: float = PULL_INITIAL_BACKOFF_S, cap: float = PULL_BACKOFF_CAP_S) -> None:
    """Flower's `pull_task_input` in this process retries a message's objects after `initial`
    s, doubling up to `cap`."""
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        pull_and_inflate_object_from_tree, initial_backoff=initial, backoff_cap=cap
    )


def set_heartbeat(interval: float) -> None:
    """This process's SuperNode sends `interval` as its heartbeat interval (the SuperLink counts it
    dead 2 x `interval` after its last heartbeat) and beats often enough for it
    (client/deploy/heartbeat.py). Before flower_supernode() runs."""
    here = "client/deploy/flower_patches.py set_heartbeat"
    rebind(flower_connection, {"HEARTBEAT_DEFAULT_INTERVAL": interval}, here)
    rebind(
        flower_heartbeat,
        {"HEARTBEAT_DEFAULT_INTERVAL": interval, "HEARTBEAT_CALL_TIMEOUT": call_budget(interval)},
        here,
    )


def gate_tracing() -> None:
    """The SuperNode Runtime API app created in this process after this call runs Flower's tracing
    layer only when tracing is enabled (the module docstring says why). Before flower_supernode()
    runs; a second call keeps the first."""
    if isinstance(flower_supernode_app.RuntimeTracingMiddleware, functools.partial):
        return
    gate = functools.partial(GatedMiddleware, layer=Middleware(RuntimeTracingMiddleware), acts=flower_tracing_enabled)
    rebind(flower_supernode_app, {"RuntimeTracingMiddleware": gate}, "client/deploy/flower_patches.py gate_tracing")
