"""How often a site's SuperNode asks the SuperLink for work, and how soon it retries a message's
objects: the settings `join --poll-interval` passes to client/supernode_main.py, which sets them
in Flower's SuperNode loop.

Flower 1.41 fixes both, and both sit on every round's path (flwr/supernode/start_client_internal.py):
- its pull loop sleeps `time.sleep(3)` each time the SuperLink has no message for it, so a round's
  train message waited 1.5 s on average (up to 3 s) before its site saw it;
- it stores the message and creates the ClientApp's task before pulling the message's objects,
  with `pull_objects` at its defaults (flwr/supercore/constant.py: PULL_INITIAL_BACKOFF 1 s,
  doubling up to PULL_BACKOFF_CAP 10 s) while the ServerApp may still be uploading them: an
  object not there yet was retried after 1, 2, 4, 8, 10... s, so an upload of a few seconds
  could cost twice as long.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

POLL_INTERVAL_S = 0.5  # one small Fleet API call per idle SuperNode per interval (Flower: 3 s)
PULL_INITIAL_BACKOFF_S = 0.05  # first retry of an object not there yet (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # no retry waits longer than this (Flower: 10 s)


class SupernodePace(BaseModel):
    """The SuperNode's idle pull interval and object-retry backoff, in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poll_interval: float = Field(default=POLL_INTERVAL_S, gt=0, le=60)
    pull_initial_backoff: float = Field(default=PULL_INITIAL_BACKOFF_S, gt=0, le=10)
    pull_backoff_cap: float = Field(default=PULL_BACKOFF_CAP_S, gt=0, le=60)

    def args(self) -> list[str]:
        """As client/supernode_main.py's options."""
        return [
            "--poll-interval",
            str(self.poll_interval),
            "--pull-backoff",
            str(self.pull_initial_backoff),
            "--pull-backoff-cap",
            str(self.pull_backoff_cap),
        ]
