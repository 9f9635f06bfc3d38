"""How a run ended, for the coordinator: OUT_DIR/outcome.json, written by the ServerApp.

The ServerApp writes `running` as it starts (with Flower's run id), then `completed` or `failed`
with the reason (the exception, on one line) as it ends. A run stopped or killed (`flwr stop`,
a SuperLink that died) leaves `running`: the coordinator reports that it ended unrecorded.
`launch --wait` and `status` (server/coordinator.py) print it and exit non-zero unless the run
completed without losing a site.

A site is *lost* when it trained (status ok) in the run's first round and did not train in its
final round or sent no evaluation after it: the run "completed", but without that site's data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.files import atomic_write_text

OUTCOME_FILE = "outcome.json"


class RunOutcome(BaseModel):
    """OUT_DIR/outcome.json."""

    model_config = ConfigDict(extra="forbid")

    run_id: int | None = None  # Flower's run id (None in tests that call the server directly)
    status: Literal["running", "completed", "failed"]
    reason: str = ""  # failed: why (one line)
    sites_lost: dict[str, str] = {}  # site -> why it is counted lost
    rounds_done: int = 0
    rounds: int = 0
    started_at: float
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed" and not self.sites_lost

    def describe(self) -> str:
        """One line for the coordinator."""
        if self.status == "running":
            return (
                "the ServerApp recorded no end (stopped, killed, or its SuperLink died) after "
                f"{self.rounds_done} of {self.rounds} rounds"
            )
        if self.status == "failed":
            return f"failed after {self.rounds_done} of {self.rounds} rounds: {self.reason}"
        text = f"completed {self.rounds_done} of {self.rounds} rounds"
        if self.sites_lost:
            text += "; lost site(s): " + "; ".join(f"{s} ({why})" for s, why in sorted(self.sites_lost.items()))
        return text


def write_outcome(out_dir: str | Path, outcome: RunOutcome) -> Path:
    path = Path(out_dir) / OUTCOME_FILE
    atomic_write_text(path, outcome.model_dump_json(indent=1) + "\n")
    return path


def read_outcome(out_dir: str | Path) -> RunOutcome | None:
    """The outcome recorded under out_dir; None if there is none; ValueError naming the file if
    it does not parse."""
    path = Path(out_dir) / OUTCOME_FILE
    if not path.is_file():
        return None
    try:
        return RunOutcome.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, OSError) as err:
        raise ValueError(f"{path}: not a run outcome ({' '.join(str(err).split())[:300]})") from None


def started(run_id: int | None, rounds: int, rounds_done: int) -> RunOutcome:
    return RunOutcome(run_id=run_id, status="running", rounds=rounds, rounds_done=rounds_done, started_at=time.time())


def sites_lost(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Sites that trained in the first round and not in the final round, or sent no evaluation
    after it (events: rounds.jsonl, every launch of the run)."""
    rounds = {int(e["round"]): e for e in events if e.get("event") == "round"}  # a re-run round: the last
    if not rounds:
        return {}
    first, last = rounds[min(rounds)], rounds[max(rounds)]
    trained = {s for s, entry in first.get("sites", {}).items() if entry.get("status") == "ok"}
    lost: dict[str, str] = {}
    for site in sorted(trained):
        entry = last.get("sites", {}).get(site, {})
        if entry.get("status") != "ok":
            why = entry.get("reason") or entry.get("status") or "not addressed"
            lost[site] = f"round {max(rounds)}: {entry.get('status', 'absent')}" + (
                f": {why}" if why != entry.get("status") else ""
            )
    evaluations = [e for e in events if e.get("event") == "evaluate" and int(e["round"]) == max(rounds)]
    if evaluations:
        reported = set(evaluations[-1].get("sites", {}))
        absent = evaluations[-1].get("absent", {})
        for site in sorted(trained - reported):
            lost.setdefault(
                site, f"no evaluation after round {max(rounds)}" + (f": {absent[site]}" if site in absent else "")
            )
    return lost


__all__ = ["OUTCOME_FILE", "RunOutcome", "read_outcome", "sites_lost", "started", "write_outcome"]
