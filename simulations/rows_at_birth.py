"""Rows a task predicts at a subject's birth, or at or before its first clinical event, counted on
sites as the evidence job and the simulations build their evaluation rows (issue 42).

A row at birth is a negative with an empty history: a prediction nobody would make. Since issue 42
the shipped onset tasks trigger at clinical events with one before them, so they make none; this
measures it on any sites, e.g. the evidence job's (runs/data/<scenario>-seed<s>-n<n>/sites):

    python -m simulations.rows_at_birth runs/data/default-seed0-n1000/sites --split held_out
    python -m simulations.rows_at_birth SITE_ROOT ... --tasks configs/tasks/t2d.yaml --n-per-subject 2

The rows are runner.build_site_rows's (ACES's rows of every horizon; train and tuning capped at
`--n-per-subject` a subject with the job's seed, held_out whole), so a count here is a count of
the rows a report scores. Tasks default to the built-in synthetic onset tasks (as the evidence
job evaluates them); `--tasks` takes task files or names as `tasks=` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from healthfm_core.data.labels.task_spec import file_entries, resolve_tasks, runner_tasks
from healthfm_core.data.labels.tasks import BIRTH_CODE, DEATH_CODE, TASKS, OnsetTask, Task, rows_per_subject
from healthfm_core.data.sites.site import Site, open_site
from healthfm_core.eval.runner import build_site_rows

NOT_CLINICAL = (BIRTH_CODE, DEATH_CODE)  # the event codes that are not a clinical event
SPLITS = ("train", "tuning", "held_out")


@dataclass(frozen=True)
class EarlyRows:
    """One task's rows of one split at one site, and how many of them come too early."""

    site: str
    task: str
    rows: int
    at_birth: int  # at the subject's MEDS_BIRTH time
    without_history: int  # at or before the subject's first clinical event (at_birth among them)


def subject_landmarks(site: Site) -> pl.DataFrame:
    """Per subject: its birth time (null where none is timed) and its first clinical event's time
    (null where it has none), in microseconds since 1970."""
    events = pl.from_arrow(site.read_events(columns=["subject_id", "time", "code"]))
    assert isinstance(events, pl.DataFrame)
    timed = events.filter(pl.col("time").is_not_null()).with_columns(
        pl.col("time").cast(pl.Datetime("us")).dt.epoch("us").alias("t")
    )
    birth = timed.filter(pl.col("code") == BIRTH_CODE).group_by("subject_id").agg(pl.col("t").min().alias("birth"))
    first = (
        timed.filter(~pl.col("code").is_in(NOT_CLINICAL))
        .group_by("subject_id")
        .agg(pl.col("t").min().alias("first_clinical"))
    )
    subjects = events.select("subject_id").unique()
    return subjects.join(birth, on="subject_id", how="left").join(first, on="subject_id", how="left")


def early_rows(
    name: str, site: Site, tasks: Mapping[str, Task], n_per_subject: int | None, seed: int, split: str
) -> list[EarlyRows]:
    """Per task, the rows of `split` that build_site_rows gives and how many are too early."""
    built = build_site_rows(name, site, None, tasks, n_per_subject=n_per_subject, seed=seed)  # type: ignore[arg-type]
    rows = pl.DataFrame(
        {"subject_id": built.subject_id, "prediction_time": built.prediction_time_us, "split": built.split}
    ).join(subject_landmarks(site), on="subject_id", how="left")
    at_birth = (rows["prediction_time"] == rows["birth"]).fill_null(False).to_numpy()
    early = (
        rows["first_clinical"].is_null() | (rows["prediction_time"] <= rows["first_clinical"]).fill_null(True)
    ).to_numpy()
    in_split = (rows["split"] == split).to_numpy()
    out = []
    for key, labels in built.labels.items():
        row = in_split & ~np.isnan(labels)
        out.append(
            EarlyRows(
                site=name,
                task=key,
                rows=int(row.sum()),
                at_birth=int((row & at_birth).sum()),
                without_history=int((row & early).sum()),
            )
        )
    return out


def onset_tasks(entries: Sequence[str] | None) -> dict[str, Task]:
    """The onset tasks to count: `entries` resolved as `tasks=` resolves them, or (None) the
    built-in synthetic onset tasks, as the evidence job evaluates them."""
    names = list(entries) if entries else [k for k, t in TASKS.items() if isinstance(t, OnsetTask)]
    return {k: t for k, t in runner_tasks(resolve_tasks(file_entries(names))).items() if isinstance(t, OnsetTask)}


def site_roots(paths: Sequence[Path]) -> list[Path]:
    """Each path a site root (its data/ folder), or a folder of site roots."""
    roots: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory (a site root or a folder of them)")
        if (path / "data").is_dir():
            roots.append(path)
            continue
        found = sorted(p for p in path.iterdir() if (p / "data").is_dir())
        if not found:
            raise FileNotFoundError(f"{path}: neither a site root (no data/) nor a folder of site roots")
        roots.extend(found)
    return roots


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.rows_at_birth", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="site roots, or folders of site roots")
    parser.add_argument("--tasks", nargs="*", default=None, help="task files or names (default: the onset tasks)")
    parser.add_argument("--split", choices=SPLITS, default="held_out")
    parser.add_argument("--n-per-subject", default="2", help="train and tuning's cap (the evidence job's: 2), or all")
    parser.add_argument("--seed", type=int, default=0, help="the cap's draw (the job's seed)")
    args = parser.parse_args(argv)
    try:
        cap = rows_per_subject(args.n_per_subject)
        tasks = onset_tasks(args.tasks)
        counts = [
            c
            for root in site_roots(args.paths)
            for c in early_rows(root.resolve().name, open_site(root), tasks, cap, args.seed, args.split)
        ]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"| site | task | {args.split} rows | at birth | at or before the first clinical event |")
    print("|---|---|---|---|---|")
    for c in counts:
        print(f"| {c.site} | {c.task} | {c.rows:,} | {c.at_birth:,} | {c.without_history:,} |")
    rows, births, early = (sum(getattr(c, f) for c in counts) for f in ("rows", "at_birth", "without_history"))
    share = f"{births / rows:.1%}" if rows else "-"
    print(f"| all | all | {rows:,} | {births:,} ({share}) | {early:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
