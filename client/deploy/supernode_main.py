"""Flower's `flower-supernode`, made to exit when its connection to the SuperLink ends, and paced
for rounds of seconds.

    python -m client.deploy.supernode_main [--poll-interval S] [--pull-backoff S] [--pull-backoff-cap S] \
        [--heartbeat-interval S] PATH/TO/flower-supernode [flower-supernode options]

Why (read from flwr 1.41, flwr/supernode/fleet_http_connection.py and start_client_internal.py):
when a Fleet API call fails with a status Flower does not retry (e.g. the SuperLink answers
"500 database is locked" to `pull-messages` on a loaded machine), the exception leaves the
SuperNode's pull loop, Flower logs it, deactivates the node and `flower_supernode()` returns; but
its Runtime API server runs in a non-daemon thread, so the process never exits: a SuperNode that
looks alive and will never pull again. Here that return ends the process with EXIT_CONNECTION_ENDED
and one line saying so, and `client.py join` (client/deploy/join.py) restarts it.

A signal (SIGINT/SIGTERM) still ends it the way Flower does (its handler raises SystemExit, after
the node said goodbye to the SuperLink), never through the line below.

Pace (client/deploy/supernode_pace.py says why): `set_pace` (client/deploy/flower_patches.py, where every
change to Flower's code on the site's side is) changes Flower's loop in this process only, once,
before Flower's SuperNode starts. Heartbeat (client/deploy/heartbeat.py says why): `set_heartbeat`, the
same file, the same way: the SuperLink counts this site dead 2 x `--heartbeat-interval` after its
last heartbeat (Flower: 2 x 30 s). `gate_tracing`, the same file: Flower's tracing middleware runs
on its Runtime API's calls only when tracing is enabled. Flower's log lines get timestamps: when a
message came and when its reply left is where a round's time went.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from flwr.supercore.logger import update_console_handler
from flwr.supernode.cli import flower_supernode

from client.deploy.flower_patches import gate_tracing, set_heartbeat, set_pace
from client.deploy.heartbeat import HEARTBEAT_INTERVAL_S, MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S
from client.deploy.join import ENDED_LINE, EXIT_CONNECTION_ENDED
from client.deploy.supernode_pace import SupernodePace


def parse(argv: Sequence[str]) -> tuple[SupernodePace, float, list[str]]:
    """Our options (the pace, the heartbeat interval), then Flower's argv (its executable first)."""
    parser = argparse.ArgumentParser(
        prog="python -m client.deploy.supernode_main", description=__doc__.split("\n\n")[0]
    )
    defaults = SupernodePace()
    parser.add_argument("--poll-interval", type=float, default=defaults.poll_interval, metavar="S")
    parser.add_argument("--fast-poll-interval", type=float, default=defaults.fast_poll_interval, metavar="S")
    parser.add_argument("--fast-window", type=float, default=defaults.fast_window, metavar="S")
    parser.add_argument("--reply-poll", type=float, default=defaults.reply_poll, metavar="S")
    parser.add_argument("--pull-backoff", type=float, default=defaults.pull_initial_backoff, metavar="S")
    parser.add_argument("--pull-backoff-cap", type=float, default=defaults.pull_backoff_cap, metavar="S")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S, metavar="S")
    parser.add_argument("flower", nargs=argparse.REMAINDER, help="PATH/TO/flower-supernode and its options")
    args = parser.parse_args(argv)
    if not args.flower:
        parser.error("PATH/TO/flower-supernode is required")
    try:
        pace = SupernodePace(
            poll_interval=args.poll_interval,
            fast_poll_interval=args.fast_poll_interval,
            fast_window=args.fast_window,
            reply_poll=args.reply_poll,
            pull_initial_backoff=args.pull_backoff,
            pull_backoff_cap=args.pull_backoff_cap,
        )
    except ValueError as err:  # pydantic names the field and value
        parser.error(str(err))
    if not MIN_HEARTBEAT_INTERVAL_S <= args.heartbeat_interval <= MAX_HEARTBEAT_INTERVAL_S:
        parser.error(
            f"--heartbeat-interval {args.heartbeat_interval:g}: must be from {MIN_HEARTBEAT_INTERVAL_S:g} to "
            f"{MAX_HEARTBEAT_INTERVAL_S:g} s"
        )
    return pace, args.heartbeat_interval, list(args.flower)


def main() -> None:
    pace, heartbeat_interval, flower_argv = parse(sys.argv[1:])
    set_pace(pace)
    set_heartbeat(heartbeat_interval)
    gate_tracing()
    update_console_handler(timestamps=True)
    # Flower reads its options from sys.argv and names itself after argv[0] (telemetry, messages).
    sys.argv = flower_argv
    flower_supernode()
    print(f"{ENDED_LINE} (its pull loop stopped on the error logged above)", flush=True)
    sys.stderr.flush()
    # os._exit: the Runtime API's non-daemon thread would keep a normal exit waiting forever.
    os._exit(EXIT_CONNECTION_ENDED)


if __name__ == "__main__":
    main()
