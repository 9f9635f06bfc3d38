"""A federation-wide AUROC per task from the sites' released score histograms (no score leaves a site).

Each site releases, per binary task, cells of base bins [lo, hi) of the server's grid with their
positives and negatives (healthfm_core/eval/score_histogram.py). Sites merge small cells their
own way, so one site's cell may straddle another's; the pooled table keeps every distinct cell
(the counts of cells equal across sites summed) and compares cells, not bins:

    K(a, b) = 1    a positive's cell lies wholly above a negative's (a.lo >= b.hi)
            = 0    wholly below (a.hi <= b.lo)
            = 1/2  otherwise (the same bin, or overlapping runs: a tie, as in Mann-Whitney)
    AUROC   = sum_ab pos_a neg_b K(a, b) / (P N)

With every site on the same cells this is the Mann-Whitney AUROC of the scores rounded to their
bins, ties counting one half. The cost of binning is bounded from the table itself: a pair in
the same or overlapping cells is counted 1/2 and is really 0 or 1, so the AUROC of the exact
pooled scores lies within `binning_bound` = 1/2 sum_{K=1/2} pos_a neg_b / (P N) of it.

The interval: DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988) on the binned table, which
with ties is the midrank U-statistic variance: each positive's placement v_a = sum_b neg_b K / N,
each negative's w_b = sum_a pos_a K / P, var = S_v / P + S_w / N. It needs only the table (a
bootstrap would resample rows the server never sees, and a multinomial bootstrap per bin is
slower for the same asymptotics); Hanley-McNeil assumes a score distribution, DeLong does not.
DeLong treats rows as independent, but a subject contributes up to `n_per_subject` rows; the
variance is multiplied by rows / subjects over the pooled sites (the design effect when a
subject's rows are perfectly correlated and subjects have equal rows: conservative for the
usual case). The 95% interval is Wald on the logit of the AUROC (it stays inside (0, 1)); it is
NaN (undefined) when the AUROC is 0 or 1 or the variance is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

Z95 = 1.959963984540054


class Cell(NamedTuple):
    """A run of base bins [lo, hi) of the grid and its positives and negatives (a site's released
    counts, or fewer where its share of the pool is capped: healthfm_core/protocol/site_share.py)."""

    lo: int
    hi: int
    positives: float
    negatives: float


class PooledAUROC(NamedTuple):
    auroc: float
    low: float  # 95% interval; NaN: undefined
    high: float
    se: float  # standard error of the AUROC (after the design effect)
    binning_bound: float  # |exact pooled AUROC - auroc| <= this
    positives: int
    negatives: int
    design_effect: float


def cells_of(bounds: Sequence[int], positives: Sequence[int], negatives: Sequence[int]) -> list[Cell]:
    """The cells of one released histogram."""
    return [Cell(bounds[i], bounds[i + 1], positives[i], negatives[i]) for i in range(len(positives))]


def pool_cells(cells: Iterable[Cell]) -> list[Cell]:
    """Cells of several sites summed where their bin runs are the same, empty cells dropped."""
    sums: dict[tuple[int, int], list[float]] = {}
    for c in cells:
        if c.lo >= c.hi or c.positives < 0 or c.negatives < 0:
            raise ValueError(f"cell {c}: needs lo < hi and non-negative counts")
        row = sums.setdefault((c.lo, c.hi), [0, 0])
        row[0] += c.positives
        row[1] += c.negatives
    return [Cell(lo, hi, p, n) for (lo, hi), (p, n) in sorted(sums.items()) if p or n]


def _kernel(cells: Sequence[Cell]) -> np.ndarray:
    """K[a, b] for a positive in cell a against a negative in cell b."""
    lo = np.array([c.lo for c in cells])
    hi = np.array([c.hi for c in cells])
    above = lo[:, None] >= hi[None, :]
    below = hi[:, None] <= lo[None, :]
    return np.where(above, 1.0, np.where(below, 0.0, 0.5))


def pooled_auroc(cells: Iterable[Cell], design_effect: float = 1.0) -> PooledAUROC:
    """The AUROC of the pooled binned scores, its DeLong 95% interval (variance times
    `design_effect`, >= 1) and the bound on its distance to the exact pooled AUROC (module
    docstring). ValueError when a class has no rows."""
    if not design_effect >= 1.0:
        raise ValueError(f"design effect: value {design_effect}: at least 1")
    table = pool_cells(cells)
    pos = np.array([c.positives for c in table], dtype=np.float64)
    neg = np.array([c.negatives for c in table], dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"pooled AUROC needs both classes: {int(n_pos)} positives, {int(n_neg)} negatives")
    k = _kernel(table)
    v = k @ neg / n_neg  # each positive's placement among the negatives
    w = pos @ k / n_pos  # each negative's placement among the positives
    auc = float(pos @ v / n_pos)
    bound = float(0.5 * (pos @ (k == 0.5).astype(np.float64) @ neg) / (n_pos * n_neg))
    s_v = float(pos @ (v - auc) ** 2 / (n_pos - 1)) if n_pos > 1 else 0.0
    s_w = float(neg @ (w - auc) ** 2 / (n_neg - 1)) if n_neg > 1 else 0.0
    var = (s_v / n_pos + s_w / n_neg) * design_effect
    se = float(np.sqrt(var))
    low = high = float("nan")
    if 0.0 < auc < 1.0 and se > 0:
        centre, half = np.log(auc / (1 - auc)), Z95 * se / (auc * (1 - auc))
        low, high = (float(1 / (1 + np.exp(-x))) for x in (centre - half, centre + half))
    return PooledAUROC(auc, low, high, se, bound, int(n_pos), int(n_neg), float(design_effect))


__all__ = ["Z95", "Cell", "PooledAUROC", "cells_of", "pool_cells", "pooled_auroc"]
