"""A site's own steps of the federated task head (healthfm_core/eval/federated_head.py): what
it computes on its rows, and the few numbers that leave it.

- `site_stats`: its train rows' count, positives, feature sums and sums of squares (for the
  pooled standardisation and the starting bias; no row);
- `site_smoothness`: the mean squared norm of its standardised train rows (the server's step
  size must stay below every site's smoothness bound);
- `local_steps`: from the global head, `steps` full-batch gradient steps on its objective;
- `tuning_loss`: its tuning rows' log-loss sum and count under a head.

Pure numpy: the one-process driver and the site's Flower ClientApp (client/head_app.py) call
these same functions, so both paths compute the same head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from healthfm_core.protocol.head import SiteStats


@dataclass
class SiteSplits:
    """One site's embeddings and labels of a task's train and tuning splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_tune: np.ndarray
    y_tune: np.ndarray
    # Each train row's subject (the privacy unit of the head's DP rounds); None: not known, and
    # the site then refuses a DP round.
    train_subjects: np.ndarray | None = None


def sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def site_stats(x_train: np.ndarray, y_train: np.ndarray) -> SiteStats:
    """The count, positives, sums and sums of squares of a site's train rows."""
    x = np.asarray(x_train, np.float64)
    return SiteStats(
        n=len(y_train),
        positives=int(np.asarray(y_train, bool).sum()),
        total=x.sum(axis=0),
        squares=(x**2).sum(axis=0),
    )


def site_smoothness(xs: np.ndarray) -> float:
    """The mean squared norm of a site's standardised train rows: 4 x its mean log-loss's
    smoothness bound (the Hessian's largest eigenvalue is at most its trace)."""
    return float(np.mean(np.sum(xs**2, axis=1)))


def local_steps(
    xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, penalty: float, steps: int, lr: float
) -> tuple[np.ndarray, float]:
    """`steps` full-batch gradient steps on mean log-loss + penalty ||w||^2 from (w, b)."""
    for _ in range(steps):
        r = (sigmoid(xs @ w + b) - y) / len(y)
        w = w - lr * (xs.T @ r + 2.0 * penalty * w)
        b = b - lr * float(r.sum())
    return w, b


def tuning_loss(xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    """The log-loss sum of standardised rows under the head (w, b)."""
    z = xs @ w + b
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


__all__ = [
    "SiteSplits",
    "local_steps",
    "sigmoid",
    "site_smoothness",
    "site_stats",
    "tuning_loss",
]
