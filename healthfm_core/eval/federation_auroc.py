"""Per binary task, the federation-wide AUROC of an evaluation: the sites' released score
histograms pooled (healthfm_core/eval/pooled_auroc.py), each site's positives and negatives
weighing at most SHARE_CAP_FACTOR x the other pooled sites' median of that class
(healthfm_core/protocol/site_share.py: a capped site's cells are scaled down to its weight), with
beside it the per-site table (each pooled site's rows, positives, its own AUROC and its weights),
the median of the sites' AUROCs (the robust summary) and, for every asked site not pooled, why.
What the server records (evaluation.json, rounds.jsonl), the summary, the model card and the
dashboard print; the server only gathers the replies and calls `federation_aurocs`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from healthfm_core.data.labels.task_spec import TaskSpec
from healthfm_core.eval.pooled_auroc import Cell, cells_of, pooled_auroc
from healthfm_core.protocol import EvalReply
from healthfm_core.protocol.site_share import SHARE_CAP_RULE, capped_weights

# The minimum behind a histogram is the stricter of the site's min_report_subjects and
# min_report_positives (site_eval.py).
_WITHHELD_TEXT = {
    "positives_below_minimum": "histogram withheld: fewer held-out positives than the site's minimum "
    "(min_report_subjects, min_report_positives)",
    "negatives_below_minimum": "histogram withheld: fewer held-out negatives than the site's minimum "
    "(min_report_subjects, min_report_positives)",
}


class PooledSite(BaseModel):
    """One pooled site's line of the per-site table: the rows and positives it claims, its own
    AUROC (None: not finite), and what its positives and negatives weigh in the pooled AUROC
    (its counts, or less where the share cap lowered them)."""

    model_config = ConfigDict(extra="forbid")

    rows: int
    positives: int
    auroc: float | None = None
    weight_positives: float
    weight_negatives: float

    @property
    def capped(self) -> bool:
        return self.weight_positives < self.positives or self.weight_negatives < self.rows - self.positives


class FederationAUROC(BaseModel):
    """One task's federation-wide AUROC; `auroc` None (with `note`) when it cannot be computed.
    `low`/`high`: its 95% DeLong interval (None: undefined); `binning_bound`: the exact pooled
    AUROC lies within this of `auroc`; `design_effect`: the variance's factor for a subject's
    several rows (held-out rows / subjects over the pooled sites). `rows` and `positives` are the
    pooled weights (the sites' claims where no cap applied); `per_site` the table beside it;
    `median_site_auroc` the median of the AUROCs of the sites that scored the task (the robust
    summary); `share_cap` the rule applied."""

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
    per_site: dict[str, PooledSite] = {}
    median_site_auroc: float | None = None
    share_cap: str = SHARE_CAP_RULE

    @property
    def capped_sites(self) -> list[str]:
        """The pooled sites whose weight the share cap lowered."""
        return [site for site, line in self.per_site.items() if line.capped]

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
            f" (binned: the exact pooled AUROC is within {self.binning_bound:.3f}{largest}){self.robust()}"
        )

    def capped_text(self) -> str:
        """The sites whose weight the share cap lowered: each class's claimed rows and weight
        ("none": no site capped)."""
        parts = []
        for site in self.capped_sites:
            line = self.per_site[site]
            parts.append(
                f"{site}: positives {line.positives:,} -> {line.weight_positives:,.0f}, "
                f"negatives {line.rows - line.positives:,} -> {line.weight_negatives:,.0f}"
            )
        return "; ".join(parts) or "none"

    def robust(self) -> str:
        """The robust summary and the cap, as a sentence after the pooled value ("" for a record
        from before the cap: no per-site table)."""
        if not self.per_site:
            return ""
        median = "n/a" if self.median_site_auroc is None else f"{self.median_site_auroc:.3f}"
        capped = ", ".join(self.capped_sites)
        cap = f"capped: {capped} ({self.share_cap})" if capped else f"no site capped ({self.share_cap})"
        return f"; median over sites {median}; {cap}"


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
    """Per binary task key, the pooled AUROC of the sites that released a histogram, each class
    of each site weighing at most its share cap (module docstring); every other site of `sites`
    (the asked ones; those that replied when None) and of `absent` (site -> why the server has
    no reply from it) with its reason."""
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
        own = [a for r in per_site.values() if (m := r.tasks.get(key)) is not None and (a := m.auroc) is not None]
        median = float(np.median([a for a in own if math.isfinite(a)])) if any(math.isfinite(a) for a in own) else None
        result = FederationAUROC(task=key, sites=pooled, not_pooled=why, median_site_auroc=median)
        if not pooled:
            out[key] = result.model_copy(update={"note": "no site released a score histogram"})
            continue
        out[key] = _pooled(result, {s: per_site[s] for s in pooled})
    return out


def _pooled(result: FederationAUROC, replies: Mapping[str, EvalReply]) -> FederationAUROC:
    """`result` with the pooled AUROC of `replies`' histograms of its task, each site's classes
    weighed by the share cap (capped sites' cells scaled down), and the per-site table."""
    key = result.task
    hists = {s: r.histograms[key] for s, r in replies.items()}
    pos = {s: sum(h.positives) for s, h in hists.items()}
    neg = {s: sum(h.negatives) for s, h in hists.items()}
    w_pos, w_neg = capped_weights(pos), capped_weights(neg)
    table = {}
    cells = []
    for s, h in hists.items():
        m = replies[s].tasks[key]
        auroc = m.auroc if m.auroc is not None and math.isfinite(m.auroc) else None
        table[s] = PooledSite(rows=m.n, positives=pos[s], auroc=auroc, weight_positives=w_pos[s], weight_negatives=w_neg[s])  # fmt: skip
        if table[s].capped:  # scaled to its weight; an uncapped site's cells stay as released
            fp, fn = (w_pos[s] / pos[s] if pos[s] else 0.0), (w_neg[s] / neg[s] if neg[s] else 0.0)
            cells += [Cell(c.lo, c.hi, c.positives * fp, c.negatives * fn) for c in cells_of(h.bounds, h.positives, h.negatives)]  # fmt: skip
        else:
            cells += cells_of(h.bounds, h.positives, h.negatives)
    weight = {s: w_pos[s] + w_neg[s] for s in hists}
    rows = sum(weight.values())
    positives = sum(w_pos.values())
    largest = max(hists, key=lambda s: (weight[s], s))
    # A subject's rows are correlated: the variance grows by rows per subject (docstring of
    # pooled_auroc); a site that does not say how many subjects it scored counts as one row each.
    # A capped site's subjects shrink with its rows.
    held_subjects = 0.0
    for s in hists:
        m = replies[s].tasks[key]
        held_subjects += (m.subjects if m.subjects is not None else m.n) * weight[s] / m.n
    deff = max(1.0, rows / held_subjects)
    shown_rows, shown_positives = round(rows), round(positives)
    result = result.model_copy(
        update={
            "per_site": table,
            "largest_site": largest,
            "largest_share": weight[largest] / rows,
            "rows": shown_rows,
            "positives": shown_positives,
        }
    )
    if positives in (0, rows):
        return result.model_copy(update={"note": "the pooled rows hold a single class"})
    r = pooled_auroc(cells, design_effect=deff)
    if r.binning_bound >= 0.5 - 1e-12:  # every positive-negative pair tied: 0.5 by construction
        return result.model_copy(
            update={
                "binning_bound": r.binning_bound,
                "note": "the sites' minimums merged every score into one cell: no ranking left to pool",
            }
        )
    return result.model_copy(
        update={
            "auroc": r.auroc,
            "low": _none_if_nan(r.low),
            "high": _none_if_nan(r.high),
            "binning_bound": r.binning_bound,
            "design_effect": r.design_effect,
        }
    )


__all__ = ["FederationAUROC", "PooledSite", "binary_keys", "federation_aurocs", "not_pooled_reason"]
