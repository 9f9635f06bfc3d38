"""Flower's `flower-superlink`, with SQLite waiting longer for its database lock.

    python -m server.superlink_main PATH/TO/flower-superlink [flower-superlink options]

Why (flwr 1.41, flwr/supercore/sql_mixin.py and constant.py): the SuperLink keeps its state and
objects in SQLite and sets `PRAGMA busy_timeout = 5000` on every connection; each API call runs in
a thread of one process, so on a loaded coordinator a write waiting more than 5 s for the lock
fails with "database is locked" and the call answers 500. A SuperNode's pull loop stops on that
error (client/supernode_main.py), a ServerApp call fails its run, and `flwr ls` fails. Waiting
longer costs nothing when the machine is idle and turns those failures into delays when it is
not. BUSY_TIMEOUT_MS is that wait; everything else is Flower's own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flwr.supercore import sql_mixin
from flwr.superlink.cli import flower_superlink

BUSY_TIMEOUT_MS = 120_000


def with_busy_timeout(pragmas: Sequence[tuple[str, str]], ms: int) -> tuple[tuple[str, str], ...]:
    """Flower's pragmas with busy_timeout set to `ms`; ValueError if Flower no longer sets one
    (then this wrapper no longer knows what it changes)."""
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise ValueError(f"flwr's SQLITE_PRAGMAS {pragmas!r} set no busy_timeout: update server/superlink_main.py")
    return tuple((name, str(ms)) if name == "busy_timeout" else (name, value) for name, value in pragmas)


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m server.superlink_main PATH/TO/flower-superlink [options]", file=sys.stderr)
        raise SystemExit(2)
    # A module attribute Flower reads at every new connection (flwr 1.41: _set_sqlite_pragmas).
    sql_mixin.SQLITE_PRAGMAS = with_busy_timeout(sql_mixin.SQLITE_PRAGMAS, BUSY_TIMEOUT_MS)  # type: ignore[assignment]
    # Flower reads its options from sys.argv and names itself after argv[0].
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    flower_superlink()


if __name__ == "__main__":
    main()
