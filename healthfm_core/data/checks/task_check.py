"""Counting a site's task labels before a run: what `client.py check SITE --tasks ...` prints.

For each task, an ACES config (healthfm_core.data.labels.aces_tasks) or the site's own labels under
SITE_ROOT/tasks/<task>/ (healthfm_core.data.labels.site_labels), and each horizon: rows, subjects and
positives per split. ACES tasks: the rows ACES gives (trigger, windows, gaps, exclusions), all of
them, per split (what aces-cli gives, and what held_out is scored on); apart, what the evaluation
takes: train and tuning capped (`cap_rows_per_subject`: up to `n_per_subject` rows per subject,
drawn with `seed`; the site runtime uses 4 and 0; "all": every row), held_out whole. A (task,
horizon) that the runtime would withhold (judged on what the evaluation takes) gets one warning saying why, naming the key that withholds it and what it protects:
a split (train, tuning, held_out) with fewer subjects than `min_report_subjects`, a train or
held_out split with a single class, or a held_out split with fewer positive (or negative) rows
than `min_report_positives`. Each predicate
of an ACES task that matches no row at the site gets a warning naming it (and ACES issue #192 when
it is a `code: null` range): a task whose label predicate never holds has no positives for a
reason that is not the patients. An ACES task whose positives are mostly its own stay's discharge
codes (a prediction time inside a hospital stay, the outcome within a day of that stay's
discharge: healthfm_core.data.checks.stay_leakage) gets a warning: leakage by design in exports that
time diagnoses at discharge (MIMIC-IV); the shipped onset tasks exclude such prediction times. An
ACES task whose trigger matches a timed MEDS_BIRTH row (`_ANY_EVENT`, `_RECORD_START`) gets a
warning: it predicts at birth. `meds-dev:<task>@<dataset or predicates file>` entries are
MEDS-DEV tasks (healthfm_core.data.labels.meds_dev_tasks). Labels never leave the site: this is the site
admin's view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, computed_field

from healthfm_core.data.checks.problem_log import SiteProblem, SiteSummary
from healthfm_core.data.checks.report_floor import (
    DEFAULT_MIN_POSITIVES,
    DEFAULT_MIN_SUBJECTS,
    MIN_POSITIVES_KEY,
    MIN_SUBJECTS_KEY,
    SMALL_CELL_RISK,
    class_subjects,
)
from healthfm_core.data.checks.stay_leakage import LEAKY_SHARE, STAY_END_DAYS, task_stay_leakage
from healthfm_core.data.files.layout import HELD_OUT_SPLIT, SPLITS, TRAIN_SPLIT
from healthfm_core.data.labels.aces_tasks import (
    OWN_WINDOWS,
    TASK_DIR,
    AcesTask,
    aces_labels,
    load_task,
    trigger_matches_birth,
    unmatched_predicates,
)
from healthfm_core.data.labels.meds_dev_tasks import MEDS_DEV_PREFIX, meds_dev_task, parse_entry
from healthfm_core.data.labels.site_labels import (
    TASKS_SUBDIR,
    SiteLabelError,
    read_site_labels,
)
from healthfm_core.data.labels.tasks import cap_rows_per_subject, rows_per_subject


class SplitSite(Protocol):
    """What counting a site's tasks reads of an opened site (healthfm_core.data.sites.site.Site)."""

    @property
    def root(self) -> Path: ...

    @property
    def summary(self) -> SiteSummary: ...

    def subject_splits(self) -> pa.Table: ...

    def held_out_subjects(self) -> np.ndarray: ...


TASK_SUFFIXES = (".yaml", ".yml")


class SplitCounts(BaseModel):
    rows: int
    subjects: int
    positives: int | None  # None: not a boolean task
    # Subjects with a positive row, with a negative row (None: not a boolean task): the positives
    # floor counts these, as one subject's many rows are one patient.
    positive_subjects: int | None = None
    negative_subjects: int | None = None


class TaskCounts(BaseModel):
    task: str
    source: Literal["aces", "site"]
    file: str  # the ACES config, or the site's labels folder relative to the site root
    horizon_days: int | None  # None: the site's own labels (their horizon is theirs); 0: the ACES task's own windows
    splits: dict[str, SplitCounts]  # train, tuning, held_out, then any other split name: every row
    # What the evaluation takes (train and tuning capped per subject, held_out whole); None: as `splits`.
    evaluated: dict[str, SplitCounts] | None = None
    # ACES tasks: positives whose outcome is their own stay's discharge codes (stay_leakage)
    same_stay_positives: int | None = None


class TasksReport(BaseModel):
    min_subjects: int
    min_positives: int = DEFAULT_MIN_POSITIVES
    n_per_subject: int | None  # None: every row
    seed: int
    tasks: list[TaskCounts]
    problems: list[SiteProblem]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def task_files(paths: Sequence[str | Path]) -> list[Path]:
    """Task config files: each path a config, or a directory whose *.yaml / *.yml are taken; a
    `meds-dev:<task>@<dataset>` entry is kept as it is (resolved when counted)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if str(raw).startswith(MEDS_DEV_PREFIX):
            out.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in TASK_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"--tasks {raw}: no *.yaml task configs in this directory")
            out += found
        elif path.is_file():
            out.append(path)
        elif (TASK_DIR / f"{raw}.yaml").is_file():  # a task's name, as `head` and `probe` take it
            out.append(TASK_DIR / f"{raw}.yaml")
        else:
            known = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
            raise FileNotFoundError(
                f"--tasks {raw}: no such file or directory, nor a task name of {TASK_DIR} (known: {', '.join(known)})"
            )
    return list(dict.fromkeys(out))


def _split_counts(table: pa.Table, split_of: dict[int, str]) -> dict[str, SplitCounts]:
    sid = np.asarray(table.column("subject_id").to_numpy(), dtype=np.int64)
    split = np.asarray([split_of.get(int(s), "") for s in sid], dtype=object)
    positive = None
    if "boolean_value" in table.column_names:
        positive = np.asarray(table.column("boolean_value").to_numpy(zero_copy_only=False), dtype=bool)
    names = list(SPLITS) + sorted({str(s) for s in split_of.values()} - set(SPLITS))
    out = {}
    for name in names:
        sel = split == name
        classes = None if positive is None else class_subjects(positive[sel], sid[sel])
        out[name] = SplitCounts(
            rows=int(sel.sum()),
            subjects=int(np.unique(sid[sel]).size),
            positives=None if positive is None else int(positive[sel].sum()),
            positive_subjects=None if classes is None else classes[0],
            negative_subjects=None if classes is None else classes[1],
        )
    return out


def _why_withheld(counts: TaskCounts, min_subjects: int, min_positives: int = DEFAULT_MIN_POSITIVES) -> str | None:
    """Why the runtime would withhold this (task, horizon)'s metrics, or None: each reason names
    the key behind it, its value, and what the privacy floor protects; judged on the rows the
    evaluation takes."""
    reasons = []
    splits = counts.evaluated if counts.evaluated is not None else counts.splits
    small = [f"{s} {splits[s].subjects}" for s in SPLITS if splits[s].subjects < min_subjects]
    if small:
        reasons.append(
            f"subjects per split below the minimum {min_subjects} ({MIN_SUBJECTS_KEY}; {SMALL_CELL_RISK}): "
            f"{', '.join(small)}"
        )
    for s in (TRAIN_SPLIT, HELD_OUT_SPLIT):
        c = splits[s]
        if c.positives is not None and c.rows and c.positives in (0, c.rows):
            reasons.append(f"{s} has a single class ({c.positives} positive of {c.rows} rows)")
    held = splits[HELD_OUT_SPLIT]
    if held.positive_subjects is not None and held.negative_subjects is not None and held.positives is not None:
        if held.rows and 0 < min(held.positive_subjects, held.negative_subjects) < min_positives:
            reasons.append(
                f"{HELD_OUT_SPLIT} has {held.positive_subjects} subjects with a positive row and "
                f"{held.negative_subjects} with a negative row ({held.positives} and {held.rows - held.positives} "
                f"rows), below the minimum {min_positives} ({MIN_POSITIVES_KEY}; {SMALL_CELL_RISK})"
            )
    return "; ".join(reasons) or None


def _label(counts: TaskCounts) -> str:
    """The task's line: its name, with the horizon when it has horizons."""
    if counts.horizon_days is None or counts.horizon_days == OWN_WINDOWS:
        return counts.task
    return f"{counts.task} {counts.horizon_days}d"


_AT_BIRTH = (
    "{}: its trigger ({}) matches a timed MEDS_BIRTH row: the task predicts at birth, a negative with no "
    "history that nobody would predict, which pads a sparse site's rows. Trigger at clinical events with a "
    "minimum history, as the shipped onset tasks do (their clinical_event predicate and history window)."
)


def _warning(path: Path, kind: str, message: str) -> SiteProblem:
    return SiteProblem(severity="warning", file=str(path), kind=kind, message=message)


def _load(entry: Path) -> AcesTask:
    text = str(entry)
    if text.startswith(MEDS_DEV_PREFIX):
        return meds_dev_task(*parse_entry(text))
    return load_task(entry)


def count_tasks(
    site: SplitSite,
    files: Sequence[Path],
    min_subjects: int = DEFAULT_MIN_SUBJECTS,
    n_per_subject: int | str | None = 4,
    seed: int = 0,
    site_tasks: Sequence[str] | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> TasksReport:
    """Rows, subjects and positives per split of each task and horizon at a site (see the module
    docstring). `site_tasks`: the site's own tasks to count (default: all under SITE_ROOT/tasks/)."""
    splits = site.subject_splits()
    split_of = dict(zip(splits.column("subject_id").to_pylist(), splits.column("split").to_pylist()))
    cap, held_out = rows_per_subject(n_per_subject), site.held_out_subjects()
    problems: list[SiteProblem] = []
    counted: list[TaskCounts] = []
    for path in files:
        try:
            task = _load(path)
        except (OSError, ValueError) as e:
            problems.append(
                SiteProblem(severity="error", file=str(path), kind="bad_task", message=" ".join(str(e).split()))
            )
            continue
        try:
            labels = aces_labels(task, site.root)  # every row ACES gives
        except Exception as e:  # ACES on data it cannot query: one line, the task's file named
            problems.append(
                SiteProblem(
                    severity="error",
                    file=str(path),
                    kind="bad_task",
                    message=f"ACES could not extract labels: {type(e).__name__}: {' '.join(str(e).split())}",
                )
            )
            continue
        if trigger_matches_birth(task):
            problems.append(_warning(path, "trigger_at_birth", _AT_BIRTH.format(task.name, task.config.get("trigger"))))
        leakage = task_stay_leakage(task, labels, site.root)
        for horizon, (same, positives) in sorted(leakage.items()):
            if positives and same > LEAKY_SHARE * positives:
                name = task.name if horizon == OWN_WINDOWS else f"{task.name} {horizon}d"
                problems.append(
                    SiteProblem(
                        severity="warning",
                        file=str(path),
                        kind="same_stay_positives",
                        message=f"{name}: {same} of {positives} positives are predicted inside a hospital stay "
                        f"and their outcome is recorded within {STAY_END_DAYS:g} day of that stay's discharge: "
                        "the stay's own discharge codes counted as a new onset (leakage in exports that time "
                        "diagnoses at discharge, as MIMIC-IV does). Exclude prediction times inside stays, "
                        "as the shipped onset tasks do (their rest_of_stay window, metadata.stay_window).",
                    )
                )
        silent = unmatched_predicates(task, site.root)
        if silent:
            problems.append(
                SiteProblem(
                    severity="warning",
                    file=str(path),
                    kind="predicate_matches_nothing",
                    message=f"{task.name}: predicate(s) matching no row at this site: {'; '.join(silent)}. "
                    "Windows that need them are empty and labels that count them are False: "
                    "its counts say nothing about the patients until the predicates match.",
                )
            )
        for horizon, table in sorted(labels.items()):
            counted.append(
                TaskCounts(
                    task=task.name,
                    source="aces",
                    file=str(path),
                    horizon_days=horizon,
                    splits=_split_counts(table, split_of),
                    # as the evaluation takes them (one helper for both)
                    evaluated=_split_counts(cap_rows_per_subject(table, cap, seed, every_row_of=held_out), split_of),
                    same_stay_positives=leakage[horizon][0],
                )
            )
    for name in site.summary.site_tasks if site_tasks is None else site_tasks:
        folder = f"{TASKS_SUBDIR}/{name}"
        try:
            table = read_site_labels(site.root, name)
        except SiteLabelError as e:  # the check reports each issue; here the task is only skipped
            problems.append(
                SiteProblem(
                    severity="error",
                    file=folder,
                    kind="bad_site_labels",
                    message=f"labels not counted: {len(e.issues)} problem(s), e.g. {e.issues[0]}",
                )
            )
            continue
        counted.append(
            TaskCounts(task=name, source="site", file=folder, horizon_days=None, splits=_split_counts(table, split_of))
        )
    for counts in counted:
        why = _why_withheld(counts, min_subjects, min_positives)
        if why is not None:
            problems.append(
                SiteProblem(
                    severity="warning",
                    file=counts.file,
                    kind="task_withheld",
                    message=f"{_label(counts)}: no metric would leave the site: {why}",
                )
            )
    return TasksReport(
        min_subjects=min_subjects,
        min_positives=min_positives,
        n_per_subject=cap,
        seed=seed,
        tasks=counted,
        problems=problems,
    )


def format_tasks(report: TasksReport) -> str:
    """Two tables, one line per task and horizon, rows / subjects / positives per split: every
    labelled row (ACES's, as aces-cli counts them), then what the evaluation takes."""
    cap = "every row" if report.n_per_subject is None else f"up to {report.n_per_subject} rows per subject"
    head = (
        f"tasks           rows / subjects / positives per split: every labelled row (ACES's rows, as aces-cli "
        f"gives them); minimum {report.min_subjects} subjects per split ({MIN_SUBJECTS_KEY}), "
        f"{report.min_positives} positive and negative rows in {HELD_OUT_SPLIT} ({MIN_POSITIVES_KEY})"
    )
    if not report.tasks:
        return head + "\n  (no task counted)"
    lines = [head, *_count_lines(report.tasks, lambda c: c.splits)]
    lines.append(
        f"evaluated       the rows the site's evaluation takes: train and tuning {cap} (seed {report.seed}: "
        f"what probes are fitted and tuned on), {HELD_OUT_SPLIT} every labelled row (what is scored)"
    )
    lines += _count_lines(report.tasks, lambda c: c.evaluated if c.evaluated is not None else c.splits)
    return "\n".join(lines)


def _count_lines(tasks: Sequence[TaskCounts], splits_of: Callable[[TaskCounts], dict[str, SplitCounts]]) -> list[str]:
    names = [f"{_label(c)}{' (site labels)' if c.source == 'site' else ''}" for c in tasks]
    width = max(len(n) for n in names + ["task"])
    cells = [
        [
            " / ".join(str(v) if v is not None else "-" for v in (s.rows, s.subjects, s.positives))
            for s in (splits_of(c)[k] for k in SPLITS)
        ]
        for c in tasks
    ]
    cw = [max(len(row[i]) for row in cells + [list(SPLITS)]) for i in range(len(SPLITS))]
    lines = ["  " + "task".ljust(width) + "  " + "  ".join(s.ljust(w) for s, w in zip(SPLITS, cw)).rstrip()]
    for name, row in zip(names, cells):
        lines.append("  " + name.ljust(width) + "  " + "  ".join(v.ljust(w) for v, w in zip(row, cw)).rstrip())
    return lines


__all__ = [
    "DEFAULT_MIN_POSITIVES",
    "DEFAULT_MIN_SUBJECTS",
    "SplitCounts",
    "TaskCounts",
    "TasksReport",
    "count_tasks",
    "format_tasks",
    "task_files",
]
