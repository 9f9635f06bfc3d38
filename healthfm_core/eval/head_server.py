"""The server's steps of the federated task head (healthfm_core/eval/federated_head.py), from
what the sites sent and nothing else:

- `pooled_standardizer`: the pooled train mean and scale from the sites' counts and sums;
- `initial_head`: zero weights and the pooled prevalence's log-odds as the bias (refused when
  the sites' train rows hold one class);
- `step_size`: the penalty of a C and one step size below every site's smoothness bound;
- `weighted_mean_head`: the next head, the n-weighted mean of the sites' heads (FedAvg; the
  Flower path computes it with ModalityAwareFedAvg's rule instead, server/head_average.py);
- `pooled_tuning_loss`: the mean tuning log-loss over every site's tuning rows.

Pure numpy: the one-process driver and the ServerApp (server/head_app.py) call these same
functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from healthfm_core.eval.probes import Standardizer
from healthfm_core.protocol.head import SiteStats


def pooled_standardizer(stats: Sequence[SiteStats]) -> Standardizer:
    """The pooled train mean and scale from each site's count, sums and sums of squares."""
    n = sum(s.n for s in stats)
    if n == 0:
        raise ValueError("federated head: no train rows at any site")
    total = sum(s.total for s in stats)
    squares = sum(s.squares for s in stats)
    mean = np.asarray(total) / n
    var = np.maximum(np.asarray(squares) / n - mean**2, 0.0)
    scale = np.sqrt(var)
    return Standardizer(mean, np.where(scale > 1e-12, scale, 1.0))


def initial_head(stats: Sequence[SiteStats], width: int) -> tuple[np.ndarray, float]:
    """Zero weights and the log-odds of the pooled prevalence (the intercept-only optimum)."""
    n = sum(s.n for s in stats)
    positives = sum(s.positives for s in stats)
    if positives in (0, n):
        raise ValueError(f"federated head: the sites' train rows have one class ({positives} positives)")
    prevalence = positives / n
    return np.zeros(width), float(np.log(prevalence / (1 - prevalence)))


def step_size(smoothness: Sequence[float], c: float, n_total: int, lr: float) -> tuple[float, float]:
    """The per-site penalty of C and the step size: `lr` / (the largest site's smoothness bound +
    the penalty's). A larger step diverges on correlated embeddings."""
    smooth = 0.25 * max(smoothness) + 0.25
    penalty = 1.0 / (2.0 * c * n_total)
    return penalty, lr / (smooth + 2.0 * penalty)


def weighted_mean_head(heads: Sequence[tuple[np.ndarray, float, int]], n_total: int) -> tuple[np.ndarray, float]:
    """The n-weighted mean of the sites' (weight, bias, n)."""
    w = np.sum([n * hw for hw, _, n in heads], axis=0) / n_total
    b = float(sum(n * hb for _, hb, n in heads) / n_total)
    return w, b


def pooled_tuning_loss(losses: Sequence[tuple[float, int]]) -> float:
    """The mean log-loss over every site's tuning rows from each site's (sum, count)."""
    total = sum(s for s, _ in losses)
    count = sum(n for _, n in losses)
    return total / max(count, 1)


__all__ = ["initial_head", "pooled_standardizer", "pooled_tuning_loss", "step_size", "weighted_mean_head"]
