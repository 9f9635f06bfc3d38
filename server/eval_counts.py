"""Evaluation counts bounded: what an evaluate reply may claim it scored, from what the site
declared at setup and what the evaluation asked. A reply over a bound is rejected whole (its
metrics, its histograms), named with the reason in the round's record (server/evaluation.py).

A task key's rows are (subject, prediction_time) pairs, at most `n_per_subject` of a subject's
rows per key (EvalConfig.n_per_subject; the site caps every kind: site_eval.task_labels_at_site).
Its held-out subjects are at most

  - the subjects the site declared at setup (SiteCapabilities.subjects: its subjects per modality,
    summed, since a subject may be counted once per modality it has, never more), and
  - with a subject budget (EvalConfig.max_subjects), that budget (per task and split).

So per task key: n <= n_per_subject x that bound, subjects <= that bound, available_subjects <=
the declared subjects, positives <= n. Every count is an integer (EvalReply parses strictly:
a peer's 2.0 is not a count) and every metric finite or NaN in its range (TaskMetrics); a score
histogram adds up to the bounded n and its positives (EvalReply._check_histograms), so the
federation-wide AUROC pools only bounded counts. A site that declared no subject count, under
an evaluation without a subject budget, has no bound: its reply is rejected (fails closed).
"""

from __future__ import annotations

from healthfm_core.federation import EvalConfig, EvalReply, SiteCapabilities


def declared_subjects(caps: SiteCapabilities | None) -> int | None:
    """The most subjects a site can hold by what it declared at setup (None: it declared none)."""
    if caps is None or not caps.subjects:
        return None
    return sum(max(0, int(n)) for n in caps.subjects.values())


def eval_count_problem(reply: EvalReply, cfg: EvalConfig, declared: int | None) -> str | None:
    """Why an evaluate reply's counts cannot be what this site scored for this evaluation (the
    module docstring), or None. Names the field, the value and the bound."""
    bounds = {}
    if declared is not None:
        bounds["the subjects the site declared at setup"] = declared
    if cfg.max_subjects:
        bounds["the evaluation's subject budget (max_subjects)"] = cfg.max_subjects
    if not bounds:
        return "the site declared no subject count at setup and the evaluation has no subject budget: its counts have no bound"
    why, subjects = min(bounds.items(), key=lambda kv: kv[1])
    rows = cfg.n_per_subject * subjects
    for task, m in sorted(reply.tasks.items()):
        if m.n > rows:
            return (
                f"field {task}.n: value {m.n:,} > {rows:,}, the most rows a site scores: n_per_subject "
                f"{cfg.n_per_subject} x {subjects:,} subjects ({why})"
            )
        if m.subjects is not None and m.subjects > subjects:
            return f"field {task}.subjects: value {m.subjects:,} > {subjects:,} ({why})"
        if declared is not None and m.available_subjects is not None and m.available_subjects > declared:
            return (
                f"field {task}.subjects-available: value {m.available_subjects:,} > {declared:,} "
                "(the subjects the site declared at setup)"
            )
    return None


__all__ = ["declared_subjects", "eval_count_problem"]
