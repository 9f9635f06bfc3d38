"""Compare training regimes (federated, centralized, local-only, oracle) site by site.

The frozen-probe pieces of `healthfm_core.eval.runner` evaluate one representation over an
EvalSet that pools every site. A federation's question is per site: does site A's held-out
split score better with the federated model than with a model A trained alone? So here each
site's rows form their own EvalSet: probes are fitted on that site's train rows (C from its
tuning rows) and scored on its held_out rows, exactly as a site does in federated evaluation.

Pieces:
- `split_sites`: one EvalSet per site (same rows, same labels as the pooled one).
- `evaluate_per_site`: one model per site (or the same model everywhere) -> features and
  probe results per site; `oracle_per_site`: the generator's true risk on the same rows.
- `modality_removal`: a site's rows that have a modality, scored with and without it
  (runner.restrict_modalities), each condition with its own probe.
- `summarize` / `site_summary`: means over tasks and sites of AUROC and ECE per (method,
  horizon), over the (site, task) pairs every method has, so the means compare like with like.
- plots of these summaries and of a federated run's per-round bytes and time split.
- utility against privacy: `privacy_table` / `privacy_plot` over summaries whose methods are
  DP settings (a target epsilon each, None = no DP), with the epsilon each site spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from healthfm_core.eval.plots import save_figure  # noqa: E402
from healthfm_core.eval.report import ResultRow  # noqa: E402
from healthfm_core.eval.runner import (  # noqa: E402
    EvalSet,
    MethodFeatures,
    MethodResult,
    evaluate_method,
    method_features,
    oracle_rows,
)
from healthfm_core.terms.site_layout import MODALITIES  # noqa: E402

log = logging.getLogger(__name__)

# site -> method -> result
PerSite = dict[str, dict[str, MethodResult]]


class TaskAurocPoint(Protocol):
    """What task_auroc_plot draws (site_pairs.TaskSummaryRow has it)."""

    method: str
    task: str
    horizon: int | None
    auroc: float
    auroc_ci: tuple[float, float]


def split_sites(data: EvalSet) -> dict[str, EvalSet]:
    """One EvalSet per site, in site order (features computed on it index that site's rows)."""
    return {part.name: EvalSet(sites=[part], tasks=data.tasks) for part in data.sites}


def evaluate_per_site(
    method: str,
    sites: Mapping[str, EvalSet],
    model_for: Callable[[str], torch.nn.Module | None] | torch.nn.Module,
    keep: Iterable[str] | None = None,
    max_events: int = 64,
    max_patches: int = 24,
    batch_size: int = 128,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, MethodResult], dict[str, MethodFeatures]]:
    """Embed each site's rows with its model (`model_for(site)`, or one model for every site)
    and probe each task on that site's splits. A site whose model is None is left out (e.g. a
    local-only site whose training was impossible)."""
    results: dict[str, MethodResult] = {}
    features: dict[str, MethodFeatures] = {}
    for name, data in sites.items():
        model = model_for(name) if callable(model_for) and not isinstance(model_for, torch.nn.Module) else model_for
        if model is None:
            log.warning("%s: no model for site %s; not evaluated", method, name)
            continue
        feats = method_features(
            data,
            model,
            keep=keep,
            max_events=max_events,
            max_patches=max_patches,
            batch_size=batch_size,
            progress=progress,
        )
        features[name] = feats
        results[name] = evaluate_method(method, data, feats, n_boot=n_boot, seed=seed)
        for task, why in results[name].skipped.items():
            log.info("%s at %s: %s not evaluated (%s)", method, name, task, why)
    return results, features


def oracle_per_site(
    sites: Mapping[str, EvalSet],
    truth_risk: Callable[[str, str, np.ndarray, np.ndarray, float], np.ndarray],
    code_to_disease: Mapping[str, str],
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, MethodResult]:
    """runner.oracle_rows on each site's own held_out rows."""
    return {
        name: oracle_rows(data, truth_risk, code_to_disease, n_boot=n_boot, seed=seed) for name, data in sites.items()
    }


def modality_removal(
    method: str,
    data: EvalSet,
    model: torch.nn.Module,
    features: MethodFeatures,
    drop: str,
    min_rows: int = 20,
    max_events: int = 64,
    max_patches: int = 24,
    batch_size: int = 128,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[MethodResult, MethodResult] | None:
    """On the rows of `data` (one site) that have `drop` at prediction time: the probe results
    with every modality (from `features`, computed without restriction) and with `drop` removed
    from the input (a fresh forward pass through runner.restrict_modalities). None when fewer
    than `min_rows` rows have the modality."""
    if drop not in MODALITIES:
        raise ValueError(f"unknown modality {drop!r}; expected one of {MODALITIES}")
    has = features.present[:, MODALITIES.index(drop)]
    if int(has.sum()) < min_rows:
        return None
    rows = features.rows[has]
    keep = [m for m in MODALITIES if m != drop]
    with_all = MethodFeatures(features.x[has], features.present[has], rows)
    without = method_features(
        data, model, rows=rows, keep=keep, max_events=max_events, max_patches=max_patches, batch_size=batch_size
    )
    return (
        evaluate_method(method, data, with_all, n_boot=n_boot, seed=seed),
        evaluate_method(f"{method} without {drop}", data, without, n_boot=n_boot, seed=seed),
    )


# ---------------------------------------------------------------- summaries


class SummaryRow(BaseModel):
    """Mean held-out AUROC and ECE of one method at one horizon over (site, task) pairs."""

    model_config = ConfigDict(frozen=True)
    method: str
    horizon: int | None
    auroc: float
    ece: float
    pairs: int  # (site, task) pairs averaged
    n: int  # held_out rows summed over the pairs


def _keyed(per_site: PerSite) -> dict[str, dict[tuple[str, str, int | None], ResultRow]]:
    """method -> (site, task, horizon) -> row (finite AUROC only)."""
    out: dict[str, dict[tuple[str, str, int | None], ResultRow]] = {}
    for site, methods in per_site.items():
        for method, result in methods.items():
            for r in result.rows:
                if np.isfinite(r.auroc):
                    out.setdefault(method, {})[(site, r.task, r.horizon)] = r
    return out


def summarize(per_site: PerSite, methods: Sequence[str] | None = None) -> list[SummaryRow]:
    """One row per (method, horizon): means over the (site, task) pairs of that horizon that
    every method in `methods` (default: all present) has."""
    keyed = _keyed(per_site)
    methods = [m for m in (methods or sorted(keyed)) if m in keyed]
    if not methods:
        return []
    common = set.intersection(*(set(keyed[m]) for m in methods))
    out = []
    for horizon in sorted({k[2] for k in common}, key=lambda h: -1 if h is None else h):
        keys = sorted(k for k in common if k[2] == horizon)
        for m in methods:
            rows = [keyed[m][k] for k in keys]
            ece = [r.ece for r in rows if np.isfinite(r.ece)]
            out.append(
                SummaryRow(
                    method=m,
                    horizon=horizon,
                    auroc=float(np.mean([r.auroc for r in rows])),
                    ece=float(np.mean(ece)) if ece else float("nan"),
                    pairs=len(rows),
                    n=int(sum(r.n for r in rows)),
                )
            )
    return out


def site_summary(per_site: PerSite, methods: Sequence[str] | None = None) -> dict[str, list[SummaryRow]]:
    """summarize() per site: site -> rows (method, horizon) averaged over that site's tasks."""
    return {site: summarize({site: res}, methods) for site, res in per_site.items()}


def _f(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def summary_table(rows: Sequence[SummaryRow]) -> str:
    """Markdown: one line per (method, horizon)."""
    lines = [
        "| method | horizon (d) | mean AUROC | mean ECE | (site, task) pairs | held-out rows |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.horizon if r.horizon is not None else '-'} | {_f(r.auroc)} | {_f(r.ece)} "
            f"| {r.pairs} | {r.n} |"
        )
    return "\n".join(lines)


def site_table(per_site_rows: Mapping[str, Sequence[SummaryRow]]) -> str:
    """Markdown: one line per (site, method), mean AUROC per horizon and mean ECE over horizons."""
    horizons = sorted({r.horizon for rows in per_site_rows.values() for r in rows if r.horizon is not None})
    lines = [
        "| site | method | " + " | ".join(f"AUROC {h} d" for h in horizons) + " | mean ECE |",
        "|---|---|" + "---:|" * (len(horizons) + 1),
    ]
    for site, rows in per_site_rows.items():
        for method in dict.fromkeys(r.method for r in rows):
            mine = {r.horizon: r for r in rows if r.method == method}
            ece = [r.ece for r in mine.values() if np.isfinite(r.ece)]
            lines.append(
                f"| {site} | {method} | "
                + " | ".join(_f(mine[h].auroc) if h in mine else "-" for h in horizons)
                + f" | {_f(float(np.mean(ece)) if ece else float('nan'))} |"
            )
    return "\n".join(lines)


def epsilon_label(epsilon: float | None) -> str:
    """A DP setting's name in tables and summaries: "eps=3", or "no DP"."""
    return "no DP" if epsilon is None else f"eps={epsilon:g}"


def privacy_table(
    rows: Sequence[SummaryRow], settings: Mapping[str, float | None], spent: Mapping[str, Mapping[str, float]]
) -> str:
    """Markdown: one line per DP setting (`settings`: method name -> target epsilon, None = no
    DP), mean AUROC / ECE per horizon, then the cumulative epsilon each site reported (`spent`:
    method -> site -> epsilon; a site that reported none shows "-")."""
    horizons = sorted({r.horizon for r in rows if r.horizon is not None})
    sites = sorted({s for per in spent.values() for s in per})
    lines = [
        "| target epsilon | "
        + " | ".join(f"AUROC / ECE {h} d" for h in horizons)
        + "".join(f" | spent at {s}" for s in sites)
        + " |",
        "|---|" + "---:|" * (len(horizons) + len(sites)),
    ]
    for method, target in settings.items():
        mine = {r.horizon: r for r in rows if r.method == method}
        cells = [f"{_f(mine[h].auroc)} / {_f(mine[h].ece)}" if h in mine else "-" for h in horizons]
        eps = [_f(spent.get(method, {})[s]) if s in spent.get(method, {}) else "-" for s in sites]
        # A setting run several times (noise draws: "eps=8 draw 2") keeps its draw in the row's name.
        draw = f" (draw {method.split(' draw ', 1)[1]})" if " draw " in method else ""
        lines.append(
            f"| {'none (no DP)' if target is None else f'{target:g}'}{draw} | "
            + " | ".join(cells)
            + "".join(f" | {e}" for e in eps)
            + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def privacy_plot(
    rows: Sequence[SummaryRow],
    settings: Mapping[str, float | None],
    path,
    title: str = "Held-out utility against the target epsilon",
):
    """Mean AUROC (left) and ECE (right) against the target epsilon (log axis), one line per
    horizon; the no-DP setting is drawn at the right end of the axis, past the largest epsilon.
    Settings of one epsilon (independent noise draws) are each a dot, the line their mean."""
    finite = sorted(e for e in settings.values() if e is not None)
    none_x = (finite[-1] * 3.0) if finite else 1.0
    x_of = {m: (none_x if e is None else e) for m, e in settings.items()}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for horizon in sorted({r.horizon for r in rows if r.horizon is not None}):
        mine = [r for r in rows if r.horizon == horizon and r.method in x_of]
        xs = sorted({x_of[r.method] for r in mine})
        for ax, value in ((a1, lambda r: r.auroc), (a2, lambda r: r.ece)):
            at = {x: [value(r) for r in mine if x_of[r.method] == x] for x in xs}
            (line,) = ax.plot(xs, [float(np.mean(at[x])) for x in xs], marker="o", label=f"{horizon} d")
            if any(len(v) > 1 for v in at.values()):
                ax.scatter([x for x in xs for _ in at[x]], [v for x in xs for v in at[x]], s=12, alpha=0.5,
                           color=line.get_color(), linewidths=0)  # fmt: skip
    ticks = sorted(set(x_of.values()))
    labels = ["no DP" if x == none_x and None in settings.values() else f"{x:g}" for x in ticks]
    for ax, name in ((a1, "mean AUROC"), (a2, "mean ECE")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlabel("target epsilon per run")
        ax.set_ylabel(name)
    a1.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    a1.legend(title="horizon", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def summary_plot(rows: Sequence[SummaryRow], path, title: str = "Held-out AUROC and ECE by horizon"):
    """Mean AUROC (left) and ECE (right) against horizon, one line per method."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    horizons = sorted({r.horizon for r in rows if r.horizon is not None})
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted(
            ((r.horizon, r) for r in rows if r.method == method and r.horizon is not None), key=lambda hr: hr[0]
        )
        xs = [horizons.index(h) for h, _ in mine]
        a1.plot(xs, [r.auroc for _, r in mine], marker="o", label=method)
        a2.plot(xs, [r.ece for _, r in mine], marker="o", label=method)
    for ax, name in ((a1, "mean AUROC"), (a2, "mean ECE")):
        ax.set_xticks(range(len(horizons)), [f"{h} d" for h in horizons])
        ax.set_xlabel("horizon")
        ax.set_ylabel(name)
    a1.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    a1.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def task_auroc_plot(rows: Sequence[TaskAurocPoint], path, title: str = "Held-out AUROC per task (95% CI)"):
    """One column per task and horizon, one marker per method (mean AUROC over the sites) with
    its interval drawn from its ends (a percentile interval need not contain the point); a method
    whose interval is undefined has its marker hollow and no bar."""
    labels = list(dict.fromkeys(f"{r.task} {r.horizon} d" if r.horizon is not None else r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    if not labels:
        raise ValueError(f"{title}: no task to plot")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * max(1, len(methods)) / 2), 4))
    offsets = np.linspace(-0.25, 0.25, len(methods)) if len(methods) > 1 else [0.0]
    for off, method in zip(offsets, methods):
        color = None
        for r in rows:
            if r.method != method:
                continue
            x = labels.index(f"{r.task} {r.horizon} d" if r.horizon is not None else r.task) + off
            lo, hi = r.auroc_ci
            defined = bool(np.isfinite(lo) and np.isfinite(hi))
            (pt,) = ax.plot(
                [x],
                [r.auroc],
                "o",
                color=color,
                markerfacecolor=None if defined else "none",
                label=method if color is None else None,
            )
            color = pt.get_color()
            if defined:
                ax.vlines([x], [lo], [hi], color=color)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("mean held-out AUROC over sites")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curves_plot(curves: Mapping[str, Sequence[Mapping[str, float]]], path, title: str = "Pretraining losses"):
    """One panel per objective; each curve is a list of records with "progress" (fraction of
    the run's optimisation budget, 0..1) and one value per objective. Objectives a curve never
    logs (or logs only as 0, no data for it) are not drawn for that curve."""
    # Only objectives some curve has data for get a panel (an EHR-only run: no wearable losses).
    names = sorted(
        {
            k
            for c in curves.values()
            for rec in c
            for k, v in rec.items()
            if k != "progress" and np.isfinite(v) and v != 0.0
        }
    )
    if not names:
        raise ValueError("no losses to plot")
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, curve in curves.items():
            pts = [(rec["progress"], rec[name]) for rec in curve if name in rec and np.isfinite(rec[name])]
            if not pts or all(v == 0.0 for _, v in pts):
                continue
            xs, ys = map(np.asarray, zip(*pts))
            if len(ys) >= 20:  # a moving average keeps per-step noise from hiding the trend
                k = max(2, len(ys) // 20)
                ys = np.convolve(ys, np.ones(k) / k, mode="valid")
                xs = xs[k - 1 :]
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else "", linewidth=1.2, label=label)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("fraction of the training budget")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    handles: dict[str, Artist] = {}  # one legend for the figure: a curve absent from the first panel still appears
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize="x-small")
    return save_figure(fig, path)


def bytes_plot(per_round: Mapping[int, Mapping[str, tuple[int, int]]], path, title: str = "Bytes per site per round"):
    """Grouped bars: per round, per site, bytes sent to the site (solid) and received (hatched)."""
    rounds = sorted(per_round)
    sites = sorted({s for r in rounds for s in per_round[r]})
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rounds) * len(sites) / 2), 4))
    width = 0.8 / max(1, 2 * len(sites))
    for i, site in enumerate(sites):
        sent = [per_round[r].get(site, (0, 0))[0] / 1e6 for r in rounds]
        recv = [per_round[r].get(site, (0, 0))[1] / 1e6 for r in rounds]
        xs = np.arange(len(rounds)) + (2 * i - len(sites)) * width
        bars = ax.bar(xs, sent, width, label=f"{site} (to site)")
        ax.bar(
            xs + width,
            recv,
            width,
            color=bars.patches[0].get_facecolor(),
            hatch="//",
            alpha=0.6,
            label=f"{site} (from site)",
        )
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize="x-small", ncol=2)
    return save_figure(fig, path)


def time_split_plot(per_round: Mapping[int, Mapping[str, float]], path, title: str = "Round time split"):
    """Stacked bars per round: local training (slowest site) and everything else."""
    rounds = sorted(per_round)
    train = [per_round[r]["local_train_seconds_max"] for r in rounds]
    other = [per_round[r]["other_seconds"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(rounds, train, label="local training (slowest site)")
    ax.bar(rounds, other, bottom=train, label="everything else")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_xticks(rounds)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


__all__ = [
    "PerSite",
    "SummaryRow",
    "bytes_plot",
    "epsilon_label",
    "evaluate_per_site",
    "loss_curves_plot",
    "modality_removal",
    "oracle_per_site",
    "privacy_plot",
    "privacy_table",
    "site_summary",
    "site_table",
    "split_sites",
    "summarize",
    "summary_plot",
    "summary_table",
    "task_auroc_plot",
    "time_split_plot",
]
