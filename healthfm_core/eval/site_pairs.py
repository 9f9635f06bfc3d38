"""What a comparison report can say about each (site, task) pair, and the per-task table.

A report compares methods (federated, centralized, ...) site by site on the rows each site's own
evaluation labels. Every pair gets its per-split rows, subjects and positives; a pair the sites'
privacy minimum would withhold (site_eval.withheld_reason: too few subjects in a split, or a
single class in train or held_out) is shown as withheld with the key `min_report_subjects` and
its value, and its scores are taken out of every table and mean, never silently dropped. The main
table is per task: the mean over the sites of each method's AUROC, with a subject-bootstrap 95%
interval (metrics.paired_resamples draws every site's subjects at once), on the pairs that every
method scored with at least `min_positives` held-out positives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from healthfm_core.data.checks.report_floor import class_subjects
from healthfm_core.data.files.layout import HELD_OUT_SPLIT, SPLITS
from healthfm_core.eval.metrics import MIN_INTERVAL_SUBJECTS, paired_resamples
from healthfm_core.eval.report import ResultRow, auroc_cell
from healthfm_core.eval.runner import EvalSet, MethodResult, task_display
from healthfm_core.eval.site_eval import withheld_reason
from healthfm_core.protocol import SMALL_CELL, SplitCount

PRIVACY_KEY = "min_report_subjects"  # the site setting (federation.site.min_report_subjects) the minimum comes from
POSITIVES_KEY = "min_report_positives"  # the site setting of the held-out positives' (and negatives') minimum


class PairStatus(BaseModel):
    """One (site, task key): rows, subjects and positives per split, and why it is withheld."""

    model_config = ConfigDict(frozen=True)
    site: str
    key: str
    task: str
    horizon: int | None
    splits: dict[str, SplitCount]
    withheld: str | None = None  # the reason, naming min_report_subjects and its value; None: reported
    minimum: int = 0  # min_report_subjects: a withheld pair's counts below it are shown as "<minimum"


def split_counts(data: EvalSet, key: str) -> dict[str, SplitCount]:
    """Rows, distinct subjects and positives of task `key` per split of one site's EvalSet."""
    y = data.labels(key)
    have = np.isfinite(y)
    split, subject = data.column("split"), data.column("subject_id")
    out = {}
    for s in SPLITS:
        mine = have & (split == s)
        positive, negative = class_subjects(y[mine] > 0.5, subject[mine])
        out[s] = SplitCount(
            rows=int(mine.sum()),
            subjects=len(np.unique(subject[mine])),
            positives=int(np.nansum(y[mine])),
            positive_subjects=positive,
            negative_subjects=negative,
        )
    return out


def held_out_classes(data: EvalSet, key: str) -> tuple[int, int]:
    """(subjects with a positive row, with a negative row) of task `key`'s held_out split."""
    y = data.labels(key)
    held = np.isfinite(y) & (data.column("split") == HELD_OUT_SPLIT)
    return class_subjects(y[held] > 0.5, data.column("subject_id")[held])


def pair_statuses(
    sites: Mapping[str, EvalSet], min_subjects: int, min_positives: int = 1
) -> dict[tuple[str, str], PairStatus]:
    """Every (site, task key) of the per-site EvalSets with its counts and, where the sites'
    rule (site_eval.withheld_reason, with both of the sites' minimums) gives no reportable
    metric, the reason."""
    out: dict[tuple[str, str], PairStatus] = {}
    for site, data in sites.items():
        for key, task in data.tasks.items():
            counts = split_counts(data, key)
            reason = withheld_reason(
                counts,
                min_subjects,
                binary=True,
                min_positives=min_positives,
                held_out_classes=held_out_classes(data, key),
            )
            name, horizon = task_display(task)
            out[(site, key)] = PairStatus(
                site=site,
                key=key,
                task=name,
                horizon=horizon,
                splits=counts,
                minimum=min_subjects,
                withheld=None
                if reason is None
                else f"withheld ({PRIVACY_KEY}={min_subjects}, {POSITIVES_KEY}={min_positives}): {reason.describe()}",
            )
    return out


def withhold(
    per_site: Mapping[str, Mapping[str, MethodResult]], statuses: Mapping[tuple[str, str], PairStatus]
) -> None:
    """Take the scores of withheld pairs out of every method's results (in place): their rows,
    predictions and scored rows go, and `skipped` says why."""
    for site, methods in per_site.items():
        gone = {k: s for (st, k), s in statuses.items() if st == site and s.withheld}
        shown = {(s.task, s.horizon) for s in gone.values()}
        for result in methods.values():
            result.rows = [r for r in result.rows if (r.task, r.horizon) not in shown]
            for key, status in gone.items():
                result.predictions.pop(key, None)
                result.scored_rows.pop(key, None)
                result.skipped[key] = str(status.withheld)


class TaskSummaryRow(BaseModel):
    """One method on one task key: the mean over sites of the held-out AUROC, with its interval."""

    model_config = ConfigDict(frozen=True)
    method: str
    key: str
    task: str
    horizon: int | None
    sites: int  # sites averaged
    n: int  # held-out rows summed over those sites
    n_pos: int
    auroc: float
    auroc_ci: tuple[float, float]
    auroc_ci_undefined: str | None = None
    ece: float


def _row_of(result: MethodResult, status: PairStatus) -> ResultRow | None:
    return next((r for r in result.rows if (r.task, r.horizon) == (status.task, status.horizon)), None)


def task_summary(
    per_site: Mapping[str, Mapping[str, MethodResult]],
    sites: Mapping[str, EvalSet],
    statuses: Mapping[tuple[str, str], PairStatus],
    methods: Sequence[str],
    min_positives: int,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[list[TaskSummaryRow], dict[str, str]]:
    """Per task key and method: the mean AUROC over the sites where every method scored the pair
    and it has at least `min_positives` held-out positives, with a percentile interval from one
    subject bootstrap over those sites' held-out rows (a resample that leaves a site one class
    drops that site from that resample's mean only). Returns the rows and, per task key with no
    such site, why it is not in the table."""
    rows: list[TaskSummaryRow] = []
    missing: dict[str, str] = {}
    keys = list(dict.fromkeys(k for (_, k) in statuses))
    for key in keys:
        chosen = []
        for site in sites:
            status = statuses.get((site, key))
            if status is None or status.withheld:
                continue
            if status.splits[HELD_OUT_SPLIT].positives < min_positives:
                continue
            res = per_site.get(site, {})
            if all(m in res and key in res[m].predictions and _row_of(res[m], status) for m in methods):
                chosen.append((site, status))
        if not chosen:
            missing[key] = f"no site has the pair reported for every method with >= {min_positives} held-out positives"
            continue
        for method in methods:
            items, scored = [], []
            for site, status in chosen:
                result = per_site[site][method]
                y, p = result.predictions[key]
                subject = sites[site].subject_keys()[result.scored_rows[key]]
                items.append((np.asarray(y, bool), np.asarray(p, float), np.asarray(p, float), subject))
                scored.append(_row_of(result, status))
            point, _, boot, _ = paired_resamples(items, n_boot=n_boot, seed=seed)
            finite = np.isfinite(boot)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.where(finite, boot, 0.0).sum(axis=1) / finite.sum(axis=1)
            means = means[np.isfinite(means)]
            ci, why = (float("nan"), float("nan")), None
            n_pos = int(sum(r.n_pos for r in scored if r is not None))
            if len(means) == 0:
                why = "no resample kept both classes at any site"
            else:
                lo, hi = (float(v) for v in np.quantile(means, [0.025, 0.975]))
                if lo == hi:
                    why = f"all {n_boot} resamples gave {lo:.3f}: too few subjects for an interval"
                else:
                    ci = (lo, hi)
            if n_pos < MIN_INTERVAL_SUBJECTS and why is None:
                ci, why = (float("nan"), float("nan")), f"{n_pos} held-out positive(s)"
            ece = [r.ece for r in scored if r is not None and np.isfinite(r.ece)]
            rows.append(
                TaskSummaryRow(
                    method=method,
                    key=key,
                    task=chosen[0][1].task,
                    horizon=chosen[0][1].horizon,
                    sites=len(chosen),
                    n=int(sum(r.n for r in scored if r is not None)),
                    n_pos=n_pos,
                    auroc=float(np.mean(point)),
                    auroc_ci=ci,
                    auroc_ci_undefined=why,
                    ece=float(np.mean(ece)) if ece else float("nan"),
                )
            )
    return rows, missing


def _f(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def _ci(lo: float, hi: float, why: str | None) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else f"undefined: {why or 'n/a'}"


def task_table(rows: Sequence[TaskSummaryRow], missing: Mapping[str, str]) -> str:
    """Markdown: one line per (task, horizon, method), then each task left out and why."""
    lines = [
        "| task | horizon (d) | method | sites | held-out rows | positives | mean AUROC | 95% CI | mean ECE |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.horizon if r.horizon is not None else '-'} | {r.method} | {r.sites} | {r.n} | "
            f"{r.n_pos} | {_f(r.auroc)} | {_ci(*r.auroc_ci, r.auroc_ci_undefined)} | {_f(r.ece)} |"
        )
    for key, why in missing.items():
        lines.append(f"| {key} | - | - | 0 | - | - | - | not in this table: {why} | - |")
    return "\n".join(lines)


def pair_table(
    per_site: Mapping[str, Mapping[str, MethodResult]],
    statuses: Mapping[tuple[str, str], PairStatus],
    methods: Sequence[str],
) -> str:
    """Markdown: one line per (site, task key), every site and pair kept: held-out rows, subjects
    and positives, each method's AUROC with its interval (or why there is none), and why a pair
    is withheld."""
    lines = [
        "| site | task | horizon (d) | held-out rows | held-out subjects | positives | "
        + " | ".join(methods)
        + " | note |",
        "|---|---|---:|---:|---:|---:|" + "---|" * (len(methods) + 1),
    ]
    for (site, key), s in statuses.items():
        # A withheld pair's counts as the site would show them: below the minimum, "<minimum".
        held = s.splits[HELD_OUT_SPLIT].suppressed(s.minimum) if s.withheld else s.splits[HELD_OUT_SPLIT]

        def n(value: int, minimum: int = s.minimum) -> str:
            return f"<{minimum}" if value == SMALL_CELL else str(value)

        cells = []
        for m in methods:
            res = per_site.get(site, {}).get(m)
            row = None if res is None or s.withheld else _row_of(res, s)
            if s.withheld:
                cells.append("withheld")
            elif row is not None:
                cells.append(auroc_cell(row))
            elif res is not None and key in res.skipped:
                cells.append(f"not evaluated: {res.skipped[key]}")
            else:
                cells.append("not evaluated")
        lines.append(
            f"| {site} | {s.task} | {s.horizon if s.horizon is not None else '-'} | {n(held.rows)} | "
            f"{n(held.subjects)} | {n(held.positives)} | " + " | ".join(cells) + f" | {s.withheld or ''} |"
        )
    return "\n".join(lines)


__all__ = [
    "PRIVACY_KEY",
    "PairStatus",
    "TaskSummaryRow",
    "pair_statuses",
    "pair_table",
    "split_counts",
    "task_summary",
    "task_table",
    "withhold",
]
