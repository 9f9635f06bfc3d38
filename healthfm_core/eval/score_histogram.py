"""What a site may release of its held-out probe scores: per class, counts on the server's grid.

The server fixes a grid of `n_bins` score bins (EvalConfig.score_bins, .score_scale; the grid's
names and the ScoreHistogram message: healthfm_core/protocol/); a site counts its held-out
positives and negatives per bin and merges adjacent bins (small-cell protection) until every
count it releases is 0 or at least its minimum, and then (`merge_for_subjects`) until each class's
rows in a cell come from 0 or at least the minimum of distinct subjects, as one subject may have
many rows: no cell describes 1 to minimum-1 subjects. A released histogram is a list of cells,
each a run of base bins [bounds[i], bounds[i+1]) with its counts. When a class has fewer rows
(or subjects) than the minimum in total, no merging can protect it and nothing is released
(`withheld_kind`).

Only bin indices matter downstream: the AUROC of binned scores is rank-based, so the pooled
AUROC (healthfm_core/eval/pooled_auroc.py) needs the cells, not the scores or the edges.

Scales: `logit` (default) spaces the interior edges evenly on the logit between -LOGIT_RANGE
and +LOGIT_RANGE, so probabilities of a rare outcome (most below 0.05) still spread over many
bins; `probability` spaces them evenly on [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from healthfm_core.protocol import SCORE_SCALES, ScoreScale, WithheldKind
from healthfm_core.terms.report_floor import class_subjects

LOGIT_RANGE = 6.0  # interior edges from sigmoid(-6) = 0.0025 to sigmoid(6) = 0.9975


class BinnedScores(NamedTuple):
    """Cells of a histogram: cell i holds base bins [bounds[i], bounds[i+1])."""

    bounds: list[int]
    positives: list[int]
    negatives: list[int]


def score_bin_edges(n_bins: int, scale: ScoreScale = "logit") -> np.ndarray:
    """The n_bins + 1 edges of the grid in probability, 0 first and 1 last."""
    if n_bins < 1:
        raise ValueError(f"score bins: value {n_bins}: at least 1")
    if scale == "probability":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if scale != "logit":
        raise ValueError(f"score scale: value {scale!r}: one of {', '.join(SCORE_SCALES)}")
    inner = 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, n_bins - 1)))
    return np.concatenate([[0.0], inner, [1.0]])


def score_bin_index(p: np.ndarray, n_bins: int, scale: ScoreScale = "logit") -> np.ndarray:
    """The base bin of each probability (a score on an interior edge falls in the bin above it)."""
    p = np.asarray(p, dtype=np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("scores must be probabilities in [0, 1]")
    return np.searchsorted(score_bin_edges(n_bins, scale)[1:-1], p, side="right")


def score_histogram(y: np.ndarray, p: np.ndarray, n_bins: int, scale: ScoreScale = "logit") -> BinnedScores:
    """Positives and negatives per base bin (one cell per bin, nothing merged: stays at the site)."""
    y = np.asarray(y).astype(bool)
    idx = score_bin_index(p, n_bins, scale)
    pos = np.bincount(idx[y], minlength=n_bins)
    neg = np.bincount(idx[~y], minlength=n_bins)
    return BinnedScores(list(range(n_bins + 1)), pos.tolist(), neg.tolist())


def _small(n: int, minimum: int) -> bool:
    return 0 < n < minimum


def merge_small_cells(hist: BinnedScores, minimum: int) -> BinnedScores | None:
    """Adjacent cells merged so that each cell's positives and negatives are each 0 or >= minimum,
    choosing, of all such merges, one that loses the least ranking: the fewest (positive,
    negative) pairs tied inside a cell (sum of positives x negatives, what the pooled AUROC's
    binning bound counts), then the most cells (dynamic programming over the cells' prefixes,
    O(cells^2)). None when a class's total is in 1..minimum-1 (no merge protects it: the
    histogram may not leave the site)."""
    if minimum < 1:
        raise ValueError(f"minimum: value {minimum}: at least 1")
    if withheld_kind(hist, minimum) is not None:
        return None
    pos = np.concatenate([[0], np.cumsum(hist.positives)])
    neg = np.concatenate([[0], np.cumsum(hist.negatives)])
    n = len(hist.positives)
    # best[j]: (tied pairs, -cells) of the best merge of the first j cells; prev[j]: its last cut.
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * n
    prev = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            if best[i] is None:
                continue
            p, q = int(pos[j] - pos[i]), int(neg[j] - neg[i])
            if _small(p, minimum) or _small(q, minimum):
                continue
            tied, cells = best[i]  # type: ignore[misc]
            cand = (tied + p * q, cells - 1)
            if best[j] is None or cand < best[j]:  # type: ignore[operator]
                best[j], prev[j] = cand, i
    cuts = [n]
    while cuts[-1]:
        cuts.append(prev[cuts[-1]])
    cuts.reverse()
    return BinnedScores(
        [hist.bounds[c] for c in cuts],
        [int(pos[b] - pos[a]) for a, b in zip(cuts, cuts[1:])],
        [int(neg[b] - neg[a]) for a, b in zip(cuts, cuts[1:])],
    )


def merge_for_subjects(
    hist: BinnedScores, bins: np.ndarray, y: np.ndarray, subject: np.ndarray, minimum: int
) -> BinnedScores | None:
    """`hist` (cells of base bins, merged by rows) merged further until every cell's positive rows
    and negative rows each come from 0 or at least `minimum` distinct subjects: held_out scores
    every labelled row, so one subject's many rows can fill a cell alone. `bins`, `y`, `subject`:
    each row's base bin, label and subject. A cell short of subjects joins the neighbour with fewer
    rows (the last one its left neighbour). None when a class has 1..minimum-1 subjects in all."""
    y = np.asarray(y).astype(bool)
    subject = np.asarray(subject)
    if any(0 < n < minimum for n in class_subjects(y, subject)):
        return None
    # Rows in bin order: a cell's rows are one slice, so a check costs the cell's rows only.
    order = np.argsort(bins, kind="stable")
    bins, y, subject = np.asarray(bins)[order], y[order], subject[order]
    bounds = list(hist.bounds)

    def rows_of(i: int) -> slice:
        start, stop = np.searchsorted(bins, bounds[i : i + 2])
        return slice(int(start), int(stop))

    def short(i: int) -> bool:
        cell = rows_of(i)
        return any(0 < n < minimum for n in class_subjects(y[cell], subject[cell]))

    i = 0
    while i < len(bounds) - 1:
        if len(bounds) == 2 or not short(i):
            i += 1
            continue
        sizes = [rows_of(j).stop - rows_of(j).start for j in (i - 1, i + 1) if 0 <= j < len(bounds) - 1]
        right = i + 1 < len(bounds) - 1 and (i == 0 or sizes[-1] <= sizes[0])
        del bounds[i + 1 if right else i]  # the cut between the cell and that neighbour
        i = max(i - 1, 0)  # the merged cell is checked again, and the one before it
    cell = np.searchsorted(bounds, bins, side="right") - 1
    pos = np.bincount(cell[y], minlength=len(bounds) - 1)
    neg = np.bincount(cell[~y], minlength=len(bounds) - 1)
    return BinnedScores(bounds, pos.tolist(), neg.tolist())


def withheld_kind(hist: BinnedScores, minimum: int) -> WithheldKind | None:
    """Why a histogram may not leave the site (None: it may, once merged)."""
    if _small(sum(hist.positives), minimum):
        return "positives_below_minimum"
    if _small(sum(hist.negatives), minimum):
        return "negatives_below_minimum"
    return None


__all__ = [
    "LOGIT_RANGE",
    "BinnedScores",
    "merge_for_subjects",
    "merge_small_cells",
    "score_bin_edges",
    "score_bin_index",
    "score_histogram",
    "withheld_kind",
]
