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
(files.py); a run's table holds its last ROUNDS_SHOWN rounds, its totals count every round.
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
    refusals: dict[str, list[str]] = field(default_factory=dict)  # site -> its refusals and rejections, in order
    live: LiveView | None = None  # the round in flight (a running run)
    evaluation_elsewhere: bool = False  # an older run's evaluation: in its evaluation.json, not on the page


@dataclass
class EpsilonPoint:
    time: float
    epsilon: float
    label: str  # "run 7 round 2", "head run 9 onset_t2d round 4"
    kind: str  # "pretraining" or "task head"


@dataclass
class PrivacyView:
    site: str
    points: list[EpsilonPoint]  # the rounds it trained under DP: the rounds its ledger counts
    delta: float | None
    noise_multiplier: float | None
    asked: str  # what the server asked (the run's privacy request), described
    target_epsilon: float | None
    new_budget: str = ""  # the site's admin started its ledger anew: when, and what it replaced
    epsilon_cap: float | None = None  # its policy's cap, as its latest pretraining reply gave it
    refused: list[str] = field(default_factory=list)  # rounds it refused (nothing trained, nothing spent)


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
    state = files.memo(("live", path, key), lambda: LiveState.model_validate_json(path.read_bytes()))
    if state.run_id != run_id or state.phase == ENDED:
        return None
    return LiveView(state=state, few_holders=few_holders(state.groups))


def evaluation_view(out_dir: Path, events: Sequence[Mapping[str, Any]]) -> EvaluationView | None:
    """The run's last federated evaluation (evaluation.json; who did not report and why from the
    same round's evaluate event of rounds.jsonl): per (site, task) its metric with its interval or
    why it is withheld, each task's federation-wide AUROC, the forest plot's points."""
    path = out_dir / EVALUATION_FILE
    if not path.is_file():
        return None
    evaluation = read_json(path)
    same_round = [e for e in events if e.get("event") == "evaluate" and e.get("round") == evaluation.get("round")]
    absent = {str(s): str(why) for s, why in ((same_round[-1].get("absent") if same_round else None) or {}).items()}
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
    key = (
        "run", launch, tuple(all_runs), *(stat_key(out / name) for name in RUN_FILES),
        int(time.time() // RECHECK_S) if running else 0,
    )  # fmt: skip
    return files.memo(key, lambda: _run_view(launch, all_runs, resume, files, outcome, problem))


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
    events = files.events(out / ROUNDS_FILE)
    # The run's own events: from its setup/resume event on (an out-dir's earlier runs came before).
    starts = [i for i, e in enumerate(events) if e.get("event") in ("setup", "resume") and e.get("run_id") is not None]
    mine = [i for i in starts if events[i].get("run_id") == launch.run_id]
    # From its own setup/resume event to the next run's; a run not yet through round 0 has none.
    begin, end = 0, 0
    if mine:
        begin = mine[0]
        later = [i for i in starts if i > begin and events[i].get("run_id") != launch.run_id]
        end = later[0] if later else len(events)
    rounds: dict[int, RoundView] = {}
    views = files.mapped(out / ROUNDS_FILE, _round_or_problem)  # each event's, read once
    for event, read in zip(events[begin:end], views[begin:end], strict=False):  # a line between the reads: next time
        if isinstance(read, RoundView):
            rounds[read.round] = read  # a re-run round: the last one
        elif read is not None:
            problems.append(f"{out / ROUNDS_FILE}: {read}")
        elif event.get("event") in ("setup", "resume"):
            view.refused_setup.update({str(s): str(r) for s, r in (event.get("refused") or {}).items()})
    ordered = [rounds[r] for r in sorted(rounds)]
    view.rounds, view.rounds_recorded = ordered[-ROUNDS_SHOWN:], len(ordered)
    for rnd in ordered:
        view.bytes_sent += rnd.bytes_sent
        view.bytes_received += rnd.bytes_received
        for name, entry in rnd.sites.items():
            counts = view.state_counts.setdefault(name, {})
            counts[entry.state] = counts.get(entry.state, 0) + 1
            view.latest[name] = SiteLatest(launch.run_id, rnd.round, entry.state, entry.reason)
            if entry.state == "ok":
                view.trained_last[name] = rnd.round
            elif entry.state in ("refusing", "rejected"):
                view.refusals.setdefault(name, []).append(
                    f"run {launch.run_id} round {rnd.round}: {entry.state}: {entry.reason}"
                )
    if view.rounds_planned == 0 and events:
        view.rounds_planned = max((int(e.get("rounds") or 0) for e in events if e.get("event") == "round"), default=0)
    if status == "running":
        try:
            view.live = live_view(out, launch.run_id, files)
        except (OSError, ValueError, ValidationError) as err:
            problems.append(f"{out / LIVE_FILE}: not the run's live state ({' '.join(str(err).split())[:300]})")
    try:
        view.evaluation = evaluation_view(out, events)
    except (OSError, ValueError, TypeError, KeyError) as err:
        problems.append(f"{out / EVALUATION_FILE}: not an evaluation ({' '.join(str(err).split())[:300]})")
    view.audit = audit_view(out / AUDIT_FILE, files)
    view.problems = problems
    return view


@dataclass
class _FilePrivacy:
    """What one rounds file says of each DP site's spend, read once per change of the file."""

    points: dict[str, list[EpsilonPoint]] = field(default_factory=dict)
    delta: dict[str, float | None] = field(default_factory=dict)  # as of its last round trained
    noise: dict[str, float | None] = field(default_factory=dict)
    cap: dict[str, float | None] = field(default_factory=dict)  # its last reported (None: never)
    refused: dict[str, list[str]] = field(default_factory=dict)
    new_budget: dict[str, str] = field(default_factory=dict)
    asked: tuple[str, float | None] | None = None  # the server's request, described, and its target


def _file_privacy(launch: Launch, path: Path, files: RunFiles) -> _FilePrivacy:
    out = _FilePrivacy()

    def add(site: str, eps: float, label: str, event: Mapping[str, Any]) -> None:
        out.points.setdefault(site, []).append(EpsilonPoint(_number(event.get("time")) or 0.0, eps, label, launch.kind))

    for event in files.events(path):
        if event.get("event") == "round":
            privacy = event.get("privacy") or {}
            if privacy.get("target_epsilon") is not None or privacy.get("noise_multiplier") is not None:
                asked = ", ".join(f"{k} {v:g}" for k, v in privacy.items() if isinstance(v, (int, float)))
                out.asked = (asked, _number(privacy.get("target_epsilon")))
            for site, entry in (event.get("sites") or {}).items():
                dp = entry.get("dp") or {}
                eps = _number(dp.get("epsilon"))
                if eps is None:
                    continue
                label = f"run {launch.run_id} round {event.get('round')}"
                if dp.get("epsilon_cap") is not None or site not in out.cap:
                    out.cap[site] = _number(dp.get("epsilon_cap"))  # None from sites that predate it
                if entry.get("status") == "refused":
                    out.refused.setdefault(site, []).append(label)
                    continue
                add(site, eps, label, event)
                out.delta[site], out.noise[site] = _number(dp.get("delta")), _number(dp.get("noise_multiplier"))
                if dp.get("new_budget_at") is not None:
                    out.new_budget[site] = (
                        f"ledger started anew at {dp['new_budget_at']:.0f} (replaced epsilon {dp.get('replaced_epsilon')})"
                    )
        elif event.get("event") == "head_round":
            for site, spent in (event.get("epsilon") or {}).items():
                eps = _number(spent.get("epsilon"))
                if eps is None:
                    continue
                add(site, eps, f"head run {launch.run_id} {event.get('key')} round {event.get('round')}", event)
                out.delta[site] = _number(spent.get("delta"))
    return out


def privacy_views(launches: Sequence[Launch], files: RunFiles | None = None) -> list[PrivacyView]:
    """Each DP site's cumulative epsilon after every round it trained under DP, pretraining rounds
    (rounds.jsonl) and task-head rounds (head_rounds.jsonl) together: both spend from the site's
    one durable ledger, so both lie on one curve. A round the site refused spent nothing (its
    ledger reserves a round only when it trains): its reply's spend is the one before, it is no
    point of the curve, and the delta and noise stay those of its last round trained."""
    files = files if files is not None else RunFiles()
    total = _FilePrivacy()
    asked, target = "no DP asked by the server", None
    seen: set[tuple[Path, str]] = set()
    for launch in launches:
        name = ROUNDS_FILE if launch.kind == "pretraining" else HEAD_ROUNDS_FILE
        path = launch.out_dir / name
        if (launch.out_dir, name) in seen:
            continue
        seen.add((launch.out_dir, name))
        key = ("privacy", launch, path, stat_key(path))
        part = files.memo(key, partial(_file_privacy, launch, path, files))
        for site, pts in part.points.items():
            total.points.setdefault(site, []).extend(pts)
        for site, labels in part.refused.items():
            total.refused.setdefault(site, []).extend(labels)
        for site, cap in part.cap.items():
            if cap is not None or site not in total.cap:
                total.cap[site] = cap
        total.delta.update(part.delta)
        total.noise.update(part.noise)
        total.new_budget.update(part.new_budget)
        if part.asked is not None:
            asked, target = part.asked
    return [
        PrivacyView(
            site=site,
            points=sorted(pts, key=lambda p: p.time),
            delta=total.delta.get(site),
            noise_multiplier=total.noise.get(site),
            asked=asked,
            target_epsilon=target,
            new_budget=total.new_budget.get(site, ""),
            epsilon_cap=total.cap.get(site),
            refused=total.refused.get(site, []),
        )
        for site, pts in sorted(total.points.items())
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
    for run in reversed(runs):  # launch order
        for name, reason in run.refused_setup.items():
            refusals.setdefault(name, []).append(f"run {run.launch.run_id} setup: {reason}")
        for name, said in run.refusals.items():
            refusals.setdefault(name, []).extend(said)
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
        site.refusals, site.refusals_more = said[-REFUSALS_SHOWN:], max(0, len(said) - REFUSALS_SHOWN)
        site.dp = name in dp_sites
    return list(sites.values())


def setup_modalities(out_dirs: Sequence[Path], files: RunFiles) -> dict[str, list[str]]:
    """Each site's modalities, from the latest setup or resume event that names it."""
    found: dict[tuple[float, str], list[str]] = {}
    for out in out_dirs:
        path = out / ROUNDS_FILE
        found.update(files.memo(("modalities", path, stat_key(path)), partial(_setup_modalities, path, files)))
    out_map: dict[str, list[str]] = {}
    for (_, site), modalities in sorted(found.items()):
        out_map[site] = modalities
    return out_map


def _setup_modalities(path: Path, files: RunFiles) -> dict[tuple[float, str], list[str]]:
    found = {}
    for event in files.events(path):
        if event.get("event") in ("setup", "resume"):
            for site, caps in (event.get("sites") or {}).items():
                found[(float(event.get("time", 0)), site)] = list(caps.get("modalities") or [])
    return found


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
        (p.name, files.memo(("sha256", p, stat_key(p)), partial(sha256_file, p)))
        for p in sorted(server_dir.glob("*.fab"))
    ]
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
