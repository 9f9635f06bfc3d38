"""Each pretraining objective's worth (issue 72, question `o` of the evidence job).

The full objective (masked reconstruction of EHR codes and values, wearables and PRS; predictive
coding; cross-modal alignment; next-visit; future codes; the curriculum) against each one removed,
at the same budget: pooled training of `objective_ablation.variants` (a change to the model
config each: `curriculum.objectives_off` holds an objective at weight 0 throughout,
`curriculum.enabled: false` gives every objective weight 1 from the first step), from the same
initial weights, loader seed and steps as the pooled model (the federation's samples seen),
against the pooled model itself. Pooled rather than federated: what an objective is worth is a
property of the objective and the data; pooled training at the federation's budget is the
federation's own reference (q1 shows them within 2% of each other) at about a third of a
federation's cost (no Flower run), which buys every seed of both worlds instead of one.

Each variant is scored by the same per-site frozen probes on the same held-out rows as the
pooled model (`o|<variant> - full objective`) and by its zero-shot head
(`o|<variant> - full objective, zero-shot`), paired by subject over seeds, sites, tasks and
horizons.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from healthfm_core.eval import compare
from healthfm_core.eval.paired_comparison import Comparison, Verdict
from healthfm_core.eval.runner import EvalSet
from simulations.evidence_stage import Unit, pooled_variant, site_items
from simulations.evidence_zero_shot import ZERO_SHOT_POOLED, zero_shot_per_site

QUESTIONS = {
    "o": "Each pretraining objective's worth: the full objective against each one removed (pooled, same budget)"
}
REFERENCE = "pooled"  # the full objective: the unit's pooled model, whose budget every variant gets


def variants(cfg: DictConfig) -> dict[str, Any]:
    """The variants to run: objective_ablation.variants, only those named in `only` when set
    (ValueError naming an unknown one)."""
    oa = cfg.objective_ablation
    every = dict(oa.variants or {})
    if oa.only is None:
        return every
    if unknown := [n for n in oa.only if n not in every]:
        raise ValueError(
            f"objective_ablation.only names {unknown}, not among objective_ablation.variants {list(every)}"
        )
    return {n: every[n] for n in oa.only}


def runs_here(cfg: DictConfig, scenario: str, seed: int) -> bool:
    oa = cfg.objective_ablation
    return bool(variants(cfg)) and scenario in oa.scenarios and int(seed) in oa.seeds


def not_run(cfg: DictConfig, question: str, scenario: str) -> str | None:
    """Why question o has no number for a scenario, when it is the config's choice."""
    if question == "o" and not any(runs_here(cfg, scenario, int(s)) for s in cfg.seeds):
        return "not run for this scenario (objective_ablation.scenarios / seeds / variants)"
    return None


def plan(
    cfg: DictConfig, scenario: str, seed: int, unit: str, train_s: float, eval_s: float
) -> list[tuple[str, float]]:
    """The stage of the objective ablations for the plan: per variant one pooled training
    (`train_s`) and its probes and zero-shot scores (`cost.ablation_evaluations` of one model's
    per-site evaluation, `eval_s`)."""
    if not runs_here(cfg, scenario, seed):
        return []
    per_variant = train_s + float(cfg.cost.ablation_evaluations) * eval_s
    return [(stage_name(cfg, unit), len(variants(cfg)) * per_variant)]


def stage_name(cfg: DictConfig, unit: str) -> str:
    return f"{unit}: objective ablations ({len(variants(cfg))} pooled trainings)"


def objective_ablations(
    u: Unit,
    per_site_data: Mapping[str, EvalSet],
    per_site: compare.PerSite,
    ev: Mapping[str, Any],
    view: Callable[[torch.nn.Module], torch.nn.Module],
) -> None:
    """Question o: each variant trained, probed per site and scored zero-shot on the same rows as
    the pooled model, each against it."""
    cfg, scenario, seed = u.cfg, u.scenario, u.seed
    if not runs_here(cfg, scenario, seed):
        return
    for name, change in variants(cfg).items():
        model = pooled_variant(u.setup, u.regimes, u.fed, seed, u.show, change, f"objective_ablation.{name}")
        res, _ = compare.evaluate_per_site(name, per_site_data, view(model), progress=u.show, **ev)
        zero = f"{name}, zero-shot"
        scored = zero_shot_per_site(u, per_site_data, model, zero)
        for site in per_site_data:
            if site in res:
                per_site[site][name] = res[site]
            per_site[site][zero] = scored[site]
        u.ev_out.add(
            scenario,
            f"o|{name} - full objective",
            name,
            REFERENCE,
            seed,
            site_items(per_site_data, per_site, name, REFERENCE),
        )
        u.ev_out.add(
            scenario,
            f"o|{name} - full objective, zero-shot",
            zero,
            ZERO_SHOT_POOLED,
            seed,
            site_items(per_site_data, per_site, zero, ZERO_SHOT_POOLED),
        )
    u.progress.finish(stage_name(cfg, u.name))


def verdicts(comps: Mapping[str, Comparison]) -> list[Verdict]:
    """o has no numeric target in the issue: which removals move the probes' AUROC clearly."""
    mine = {k.split("|", 1)[1]: c for k, c in comps.items() if k.startswith("o|")}
    detail = "; ".join(
        f"{k}: {c.difference:+.3f} {'excludes 0' if c.difference_ci[0] > 0 or c.difference_ci[1] < 0 else 'includes 0'}"
        for k, c in mine.items()
    )
    return [
        Verdict(
            question="o",
            target="(no numeric target) which objective's removal has an interval excluding 0 (probe, zero-shot)",
            met=None,
            detail=detail or "not measured",
        )
    ]


__all__ = [
    "QUESTIONS",
    "REFERENCE",
    "not_run",
    "objective_ablations",
    "plan",
    "runs_here",
    "stage_name",
    "variants",
    "verdicts",
]
