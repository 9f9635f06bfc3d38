"""Paired comparisons pooled over seeds and sites, and the verdict on a stated target.

An evidence job compares two methods on the same held-out rows many times over: several seeds
(each its own synthetic world and training run), several sites, every task and horizon. Here
all of those are one list of items (per task and run: labels, both methods' scores, the subject
of each row, keyed so that subjects of different runs never coincide) and
`metrics.paired_resamples` draws subjects once for all of them, so the interval of a mean
difference or of a ratio of mean AUROCs covers the subject sampling of every run at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from healthfm_core.eval.metrics import paired_resamples, row_set_resamples  # noqa: E402
from healthfm_core.eval.plots import save_figure  # noqa: E402

Item = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (y, p_a, p_b, subject key)
# Two scorings of one task on row sets of their own (e.g. two label definitions whose rows differ):
# (y_a, p_a, subject_a, y_b, p_b, subject_b).
RowSetItem = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Comparison(BaseModel):
    """Method a against method b: mean AUROC of each over the items, their difference and ratio
    with percentile intervals from one shared subject bootstrap."""

    model_config = ConfigDict(frozen=True)
    a: str
    b: str
    n_items: int  # (run, site, task, horizon) pairs
    n_rows: int
    n_subjects: int
    mean_a: float
    mean_b: float
    difference: float  # mean over items of AUROC(a) - AUROC(b)
    difference_ci: tuple[float, float]
    ratio: float  # mean AUROC(a) / mean AUROC(b)
    ratio_ci: tuple[float, float]
    fraction_at_or_below_zero: float  # resamples where a does not beat b (one-sided p-value)


def with_prefix(items: Sequence[Item], prefix: str) -> list[Item]:
    """Items whose subject keys carry `prefix` (a run's name), so runs never share a subject."""
    return [(y, pa_, pb, np.char.add(prefix, np.asarray(g).astype(str))) for y, pa_, pb, g in items]


def compare_paired(
    items: Sequence[Item], a: str, b: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Comparison:
    """The comparison of a with b over `items` (metrics.paired_resamples: subjects drawn once for
    every item and both methods). An item that loses a class in a resample has no AUROC there and
    is left out of that resample's means only: dropping the whole resample instead kept only the
    resamples in which every thin item (a 30-day task with a few positives) kept its positives,
    too few of them with a hundred items, and the interval came out NaN or collapsed to a point."""
    point_a, point_b, boot_a, boot_b = paired_resamples(items, n_boot=n_boot, seed=seed)
    both = np.isfinite(boot_a) & np.isfinite(boot_b)  # [n_boot, items]: the item is scored in the resample
    n_scored = both.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = np.where(both, boot_a, 0.0).sum(axis=1) / n_scored
        mean_b = np.where(both, boot_b, 0.0).sum(axis=1) / n_scored
    return _comparison(items, a, b, float(point_a.mean()), float(point_b.mean()), mean_a, mean_b, alpha)


def compare_row_sets(
    items: Sequence[RowSetItem], a: str, b: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Comparison:
    """compare_paired for items whose two methods score rows of their own (a task's labels under
    two definitions, e.g. repeats counted and new onsets only): each resample draws the subjects
    once for every item and both row sets (metrics.row_set_resamples), so the interval is the
    difference's own, paired by subject where the rows cannot be."""
    point_a, point_b, boot_a, boot_b = row_set_resamples(items, n_boot=n_boot, seed=seed)
    both = np.isfinite(boot_a) & np.isfinite(boot_b)
    n_scored = both.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = np.where(both, boot_a, 0.0).sum(axis=1) / n_scored
        mean_b = np.where(both, boot_b, 0.0).sum(axis=1) / n_scored
    flat = [(ya, pa_, pa_, ga) for ya, pa_, ga, *_ in items] + [(yb, pb, pb, gb) for *_, yb, pb, gb in items]
    comparison = _comparison(flat, a, b, float(point_a.mean()), float(point_b.mean()), mean_a, mean_b, alpha)
    return comparison.model_copy(update={"n_items": len(items)})


def compare_draws(
    draws: Sequence[Sequence[Item]], a: str, b: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Comparison:
    """The comparison of a with b over k independent draws of a (e.g. k DP noise draws, each a
    model trained anew) on the same rows, with an interval that covers the draws and the subjects.

    Two-way bootstrap: each resample draws the subjects once for every item of every draw (the
    draws are scored on the same people, so their subject sampling is shared, as in
    compare_paired) and, independently, k draws with replacement; its statistic is the mean over
    the drawn draws of each draw's mean difference. With k = 1 it is compare_paired. The point
    estimate is the mean over the draws. k is small (5): the interval's draw component is then
    itself rough, which is why the per-draw differences are reported beside it."""
    draws = [list(d) for d in draws if len(d)]
    if not draws:
        raise ValueError("compare_draws needs at least one draw with items")
    flat = [it for d in draws for it in d]
    owner = np.repeat(np.arange(len(draws)), [len(d) for d in draws])
    point_a, point_b, boot_a, boot_b = paired_resamples(flat, n_boot=n_boot, seed=seed)
    both = np.isfinite(boot_a) & np.isfinite(boot_b)
    k = len(draws)
    # [n_boot, k] each draw's mean AUROC of a and of b in each resample (items scored there only).
    with np.errstate(invalid="ignore", divide="ignore"):
        per_a = np.stack([np.where(both & (owner == d), boot_a, 0.0).sum(1) for d in range(k)], 1)
        per_b = np.stack([np.where(both & (owner == d), boot_b, 0.0).sum(1) for d in range(k)], 1)
        n_d = np.stack([(both & (owner == d)).sum(1) for d in range(k)], 1)
        per_a, per_b = per_a / n_d, per_b / n_d
    pick = np.random.default_rng([seed, 31]).integers(0, k, size=(n_boot, k))
    rows = np.arange(n_boot)[:, None]
    with np.errstate(invalid="ignore"):
        mean_a, mean_b = per_a[rows, pick].mean(1), per_b[rows, pick].mean(1)
    pa = float(np.mean([point_a[owner == d].mean() for d in range(k)]))
    pb = float(np.mean([point_b[owner == d].mean() for d in range(k)]))
    return _comparison(flat, a, b, pa, pb, mean_a, mean_b, alpha)


def _comparison(
    items: Sequence[Item],
    a: str,
    b: str,
    point_a: float,
    point_b: float,
    boot_a: np.ndarray,
    boot_b: np.ndarray,
    alpha: float,
) -> Comparison:
    """The Comparison from the point means and each resample's means (NaN: not estimable there)."""
    ok = np.isfinite(boot_a) & np.isfinite(boot_b)
    diff, ratio = (boot_a - boot_b)[ok], (boot_a / boot_b)[ok]
    q = [alpha / 2, 1 - alpha / 2]
    nan2 = (float("nan"), float("nan"))
    return Comparison(
        a=a,
        b=b,
        n_items=len(items),
        n_rows=int(sum(len(it[0]) for it in items)),
        n_subjects=len(np.unique(np.concatenate([np.asarray(it[3]).astype(str) for it in items]))),
        mean_a=point_a,
        mean_b=point_b,
        difference=point_a - point_b,
        difference_ci=tuple(float(v) for v in np.quantile(diff, q)) if len(diff) else nan2,  # type: ignore[arg-type]
        ratio=point_a / point_b,
        ratio_ci=tuple(float(v) for v in np.quantile(ratio, q)) if len(ratio) else nan2,  # type: ignore[arg-type]
        fraction_at_or_below_zero=float(np.mean(diff <= 0)) if len(diff) else float("nan"),
    )


class Verdict(BaseModel):
    """A target and whether the evidence meets it: met is None when it could not be measured."""

    model_config = ConfigDict(frozen=True)
    question: str
    target: str
    met: bool | None
    detail: str


def not_clearly_below(c: Comparison, margin: float = 0.0) -> bool:
    """The interval of a - b is not entirely below -margin (a is not clearly worse than b)."""
    return bool(c.difference_ci[1] >= -margin)


def comparison_plot(
    comparisons: Mapping[str, Comparison],
    path: str | Path,
    title: str,
    reference: float = 0.0,
    ratio: bool = False,
) -> Path:
    """One row per comparison: the difference (or ratio) with its interval, and a reference line."""
    if not comparisons:
        raise ValueError(f"{title}: no comparison to plot")
    names = list(comparisons)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    for i, name in enumerate(names):
        c = comparisons[name]
        point, (lo, hi) = (c.ratio, c.ratio_ci) if ratio else (c.difference, c.difference_ci)
        # The interval drawn from its ends, not as errors around the point: a percentile bootstrap
        # interval need not contain the point estimate (a skewed statistic such as a ratio of means).
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [i, i], color="C0", marker="|", markersize=8)
        ax.plot([point], [i], "o", color="C0")
    ax.axvline(reference, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("ratio of mean AUROC (95% CI)" if ratio else "difference in mean AUROC (95% CI)")
    ax.set_title(title, fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def ratio_curve_plot(
    curves: Mapping[str, Mapping[int, Comparison]],
    path: str | Path,
    title: str,
    reference: float = 1.0,
    xlabel: str = "rounds (pooled: the same samples seen)",
) -> Path:
    """One line per curve (e.g. a federated strategy): the ratio of mean AUROC a / b at each
    budget, with its interval, and a reference line (e.g. the 0.98 target)."""
    if not curves:
        raise ValueError(f"{title}: no curve to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, points) in enumerate(curves.items()):
        xs = sorted(points)
        ys = [points[x].ratio for x in xs]
        lo = [points[x].ratio_ci[0] for x in xs]
        hi = [points[x].ratio_ci[1] for x in xs]
        shift = [x * (1 + 0.03 * (i - (len(curves) - 1) / 2)) for x in xs]  # curves side by side
        ax.plot(shift, ys, "o-", color=f"C{i}", label=name)
        for x, a, b in zip(shift, lo, hi):
            if np.isfinite(a) and np.isfinite(b):
                ax.plot([x, x], [a, b], color=f"C{i}", linewidth=1)
    ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        sorted({x for p in curves.values() for x in p}),
        [str(x) for x in sorted({x for p in curves.values() for x in p})],
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("federated / pooled mean AUROC (95% CI)")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


__all__ = [
    "Comparison",
    "Item",
    "RowSetItem",
    "Verdict",
    "compare_draws",
    "compare_paired",
    "compare_row_sets",
    "comparison_plot",
    "not_clearly_below",
    "ratio_curve_plot",
    "with_prefix",
]
