"""Every (site, task) of an evaluation, with its metric or the reason it has none: the lines the
server's log and summary and the simulation reports print from the sites' EvalReplies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from healthfm_core.protocol import MIN_POSITIVES_KEY, MIN_SUBJECTS_KEY, SMALL_CELL, EvalReply, TaskMetrics

NOT_REPLIED = "no reply from this site (see the server log)"
NOT_REPORTED = "not in the site's reply"


def _f(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _count(n: int) -> str:
    return "<min" if n == SMALL_CELL else str(n)


def scored_counts(reply: EvalReply | None, key: str) -> tuple[str, str]:
    """(held-out rows, positives) behind a (site, task)'s metric: "<min" for a count the site
    suppressed (1..its minimum-1), "-" where there is no metric or the site does not say."""
    m = None if reply is None else reply.tasks.get(key)
    if m is None:
        return "-", "-"
    return str(m.n), "-" if m.positives is None else _count(m.positives)


def outcome(reply: EvalReply | None, key: str, absent: str | None = None) -> tuple[str, str]:
    """(result, detail) of one (site, task key): a metric, or "no metric" and the reason
    (`absent`: why the server has no reply from the site, when it knows)."""
    if reply is None:
        return "no metric", NOT_REPLIED if absent is None else f"no reply from this site: {absent}"
    if (m := reply.tasks.get(key)) is not None:
        # A subject budget smaller than the split: say what the number is from.
        held = f"n={m.n} held-out" + (
            f" (a subject sample: rows of {m.subjects} of {m.available_subjects} held-out subjects)"
            if sampled(reply, m)
            else ""
        )
        if m.r2 is not None:
            return f"R2 {_f(m.r2)}", held + floor(reply, binary=False)
        interval = f" [{_f(m.auroc_low)}, {_f(m.auroc_high)}]" if m.auroc_low is not None else ""
        positives = "" if m.positives is None else f", {_count(m.positives)} positives"
        baseline = baseline_auprc = ""
        if m.meds_tab_auroc is not None:  # the field's tabular baseline on the same rows
            tab_interval = (
                f" [{_f(m.meds_tab_auroc_low)}, {_f(m.meds_tab_auroc_high)}]"
                if m.meds_tab_auroc_low is not None
                else ""
            )
            baseline = f"; MEDS-Tab AUROC {_f(m.meds_tab_auroc)}{tab_interval}"
            baseline_auprc = f", MEDS-Tab AUPRC {_f(m.meds_tab_auprc)}"
        return (
            f"AUROC {_f(m.auroc)}{interval}{baseline}",
            f"AUPRC {_f(m.auprc)}{baseline_auprc}, ECE {_f(m.ece)}, {held}{positives}" + floor(reply, binary=True),
        )
    if (r := reply.reasons.get(key)) is not None:
        return "no metric", r.describe()
    return "no metric", NOT_REPORTED


def floor(reply: EvalReply, binary: bool) -> str:
    """The privacy floor the site applied to its metrics, when it says (", min_report_subjects
    20, min_report_positives 10"); a regression has no positives, so only the subjects."""
    parts = [f"{MIN_SUBJECTS_KEY} {reply.min_subjects}"] if reply.min_subjects else []
    if binary and reply.min_positives:
        parts.append(f"{MIN_POSITIVES_KEY} {reply.min_positives}")
    return "".join(f", {p}" for p in parts)


def outcome_rows(
    keys: Sequence[str],
    per_site: Mapping[str, EvalReply],
    sites: Sequence[str] | None = None,
    absent: Mapping[str, str] | None = None,
) -> list[tuple[str, str, str, str]]:
    """(site, task, result, detail) for every asked site (those that replied when None), every
    site of `absent` (site -> why the server has no reply from it) and key."""
    absent = absent or {}
    names = sorted(set(sites or []) | set(per_site) | set(absent))
    return [(s, k, *outcome(per_site.get(s), k, absent.get(s))) for s in names for k in keys]


def outcome_lines(
    keys: Sequence[str],
    per_site: Mapping[str, EvalReply],
    sites: Sequence[str] | None = None,
    absent: Mapping[str, str] | None = None,
) -> list[str]:
    return [f"{s} / {k}: {res} ({detail})" for s, k, res, detail in outcome_rows(keys, per_site, sites, absent)]


def outcome_table(
    keys: Sequence[str],
    per_site: Mapping[str, EvalReply],
    sites: Sequence[str] | None = None,
    absent: Mapping[str, str] | None = None,
) -> str:
    """A markdown table: one row per (site, task), with the held-out rows and positives its
    number rests on ("<min": fewer than the site's minimum, not disclosed)."""
    lines = [
        "| site | task | held-out rows | positives | result (95% CI) | detail |",
        "|---|---|---|---|---|---|",
    ]
    for s, k, res, detail in outcome_rows(keys, per_site, sites, absent):
        rows, positives = scored_counts(per_site.get(s), k)
        lines.append(f"| {s} | {k} | {rows} | {positives} | {res} | {detail} |")
    return "\n".join(lines)


def sampled(reply: EvalReply, m: TaskMetrics) -> bool:
    """Whether the site scored a subject sample of the task's held-out split (a budget below its size)."""
    return bool(reply.max_subjects) and m.available_subjects is not None and m.available_subjects > reply.max_subjects


def scored_of_available(per_site: Mapping[str, EvalReply]) -> dict[str, tuple[int, int, int]]:
    """Per task that some site scored on a subject sample: held-out rows scored, subjects scored
    and held-out subjects the sites have, summed over the sites that reported the task."""
    sums: dict[str, list[int]] = {}
    cut: set[str] = set()
    for reply in per_site.values():
        for task, m in reply.tasks.items():
            subjects = m.subjects or 0
            row = sums.setdefault(task, [0, 0, 0])
            for i, v in enumerate((m.n, subjects, m.available_subjects or subjects)):
                row[i] += v
            if sampled(reply, m):
                cut.add(task)
    return {t: (v[0], v[1], v[2]) for t, v in sums.items() if t in cut}


def replies_from_event(event: Mapping) -> tuple[list[str], dict[str, EvalReply], list[str]]:
    """(task keys, replies by site, asked sites) of an `evaluate` event of rounds.jsonl (or of
    evaluation.json); task keys from the replies when the event predates `tasks`."""
    per_site = {s: EvalReply.from_records(flat) for s, flat in event.get("sites", {}).items()}
    keys = list(event.get("tasks") or sorted({k for r in per_site.values() for k in (*r.tasks, *r.reasons)}))
    return keys, per_site, list(event.get("asked_sites") or per_site)


__all__ = [
    "NOT_REPLIED",
    "floor",
    "NOT_REPORTED",
    "outcome",
    "outcome_lines",
    "outcome_rows",
    "outcome_table",
    "replies_from_event",
    "sampled",
    "scored_counts",
    "scored_of_available",
]
