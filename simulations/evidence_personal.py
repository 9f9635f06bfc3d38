"""Personalisation in the evidence job (issue 68): does every site end at least as well off as alone?

q2 asks whether any site's federated probe is clearly below the model it would train alone. A
site that joins does not have to use the federated model as it comes: as the field does
(FedAvg followed by local fine-tuning, healthfm_core/train/adapt.py), each site here takes local
steps on its own train split from the federated weights, keeps a snapshot at each of
`personalisation.steps` (0 = the federated model unchanged), and keeps the count whose probes
score best on its tuning split (healthfm_core/eval/personal_choice.py; never held_out), or its
local-only model when every adapted model is below it on tuning (so the kept model is never below
local-only on the split it is chosen on). The
kept model is the site's `personalised` method, scored on the same held-out rows as every other:

    q2|<site>, personalised     personalised - local-only, paired (the verdict's comparison)
    q2|<site>, pooled            pooled - local-only: the mix of sites without federated
                                 optimisation (diagnosis: is it the data mix or the averaging?)

and Evidence.diagnostics[scenario][seed]["personalisation"]: per site, the steps kept and every
candidate's mean tuning AUROC. `client.py personalise` is the same adaptation and choice at a
real site (docs/site-admin.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from omegaconf import DictConfig

from healthfm_core.eval import compare
from healthfm_core.eval.paired_comparison import Comparison, Verdict, not_clearly_below
from healthfm_core.eval.runner import EvalSet, MethodFeatures, paired_items
from healthfm_core.train.adapt import candidate_steps, last_round_weights
from healthfm_core.train.local_run import LocalRun
from simulations.evidence_unit_run import UnitRun
from simulations.personalise import METHOD, personalise_site

log = logging.getLogger("healthfm.simulations.evidence")


def personalise(
    u: UnitRun,
    per_site_data: Mapping[str, EvalSet],
    per_site: compare.PerSite,
    features: Mapping[str, Mapping[str, MethodFeatures]],
    view: Callable[[Any], Any],
) -> None:
    """The stage: each site's personalised model (the steps chosen on its tuning split) into
    per_site under METHOD and the choices into the unit's evidence; then per site the comparisons
    with its local-only model (q2|<site>, personalised; q2|<site>, pooled: the diagnosis)."""
    if not enabled(u.cfg):
        return
    cfg, fed, seed = u.cfg, u.fed, u.seed
    steps = candidate_steps(cfg.personalisation.steps)
    run = LocalRun.of(fed)
    weights = last_round_weights(u.setup.model, int(fed.rounds))
    ev = {"max_events": fed.max_events, "max_patches": fed.max_patches, "batch_size": int(cfg.eval.batch_size)}
    choices: dict[str, Any] = {}
    for name, site in u.sites.items():
        dataset = u.regimes.datasets[name]
        if len(dataset) == 0 or name not in features.get("federated", {}):
            continue
        per_site[name][METHOD], choice = personalise_site(
            u.fed_model, site, dataset, per_site_data[name], view, steps, run, weights, seed, ev, u.n_boot,
            features["federated"][name], features.get("local-only", {}).get(name),
        )  # fmt: skip
        choices[name] = choice.model_dump()
        log.info(
            "%s: %s keeps %s (tuning AUROC %s; local-only %s)",
            u.name, name, choice.kept, choice.tuning_auroc, choice.local_only_auroc,
        )  # fmt: skip
    u.ev_out.diagnostics[u.scenario].setdefault(u.seed, {})["personalisation"] = choices
    for name in u.sites:
        res, data = per_site.get(name, {}), per_site_data[name]
        for method in (METHOD, "pooled"):
            if method in res and "local-only" in res:
                items = paired_items(data, res[method], res["local-only"], list(data.tasks))
                u.ev_out.add(u.scenario, f"q2|{name}, {method}", method, "local-only", u.seed, items)
    u.progress.finish(stage_name(u.name))


def q2_verdict(comps: Mapping[str, Comparison]) -> Verdict:
    """q2 on the model each site keeps: its personalised model where the unit ran the stage (the
    federated model as it comes otherwise), against its local-only model; the detail names the
    sites that kept their local-only model in every seed, and those whose federated model as it
    comes is clearly below."""
    target = (
        "no site clearly below its local-only AUROC (interval of the kept model - local-only not below 0; "
        "kept: the federated model after the local steps its tuning split chose, or its local-only model "
        "where every adapted model is below it there)"
    )
    plain = {k.split("|", 1)[1]: c for k, c in comps.items() if k.startswith("q2|") and ", " not in k}
    kept = {
        k.split("|", 1)[1].rsplit(", ", 1)[0]: c
        for k, c in comps.items()
        if k.startswith("q2|") and k.endswith(f", {METHOD}")
    }
    if not plain and not kept:
        return Verdict(question="q2", target=target, met=None, detail="not measured")
    judged = kept or plain
    below = [site for site, c in judged.items() if not not_clearly_below(c)]
    what = "personalised" if kept else "federated (no personalisation run)"
    detail = f"{what}: " + (
        "clearly below at " + ", ".join(below) if below else f"{len(judged)} sites, none clearly below"
    )
    detail += "; " + "; ".join(
        f"{site} {c.difference:+.3f} [{c.difference_ci[0]:+.3f}, {c.difference_ci[1]:+.3f}]"
        for site, c in judged.items()
    )
    if own := [site for site, c in kept.items() if c.difference == 0 and tuple(c.difference_ci) == (0.0, 0.0)]:
        # Every held-out score equal to local-only's: the site kept its local-only model in every
        # seed; q2 holds there because nothing was gained by joining, which the detail says.
        detail += "; kept its local-only model in every seed (gains nothing by joining): " + ", ".join(own)
    if kept:
        plain_below = [site for site, c in plain.items() if not not_clearly_below(c)]
        detail += "; the federated model as it comes: " + (
            "clearly below at " + ", ".join(plain_below) if plain_below else "none clearly below"
        )
    return Verdict(question="q2", target=target, met=not below, detail=detail)


def report_lines(diagnostics: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The report's lines on the choices: per seed and site, the local steps kept and every
    candidate's mean tuning AUROC (over the tasks all of them scored)."""
    rows = []
    for seed, d in sorted(diagnostics.items()):
        for site, choice in d.get("personalisation", {}).items():
            scores = ", ".join(
                f"{k}: {v:.3f}" if np.isfinite(v) else f"{k}: n/a"
                for k, v in sorted(choice["tuning_auroc"].items(), key=lambda kv: int(kv[0]))
            )
            local = choice.get("local_only_auroc")
            kept = "local-only" if choice.get("local_only") else str(choice["steps"])
            local_text = f"{local:.3f}" if local is not None and np.isfinite(local) else "n/a"
            rows.append(f"| {seed} | {site} | {kept} | {scores} | {local_text} | {len(choice['tasks'])} |")
    if not rows:
        return []
    return [
        "",
        "Personalisation: the local steps each site kept after the last round (or its local-only model, kept "
        "when every adapted model was below it), chosen on its tuning split (mean tuning AUROC of each "
        "candidate over the tasks every candidate scored; held_out never read):",
        "",
        "| seed | site | kept | tuning AUROC by steps | local-only's | tasks |",
        "|---:|---|---:|---|---:|---:|",
        *rows,
    ]


def enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("personalisation", {}).get("enabled", False))


def stage_name(unit: str) -> str:
    return f"{unit}: personalisation"


def plan(cfg: DictConfig, unit: str, n_sites: int, step_s: float, eval_s: float) -> list[tuple[str, float]]:
    """The stage for the plan: each site trains the largest candidate's steps once (`step_s` a
    step) and scores each candidate but 0 (`eval_s`: one model's per-site evaluation over every
    site, so a site's share of it)."""
    if not enabled(cfg):
        return []
    steps = candidate_steps(cfg.personalisation.steps)
    evaluated = len([k for k in steps if k > 0])
    return [(stage_name(unit), n_sites * steps[-1] * step_s + evaluated * eval_s)]


__all__ = ["enabled", "personalise", "plan", "q2_verdict", "report_lines", "stage_name"]
