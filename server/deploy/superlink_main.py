"""Flower's `flower-superlink`, with SQLite waiting longer for its database lock, sites allowed
heartbeats shorter than Flower's 10 s, pulls held until there is an answer, and middleware run only
where it acts.

    python -m server.deploy.superlink_main [--min-heartbeat-interval S] PATH/TO/flower-superlink \
        [flower-superlink options]

Why (flwr 1.41, flwr/supercore/sql_mixin.py and constant.py): the SuperLink keeps its state and
objects in SQLite and sets `PRAGMA busy_timeout = 5000` on every connection; each API call runs in
a thread of one process, so on a loaded coordinator a write waiting more than 5 s for the lock
fails with "database is locked" and the call answers 500. A SuperNode's pull loop stops on that
error (client/deploy/supernode_main.py), a ServerApp call fails its run, and `flwr ls` fails. Waiting
longer costs nothing when the machine is idle and turns those failures into delays when it is
not. BUSY_TIMEOUT_MS is that wait; everything else is Flower's own. It matters with
`coordinator superlink --state file`; the default in-memory store opens no database.

Heartbeats (flwr 1.41, flwr/superlink/servicer/fleet/fleet_handlers.py): the SuperLink counts a
SuperNode dead 2 x the interval the node sends after its last heartbeat, and refuses an interval
under HEARTBEAT_MIN_INTERVAL = 10 s, so a crashed site is noticed after 20 s at best (60 s at
Flower's 30 s). Sites send 4 s by default (`join --heartbeat-interval`, client/deploy/heartbeat.py);
`--min-heartbeat-interval` (default MIN_HEARTBEAT_INTERVAL_S) is the shortest this SuperLink accepts.

Pulls (server/deploy/flower_patches.py `hold_pulls`, healthfm_core/long_poll.py): a SuperNode's
pull for its next message, the ServerApp's for replies, and either's for an object still uploading
are answered as soon as there is something to answer, or empty after a hold of a second or two,
instead of at once: the sites and the ServerApp then ask about once per hold, not ten times a
second, and a message waits for no poll.

Middleware (server/deploy/flower_patches.py `gate_middleware`): of the nine layers Flower puts in
front of every call, the seven that act on some calls only (Control API, node authentication on
Fleet calls, Fleet event logs, tracing) run on those calls only; a Fleet call still passes node
authentication.

Large bodies (`guard_large_bodies`, server/deploy/large_bodies.py): a Fleet call with a body over
1 MiB is authenticated from its headers before Flower reads the body, and a large request that
failed has its memory returned to the system once answered (Flower kept a refused 300 MB body's).

A statement that took longer than SLOW_STATEMENT_S (mostly: waiting for the lock) and a write
transaction held longer than that are logged (WARNING, with the thread and the statement), so a
coordinator sees what the database waited for.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

from flwr.superlink.cli import flower_superlink
from sqlalchemy import Engine, event

from server.deploy.flower_patches import (
    gate_middleware,
    guard_large_bodies,
    hold_pulls,
    set_min_heartbeat_interval,
    set_sqlite_busy_timeout,
)

BUSY_TIMEOUT_MS = 120_000
MIN_HEARTBEAT_INTERVAL_S = 2.0  # the shortest heartbeat interval a site may send (Flower: 10 s)
MAX_HEARTBEAT_INTERVAL_S = 1800.0  # Flower's own maximum; a floor above it would refuse every site
SLOW_STATEMENT_S = 5.0

log = logging.getLogger("healthfm.superlink")
_started = threading.local()


def _before(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
    _started.statement = time.monotonic()
    if not getattr(_started, "txn", None) and not statement.lstrip().upper().startswith("SELECT"):
        _started.txn = (time.monotonic(), statement)  # the first write of a transaction


def _after(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
    took = time.monotonic() - getattr(_started, "statement", time.monotonic())
    if took > SLOW_STATEMENT_S:
        log.warning("database statement took %.1f s (%s): %s", took, threading.current_thread().name, statement[:200])


def _end(conn: Any) -> None:
    txn = getattr(_started, "txn", None)
    _started.txn = None
    if txn is not None and (held := time.monotonic() - txn[0]) > SLOW_STATEMENT_S:
        log.warning(
            "database write transaction held %.1f s (%s), first write: %s",
            held,
            threading.current_thread().name,
            txn[1][:200],
        )


def log_slow_database_work() -> None:
    """WARNING for statements and write transactions slower than SLOW_STATEMENT_S (every engine)."""
    handler = logging.StreamHandler()  # its own handler: the root logger (and Flower's) stay as they are
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    event.listen(Engine, "before_cursor_execute", _before)
    event.listen(Engine, "after_cursor_execute", _after)
    event.listen(Engine, "commit", _end)
    event.listen(Engine, "rollback", _end)


def parse(argv: list[str]) -> tuple[float, list[str]]:
    """Our option (the heartbeat floor), then Flower's argv (its executable first)."""
    parser = argparse.ArgumentParser(
        prog="python -m server.deploy.superlink_main", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--min-heartbeat-interval", type=float, default=MIN_HEARTBEAT_INTERVAL_S, metavar="S")
    parser.add_argument("flower", nargs=argparse.REMAINDER, help="PATH/TO/flower-superlink and its options")
    args = parser.parse_args(argv)
    if not args.flower:
        parser.error("PATH/TO/flower-superlink is required")
    if not 0 < args.min_heartbeat_interval <= MAX_HEARTBEAT_INTERVAL_S:
        parser.error(
            f"--min-heartbeat-interval {args.min_heartbeat_interval:g}: must be above 0 and at most "
            f"{MAX_HEARTBEAT_INTERVAL_S:g} s"
        )
    return args.min_heartbeat_interval, list(args.flower)


def main() -> None:
    min_heartbeat, flower_argv = parse(sys.argv[1:])
    set_sqlite_busy_timeout(BUSY_TIMEOUT_MS)  # server/deploy/flower_patches.py
    set_min_heartbeat_interval(min_heartbeat)
    hold_pulls()
    gate_middleware()
    guard_large_bodies()
    log_slow_database_work()
    # Flower reads its options from sys.argv and names itself after argv[0].
    sys.argv = flower_argv
    flower_superlink()


if __name__ == "__main__":
    main()
