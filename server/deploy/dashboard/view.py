"""What the dashboard shows, read from the files the coordinator holds (never written to).

FED/server/registry.json (the sites, server.deploy.registry), launches.jsonl (each launch's run id
and out-dir, read by the caller with server.deploy.commands.read_launches), run-configs/head-
run-*.toml (each task-head run's out-dir), and per run: rounds.jsonl (server.runlog.read_events),
outcome.json (server.outcome.read_outcome), audit.jsonl (server.audit.read_audit_log: the chain
verified), evaluation.json; per release given: model_card.json. Every figure on the page is one a
run already records: counts, statuses, reasons, timings, bytes, epsilons, metrics with their
intervals. A file that does not parse is named on the page with its error, never guessed around.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthfm_core.eval.federation_auroc import FederationAUROC, PooledSite
from healthfm_core.eval.outcomes import outcome_rows, replies_from_event
from healthfm_core.eval.plots import IntervalPoint
from healthfm_core.strict_files import read_json
from server.audit import AUDIT_FILE, AuditLogError, read_audit_log
from server.deploy.registry import RegistryError, SiteRegistry, read_registry
from server.head_app import ROUNDS_FILE as HEAD_ROUNDS_FILE
from server.outcome import RunOutcome, read_outcome
from server.run_claim import CLAIM_FILE, serverapp_gone
from server.runlog import forest_points, read_events

EVALUATION_FILE = "evaluation.json"
MODEL_CARD_FILE = "model_card.json"


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
    status: str  # ok, no reply, refused, rejected, error, absent, ...
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


@dataclass
class AuditView:
    ok: bool
    records: int = 0
    problem: str = ""  # where the chain breaks, or why it cannot be read


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
    rounds: list[RoundView] = field(default_factory=list)
    refused_setup: dict[str, str] = field(default_factory=dict)
    evaluation: EvaluationView | None = None
    audit: AuditView | None = None
    problems: list[str] = field(default_factory=list)  # files that do not parse, named


@dataclass
class EpsilonPoint:
    time: float
    epsilon: float
    label: str  # "run 7 round 2", "head run 9 onset_t2d round 4"
    kind: str  # "pretraining" or "task head"


@dataclass
class PrivacyView:
    site: str
    points: list[EpsilonPoint]
    delta: float | None
    noise_multiplier: float | None
    asked: str  # what the server asked (the run's privacy request), described
    target_epsilon: float | None
    new_budget: str = ""  # the site's admin started its ledger anew: when, and what it replaced
    epsilon_cap: float | None = None  # its policy's cap, as its latest pretraining reply gave it


@dataclass
class SiteView:
    name: str
    node_id: int
    modalities: list[str] = field(default_factory=list)
    trained_runs: list[int] = field(default_factory=list)  # runs it trained in: it ran their bundle
    last_trained: str = ""
    refusals: list[str] = field(default_factory=list)
    dp: bool = False


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
        reasons = [r for s, r in rejected if s == name]
        reason = "; ".join(reasons) if reasons else str(entry.get("reason") or "")
        sites[name] = SiteRound(
            status="rejected" if reasons and status != "ok" else status,
            reason=reason,
            bytes_sent=int(entry.get("bytes_sent") or 0),
            bytes_received=int(entry.get("bytes_received") or 0),
        )
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
    )


def audit_view(path: Path) -> AuditView | None:
    """The audit chain verified (server.audit.read_audit_log), or where it breaks."""
    if not path.is_file():
        return None
    records = 0
    try:
        for _ in read_audit_log(path):
            records += 1
    except (AuditLogError, OSError) as err:
        return AuditView(ok=False, records=records, problem=str(err))
    return AuditView(ok=True, records=records)


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


def run_view(launch: Launch, all_runs: list[int], resume: Callable[[Path], str]) -> RunView:
    """One run: its outcome, rounds, evaluation and audit chain, from its out-dir."""
    out = launch.out_dir
    problems = []
    try:
        outcome = read_outcome(out)
    except ValueError as err:
        outcome, problems = None, [str(err)]
    status, line, command = run_status(outcome, launch, resume)
    view = RunView(launch=launch, runs_in_out_dir=all_runs, status=status, describe=line, resume=command)
    if outcome is not None and outcome.run_id == launch.run_id:
        view.rounds_done, view.rounds_planned = outcome.rounds_done, outcome.rounds
    events = read_events(out / "rounds.jsonl") if (out / "rounds.jsonl").is_file() else []
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
    for event in events[begin:end]:
        try:
            if event.get("event") == "round":
                rounds[int(event["round"])] = round_view(event)  # a re-run round: the last one
            elif event.get("event") in ("setup", "resume"):
                view.refused_setup.update({str(s): str(r) for s, r in (event.get("refused") or {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{out / 'rounds.jsonl'}: a {event.get('event')} event does not parse ({err})")
    view.rounds = [rounds[r] for r in sorted(rounds)]
    if view.rounds_planned == 0 and events:
        view.rounds_planned = max((int(e.get("rounds") or 0) for e in events if e.get("event") == "round"), default=0)
    try:
        view.evaluation = evaluation_view(out, events)
    except (OSError, ValueError, TypeError, KeyError) as err:
        problems.append(f"{out / EVALUATION_FILE}: not an evaluation ({' '.join(str(err).split())[:300]})")
    view.audit = audit_view(out / AUDIT_FILE)
    view.problems = problems
    return view


def privacy_views(launches: Sequence[Launch]) -> list[PrivacyView]:
    """Each DP site's cumulative epsilon after every round it trained under DP, pretraining rounds
    (rounds.jsonl) and task-head rounds (head_rounds.jsonl) together: both spend from the site's
    one durable ledger, so both lie on one curve."""
    points: dict[str, list[EpsilonPoint]] = {}
    delta: dict[str, float | None] = {}
    noise: dict[str, float | None] = {}
    cap: dict[str, float | None] = {}
    new_budget: dict[str, str] = {}
    asked, target = "no DP asked by the server", None
    seen: set[tuple[Path, str]] = set()
    for launch in launches:

        def add(site: str, eps: float, label: str, event: Mapping[str, Any], kind: str = launch.kind) -> None:
            points.setdefault(site, []).append(EpsilonPoint(_number(event.get("time")) or 0.0, eps, label, kind))

        name = "rounds.jsonl" if launch.kind == "pretraining" else HEAD_ROUNDS_FILE
        path = launch.out_dir / name
        if (launch.out_dir, name) in seen or not path.is_file():
            continue
        seen.add((launch.out_dir, name))
        for event in read_events(path):
            if event.get("event") == "round":
                privacy = event.get("privacy") or {}
                if privacy.get("target_epsilon") is not None or privacy.get("noise_multiplier") is not None:
                    target = _number(privacy.get("target_epsilon"))
                    asked = ", ".join(f"{k} {v:g}" for k, v in privacy.items() if isinstance(v, (int, float)))
                for site, entry in (event.get("sites") or {}).items():
                    dp = entry.get("dp") or {}
                    eps = _number(dp.get("epsilon"))
                    if eps is None:
                        continue
                    add(site, eps, f"run {launch.run_id} round {event.get('round')}", event)
                    delta[site], noise[site] = _number(dp.get("delta")), _number(dp.get("noise_multiplier"))
                    cap[site] = _number(dp.get("epsilon_cap"))  # None from sites that predate it
                    if dp.get("new_budget_at") is not None:
                        new_budget[site] = (
                            f"ledger started anew at {dp['new_budget_at']:.0f} (replaced epsilon "
                            f"{dp.get('replaced_epsilon')})"
                        )
            elif event.get("event") == "head_round":
                for site, spent in (event.get("epsilon") or {}).items():
                    eps = _number(spent.get("epsilon"))
                    if eps is None:
                        continue
                    add(site, eps, f"head run {launch.run_id} {event.get('key')} round {event.get('round')}", event)
                    delta[site] = _number(spent.get("delta"))
    return [
        PrivacyView(
            site=site,
            points=sorted(pts, key=lambda p: p.time),
            delta=delta.get(site),
            noise_multiplier=noise.get(site),
            asked=asked,
            target_epsilon=target,
            new_budget=new_budget.get(site, ""),
            epsilon_cap=cap.get(site),
        )
        for site, pts in sorted(points.items())
    ]


def site_views(registry: SiteRegistry, runs: Sequence[RunView], privacy: Sequence[PrivacyView]) -> list[SiteView]:
    """The registered sites, with what the runs say of each: its modalities (its latest setup),
    the runs it trained in, its last round trained, its refusals and whether it trains under DP."""
    sites = {s.name: SiteView(name=s.name, node_id=s.node_id) for s in registry.sites}
    dp_sites = {p.site for p in privacy}
    for run in sorted(runs, key=lambda r: r.launch.run_id):
        for name, reason in run.refused_setup.items():
            if name in sites:
                sites[name].refusals.append(f"run {run.launch.run_id} setup: {reason}")
        for rnd in run.rounds:
            for name, entry in rnd.sites.items():
                if name not in sites:
                    continue
                if entry.status == "ok":
                    sites[name].last_trained = f"run {run.launch.run_id}, round {rnd.round}"
                    if run.launch.run_id not in sites[name].trained_runs:
                        sites[name].trained_runs.append(run.launch.run_id)
                elif entry.status in ("refused", "rejected"):
                    sites[name].refusals.append(
                        f"run {run.launch.run_id} round {rnd.round}: {entry.status}: {entry.reason}"
                    )
    for name, site in sites.items():
        site.dp = name in dp_sites
    return list(sites.values())


def setup_modalities(out_dirs: Sequence[Path]) -> dict[str, list[str]]:
    """Each site's modalities, from the latest setup or resume event that names it."""
    found: dict[tuple[float, str], list[str]] = {}
    for out in out_dirs:
        if not (out / "rounds.jsonl").is_file():
            continue
        for event in read_events(out / "rounds.jsonl"):
            if event.get("event") in ("setup", "resume"):
                for site, caps in (event.get("sites") or {}).items():
                    found[(float(event.get("time", 0)), site)] = list(caps.get("modalities") or [])
    out_map: dict[str, list[str]] = {}
    for (_, site), modalities in sorted(found.items()):
        out_map[site] = modalities
    return out_map


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
) -> FederationView:
    """Everything the page shows. `launches`: launches.jsonl's, oldest first (the caller reads
    them: server.deploy.commands.read_launches); the head runs are found here. `problems`: the
    caller's, shown first (e.g. launches.jsonl does not parse)."""
    server_dir = root / "server"
    problems = list(problems)
    try:
        registry = read_registry(server_dir / "registry.json")
    except RegistryError as err:
        registry = SiteRegistry()
        problems.append(str(err))
    every = [*launches, *read_head_launches(server_dir)]
    by_dir: dict[Path, list[int]] = {}
    for launch in every:
        by_dir.setdefault(launch.out_dir, []).append(launch.run_id)
    runs = []
    for launch in sorted(every, key=lambda x: x.run_id, reverse=True):
        if launch.kind == "pretraining":
            try:
                runs.append(run_view(launch, by_dir[launch.out_dir], resume))
            except (OSError, ValueError) as err:  # e.g. a file the coordinator cannot read
                problems.append(f"run {launch.run_id} ({launch.out_dir}): {err}")
    try:
        privacy = privacy_views(every)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        privacy, problems = [], [*problems, f"privacy: a DP record does not parse ({err})"]
    sites = site_views(registry, runs, privacy)
    modalities = setup_modalities(list(dict.fromkeys(launch.out_dir for launch in launches)))
    for site in sites:
        site.modalities = modalities.get(site.name, [])
    bundles = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(server_dir.glob("*.fab"))]
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
    files = [server_dir / "registry.json", server_dir / "launches.jsonl", server_dir / "run-configs"]
    for launch in [*launches, *read_head_launches(server_dir)]:
        out = launch.out_dir
        files += [out / n for n in ("rounds.jsonl", "outcome.json", AUDIT_FILE, EVALUATION_FILE, HEAD_ROUNDS_FILE)]
        files.append(out / CLAIM_FILE)  # the claim: a ServerApp that took it over or gave it back
    files += [Path(p) / MODEL_CARD_FILE for p in releases]
    return files
