"""What the dashboard shows, read from the files the coordinator holds (never written to).

FED/federation.json (the sites provisioned, server.deploy.provision), FED/server/registry.json
(the sites registered, server.deploy.registry), launches.jsonl (each launch's run id and out-dir,
in launch order, read by the caller with server.deploy.launches.read_launches), run-configs/head-
run-*.toml (each task-head run's out-dir), and per run: rounds.jsonl (server.runlog's events),
live.json (the round in flight, server.live_round), outcome.json (server.outcome.read_outcome),
audit.jsonl with its anchor (server.audit: the chain and its head verified), evaluation.json; per
release given: model_card.json. Every figure on the page is one a run already records: counts,
statuses, reasons, timings, bytes, epsilons, metrics with their intervals. A file that does not
parse is named on the page with its error, never guessed around. Runs are in launch order
(launches.jsonl's), never Flower's run ids' (random). Each file is parsed once per change
(files.py); a run's table holds its last ROUNDS_SHOWN rounds, its totals count every round. No
file is held as its events: each rounds.jsonl is folded, event by event, into what the page shows
of it, of a size that does not follow the rounds recorded (ROUNDS_KEPT, EVALUATIONS_KEPT,
PLOT_POINTS, REFUSALS_SHOWN).
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from healthfm_core.eval.federation_auroc import FederationAUROC, PooledSite
from healthfm_core.eval.outcomes import outcome_rows, replies_from_event
from healthfm_core.eval.plots import IntervalPoint
from healthfm_core.files import sha256_file
from healthfm_core.strict_files import read_json
from server.audit import AUDIT_FILE, anchor_path
from server.clipping import few_holders
from server.deploy.dashboard.files import RunFiles, stat_key
from server.deploy.dashboard.states import round_state
from server.deploy.provision import ProvisionError, read_manifest
from server.deploy.registry import RegistryError, SiteRegistry, read_registry
from server.live_round import ENDED, LIVE_FILE, LiveState
from server.outcome import RunOutcome, read_outcome
from server.run_claim import CLAIM_FILE, serverapp_gone
from server.runlog import HEAD_ROUNDS_FILE, forest_points

EVALUATION_FILE = "evaluation.json"
MODEL_CARD_FILE = "model_card.json"
ROUNDS_FILE = "rounds.jsonl"
OUTCOME_FILE = "outcome.json"
ROUNDS_SHOWN = 20  # the last rounds of a run in its table; every round is in rounds.jsonl and summary.md
TABLES_SHOWN = 3  # runs with their round table: the newest launches (and any running); the others in a line
REFUSALS_SHOWN = 5  # a site's last refusals and rejections listed (the rest counted)
# A run's last rounds held whole (the table's, and those a resume may record again): older ones
# are held as their sums only, so the dashboard's memory does not follow a run's length.
ROUNDS_KEPT = 64
EVALUATIONS_KEPT = 4  # the last evaluated rounds whose absent sites are held (evaluation.json names the last)
PLOT_POINTS = 256  # a DP site's epsilon points held per file: past it, every other one is dropped (the last kept)
RECHECK_S = 10.0  # a running run's ServerApp is looked for at least this often (a dead one changes no file)


@dataclass(frozen=True)
class Launch:
    """One launch of a run (a line of launches.jsonl, or a head run's config)."""

    run_id: int
    out_dir: Path
    launched_at: str = ""
    resumed: bool = False
    kind: str = "pretraining"  # or "task head"


@dataclass
class SiteRound:
    status: str  # as the round's event says: ok, no reply, refused, rejected, error, absent, ...
    state: str  # as the page names it (states.py): ok, lost, refusing, rejected, error, absent
    reason: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RoundView:
    round: int
    seconds: float | None
    training: float | None  # the slowest site's training loop (None: DP sites send no timings)
    waiting: float | None  # messages out to the last reply
    aggregation: float | None
    sites: dict[str, SiteRound]
    bytes_sent: int
    bytes_received: int
    rejected: list[tuple[str, str]]  # (site, reason)
    secure: dict[str, Any] | None  # the round's secure_aggregation record
    # Before the messages left: the wait for min-nodes (up to a minute) and building them.
    before_sending: float | None = None
    contributors: dict[str, list[str]] = field(default_factory=dict)  # group -> the sites averaged into it
    few_holders: dict[str, list[str]] = field(default_factory=dict)  # groups averaged from 1-2 sites
    losses: dict[str, float] = field(default_factory=dict)  # the n-weighted mean losses (plain rounds)
    updated: bool = True  # the global arrays changed


@dataclass
class LiveView:
    """The round in flight (live.json, server/live_round.py), of a running run."""

    state: LiveState
    # Groups sent to fewer than 3 sites in the exchange in flight: their average will be under
    # those sites' control (server/clipping.py few_holders).
    few_holders: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SiteLatest:
    """A site's part in the latest round of a run that names it."""

    run_id: int
    round: int
    state: str
    reason: str = ""


@dataclass
class AuditView:
    ok: bool
    records: int = 0
    problem: str = ""  # where the chain breaks, why its head is not its anchor's, or why it cannot be read
    after_anchor: int = 0  # records after an anchor that matches (the ServerApp between its two writes)
    mismatches: list[str] = field(default_factory=list)  # anchor-mismatch records: a resume found it cut or edited


@dataclass
class ResultRow:
    site: str
    task: str
    result: str  # "AUROC 0.71 [0.62, 0.80]", or "no metric"
    detail: str  # rows, positives, or why it is withheld


@dataclass
class EvaluationView:
    round: int
    rows: list[ResultRow]
    federation: dict[str, str]  # task -> its federation-wide AUROC described, or why none
    points: list[IntervalPoint]  # the forest plot's
    # task -> each pooled site's line: its claims, its own AUROC, its weight under the share cap
    pooled_sites: dict[str, dict[str, PooledSite]] = field(default_factory=dict)


@dataclass
class RunView:
    launch: Launch
    runs_in_out_dir: list[int]  # every launch of this out-dir, oldest first
    status: str  # running, interrupted, completed, failed, not started
    describe: str
    resume: str = ""  # an interrupted run: the command that resumes it
    rounds_done: int = 0
    rounds_planned: int = 0
    rounds: list[RoundView] = field(default_factory=list)  # the last ROUNDS_SHOWN recorded
    refused_setup: dict[str, str] = field(default_factory=dict)
    evaluation: EvaluationView | None = None
    audit: AuditView | None = None
    problems: list[str] = field(default_factory=list)  # files that do not parse, named
    rounds_recorded: int = 0  # rounds in rounds.jsonl
    bytes_sent: int = 0  # over every recorded round
    bytes_received: int = 0
    state_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> state -> rounds
    latest: dict[str, SiteLatest] = field(default_factory=dict)  # site -> its latest recorded round
    trained_last: dict[str, int] = field(default_factory=dict)  # site -> the last round it trained
    refusals: dict[str, list[str]] = field(
        default_factory=dict
    )  # site -> its last REFUSALS_SHOWN refusals and rejections
    refusals_before: dict[str, int] = field(default_factory=dict)  # site -> its refusals and rejections before those
    live: LiveView | None = None  # the round in flight (a running run)
    evaluation_elsewhere: bool = False  # an older run's evaluation: in its evaluation.json, not on the page


@dataclass
class EpsilonPoint:
    time: float
    epsilon: float
    label: str  # "run 7 round 2", "head run 9 onset_t2d round 4"
    kind: str  # "pretraining" or "task head"
    number: int = 0  # its place among the site's DP rounds (1: the first)


@dataclass
class PrivacyView:
    site: str
    points: list[
        EpsilonPoint
    ]  # the rounds it trained under DP (the ledger's), at most PLOT_POINTS-ish, the last always
    delta: float | None
    noise_multiplier: float | None
    asked: str  # what the server asked (the run's privacy request), described
    target_epsilon: float | None
    new_budget: str = ""  # the site's admin started its ledger anew: when, and what it replaced
    epsilon_cap: float | None = None  # its policy's cap, as its latest pretraining reply gave it
    refused: list[str] = field(default_factory=list)  # the last rounds it refused (nothing trained, nothing spent)
    dp_rounds: int = 0  # rounds it trained under DP: every one, plotted or not
    refused_count: int = 0  # rounds it refused


@dataclass
class SiteView:
    name: str
    node_id: int  # 0: not registered
    modalities: list[str] = field(default_factory=list)
    trained_runs: list[int] = field(default_factory=list)  # runs it trained in (launch order): it ran their bundle
    last_trained: str = ""
    refusals: list[str] = field(default_factory=list)  # the last REFUSALS_SHOWN
    dp: bool = False
    registered: bool = True  # False: provisioned (FED/federation.json), not registered yet
    latest: SiteLatest | None = None  # its part in the latest round of the newest run that names it
    refusals_more: int = 0  # refusals and rejections before those listed


@dataclass
class ReleaseView:
    path: Path
    run_id: str = ""
    model: str = ""
    setup_sha256: str = ""
    rounds: int = 0
    epsilon: dict[str, float] = field(default_factory=dict)
    problem: str = ""


@dataclass
class FederationView:
    root: Path
    sites: list[SiteView]
    runs: list[RunView]
    privacy: list[PrivacyView]
    releases: list[ReleaseView]
    bundles: list[tuple[str, str]]  # the app bundles built in FED/server: (file name, sha256)
    problems: list[str]


def read_head_launches(server_dir: Path) -> list[Launch]:
    """The task-head runs `coordinator head` started: run-configs/head-run-<id>.toml names each one's out-dir."""
    out = []
    for path in sorted((server_dir / "run-configs").glob("head-run-*.toml")):
        try:
            run_id = int(path.stem.rsplit("-", 1)[1])
            config = tomllib.loads(path.read_text(encoding="utf-8"))
            out.append(Launch(run_id=run_id, out_dir=Path(str(config["out-dir"])), kind="task head"))
        except (OSError, ValueError, KeyError):
            continue  # not a head run's config (the page names pretraining problems; this one has no run to show)
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def round_view(event: Mapping[str, Any]) -> RoundView:
    """One `round` event of rounds.jsonl, as the runs panel shows it."""
    timings = event.get("timings") or {}
    rejected = [(str(r.get("site")), str(r.get("reason"))) for r in event.get("rejected") or []]
    sites = {}
    for name, entry in sorted((event.get("sites") or {}).items()):
        status = str(entry.get("status", "absent"))
        reason = str(entry.get("reason") or "") or "; ".join(r for s, r in rejected if s == name)
        sites[name] = SiteRound(
            status=status,
            state=round_state(status, reason),
            reason=reason,
            bytes_sent=int(entry.get("bytes_sent") or 0),
            bytes_received=int(entry.get("bytes_received") or 0),
        )
    contributors = {str(g): [str(s) for s in who] for g, who in (event.get("contributors") or {}).items()}
    return RoundView(
        round=int(event["round"]),
        seconds=_number(timings.get("round_seconds")),
        # Reported only where some site sent its training time (DP sites and secure rounds do not).
        training=_number(timings.get("local_train_seconds_max"))
        if any((e or {}).get("train_seconds") is not None for e in (event.get("sites") or {}).values())
        else None,
        waiting=_number(timings.get("wait_seconds")),
        aggregation=_number(timings.get("aggregate_seconds")),
        sites=sites,
        bytes_sent=int(event.get("bytes_sent") or 0),
        bytes_received=int(event.get("bytes_received") or 0),
        rejected=rejected,
        secure=dict(event["secure_aggregation"]) if event.get("secure_aggregation") else None,
        before_sending=_number(timings.get("configure_seconds")),
        contributors=contributors,
        few_holders={str(g): [str(s) for s in who] for g, who in (event.get("under_holders_control") or {}).items()},
        losses={str(k): v for k, v in (event.get("losses") or {}).items() if _number(v) is not None},
        updated=bool(event.get("updated", True)),
    )


def _round_or_problem(event: Mapping[str, Any]) -> RoundView | str | None:
    """A `round` event's view, or why it does not parse (None: another event)."""
    if event.get("event") != "round":
        return None
    try:
        return round_view(event)
    except (KeyError, TypeError, ValueError) as err:
        return f"a round event does not parse ({err})"


def audit_view(path: Path, files: RunFiles) -> AuditView | None:
    """The audit chain and its head against its anchor (server.audit), or where either fails."""
    check = files.audit(path, settle=lambda: time.sleep(0.05))
    if check is None:
        return None
    mismatches = [
        f"a resume found {m.get('found_records')} records where the anchor said {m.get('anchor_records')}"
        + (f" ({m['anchor_problem']})" if m.get("anchor_problem") else "")
        + " and recorded it"
        for m in check.mismatches
    ]
    return AuditView(
        ok=check.verified, records=check.records, problem=check.problem, after_anchor=check.after_anchor,
        mismatches=mismatches,
    )  # fmt: skip


def live_view(out_dir: Path, run_id: int, files: RunFiles) -> LiveView | None:
    """The round in flight, from live.json when it is this run's and the run has not ended."""
    path = out_dir / LIVE_FILE
    key = stat_key(path)
    if key is None:
        return None
    state = files.memo(("live", path), key, lambda: LiveState.model_validate_json(path.read_bytes()))
    if state.run_id != run_id or state.phase == ENDED:
        return None
    return LiveView(state=state, few_holders=few_holders(state.groups))


def evaluation_view(out_dir: Path, absent_by_round: Mapping[int, Mapping[str, Any]]) -> EvaluationView | None:
    """The run's last federated evaluation (evaluation.json; who did not report and why from the
    same round's last evaluate event of rounds.jsonl, `absent_by_round`): per (site, task) its
    metric with its interval or why it is withheld, each task's federation-wide AUROC, the forest
    plot's points."""
    path = out_dir / EVALUATION_FILE
    if not path.is_file():
        return None
    evaluation = read_json(path)
    absent = {str(s): str(why) for s, why in (absent_by_round.get(evaluation.get("round")) or {}).items()}
    keys, per_site, asked = replies_from_event(evaluation)
    pooled = {str(k): FederationAUROC.model_validate(f) for k, f in (evaluation.get("federation") or {}).items()}
    rows = [ResultRow(*row) for row in outcome_rows(keys, per_site, asked, absent)]
    points = forest_points(keys, per_site, pooled, sorted(set(asked) | set(absent)))
    return EvaluationView(
        round=int(evaluation.get("round", 0)),
        rows=rows,
        federation={k: f.describe() for k, f in pooled.items()},
        points=points,
        pooled_sites={k: f.per_site for k, f in pooled.items() if f.per_site},
    )


def run_status(outcome: RunOutcome | None, launch: Launch, resume: Callable[[Path], str]) -> tuple[str, str, str]:
    """(status, one line, the resume command) of a launch, settled as `status` settles it but
    without writing: a `running` run whose ServerApp is gone is shown interrupted."""
    if outcome is None or outcome.run_id != launch.run_id:
        return "not started", "no outcome recorded for this run yet (or a later run of this out-dir)", ""
    if outcome.status == "running":
        gone = serverapp_gone(launch.out_dir, launch.run_id)
        if gone is not None:
            command = resume(launch.out_dir)
            shown = outcome.model_copy(update={"status": "interrupted", "reason": gone, "resume": command})
            return "interrupted", shown.describe(), command
    command = (outcome.resume or resume(launch.out_dir)) if outcome.status == "interrupted" else ""
    return outcome.status, outcome.model_copy(update={"resume": command}).describe(), command


@dataclass
class _Tally:
    """What a run's rounds add up to, added in round order."""

    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    state_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    latest: dict[str, SiteLatest] = field(default_factory=dict)
    trained_last: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, list[str]] = field(default_factory=dict)  # the last REFUSALS_SHOWN
    refusals_before: dict[str, int] = field(default_factory=dict)

    def add(self, rnd: RoundView, run_id: int) -> None:
        self.rounds += 1
        self.bytes_sent += rnd.bytes_sent
        self.bytes_received += rnd.bytes_received
        for name, entry in rnd.sites.items():
            counts = self.state_counts.setdefault(name, {})
            counts[entry.state] = counts.get(entry.state, 0) + 1
            self.latest[name] = SiteLatest(run_id, rnd.round, entry.state, entry.reason)
            if entry.state == "ok":
                self.trained_last[name] = rnd.round
            elif entry.state in ("refusing", "rejected"):
                said = self.refusals.setdefault(name, [])
                said.append(f"run {run_id} round {rnd.round}: {entry.state}: {entry.reason}")
                if len(said) > REFUSALS_SHOWN:
                    del said[0]
                    self.refusals_before[name] = self.refusals_before.get(name, 0) + 1

    def copy(self) -> _Tally:
        return _Tally(
            self.rounds, self.bytes_sent, self.bytes_received,
            {k: dict(v) for k, v in self.state_counts.items()}, dict(self.latest), dict(self.trained_last),
            {k: list(v) for k, v in self.refusals.items()}, dict(self.refusals_before),
        )  # fmt: skip


@dataclass
class _Segment:
    """One run's part of rounds.jsonl: from its setup/resume event to the next run's."""

    run_id: int
    refused_setup: dict[str, str] = field(default_factory=dict)
    window: dict[int, RoundView] = field(default_factory=dict)  # its last rounds (a re-run round: the last one)
    settled: _Tally = field(default_factory=_Tally)  # the rounds before the window
    floor: int | None = None  # the last settled round
    problems: list[str] = field(default_factory=list)


@dataclass
class _RoundsFold:
    """rounds.jsonl as the runs panel reads it, folded event by event: per run its last `kept`
    rounds whole and the sums of those before (None: every round, until the first trim(), so
    that a file read from its start is sorted whole, whatever the order of its rounds)."""

    path: Path
    kept: int | None = None
    runs: dict[int, _Segment] = field(default_factory=dict)
    current: _Segment | None = None
    planned: int = 0  # the largest `rounds` of a round event
    absent: dict[int, dict[str, Any]] = field(default_factory=dict)  # evaluated round -> its last event's absent
    stale: bool = False  # a round before a run's window came (again): fold the file anew with kept None

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("setup", "resume") and event.get("run_id") is not None:
            run_id = event["run_id"]
            if self.current is None or self.current.run_id != run_id:
                # A run's part is its first one: a later setup of it starts nothing shown.
                self.current = None if run_id in self.runs else self.runs.setdefault(run_id, _Segment(run_id))
        if kind == "round":
            self.planned = max(self.planned, _count(event.get("rounds")))
        elif kind == "evaluate":
            key = event.get("round")
            if isinstance(key, int):
                self.absent.pop(key, None)
                self.absent[key] = dict(event.get("absent") or {})
            while len(self.absent) > EVALUATIONS_KEPT:
                del self.absent[next(iter(self.absent))]
        run = self.current
        if run is None:
            return
        read = _round_or_problem(event)
        if isinstance(read, RoundView):
            if run.floor is not None and read.round <= run.floor:
                self.stale = True
            run.window[read.round] = read
            self._settle()
        elif read is not None:
            run.problems.append(f"{self.path}: {read}")
        elif kind in ("setup", "resume"):
            run.refused_setup.update({str(s): str(r) for s, r in (event.get("refused") or {}).items()})

    def trim(self) -> _RoundsFold:
        """From here on, each run's last ROUNDS_KEPT rounds held whole, the others summed."""
        self.kept = ROUNDS_KEPT
        self._settle()
        return self

    def _settle(self) -> None:
        for run in self.runs.values():
            while self.kept is not None and len(run.window) > self.kept:
                first = min(run.window)
                run.settled.add(run.window.pop(first), run.run_id)
                run.floor = first

    def run_parts(self, run_id: int) -> tuple[_Segment, _Tally, list[RoundView], int, dict[int, dict[str, Any]]] | None:
        """(the run's part, its tally over every round, its rounds in order, planned, absent); None: stale."""
        if self.stale:
            return None
        run = self.runs.get(run_id) or _Segment(run_id)
        tally = run.settled.copy()
        ordered = [run.window[r] for r in sorted(run.window)]
        for rnd in ordered:
            tally.add(rnd, run_id)
        part = _Segment(run_id, dict(run.refused_setup), problems=list(run.problems))
        return part, tally, ordered, self.planned, {k: dict(v) for k, v in self.absent.items()}


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _rounds_fold(path: Path) -> tuple[str, Callable[[], _RoundsFold], Callable[[_RoundsFold, dict[str, Any]], None]]:
    return "rounds", partial(_RoundsFold, path), _RoundsFold.add


def _rounds_of(path: Path, run_id: int, files: RunFiles) -> Any:
    """The run's part of rounds.jsonl (_RoundsFold.run_parts); a round recorded again after it
    left the window (a resume from an old checkpoint) has the file folded anew, whole, then trimmed."""
    for _ in range(2):
        parts = files.fold(
            path, "rounds", partial(_RoundsFold, path), _RoundsFold.add, lambda f: f.trim().run_parts(run_id)
        )
        if parts is not None or not path.is_file():
            return parts
        files.forget(path, "rounds")
    return None


RUN_FILES = (
    ROUNDS_FILE,
    OUTCOME_FILE,
    AUDIT_FILE,
    anchor_path(AUDIT_FILE).name,
    EVALUATION_FILE,
    CLAIM_FILE,
    LIVE_FILE,
)


def run_view(launch: Launch, all_runs: list[int], resume: Callable[[Path], str], files: RunFiles) -> RunView:
    """One run: its outcome, rounds, round in flight, evaluation and audit chain, from its out-dir;
    read again only when one of its files changed (and, while it says it runs, every RECHECK_S:
    its ServerApp may be gone without a word)."""
    out = launch.out_dir
    try:
        outcome, problem = read_outcome(out), ""
    except ValueError as err:
        outcome, problem = None, str(err)
    running = outcome is not None and outcome.status == "running"
    version = (
        tuple(all_runs), *(stat_key(out / name) for name in RUN_FILES), int(time.time() // RECHECK_S) if running else 0,
    )  # fmt: skip
    return files.memo(("run", launch), version, lambda: _run_view(launch, all_runs, resume, files, outcome, problem))


def _run_view(
    launch: Launch,
    all_runs: list[int],
    resume: Callable[[Path], str],
    files: RunFiles,
    outcome: RunOutcome | None,
    problem: str,
) -> RunView:
    out = launch.out_dir
    problems = [problem] if problem else []
    status, line, command = run_status(outcome, launch, resume)
    view = RunView(launch=launch, runs_in_out_dir=all_runs, status=status, describe=line, resume=command)
    if outcome is not None and outcome.run_id == launch.run_id:
        view.rounds_done, view.rounds_planned = outcome.rounds_done, outcome.rounds
    parts = _rounds_of(out / ROUNDS_FILE, launch.run_id, files)
    absent: dict[int, dict[str, Any]] = {}
    if parts is not None:
        part, tally, ordered, planned, absent = parts
        problems += part.problems
        view.refused_setup = part.refused_setup
        view.rounds, view.rounds_recorded = ordered[-ROUNDS_SHOWN:], tally.rounds
        view.bytes_sent, view.bytes_received = tally.bytes_sent, tally.bytes_received
        view.state_counts, view.latest, view.trained_last = tally.state_counts, tally.latest, tally.trained_last
        view.refusals, view.refusals_before = tally.refusals, tally.refusals_before
        if view.rounds_planned == 0:
            view.rounds_planned = planned
    if status == "running":
        try:
            view.live = live_view(out, launch.run_id, files)
        except (OSError, ValueError, ValidationError) as err:
            problems.append(f"{out / LIVE_FILE}: not the run's live state ({' '.join(str(err).split())[:300]})")
    try:
        view.evaluation = evaluation_view(out, absent)
    except (OSError, ValueError, TypeError, KeyError) as err:
        problems.append(f"{out / EVALUATION_FILE}: not an evaluation ({' '.join(str(err).split())[:300]})")
    view.audit = audit_view(out / AUDIT_FILE, files)
    view.problems = problems
    return view


@dataclass
class _Curve:
    """A DP site's epsilon points of one file: every `stride`-th kept (at most PLOT_POINTS), the last always."""

    count: int = 0
    stride: int = 1
    kept: list[EpsilonPoint] = field(default_factory=list)  # number: its place in the file
    last: EpsilonPoint | None = None

    def add(self, point: EpsilonPoint) -> None:
        self.count += 1
        self.last = replace(point, number=self.count)
        if (self.count - 1) % self.stride == 0:
            self.kept.append(self.last)
        if len(self.kept) > PLOT_POINTS:
            self.stride *= 2
            self.kept = [p for p in self.kept if (p.number - 1) % self.stride == 0]

    def points(self) -> list[EpsilonPoint]:
        return self.kept + ([self.last] if self.last is not None and self.last is not self.kept[-1] else [])


@dataclass
class _FilePrivacy:
    """What one rounds file says of each DP site's spend, folded event by event."""

    launch: Launch
    points: dict[str, _Curve] = field(default_factory=dict)
    delta: dict[str, float | None] = field(default_factory=dict)  # as of its last round trained
    noise: dict[str, float | None] = field(default_factory=dict)
    cap: dict[str, float | None] = field(default_factory=dict)  # its last reported (None: never)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)  # rounds refused, and the last
    new_budget: dict[str, str] = field(default_factory=dict)
    asked: tuple[str, float | None] | None = None  # the server's request, described, and its target

    def add_point(self, site: str, eps: float, label: str, event: Mapping[str, Any]) -> None:
        point = EpsilonPoint(_number(event.get("time")) or 0.0, eps, label, self.launch.kind)
        self.points.setdefault(site, _Curve()).add(point)

    def add(self, event: dict[str, Any]) -> None:
        launch = self.launch
        if event.get("event") == "round":
            privacy = event.get("privacy") or {}
            if privacy.get("target_epsilon") is not None or privacy.get("noise_multiplier") is not None:
                asked = ", ".join(f"{k} {v:g}" for k, v in privacy.items() if isinstance(v, (int, float)))
                self.asked = (asked, _number(privacy.get("target_epsilon")))
            for site, entry in (event.get("sites") or {}).items():
                dp = entry.get("dp") or {}
                eps = _number(dp.get("epsilon"))
                if eps is None:
                    continue
                label = f"run {launch.run_id} round {event.get('round')}"
                if dp.get("epsilon_cap") is not None or site not in self.cap:
                    self.cap[site] = _number(dp.get("epsilon_cap"))  # None from sites that predate it
                if entry.get("status") == "refused":
                    self.refused[site] = (self.refused.get(site, (0, ""))[0] + 1, label)
                    continue
                self.add_point(site, eps, label, event)
                self.delta[site], self.noise[site] = _number(dp.get("delta")), _number(dp.get("noise_multiplier"))
                if dp.get("new_budget_at") is not None:
                    self.new_budget[site] = (
                        f"ledger started anew at {dp['new_budget_at']:.0f} (replaced epsilon {dp.get('replaced_epsilon')})"
                    )
        elif event.get("event") == "head_round":
            for site, spent in (event.get("epsilon") or {}).items():
                eps = _number(spent.get("epsilon"))
                if eps is None:
                    continue
                self.add_point(
                    site, eps, f"head run {launch.run_id} {event.get('key')} round {event.get('round')}", event
                )
                self.delta[site] = _number(spent.get("delta"))

    def copy(self) -> _FilePrivacy:
        return _FilePrivacy(
            self.launch, {k: _Curve(c.count, c.stride, list(c.kept), c.last) for k, c in self.points.items()},
            dict(self.delta), dict(self.noise), dict(self.cap), dict(self.refused), dict(self.new_budget), self.asked,
        )  # fmt: skip


def _curve(curves: list[_Curve]) -> list[EpsilonPoint]:
    """A site's points over its files, numbered among all its DP rounds, in the order the rounds
    ended; at most about PLOT_POINTS of them, the last always. Where every point is held, they are
    ordered by time across the files; where a file's were thinned, file after file (by its first)."""
    if all(c.stride == 1 for c in curves) and sum(c.count for c in curves) <= PLOT_POINTS:
        every = sorted((p for c in curves for p in c.points()), key=lambda p: p.time)
        return [replace(p, number=i) for i, p in enumerate(every, 1)]
    held: list[tuple[EpsilonPoint, int]] = []  # (point, the DP rounds of the files before its)
    before = 0
    for c in sorted(curves, key=lambda c: c.points()[0].time if c.count else 0.0):
        held += [(p, before) for p in c.points()]
        before += c.count
    step = max(1, len(held) // PLOT_POINTS)
    return [replace(p, number=p.number + b) for i, (p, b) in enumerate(held) if i % step == 0 or i == len(held) - 1]


def privacy_views(launches: Sequence[Launch], files: RunFiles | None = None) -> list[PrivacyView]:
    """Each DP site's cumulative epsilon after every round it trained under DP, pretraining rounds
    (rounds.jsonl) and task-head rounds (head_rounds.jsonl) together: both spend from the site's
    one durable ledger, so both lie on one curve. A round the site refused spent nothing (its
    ledger reserves a round only when it trains): its reply's spend is the one before, it is no
    point of the curve, and the delta and noise stay those of its last round trained."""
    files = files if files is not None else RunFiles()
    version = tuple(stat_key(path) for path, _ in _privacy_files(launches))
    return files.memo(("privacy", tuple(launches)), version, partial(_privacy_views, launches, files))


def _privacy_files(launches: Sequence[Launch]) -> list[tuple[Path, Launch]]:
    """Each rounds file with DP spends once, with the first launch that names it (its labels')."""
    first: dict[Path, Launch] = {}
    for launch in launches:
        first.setdefault(launch.out_dir / (ROUNDS_FILE if launch.kind == "pretraining" else HEAD_ROUNDS_FILE), launch)
    return list(first.items())


def _privacy_fold(
    launch: Launch,
) -> tuple[Any, Callable[[], _FilePrivacy], Callable[[_FilePrivacy, dict[str, Any]], None]]:
    return ("privacy", launch), partial(_FilePrivacy, launch), _FilePrivacy.add


def _privacy_views(launches: Sequence[Launch], files: RunFiles) -> list[PrivacyView]:
    curves: dict[str, list[_Curve]] = {}
    refused: dict[str, tuple[int, str]] = {}
    delta: dict[str, float | None] = {}
    noise: dict[str, float | None] = {}
    caps: dict[str, float | None] = {}
    new_budget: dict[str, str] = {}
    asked, target = "no DP asked by the server", None
    for path, launch in _privacy_files(launches):
        part = files.fold(path, *_privacy_fold(launch), _FilePrivacy.copy)
        if part is None:
            continue
        for site, curve in part.points.items():
            curves.setdefault(site, []).append(curve)
        for site, (count, last) in part.refused.items():
            refused[site] = (refused.get(site, (0, ""))[0] + count, last)
        for site, cap in part.cap.items():
            if cap is not None or site not in caps:
                caps[site] = cap
        delta.update(part.delta)
        noise.update(part.noise)
        new_budget.update(part.new_budget)
        if part.asked is not None:
            asked, target = part.asked
    return [
        PrivacyView(
            site=site,
            points=_curve(parts),
            delta=delta.get(site),
            noise_multiplier=noise.get(site),
            asked=asked,
            target_epsilon=target,
            new_budget=new_budget.get(site, ""),
            epsilon_cap=caps.get(site),
            refused=[refused[site][1]] if site in refused else [],
            dp_rounds=sum(c.count for c in parts),
            refused_count=refused.get(site, (0, ""))[0],
        )
        for site, parts in sorted(curves.items())
    ]


def site_views(
    registry: SiteRegistry,
    runs: Sequence[RunView],
    privacy: Sequence[PrivacyView],
    provisioned: Sequence[str] = (),
) -> list[SiteView]:
    """The registered sites, then those provisioned but not registered yet, with what the runs
    (newest launch first) say of each: the runs it trained in, its last round trained, its part in
    the newest run's latest round that names it, its refusals and whether it trains under DP."""
    sites = {s.name: SiteView(name=s.name, node_id=s.node_id) for s in registry.sites}
    for name in provisioned:
        sites.setdefault(name, SiteView(name=name, node_id=0, registered=False))
    dp_sites = {p.site for p in privacy}
    refusals: dict[str, list[str]] = {}
    before: dict[str, int] = {}  # refusals and rejections not listed by their runs
    for run in reversed(runs):  # launch order
        for name, reason in run.refused_setup.items():
            refusals.setdefault(name, []).append(f"run {run.launch.run_id} setup: {reason}")
        for name, said in run.refusals.items():
            refusals.setdefault(name, []).extend(said)
        for name, count in run.refusals_before.items():
            before[name] = before.get(name, 0) + count
        for name, rnd in run.trained_last.items():
            if name in sites:
                sites[name].last_trained = f"run {run.launch.run_id}, round {rnd}"
                if run.launch.run_id not in sites[name].trained_runs:
                    sites[name].trained_runs.append(run.launch.run_id)
        for name, latest in run.latest.items():
            if name in sites:
                sites[name].latest = latest
    for name, site in sites.items():
        said = refusals.get(name, [])
        site.refusals = said[-REFUSALS_SHOWN:]
        site.refusals_more = before.get(name, 0) + max(0, len(said) - REFUSALS_SHOWN)
        site.dp = name in dp_sites
    return list(sites.values())


def setup_modalities(out_dirs: Sequence[Path], files: RunFiles) -> dict[str, list[str]]:
    """Each site's modalities, from the latest setup or resume event that names it."""
    found: dict[tuple[float, str], list[str]] = {}
    for out in out_dirs:
        path = out / ROUNDS_FILE
        found.update(files.fold(path, *_MODALITIES_FOLD, dict) or {})
    out_map: dict[str, list[str]] = {}
    for (_, site), modalities in sorted(found.items()):
        out_map[site] = modalities
    return out_map


def _add_modalities(found: dict[tuple[float, str], list[str]], event: dict[str, Any]) -> None:
    """A file's latest (time, site) -> modalities of each site (a tie: the later event's)."""
    if event.get("event") in ("setup", "resume"):
        at = _number(event.get("time")) or 0.0
        for site, caps in (event.get("sites") or {}).items():
            held = next((t for t, s in found if s == site), None)
            if held is None or at >= held:
                if held is not None:
                    del found[(held, site)]
                found[(at, site)] = list(caps.get("modalities") or [])


_MODALITIES_FOLD = ("modalities", dict, _add_modalities)


def release_view(path: Path) -> ReleaseView:
    """A release folder's model card (model_card.json, written by `coordinator release`)."""
    try:
        card = read_json(path / MODEL_CARD_FILE)
        return ReleaseView(
            path=path,
            run_id=str(card["run"]["run_id"]),
            model=str(card["model"]["name"]),
            setup_sha256=str(card["model"]["setup_sha256"]),
            rounds=int(card["run"]["rounds_done"]),
            epsilon={str(k): float(v) for k, v in (card["privacy"]["epsilon_per_site"] or {}).items()},
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        return ReleaseView(path=path, problem=f"{path / MODEL_CARD_FILE}: not a model card ({err})")


def federation_view(
    root: Path,
    launches: Sequence[Launch],
    resume: Callable[[Path], str],
    releases: Sequence[Path] = (),
    problems: Sequence[str] = (),
    files: RunFiles | None = None,
) -> FederationView:
    """Everything the page shows. `launches`: launches.jsonl's, oldest first (the caller reads
    them: server.deploy.launches.read_launches); the head runs are found here. `problems`: the
    caller's, shown first (e.g. launches.jsonl does not parse). `files`: the dashboard's parsed
    files (each parsed once per change)."""
    files = files if files is not None else RunFiles()
    server_dir = root / "server"
    problems = list(problems)
    try:
        registry = read_registry(server_dir / "registry.json")
    except RegistryError as err:
        registry = SiteRegistry()
        problems.append(str(err))
    try:
        provisioned = read_manifest(root).site_names()
    except ProvisionError as err:
        provisioned, problems = [], [*problems, str(err)]
    every = [*launches, *read_head_launches(server_dir)]
    by_dir: dict[Path, list[int]] = {}
    for launch in every:
        by_dir.setdefault(launch.out_dir, []).append(launch.run_id)
    # Every fold of a rounds file known before the first is read: each file parsed once for all.
    for path, launch in _privacy_files(every):
        files.register(path, *_privacy_fold(launch))
    for launch in launches:
        files.register(launch.out_dir / ROUNDS_FILE, *_MODALITIES_FOLD)
        files.register(launch.out_dir / ROUNDS_FILE, *_rounds_fold(launch.out_dir / ROUNDS_FILE))
    runs: list[RunView] = []
    for launch in reversed(launches):  # newest launch first: Flower's run ids are random
        try:
            run = run_view(launch, by_dir[launch.out_dir], resume, files)
        except (OSError, ValueError) as err:  # e.g. a file the coordinator cannot read
            problems.append(f"run {launch.run_id} ({launch.out_dir}): {err}")
            continue
        # A page of weeks of runs stays the size of a few: older runs' tables are in their files.
        shown = len(runs) < TABLES_SHOWN or run.status == "running"
        runs.append(
            run if shown else replace(run, rounds=[], evaluation=None, evaluation_elsewhere=run.evaluation is not None)
        )
    try:
        privacy = privacy_views(every, files)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        privacy, problems = [], [*problems, f"privacy: a DP record does not parse ({err})"]
    sites = site_views(registry, runs, privacy, provisioned)
    modalities = setup_modalities(list(dict.fromkeys(launch.out_dir for launch in launches)), files)
    for site in sites:
        site.modalities = modalities.get(site.name, [])
    bundles = [
        (p.name, files.memo(("sha256", p), stat_key(p), partial(sha256_file, p)))
        for p in sorted(server_dir.glob("*.fab"))
    ]
    files.sweep()  # what this page did not ask for: runs no longer launched, files gone
    return FederationView(
        root=root,
        sites=sites,
        runs=runs,
        privacy=privacy,
        releases=[release_view(Path(p)) for p in releases],
        bundles=bundles,
        problems=problems,
    )


def watched_files(root: Path, launches: Sequence[Launch], releases: Sequence[Path] = ()) -> list[Path]:
    """The files whose change changes the page (their sizes and times are its version)."""
    server_dir = root / "server"
    files = [root / "federation.json", server_dir / "registry.json", server_dir / "launches.jsonl"]
    files += [server_dir / "run-configs", server_dir]  # head runs' configs; app bundles built
    for launch in [*launches, *read_head_launches(server_dir)]:
        # the claim: a ServerApp that took the out-dir over or gave it back
        files += [launch.out_dir / n for n in (*RUN_FILES, HEAD_ROUNDS_FILE)]
    files += [Path(p) / MODEL_CARD_FILE for p in releases]
    return list(dict.fromkeys(files))
