"""Flower's `flower-supernode`, made to exit when its connection to the SuperLink ends.

    python -m client.supernode_main PATH/TO/flower-supernode [flower-supernode options]

Why (read from flwr 1.41, flwr/supernode/fleet_http_connection.py and start_client_internal.py):
when a Fleet API call fails with a status Flower does not retry (e.g. the SuperLink answers
"500 database is locked" to `pull-messages` on a loaded machine), the exception leaves the
SuperNode's pull loop, Flower logs it, deactivates the node and `flower_supernode()` returns; but
its Runtime API server runs in a non-daemon thread, so the process never exits: a SuperNode that
looks alive and will never pull again. Here that return ends the process with EXIT_CONNECTION_ENDED
and one line saying so, and `client.py join` (client/join.py) restarts it.

A signal (SIGINT/SIGTERM) still ends it the way Flower does (its handler raises SystemExit, after
the node said goodbye to the SuperLink), never through the line below.
"""

from __future__ import annotations

import os
import sys

from flwr.supernode.cli import flower_supernode

from client.join import ENDED_LINE, EXIT_CONNECTION_ENDED


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m client.supernode_main PATH/TO/flower-supernode [options]", file=sys.stderr)
        raise SystemExit(2)
    # Flower reads its options from sys.argv and names itself after argv[0] (telemetry, messages).
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    flower_supernode()
    print(f"{ENDED_LINE} (its pull loop stopped on the error logged above)", flush=True)
    sys.stderr.flush()
    # os._exit: the Runtime API's non-daemon thread would keep a normal exit waiting forever.
    os._exit(EXIT_CONNECTION_ENDED)


if __name__ == "__main__":
    main()
