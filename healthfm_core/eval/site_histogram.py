"""A site's score histogram as it may leave the site: the grid's counts, small cells merged
(healthfm_core/eval/score_histogram.py), as the reply's ScoreHistogram, or the kind of why not."""

from __future__ import annotations

import numpy as np

from healthfm_core.eval.score_histogram import merge_small_cells, score_histogram, withheld_kind
from healthfm_core.protocol import ScoreHistogram, ScoreScale, WithheldKind


def release_histogram(
    y: np.ndarray, p: np.ndarray, n_bins: int, scale: ScoreScale, minimum: int
) -> ScoreHistogram | WithheldKind:
    """Held-out labels `y` and probabilities `p` counted per class on the server's grid and
    merged until every count is 0 or >= `minimum` (the site's minimum of subjects today; a
    minimum of positives would be passed the same way); or why it may not leave (a class with
    1..minimum-1 rows)."""
    hist = score_histogram(y, p, n_bins, scale)
    merged = merge_small_cells(hist, minimum)
    if merged is None:
        kind = withheld_kind(hist, minimum)
        assert kind is not None  # merge_small_cells gives None only then
        return kind
    return ScoreHistogram(bounds=merged.bounds, positives=merged.positives, negatives=merged.negatives, minimum=minimum)


__all__ = ["release_histogram"]
