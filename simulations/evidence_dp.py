"""DP's cost as a function of a site's size, in the evidence job (issue 68; q4's second verdict).

Hospitals are larger than the evidence job's 1,000-subject sites, and what epsilon costs falls
with a site's size: at a fixed sampling rate and number of steps the noise added to each step is
the same while the sum of clipped per-sample gradients it is added to grows with the batch. So q4
also measures, at `dp_size_curve.sizes` subjects (1,000 / 4,000 / 16,000 in the full preset),
one site of the scenario (`site`, generated alone at each size) trained alone at the chosen DP
recipe (`recipe`: Poisson sampling rate, steps, learning rate, clipping norm) with DP at each
epsilon and without DP at the same samples seen (simulations/dp_site.py: what it measures, and
why one site and not a federation: a federation averages its sites' noise, so one site alone is
the harder case). Each epsilon against no DP on the same held-out rows:

    q4|<n> subjects a site: eps=<e> - no DP

and, per size, every setting's mean AUROC, noise multiplier and epsilon spent in
Evidence.diagnostics[scenario][seed]["dp_size_curve"]. The verdict row says at which size
epsilon 8 comes within `targets.dp_gap` of no DP, or that no size measured reaches it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from healthfm_core.eval.paired_comparison import Comparison, Verdict  # noqa: E402
from healthfm_core.eval.plots import save_figure  # noqa: E402
from healthfm_core.eval.runner import paired_items  # noqa: E402
from simulations.dp_site import NO_DP, Recipe, SiteData, baseline_run, run_lever  # noqa: E402
from simulations.evidence_unit_run import UnitRun  # noqa: E402

log = logging.getLogger("healthfm.simulations.evidence")

KEY = re.compile(r"^q4\|(?P<size>\d+) subjects a site: eps=(?P<eps>[0-9.]+) - no DP$")


def runs_here(cfg: DictConfig, scenario: str, seed: int) -> bool:
    curve = cfg.get("dp_size_curve")
    return bool(curve and curve.sizes and scenario in curve.scenarios and seed in curve.seeds)


def stage_name(unit: str, cfg: DictConfig) -> str:
    sizes = " / ".join(f"{int(s):,}" for s in cfg.dp_size_curve.sizes)
    return f"{unit}: DP by site size ({sizes} subjects)"


def plan(cfg: DictConfig, scenario: str, seed: int, unit: str) -> list[tuple[str, float]]:
    """The stage for the plan: per size, the data, every DP run's per-sample steps
    (`cost.dp_sample_seconds` a sample: sampling rate x train subjects x steps), the no-DP run and
    each model's probes at the site (`cost.eval_seconds_per_row`, all of a subject's rows)."""
    if not runs_here(cfg, scenario, seed):
        return []
    c, curve = cfg.cost, cfg.dp_size_curve
    recipe, baseline = recipes(cfg)
    n_dp = len(curve.epsilons) * int(curve.draws)
    total = 0.0
    for n in (int(s) for s in curve.sizes):
        total += float(c.data_seconds_per_1000_subjects) * n / 1000
        total += recipe.sample_rate * 0.8 * n * recipe.steps * n_dp * float(c.dp_sample_seconds)
        total += baseline.sample_rate * 0.8 * n * baseline.steps * float(c.step_seconds) / 16
        # Held-out and tuning rows whole (20% of the subjects), train at eval.n_per_subject.
        total += (n_dp + 1) * n * (0.2 * ROWS_PER_SUBJECT + 0.8 * 2) * float(c.eval_seconds_per_row)
    return [(stage_name(unit, cfg), total)]


ROWS_PER_SUBJECT = 16  # the plan's guess at an EHR site's labelled rows a subject (evidence.ALL_ROWS_PER_SUBJECT)


def recipes(cfg: DictConfig) -> tuple[Recipe, Recipe]:
    """dp_size_curve's DP recipe and its no-DP baseline recipe, validated."""
    curve = cfg.dp_size_curve
    return tuple(  # type: ignore[return-value]
        Recipe.model_validate(OmegaConf.to_container(curve[k], resolve=True)) for k in ("recipe", "baseline")
    )


def site_config(cfg: DictConfig, scenario: str, seed: int) -> DictConfig:
    """The one-site runs' config (simulations/dp_site.py's keys) from the job's."""
    curve = cfg.dp_size_curve
    return OmegaConf.create(
        {
            "scenario_name": scenario,
            "site": str(curve.site),
            "seed": int(seed),
            "data_root": str(cfg.data_root),
            "vocab_min_subjects": int(cfg.federation.vocab_min_subjects),
            "max_events": int(cfg.federation.max_events),
            "max_patches": int(cfg.federation.max_patches),
            "epsilons": [float(e) for e in curve.epsilons],
            "draws": int(curve.draws),
            "delta": float(cfg.privacy.delta),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "eval": {
                "n_per_subject": cfg.eval.n_per_subject,
                "batch_size": int(cfg.eval.batch_size),
                "n_boot": int(cfg.eval.n_boot),
                "n_boot_per_run": int(cfg.eval.n_boot_per_run),
                "probe_poolings": list(cfg.eval.probe_poolings),
            },
        }
    )


def size_curve(u: UnitRun) -> None:
    """The stage: at each size, the site trained with and without DP at the recipe; each epsilon
    against no DP into the unit's evidence."""
    cfg, scenario, seed = u.cfg, u.scenario, u.seed
    if not runs_here(cfg, scenario, seed):
        return
    scfg = site_config(cfg, scenario, seed)
    recipe, baseline = recipes(cfg)
    report: dict[str, Any] = {
        "site": scfg.site,
        "recipe": recipe.model_dump(),
        "baseline": baseline.model_dump(),
        "sizes": {},
    }
    for size in (int(s) for s in cfg.dp_size_curve.sizes):
        data = SiteData(scfg, size)
        run, results = run_lever(data, "recipe", recipe, scfg, baseline_run(data, baseline, scfg))
        report["sizes"][str(size)] = {"train_subjects": len(data.dataset), **run.model_dump(exclude={"recipe"})}
        base = results[NO_DP]["held_out"]
        for label, res in results.items():
            if label == NO_DP:
                continue
            items = paired_items(data.rows, res["held_out"], base, list(data.rows.tasks))
            u.ev_out.add(scenario, f"q4|{size} subjects a site: {label} - no DP", label, NO_DP, seed, items)
    u.ev_out.diagnostics[scenario].setdefault(seed, {})["dp_size_curve"] = report
    u.progress.finish(stage_name(u.name, cfg))


def report_lines(diagnostics: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The report's lines on the size curve: per size, each setting's mean AUROC (held_out,
    tuning), noise multiplier, epsilon spent and seconds."""
    lines = []
    for seed, d in sorted(diagnostics.items()):
        curve = d.get("dp_size_curve")
        if not curve:
            continue
        r, b = curve["recipe"], curve["baseline"]
        lines += [
            "",
            f"DP by a site's size (seed {seed}): {curve['site']} generated alone at each size, trained alone; DP at "
            f"sampling rate {r['sample_rate']:g} x {r['steps']} steps, lr {r['lr']:g}, clipping norm "
            f"{r['max_grad_norm']:g}"
            + (", only the modality encoders" if r.get("train") == "encoders" else "")
            + f"; no DP at rate {b['sample_rate']:g} x {b['steps']} steps, lr {b['lr']:g} (the same samples seen).",
            "",
            "| subjects (train) | setting | held-out AUROC | tuning AUROC | noise multiplier | epsilon spent | s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for size, run in curve["sizes"].items():
            for label, held in run["held_out"].items():
                dp = run["dp"].get(label, {})
                lines.append(
                    f"| {int(size):,} ({run['train_subjects']:,}) | {label} | {held:.3f} | {run['tuning'][label]:.3f} | "
                    f"{dp.get('noise_multiplier', float('nan')):.2f} | {dp.get('epsilon_spent', float('nan')):.2f} | "
                    f"{run['seconds'][label]:.0f} |"
                )
    return lines


def curve_points(comps: Mapping[str, Comparison]) -> dict[float, dict[int, Comparison]]:
    """The size curve's comparisons by epsilon, then size (over draws where there are several)."""
    out: dict[float, dict[int, Comparison]] = {}
    for k, c in comps.items():
        if (m := KEY.match(k)) is not None:
            out.setdefault(float(m["eps"]), {})[int(m["size"])] = c
    return out


def size_verdict(cfg: DictConfig, comps: Mapping[str, Comparison]) -> Verdict:
    """q4 by site size: the smallest size at which epsilon 8 is within targets.dp_gap of no DP."""
    gap = float(cfg.targets.dp_gap)
    target = f"DP's cost by a site's size: epsilon 8 within {gap:.2f} AUROC of no DP at some size (one site alone)"
    points = curve_points(comps).get(8.0, {})
    if not points:
        return Verdict(question="q4", target=target, met=None, detail="not measured (dp_size_curve: not run here)")
    shown = "; ".join(
        f"{n:,}: {c.difference:+.3f} [{c.difference_ci[0]:+.3f}, {c.difference_ci[1]:+.3f}]"
        for n, c in sorted(points.items())
    )
    met_at = [n for n, c in sorted(points.items()) if c.difference >= -gap]
    where = (
        f"met from {met_at[0]:,} subjects a site"
        if met_at
        else f"not met at any size measured (largest {max(points):,})"
    )
    return Verdict(
        question="q4", target=target, met=bool(met_at), detail=f"eps 8 - no DP by subjects a site: {shown}: {where}"
    )


def size_curve_plot(comps: Mapping[str, Comparison], path: Path, gap: float) -> Path | None:
    """Each epsilon's cost (eps - no DP, with its interval) against the site's size, log scale."""
    curves = curve_points(comps)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for eps, points in sorted(curves.items()):
        sizes = sorted(points)
        d = [points[n].difference for n in sizes]
        lo = [points[n].difference - points[n].difference_ci[0] for n in sizes]
        hi = [points[n].difference_ci[1] - points[n].difference for n in sizes]
        ax.errorbar(sizes, d, yerr=[lo, hi], marker="o", capsize=3, label=f"epsilon {eps:g}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axhline(-gap, color="red", lw=0.8, ls="--", label=f"-{gap:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("subjects at the site")
    ax.set_ylabel("mean AUROC: DP - no DP")
    ax.set_title("DP's cost by a site's size (one site alone)")
    ax.legend()
    return save_figure(fig, path)


__all__ = [
    "curve_points",
    "plan",
    "report_lines",
    "runs_here",
    "size_curve",
    "size_curve_plot",
    "size_verdict",
    "stage_name",
]
