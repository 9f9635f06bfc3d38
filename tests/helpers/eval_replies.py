"""Evaluate replies for the evaluation bounds' and share cap's tests: an honest site's (its
histogram released as a site releases it) and a perfect-looking inflated one's, as the red team
built it (positives in the top bin, negatives in the bottom, adding up to its n)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from healthfm_core.eval.site_histogram import release_histogram
from healthfm_core.protocol import EvalReply, ScoreHistogram, TaskMetrics

KEY = "onset_t2d_365d"
BINS = 50


def honest_reply(seed: int, n: int, signal: float, prevalence: float = 0.3, subjects: int | None = None) -> EvalReply:
    """A site's reply on `n` held-out rows of `subjects` subjects (None: n // 3): logistic scores
    shifted by `signal` for the positives, its histogram merged to a minimum of 10."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + signal * y - 1.0)))
    h = release_histogram(y, p, np.arange(n), BINS, "logit", minimum=10)
    assert isinstance(h, ScoreHistogram)
    auc = float(roc_auc_score(y, p))
    metrics = TaskMetrics(
        n=n, auroc=auc, positives=int(y.sum()), subjects=subjects or n // 3, auroc_low=auc - 0.1, auroc_high=auc + 0.05
    )  # fmt: skip
    return EvalReply(tasks={KEY: metrics}, histograms={KEY: h})


def inflated_reply(n: int, subjects: int) -> EvalReply:
    """A perfect-looking site claiming `n` held-out rows of `subjects` subjects, half positive."""
    positives = n // 2
    h = ScoreHistogram(
        bounds=[0, 1, BINS - 1, BINS], positives=[0, 0, positives], negatives=[n - positives, 0, 0], minimum=10
    )
    metrics = TaskMetrics(n=n, auroc=0.999, positives=positives, subjects=subjects, auroc_low=0.99, auroc_high=1.0)
    return EvalReply(tasks={KEY: metrics}, histograms={KEY: h})
