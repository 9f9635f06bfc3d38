"""A task head trained across sites on a release's frozen embeddings: labels never leave a site.

The head is the logistic probe of healthfm_core/eval/probes.py (sklearn's convention: minimise
C * sum(log-loss) + ||w||^2 / 2 over every site's train rows, bias unpenalised), fitted by
federated averaging instead of on pooled rows:

- standardisation: each site sends its train rows' count, positives, feature sums and sums of
  squares (no row); the mean and scale are the pooled ones;
- each round, every site starts from the global head and takes `local_steps` full-batch gradient
  steps (`lr` times 1 / a bound on the largest site's smoothness) on its own objective, mean
  log-loss + ||w||^2 / (2 C N) (N: all sites' train rows, so the sites' objectives, n-weighted,
  are the pooled one); the new head is the n-weighted mean of the sites' heads (FedAvg: what
  ModalityAwareFedAvg computes for a key every site holds);
- C: for each C of the grid (strongest penalty first, warm-started), the sites report their
  tuning log-loss sum and count; the C with the lowest pooled tuning log-loss is kept.

What leaves a site: those sums and counts, its smoothness bound, and its head's d + 1 numbers per
round (over Flower the rounds may run DP-SGD at each site: healthfm_core/privacy/head.py). When
no site scores a C's head on its tuning rows (every site refused, e.g. its DP budget ran out) the
grid stops and the best C so far is kept; with none, no head.

`run_federated_head` is the protocol's one driver, over any `HeadSites`: the sites' steps are
healthfm_core/eval/head_site.py, the server's healthfm_core/eval/head_server.py. In one process
(`fit_federated_logistic`, `InProcessSites`) they are called directly; over Flower's Message API
the ServerApp (server/head_app.py) implements HeadSites with messages to each site's ClientApp
(client/head_app.py), which calls the same site steps. Both paths therefore compute one head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from healthfm_core.eval.head_server import (
    initial_head,
    pooled_standardizer,
    pooled_tuning_loss,
    step_size,
    weighted_mean_head,
)
from healthfm_core.eval.head_site import SiteSplits, local_steps, site_smoothness, site_stats, tuning_loss
from healthfm_core.eval.probes import DEFAULT_C_GRID, LogisticProbe, Standardizer
from healthfm_core.protocol.head import SiteStats

log = logging.getLogger("healthfm.head")

# A site's head after its local steps: weight, bias and its train rows (FedAvg's weight).
SiteHead = tuple[np.ndarray, float, int]
# The next global head from the sites' heads and the total train rows of the sites in the head.
Average = Callable[[Mapping[str, SiteHead], int], tuple[np.ndarray, float]]


class HeadSites(Protocol):
    """The sites as the driver sees them: each call is one stage asked of every site, answered
    by those that take part (a site that refuses or fails is absent from the answer)."""

    def stats(self) -> dict[str, SiteStats]: ...

    def setup(self, std: Standardizer) -> dict[str, float]: ...

    def train(self, w: np.ndarray, b: float, penalty: float, steps: int, lr: float) -> dict[str, SiteHead]: ...

    def tune(self, w: np.ndarray, b: float) -> dict[str, tuple[float, int]]: ...


@dataclass
class FederatedHeadResult:
    probe: LogisticProbe
    train_rows: dict[str, int]  # the train rows each site gave
    tuning: dict[float, float]  # C -> pooled tuning log-loss


def mean_of_heads(heads: Mapping[str, SiteHead], n_total: int) -> tuple[np.ndarray, float]:
    """The one-process averaging: the n-weighted mean of the sites' heads."""
    return weighted_mean_head(list(heads.values()), n_total)


def run_federated_head(
    sites: HeadSites,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    rounds: int = 200,
    local_steps: int = 5,
    lr: float = 1.0,
    average: Average = mean_of_heads,
) -> FederatedHeadResult:
    """The federated logistic head (see the module docstring) over `sites`."""
    stats = sites.stats()
    if not stats:
        raise ValueError("federated head: no site has train rows")
    std = pooled_standardizer(list(stats.values()))
    w, b = initial_head(list(stats.values()), std.mean.shape[0])
    n = {k: s.n for k, s in stats.items()}
    n_total = sum(n.values())
    smoothness = sites.setup(std)
    if not smoothness:
        raise ValueError("federated head: no site took the standardisation")
    log.info("federated head: %d site(s), %d train rows; C grid %s, %d rounds each", len(n), n_total, c_grid, rounds)
    best: LogisticProbe | None = None
    tuning: dict[float, float] = {}
    for c in sorted(c_grid):
        penalty, step = step_size(list(smoothness.values()), c, n_total, lr)
        for r in range(rounds):
            heads = sites.train(w, b, penalty, local_steps, step)
            if heads:  # a round no site answered keeps the head
                w, b = average(heads, n_total)
            if r == 0 or (r + 1) % max(rounds // 4, 1) == 0:
                log.info("federated head: C=%g round %d/%d: %d site(s), |w| %.4g, b %.4g",
                         c, r + 1, rounds, len(heads), float(np.linalg.norm(w)), b)  # fmt: skip
        scored = sites.tune(w, b)
        if not scored:  # every site refused or left (e.g. its DP budget ran out): no C from here is comparable
            log.warning("federated head: C=%g: no site scored the head on its tuning rows; the C grid stops here", c)
            break
        loss = pooled_tuning_loss(list(scored.values()))
        tuning[c] = loss
        log.info("federated head: C=%g pooled tuning log-loss %.6f", c, loss)
        if best is None or loss < best.tuning_log_loss:
            best = LogisticProbe(std, w.copy(), b, c, float("nan"), loss)
    if best is None:
        raise ValueError("federated head: no site scored a head on its tuning rows (every site refused or left)")
    log.info("federated head: C=%g chosen (tuning log-loss %.6f)", best.c, best.tuning_log_loss)
    return FederatedHeadResult(best, n, tuning)


class InProcessSites:
    """Every site's steps called directly in this process (a simulation of the protocol)."""

    def __init__(self, sites: Mapping[str, SiteSplits]) -> None:
        self.sites = sites
        self.usable = {name: s for name, s in sites.items() if len(s.y_train)}
        self.xs: dict[str, np.ndarray] = {}
        self.xt: dict[str, np.ndarray] = {}

    def stats(self) -> dict[str, SiteStats]:
        return {k: site_stats(s.x_train, s.y_train) for k, s in self.usable.items()}

    def setup(self, std: Standardizer) -> dict[str, float]:
        self.xs = {k: std.transform(s.x_train) for k, s in self.usable.items()}
        # A site without train rows still scores its tuning rows.
        self.xt = {k: std.transform(s.x_tune) for k, s in self.sites.items() if len(s.y_tune)}
        return {k: site_smoothness(x) for k, x in self.xs.items()}

    def train(self, w: np.ndarray, b: float, penalty: float, steps: int, lr: float) -> dict[str, SiteHead]:
        out = {}
        for k, x in self.xs.items():
            y = np.asarray(self.usable[k].y_train, np.float64)
            out[k] = (*local_steps(x, y, w, b, penalty, steps, lr), len(y))
        return out

    def tune(self, w: np.ndarray, b: float) -> dict[str, tuple[float, int]]:
        out = {}
        for k, x in self.xt.items():
            y = np.asarray(self.sites[k].y_tune, np.float64)
            out[k] = (tuning_loss(x, y, w, b), len(y))
        return out


def federated_standardizer(sites: Sequence[SiteSplits]) -> Standardizer:
    """The pooled train mean and scale from each site's count, sums and sums of squares."""
    return pooled_standardizer([site_stats(s.x_train, s.y_train) for s in sites])


def fit_federated_logistic(
    sites: Mapping[str, SiteSplits],
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    rounds: int = 200,
    local_steps: int = 5,
    lr: float = 1.0,
) -> tuple[LogisticProbe, dict[str, int]]:
    """The federated logistic head (see the module docstring) and the train rows each site gave,
    with every site in this process."""
    result = run_federated_head(InProcessSites(sites), c_grid, rounds, local_steps, lr)
    return result.probe, result.train_rows


__all__ = [
    "Average",
    "FederatedHeadResult",
    "HeadSites",
    "InProcessSites",
    "SiteHead",
    "SiteSplits",
    "federated_standardizer",
    "fit_federated_logistic",
    "mean_of_heads",
    "run_federated_head",
]
