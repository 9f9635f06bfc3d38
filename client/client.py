"""Site runtime command line.

    python client/client.py check SITE_ROOT [--json] [--strict] [--tasks CONFIG_OR_DIR ...]
                                 [--min-subjects N] [--policy FILE]
    python client/client.py join SITE_ROOT --superlink HOST:PORT --root-cert ca.pem --auth-key auth_key
                                 [--state-dir DIR] [--site-name NAME] [--policy FILE] [--node-config KEY=VALUE ...]
                                 [--new-privacy-budget]
    python client/client.py approve BUNDLE.fab --policy FILE [--show]
    python client/client.py embed SITE_ROOT --model DIR --release-key PEM [--expect-run ID] [--tasks ... | --prediction-times FILE] --out FILE
    python client/client.py probe SITE_ROOT --model DIR --release-key PEM [--tasks ...] [--out DIR]
    python client/client.py predict SITE_ROOT --model DIR --release-key PEM --head HEAD.json --prediction-times FILE --out FILE

Exit status of `check`: 0 the site is usable (warnings may be printed), 1 the site has errors
(one line per problem), 2 the command could not run (no such site root, bad arguments),
3 an internal error (one line; `--debug` shows the traceback). Problem counts are true counts;
repeated problems of one kind in one file print at most 5 lines plus an "and N more" line.
With `--tasks` (ACES configs or directories of them) and for the site's own labels under
SITE_ROOT/tasks/, `check` also prints each task's rows, subjects and positives per split, and
warns where the runtime would withhold the task's metrics (healthfm_core.data.checks.task_check).
`join` checks the site the same way (1 and the check's lines if it is not usable), then runs a
SuperNode until stopped (0 after Ctrl-C/SIGTERM); 4 the SuperLink is unreachable or its
certificate does not verify, 5 it refused the site's key, 6 the SuperNode stopped otherwise.
`approve` prints what an app bundle holds (files, sizes, hashes, its serverapp/clientapp) and adds
its sha256 to the policy's approved_apps (`--show`: print only); the site runs no other bundle.
`embed`, `probe` and `predict` use a model release (`coordinator release`) on the site's own data
(client/model_use.py): 0 done, 1 the site does not fit the release (modalities, unknown codes)
or has no rows to use, 2 bad arguments or a release/head that is refused, 3 an internal error.
Each verifies the release's signature against the federation's public key the site holds
(`--release-key release_signing.pem` from its startup files); `--trust-unsigned` loads an
unsigned or unverifiable release (a local simulation's) with a warning. A release of another run
than the one the site names (`--expect-run`, `--expect-setup`, the policy's expected_release;
healthfm_core/release_binding.py) is refused (2); naming none loads it with a warning naming its run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: sys.path[0] is client/, where this very file would shadow the `client`
    # package; put the repository root there instead so `healthfm_core` and `client` import.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from client.deploy.approval import ApprovalError, approve, read_bundle  # noqa: E402
from client.deploy.join import JoinConfig, JoinError, join  # noqa: E402
from client.deploy.supernode_pace import POLL_INTERVAL_S  # noqa: E402
from client.model_use import (  # noqa: E402
    PREDICTION_TIMES_SCHEMA,
    NoRows,
    UseError,
    embed_rows_at_site,
    embeddings_table,
    eval_config,
    open_site_runtime,
    predict_at_site,
    probe_at_site,
    read_prediction_times,
    splits_of,
    task_rows,
    write_parquet,
    zero_shot_at_site,
)
from client.personalise import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, describe, personalise_at_site  # noqa: E402
from client.policy import PolicyError, SitePolicy, load_policy  # noqa: E402
from client.site_runtime import SiteRuntime  # noqa: E402
from client.threads import parse_threads  # noqa: E402
from healthfm_core.data.checks.coverage import history_coverage_days  # noqa: E402
from healthfm_core.data.checks.problem_log import MAX_PROBLEMS_PER_KIND, SiteReport  # noqa: E402
from healthfm_core.data.checks.site_check import check_site, run_check  # noqa: E402
from healthfm_core.data.checks.task_check import (  # noqa: E402
    TasksReport,
    count_tasks,
    format_tasks,
    task_files,
)
from healthfm_core.data.files.layout import SUBJECT_SPLITS_FILEPATH  # noqa: E402
from healthfm_core.data.labels.tasks import rows_per_subject  # noqa: E402
from healthfm_core.data.sites.site import Site, SiteDataError  # noqa: E402
from healthfm_core.eval.saved_head import HeadError  # noqa: E402
from healthfm_core.first_error import first_error  # noqa: E402
from healthfm_core.personal_weights import load_personal  # noqa: E402
from healthfm_core.release import ModelRelease, ReleaseError, load_release  # noqa: E402
from healthfm_core.release_binding import ExpectedRun  # noqa: E402
from healthfm_core.release_fit import DEFAULT_MAX_UNKNOWN_SHARE, SiteDoesNotFit  # noqa: E402
from healthfm_core.terms.report_floor import DEFAULT_MIN_POSITIVES, DEFAULT_MIN_SUBJECTS  # noqa: E402
from healthfm_core.terms.token_settings import DEFAULT_TOKEN_WINDOW_DAYS, TokenSettings  # noqa: E402

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

logger = logging.getLogger("healthfm.client")


def format_summary(report: SiteReport) -> str:
    """A site admin's view of a usable site."""
    s = report.summary
    assert s is not None
    span = "no timed events"
    if s.time_min is not None and s.time_max is not None:
        span = f"{s.time_min:%Y-%m-%d} .. {s.time_max:%Y-%m-%d} ({(s.time_max - s.time_min).days / 365.25:.1f} years)"
    modalities = ", ".join(f"{m} ({s.subjects_per_modality[m]} subjects)" for m in s.modalities) or "none"
    splits = ", ".join(f"{k} {v}" for k, v in sorted(s.splits.items()))
    if not s.splits_from_file:
        splits += f" (deterministic hash split: no {SUBJECT_SPLITS_FILEPATH})"
    lines = [
        f"site            {report.root}",
        f"subjects        {s.n_subjects}",
        f"events          {s.n_events}",
        f"codes           {s.n_codes}",
        f"time span       {span}",
        f"modalities      {modalities}",
        f"wearable days   {s.wearable_days:.1f} ({s.n_wearable_epochs} epochs)",
        f"PRS traits      {', '.join(s.prs_traits) or 'none'}",
        f"splits          {splits}",
    ]
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    root = Path(args.site_root)
    if not root.is_dir():
        print(f"error: site root {root} does not exist or is not a directory", file=sys.stderr)
        return EXIT_USAGE
    for flag, value in (
        ("--min-subjects", args.min_subjects),
        ("--min-positives", args.min_positives),
    ):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return EXIT_USAGE
    try:
        n_per_subject = rows_per_subject(args.n_per_subject)
    except ValueError as err:
        print(f"error: --n-per-subject: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        window = TokenSettings.parse({"token_window_days": args.token_window_days}, "--token-window-days")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = task_files(args.tasks or [])
        # The runtime's minimums (min_report_subjects, min_report_positives), each raised by the
        # policy's (the stricter holds).
        min_subjects, min_positives = args.min_subjects, args.min_positives
        if args.policy:
            policy = load_policy(args.policy)
            min_subjects, min_positives = (
                max(min_subjects, policy.min_subjects),
                max(min_positives, policy.min_positives),
            )
    except (FileNotFoundError, PolicyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    report, subjects = run_check(root, progress=progress, strict=args.strict)
    tasks = None
    coverage = None
    if report.ok and report.summary is not None:
        site = Site(root, report, subjects.subject_ids, subjects.per_modality)
        # How much of each subject's history the model sees at the federation's token budget.
        coverage = history_coverage_days(
            site.read_events(columns=["subject_id", "time", "code"]),
            args.max_tokens,
            token_window_days=window.token_window_days,
        )
        if files or report.summary.site_tasks:
            tasks = count_tasks(
                site,
                files,
                min_subjects=min_subjects,
                n_per_subject=n_per_subject,
                seed=args.seed,
                min_positives=min_positives,
            )
    ok = report.ok and (tasks is None or tasks.ok)
    if args.json:
        blob = report.model_dump(mode="json")
        if coverage is not None:
            blob["history_coverage"] = coverage
        if tasks is not None:
            blob["tasks"] = tasks.model_dump(mode="json")
        print(json.dumps(blob, indent=2))
        return EXIT_OK if ok else EXIT_INVALID
    seen = None
    if coverage is not None and coverage.get("n_subjects"):
        seen = (
            f"history seen    median {float(coverage['median_days']):.0f} days of a median "
            f"{float(coverage['median_history_days']):.0f}-day record (at {args.max_tokens} tokens; whole record "
            f"for {100 * float(coverage['fraction_full_history']):.0f}% of subjects)"
        )
    return print_report(report, tasks, seen)


def print_report(report: SiteReport, tasks: TasksReport | None = None, seen: str | None = None) -> int:
    """One line per problem, then the summary (usable) or a FAILED line with the true counts; the
    exit status."""
    for problem in report.problems:
        print(problem)
    n_errors, n_warnings, cut = report.n_errors, report.n_warnings, report.n_not_shown
    if report.ok:
        print(format_summary(report))
        if seen is not None:
            print(seen)
    if tasks is not None:
        print(format_tasks(tasks))
        for problem in tasks.problems:
            print(problem)
        n_errors += sum(p.severity == "error" for p in tasks.problems)
        n_warnings += sum(p.severity == "warning" for p in tasks.problems)
    not_shown = (
        f"; {cut} without a line of their own (at most {MAX_PROBLEMS_PER_KIND} lines per kind and file)" if cut else ""
    )
    if report.ok and n_errors == 0:
        print(f"OK: site is usable ({n_warnings} warning(s){not_shown})")
        return EXIT_OK
    print(f"FAILED: {n_errors} error(s), {n_warnings} warning(s){not_shown}", file=sys.stderr)
    return EXIT_INVALID


def _node_config_items(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    """KEY=VALUE pairs; values read as TOML scalars (5, 2.5, true, 'text'), else kept as text."""
    import tomllib

    config: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--node-config {item!r} is not KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"--node-config {item!r}: the value must be text, a number or true/false")
        config[key.strip()] = value
    return config


def _threads_arg(value: str) -> int | str:
    try:
        return parse_threads(value, None)  # argparse prefixes "argument --threads: "
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_join(args: argparse.Namespace) -> int:
    root = Path(args.site_root)
    if not root.is_dir():
        print(f"error: site root {root} does not exist or is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        node_config = _node_config_items(args.node_config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    # The data first: a site that fails `check` never connects.
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    report = check_site(root, progress=progress, strict=args.strict)
    if not report.ok:
        print_report(report)
        print(f"not joining: {root} is not usable (fix the problems above, then rerun)", file=sys.stderr)
        return EXIT_INVALID
    s = report.summary
    modalities = ", ".join(s.modalities) if s is not None else "?"
    print(f"site {root.resolve()}: OK ({s.n_subjects if s else '?'} subjects; {modalities})", flush=True)
    node_config = {"site-root": str(root.resolve()), **node_config}
    if args.site_name:
        node_config["site-name"] = args.site_name
    if args.policy:
        node_config["policy"] = str(Path(args.policy).resolve())
    if args.release_key:  # a task head's release is verified against it (client/head_rows.py)
        node_config["release-key"] = str(Path(args.release_key).resolve())
    if args.threads is not None:  # else the policy's threads, else the cores free (client/threads.py)
        node_config["threads"] = args.threads
    else:
        node_config.setdefault("threads", "auto")
    site_name = str(node_config.get("site-name", root.resolve().name))
    state_dir = (Path(args.state_dir) if args.state_dir else Path.home() / ".healthfm" / "sites" / site_name).resolve()
    # The ClientApp's durable state (the privacy ledger) lives with the SuperNode's state.
    node_config.setdefault("state-dir", str(state_dir / "site-state"))
    try:
        cfg = JoinConfig(
            site_root=root.resolve(),
            superlink=args.superlink,
            root_cert=Path(args.root_cert).resolve() if args.root_cert else None,
            auth_key=Path(args.auth_key).resolve() if args.auth_key else None,
            insecure=args.insecure,
            state_dir=state_dir,
            node_config=node_config,
            connect_timeout=args.connect_timeout,
            runtime_port=args.runtime_port,
            max_wait_time=args.max_wait_time,
            clientapp=args.clientapp,
            warm_idle=args.warm_idle,
            poll_interval=args.poll_interval,
            heartbeat_interval=args.heartbeat_interval,
            new_privacy_budget=args.new_privacy_budget,
            proxy=args.proxy,
        )
    except ValueError as err:  # pydantic: a bad option value
        print(f"error: {str(err).splitlines()[0]}: {' '.join(str(err).splitlines()[1:3]).strip()}", file=sys.stderr)
        return EXIT_USAGE
    if args.insecure:
        print(
            "WARNING: --insecure: no TLS, the connection to the SuperLink is neither encrypted nor "
            "authenticated; use only for local tests",
            file=sys.stderr,
        )
    try:
        return join(cfg, out=sys.stdout, echo=args.verbose)  # the stdout of now, not of import time
    except JoinError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.status


def cmd_approve(args: argparse.Namespace) -> int:
    try:
        bundle = read_bundle(Path(args.bundle))
        print(bundle.describe())
        if args.show:
            return EXIT_OK
        policy = Path(args.policy)
        added = approve(bundle, policy)
    except (ApprovalError, PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    verb = "approved" if added else "already approved"
    print(f"{verb}: {bundle.sha256} in {policy.resolve()} (runs of this bundle may now run at this site)")
    return EXIT_OK


def _use_release(args: argparse.Namespace) -> tuple[ModelRelease, SiteRuntime]:
    """The release (verified) and the site's runtime (checked, fitted to it), for embed/probe/predict."""
    if args.trust_unsigned:
        print(
            f"WARNING: --trust-unsigned: the release {args.model} is loaded without verifying its signature; "
            "nothing shows it is the federation's model",
            file=sys.stderr,
        )
    policy = load_policy(args.policy) if args.policy else None
    expect = expected_runs(args, policy)
    release = load_release(
        args.model, trusted_keys=args.release_key or [], trust_unsigned=args.trust_unsigned, expect=expect
    )
    if not expect:
        print(
            f"WARNING: the release {args.model} is {release.describe_run()}; this site names no expected run "
            "(--expect-run / --expect-setup, or expected_release in its policy), so any release the federation "
            "signed would load",
            file=sys.stderr,
        )
    if getattr(args, "personal", None):  # the site's own adaptation of this release (`personalise`)
        release = load_personal(args.personal, release)
    min_subjects = args.min_subjects
    if policy is not None:
        min_subjects = max(min_subjects, policy.min_subjects)
    runtime, _ = open_site_runtime(
        Path(args.site_root),
        release,
        min_subjects,
        Path(args.policy) if args.policy else None,
        args.max_unknown_share,
        min_positives=args.min_positives,
    )
    return release, runtime


def expected_runs(args: argparse.Namespace, policy: SitePolicy | None) -> list[ExpectedRun]:
    """The runs the release must be: the policy's expected_release and --expect-run/--expect-setup
    (each named one must hold)."""
    out = [policy.expected_release] if policy is not None and policy.expected_release is not None else []
    if args.expect_run is not None or args.expect_setup is not None:
        try:
            out.append(ExpectedRun(run_id=args.expect_run, setup_sha256=args.expect_setup))
        except ValidationError as err:
            flags = {"run_id": "--expect-run", "setup_sha256": "--expect-setup"}
            problem = first_error(err, "expected run", lambda loc: flags.get(str(loc[0]), str(loc[0])))
            raise UseError(f"{problem} (a setup sha256 is 64 lowercase hex characters)") from None
    return out


def _run_use(args: argparse.Namespace, body) -> int:  # noqa: ANN001 - body(args) -> int
    if not Path(args.site_root).is_dir():
        print(f"error: site root {args.site_root} does not exist or is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        return body(args)
    except (ReleaseError, HeadError, PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    except (NoRows, SiteDoesNotFit, SiteDataError) as err:
        print(f"error: {' '.join(str(err).split())[:2000]}", file=sys.stderr)
        return EXIT_INVALID
    except UseError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _embed(args: argparse.Namespace) -> int:
    release, runtime = _use_release(args)
    cfg = eval_config(release, args.tasks, args.max_subjects)
    rows = read_prediction_times(args.prediction_times) if args.prediction_times else task_rows(runtime, cfg)
    embedded = embed_rows_at_site(
        runtime, release, rows, cfg.max_events, cfg.max_patches, cfg.batch_size, progress=_progress(args)
    )
    table = embeddings_table(embedded, splits_of(runtime, rows["subject_id"].to_numpy()))
    write_parquet(table, args.out)
    print(f"{table.num_rows} rows embedded ({embedded.x.shape[1]} dimensions) -> {args.out}")
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    return _run_use(args, _embed)


def _probe(args: argparse.Namespace) -> int:
    release, runtime = _use_release(args)
    cfg = eval_config(release, args.tasks, args.max_subjects)
    out = Path(args.out) if args.out else Path(f"probe-{runtime.name}")
    result = probe_at_site(runtime, release, cfg, out, runtime.name, progress=_progress(args))
    print(result.report.read_text(encoding="utf-8"))
    print(f"report, heads, predictions and plots in {out}")
    if not result.reply.tasks:
        print(
            "no task has a head at this site: why, and how to get one, under 'Tasks without a head here' above",
            file=sys.stderr,
        )
    return EXIT_OK if result.reply.tasks else EXIT_INVALID


def cmd_probe(args: argparse.Namespace) -> int:
    return _run_use(args, _probe)


def _predict(args: argparse.Namespace) -> int:
    if args.zero_shot == bool(args.head):
        raise UseError("predict: give either --head HEAD.json (a saved probe) or --zero-shot (the model's own head)")
    if args.zero_shot:
        return _predict_zero_shot(args)
    if args.tasks or args.max_subjects is not None:
        raise UseError("predict: --tasks and --max-subjects go with --zero-shot (a --head is one task's)")
    if not args.prediction_times:
        raise UseError("predict --head: give the rows to score (--prediction-times FILE)")
    release, runtime = _use_release(args)
    rows = read_prediction_times(args.prediction_times)
    table = predict_at_site(runtime, release, Path(args.head), rows, progress=_progress(args))
    write_parquet(table, args.out)
    print(f"{table.num_rows} predictions -> {args.out}")
    return EXIT_OK


def _predict_zero_shot(args: argparse.Namespace) -> int:
    release, runtime = _use_release(args)
    cfg = eval_config(release, args.tasks, args.max_subjects)
    rows = read_prediction_times(args.prediction_times) if args.prediction_times else task_rows(runtime, cfg)
    result = zero_shot_at_site(
        runtime,
        release,
        cfg.tasks,
        rows,
        cfg.max_events,
        cfg.max_patches,
        cfg.batch_size,
        progress=_progress(args),
        strict_codes=bool(args.tasks),  # a task the site named must be scored, or the site is told why
    )
    write_parquet(result.table, args.out)
    keys = [c for c in result.table.column_names if c not in ("subject_id", "prediction_time")]
    print(f"{result.table.num_rows} rows, zero-shot probabilities of {', '.join(keys)} -> {args.out}")
    for key, why in result.skipped.items():
        print(f"  {key}: no zero-shot score ({why})", file=sys.stderr)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    return _run_use(args, _predict)


def _personalise(args: argparse.Namespace) -> int:
    release, runtime = _use_release(args)
    cfg = eval_config(release, args.tasks, args.max_subjects)
    out = Path(args.out) if args.out else Path(f"personal-{runtime.name}")
    result = personalise_at_site(
        runtime, release, cfg, out, args.steps, args.lr, args.batch_size, args.seed, progress=_progress(args)
    )
    print(describe(result))
    return EXIT_OK


def cmd_personalise(args: argparse.Namespace) -> int:
    return _run_use(args, _personalise)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client.py", description="healthfm site runtime")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate a site's data (MEDS root + wearables)")
    check.add_argument("site_root", metavar="SITE_ROOT", help="the site root (holds data/, metadata/, ...)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--strict", action="store_true", help="treat incomplete metadata (codes missing from codes.parquet) as errors"
    )
    check.add_argument(
        "--tasks",
        nargs="+",
        metavar="CONFIG_OR_DIR",
        help="ACES task configs (or directories of *.yaml) to count labels of: rows, subjects "
        "and positives per split at the evaluation's prediction times",
    )
    check.add_argument(
        "--min-subjects",
        type=int,
        default=DEFAULT_MIN_SUBJECTS,
        metavar="N",
        help=f"the federation's minimum subjects per split for a metric to leave the site "
        f"(default {DEFAULT_MIN_SUBJECTS}, the runtime's min_report_subjects)",
    )
    check.add_argument(
        "--min-positives",
        type=int,
        default=DEFAULT_MIN_POSITIVES,
        metavar="N",
        help=f"the minimum positive (and negative) rows in held_out for a metric to leave the site "
        f"(default {DEFAULT_MIN_POSITIVES}, the runtime's min_report_positives)",
    )
    check.add_argument(
        "--policy",
        metavar="FILE",
        help="this site's policy file: its min_subjects and min_positives raise the minimums",
    )
    check.add_argument(
        "--n-per-subject",
        default="4",
        metavar="K",
        help="at most K of a subject's ACES rows per task in train and tuning, as the evaluation draws "
        "them (default 4; 'all': every row); held_out is always scored on every labelled row",
    )
    check.add_argument(
        "--seed", type=int, default=0, help="the evaluation's seed for drawing a subject's rows (default 0)"
    )
    check.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="the model's EHR tokens per sample (max-events of the run; default 256), for the history coverage",
    )
    check.add_argument(
        "--token-window-days",
        type=float,
        default=DEFAULT_TOKEN_WINDOW_DAYS,
        metavar="DAYS",
        help=f"the run's token-window-days (default {DEFAULT_TOKEN_WINDOW_DAYS:g}: one token per day; "
        "0: one per timestamp), for the history coverage",
    )
    check.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    check.add_argument("--no-progress", dest="progress", action="store_false")
    check.set_defaults(func=cmd_check)

    join = sub.add_parser("join", help="check the site, then connect it to a federation's SuperLink (SuperNode)")
    join.add_argument("site_root", metavar="SITE_ROOT", help="the site root (holds data/, metadata/, ...)")
    join.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    join.add_argument("--root-cert", metavar="CA.pem", help="the federation's CA certificate (ca.pem)")
    join.add_argument("--auth-key", metavar="KEY", help="this site's private key (auth_key from the coordinator)")
    join.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the SuperNode keeps its log, node config, Flower apps and the site's "
        "durable state (privacy ledger) (default: ~/.healthfm/sites/SITE_NAME)",
    )
    join.add_argument("--site-name", help="the site's name in the federation (default: the site root's name)")
    join.add_argument(
        "--release-key",
        metavar="PEM",
        help="the federation's public release key (release_signing.pem from the coordinator): a task head run's "
        "release (node config model=DIR) is verified against it",
    )
    join.add_argument(
        "--policy", metavar="FILE", help="this site's policy file (what it allows, whatever the server asks)"
    )
    join.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more node config for the ClientApp, e.g. min-report-subjects=50 (repeatable)",
    )
    join.add_argument("--insecure", action="store_true", help="no TLS and no authentication (local tests only)")
    join.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the SuperLink before giving up (default 10)",
    )
    join.add_argument(
        "--max-wait-time",
        type=float,
        default=None,
        metavar="S",
        help="stop reconnecting after losing the SuperLink for this long (default: never)",
    )
    join.add_argument(
        "--runtime-port",
        type=int,
        default=None,
        help="local port of the SuperNode's runtime API on 127.0.0.1 (default: a free one)",
    )
    join.add_argument(
        "--threads",
        type=_threads_arg,
        default=None,
        metavar="N|auto",
        help="torch threads for training (N overrides the policy's threads; default: the policy's, else "
        "auto: the cores free when a setup's first run starts here, 1 to 8, measured from /proc/stat "
        "and kept for the setup's later runs in STATE_DIR/site-state/threads.json)",
    )
    join.add_argument(
        "--clientapp",
        choices=("warm", "cold"),
        default="warm",
        help="warm (default): one ClientApp process per run keeps the data and model loaded between "
        "messages; cold: a new process per message",
    )
    join.add_argument(
        "--warm-idle",
        type=float,
        default=600.0,
        metavar="S",
        help="stop a run's warm ClientApp after S seconds without a message (default 600)",
    )
    join.add_argument(
        "--poll-interval",
        type=float,
        default=POLL_INTERVAL_S,
        metavar="S",
        help=f"the SuperNode asks the SuperLink for work every S seconds while idle (default {POLL_INTERVAL_S:g}; "
        "Flower's own: 3)",
    )
    heartbeat_default = JoinConfig.model_fields["heartbeat_interval"].default  # client/deploy/heartbeat.py
    join.add_argument(
        "--heartbeat-interval",
        type=float,
        default=heartbeat_default,
        metavar="S",
        help=f"the SuperNode tells the SuperLink it is alive every S/2 seconds or so; the SuperLink counts the "
        f"site dead (and its rounds go on without it) 2 x S after the last one (default {heartbeat_default:g}; "
        "Flower's own: 30). Raise it on a link where a call can stall for seconds; the coordinator's "
        "`superlink --min-heartbeat-interval` must allow it",
    )
    join.add_argument(
        "--proxy",
        default=None,
        metavar="URL",
        help="the site's forward proxy to the SuperLink, e.g. http://proxy.hospital.org:3128 (HTTP CONNECT; "
        "default: the environment's HTTPS_PROXY / ALL_PROXY, NO_PROXY honoured); local traffic never uses it",
    )
    join.add_argument(
        "--new-privacy-budget",
        action="store_true",
        help="start a new, empty privacy ledger where the state dir's is refused (lost, another site's "
        "state dir, damaged): the spend of this site's key is then no longer counted; logged here and "
        "reported to the coordinator's audit log. Never needed when the ledger is accepted",
    )
    join.add_argument("--strict", action="store_true", help="check the site as `check --strict` does")
    join.add_argument("--progress", dest="progress", action="store_true", default=None)
    join.add_argument("--no-progress", dest="progress", action="store_false")
    join.set_defaults(func=cmd_join)

    approve_p = sub.add_parser("approve", help="show an app bundle's contents and approve it in the site policy")
    approve_p.add_argument("bundle", metavar="BUNDLE.fab", help="the app bundle the coordinator sent")
    approve_p.add_argument(
        "--policy", required=True, metavar="FILE", help="this site's policy file (created if absent)"
    )
    approve_p.add_argument("--show", action="store_true", help="only show what the bundle holds")
    approve_p.set_defaults(func=cmd_approve)

    def use_options(q: argparse.ArgumentParser, personal: bool = True) -> None:
        q.add_argument("site_root", metavar="SITE_ROOT", help="the site root (holds data/, metadata/, ...)")
        q.add_argument("--model", required=True, metavar="DIR", help="the model release folder (coordinator release)")
        q.add_argument(
            "--release-key",
            action="append",
            metavar="PEM",
            help="the federation's public release key (release_signing.pem in the startup files the coordinator "
            "handed over); the release's signature must verify against it (repeat to trust a rotated key too)",
        )
        q.add_argument(
            "--trust-unsigned",
            action="store_true",
            help="load an unsigned or unverifiable release (e.g. a local simulation's) without checking its "
            "signature: only for a release whose origin you trust",
        )
        q.add_argument(
            "--policy",
            metavar="FILE",
            help="this site's policy file: its min_subjects raises the minimum; its expected_release must hold",
        )
        q.add_argument(
            "--expect-run",
            metavar="RUN_ID",
            help="refuse a release of any other run (the run id `coordinator launch` printed; release.json run_id)",
        )
        q.add_argument(
            "--expect-setup",
            metavar="SHA256",
            help="refuse a release whose federation setup is not this sha256 (the model card's setup)",
        )
        if personal:
            q.add_argument(
                "--personal",
                metavar="DIR",
                help="use the release as this site adapted it (the folder `personalise` wrote from this release)",
            )
        q.add_argument(
            "--min-subjects",
            type=int,
            default=DEFAULT_MIN_SUBJECTS,
            metavar="N",
            help=f"fewest subjects per split for a probe (default {DEFAULT_MIN_SUBJECTS}, the runtime's)",
        )
        q.add_argument(
            "--min-positives",
            type=int,
            default=DEFAULT_MIN_POSITIVES,
            metavar="N",
            help=f"fewest positive (and negative) held-out rows for a probe's metric "
            f"(default {DEFAULT_MIN_POSITIVES}, the runtime's; the policy's min_positives raises it)",
        )
        q.add_argument(
            "--max-unknown-share",
            type=float,
            default=DEFAULT_MAX_UNKNOWN_SHARE,
            metavar="F",
            help="refuse a site with more than this share of EHR rows in codes outside the release's "
            f"vocabulary (default {DEFAULT_MAX_UNKNOWN_SHARE})",
        )
        q.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress bars")
        q.add_argument("--no-progress", dest="progress", action="store_false")

    def task_options(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--tasks",
            nargs="+",
            metavar="TASK",
            help="task names, file:PATH for an ACES file (a bare path is refused) or site:NAME (default: the tasks "
            "of the run's own evaluation)",
        )
        q.add_argument(
            "--max-subjects",
            type=int,
            default=None,
            metavar="N",
            help="at most N subjects per split, the run's keyed sample (default: the run's; 0: every subject)",
        )

    embed = sub.add_parser("embed", help="the release's embedding of each (subject, prediction time), in parquet")
    use_options(embed)
    task_options(embed)
    embed.add_argument(
        "--prediction-times",
        metavar="FILE",
        help=f"embed these rows instead of the tasks' labelled rows: {PREDICTION_TIMES_SCHEMA}",
    )
    embed.add_argument("--out", required=True, metavar="FILE", help="the parquet file to write")
    embed.set_defaults(func=cmd_embed)

    probe = sub.add_parser("probe", help="fit and score the frozen linear probe of each task on this site's splits")
    use_options(probe)
    task_options(probe)
    probe.add_argument("--out", metavar="DIR", help="where the report, heads, predictions and plots go (probe-SITE)")
    probe.set_defaults(func=cmd_probe)

    personal = sub.add_parser(
        "personalise",
        help="adapt the release to this site: local steps on its train split, the count chosen on its tuning split",
    )
    use_options(personal, personal=False)
    task_options(personal)
    personal.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=list(DEFAULT_STEPS),
        metavar="N",
        help=f"candidate local step counts, 0 = the release unchanged (default {' '.join(map(str, DEFAULT_STEPS))})",
    )
    personal.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    personal.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help=f"subjects a step (default {DEFAULT_BATCH})"
    )
    personal.add_argument("--seed", type=int, default=0, help="seed of the batches and masks (default 0)")
    personal.add_argument("--out", metavar="DIR", help="where the personalised weights go (personal-SITE)")
    personal.set_defaults(func=cmd_personalise)

    predict = sub.add_parser(
        "predict",
        help="predictions for (subject, prediction time) rows: a saved head's, or zero-shot from the model's own head",
    )
    use_options(predict)
    task_options(predict)
    predict.add_argument("--head", metavar="HEAD.json", help="a head `probe` saved (heads/TASK.json)")
    predict.add_argument(
        "--zero-shot",
        action="store_true",
        help="instead of a head: each onset task's probability from the model's own future_codes head "
        "(the codes of the task's outcome within its horizon), no labels and no fitting; one column per task key",
    )
    predict.add_argument(
        "--prediction-times",
        metavar="FILE",
        help=f"the rows to score (with --head: required; with --zero-shot: default the tasks' rows): {PREDICTION_TIMES_SCHEMA}",
    )
    predict.add_argument("--out", required=True, metavar="FILE", help="the parquet file to write")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI boundary: one line, never a traceback unless asked
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
