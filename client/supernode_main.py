"""Flower's `flower-supernode`, made to exit when its connection to the SuperLink ends, and paced
for rounds of seconds.

    python -m client.supernode_main [--poll-interval S] [--pull-backoff S] [--pull-backoff-cap S] \
        PATH/TO/flower-supernode [flower-supernode options]

Why (read from flwr 1.41, flwr/supernode/fleet_http_connection.py and start_client_internal.py):
when a Fleet API call fails with a status Flower does not retry (e.g. the SuperLink answers
"500 database is locked" to `pull-messages` on a loaded machine), the exception leaves the
SuperNode's pull loop, Flower logs it, deactivates the node and `flower_supernode()` returns; but
its Runtime API server runs in a non-daemon thread, so the process never exits: a SuperNode that
looks alive and will never pull again. Here that return ends the process with EXIT_CONNECTION_ENDED
and one line saying so, and `client.py join` (client/join.py) restarts it.

A signal (SIGINT/SIGTERM) still ends it the way Flower does (its handler raises SystemExit, after
the node said goodbye to the SuperLink), never through the line below.

Pace (client/supernode_pace.py says why): `set_pace` changes Flower's loop in this process only,
without touching Flower's files. Its `_pull_and_store_message` is wrapped so that it returns only
once a message came, polling at the PollSchedule's interval (fast for a while after a reply left,
idle otherwise; Flower's 3 s sleep after an empty pull is then never reached); its
`_push_messages` is wrapped to tell the schedule when a reply left; its `time` name is bound to a
`time` whose sleep is capped at `reply_poll` (the 0.5 s steps in which `_push_messages` waits for
the ClientApp's reply and its objects); its `pull_objects` name is bound to Flower's own function
with a short backoff. tests/test_supernode_pace.py fails if Flower's loop stops calling any of
these names. Flower's log lines get timestamps: when a message came and when its reply left is
where a round's time went.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flwr.supernode.start_client_internal as flower_loop
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.logger import update_console_handler
from flwr.supernode.cli import flower_supernode

from client.join import ENDED_LINE, EXIT_CONNECTION_ENDED
from client.supernode_pace import CappedSleepTime, PollSchedule, SupernodePace

WRAPPED = "__healthfm_pace__"  # marks our wrappers of Flower's functions


def until_message(
    pull_and_store: Callable[..., int | None],
    interval: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[..., int | None]:
    """`pull_and_store` that returns only once it pulled a message (its run id), trying again
    after `interval()` s; an exception still leaves at once (the SuperNode's loop ends on it)."""

    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        while (run_id := pull_and_store(*args, **kwargs)) is None:
            sleep(interval())
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


def set_pace(pace: SupernodePace, sleep: Callable[[float], None] = time.sleep) -> PollSchedule:
    """Set `pace` in Flower's SuperNode loop of this process (before flower_supernode() runs);
    the schedule it polls by. `sleep` is what the waits call (tests record them)."""
    schedule = PollSchedule(pace.poll_interval, pace.fast_poll_interval, pace.fast_window)
    flower_loop._pull_and_store_message = until_message(
        _flowers(flower_loop._pull_and_store_message), schedule.interval, sleep
    )
    flower_loop._push_messages = telling(_flowers(flower_loop._push_messages), schedule)
    flower_loop.time = CappedSleepTime(pace.reply_poll, sleep)  # type: ignore[assignment]
    flower_loop.pull_objects = functools.partial(
        pull_objects, initial_backoff=pace.pull_initial_backoff, backoff_cap=pace.pull_backoff_cap
    )
    return schedule


def parse(argv: Sequence[str]) -> tuple[SupernodePace, list[str]]:
    """Our options, then Flower's argv (its executable first)."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode_main", description=__doc__.split("\n\n")[0])
    defaults = SupernodePace()
    parser.add_argument("--poll-interval", type=float, default=defaults.poll_interval, metavar="S")
    parser.add_argument("--fast-poll-interval", type=float, default=defaults.fast_poll_interval, metavar="S")
    parser.add_argument("--fast-window", type=float, default=defaults.fast_window, metavar="S")
    parser.add_argument("--reply-poll", type=float, default=defaults.reply_poll, metavar="S")
    parser.add_argument("--pull-backoff", type=float, default=defaults.pull_initial_backoff, metavar="S")
    parser.add_argument("--pull-backoff-cap", type=float, default=defaults.pull_backoff_cap, metavar="S")
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
    return pace, list(args.flower)


def main() -> None:
    pace, flower_argv = parse(sys.argv[1:])
    set_pace(pace)
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
