"""A task head trained across sites on a release's frozen embeddings: labels never leave a site.

The head is the logistic probe of healthfm_core/eval/probes.py (sklearn's convention: minimise
C * sum(log-loss) + ||w||^2 / 2 over every site's train rows, bias unpenalised), fitted by
federated averaging instead of on pooled rows:

- standardisation: each site sends its train rows' count, feature sums and sums of squares (no
  row); the mean and scale are the pooled ones;
- each round, every site starts from the global head and takes `local_steps` full-batch gradient
  steps (`lr` times 1 / a bound on the largest site's smoothness) on its own objective, mean log-loss + ||w||^2 / (2 C N) (N: all sites' train rows, so the
  sites' objectives, n-weighted, are the pooled one); the new head is the n-weighted mean of the
  sites' heads (FedAvg: what ModalityAwareFedAvg computes for a key every site holds);
- C: for each C of the grid (strongest penalty first, warm-started), the sites report their
  tuning log-loss sum and count; the C with the lowest pooled tuning log-loss is kept.

What leaves a site: those sums and counts, and its head's d + 1 numbers per round (no DP here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from healthfm_core.eval.probes import DEFAULT_C_GRID, LogisticProbe, Standardizer


@dataclass
class SiteSplits:
    """One site's embeddings and labels of a task's train and tuning splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_tune: np.ndarray
    y_tune: np.ndarray


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def federated_standardizer(sites: Sequence[SiteSplits]) -> Standardizer:
    """The pooled train mean and scale from each site's count, sums and sums of squares."""
    n = sum(len(s.y_train) for s in sites)
    if n == 0:
        raise ValueError("federated head: no train rows at any site")
    total = sum(np.asarray(s.x_train, np.float64).sum(axis=0) for s in sites)
    squares = sum((np.asarray(s.x_train, np.float64) ** 2).sum(axis=0) for s in sites)
    mean = total / n
    var = np.maximum(squares / n - mean**2, 0.0)
    scale = np.sqrt(var)
    return Standardizer(mean, np.where(scale > 1e-12, scale, 1.0))


def _local_steps(
    xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, penalty: float, steps: int, lr: float
) -> tuple[np.ndarray, float]:
    for _ in range(steps):
        r = (_sigmoid(xs @ w + b) - y) / len(y)
        w = w - lr * (xs.T @ r + 2.0 * penalty * w)
        b = b - lr * float(r.sum())
    return w, b


def _log_loss_sum(xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    z = xs @ w + b
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


def fit_federated_logistic(
    sites: Mapping[str, SiteSplits],
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    rounds: int = 200,
    local_steps: int = 5,
    lr: float = 1.0,
) -> tuple[LogisticProbe, dict[str, int]]:
    """The federated logistic head (see the module docstring) and the train rows each site gave."""
    usable = {name: s for name, s in sites.items() if len(s.y_train)}
    if not usable:
        raise ValueError("federated head: no site has train rows")
    y_all = np.concatenate([np.asarray(s.y_train, bool) for s in usable.values()])
    if y_all.all() or not y_all.any():
        raise ValueError(f"federated head: the sites' train rows have one class ({int(y_all.sum())} positives)")
    std = federated_standardizer(list(usable.values()))
    xs = {k: std.transform(s.x_train) for k, s in usable.items()}
    ys = {k: np.asarray(s.y_train, np.float64) for k, s in usable.items()}
    xt = {k: std.transform(s.x_tune) for k, s in sites.items() if len(s.y_tune)}
    yt = {k: np.asarray(sites[k].y_tune, np.float64) for k in xt}
    n = {k: len(v) for k, v in ys.items()}
    n_total = sum(n.values())
    d = std.mean.shape[0]
    prevalence = float(y_all.mean())
    w, b = np.zeros(d), float(np.log(prevalence / (1 - prevalence)))
    # One step size for every site, below 1 / the largest site's smoothness bound: the mean
    # log-loss's Hessian is at most 0.25 * X'X / n, whose largest eigenvalue is at most its trace
    # (each site's from the sums it already sent; a larger step diverges on correlated embeddings).
    smooth = 0.25 * max(float(np.mean(np.sum(v**2, axis=1))) for v in xs.values()) + 0.25
    best: LogisticProbe | None = None
    for c in sorted(c_grid):
        penalty = 1.0 / (2.0 * c * n_total)
        step = lr / (smooth + 2.0 * penalty)
        for _ in range(rounds):
            local = {k: _local_steps(xs[k], ys[k], w, b, penalty, local_steps, step) for k in xs}
            w = np.sum([n[k] * local[k][0] for k in local], axis=0) / n_total
            b = float(sum(n[k] * local[k][1] for k in local) / n_total)
        tune_n = sum(len(v) for v in yt.values())
        loss = sum(_log_loss_sum(xt[k], yt[k], w, b) for k in xt) / max(tune_n, 1)
        if best is None or loss < best.tuning_log_loss:
            best = LogisticProbe(std, w.copy(), b, c, float("nan"), loss)
    assert best is not None
    return best, n


__all__ = ["SiteSplits", "federated_standardizer", "fit_federated_logistic"]
