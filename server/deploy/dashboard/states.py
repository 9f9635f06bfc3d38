"""A site's state, as the page and /metrics name it: each state calls for its own action.

Its connection (FED/federation.json, registry.json and the Control API):

    provisioned  provisioned (FED/federation.json) but not registered yet: `coordinator register`
    online       its node is connected to the SuperLink
    offline      registered, its node not connected (Flower's offline, registered or unregistered,
                 or a node the SuperLink does not know): the site's admin restarts `join`
    unknown      the SuperLink's Control API did not answer: nothing is known of any site, and
                 no site is called offline for it (the SuperLink is what to look at)

Its part in a round (its status and reason in the round's event, read):

    ok        trained; its update averaged
    lost      gone mid-run: no reply, its node unavailable (no heartbeat: Flower answers for it),
              its reply never delivered (it died while sending it), not connected, or restarted
              without the run's setup: the site is down
    refusing  its own policy refused the round (its epsilon cap, secure aggregation required,
              too few subjects): the site is up and says why; its admin decides
    rejected  the server left its reply out: it failed a check (malformed, out of bounds, an
              outlier): look at the reason, and at the site
    error     its app answered with an error (an exception at the site)
    absent    not addressed for another reason (not sampled, or it did not accept the setup)
"""

from __future__ import annotations

CONNECTION_STATES = ("provisioned", "online", "offline", "unknown")
ROUND_STATES = ("ok", "lost", "refusing", "rejected", "error", "absent")
# Flower's words (lower case) when it answers for a site that delivered nothing: its node stopped
# sending heartbeats (NODE_UNAVAILABLE_ERROR_REASON), the message or its reply expired
# (MESSAGE_UNAVAILABLE_ERROR_REASON, REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON), or the site died
# while uploading its reply (flwr/superlink/grid/http_grid.py); tests check each still reads so.
UNDELIVERED = ("node unavailable", "message unavailable", "message objects are unavailable")
# server/round.py record_absent's reason for a site of the run that is not connected.
NOT_CONNECTED = "not connected to the SuperLink"


def round_state(status: str, reason: str = "") -> str:
    """A site's state in a round from its status and reason there (the module docstring)."""
    if status == "ok":
        return "ok"
    if status == "refused":
        return "refusing"
    if status == "rejected":
        return "rejected"
    if status in ("no reply", "no setup") or (status == "error" and any(w in reason.lower() for w in UNDELIVERED)):
        return "lost"
    if status == "error":
        return "error"
    if status == "absent" and NOT_CONNECTED in reason:
        return "lost"
    return "absent"


def connection_state(registered: bool, superlink_answered: bool, flower_status: str | None) -> str:
    """A site's connection state: `flower_status` is the Control API's word for its node (None:
    the SuperLink does not know it)."""
    if not registered:
        return "provisioned"
    if not superlink_answered:
        return "unknown"
    return "online" if flower_status == "online" else "offline"
