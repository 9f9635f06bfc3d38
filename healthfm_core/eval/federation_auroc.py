"""Per binary task, the federation-wide AUROC of an evaluation: the sites' released score
histograms pooled (healthfm_core/eval/pooled_auroc.py), with the sites pooled and, for every
asked site not pooled, why. What the server records (evaluation.json, rounds.jsonl) and the
summary prints; the server only gathers the replies and calls `federation_aurocs`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from healthfm_core.data.labels.task_spec import TaskSpec
from healthfm_core.eval.pooled_auroc import cells_of, pooled_auroc
from healthfm_core.protocol import EvalReply

# The minimum behind a histogram is the stricter of the site's min_report_subjects and
# min_report_positives (site_eval.py).
_WITHHELD_TEXT = {
    "positives_below_minimum": "histogram withheld: fewer held-out positives than the site's minimum "
    "(min_report_subjects, min_report_positives)",
    "negatives_below_minimum": "histogram withheld: fewer held-out negatives than the site's minimum "
    "(min_report_subjects, min_report_positives)",
}


class FederationAUROC(BaseModel):
    """One task's federation-wide AUROC; `auroc` None (with `note`) when it cannot be computed.
    `low`/`high`: its 95% DeLong interval (None: undefined); `binning_bound`: the exact pooled
    AUROC lies within this of `auroc`; `design_effect`: the variance's factor for a subject's
    several rows (held-out rows / subjects over the pooled sites)."""

    model_config = ConfigDict(extra="forbid")

    task: str
    auroc: float | None = None
    low: float | None = None
    high: float | None = None
    binning_bound: float | None = None
    design_effect: float | None = None
    rows: int = 0
    positives: int = 0
    sites: list[str] = []  # pooled
    # The pooled site with the most rows and its share of the pooled rows: its weight here (each
    # site's rows are bounded by the server before pooling, server/eval_counts.py).
    largest_site: str = ""
    largest_share: float | None = None
    not_pooled: dict[str, str] = {}  # asked site -> why its rows are not in the pooled AUROC
    note: str = ""

    def describe(self) -> str:
        """One line: the value, interval, sites and rows, or why there is none."""
        if self.auroc is None:
            return f"none ({self.note})"
        interval = (
            f" [{self.low:.3f}, {self.high:.3f}]" if self.low is not None and self.high is not None else " [undefined]"
        )
        largest = (
            f"; largest share {self.largest_site} {100 * self.largest_share:.0f}% of rows"
            if self.largest_share is not None
            else ""
        )
        return (
            f"{self.auroc:.3f}{interval} over {len(self.sites)} site(s), {self.rows} rows, {self.positives} positives"
            f" (binned: the exact pooled AUROC is within {self.binning_bound:.3f}{largest})"
        )


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def not_pooled_reason(reply: EvalReply | None, key: str, absent: str | None = None) -> str | None:
    """Why this site's rows of `key` are not in the pooled AUROC (None: they are); `absent`: why
    the server has no reply from the site, when it knows."""
    if reply is None:
        return "no evaluation reply from this site" + ("" if absent is None else f": {absent}")
    if (r := reply.reasons.get(key)) is not None:
        return f"no metric: {r.describe()}"
    if (m := reply.tasks.get(key)) is None:
        return "not in the site's reply"
    if key in reply.histograms:
        return None
    if (kind := reply.histograms_withheld.get(key)) is not None:
        return _WITHHELD_TEXT[kind]
    if m.auroc is None:
        return "not a binary task at this site"
    return "no score histogram in the site's reply (score_bins 0, or a site without histograms)"


def binary_keys(specs: Sequence[TaskSpec]) -> list[str]:
    """The task keys of binary tasks (ACES and site labels; the wearable tasks are regressions)."""
    return [k for spec in specs if spec.kind != "wearable" for k in spec.keys()]


def federation_aurocs(
    keys: Sequence[str],
    per_site: Mapping[str, EvalReply],
    sites: Sequence[str] | None = None,
    absent: Mapping[str, str] | None = None,
) -> dict[str, FederationAUROC]:
    """Per binary task key, the pooled AUROC of the sites that released a histogram; every
    other site of `sites` (the asked ones; those that replied when None) and of `absent` (site
    -> why the server has no reply from it) with its reason."""
    absent = absent or {}
    names = sorted(set(sites or []) | set(per_site) | set(absent))
    out: dict[str, FederationAUROC] = {}
    for key in keys:
        pooled, why = [], {}
        for site in names:
            reason = not_pooled_reason(per_site.get(site), key, absent.get(site))
            if reason is None:
                pooled.append(site)
            else:
                why[site] = reason
        result = FederationAUROC(task=key, sites=pooled, not_pooled=why)
        if not pooled:
            out[key] = result.model_copy(update={"note": "no site released a score histogram"})
            continue
        hists = [per_site[s].histograms[key] for s in pooled]
        metrics = [per_site[s].tasks[key] for s in pooled]
        rows = sum(m.n for m in metrics)
        largest = max(zip(pooled, metrics, strict=True), key=lambda sm: (sm[1].n, sm[0]))
        result = result.model_copy(update={"largest_site": largest[0], "largest_share": largest[1].n / rows})
        subjects = [m.subjects for m in metrics]
        # A subject's rows are correlated: the variance grows by rows per subject (docstring of
        # pooled_auroc); a site that does not say how many subjects it scored counts as one row each.
        held_subjects = sum(s if s is not None else m.n for s, m in zip(subjects, metrics, strict=True))
        deff = max(1.0, rows / held_subjects)
        cells = [c for h in hists for c in cells_of(h.bounds, h.positives, h.negatives)]
        positives = sum(sum(h.positives) for h in hists)
        if positives in (0, rows):
            out[key] = result.model_copy(
                update={"rows": rows, "positives": positives, "note": "the pooled rows hold a single class"}
            )
            continue
        r = pooled_auroc(cells, design_effect=deff)
        if r.binning_bound >= 0.5 - 1e-12:  # every positive-negative pair tied: 0.5 by construction
            out[key] = result.model_copy(
                update={
                    "rows": rows,
                    "positives": positives,
                    "binning_bound": r.binning_bound,
                    "note": "the sites' minimums merged every score into one cell: no ranking left to pool",
                }
            )
            continue
        out[key] = result.model_copy(
            update={
                "auroc": r.auroc,
                "low": _none_if_nan(r.low),
                "high": _none_if_nan(r.high),
                "binning_bound": r.binning_bound,
                "design_effect": r.design_effect,
                "rows": rows,
                "positives": positives,
            }
        )
    return out


__all__ = ["FederationAUROC", "binary_keys", "federation_aurocs", "not_pooled_reason"]
