"""Site runtime command line: `python client/client.py check SITE_ROOT [--json] [--strict]`.

Exit status of `check`: 0 the site is usable (warnings may be printed), 1 the site has errors
(one line per problem), 2 the command could not run (no such site root, bad arguments),
3 an internal error (one line; `--debug` shows the traceback).
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
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

logger = logging.getLogger("healthfm.client")


def format_summary(report: "SiteReport") -> str:  # noqa: F821 (imported lazily)
    """A site admin's view of a usable site."""
    s = report.summary
    assert s is not None
    span = "no timed events"
    if s.time_min is not None and s.time_max is not None:
        span = f"{s.time_min:%Y-%m-%d} .. {s.time_max:%Y-%m-%d} ({(s.time_max - s.time_min).days / 365.25:.1f} years)"
    modalities = ", ".join(f"{m} ({s.subjects_per_modality[m]} subjects)" for m in s.modalities) or "none"
    splits = ", ".join(f"{k} {v}" for k, v in sorted(s.splits.items()))
    if not s.splits_from_file:
        splits += " (deterministic hash split: no metadata/subject_splits.parquet)"
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
    from healthfm_core.data.site import check_site

    root = Path(args.site_root)
    if not root.is_dir():
        print(f"error: site root {root} does not exist or is not a directory", file=sys.stderr)
        return EXIT_USAGE
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    report = check_site(root, progress=progress, strict=args.strict)
    if args.json:
        print(report.model_dump_json(indent=2))
        return EXIT_OK if report.ok else EXIT_INVALID
    for problem in report.problems:
        print(problem)
    if report.ok:
        print(format_summary(report))
        print(f"OK: site is usable ({report.n_warnings} warning(s))")
        return EXIT_OK
    print(f"FAILED: {report.n_errors} error(s), {report.n_warnings} warning(s)", file=sys.stderr)
    return EXIT_INVALID


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client.py", description="healthfm site runtime")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate a site's data (MEDS root + wearables)")
    check.add_argument("site_root", metavar="SITE_ROOT", help="the site root (holds data/, metadata/, ...)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--strict", action="store_true",
                       help="treat incomplete metadata (codes missing from codes.parquet) as errors")
    check.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    check.add_argument("--no-progress", dest="progress", action="store_false")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
