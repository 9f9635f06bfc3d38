"""A site's score histogram as it may leave the site: the grid's counts, small cells merged
(healthfm_core/eval/score_histogram.py), as the reply's ScoreHistogram, or the kind of why not."""

from __future__ import annotations

import numpy as np

from healthfm_core.eval.score_histogram import (
    merge_for_subjects,
    merge_small_cells,
    score_bin_index,
    score_histogram,
    withheld_kind,
)
from healthfm_core.protocol import ScoreHistogram, ScoreScale, WithheldKind
from healthfm_core.terms.report_floor import class_subjects


def release_histogram(
    y: np.ndarray, p: np.ndarray, subject: np.ndarray, n_bins: int, scale: ScoreScale, minimum: int
) -> ScoreHistogram | WithheldKind:
    """Held-out labels `y` and probabilities `p` (of the rows of `subject`) counted per class on
    the server's grid and merged until every count is 0 or >= `minimum` rows from as many
    distinct subjects (the stricter of the site's minimums); or why it may not leave (a class
    with 1..minimum-1 rows or subjects)."""
    hist = score_histogram(y, p, n_bins, scale)
    merged = merge_small_cells(hist, minimum)
    if merged is not None:
        merged = merge_for_subjects(merged, score_bin_index(p, n_bins, scale), y, subject, minimum)
    if merged is None:
        kind = withheld_kind(hist, minimum)
        if kind is None:  # enough rows, too few subjects
            positives, negatives = class_subjects(y, subject)
            kind = "positives_below_minimum" if 0 < positives < minimum else "negatives_below_minimum"
        return kind
    return ScoreHistogram(bounds=merged.bounds, positives=merged.positives, negatives=merged.negatives, minimum=minimum)


__all__ = ["release_histogram"]
