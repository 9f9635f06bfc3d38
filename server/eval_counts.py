"""Evaluation counts bounded: what an evaluate reply may claim it scored, from what the site
declared at setup and what the evaluation asked. A reply over a bound is rejected whole (its
metrics, its histograms), named with the reason in the round's record (server/evaluation.py).

A task key's held-out rows are (subject, prediction_time) pairs, every labelled one scored (as
MEDS-DEV scores; the per-subject cap EvalConfig.n_per_subject applies to train and tuning only:
site_eval.task_labels_at_site). Its subjects are at most

  - the subjects the site declared at setup (SiteCapabilities.subjects: its subjects per modality,
    summed, since a subject may be counted once per modality it has, never more), and
  - with a subject budget (EvalConfig.max_subjects), that budget (per task and split);

its rows at most the site's timed rows declared at setup (SiteCapabilities.rows: event rows plus
wearable epochs; a prediction time is one of them) or, where the site declared none, n_per_subject
x its subjects bound. So per task key: n <= that row bound, subjects <= the subject bound,
available_subjects <= the declared subjects, positives <= n. Every count is an integer (EvalReply
parses strictly: a peer's 2.0 is not a count) and every metric finite or NaN in its range
(TaskMetrics); a score histogram adds up to the bounded n and its positives
(EvalReply._check_histograms), so the federation-wide AUROC pools only bounded counts. A site
without a subject bound (no declared subjects, no budget) or without a row bound (no declared rows
under n_per_subject "all") is rejected: its counts have no bound (fails closed). A row bound a site
declares itself is loose by nature; the robust summary beside each weighted mean (the median over
sites, server/evaluation.py) is what keeps one site's claim from moving the federation's figure.
"""

from __future__ import annotations

from typing import NamedTuple

from healthfm_core.protocol import EvalConfig, EvalReply, SiteCapabilities


class DeclaredCounts(NamedTuple):
    """What a site declared at setup that bounds its evaluate replies (None: nothing declared)."""

    subjects: int | None
    rows: int | None


def declared_counts(caps: SiteCapabilities | None) -> DeclaredCounts:
    """The most subjects and timed rows a site can hold by what it declared at setup."""
    if caps is None:
        return DeclaredCounts(None, None)
    subjects = sum(max(0, int(n)) for n in caps.subjects.values()) if caps.subjects else None
    return DeclaredCounts(subjects, int(caps.rows) if caps.rows > 0 else None)


def eval_count_problem(reply: EvalReply, cfg: EvalConfig, declared: DeclaredCounts) -> str | None:
    """Why an evaluate reply's counts cannot be what this site scored for this evaluation (the
    module docstring), or None. Names the field, the value and the bound."""
    bounds = {}
    if declared.subjects is not None:
        bounds["the subjects the site declared at setup"] = declared.subjects
    if cfg.max_subjects:
        bounds["the evaluation's subject budget (max_subjects)"] = cfg.max_subjects
    if not bounds:
        return "the site declared no subject count at setup and the evaluation has no subject budget: its counts have no bound"
    why, subjects = min(bounds.items(), key=lambda kv: kv[1])
    if declared.rows is not None:
        rows, rows_why = declared.rows, "the timed rows the site declared at setup"
    elif cfg.n_per_subject != "all":
        rows = cfg.n_per_subject * subjects
        rows_why = f"the most rows a site scores: n_per_subject {cfg.n_per_subject} x {subjects:,} subjects ({why})"
    else:
        return "the site declared no row count at setup and the evaluation scores every row: its counts have no bound"
    for task, m in sorted(reply.tasks.items()):
        if m.n > rows:
            return f"field {task}.n: value {m.n:,} > {rows:,}, {rows_why}"
        if m.subjects is not None and m.subjects > subjects:
            return f"field {task}.subjects: value {m.subjects:,} > {subjects:,} ({why})"
        if (
            declared.subjects is not None
            and m.available_subjects is not None
            and m.available_subjects > declared.subjects
        ):
            return (
                f"field {task}.subjects-available: value {m.available_subjects:,} > {declared.subjects:,} "
                "(the subjects the site declared at setup)"
            )
    return None


__all__ = ["DeclaredCounts", "declared_counts", "eval_count_problem"]
