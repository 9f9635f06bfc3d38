"""Messages out, replies in, without Flower's fixed pauses: HttpGrid.send_and_receive (the grid a
deployed ServerApp gets, flwr/superlink/grid/http_grid.py) sleeps 3 s between pulls, so every
exchange (setup, each round, evaluation) waited on average 1.5 s past its last reply; a round of
a few seconds' training spent a third of its time there. Here the same push and pulls run with a
POLL_SECONDS pause. Any other grid (Flower's in-memory simulation grid, which polls at 0.1 s;
tests' in-process grids) keeps its own send_and_receive.

A reply's objects are pulled with a short backoff too (server/deploy/flower_patches.py, set once as the
ServerApp starts).

`ExchangeTimes` records when the messages left and each reply came (wall clock, so that a site's
own log lines can be set beside them): the per-round timing line of the ServerApp's log.

`slowest_first` orders a round's messages by how late each site replied last round. Flower
pushes a batch's objects in message order (HttpGrid._try_push_messages: children before parents,
message by message, two at a time), and each object is its own request to the SuperLink (10-70
ms each on a loaded machine): the last site in the batch waits for every other site's objects
before its own, e.g. 18 objects for three tiny sites, 0.6-1.0 s. A round ends with its slowest
site's reply, so that site's message goes out first and the others' pushes overlap its training.
It goes out alone (`push_first_alone`): Flower registers a batch's messages together, so every
SuperNode of the batch starts pulling its objects (and asking again for those not uploaded yet)
while the first site's are still uploading, through the same single-process SuperLink. Alone,
the first message's objects have the SuperLink to themselves. With a `head_start` the others
also wait until that site has the message (`delivered`: its SuperNode confirmed it), so that its
download through the SuperLink and nginx is not shared with theirs either; `head_start_seconds` bounds
the wait by half the gap between the two latest replies of last round, so a site that waits
still replies before the slowest one (on the 2-core VM, `small` with 10 local steps: the
slowest site's download 0.15-0.42 s shared, 0.11-0.27 s alone, docs/performance.md).

`on_pushed`, `on_reply` and `on_idle` let the caller work while the replies are out instead of
after the last one: a round counts the bytes it sent, reads each reply as it arrives
(server/round.py), so only the slowest site's reply is read after it, and writes the round
before's checkpoint and logs (server/server_app.py). `on_idle` runs at the first reply, when a
site is done and the server has nothing else to do (on a machine the sites share, a core is
free then), or IDLE_FALLBACK_SECONDS after the push if none came by then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.proto.message_pb2 import PullObjectRequest
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

# One small HTTP call to the local SuperLink (a read of its state) per pause, ten a second while a
# round's replies are out; the last reply of a round waits half a pause on average.
POLL_SECONDS = 0.1
# The slowest site's message goes alone for at most this long (head_start), the ServerApp asking
# whether it arrived every DELIVERY_POLL_SECONDS meanwhile (a read of the local SuperLink's store).
HEAD_START_CAP_SECONDS = 2.0
DELIVERY_POLL_SECONDS = 0.02
# `on_idle` runs at the first reply, or this long after the push without one (a round whose sites
# all train longer still gets the round before checkpointed and logged within seconds).
IDLE_FALLBACK_SECONDS = 10.0


@dataclass
class ExchangeTimes:
    """One exchange's times: wall clock (time.time()) of the push's start and end, and of each
    reply's arrival by the id of the message it answers."""

    push_start: float = 0.0
    push_end: float = 0.0
    arrivals: dict[str, float] = field(default_factory=dict)
    # The first message alone (push_first_alone's head start): how long the others waited after
    # its push, and whether its site had it by then (None: they did not wait).
    alone_seconds: float = 0.0
    first_delivered: bool | None = None


def slowest_first(messages: Sequence[Message], lags: Mapping[int, float]) -> list[Message]:
    """`messages` with the node that replied latest last time first (`lags`: node id -> seconds
    from the push to its reply); nodes without a lag (new, or silent last time) after those with
    one. Ties and unknowns keep their order, so a first round goes out as the strategy made it."""
    known = sorted((m for m in messages if m.metadata.dst_node_id in lags), key=lambda m: -lags[m.metadata.dst_node_id])
    return known + [m for m in messages if m.metadata.dst_node_id not in lags]


def head_start_seconds(messages: Sequence[Message], lags: Mapping[int, float]) -> float:
    """How long the first of `messages` (in slowest_first's order) may travel alone: half the gap
    between the latest and the second-latest reply of last time (`lags` as slowest_first's), at
    most HEAD_START_CAP_SECONDS. 0 for a single message, or when a site has no lag (it may be the
    slowest)."""
    if len(messages) < 2 or any(m.metadata.dst_node_id not in lags for m in messages):
        return 0.0
    latest, second = sorted((lags[m.metadata.dst_node_id] for m in messages), reverse=True)[:2]
    return min(HEAD_START_CAP_SECONDS, max(0.0, (latest - second) / 2))


def delivered(grid: HttpGrid, message_id: str) -> bool:
    """Whether the SuperNode of message `message_id` has it and every object of it. Flower's
    SuperLink deletes a message's object when its SuperNode confirms that (the Fleet API's
    ConfirmMessageReceived: ObjectStore.delete), and not before, so the Runtime API's PullObject
    stops finding it. HttpGrid keeps its Runtime API client private (`_runtime_client`);
    tests/unit/test_exchange.py fails if Flower changes any of this."""
    request = PullObjectRequest(node=grid.node, run_id=grid.run.run_id, object_id=message_id)
    return not grid._runtime_client.PullObject(request).object_found


def wait_delivered(grid: HttpGrid, message_id: str, seconds: float) -> bool:
    """Until message `message_id` is `delivered` or `seconds` passed; whether it was. A failed
    look ends the wait (False): the wait only orders the pushes, the round goes on without it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if delivered(grid, message_id):
                return True
        except Exception:  # noqa: BLE001  # any failure of the look: push the rest now
            return False
        if time.monotonic() + DELIVERY_POLL_SECONDS > deadline:
            return False
        time.sleep(DELIVERY_POLL_SECONDS)


def push_first_alone(
    grid: HttpGrid, messages: Sequence[Message], head_start: float = 0.0, times: ExchangeTimes | None = None
) -> list[str]:
    """Push `messages[0]` and its objects, then (once its site has it, or after `head_start`
    seconds; at once when 0) the rest as one batch; the message ids in order (Flower's, None for a
    message the SuperLink did not take). An empty batch sends nothing. `times` gets the wait."""
    first = list(grid.push_messages(list(messages[:1])))
    if head_start > 0 and len(messages) > 1 and first and first[0]:
        waited = time.monotonic()
        arrived = wait_delivered(grid, first[0], head_start)
        if times is not None:
            times.alone_seconds, times.first_delivered = time.monotonic() - waited, arrived
    return [*first, *grid.push_messages(list(messages[1:]))]


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    times: ExchangeTimes | None = None,
    *,
    on_pushed: Callable[[], None] | None = None,
    on_reply: Callable[[Message], None] | None = None,
    on_idle: Callable[[], None] | None = None,
    head_start: float = 0.0,
) -> list[Message]:
    """Push `messages`, pull their replies until all arrived or `timeout` seconds passed; `times`,
    when given, gets the push's and the replies' times. `on_pushed()` runs once the messages have
    left, `on_reply(reply)` as each reply arrives, `on_idle()` once: after the first reply's
    `on_reply`, IDLE_FALLBACK_SECONDS after the push without a reply, or before returning
    (a grid that exchanges in one call, e.g. the simulation's: after it, in reply order).
    `head_start`: push_first_alone's (an HttpGrid's)."""
    times = times if times is not None else ExchangeTimes()
    times.push_start = time.time()
    messages = list(messages)
    if not isinstance(grid, HttpGrid):
        answered = list(grid.send_and_receive(messages, timeout=timeout))
        times.push_end = times.push_start  # such a grid pushes and pulls in one call: no times inside it
        now = time.time()
        times.arrivals.update({m.metadata.reply_to_message_id: now for m in answered})
        if on_pushed is not None:
            on_pushed()
        if on_reply is not None:
            for m in answered:
                on_reply(m)
        if on_idle is not None:
            on_idle()
        return answered
    # None: a message the SuperLink refused
    pending = {m for m in push_first_alone(grid, messages, head_start, times) if m}
    times.push_end = time.time()
    if on_pushed is not None:
        on_pushed()
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    idle_at = time.monotonic() + IDLE_FALLBACK_SECONDS
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(pending))
        now = time.time()
        replies.extend(got)
        for m in got:
            times.arrivals[m.metadata.reply_to_message_id] = now
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if on_reply is not None:
            for m in got:
                on_reply(m)
        done = not pending or (timeout is not None and time.monotonic() >= end)
        if on_idle is not None and (replies or done or time.monotonic() >= idle_at):
            idle, on_idle = on_idle, None
            idle()
        if done:
            return replies
        time.sleep(POLL_SECONDS)
