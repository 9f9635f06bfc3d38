"""OUT_DIR/live.json: what the run is doing now, for the coordinator's dashboard.

rounds.jsonl gets a round's event once its checkpoint is written, while the next round's sites
train (server/server_app.py): it is one round behind, and says nothing of a round in flight, of a
wait for min-nodes, or of who a round is waiting for. live.json says it, rewritten (atomically)
at each change of the ServerApp's phase:

    waiting for sites   the round waits for min-nodes sites (`connected`, `required`, up to `limit_s`)
    round 0: ...        round 0's queries (capabilities, code statistics, the setup)
    training            a plain round's train messages are out (`groups`: each group's holders
                        sent it; `waiting_for`; `replied`: seconds from the push to each reply;
                        `errors`: the error a reply carried, e.g. Flower's for a dead node)
    secure ...          a secure round's stage (keys, mask, unmask), the same fields
    aggregating         every reply is in (or the timeout passed): checked and averaged
    evaluating          a federated evaluation
    ended               the ServerApp is done (outcome.json says how)

and `last`, the last round aggregated (before its record reaches rounds.jsonl): each site's
status, each group's contributors, the groups under their holders' control, the losses.

Written only by the ServerApp (FederationServer); a write that fails is logged once and never
stops the run. The dashboard reads it with `LiveState` (server/deploy/dashboard/view.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from healthfm_core.files import atomic_write_text

log = logging.getLogger("healthfm.server")

LIVE_FILE = "live.json"
ENDED = "ended"
WAITING_FOR_SITES = "waiting for sites"
TRAINING = "training"
AGGREGATING = "aggregating"
EVALUATING = "evaluating"
SECURE_STAGE = "secure aggregation: {stage}"  # keys, mask, unmask


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AggregatedRound(_Strict):
    """The last round aggregated, as its record will say (round.py's RoundRecord)."""

    round: int
    statuses: dict[str, str]  # site -> its status (ok, no reply, refused, rejected, error, absent, no setup)
    reasons: dict[str, str] = Field(default_factory=dict)  # site -> why it is not ok
    contributors: dict[str, list[str]] = Field(default_factory=dict)  # group -> the sites averaged into it
    under_holders_control: dict[str, list[str]] = Field(default_factory=dict)  # groups of 1-2 holders
    losses: dict[str, float] = Field(default_factory=dict)
    updated: bool = True  # the global arrays changed
    at: float = 0.0  # unix time it was aggregated


class LiveState(_Strict):
    """live.json (the module docstring)."""

    run_id: int | None = None
    rounds: int = 0
    round: int = 0  # the round in flight (0: round 0)
    phase: str = ""
    since: float = 0.0  # unix time the phase began
    updated: float = 0.0  # unix time of the last change
    required: int | None = None
    connected: list[str] = Field(default_factory=list)
    limit_s: float | None = None
    groups: dict[str, list[str]] = Field(default_factory=dict)
    waiting_for: list[str] = Field(default_factory=list)
    replied: dict[str, float] = Field(default_factory=dict)
    errors: dict[str, str] = Field(
        default_factory=dict
    )  # site -> the error its reply carried (Flower's for a dead node)
    last: AggregatedRound | None = None


class LiveRound:
    """Keeps OUT_DIR/live.json up to date (a no-op without an out-dir)."""

    def __init__(self, out_dir: Path | None = None, run_id: int | None = None, rounds: int = 0) -> None:
        self.path = out_dir / LIVE_FILE if out_dir is not None else None
        self.state = LiveState(run_id=run_id, rounds=rounds)
        self.round = 0
        self._failed = False

    def _write(self) -> None:
        if self.path is None:
            return
        self.state.updated = time.time()
        try:
            atomic_write_text(self.path, self.state.model_dump_json() + "\n")
        except OSError as err:  # the dashboard's file: never the run's failure
            if not self._failed:
                log.warning("cannot write %s (the dashboard's live state): %s", self.path, err)
            self._failed = True

    def _phase(self, rnd: int, phase: str, **fields: Any) -> None:
        fresh = LiveState(
            run_id=self.state.run_id, rounds=self.state.rounds, round=rnd, phase=phase, since=time.time(),
            last=self.state.last, **fields,
        )  # fmt: skip
        self.state = fresh
        self._write()

    def begin_round(self, rnd: int) -> None:
        """The round the phases that follow belong to (written with the first of them)."""
        self.round = rnd

    def waiting_for_sites(self, connected: Sequence[str], required: int, limit_s: float) -> None:
        """The round waits for min-nodes: called at the start of the wait and when who is connected changes."""
        if self.state.phase == WAITING_FOR_SITES and self.state.round == self.round:
            if sorted(connected) != self.state.connected:
                self.state.connected = sorted(connected)
                self._write()
            return
        self._phase(self.round, WAITING_FOR_SITES, connected=sorted(connected), required=required, limit_s=limit_s)

    def sent(self, phase: str, holders: Mapping[str, Sequence[str]]) -> None:
        """Messages out to the sites `holders` names (site -> the groups it was sent)."""
        groups: dict[str, list[str]] = {}
        for site, held in sorted(holders.items()):
            for group in held:
                groups.setdefault(group, []).append(site)
        self._phase(self.round, phase, groups={g: groups[g] for g in sorted(groups)}, waiting_for=sorted(holders))

    def replied(self, site: str, error: str | None = None) -> None:
        """A reply for `site` arrived (`error`: the error it carried, e.g. Flower's for a node without heartbeat)."""
        if site in self.state.waiting_for:
            self.state.waiting_for.remove(site)
            self.state.replied[site] = round(time.time() - self.state.since, 3)
            if error:
                self.state.errors[site] = error
            self._write()

    def phase(self, phase: str) -> None:
        self._phase(self.round, phase)

    def aggregated(self, rnd: int, sites: Mapping[str, Mapping[str, Any]], **record: Any) -> None:
        """The round's outcome, as soon as it is aggregated (`sites`: its event's; `record`:
        contributors, under_holders_control, losses, updated)."""
        self.state.last = AggregatedRound(
            round=rnd,
            statuses={s: str(e.get("status")) for s, e in sorted(sites.items())},
            reasons={s: str(e["reason"]) for s, e in sorted(sites.items()) if e.get("reason")},
            at=time.time(),
            **record,
        )
        self._write()

    def ended(self) -> None:
        self._phase(self.round, ENDED)


__all__ = [
    "AGGREGATING",
    "ENDED",
    "EVALUATING",
    "LIVE_FILE",
    "SECURE_STAGE",
    "TRAINING",
    "WAITING_FOR_SITES",
    "AggregatedRound",
    "LiveRound",
    "LiveState",
]
