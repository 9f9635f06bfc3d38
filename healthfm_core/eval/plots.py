"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
    skip = {"step", "lr", "grad_norm", "rate_min", "rate_max", "examples"}
    if not history:
        raise ValueError("empty training history")
    # An objective with no data in the whole run (e.g. the wearable losses at EHR-only sites) gets no panel.
    keys = sorted(
        k
        for k in {k for h in history for k in h if k not in skip}
        if k == "total" or any(np.isfinite(h.get(k, np.nan)) and h.get(k) != 0.0 for h in history)
    )
    has_rates = any("rate_min" in h for h in history)
    n_panels = len(keys) + int(has_rates)
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
