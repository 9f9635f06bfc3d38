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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
from flwr.supercore import sql_mixin
from flwr.supercore.inflatable.inflatable_utils import pull_objects

from healthfm_core.rebind import rebind

FLWR_VERSION = "1.41"  # the Flower these patches were read from (major.minor)
PULL_INITIAL_BACKOFF_S = 0.05  # a reply object still uploading is asked for again this soon (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.1  # and never waited for longer than this between tries (Flower: 10 s); local calls


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
