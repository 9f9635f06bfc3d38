"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from healthfm_core.eval.metrics import ECE_BINS, reliability_bins  # noqa: E402
from healthfm_core.eval.report import ResultRow  # noqa: E402
from healthfm_core.files import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save a figure atomically (temp file + rename) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def reliability_diagram(
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "Reliability",
    n_bins: int = ECE_BINS,
) -> Path:
    """Observed frequency vs mean predicted probability per equal-width bin, one line per method
    (predictions: method -> (labels, probabilities)); marker area shows the bin's count."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for method, (y, p) in predictions.items():
        y = np.asarray(y, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        bins = reliability_bins(p, n_bins)
        count = np.bincount(bins, minlength=n_bins)
        keep = count > 0
        mean_p = np.bincount(bins, weights=p, minlength=n_bins)[keep] / count[keep]
        mean_y = np.bincount(bins, weights=y, minlength=n_bins)[keep] / count[keep]
        line = ax.plot(mean_p, mean_y, marker="", label=method)[0]
        ax.scatter(mean_p, mean_y, s=10 + 200 * count[keep] / count.max(), color=line.get_color(), alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return save_figure(fig, path)


def horizon_auroc_plot(rows: Sequence[ResultRow], path: str | Path, task: str | None = None) -> Path:
    """AUROC with its bootstrap CI per horizon, one line per method (rows of one task, or the
    rows whose task is `task`)."""
    rows = [r for r in rows if task is None or r.task == task]
    if not rows:
        raise ValueError(f"no result rows for task {task!r}")
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r.method for r in rows})
    horizons = sorted({r.horizon for r in rows if r.horizon is not None})
    offsets = np.linspace(-0.15, 0.15, len(methods)) if len(methods) > 1 else [0.0]
    for off, method in zip(offsets, methods):
        mine = sorted(
            ((r.horizon, r) for r in rows if r.method == method and r.horizon is not None), key=lambda hr: hr[0]
        )
        xs = np.array([horizons.index(h) for h, _ in mine]) + off
        auc = np.array([r.auroc for _, r in mine])
        lo = np.array([r.auroc_ci[0] for _, r in mine])
        hi = np.array([r.auroc_ci[1] for _, r in mine])
        # Intervals drawn from their ends: a percentile interval need not contain the point.
        (line,) = ax.plot(xs, auc, marker="o", label=method)
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.vlines(xs[ok], lo[ok], hi[ok], color=line.get_color())
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(horizons)), [f"{h} d" for h in horizons])
    ax.set_xlabel("horizon")
    ax.set_ylabel("AUROC (95% CI)")
    ax.set_title(task or rows[0].task)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def training_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "Training") -> Path:
    """One panel per logged objective (every key of the step records except bookkeeping ones),
    loss against step, plus the decay-rate range if it was logged. A loss of exactly 0 is a step
    whose batch had no data for it (pretraining_losses' convention) and is left out, not drawn."""
    if not history:
        raise ValueError("empty training history")
    keys = loss_panels(history)
    has_rates = any("rate_min" in h for h in history)
    n_panels = len(keys) + int(has_rates)
    if not n_panels:
        raise ValueError("no loss with data in the training history")
    cols = min(3, n_panels)
    nrows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    steps = np.array([h.get("step", i) for i, h in enumerate(history)])
    for ax, key in zip(axes.flat, keys):
        vals = np.array([h.get(key, np.nan) for h in history], dtype=np.float64)
        if key != "total":
            vals[vals == 0.0] = np.nan
        ax.plot(steps, vals, linewidth=0.8, alpha=0.5)
        if len(vals) >= 10:  # a moving average (over the steps that have the loss) shows the trend
            k = max(2, len(vals) // 20)
            have = np.isfinite(vals)
            sums = np.convolve(np.where(have, vals, 0.0), np.ones(k), mode="valid")
            counts = np.convolve(have.astype(np.float64), np.ones(k), mode="valid")
            with np.errstate(invalid="ignore", divide="ignore"):
                ax.plot(steps[k - 1 :], np.where(counts > 0, sums / counts, np.nan), linewidth=1.5)
        ax.set_title(key, fontsize="small")
        ax.set_xlabel("step")
    if has_rates:
        ax = axes.flat[len(keys)]
        ax.plot(steps, [h.get("rate_min", np.nan) for h in history], label="min")
        ax.plot(steps, [h.get("rate_max", np.nan) for h in history], label="max")
        ax.set_yscale("log")
        ax.set_title("decay rate range (1/day)", fontsize="small")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


_NOT_LOSSES = {"step", "lr", "grad_norm", "rate_min", "rate_max", "examples"}


def loss_panels(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The losses of a training history that get a panel: those with data in some step (an
    EHR-only run logs its wearable objectives as 0 or not at all: no empty panels)."""
    keys = {k for h in history for k in h if k not in _NOT_LOSSES}
    return sorted(k for k in keys if any(_has_data(h.get(k), k) for h in history))


def _has_data(value: float | None, key: str) -> bool:
    """Whether a logged loss is drawn: finite, and not the 0 of a batch without its data."""
    return value is not None and bool(np.isfinite(value)) and (value != 0.0 or key == "total")


def label_efficiency_plot(
    curves: Mapping[str, Mapping[float, Sequence[float]]],
    path: str | Path,
    title: str = "Held-out AUROC against the share of train labels",
) -> Path:
    """One line per method: mean (over repeats) of the mean AUROC across tasks, at each fraction
    of the train subjects whose labels the probe gets, with the repeats' spread as error bars."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, by_fraction in curves.items():
        fr = sorted(by_fraction)
        means = [float(np.mean(by_fraction[f])) for f in fr]
        sds = [float(np.std(by_fraction[f])) for f in fr]
        ax.errorbar(fr, means, yerr=sds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of train subjects labelled")
    ax.set_ylabel("mean held-out AUROC")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


class IntervalPoint(NamedTuple):
    """One estimate with its 95% interval (NaN: undefined) in a forest plot; `pooled` marks a
    federation-wide value (drawn as a diamond)."""

    task: str
    label: str
    value: float
    low: float
    high: float
    pooled: bool = False


def auroc_forest_plot(
    points: Sequence[IntervalPoint], path: str | Path, title: str = "Held-out AUROC (95% CI)"
) -> Path:
    """auroc_forest_figure saved as a PNG at `path`."""
    return save_figure(auroc_forest_figure(points, title), path)


def auroc_forest_figure(points: Sequence[IntervalPoint], title: str = "Held-out AUROC (95% CI)") -> plt.Figure:
    """One row per (task, site) and per task's federation-wide value, AUROC with its interval as
    a horizontal bar (an undefined interval: the point alone, marked in the label; a NaN value:
    the row's label only, "no metric"). The caller saves and closes it."""
    if not points:
        raise ValueError("no AUROC to plot")
    tasks = list(dict.fromkeys(p.task for p in points))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(points) + 0.5 * len(tasks) + 1.2))
    y, ticks, labels = 0.0, [], []
    for t_i, task in enumerate(tasks):
        for p in (q for q in points if q.task == task):
            color = "black" if p.pooled else f"C{t_i % 10}"
            defined = np.isfinite(p.low) and np.isfinite(p.high)
            if defined:
                ax.hlines(y, p.low, p.high, color=color, linewidth=2.5 if p.pooled else 1.5)
            if np.isfinite(p.value):  # NaN: a pair without a number keeps its row, labelled
                ax.plot([p.value], [y], marker="D" if p.pooled else "o", color=color, markersize=7 if p.pooled else 5)
            ticks.append(y)
            note = "" if defined else " (no CI)" if np.isfinite(p.value) else " (no metric)"
            labels.append(f"{task} / {p.label}{note}")
            y -= 1.0
        y -= 0.6
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(ticks, labels, fontsize="x-small")
    ax.set_xlim(0, 1.02)  # a point at 1 stays visible
    ax.set_xlabel("AUROC (95% CI)")
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig
