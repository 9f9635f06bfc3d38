"""Evaluation counts bounded: what an evaluate reply may claim it scored, from what the site
declared at setup and what the evaluation asked. A reply over a bound is rejected whole (its
metrics, its histograms), named with the reason in the round's record (server/evaluation.py).

A task key's held-out rows are (subject, prediction_time) pairs, every labelled one scored (as
MEDS-DEV scores; the per-subject cap EvalConfig.n_per_subject applies to train and tuning only:
site_eval.task_labels_at_site) up to EvalConfig.held_out_rows_per_subject of a subject's (a cap
no honest data reaches, which the site applies: healthfm_core/data/labels/tasks.py). Its subjects
are at most

  - the subjects the site declared at setup (SiteCapabilities.subjects: its subjects per modality,
    summed, since a subject may be counted once per modality it has, never more; each bounded by
    the protocol's maxima, healthfm_core/protocol/capabilities.py), and
  - with a subject budget (EvalConfig.max_subjects), that budget (per task and split);

its rows at most held_out_rows_per_subject x that subject bound, x the subjects the reply says
it scored, and the site's timed rows declared at setup (SiteCapabilities.rows). So per task key:
n <= each row bound, subjects <= the subject bound, available_subjects <= the declared
subjects, positives <= n. Every count is an integer (EvalReply parses strictly: a peer's 2.0 is
not a count) and every metric finite or NaN in its range (TaskMetrics); a score histogram adds
up to the bounded n and its positives (EvalReply._check_histograms), so the federation-wide
AUROC pools only bounded counts. A site without a subject bound (no declared subjects, no
budget) is rejected: its counts have no bound (fails closed).

These bounds stop absurd claims (10^9 rows), not plausible ones: a 150-subject site may still
claim up to 1024 x 150 rows. What keeps one site from setting the federation's figures is the cap
on its share of every pooled figure (healthfm_core/protocol/site_share.py), with the median over
sites and the per-site table beside each (server/evaluation.py).
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
    cap = cfg.held_out_rows_per_subject
    for task, m in sorted(reply.tasks.items()):
        rows = {
            f"held_out_rows_per_subject {cap:,} x {subjects:,} subjects ({why})": cap * subjects,
            **(
                {f"held_out_rows_per_subject {cap:,} x the {m.subjects:,} subjects it says it scored": cap * m.subjects}
                if m.subjects is not None
                else {}
            ),  # fmt: skip
            **({"the timed rows the site declared at setup": declared.rows} if declared.rows is not None else {}),
        }
        rows_why, limit = min(rows.items(), key=lambda kv: kv[1])
        if m.n > limit:
            return f"field {task}.n: value {m.n:,} > {limit:,}, {rows_why}"
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
