"""DP at one site: the site's own training with and without DP-SGD at one recipe, scored by its
probes (issue 68). What DP costs a site, lever by lever and size by size.

    python -m simulations.dp_site                                  # configs/dp_site.yaml
    python -m simulations.dp_site 'sizes=[1000,4000,16000]' 'levers=[recipe]' out_dir=runs/dp_site/sizes
    python -m simulations.dp_site 'epsilons=[8]' draws=3 'levers=[batch_32,recipe]'

What it measures. One site of a scenario (`site`), generated alone at each of `sizes` subjects
(80% of them train), trains the model from its initialisation on its train split: once without
DP at the `baseline` recipe (the site's usual loop: shuffled batches), and with DP-SGD at each
lever's recipe (`recipes.<lever>`: Poisson sampling rate, steps, learning rate, clipping norm,
the parameter groups and whether only their modality encoders train) at each target epsilon
(the site's own engine, healthfm_core.privacy.engine: Poisson sampling at the rate, per-sample
clipping, the noise that spends epsilon over the recipe's steps at `delta`, RDP accounting),
each DP setting `draws` times (every draw its own secret noise). Give every recipe the
baseline's samples seen (sampling rate x steps) to compare at equal compute. Every model is read
by the same frozen probes as everywhere (fitted on train, C chosen on tuning, scored on
held_out, every onset task and horizon); each DP model is compared with the no-DP model on the
same held-out rows (paired subject bootstrap; over draws, `compare_draws`). The tuning split's
mean AUROC is reported beside: a recipe is chosen on it, never on held_out.

Why one site and not a federation: a lever acts on each site's local DP training the same way
in a federation, and one site costs a quarter of a four-site federation and no Flower; the
privacy sweep (simulations.privacy_sweep) and the evidence job's q4 run the federation at the
recipe chosen here. A federation averages its sites' noise, so one site alone is the harder
case. The evidence job's size curve (q4, `dp_size_curve`) is this at 1,000 / 4,000 / 16,000
subjects with the chosen recipe.

Outputs in out_dir: dp_site.md (a table per size: each lever and epsilon against no DP, tuning
AUROC, noise multiplier, epsilon spent, seconds) and dp_site.json (every number).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.data.sequences.tokens import SiteSequences, collate, make_loader
from healthfm_core.data.sites.site import Site
from healthfm_core.eval.paired_comparison import Comparison, Item, compare_draws, compare_paired
from healthfm_core.eval.runner import (
    EvalSet,
    MethodResult,
    PooledEmbedder,
    evaluate_method_splits,
    method_features,
    paired_items,
)
from healthfm_core.first_error import first_error
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.privacy.engine import DPLocalStep, DPSettings, PoissonBatches, noise_for_target, sample_rate_for
from healthfm_core.protocol import FederationSetup, federation_modalities
from healthfm_core.terms.groups import is_encoder
from healthfm_core.terms.model_config import model_config_from_dict
from healthfm_core.terms.objective_weights import curriculum_weights
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import train_local
from simulations.common import Clock, onset_eval_data, open_sites, write_outputs
from simulations.logs import setup_job_logging
from simulations.pretrain import agree_vocabulary
from simulations.report import site_groups, train_ids
from simulations.synthetic import load_scenario

log = logging.getLogger("healthfm.simulations.dp_site")

MARKER = "dp_site.json"
NO_DP = "no DP"


class Recipe(BaseModel):
    """How a site trains (under DP and without, at the same samples seen)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_rate: float = Field(gt=0, le=1)  # expected batch = sample_rate x the site's train subjects
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    max_grad_norm: float = Field(gt=0)  # per-sample clipping norm (DP only)
    weight_decay: float = Field(default=0.01, ge=0)
    groups: list[str] | None = None  # parameter groups trained; None: the site's (shared + its modalities)
    # "encoders": only the modality encoders of those groups train (model/groups.py ENCODER_PREFIXES)
    train: Literal["all", "encoders"] = "all"

    def batch_size(self, n_train: int) -> int:
        return max(1, round(self.sample_rate * n_train))


class SiteData:
    """One site generated alone at a size: the site, its sequences, the setup its model is built
    from (vocabulary agreed on the site alone), its evaluation rows and train dataset."""

    def __init__(self, cfg: DictConfig, size: int) -> None:
        scenario = load_scenario(str(cfg.scenario_name)).model_dump(mode="json")
        scenario["sites"] = [s for s in scenario["sites"] if s["name"] == cfg.site]
        if not scenario["sites"]:
            raise ValueError(f"dp_site: site {cfg.site!r} is not a site of scenario {cfg.scenario_name!r}")
        data_dir = Path(str(cfg.data_root)) / f"{cfg.scenario_name}-{cfg.site}-seed{cfg.seed}-n{size}"
        sites, _, _ = open_sites(scenario, data_dir, int(cfg.seed), size)
        self.site: Site = sites[str(cfg.site)]
        vocab = agree_vocabulary(sites, int(cfg.vocab_min_subjects))
        mcfg = model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True), source="model")  # type: ignore[arg-type]
        self.setup = FederationSetup(
            vocabulary=vocab,
            model=mcfg,
            model_seed=int(cfg.seed),
            modalities=federation_modalities([s.modalities for s in sites.values()], vocab),
        )
        self.seqs = SiteSequences.from_site(self.site, vocab, tokens=self.setup.tokens)
        job = OmegaConf.create({"eval": {"onset_tasks": "all", "n_per_subject": cfg.eval.n_per_subject}})
        job.seed, job.task_list = int(cfg.seed), None
        self.rows: EvalSet = onset_eval_data(job, sites, {str(cfg.site): self.seqs})[str(cfg.site)]
        run = LocalRun(lr=1.0, weight_decay=0.0, batch_size=1, max_events=cfg.max_events, max_patches=cfg.max_patches)
        self.dataset = run.dataset(self.seqs, train_ids(self.site), int(cfg.seed))
        self.size = size


def train_site(
    data: SiteData,
    recipe: Recipe,
    epsilon: float | None,
    delta: float,
    seed: int,
    max_events: int,
    max_patches: int,
) -> tuple[HealthFM, dict[str, float]]:
    """The site's model trained at `recipe` from the initialisation: without DP (epsilon None) or
    with DP-SGD spending `epsilon` at `delta` over the recipe's steps; (model, what the DP run
    reports: noise multiplier, sampling rate, epsilon spent, mean per-sample gradient norm)."""
    model = init_model(data.setup)
    n = len(data.dataset)
    batch = recipe.batch_size(n)
    run = LocalRun(recipe.lr, recipe.weight_decay, batch, max_events, max_patches)
    tcfg = run.train_config(recipe.steps, seed, log_every=recipe.steps)
    groups = recipe.groups or site_groups(data.site)
    steps = recipe.steps

    def weights(step: int) -> Any:
        return curriculum_weights(step, steps, data.setup.model)

    trainable = is_encoder if recipe.train == "encoders" else None
    if epsilon is None:
        loader = make_loader(data.dataset, batch_size=batch, shuffle=True, seed=seed, drop_last=n > batch)
        train_local(model, loader, tcfg, groups=groups, weights_fn=weights, trainable=trainable)
        return model, {}
    from opacus.accountants import RDPAccountant  # only under DP (engine.py says why)

    rate = sample_rate_for(batch, n)
    settings = DPSettings(
        noise_multiplier=noise_for_target(epsilon, delta, rate, steps),
        max_grad_norm=recipe.max_grad_norm,
        sample_rate=rate,
        n_samples=n,
        delta=delta,
    )
    step = DPLocalStep(settings, RDPAccountant(), max_steps=steps)
    result = train_local(
        model,
        PoissonBatches(data.dataset, collate, rate, steps),
        tcfg,
        groups=groups,
        weights_fn=weights,
        local_step=step,
        trainable=trainable,
    )
    return model, {
        "noise_multiplier": settings.noise_multiplier,
        "sample_rate": rate,
        "expected_batch": settings.expected_batch_size,
        "epsilon_spent": float(step.accountant.get_epsilon(delta)),
        "mean_grad_norm": float(np.mean([h["grad_norm"] for h in result.history])),
    }


def score(
    data: SiteData, model: HealthFM, label: str, poolings: Sequence[str], cfg: DictConfig
) -> dict[str, MethodResult]:
    """The model's probes at the site: {held_out, tuning} results."""
    feats = method_features(
        data.rows,
        PooledEmbedder(model, list(poolings)),
        max_events=cfg.max_events,
        max_patches=cfg.max_patches,
        batch_size=int(cfg.eval.batch_size),
    )
    n_boot = int(cfg.eval.n_boot_per_run)
    return evaluate_method_splits(
        label, data.rows, feats, ("held_out", "tuning"), n_boot={"held_out": n_boot, "tuning": 1}, seed=int(cfg.seed)
    )


def mean_auroc(result: MethodResult) -> float:
    values = [r.auroc for r in result.rows if np.isfinite(r.auroc)]
    return float(np.mean(values)) if values else float("nan")


def setting_label(epsilon: float | None, draw: int | None) -> str:
    return NO_DP if epsilon is None else f"eps={epsilon:g}" + ("" if draw is None else f" draw {draw}")


class LeverRun(BaseModel):
    """One recipe at one size: each setting's mean AUROC (held_out, tuning), DP report, seconds."""

    size: int
    lever: str
    recipe: Recipe
    held_out: dict[str, float]
    tuning: dict[str, float]
    dp: dict[str, dict[str, float]]
    seconds: dict[str, float]


def train_and_score(
    data: SiteData, recipe: Recipe, epsilon: float | None, draw: int | None, cfg: DictConfig
) -> tuple[str, dict[str, MethodResult], dict[str, float], float]:
    """One model at one setting: (its label, {held_out, tuning} results, its DP report, seconds)."""
    label = setting_label(epsilon, draw)
    t0 = time.perf_counter()
    model, info = train_site(
        data, recipe, epsilon, float(cfg.delta), int(cfg.seed), int(cfg.max_events), int(cfg.max_patches)
    )
    results = score(data, model, label, list(cfg.eval.probe_poolings), cfg)
    return label, results, info, round(time.perf_counter() - t0, 1)


def run_lever(
    data: SiteData,
    lever: str,
    recipe: Recipe,
    cfg: DictConfig,
    baseline: tuple[dict[str, MethodResult], float],
) -> tuple[LeverRun, dict[str, dict[str, MethodResult]]]:
    """Every epsilon x draw at one recipe, beside the no-DP `baseline` (its results and seconds:
    the site's model without DP at the baseline recipe, the same samples seen): the run's numbers
    and each setting's results."""
    draws = int(cfg.draws)
    results: dict[str, dict[str, MethodResult]] = {NO_DP: baseline[0]}
    info: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {NO_DP: baseline[1]}
    for epsilon in (float(e) for e in cfg.epsilons):
        for draw in [None] if draws == 1 else range(1, draws + 1):
            label, results[label], info[label], seconds[label] = train_and_score(data, recipe, epsilon, draw, cfg)
            log.info("%d subjects, %s, %s: %.0f s %s", data.size, lever, label, seconds[label], info[label])
    run = LeverRun(
        size=data.size,
        lever=lever,
        recipe=recipe,
        held_out={k: mean_auroc(r["held_out"]) for k, r in results.items()},
        tuning={k: mean_auroc(r["tuning"]) for k, r in results.items()},
        dp=info,
        seconds=seconds,
    )
    return run, results


def baseline_run(data: SiteData, recipe: Recipe, cfg: DictConfig) -> tuple[dict[str, MethodResult], float]:
    """The site's model without DP at the baseline recipe: its results and seconds."""
    _, results, _, seconds = train_and_score(data, recipe, None, None, cfg)
    log.info("%d subjects, no DP: %.0f s", data.size, seconds)
    return results, seconds


def against_no_dp(
    data: SiteData, results: Mapping[str, Mapping[str, MethodResult]], n_boot: int
) -> dict[str, Comparison]:
    """Each epsilon against no DP on the same held-out rows (over its draws: compare_draws)."""
    base = results[NO_DP]["held_out"]
    tasks = list(data.rows.tasks)
    by_eps: dict[str, list[list[Item]]] = {}
    for label, res in results.items():
        if label != NO_DP:
            by_eps.setdefault(label.split(" draw ")[0], []).append(
                paired_items(data.rows, res["held_out"], base, tasks)
            )
    out = {}
    for eps, draws in by_eps.items():
        draws = [[it for it in d if 0 < int(np.sum(it[0])) < len(it[0])] for d in draws]
        out[eps] = (
            compare_paired(draws[0], eps, NO_DP, n_boot=n_boot)
            if len(draws) == 1
            else compare_draws(draws, eps, NO_DP, n_boot=n_boot)
        )
    return out


def recipe_of(cfg: DictConfig, name: str, field: str) -> Recipe:
    """Recipe `name` of cfg.recipes, validated (errors name the field and the recipe)."""
    if name not in cfg.recipes:
        raise ValueError(f"{field}: {name!r} is not one of recipes {sorted(cfg.recipes)}")
    try:
        return Recipe.model_validate(OmegaConf.to_container(cfg.recipes[name], resolve=True))
    except ValidationError as err:
        raise ValueError(first_error(err, f"recipes.{name}")) from None


def recipes_of(cfg: DictConfig) -> dict[str, Recipe]:
    """cfg.levers (names) of cfg.recipes, each validated."""
    return {str(name): recipe_of(cfg, str(name), "levers") for name in cfg.levers}


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    out = Path(str(cfg.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    recipes = recipes_of(cfg)
    lines = [
        f"# DP at one site: {cfg.site} of `{cfg.scenario_name}`, seed {cfg.seed}",
        "",
        f"Each lever trains the site's model alone with DP-SGD at its recipe at epsilon "
        f"{', '.join(str(e) for e in cfg.epsilons)} (delta {cfg.delta:g}; {cfg.draws} noise draw(s) each), "
        f"against the site's model without DP at recipe `{cfg.baseline}`; "
        "probes fitted on train, C on tuning, scored on held_out; each epsilon - no DP, paired "
        f"on the same held-out rows ({int(cfg.eval.n_boot)} subject resamples; over the draws too). Choose a "
        "recipe on the tuning column, never on held_out.",
    ]
    dump: dict[str, Any] = {"runs": [], "comparisons": {}}
    for size in (int(s) for s in cfg.sizes):
        data = SiteData(cfg, size)
        clock.lap(f"data, {size} subjects")
        lines += [
            "",
            f"## {size} subjects ({len(data.dataset)} train)",
            "",
            "| lever | recipe | setting | held-out AUROC | tuning AUROC | - no DP [95% CI] | noise multiplier | epsilon spent | s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        baseline = baseline_run(data, recipe_of(cfg, str(cfg.baseline), "baseline"), cfg)
        for lever, recipe in recipes.items():
            lever_run, results = run_lever(data, lever, recipe, cfg, baseline)
            comps = against_no_dp(data, results, int(cfg.eval.n_boot))
            clock.lap(f"{lever}, {size} subjects")
            dump["runs"].append(lever_run.model_dump())
            dump["comparisons"][f"{size}|{lever}"] = {k: c.model_dump() for k, c in comps.items()}
            shown = (
                f"q {recipe.sample_rate:g} (batch {recipe.batch_size(len(data.dataset))}), {recipe.steps} steps, "
                f"lr {recipe.lr:g}, clip {recipe.max_grad_norm:g}"
                + (f", groups {recipe.groups}" if recipe.groups else "")
            )
            for label in lever_run.held_out:
                head = label.split(" draw ")[0]
                c = comps.get(head) if label == head or label.endswith(" draw 1") else None
                diff = (
                    "" if c is None else f"{c.difference:+.3f} [{c.difference_ci[0]:+.3f}, {c.difference_ci[1]:+.3f}]"
                )
                dp = lever_run.dp.get(label, {})
                lines.append(
                    f"| {lever} | {shown} | {label} | {lever_run.held_out[label]:.3f} | {lever_run.tuning[label]:.3f} | "
                    f"{diff} | {dp.get('noise_multiplier', float('nan')):.2f} | {dp.get('epsilon_spent', float('nan')):.2f} | "
                    f"{lever_run.seconds[label]:.0f} |"
                )
    dump["config"] = OmegaConf.to_container(cfg, resolve=True)
    return write_outputs(out, MARKER, dump, "dp_site.md", lines, clock)


@hydra.main(config_path="../configs", config_name="dp_site", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_job_logging()
    print(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
