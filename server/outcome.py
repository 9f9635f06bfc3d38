"""How a run ended, for the coordinator: OUT_DIR/outcome.json, written by the ServerApp.

The ServerApp writes `running` as it starts (with Flower's run id) and after each round (the rounds
done so far), then `completed` or `failed` with the reason (the exception, on one line) as it ends,
or `interrupted` when a signal stops it (`flwr stop`, its SuperExec or SuperLink gone). A ServerApp
killed outright records nothing; `running` is then a lie, so whoever reads the outcome settles it
(settle_outcome): a `running` run whose ServerApp is gone (its claim on the out-dir,
server/run_claim.py, names a dead process) or that Flower reports finished is rewritten as
`interrupted`, with the rounds checkpointed and the command that resumes it. `launch --wait`,
`status` and `superlink` (server/deploy/commands.py) do so and print it, and exit non-zero unless the
run completed without losing a site.

A parameter group is *untrained* when no round of the run averaged an update into it (under
secure aggregation: withheld in every round, e.g. fewer holders than min_holders; or no site holds
it): the run "completed", but the model's weights of that group are still its initialisation.
outcome.json names each with why (`untrained_groups`), `describe` says so, and the release marks it
(server/release.py).

A site is *lost* when it trained (status ok) in the run's first round and did not train in its
final round or sent no evaluation after it, or when it never trained in any round (every message
to it failed, or it refused the setup): the run "completed", but without that site's data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import strict_model
from healthfm_core.train.checkpoint_dirs import latest_checkpoint
from server.run_claim import guarded, holder_alive, read_claim, serverapp_gone

OUTCOME_FILE = "outcome.json"


class RunOutcome(BaseModel):
    """OUT_DIR/outcome.json."""

    model_config = ConfigDict(extra="forbid")

    run_id: int | None = None  # Flower's run id (None in tests that call the server directly)
    status: Literal["running", "completed", "failed", "interrupted"]
    reason: str = ""  # failed, interrupted: why (one line)
    sites_lost: dict[str, str] = {}  # site -> why it is counted lost
    untrained_groups: dict[str, str] = {}  # group -> why no round updated it (untrained_groups)
    rounds_done: int = 0
    rounds: int = 0
    started_at: float
    finished_at: float | None = None
    resume: str = ""  # interrupted: the coordinator command that resumes it (filled in by settle_outcome)

    @property
    def ok(self) -> bool:
        return self.status == "completed" and not self.sites_lost

    def describe(self) -> str:
        """One line for the coordinator."""
        if self.status == "running":
            return f"running: {self.rounds_done} of {self.rounds} rounds done"
        if self.status == "interrupted":
            text = f"interrupted after {self.rounds_done} of {self.rounds} rounds ({self.reason})"
            if self.rounds_done == 0:
                return text + "; no round was checkpointed: launch it again"
            return (
                text
                + f"; {self.rounds_done} round(s) checkpointed: resume with `{self.resume or 'coordinator resume'}`"
            )
        if self.status == "failed":
            return f"failed after {self.rounds_done} of {self.rounds} rounds: {self.reason}"
        text = f"completed {self.rounds_done} of {self.rounds} rounds"
        if self.sites_lost:
            text += "; lost site(s): " + "; ".join(f"{s} ({why})" for s, why in sorted(self.sites_lost.items()))
        if self.untrained_groups:
            text += "; untrained group(s), their weights the initialisation: " + "; ".join(
                f"{g} ({why})" for g, why in sorted(self.untrained_groups.items())
            )
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
        return strict_model(RunOutcome, path.read_text(encoding="utf-8"), path)
    except (ValueError, OSError) as err:  # ValidationError, StrictFileError (a duplicated key)
        raise ValueError(f"{path}: not a run outcome ({' '.join(str(err).split())[:300]})") from None


def checkpointed_round(out_dir: str | Path) -> int:
    """The round of the latest checkpoint under out_dir/checkpoints (what `resume` continues from); 0 if none."""
    latest = latest_checkpoint(Path(out_dir) / "checkpoints")
    return int(latest.name.rsplit("-", 1)[1]) if latest is not None else 0


def settle_outcome(
    out_dir: str | Path, run_id: int, resume: str = "", flower_status: str | None = None
) -> RunOutcome | None:
    """The outcome out_dir records, made true for run_id first: a `running` run whose ServerApp
    is gone, or that Flower reports finished (flower_status), becomes `interrupted` with the
    rounds checkpointed and `resume` (the command); an `interrupted` one gets `resume` if it has
    none. Rewritten in outcome.json (under the out-dir's claim lock: never over another run's).
    ValueError naming the file if it does not parse."""
    out_dir = Path(out_dir)
    if not (out_dir / OUTCOME_FILE).is_file():
        return None  # nothing to settle (and no out-dir created by asking)
    with guarded(out_dir):
        outcome = read_outcome(out_dir)
        if outcome is None or outcome.run_id != run_id:
            return outcome
        if outcome.status == "running":
            why = serverapp_gone(out_dir, run_id)
            if why is None and flower_status is not None and flower_status.startswith("finished"):
                holder = read_claim(out_dir)
                if holder is not None and holder.run_id != run_id and holder_alive(holder) is not False:
                    return outcome  # another run owns the out-dir now: its outcome is about to be written
                why = f"Flower reports it {flower_status} and its ServerApp recorded no end"
            if why is None:
                return outcome
            outcome = outcome.model_copy(
                update=dict(
                    status="interrupted",
                    reason=why,
                    rounds_done=checkpointed_round(out_dir),
                    finished_at=time.time(),
                    resume=resume,
                )
            )
        elif outcome.status == "interrupted" and resume and not outcome.resume:
            outcome = outcome.model_copy(update=dict(resume=resume, rounds_done=checkpointed_round(out_dir)))
        else:
            return outcome
        write_outcome(out_dir, outcome)
        return outcome


def started(run_id: int | None, rounds: int, rounds_done: int) -> RunOutcome:
    return RunOutcome(run_id=run_id, status="running", rounds=rounds, rounds_done=rounds_done, started_at=time.time())


def sites_lost(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Sites that trained in the first round and not in the final round, or sent no evaluation
    after it, and sites that never trained (events: rounds.jsonl, every launch of the run)."""
    rounds = {int(e["round"]): e for e in events if e.get("event") == "round"}  # a re-run round: the last
    if not rounds:
        return {}
    never = never_trained(events, rounds)
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
    return {**lost, **never}


def untrained_groups(
    events: Sequence[Mapping[str, Any]], groups: Sequence[str], up_to_round: int | None = None
) -> dict[str, str]:
    """The groups of `groups` no round (up to `up_to_round`) updated: in no round's `contributors`
    (rounds.jsonl, every launch of the run; a re-run round counts once, its last record). Each
    with why: the reason of its last withholding under secure aggregation, else that no round
    averaged any site's update of it."""
    rounds = {
        int(e["round"]): e
        for e in events
        if e.get("event") == "round" and (up_to_round is None or int(e["round"]) <= up_to_round)
    }
    trained = {g for e in rounds.values() for g, sites in (e.get("contributors") or {}).items() if sites}
    out: dict[str, str] = {}
    for group in groups:
        if group in trained:
            continue
        withheld = [
            (rnd, str(why))
            for rnd, e in sorted(rounds.items())
            if (why := ((e.get("secure_aggregation") or {}).get("withheld") or {}).get(group)) is not None
        ]
        if withheld:
            rnd, why = withheld[-1]
            out[group] = (
                f"withheld in {len(withheld)} of {len(rounds)} round(s); round {rnd}: {' '.join(why.split())[:300]}"
            )
        else:
            out[group] = f"no site's update of it was averaged in any of {len(rounds)} round(s)"
    return out


def never_trained(events: Sequence[Mapping[str, Any]], rounds: Mapping[int, Mapping[str, Any]]) -> dict[str, str]:
    """Sites of the run that trained in no round: every message to them failed (a site whose
    data its reader refuses answers each one with an error), they refused the run's setup, or
    they were gone in every round. Counted lost like a site that left: the run went on without
    their data. A site only ever left out by sampling is not (it was never asked)."""
    trained = {s for e in rounds.values() for s, entry in e.get("sites", {}).items() if entry.get("status") == "ok"}
    why: dict[str, str] = {}  # site -> the last reason it did not train
    for event in events:
        if event.get("event") in ("setup", "resume"):
            for site, reason in (event.get("refused") or {}).items():
                why[site] = f"round {event.get('round', 0)}: error: {reason}"
    for rnd in sorted(rounds):
        for site, entry in rounds[rnd].get("sites", {}).items():
            status, reason = entry.get("status", "absent"), entry.get("reason")
            if status == "absent" and reason == "not sampled":
                continue
            why[site] = f"round {rnd}: {status}" + (f": {reason}" if reason else "")
    return {
        site: f"never trained ({' '.join(text.split())[:300]})"
        for site, text in sorted(why.items())
        if site not in trained
    }


__all__ = [
    "OUTCOME_FILE",
    "RunOutcome",
    "checkpointed_round",
    "never_trained",
    "read_outcome",
    "settle_outcome",
    "sites_lost",
    "started",
    "untrained_groups",
    "write_outcome",
]
