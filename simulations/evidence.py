"""Evidence that the platform pays off: six questions, seeds, subject-bootstrap paired intervals.

    python -m simulations.evidence                    # the full job (preset=full, < 2 h on 2 cores)
    python -m simulations.evidence --quick            # CI size, a few minutes (= preset=quick)
    python -m simulations.evidence preset=medium out_dir=runs/evidence/medium

For each scenario (`default`, and `trajectories`, whose risk a linear read-out of recent values
cannot capture; docs/evidence.md) and each seed (its own synthetic world and training run):

1. the federation (Flower simulation, simulations.run) and, at its budget, pooled (centralized:
   the same total samples seen) and each site alone (simulations.report.train_regimes), the
   random initialisation and the tabular baseline (healthfm_core.eval.tabular);
2. per site, frozen probes fitted on the site's train rows and scored on its held_out rows
   (compare.evaluate_per_site), every new-onset task and horizon: questions 1, 2, 6;
3. one probe over every site's rows with the labels of 5% / 20% / 100% of the train subjects
   (runner.subsample_train): question 3;
4. the federation again at each target epsilon, on a DP budget with enough steps
   (simulations.privacy_sweep; `privacy_budget` picks the scenarios and seeds): question 4;
5. the test-time modality ablation (simulations.pretrain.modality_ablation: EHR / + wearables at
   the end of wear periods, EHR / + genomics at the biobank's visits) and the decay kernel
   (pooled training of a single exponential and of no decay, i.e. plain attention with a
   sinusoidal time embedding, at the pooled model's budget): question 5.

Every comparison pools its items over seeds and sites and draws subjects once for all of them
(healthfm_core.eval.paired_comparison). Writes report.md (tables, verdicts, plots) and evidence.json
(every number) to out_dir; prints the plan with its estimated time first and logs each stage.
Each unit writes its evidence to units/<scenario>-seed<seed>/ when it ends (evidence_units);
resume=true loads the finished units instead of running them (docs/evidence.md).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.labels.tasks import OnsetTask, rows_per_subject
from healthfm_core.data.sequences.pooled import PooledPretrainingDataset
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.eval import compare, plots
from healthfm_core.eval.metrics import bootstrap_ci, expected_calibration_error
from healthfm_core.eval.paired_comparison import (
    Comparison,
    Verdict,
    comparison_plot,
    ratio_curve_plot,
)
from healthfm_core.eval.runner import (
    EvalSet,
    MethodFeatures,
    MethodResult,
    PooledEmbedder,
    evaluate_method,
    paired_items,
    subsample_train,
)
from healthfm_core.eval.tabular import TabularFeaturizer
from healthfm_core.model.healthfm import init_model
from healthfm_core.privacy.engine import noise_for_target, sample_rate_for
from healthfm_core.protocol import FederationSetup
from simulations import evidence_ablations, evidence_dp, evidence_personal, evidence_zero_shot, privacy_sweep
from simulations.common import Clock, clear_previous_runs, eval_settings, onset_eval_data, open_sites, write_outputs
from simulations.evidence_federations import clear_unfinished_unit, federation
from simulations.evidence_genomics import UnitModels, run_diagnosis
from simulations.evidence_stage import pooled_variant, site_items
from simulations.evidence_unit_run import Progress, UnitRun
from simulations.evidence_units import (
    DONE,
    DRAW_KEY,
    Evidence,
    check_fingerprint,
    load_unit,
    read_unit_file,
    save_unit,
    unit_fingerprint,
)
from simulations.logs import setup_job_logging
from simulations.overrides import refuse_unknown_overrides
from simulations.pretrain import modality_ablation
from simulations.report import Regimes, train_baseline, train_regimes
from simulations.synthetic import load_scenario, oracle_risk

log = logging.getLogger("healthfm.simulations.evidence")

MARKER = "evidence.json"  # present once the job has finished in out_dir
STARTED = ".evidence.started"
QUESTIONS: dict[str, str] = {
    "q1": "Federated against pooled at equal compute (same total samples seen)",
    "q2": "No site worse off: each site's federated probe against its local-only model",
    "q3": "Pretraining against random init and the tabular baseline, at 5% / 20% / 100% of labels",
    "q4": "Privacy cost: utility against epsilon",
    "q5": "Each modality and the decay kernel",
    "q6": "Calibration of the federated model's probes per horizon",
    "g": "Genomics diagnosis: where the PRS signal is lost (one disease's onset, sites with genomics)",
    **evidence_zero_shot.QUESTIONS,
    **evidence_ablations.QUESTIONS,
}
ALL_ROWS_PER_SUBJECT = 16  # the cost estimate's rows a subject with n_per_subject: all (a guess, not a cap)
PRESET_FLAGS = {"--quick": "preset=quick", "--medium": "preset=medium", "--full": "preset=full"}


# ---------------------------------------------------------------- the plan and its progress


def plan_stages(cfg: DictConfig) -> list[tuple[str, float]]:
    """(stage, estimated seconds) for every stage of the job, from the preset's sizes and the
    per-unit costs in `cost` (timed on this project's 2-core machine)."""
    c, fed, dp = cfg.cost, cfg.federation, cfg.privacy_budget
    stages: list[tuple[str, float]] = []
    for scenario in cfg.scenarios:
        sc = load_scenario(str(scenario)).with_n_subjects(cfg.n_subjects)
        n_sites = len(sc.sites)
        subjects = sum(s.n_subjects for s in sc.sites)
        fed_steps = int(fed.rounds) * int(fed.local_steps) * n_sites  # local steps over all sites
        rows = subjects * (rows_per_subject(cfg.eval.n_per_subject) or ALL_ROWS_PER_SUBJECT)
        step_s = float(c.step_seconds) * fed.batch_size / 16
        for seed in cfg.seeds:
            unit = f"{scenario} seed {seed}"
            stages.append((f"{unit}: data", float(c.data_seconds_per_1000_subjects) * subjects / 1000))
            stages.append((f"{unit}: federation", float(c.flower_run_seconds) + fed_steps * step_s))
            stages.append((f"{unit}: pooled and local-only", 2 * fed_steps * step_s))
            n_models = 5 + len(cfg.decay.variants or {})  # fed, pooled, local, random, tabular + variants
            stages.append((f"{unit}: kernel variants", len(cfg.decay.variants or {}) * fed_steps * step_s))
            stages.append((f"{unit}: per-site evaluation", n_models * rows * float(c.eval_seconds_per_row)))
            stages.append((f"{unit}: label shares and ablations", rows * float(c.ablation_seconds_per_row)))
            if bool(cfg.genomics_diagnosis.enabled):
                # One more pooled training (genomics hidden) and five feature passes over the cohort.
                t = 2 * fed_steps * step_s * bool(cfg.genomics_diagnosis.train_without)
                stages.append((f"{unit}: genomics diagnosis", t + rows * float(c.ablation_seconds_per_row)))
            # Issue 72: zero-shot and the repeated-event pitfall; the objective ablations.
            train_s, eval_s = fed_steps * step_s, rows * float(c.eval_seconds_per_row)
            for stage in (evidence_zero_shot, evidence_ablations):
                stages += stage.plan(cfg, str(scenario), int(seed), unit, train_s, eval_s)
            # Issue 68: each site's local steps after the last round, chosen on its tuning split.
            stages += evidence_personal.plan(cfg, unit, n_sites, step_s, rows * float(c.eval_seconds_per_row))
            if str(scenario) in dp.scenarios and int(seed) in dp.seeds:
                dp_steps = int(dp.federation.rounds) * int(dp.federation.local_steps) * n_sites
                n_dp = sum(e is not None for e in dp.epsilons) * int(dp.draws)
                n_plain = sum(e is None for e in dp.epsilons)
                n_fed = n_dp + n_plain
                t = n_fed * float(c.flower_run_seconds)
                t += dp_steps * dp.federation.batch_size * (n_dp * float(c.dp_sample_seconds))
                t += n_plain * dp_steps * float(c.step_seconds) * dp.federation.batch_size / 16
                t += n_fed * rows * float(c.eval_seconds_per_row)
                stages.append((f"{unit}: privacy ({n_fed} federations)", t))
            stages += evidence_dp.plan(cfg, str(scenario), int(seed), unit)  # issue 68: DP by site size
            bc = cfg.budget_curve
            if str(scenario) in bc.scenarios and int(seed) in bc.seeds:
                per_round = int(fed.local_steps) * n_sites * step_s  # one round, over all sites
                n_fed = sum(budget_runs(cfg, int(r)) for r in bc.rounds)
                t = sum(int(r) * per_round for r in bc.rounds)  # pooled at each budget
                t += sum(
                    budget_runs(cfg, int(r)) * (float(c.flower_run_seconds) + int(r) * per_round) for r in bc.rounds
                )
                t += (n_fed + len(bc.rounds)) * rows * float(c.eval_seconds_per_row)
                t += evidence_zero_shot.budget_plan(cfg, rows * float(c.eval_seconds_per_row))
                stages.append((f"{unit}: budget curve ({n_fed} federations)", t))
    stages.append(("comparisons, report and plots", float(c.report_seconds)))
    return stages


def budget_runs(cfg: DictConfig, rounds: int) -> int:
    """Federations the budget curve trains at `rounds` (FedAvg at the main federation's rounds is
    the main federation itself, reused)."""
    return sum(not reuses_main(cfg, name, rounds) for name in cfg.budget_curve.strategies)


def reuses_main(cfg: DictConfig, strategy: str, rounds: int) -> bool:
    return rounds == int(cfg.federation.rounds) and not cfg.budget_curve.strategies[strategy]


BUDGET_KEY = re.compile(r"^q1\|budget: (?P<strategy>.+), (?P<rounds>\d+) rounds$")


def budget_curves(comps: Mapping[str, Comparison]) -> dict[str, dict[int, Comparison]]:
    """The budget curve's comparisons ("q1|budget: <strategy>, <R> rounds") by strategy, then rounds."""
    curves: dict[str, dict[int, Comparison]] = {}
    for k, c in comps.items():
        if (m := BUDGET_KEY.match(k)) is not None:
            curves.setdefault(m["strategy"], {})[int(m["rounds"])] = c
    return curves


# ---------------------------------------------------------------- collecting paired items


def horizon_of(data: Mapping[str, EvalSet]) -> dict[str, int]:
    tasks = next(iter(data.values())).tasks
    return {k: int(t.horizon_days) for k, t in tasks.items() if isinstance(t, OnsetTask)}


def pooled_eval(
    per_site_data: Mapping[str, EvalSet], features: Mapping[str, MethodFeatures]
) -> tuple[EvalSet, MethodFeatures]:
    """Every site's rows as one EvalSet, with the per-site features laid end to end (the
    EvalSet concatenates sites in the same order, so positions shift by each site's size)."""
    parts, xs, present, rows = [], [], [], []
    offset = 0
    for name, data in per_site_data.items():
        parts += data.sites
        if name in features:
            f = features[name]
            xs.append(f.x)
            present.append(f.present)
            rows.append(f.rows + offset)
        offset += len(data)
    tasks = next(iter(per_site_data.values())).tasks
    return EvalSet(sites=parts, tasks=tasks), MethodFeatures(
        np.concatenate(xs), np.concatenate(present), np.concatenate(rows)
    )


# ---------------------------------------------------------------- one scenario and seed


def probe_view(cfg: DictConfig, model: torch.nn.Module | None) -> torch.nn.Module | None:
    """What the job's probes read of a pretrained model: eval.probe_poolings of runner.PooledEmbedder
    ([query, genomics]: the query state and the genomics encoder's output, issue 31)."""
    if model is None:
        return None
    return PooledEmbedder(model, list(cfg.eval.probe_poolings))


def unit_config(cfg: DictConfig, scenario: str, seed: int, out: Path) -> DictConfig:
    """The config of one (scenario, seed): what simulations.run and the evaluation read."""
    sc = load_scenario(scenario).model_dump(mode="json")
    n = cfg.n_subjects
    # Not struct: the jobs it calls merge keys of their own in (out_dir, privacy.target_epsilon).
    return cast(
        DictConfig,
        OmegaConf.merge(
            OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
            {
                "scenario": sc,
                "seed": int(seed),
                "data_dir": f"{cfg.data_root}/{scenario}-seed{seed}-n{n}",
                "out_dir": str(out),
            },
        ),
    )


def run_unit(
    cfg: DictConfig,
    scenario: str,
    seed: int,
    out: Path,
    ev_out: Evidence,
    progress: Progress,
    fingerprint: Mapping[str, Any] | None = None,
) -> None:
    """Run one (scenario, seed) into ev_out (a fresh Evidence: this unit's only); with a
    `fingerprint` (unit_fingerprint), write it to `out` when the unit ends (evidence_units)."""
    ucfg = unit_config(cfg, scenario, seed, out)
    unit = f"{scenario} seed {seed}"
    show = bool(cfg.progress)
    fed = ucfg.federation
    sites, truth_dir, sc = open_sites(ucfg.scenario, ucfg.data_dir, seed, ucfg.n_subjects)
    progress.finish(f"{unit}: data")

    setup, fed_model, rounds = federation(ucfg, out / "federation", scenario)
    vocab = setup.vocabulary
    seqs = {name: SiteSequences.from_site(site, vocab, tokens=setup.tokens) for name, site in sites.items()}
    progress.finish(f"{unit}: federation")

    regimes = train_regimes(setup, sites, seqs, fed, seed, rounds, show)
    progress.finish(f"{unit}: pooled and local-only")

    u = UnitRun(cfg, ucfg, scenario, seed, out, ev_out, progress, sites, seqs, setup, fed_model, regimes)
    variants = kernel_variants(cfg, setup, regimes, fed, seed, show)
    progress.finish(f"{unit}: kernel variants")

    per_site_data, ev, per_site, features, view = evaluate_unit(u, variants, truth_dir, sc)
    evidence_zero_shot.add_zero_shot(u, per_site_data, per_site)
    progress.finish(f"{unit}: per-site evaluation")

    horizons = site_comparisons(u, per_site_data, per_site, variants)
    label_shares(u, per_site_data, features, horizons)
    modality_ablations(u, per_site_data, horizons)
    progress.finish(f"{unit}: label shares and ablations")

    # The genomics diagnosis (evidence_genomics): the world, the tabular read, the model at test
    # and at train time, the encoder; needs the truth (synthetic sites only).
    if bool(cfg.genomics_diagnosis.enabled):
        if truth_dir is not None and sc is not None:
            unit_models = UnitModels(per_site_data, sites, sc, truth_dir, setup, fed_model, regimes)
            run_diagnosis(ucfg, scenario, seed, unit_models, ev_out, view)
        progress.finish(f"{unit}: genomics diagnosis")

    # Issue 72: zero-shot against the probes and the repeated-event pitfall; each objective's worth.
    if bool(cfg.zero_shot.enabled):
        evidence_zero_shot.zero_shot_comparisons(u, per_site_data, per_site, features, horizons)
        evidence_zero_shot.repeated_events(u, per_site_data, per_site, ev, view)
        progress.finish(evidence_zero_shot.stage_name(unit))
    evidence_ablations.objective_ablations(u, per_site_data, per_site, ev, view)
    # Issue 68: each site's model adapted by local steps, the steps chosen on its tuning split.
    evidence_personal.personalise(u, per_site_data, per_site, features, view)

    privacy_budget(u, per_site_data, ev, view)
    evidence_dp.size_curve(u)
    budget_curve(u, per_site_data, ev, view)

    if fingerprint is not None:
        seconds = {k: progress.actual[k] for k in progress.unit_stages(scenario, seed) if k in progress.actual}
        log.info("%s: evidence written to %s", unit, save_unit(out, ev_out, scenario, seed, fingerprint, seconds))


def kernel_variants(
    cfg: DictConfig, setup: FederationSetup, regimes: Regimes, fed: DictConfig, seed: int, show: bool
) -> dict[str, torch.nn.Module]:
    """Q5 (kernel): pooled training at the pooled budget with each decay.variants change to the model."""
    return {  # decay.variants=null: none
        f"kernel: {name}": pooled_variant(setup, regimes, fed, seed, show, change, f"decay.{name}")
        for name, change in (cfg.decay.variants or {}).items()
    }


def evaluate_unit(
    u: UnitRun, variants: Mapping[str, torch.nn.Module], truth_dir: Path | None, sc: Any
) -> tuple[dict[str, EvalSet], dict[str, Any], compare.PerSite, dict[str, dict[str, MethodFeatures]], Callable]:
    """Every method's probes on every site's onset rows (the oracle's true risk where the truth is
    known): the rows, the evaluation settings, the results, each method's features, the probe view."""
    cfg, ucfg, sites, seqs, setup, fed_model, regimes = u.cfg, u.ucfg, u.sites, u.seqs, u.setup, u.fed_model, u.regimes
    seed, n_boot, show = u.seed, u.n_boot, u.show
    vocab = setup.vocabulary
    per_site_data = onset_eval_data(ucfg, sites, seqs)
    ev = {**eval_settings(ucfg), "n_boot": n_boot}
    per_site: compare.PerSite = {name: {} for name in sites}
    features: dict[str, dict[str, MethodFeatures]] = {}
    view = functools.partial(probe_view, cfg)
    models: dict[str, Any] = {
        "federated": view(fed_model),
        "pooled": view(regimes.central_model),
        "random init": view(init_model(setup)),
        "tabular": TabularFeaturizer(vocab.vocab_size),
        "local-only": lambda s: view(regimes.local_models[s]),
        **{k: view(v) for k, v in variants.items()},
    }
    for method, model in models.items():
        res, features[method] = compare.evaluate_per_site(method, per_site_data, model, progress=show, **ev)
        for name, r in res.items():
            per_site[name][method] = r
    if truth_dir is not None and sc is not None:
        code_to_disease = {d.code: name for name, d in sc.diseases.items()}
        for name, r in compare.oracle_per_site(
            per_site_data, functools.partial(oracle_risk, truth_dir), code_to_disease, n_boot=n_boot, seed=seed
        ).items():
            per_site[name]["oracle"] = r
    return per_site_data, ev, per_site, features, view


def site_comparisons(
    u: UnitRun, per_site_data: Mapping[str, EvalSet], per_site: compare.PerSite, variants: Mapping[str, Any]
) -> dict[str, int]:
    """Q1, Q2, Q5 (kernel) and Q6 from the per-site results, and the unit's summary; the task
    keys' horizons."""
    ev_out, scenario, seed, sites = u.ev_out, u.scenario, u.seed, u.sites
    horizons = horizon_of(per_site_data)
    # Q1: federated against pooled, overall and per horizon.
    ev_out.add(
        scenario,
        "q1|all horizons",
        "federated",
        "pooled",
        seed,
        site_items(per_site_data, per_site, "federated", "pooled"),
    )
    for h in sorted(set(horizons.values())):

        def at_horizon(k: str, h: int = h) -> bool:
            return horizons.get(k) == h

        items = site_items(per_site_data, per_site, "federated", "pooled", at_horizon)
        ev_out.add(scenario, f"q1|{h} d", "federated", "pooled", seed, items)
    # Q2: each site, federated against its local-only model, on its own held-out subjects.
    for name in sites:
        items = site_items(per_site_data, per_site, "federated", "local-only", sites=[name])
        ev_out.add(scenario, f"q2|{name}", "federated", "local-only", seed, items)
    # Q5 (kernel): each variant against the mixture of exponentials (the pooled model), same budget.
    for name in variants:
        ev_out.add(
            scenario, f"q5|{name} - mixture", name, "pooled", seed, site_items(per_site_data, per_site, name, "pooled")
        )
    # Q6: the federated probes' held-out probabilities per horizon.
    for name, res in per_site.items():
        fr = res.get("federated")
        if fr is None:
            continue
        subjects = per_site_data[name].subject_keys()
        for key, (y, p) in fr.predictions.items():
            if key in horizons:
                groups = np.char.add(f"{scenario}|{seed}|", subjects[fr.scored_rows[key]])
                ev_out.calibration[(scenario, horizons[key])].append((y, p, groups))
    methods = [
        "federated",
        "pooled",
        "local-only",
        "random init",
        "tabular",
        *variants,
        *evidence_zero_shot.methods(u.cfg),
        "oracle",
    ]
    ev_out.summaries[scenario][seed] = [r.model_dump() for r in compare.summarize(per_site, methods)]

    return horizons


def label_shares(
    u: UnitRun,
    per_site_data: Mapping[str, EvalSet],
    features: Mapping[str, Mapping[str, MethodFeatures]],
    horizons: Mapping[str, int],
) -> None:
    """Q3: one probe over every site's rows, with the labels of a share of the train subjects."""
    cfg, ev_out, scenario, seed = u.cfg, u.ev_out, u.scenario, u.seed
    shares = [float(f) for f in cfg.eval.label_shares]
    pooled: dict[str, tuple[EvalSet, MethodFeatures]] = {
        m: pooled_eval(per_site_data, features[m]) for m in ("federated", "random init", "tabular")
    }
    data = pooled["federated"][0]
    curves = ev_out.curves.setdefault(scenario, {m: {} for m in pooled})
    for share in shares:
        results: dict[str, MethodResult] = {}
        for m, (_, f) in pooled.items():
            sel = np.isin(f.rows, subsample_train(data, f.rows, share, seed=seed))
            results[m] = evaluate_method(
                m,
                data,
                MethodFeatures(f.x[sel], f.present[sel], f.rows[sel]),
                tasks=list(horizons),
                n_boot=1,
                seed=seed,
            )
            aucs = [r.auroc for r in results[m].rows if np.isfinite(r.auroc)]
            if aucs:
                curves[m].setdefault(share, []).append(float(np.mean(aucs)))
        for other in ("random init", "tabular"):
            items = paired_items(data, results["federated"], results[other], list(horizons))
            ev_out.add(scenario, f"q3|pretrained - {other}, {share:.0%} of labels", "federated", other, seed, items)


def modality_ablations(u: UnitRun, per_site_data: Mapping[str, EvalSet], horizons: Mapping[str, int]) -> None:
    """Q5 (modalities): the test-time modality ablation on the federated model, per cohort."""
    cfg, ev_out, scenario, seed, fed, n_boot = u.cfg, u.ev_out, u.scenario, u.seed, u.fed, u.n_boot
    sites, seqs, fed_model, vocab = u.sites, u.seqs, u.fed_model, u.setup.vocabulary
    tasks = dict(next(iter(per_site_data.values())).tasks)
    for spec_name, spec in cfg.eval.modality_ablation.items():
        ablation_cfg = OmegaConf.create(
            {
                "seed": seed,
                "progress": False,
                "data": {"max_events": fed.max_events, "max_patches": fed.max_patches},
                "eval": {
                    "batch_size": cfg.eval.batch_size,
                    "ablation_pooling": list(cfg.eval.probe_poolings),
                    "n_boot": n_boot,
                    "summary_min_positives": int(cfg.eval.ablation_min_positives),
                    "modality_ablation": OmegaConf.to_container(spec, resolve=True),
                },
            }
        )
        if not any(s.wearable_files for s in sites.values()):
            ev_out.notes[scenario].append(f"seed {seed}: modality ablation {spec_name}: no site has wearables")
            continue
        abl = modality_ablation(ablation_cfg, sites, seqs, fed_model, tasks, vocab)
        for cohort in spec.cohorts:
            labels = [k for k in abl.results if k.startswith(f"{cohort}:")]
            for other in labels[1:]:
                items = paired_items(abl.data, abl.results[other], abl.results[labels[0]], list(horizons))
                cond = other.split("[")[1].rstrip("]")
                ev_out.add(scenario, f"q5|{cohort}: {cond} - ehr", other, labels[0], seed, items)
            if len(labels) < 2:
                ev_out.notes[scenario].append(
                    f"seed {seed}: modality cohort {cohort} ({abl.cohorts.get(cohort, 0)} rows): "
                    "too few positives for a cross-fitted probe in some condition"
                )


def privacy_budget(u: UnitRun, per_site_data: Mapping[str, EvalSet], ev: Mapping[str, Any], view: Callable) -> None:
    """Q4: the federation at each target epsilon on the DP budget (privacy_budget's scenarios and seeds)."""
    cfg, ucfg, ev_out, scenario, seed, out = u.cfg, u.ucfg, u.ev_out, u.scenario, u.seed, u.out
    show, regimes, progress, unit = u.show, u.regimes, u.progress, u.name
    dp = cfg.privacy_budget
    if not (scenario in dp.scenarios and seed in dp.seeds):
        return
    dcfg = cast(DictConfig, OmegaConf.merge(ucfg, {"federation": OmegaConf.to_container(dp.federation, resolve=True)}))
    # Issue 68: the DP settings train at their own recipe (fewer, larger Poisson batches, their own
    # lr and clipping norm) at the samples a site sees without DP; no DP keeps dp.federation's.
    private = privacy_sweep.dp_recipe_config(dcfg, dp.get("dp_recipe"))
    settings = privacy_sweep.Settings()
    # k independent noise draws per DP setting (each a federation trained anew: the noise is
    # secret and unseeded, so the draws differ); no DP is deterministic at a seed: one run.
    n_draws = int(dp.draws)
    draw_ids: list[int | None] = [None] if n_draws == 1 else list(range(1, n_draws + 1))
    by_draw: dict[int | None, list[tuple[float, str]]] = {d: [] for d in draw_ids}
    for epsilon in privacy_sweep.parse_epsilons(list(dp.epsilons)):
        for d in draw_ids if epsilon is not None else [None]:
            label = privacy_sweep.run_setting(
                dcfg if epsilon is None else private,
                out / "privacy",
                epsilon,
                settings,
                d,
                functools.partial(federation, scenario=scenario),
            )
            if epsilon is not None:
                by_draw[d].append((epsilon, label))
    per_site_dp = privacy_sweep.evaluate_settings(settings, per_site_data, ev, show, view)
    labels = list(settings.epsilon)
    base = compare.epsilon_label(None)
    for label in labels:
        if label != base and base in labels:
            # "eps=8 draw 2 - no DP": Evidence.compare adds "eps=8 - no DP" over the draws.
            ev_out.add(
                scenario,
                f"q4|{label} - no DP",
                label,
                base,
                seed,
                site_items(per_site_data, per_site_dp, label, base),
            )
    for finite in by_draw.values():  # neighbouring epsilons within a draw
        finite.sort()
        for (_, lo), (_, hi) in zip(finite, finite[1:]):
            ev_out.add(scenario, f"q4|{lo} - {hi}", lo, hi, seed, site_items(per_site_data, per_site_dp, lo, hi))
    pfed = private.federation
    steps = int(pfed.rounds) * int(pfed.local_steps)
    noise = {
        compare.epsilon_label(e): {
            s: noise_for_target(e, float(private.privacy.delta), sample_rate_for(int(pfed.batch_size), len(d)), steps)
            for s, d in regimes.datasets.items()
            if len(d)
        }
        for e in settings.epsilon.values()
        if e is not None
    }
    rows = compare.summarize(per_site_dp, labels)
    ev_out.privacy[scenario][seed] = {
        "settings": dict(settings.epsilon),
        "summary": [r.model_dump() for r in rows],
        "spent": settings.spent,
        "noise_multiplier": noise,
        "steps_per_site": steps,
        "batch_size": int(pfed.batch_size),
        "recipe": {
            "lr": float(pfed.lr),
            "max_grad_norm": float(private.privacy.max_grad_norm),
            "train": str(private.privacy.get("train", "all")),
            "no_dp": {k: dcfg.federation[k] for k in ("rounds", "local_steps", "batch_size", "lr")},
        },
        "table": compare.privacy_table(rows, settings.epsilon, settings.spent) if rows else "",
    }
    if rows:
        ev_out.privacy[scenario][seed]["plot"] = compare.privacy_plot(
            rows, settings.epsilon, Path(cfg.out_dir) / f"q4_utility_vs_epsilon_{scenario}.png"
        ).name
    progress.finish(f"{unit}: privacy ({len(settings.epsilon)} federations)")


def budget_curve(u: UnitRun, per_site_data: Mapping[str, EvalSet], ev: Mapping[str, Any], view: Callable) -> None:
    """Q1 as the budget grows: federated (each strategy) against pooled at equal compute, per
    number of rounds (budget_curve's scenarios and seeds)."""
    cfg, ucfg, ev_out, scenario, seed, out = u.cfg, u.ucfg, u.ev_out, u.scenario, u.seed, u.out
    sites, setup, fed_model, regimes, show, progress, unit, fed = (
        u.sites,
        u.setup,
        u.fed_model,
        u.regimes,
        u.show,
        u.progress,
        u.name,
        u.fed,
    )
    bc = cfg.budget_curve
    if not (scenario in bc.scenarios and seed in bc.seeds):
        return
    datasets = PooledPretrainingDataset(list(regimes.datasets.values()))
    n_fed = 0
    for r in (int(x) for x in bc.rounds):
        pooled_label = f"pooled at {r} rounds' compute"
        if r == int(fed.rounds):
            pooled_model = regimes.central_model
        else:
            steps = r * int(fed.local_steps) * len(sites)  # the federation's samples seen at r rounds
            pooled_model, _ = train_baseline(setup, datasets, steps, fed, seed, None, show)
        res, _ = compare.evaluate_per_site(pooled_label, per_site_data, view(pooled_model), progress=show, **ev)
        budget: compare.PerSite = {name: {pooled_label: rr} for name, rr in res.items()}
        for strategy, change in bc.strategies.items():
            label = f"{strategy}, {r} rounds"
            if reuses_main(cfg, strategy, r):
                model = fed_model
            else:
                scfg = cast(
                    DictConfig,
                    OmegaConf.merge(
                        ucfg,
                        {
                            "federation": {
                                **cast(dict[str, Any], OmegaConf.to_container(change, resolve=True)),
                                "rounds": r,
                            }
                        },
                    ),
                )
                _, model, _ = federation(
                    scfg, out / "budget" / f"{re.sub(r'[^a-z0-9]+', '-', label.lower())}", scenario
                )
                n_fed += 1
            res, _ = compare.evaluate_per_site(label, per_site_data, view(model), progress=show, **ev)
            for name, rr in res.items():
                budget[name][label] = rr
            items = site_items(per_site_data, budget, label, pooled_label)
            ev_out.add(scenario, f"q1|budget: {strategy}, {r} rounds", label, pooled_label, seed, items)
            if not bc.strategies[strategy]:  # FedAvg: does the head's gap to the probe close with rounds?
                evidence_zero_shot.budget_zero_shot(u, per_site_data, budget, label, model, f"{strategy}, {r} rounds")
    progress.finish(f"{unit}: budget curve ({n_fed} federations)")


# ---------------------------------------------------------------- the report


def _f(x: float, sign: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _ci(ci: Sequence[float], sign: bool = False) -> str:
    return f"[{_f(ci[0], sign)}, {_f(ci[1], sign)}]"


def comparison_table(comparisons: Mapping[str, Comparison], per_seed: Mapping[str, Mapping[int, float]]) -> str:
    lines = [
        "| comparison | mean AUROC a | mean AUROC b | a - b [95% CI] | a / b [95% CI] | per seed a - b | items | subjects |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, c in comparisons.items():
        seeds = ", ".join(f"{_f(v, True)}" for _, v in sorted(per_seed.get(name, {}).items()))
        lines.append(
            f"| {name} | {_f(c.mean_a)} | {_f(c.mean_b)} | {_f(c.difference, True)} {_ci(c.difference_ci, True)} | "
            f"{_f(c.ratio)} {_ci(c.ratio_ci)} | {seeds} | {c.n_items} | {c.n_subjects} |"
        )
    return "\n".join(lines)


def calibration_rows(ev_out: Evidence, scenario: str, n_boot: int) -> list[dict[str, Any]]:
    """Per horizon: ECE of the pooled held-out probabilities (subject-bootstrap interval) and
    the mean ECE over (site, task, seed) probes."""
    out = []
    for (sc, h), parts in sorted(ev_out.calibration.items()):
        if sc != scenario:
            continue
        y = np.concatenate([p[0] for p in parts])
        p = np.concatenate([p[1] for p in parts])
        g = np.concatenate([p[2] for p in parts])
        per_probe = [float(expected_calibration_error(a, b)) for a, b, _ in parts if len(a)]
        out.append(
            {
                "horizon": h,
                "n": len(y),
                "n_pos": int(np.sum(y)),
                "ece": float(expected_calibration_error(y, p)),
                "ece_ci": bootstrap_ci(expected_calibration_error, y, p, n_boot=n_boot, groups=g),
                "mean_probe_ece": float(np.mean(per_probe)) if per_probe else float("nan"),
                "probes": len(per_probe),
            }
        )
    return out


def verdicts(
    cfg: DictConfig, scenario: str, comps: Mapping[str, Comparison], calib: Sequence[Mapping[str, Any]]
) -> list[Verdict]:
    t = cfg.targets
    out = []
    q1 = comps.get("q1|all horizons")
    out.append(
        Verdict(
            question="q1",
            target=f"federated mean AUROC >= {t.federated_ratio:.0%} of pooled",
            met=None if q1 is None else bool(q1.ratio >= t.federated_ratio),
            detail="not measured" if q1 is None else f"ratio {_f(q1.ratio)} {_ci(q1.ratio_ci)}",
        )
    )
    out.append(budget_verdict(cfg, comps))
    out.append(evidence_personal.q2_verdict(comps))
    q3 = {k: c for k, c in comps.items() if k.startswith("q3|")}
    above = [k.split("|", 1)[1] for k, c in q3.items() if c.difference_ci[0] > 0]
    out.append(
        Verdict(
            question="q3",
            target="(no numeric target in the issue) where pretraining's interval lies above 0",
            met=None,
            detail="not measured" if not q3 else (f"above 0: {', '.join(above)}" if above else "no interval above 0"),
        )
    )
    q4 = comps.get(f"q4|{compare.epsilon_label(8.0)} - no DP")
    # Neighbouring epsilons over all their draws ("eps=3 - eps=8"): draw i of one epsilon and draw
    # i of the next are independent federations, so a pairing by draw index says nothing alone.
    steps = [
        c
        for k, c in comps.items()
        if k.startswith("q4|eps=") and "no DP" not in k and not DRAW_KEY.match(k.split("|", 1)[1])
    ]
    inverted = [f"{c.a} vs {c.b}" for c in steps if c.difference_ci[0] > 0]  # lower epsilon clearly better
    out.append(
        Verdict(
            question="q4",
            target=f"epsilon 8 within {t.dp_gap:.2f} AUROC of no DP; curve monotone within its intervals",
            met=None if q4 is None else bool(q4.difference >= -t.dp_gap and not inverted),
            detail=(
                "not measured (see the q4 section for why)"
                if scenario in cfg.privacy_budget.scenarios
                else "not measured (no privacy run for this scenario: privacy_budget.scenarios)"
            )
            if q4 is None
            else f"eps 8 - no DP {_f(q4.difference, True)} {_ci(q4.difference_ci, True)}; "
            + ("monotone within intervals" if not inverted else "inverted: " + ", ".join(inverted)),
        )
    )
    out.append(evidence_dp.size_verdict(cfg, comps))
    q5 = {k.split("|", 1)[1]: c for k, c in comps.items() if k.startswith("q5|")}
    out.append(
        Verdict(
            question="q5",
            target="(no numeric target) which additions and kernels have an interval excluding 0",
            met=None,
            detail="not measured"
            if not q5
            else "; ".join(
                f"{k}: {_f(c.difference, True)} {'excludes 0' if c.difference_ci[0] > 0 or c.difference_ci[1] < 0 else 'includes 0'}"
                for k, c in q5.items()
            ),
        )
    )
    worst = max((r["ece"] for r in calib), default=float("nan"))
    out.append(
        Verdict(
            question="q6",
            target=f"ECE <= {t.ece:.2f} at every horizon (the logistic probe is the model's own calibration)",
            met=None if not calib else bool(worst <= t.ece),
            detail="not measured" if not calib else f"worst horizon ECE {_f(worst)}",
        )
    )
    out.append(genomics_verdict(cfg, comps))
    return out + evidence_zero_shot.verdicts(comps) + evidence_ablations.verdicts(comps)


def budget_verdict(cfg: DictConfig, comps: Mapping[str, Comparison]) -> Verdict:
    """q1 as the budget grows: each strategy's federated / pooled ratio at every number of rounds,
    the first budget where it reaches the target, or where it flattens below it (issue 31's rule:
    the curve reaches the target at some budget, or the report shows where it flattens)."""
    t = float(cfg.targets.federated_ratio)
    target = f"as rounds grow (budget curve): federated / pooled >= {t:.0%} at some budget"
    curves = budget_curves(comps)
    if not curves:
        why = "not run for this scenario: budget_curve.scenarios / seeds"
        return Verdict(question="q1", target=target, met=None, detail=f"not measured ({why})")
    parts = []
    for strategy, by_rounds in curves.items():
        rounds = sorted(by_rounds)
        ratios = " / ".join(_f(by_rounds[r].ratio) for r in rounds)
        reached = [r for r in rounds if by_rounds[r].ratio >= t]
        best = max(rounds, key=lambda r: by_rounds[r].ratio)
        where = (
            f"reaches it at {reached[0]} rounds"
            if reached
            else f"below it; best {_f(by_rounds[best].ratio)} {_ci(by_rounds[best].ratio_ci)} at {best} rounds"
        )
        parts.append(f"{strategy} {ratios} at {' / '.join(map(str, rounds))} rounds: {where}")
    met = any(c.ratio >= t for by_rounds in curves.values() for c in by_rounds.values())
    return Verdict(question="q1", target=target, met=met, detail="; ".join(parts))


def genomics_verdict(cfg: DictConfig, comps: Mapping[str, Comparison]) -> Verdict:
    """g: the model's test-time gain from genomics against the target; where the world itself
    carries less (the oracle's gain below the target, issue 31's rule), against the world's own
    gain: then the model meets it unless its interval lies entirely below what the world holds
    (issue 68: a model cannot read more PRS signal than the world put there; not a defect)."""
    gain = float(cfg.targets.genomics_gain)
    model = comps.get("g|federated, test time: ehr+genomics - ehr")
    world = comps.get("g|world: oracle - oracle without PRS")
    target = (
        f"{cfg.genomics_diagnosis.disease} onset, sites with genomics: ehr+genomics - ehr >= {gain:+.2f} with "
        "its interval above 0; where the world's own gain (oracle - oracle without PRS) is smaller, the model's "
        "interval reaching the world's gain"
    )
    if model is None:
        return Verdict(question="g", target=target, met=None, detail="not measured")
    detail = f"ehr+genomics - ehr {_f(model.difference, True)} {_ci(model.difference_ci, True)}"
    if world is not None:
        detail += (
            f"; the world's (oracle - oracle without PRS) {_f(world.difference, True)} {_ci(world.difference_ci, True)}"
        )
    if world is not None and world.difference < gain:
        met = bool(model.difference_ci[1] >= world.difference)
        detail += f": the world holds less than {gain:+.2f}, so the target is its gain, " + (
            "which the model's interval reaches" if met else "which the model's interval lies below"
        )
        return Verdict(question="g", target=target, met=met, detail=detail)
    return Verdict(
        question="g", target=target, met=bool(model.difference >= gain and model.difference_ci[0] > 0), detail=detail
    )


def write_report(cfg: DictConfig, out: Path, ev_out: Evidence, progress: Progress, clock: Clock) -> Path:
    n_boot = int(cfg.eval.n_boot)
    comps = ev_out.compare(n_boot)
    lines = [
        f"# Evidence: does federated pretraining pay off? (preset `{cfg.preset_name}`)",
        "",
        f"Scenarios {', '.join(cfg.scenarios)}; seeds {list(cfg.seeds)} (each seed its own synthetic world and "
        f"training run); model `{cfg.model.name}`; federation {cfg.federation.rounds} rounds x "
        f"{cfg.federation.local_steps} local steps, batch {cfg.federation.batch_size}, lr {cfg.federation.lr}. "
        f"Every interval is a 95% percentile interval from {n_boot} subject resamples drawn once for all the "
        "items of a comparison (every seed, site, task and horizon): paired, so it is the interval of the "
        "difference itself. Probes: L2 logistic regression on frozen features, fitted on train rows, C chosen "
        "on tuning rows, scored on held_out rows.",
        "",
        f"Wall time {clock.total / 60:.1f} min"
        + (" for this run, the units loaded" if progress.loaded else "")
        + f" (plan {sum(s for _, s in progress.stages) / 60:.1f} min; stage times {sum(progress.actual.values()) / 60:.1f} min): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in progress.actual.items())
        + "."
        + (
            f" Loaded from earlier runs (resume=true; their stage times are those runs'): "
            f"{', '.join(sorted({str(Path(p).parent.name) for p in progress.loaded.values()}))}."
            if progress.loaded
            else ""
        ),
        "",
        "## Verdicts",
        "",
    ]
    dump: dict[str, Any] = {"preset": cfg.preset_name, "questions": {}, "verdicts": {}, "calibration": {}}
    all_verdicts: dict[str, list[Verdict]] = {}
    calib: dict[str, list[dict[str, Any]]] = {}
    for scenario in cfg.scenarios:
        calib[scenario] = calibration_rows(ev_out, scenario, n_boot)
        mine = {k: c for (s, k), c in comps.items() if s == scenario}
        all_verdicts[scenario] = verdicts(cfg, scenario, mine, calib[scenario])
    lines += ["| scenario | question | target | met | detail |", "|---|---|---|---|---|"]
    for scenario, vs in all_verdicts.items():
        for v in vs:
            met = "n/a" if v.met is None else ("yes" if v.met else "no")
            lines.append(f"| {scenario} | {v.question} | {v.target} | {met} | {v.detail} |")
    figs: dict[str, Path] = {}
    for q, title in QUESTIONS.items():
        lines += ["", f"## {q}: {title}", ""]
        dump["questions"][q] = {}
        for scenario in cfg.scenarios:
            mine = {k.split("|", 1)[1]: c for (s, k), c in comps.items() if s == scenario and k.startswith(f"{q}|")}
            seeds = {
                k.split("|", 1)[1]: v
                for (s, k), v in ev_out.per_seed.items()
                if s == scenario and k.startswith(f"{q}|")
            }
            entry: dict[str, Any] = {"comparisons": {k: c.model_dump() for k, c in mine.items()}, "per_seed": seeds}
            lines += [f"### {scenario}", ""]
            if q == "q6":
                entry["calibration"] = calib[scenario]
                if calib[scenario]:
                    lines += [
                        "| horizon (d) | held-out rows | positives | ECE pooled [95% CI] | mean ECE per probe | probes |",
                        "|---:|---:|---:|---:|---:|---:|",
                    ]
                    lines += [
                        f"| {r['horizon']} | {r['n']} | {r['n_pos']} | {_f(r['ece'])} {_ci(r['ece_ci'])} | "
                        f"{_f(r['mean_probe_ece'])} | {r['probes']} |"
                        for r in calib[scenario]
                    ]
                    preds = {}
                    for (s, h), parts in sorted(ev_out.calibration.items()):
                        if s == scenario:
                            preds[f"{h} d"] = (
                                np.concatenate([p[0] for p in parts]),
                                np.concatenate([p[1] for p in parts]),
                            )
                    figs[f"q6 reliability per horizon, {scenario}"] = plots.reliability_diagram(
                        preds, out / f"q6_reliability_{scenario}.png", title=f"Federated probes, {scenario}"
                    )
                else:
                    entry["reason"] = "no federated probe was scored (too few positives at every site)"
                    lines.append(f"Not measured: {entry['reason']}.")
            elif mine:
                lines.append(comparison_table(mine, seeds))
                figs[f"{q} {scenario}"] = comparison_plot(
                    mine,
                    out / f"{q}_{scenario}.png",
                    f"{QUESTIONS[q]} ({scenario})",
                    reference=1.0 if q == "q1" else 0.0,
                    ratio=q == "q1",
                )
            else:
                entry["reason"] = (
                    "not run for this scenario (privacy_budget.scenarios / seeds)"
                    if q == "q4" and scenario not in cfg.privacy_budget.scenarios
                    else evidence_zero_shot.not_run(cfg, q, scenario)
                    or evidence_ablations.not_run(cfg, q, scenario)
                    or "no task had enough held-out positives for both methods"
                )
                lines.append(f"Not measured: {entry['reason']}.")
            curves = budget_curves({f"{q}|{k}": c for k, c in mine.items()})
            if curves:
                figs[f"q1 federated / pooled against rounds, {scenario}"] = ratio_curve_plot(
                    curves,
                    out / f"q1_budget_curve_{scenario}.png",
                    f"Federated / pooled at equal compute as rounds grow ({scenario})",
                    reference=float(cfg.targets.federated_ratio),
                )
                entry["budget_curve"] = {
                    s: {r: {"ratio": c.ratio, "ratio_ci": c.ratio_ci} for r, c in sorted(pts.items())}
                    for s, pts in curves.items()
                }
            if q == "q1" and ev_out.summaries.get(scenario):
                lines += [
                    "",
                    "Mean held-out AUROC / ECE per horizon (first seed, per-site probes, oracle = true risk):",
                    "",
                ]
                first = min(ev_out.summaries[scenario])
                lines.append(
                    compare.summary_table([compare.SummaryRow(**r) for r in ev_out.summaries[scenario][first]])
                )
                entry["summary_by_seed"] = ev_out.summaries[scenario]
            if q == "q3" and scenario in ev_out.curves:
                entry["curves"] = {m: {str(k): v for k, v in c.items()} for m, c in ev_out.curves[scenario].items()}
                if any(ev_out.curves[scenario].values()):
                    figs[f"q3 label efficiency, {scenario}"] = plots.label_efficiency_plot(
                        {m: c for m, c in ev_out.curves[scenario].items() if c},
                        out / f"q3_label_efficiency_{scenario}.png",
                    )
            if q == "g" and ev_out.diagnostics.get(scenario):
                entry["diagnostics"] = ev_out.diagnostics[scenario]
                for seed, d in sorted(ev_out.diagnostics[scenario].items()):
                    if "disease" not in d:  # a unit without the genomics diagnosis (issue 72's counts only)
                        continue
                    r2 = ", ".join(f"{k} {v:.3f}" for k, v in d.get("r2_prs", {}).items()) or "not measured"
                    counts = ", ".join(f"{k}: {c['positives']}/{c['rows']}" for k, c in d.get("per_task", {}).items())
                    lines += [
                        "",
                        f"Seed {seed}: {d['rows']} rows of {d['subjects']} subjects at {', '.join(d['sites'])} "
                        f"(positives / rows per task: {counts}). Cross-fitted R^2 of the {d['disease']} PRS from: {r2}.",
                    ]
            if q == "q4" and (
                plot := evidence_dp.size_curve_plot(
                    {f"q4|{k}": c for k, c in mine.items()},
                    out / f"q4_dp_by_site_size_{scenario}.png",
                    float(cfg.targets.dp_gap),
                )
            ):
                figs[f"q4 DP's cost by a site's size, {scenario}"] = plot
            if q == "q2":  # issue 68: the steps each site kept
                lines += evidence_personal.report_lines(ev_out.diagnostics.get(scenario, {}))
            if q == "q4":  # issue 68: the size curve's runs
                lines += evidence_dp.report_lines(ev_out.diagnostics.get(scenario, {}))
            if q == "q4" and ev_out.privacy.get(scenario):
                entry["runs"] = ev_out.privacy[scenario]
                for seed, p in ev_out.privacy[scenario].items():
                    noise = "; ".join(
                        f"{lab}: " + ", ".join(f"{s} {v:.2f}" for s, v in per.items())
                        for lab, per in p["noise_multiplier"].items()
                    )
                    recipe = p.get("recipe", {})
                    lines += [
                        "",
                        f"Seed {seed}: {p['steps_per_site']} DP steps per site (expected batch "
                        f"{p.get('batch_size', cfg.privacy_budget.federation.batch_size)}"
                        + (
                            f", lr {recipe['lr']:g}, clipping norm {recipe['max_grad_norm']:g}"
                            + (", only the modality encoders trained" if recipe.get("train") == "encoders" else "")
                            + "; no DP: "
                            f"{recipe['no_dp']['rounds']} rounds x {recipe['no_dp']['local_steps']} steps of batch "
                            f"{recipe['no_dp']['batch_size']}, lr {recipe['no_dp']['lr']:g}, the same samples seen"
                            if recipe
                            else ""
                        )
                        + f"); noise multiplier per site: {noise}.",
                        "",
                        p["table"],
                    ]
                    if p.get("plot"):
                        figs[f"q4 utility against epsilon, {scenario}"] = out / p["plot"]
            lines += evidence_zero_shot.report_lines(q, scenario, ev_out, mine, float(cfg.zero_shot.far_below))
            dump["questions"][q][scenario] = entry
            lines.append("")
    for scenario, notes in ev_out.notes.items():
        if notes:
            lines += [f"Notes ({scenario}): " + "; ".join(notes), ""]
    lines += ["## Plots", ""]
    for caption, path in figs.items():
        lines += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    dump["verdicts"] = {s: [v.model_dump() for v in vs] for s, vs in all_verdicts.items()}
    dump["plan_seconds"] = dict(progress.stages)
    dump["stage_seconds"] = progress.actual
    dump["loaded_stages"] = progress.loaded
    dump["config"] = OmegaConf.to_container(cfg, resolve=True)
    return write_outputs(out, MARKER, dump, "report.md", lines, clock)


# ---------------------------------------------------------------- the job


def prepare_out_dir(out: Path, resume: bool) -> None:
    """resume=false: a previous evidence job's units are removed (common.clear_previous_runs);
    resume=true: they stay, and out must hold a previous evidence job if it holds units."""
    if not resume:
        clear_previous_runs(out, ("units",), (MARKER, STARTED), "evidence job")
        return
    if (out / "units").exists() and not any((out / m).is_file() for m in (MARKER, STARTED)):
        raise FileExistsError(
            f"{out / 'units'} exists but {out} holds no {MARKER} or {STARTED}: not a previous evidence job; "
            "choose another out_dir"
        )
    out.mkdir(parents=True, exist_ok=True)


def finished_unit(unit_dir: Path, fingerprint: Mapping[str, Any]) -> tuple[Evidence, dict[str, float]] | None:
    """A finished unit's evidence and stage times (resume=true), or None where the unit has no
    done-marker (never ran, or stopped before its end: it reruns). A marker that cannot be read,
    or that records another config, is refused (UnitFileError)."""
    if not (unit_dir / DONE).is_file():
        return None
    doc = read_unit_file(unit_dir)
    check_fingerprint(unit_dir, doc, fingerprint)
    return load_unit(unit_dir, doc), dict(doc.stage_seconds)


def redraw_missing_plots(out: Path, ev: Evidence) -> None:
    """The q4 plot a loaded unit drew into out_dir, drawn again from its numbers if it is gone
    (a run directory handed over without its images)."""
    for runs in ev.privacy.values():
        for p in runs.values():
            if p.get("plot") and not (out / p["plot"]).is_file():
                rows = [compare.SummaryRow(**r) for r in p["summary"]]
                compare.privacy_plot(rows, p["settings"], out / p["plot"])


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out_dir)
    resume = bool(cfg.resume)
    prepare_out_dir(out, resume)
    (out / STARTED).touch()
    progress = Progress(plan_stages(cfg))
    progress.print_plan()
    ev_out = Evidence()
    for scenario in cfg.scenarios:
        for seed in cfg.seeds:
            scenario, seed = str(scenario), int(seed)
            unit_dir = out / "units" / f"{scenario}-seed{seed}"
            fingerprint = unit_fingerprint(unit_config(cfg, scenario, seed, unit_dir), scenario)
            done = finished_unit(unit_dir, fingerprint) if resume else None
            if done is None:
                clear_unfinished_unit(unit_dir)  # its finished federations stay (evidence_federations)
                run_unit(cfg, scenario, seed, unit_dir, Evidence(), progress, fingerprint)
                # Merge what was written, not what was held: a resumed job reads the same bytes.
                unit_ev = load_unit(unit_dir)
            else:
                unit_ev, seconds = done
                redraw_missing_plots(out, unit_ev)
                for name in progress.unit_stages(scenario, seed):
                    progress.finish(name, loaded_from=unit_dir / DONE, seconds=seconds.get(name))
            ev_out.merge(unit_ev)
            clock.lap(f"{scenario} seed {seed}")
    report = write_report(cfg, out, ev_out, progress, clock)
    progress.finish("comparisons, report and plots")
    return report


def with_preset_flags(argv: list[str]) -> list[str]:
    """`--quick` / `--medium` / `--full` on the command line as `preset=...`."""
    return [PRESET_FLAGS.get(a, a) for a in argv]


@hydra.main(config_path="../configs", config_name="evidence", version_base="1.3")
def main(cfg: DictConfig) -> None:
    refuse_unknown_overrides("evidence")
    setup_job_logging()
    print(run(cfg))


if __name__ == "__main__":
    sys.argv = with_preset_flags(sys.argv)
    sys.exit(main())
