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
The SuperLink's middleware run only on the requests it acts on (`gate_middleware`), by rebinding
`flwr.superlink.main._get_middleware` (create_app calls it once, for the app it builds):
- Flower stacks nine Starlette BaseHTTPMiddleware layers in front of every call, each at a cost
  whether it acts or not (healthfm_core/middleware_gate.py). Seven act on some calls only and hand
  every other one on untouched: the four Control API ones on /v1/control/ (`_is_control_path`,
  and route keys under it), NodeAuthMiddleware on /v1/fleet/, FleetEventLogMiddleware on
  /v1/fleet/ with a fleet event-log plugin, RuntimeTracingMiddleware with FLWR_TRACING_ENABLED=1
  (MIDDLEWARE_ACTS). Each is put behind a `GatedMiddleware` asking that same question of the
  request (the same path: starlette's URL of the scope). Error and protobuf translation, and any
  extension's layer, stay as they are. A site's Fleet call passes three layers (node
  authentication, which still decides, among them), the ServerApp's Runtime calls two.
The SuperLink's large request bodies (`guard_large_bodies`, server/deploy/large_bodies.py says why),
by rebinding `flwr.superlink.main._get_middleware` again: LargeBodyGuard in front of every layer
(outermost), which authenticates a large Fleet body's sender before Flower reads the body and
returns a refused large body's memory to the system.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.superlink.main as flower_superlink_app
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
import flwr.superlink.servicer.runtime.runtime_handlers as flower_runtime
from flwr.supercore import sql_mixin
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
from flwr.superlink.routers.control.middlewares import (
    ControlAuthenticationMiddleware,
    ControlEventLogMiddleware,
    ControlLicenseMiddleware,
    ControlSensitiveResponseMiddleware,
)
from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
from starlette.middleware import Middleware
from starlette.types import Scope

from healthfm_core.long_poll import Waker, held, notifying, unwrapped
from healthfm_core.middleware_gate import GatedMiddleware, flower_tracing_enabled, request_path
from healthfm_core.rebind import rebind
from server.deploy.large_bodies import LargeBodyGuard

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


CONTROL_PREFIX = "/v1/control/"  # flwr/superlink/routers/control/middlewares.py _is_control_path
FLEET_PREFIX = "/v1/fleet/"  # node_auth.py NodeAuthMiddleware and middlewares.py FleetEventLogMiddleware
GATED = "__healthfm_gated__"  # on the middleware builder gate_middleware installs
GUARDED = "__healthfm_guarded__"  # on the one guard_large_bodies installs


def _on_control_path(scope: Scope) -> bool:
    return request_path(scope).startswith(CONTROL_PREFIX)


def _on_fleet_path(scope: Scope) -> bool:
    return request_path(scope).startswith(FLEET_PREFIX)


def _fleet_event_logged(scope: Scope) -> bool:
    return _on_fleet_path(scope) and getattr(scope["app"].state, "fleet_event_log_plugin", None) is not None


# Each path-dependent middleware of Flower 1.41's SuperLink and when it acts (otherwise it calls
# the next layer and returns its response unchanged: read from each one's dispatch).
MIDDLEWARE_ACTS: dict[type, Callable[[Scope], bool]] = {
    ControlSensitiveResponseMiddleware: _on_control_path,
    ControlAuthenticationMiddleware: _on_control_path,
    ControlLicenseMiddleware: _on_control_path,
    ControlEventLogMiddleware: _on_control_path,
    NodeAuthMiddleware: _on_fleet_path,
    FleetEventLogMiddleware: _fleet_event_logged,
    RuntimeTracingMiddleware: flower_tracing_enabled,
}


def gated(layers: Sequence[Middleware]) -> list[Middleware]:
    """`layers` with each one MIDDLEWARE_ACTS knows behind a GatedMiddleware (order kept)."""
    out = []
    for layer in layers:
        acts = MIDDLEWARE_ACTS.get(layer.cls) if isinstance(layer.cls, type) else None
        out.append(layer if acts is None else Middleware(GatedMiddleware, layer=layer, acts=acts))
    return out


def gate_middleware() -> None:
    """The SuperLink app created in this process after this call runs Flower's path-dependent
    middleware only on the requests it acts on (the module docstring says why). Before
    flower_superlink() runs; once per process (a second call keeps the first)."""
    build = flower_superlink_app._get_middleware
    if getattr(build, GATED, False):
        return

    def gated_middleware() -> list[Middleware]:
        return gated(build())

    setattr(gated_middleware, GATED, True)
    setattr(gated_middleware, GUARDED, getattr(build, GUARDED, False))
    rebind(flower_superlink_app, {"_get_middleware": gated_middleware}, "server/deploy/flower_patches.py")


def guard_large_bodies() -> None:
    """The SuperLink app created in this process after this call has LargeBodyGuard in front of
    Flower's middleware (server/deploy/large_bodies.py). Before flower_superlink() runs; once per
    process (a second call keeps the first); composes with gate_middleware in either order."""
    build = flower_superlink_app._get_middleware
    if getattr(build, GUARDED, False):
        return

    def guarded_middleware() -> list[Middleware]:
        return [Middleware(LargeBodyGuard), *build()]

    setattr(guarded_middleware, GUARDED, True)
    setattr(guarded_middleware, GATED, getattr(build, GATED, False))
    rebind(flower_superlink_app, {"_get_middleware": guarded_middleware}, "server/deploy/flower_patches.py")
