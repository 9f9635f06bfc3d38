"""How often a site's SuperNode tells the SuperLink it is alive: `join --heartbeat-interval`, set in
Flower's SuperNode by client/deploy/flower_patches.py `set_heartbeat` (the only place that touches
Flower's heartbeat on the site's side).

Why (flwr 1.41, flwr/common/constant.py, flwr/supercore/heartbeat.py, flwr/supernode/
fleet_http_connection.py): a SuperNode sends HEARTBEAT_DEFAULT_INTERVAL = 30 s as its interval and
the SuperLink counts it dead HEARTBEAT_PATIENCE (2) intervals after its last heartbeat, so a crashed
site was noticed 54-57 s after it died, and every stage of a round that waited for it waited that
long. The interval a SuperNode sends is what the SuperLink expires it by, so the site sets it;
the SuperLink must accept it (`coordinator superlink --min-heartbeat-interval`, Flower refuses
intervals under 10 s). At HEARTBEAT_INTERVAL_S = 4 a dead site is noticed within 8 s.

Flower sends the next heartbeat (interval - call budget) x 0.7-0.9 s after the last one answered,
the call budget being HEARTBEAT_CALL_TIMEOUT (5 s): at an interval of 5 s or less, no pause at all.
`call_budget` keeps Flower's 5 s from 10 s up and half the interval below (at 4 s: a heartbeat every
1.4-1.8 s, four or five within the SuperLink's 8 s). The HTTP call itself keeps Flower's 5 s
timeout, and a failed one is retried after a random wait of up to 1, 2, 4 s: a site is counted dead
by mistake only when no heartbeat reached the SuperLink for 2 x interval (docs/coordinator.md, "A
dead site").
"""

from __future__ import annotations

HEARTBEAT_INTERVAL_S = 4.0  # a dead site noticed within 2 x this (Flower: 30 s, so 60 s)
MIN_HEARTBEAT_INTERVAL_S = 2.0  # below: heartbeats every second, a false "dead" from one slow call
MAX_HEARTBEAT_INTERVAL_S = 1800.0  # Flower's HEARTBEAT_MAX_INTERVAL: the SuperLink refuses more
FLOWER_CALL_BUDGET_S = 5.0  # Flower's HEARTBEAT_CALL_TIMEOUT, kept from an interval of 10 s up


def call_budget(interval: float) -> float:
    """What Flower's heartbeat loop subtracts from `interval` before it waits (its
    HEARTBEAT_CALL_TIMEOUT): Flower's 5 s, at most half the interval."""
    return min(FLOWER_CALL_BUDGET_S, interval / 2)
