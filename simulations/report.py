"""Federated vs centralized vs local-only vs oracle on the same sites, vocabulary and rows.

    python -m simulations.report                                      # configs/demo.yaml
    python -m simulations.report scenario=tiny n_subjects=60 federation.rounds=2 out_dir=runs/cmp

Steps (composition only; the pieces live in healthfm_core, client and server):
1. the sites (synthetic, generated or reused; or `site_roots`);
2. the federation on Flower's simulation engine (simulations.run), into out_dir/federation;
3. from its final checkpoint: the global model and the agreed vocabulary and initialisation,
   which the baselines reuse so that every regime starts from the same weights;
4. centralized: the sites' train splits pooled, rounds x local_steps x sites steps (the
   federation's total number of local steps); local-only: each site alone, with only its own
   groups, rounds x local_steps steps (what it did inside the federation);
5. evaluation with healthfm_core.eval (runner + compare): per site, frozen probes fitted on
   the site's train rows and scored on its held_out rows, every onset task and horizon; the
   generator's true risk as the oracle; each non-EHR modality removed from a site's rows;
6. utility against epsilon (when `privacy_sweep.epsilons` lists target epsilons): the federation
   again at each (simulations.privacy_sweep, into out_dir/privacy/), the main federated run as
   its own setting (no DP unless `privacy` asks), evaluated per site as above;
7. report.md with PNGs, and comparison.json, in out_dir.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.pooled import PooledPretrainingDataset
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, make_loader
from healthfm_core.data.sites.site import Site
from healthfm_core.eval import compare, site_pairs
from healthfm_core.eval.outcomes import outcome_table, replies_from_event
from healthfm_core.eval.personal_choice import PersonalChoice
from healthfm_core.eval.report import auroc_cell
from healthfm_core.eval.row_embeddings import restrict_modalities
from healthfm_core.eval.runner import EvalSet, MethodResult
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import FederationSetup, groups_for_modalities, site_seed
from healthfm_core.strict_files import read_json
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.objective_weights import LOSS_NAMES, curriculum_weights
from healthfm_core.terms.site_layout import MODALITIES
from healthfm_core.train.adapt import last_round_weights
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import train_local
from server.runlog import read_events
from simulations import privacy_sweep
from simulations.common import (
    Clock,
    clear_previous_runs,
    eval_settings,
    job_task_specs,
    onset_eval_data,
    open_sites,
    site_eval_rows_per_subject,
    site_labelled,
    write_outputs,
)
from simulations.logs import setup_job_logging
from simulations.overrides import refuse_unknown_overrides, with_task_alias
from simulations.personalise import personalise_site
from simulations.ray_start import RayStartError
from simulations.run import privacy_request, run_federation
from simulations.synthetic import oracle_risk

log = logging.getLogger("healthfm.simulations.report")

METHODS = ("federated", "personalised", "centralized", "local-only", "oracle")
MARKER = "comparison.json"  # present once a report job has written to out_dir
PRIVACY_DIR = "privacy"  # the utility-versus-epsilon federations, one directory per setting


# ---------------------------------------------------------------- steps


def prepare_out_dir(out: Path) -> Path:
    """out/federation (and out/privacy, the utility-versus-epsilon runs) must be fresh (the server
    refuses to overwrite a run): a previous report job's runs in the same out_dir are removed;
    anything else there is refused. Returns out/federation."""
    clear_previous_runs(out, ("federation", PRIVACY_DIR), (MARKER,), "report run")
    return out / "federation"


def site_groups(site: Site) -> list[str]:
    return groups_for_modalities([m for m in site.modalities if site.subject_counts.get(m, 0) > 0])


def train_ids(site: Site) -> np.ndarray:
    splits = site.subject_splits()
    return splits["subject_id"].to_numpy()[np.asarray(splits["split"].to_pylist()) == "train"]


def train_baseline(
    setup: FederationSetup,
    dataset,
    steps: int,
    fed: DictConfig,
    seed: int,
    groups: list[str] | None,
    progress: bool,
    keep: Sequence[str] | None = None,
) -> tuple[HealthFM, list[dict[str, float]]]:
    """From the federation's initial weights: `steps` steps of the federation's optimiser
    settings over `groups` (None: all), the curriculum laid over the steps. `keep`: every batch
    restricted to these modalities (runner.restrict_modalities; e.g. the genomics diagnosis's
    training without genomics); None: as the data come."""
    model = init_model(setup)
    loader: Any = make_loader(
        dataset, batch_size=fed.batch_size, shuffle=True, seed=seed, drop_last=len(dataset) > fed.batch_size
    )
    if keep is not None:
        loader = Restricted(loader, tuple(keep))
    tcfg = LocalRun.of(fed).train_config(steps, seed, log_every=max(1, steps // 5), progress=progress)
    result = train_local(
        model, loader, tcfg, groups=groups, weights_fn=lambda step: curriculum_weights(step, steps, setup.model)
    )
    return model, result.history


class Restricted:
    """A loader whose batches keep only some modalities (re-iterable, like the loader)."""

    def __init__(self, loader: Any, keep: tuple[str, ...]) -> None:
        self.loader, self.keep = loader, keep

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield restrict_modalities(batch, self.keep)

    def __len__(self) -> int:
        return len(self.loader)


@dataclasses.dataclass
class Regimes:
    """The comparison's non-federated regimes, trained at the federation's budget."""

    datasets: dict[str, PretrainingDataset]  # each site's train split, as the federation sampled it
    central_model: HealthFM
    central_history: list[dict[str, float]]
    local_models: dict[str, HealthFM | None]  # None: the site has no train subject to train on
    local_histories: dict[str, list[dict[str, float]]]
    per_site_steps: int
    central_steps: int


def train_datasets(
    sites: Mapping[str, Site], seqs: Mapping[str, SiteSequences], fed: DictConfig, seed: int
) -> dict[str, PretrainingDataset]:
    """Each site's train split as its pretraining dataset (the federation's sampling settings)."""
    run = LocalRun.of(fed)
    return {name: run.dataset(seqs[name], train_ids(site), site_seed(seed, 0, name)) for name, site in sites.items()}


def train_regimes(
    setup: FederationSetup,
    sites: Mapping[str, Site],
    seqs: Mapping[str, SiteSequences],
    fed: DictConfig,
    seed: int,
    rounds_done: int,
    progress: bool,
    clock: Clock | None = None,
) -> Regimes:
    """Centralized and local-only at matched budgets: each site did rounds x local_steps steps of
    batch_size in the federation, so centralized gets that times the number of sites on the
    pooled train splits (the same samples seen in all) and each local-only site its own share."""
    per_site_steps = int(rounds_done) * int(fed.local_steps)
    central_steps = per_site_steps * len(sites)
    datasets = train_datasets(sites, seqs, fed, seed)
    log.info("centralized: %d steps on %d pooled train subjects", central_steps, sum(len(d) for d in datasets.values()))
    central_model, central_history = train_baseline(
        setup, PooledPretrainingDataset(list(datasets.values())), central_steps, fed, seed, None, progress
    )
    if clock is not None:
        clock.lap("centralized training")
    local_models: dict[str, HealthFM | None] = {}
    local_histories: dict[str, list[dict[str, float]]] = {}
    for name, site in sites.items():
        if len(datasets[name]) == 0:
            log.warning("local-only: site %s has no train subject with a timed observation", name)
            local_models[name] = None
            continue
        log.info("local-only %s: %d steps, groups %s", name, per_site_steps, site_groups(site))
        local_models[name], local_histories[name] = train_baseline(
            setup, datasets[name], per_site_steps, fed, site_seed(seed, 0, name), site_groups(site), progress
        )
    if clock is not None:
        clock.lap("local-only training")
    return Regimes(
        datasets, central_model, central_history, local_models, local_histories, per_site_steps, central_steps
    )


def federated_curves(events: list[dict[str, Any]]) -> tuple[list[dict[str, float]], dict, dict]:
    """From rounds.jsonl: per-round aggregated losses, per-round bytes per site, time split."""
    rounds = {e["round"]: e for e in events if e["event"] == "round"}
    total = max((e["rounds"] for e in rounds.values()), default=1)
    curve, traffic, timing = [], {}, {}
    for r, e in sorted(rounds.items()):
        losses = {k: float(v) for k, v in e.get("losses", {}).items()}
        curve.append({"progress": r / total, **losses})
        traffic[r] = {s: (int(x.get("bytes_sent", 0)), int(x.get("bytes_received", 0))) for s, x in e["sites"].items()}
        timing[r] = e["timings"]
    return curve, traffic, timing


def step_curve(history: list[dict[str, float]]) -> list[dict[str, float]]:
    n = max(1, len(history))
    return [
        {"progress": (i + 1) / n, **{k: h[k] for k in (*LOSS_NAMES, "total") if k in h}} for i, h in enumerate(history)
    ]


# ---------------------------------------------------------------- report text


def _fit_rows(cap: int | None) -> str:
    return "every row" if cap is None else f"at most {cap} rows"


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def traffic_table(traffic: Mapping[int, Mapping[str, tuple[int, int]]]) -> str:
    sites = sorted({s for r in traffic.values() for s in r})
    lines = ["| round | " + " | ".join(sites) + " | total |", "|---:|" + "---:|" * (len(sites) + 1)]
    for r, per in sorted(traffic.items()):
        cells = [f"{_mb(per[s][0])} / {_mb(per[s][1])}" if s in per else "-" for s in sites]
        tot = (sum(v[0] for v in per.values()), sum(v[1] for v in per.values()))
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {_mb(tot[0])} / {_mb(tot[1])} |")
    return "\n".join(lines)


def timing_table(timing: Mapping[int, Mapping[str, float]]) -> str:
    lines = [
        "| round | round s | local training s (slowest site) | local training s (all sites) | everything else s | else share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r, t in sorted(timing.items()):
        lines.append(
            f"| {r} | {t['round_seconds']:.1f} | {t['local_train_seconds_max']:.1f} | "
            f"{t['local_train_seconds_sum']:.1f} | {t['other_seconds']:.1f} | "
            f"{t['other_seconds'] / max(t['round_seconds'], 1e-9):.0%} |"
        )
    return "\n".join(lines)


def ablation_table(
    ablation: Mapping[tuple[str, str, str], tuple[MethodResult, MethodResult]],
    statuses: Mapping[tuple[str, str], site_pairs.PairStatus],
) -> str:
    """One line per (site, modality, method, task, horizon): the held-out rows that have the
    modality and their positives, the AUROC with and without it (each with its interval, or why
    there is none) and the difference; a pair the sites withhold is listed as withheld."""
    lines = [
        "| site | modality removed | method | task | horizon (d) | held-out rows with it | positives | "
        "AUROC with [95% CI] | AUROC without [95% CI] | difference |",
        "|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for (site, drop, method), (full, without) in sorted(ablation.items()):
        other = {(r.task, r.horizon): r for r in without.rows}
        withheld = {(s.task, s.horizon): s.withheld for (st, _), s in statuses.items() if st == site and s.withheld}
        head = f"| {site} | {drop} | {method} |"
        for key, why in withheld.items():
            lines.append(f"{head} {key[0]} | {key[1] if key[1] is not None else '-'} | - | - | {why} | withheld | - |")
        shown = [r for r in full.rows if (r.task, r.horizon) not in withheld]
        if not shown and not withheld:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(full.skipped.items())) or "no task scored"
            lines.append(f"{head} - | - | - | - | not evaluated: {why} | - | - |")
        for r in shown:
            w = other.get((r.task, r.horizon))
            diff = (
                f"{w.auroc - r.auroc:+.3f}"
                if w is not None and np.isfinite(w.auroc) and np.isfinite(r.auroc)
                else "n/a"
            )
            lines.append(
                f"{head} {r.task} | {r.horizon if r.horizon is not None else '-'} | {r.n} | {r.n_pos} | "
                f"{auroc_cell(r)} | {auroc_cell(w) if w is not None else 'not evaluated'} | {diff} |"
            )
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


# ---------------------------------------------------------------- the job


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out_dir)
    fed_dir = prepare_out_dir(out)
    fed = cfg.federation
    progress = bool(cfg.progress)

    sites, truth_dir, scenario = open_sites(cfg.scenario, cfg.data_dir, cfg.seed, cfg.n_subjects, cfg.site_roots)
    clock.lap("data (generate or reuse)")

    setup, fed_model, rounds_done = run_federation(cfg, fed_dir)
    clock.lap("federation (Flower simulation)")
    vocab = setup.vocabulary
    seqs = {name: SiteSequences.from_site(site, vocab, tokens=setup.tokens) for name, site in sites.items()}
    clock.lap("sequences (federation's vocabulary)")

    baselines = train_regimes(setup, sites, seqs, fed, int(cfg.seed), int(rounds_done), progress, clock)
    central_model, central_history = baselines.central_model, baselines.central_history
    local_models, local_histories = baselines.local_models, baselines.local_histories
    per_site_steps, central_steps = baselines.per_site_steps, baselines.central_steps

    per_site_data = onset_eval_data(cfg, sites, seqs)
    ev = eval_settings(cfg)
    per_site: compare.PerSite = {name: {} for name in sites}
    features: dict[str, dict] = {}
    models = {"federated": fed_model, "centralized": central_model}
    for method, model in models.items():
        res, features[method] = compare.evaluate_per_site(method, per_site_data, model, progress=progress, **ev)
        for name, r in res.items():
            per_site[name][method] = r
    res, features["local-only"] = compare.evaluate_per_site(
        "local-only", per_site_data, lambda s: local_models[s], progress=progress, **ev
    )
    for name, r in res.items():
        per_site[name]["local-only"] = r
    choices = personalised(cfg, setup, fed_model, sites, baselines, per_site_data, features, per_site)
    if truth_dir is not None and scenario is not None:
        code_to_disease = {d.code: name for name, d in scenario.diseases.items()}
        for name, r in compare.oracle_per_site(
            per_site_data,
            functools.partial(oracle_risk, truth_dir),
            code_to_disease,
            n_boot=cfg.eval.n_boot,
            seed=int(cfg.seed),
        ).items():
            per_site[name]["oracle"] = r
    # The sites' privacy minimum, as their own evaluation applies it: a pair it withholds is
    # shown as withheld (with min_report_subjects and its value), its scores in no table or mean.
    statuses = site_pairs.pair_statuses(
        per_site_data,
        int(cfg.federation.site.min_report_subjects),
        int(cfg.federation.site.get("min_report_positives", 1)),
    )
    site_pairs.withhold(per_site, statuses)
    clock.lap("evaluation (per site, every onset task and horizon)")

    ablation: dict[tuple[str, str, str], tuple[MethodResult, MethodResult]] = {}
    for method in cfg.eval.missing_modality:
        if method not in models:
            raise ValueError(f"eval.missing_modality: {method!r} is not one of {sorted(models)}")
        for name, site_data in per_site_data.items():
            for drop in [m for m in MODALITIES if m != "ehr" and m in sites[name].modalities]:
                got = compare.modality_removal(
                    method,
                    site_data,
                    models[method],
                    features[method][name],
                    drop,
                    min_rows=int(cfg.eval.min_rows),
                    **ev,
                )
                if got is not None:
                    ablation[(name, drop, method)] = got
    clock.lap("missing-modality evaluation")

    privacy = privacy_utility(cfg, out, clock, fed_dir, setup, fed_model, per_site_data, ev, progress)
    return write_comparison(
        cfg,
        out,
        fed_dir,
        clock,
        sites,
        setup,
        per_site,
        per_site_data,
        statuses,
        ablation,
        central_history,
        local_histories,
        per_site_steps,
        central_steps,
        privacy,
        choices,
    )


def personalised(
    cfg: DictConfig,
    setup: FederationSetup,
    fed_model: HealthFM,
    sites: Mapping[str, Site],
    baselines: Regimes,
    per_site_data: Mapping[str, EvalSet],
    features: Mapping[str, Mapping[str, Any]],
    per_site: compare.PerSite,
) -> dict[str, PersonalChoice]:
    """Each site's personalised model (issue 68: local steps after the federation, the count
    chosen on its tuning split, or its local-only model when every adapted one is below it there;
    simulations/personalise.py) into per_site; the choices. `features`: per method ("federated",
    "local-only") and site, the features already computed. `personalisation.steps` empty: none."""
    steps = list((cfg.get("personalisation") or {}).get("steps") or [])
    if not steps:
        return {}
    fed = cfg.federation
    weights = last_round_weights(setup.model, int(fed.rounds))
    ev = {"max_events": fed.max_events, "max_patches": fed.max_patches, "batch_size": int(cfg.eval.batch_size)}
    choices = {}
    for name, site in sites.items():
        if len(baselines.datasets[name]) == 0 or name not in features["federated"]:
            continue
        per_site[name]["personalised"], choices[name] = personalise_site(
            fed_model, site, baselines.datasets[name], per_site_data[name], lambda m: m, steps, LocalRun.of(fed),
            weights, int(cfg.seed), ev, int(cfg.eval.n_boot), features["federated"][name],
            features.get("local-only", {}).get(name),
        )  # fmt: skip
    return choices


def privacy_utility(
    cfg: DictConfig,
    out: Path,
    clock: Clock,
    fed_dir: Path,
    setup: FederationSetup,
    fed_model: HealthFM,
    per_site_data: Mapping,
    ev: Mapping[str, Any],
    progress: bool,
) -> list[str]:
    """The report's utility-versus-epsilon section (markdown lines): the federation again at each
    target epsilon of `privacy_sweep.epsilons` (simulations.privacy_sweep), the main federated run
    as the setting it was run at, all evaluated on the same per-site rows."""
    wanted = list((cfg.get("privacy_sweep") or {}).get("epsilons") or [])
    if not wanted:
        return [
            "Not run in this report (`privacy_sweep.epsilons=[1,3,8]` adds it here; "
            "`python -m simulations.privacy_sweep` runs it alone)."
        ]
    settings = privacy_sweep.Settings()
    main_epsilon = privacy_request(cfg).target_epsilon
    settings.add(main_epsilon, setup, fed_model, fed_dir, clock.phases.get("federation (Flower simulation)", 0.0))
    private = privacy_sweep.dp_recipe_config(cfg, cfg.privacy_sweep.get("dp_recipe"))
    # This section scores each DP model with the report's own probes on the same rows as every
    # other method; the federation's own evaluation of it would be a second, unused scoring.
    private = cast(DictConfig, OmegaConf.merge(private, {"federation": {"eval_tasks": []}}))
    for epsilon in privacy_sweep.parse_epsilons(wanted):
        if epsilon != main_epsilon:
            label = privacy_sweep.run_setting(
                private if epsilon is not None else cfg, out / PRIVACY_DIR, epsilon, settings
            )
            clock.lap(f"federation {label}")
    per_site = privacy_sweep.evaluate_settings(settings, per_site_data, ev, progress)
    clock.lap("evaluation at each epsilon")
    section, _ = privacy_sweep.privacy_section(cfg, out, settings, per_site)
    return section


def write_comparison(
    cfg: DictConfig,
    out: Path,
    fed_dir: Path,
    clock: Clock,
    sites: Mapping[str, Site],
    setup: FederationSetup,
    per_site: compare.PerSite,
    per_site_data: Mapping[str, EvalSet],
    statuses: Mapping[tuple[str, str], site_pairs.PairStatus],
    ablation: Mapping,
    central_history: list,
    local_histories: Mapping[str, list],
    per_site_steps: int,
    central_steps: int,
    privacy: list[str] | None = None,
    choices: Mapping[str, PersonalChoice] | None = None,
) -> Path:
    """report.md (what was compared, the tables, the plots), comparison.json and the PNGs in out."""
    methods = [m for m in METHODS if any(m in r for r in per_site.values())]
    min_positives = int(cfg.eval.summary_min_positives)
    task_rows, not_summarized = site_pairs.task_summary(
        per_site, per_site_data, statuses, methods, min_positives, n_boot=int(cfg.eval.n_boot), seed=int(cfg.seed)
    )
    events = read_events(fed_dir / "rounds.jsonl")
    fed_curve, traffic, timing = federated_curves(events)
    figs = comparison_figures(out, fed_curve, central_history, local_histories, task_rows, traffic, timing)
    lines = [
        *comparison_setup(cfg, clock, sites, setup, methods, per_site_steps, central_steps),
        *personal_lines(choices or {}),
        "",
        *comparison_tables(
            cfg,
            per_site,
            statuses,
            methods,
            task_rows,
            not_summarized,
            min_positives,
            ablation,
            traffic,
            timing,
            privacy,
        ),
    ]
    evaluation = read_json(fed_dir / "evaluation.json") if (fed_dir / "evaluation.json").is_file() else None
    skipped = {
        f"{s}/{m}/{k}": why for s, res in per_site.items() for m, r in res.items() for k, why in r.skipped.items()
    }
    lines += comparison_tail(out, fed_dir, evaluation, skipped, figs)
    dump = {
        "main": [r.model_dump() for r in task_rows],
        "main_not_summarized": not_summarized,
        "pairs": [s.model_dump() for s in statuses.values()],
        "rows": {
            s: {m: [r.model_dump() for r in res.rows] for m, res in methods_.items()}
            for s, methods_ in per_site.items()
        },
        "skipped": skipped,
        "missing_modality": {
            f"{s}|{d}|{m}": {"with": [r.model_dump() for r in a.rows], "without": [r.model_dump() for r in b.rows]}
            for (s, d, m), (a, b) in ablation.items()
        },
        "bytes": {str(r): v for r, v in traffic.items()},
        "timings": {str(r): v for r, v in timing.items()},
        "phases_seconds": clock.phases,
        "budgets": {"per_site_steps": per_site_steps, "centralized_steps": central_steps},
        "personalisation": {s: c.model_dump() for s, c in (choices or {}).items()},
    }
    return write_outputs(out, MARKER, dump, "report.md", lines, clock)


def personal_lines(choices: Mapping[str, PersonalChoice]) -> list[str]:
    """What `personalised` is, and the local steps each site kept (chosen on its tuning split)."""
    if not choices:
        return []
    kept = "; ".join(
        f"{s}: {c.kept} ("
        + ", ".join(f"{k}: {v:.3f}" if np.isfinite(v) else f"{k}: n/a" for k, v in sorted(c.tuning_auroc.items()))
        + (f"; local-only {c.local_only_auroc:.3f}" if c.local_only_auroc is not None else "")
        + ")"
        for s, c in choices.items()
    )
    return [
        "",
        "Personalised (issue 68): each site's federated model after local steps on its own train split (the run's "
        "last-round objectives), the number of steps kept by the probes' mean tuning AUROC, or the site's local-only "
        "model where every adapted one is below it on tuning (held_out never read; "
        f"`client.py personalise` at a real site). Kept, with each candidate's tuning AUROC: {kept}.",
    ]


def comparison_figures(
    out: Path,
    fed_curve: list[dict[str, float]],
    central_history: list,
    local_histories: Mapping[str, list],
    task_rows: list,
    traffic: Mapping,
    timing: Mapping,
) -> dict[str, Path]:
    """The report's PNGs in out, by caption: losses per regime, AUROC per task, bytes and time per round."""
    figs: dict[str, Path] = {}
    curves = {"federated (per round)": fed_curve, "centralized (per step)": step_curve(central_history)}
    curves.update({f"local-only {s} (per step)": step_curve(h) for s, h in local_histories.items()})
    figs["Loss per objective"] = compare.loss_curves_plot(curves, out / "loss_curves.png")
    if task_rows:
        figs["Held-out AUROC per task (mean over sites, 95% subject-bootstrap CI)"] = compare.task_auroc_plot(
            task_rows, out / "auroc_by_task.png"
        )
    if traffic:
        figs["Bytes per site per round"] = compare.bytes_plot(traffic, out / "bytes_per_round.png")
        figs["Round time split"] = compare.time_split_plot(timing, out / "round_time_split.png")

    return figs


def comparison_setup(
    cfg: DictConfig,
    clock: Clock,
    sites: Mapping[str, Site],
    setup: FederationSetup,
    methods: list[str],
    per_site_steps: int,
    central_steps: int,
) -> list[str]:
    """The report's opening: its time, the sites, the model, the matched budgets, how it evaluates."""
    fed = cfg.federation
    model = init_model(setup)
    n_groups = {s: site_groups(site) for s, site in sites.items()}
    params_by_group: dict[str, int] = {}
    for k, v in model.state_dict().items():
        params_by_group[parameter_group(k)] = params_by_group.get(parameter_group(k), 0) + v.numel()
    oracle = "oracle" in methods
    site_only = site_labelled(job_task_specs(cfg, []))
    return [
        f"# HealthFM: {' vs '.join(methods)} (model {setup.model.name})",
        "",
        f"Wall time {clock.total / 60:.1f} min on {torch.get_num_threads()} torch thread(s) here, Ray with "
        f"{cfg.ray.num_cpus} CPUs: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()) + ".",
        "",
        "Sites: "
        + "; ".join(
            f"{s}: {site.summary.n_subjects} subjects, groups {'+'.join(n_groups[s])}" for s, site in sites.items()
        )
        + ".",
        "",
        f"Model `{setup.model.name}`: "
        + ", ".join(f"{g} {n:,}" for g, n in params_by_group.items())
        + f" parameters; vocabulary {setup.vocabulary.vocab_size} ids agreed by the federation and reused by every "
        f"regime; every regime starts from the same seeded initialisation.",
        "",
        f"Budgets (matched optimisation steps, batch {fed.batch_size}, lr {fed.lr}, samples of at most "
        f"{fed.max_events} EHR tokens ({setup.tokens.describe()}) / {fed.max_patches} patches): federated {fed.rounds} rounds x {fed.local_steps} "
        f"local steps at each of {len(sites)} sites; centralized {central_steps} steps on the pooled train splits "
        f"(the federation's total); local-only {per_site_steps} steps per site on its own train split, training only "
        f"its own groups (others stay at the initialisation).",
        "",
        "Evaluation: for each site, frozen linear probes fitted on the site's train rows (C from its tuning rows) "
        "and scored on its held_out rows, per new-onset task and horizon"
        + ("; the oracle scores the generator's true risk on the same held_out rows" if oracle else "")
        + ". The rows are those the sites' own evaluation labels: ACES's rows (never at birth: a clinical event "
        "with a clinical history before it); held_out scored on every labelled row, as MEDS-DEV scores; train and "
        f"tuning, which the probe is fitted and tuned on, {_fit_rows(site_eval_rows_per_subject(cfg))} per subject "
        f"and task (seed {cfg.seed}). Intervals are 95% subject "
        "bootstrap intervals on the same rows; where one is undefined (a single class, or fewer than 2 subjects "
        "with a positive) the table says why. A pair the sites' privacy minimum withholds "
        f"(federation.site.{site_pairs.PRIVACY_KEY}={cfg.federation.site.min_report_subjects} subjects per split, "
        "and both classes in train and held_out) is listed as withheld and counted in no mean."
        + (
            f" The run's in-site evaluation scored a subject sample (federation.eval_max_subjects="
            f"{fed.eval_max_subjects} per split), so its rows are those of the sampled subjects among these."
            if int(fed.get("eval_max_subjects") or 0)
            else ""
        ),
        *(
            [
                "",
                "Site-labelled tasks ("
                + ", ".join(site_only)
                + ") are evaluated only by the sites themselves: see the federated evaluation inside the run below.",
            ]
            if site_only
            else []
        ),
    ]


def comparison_tables(
    cfg: DictConfig,
    per_site: compare.PerSite,
    statuses: Mapping[tuple[str, str], site_pairs.PairStatus],
    methods: list[str],
    task_rows: list,
    not_summarized: Any,
    min_positives: int,
    ablation: Mapping,
    traffic: Mapping,
    timing: Mapping,
    privacy: list[str] | None,
) -> list[str]:
    """The report's tables: the main table, per site and task, missing modalities, the federation's
    bytes and time per round, utility against epsilon."""
    fed = cfg.federation
    return [
        "## Main table (per task: mean over the sites, 95% subject-bootstrap CI)",
        "",
        f"Sites count for a task where every method scored it and it has >= {min_positives} held-out positives "
        "(eval.summary_min_positives).",
        "",
        site_pairs.task_table(task_rows, not_summarized),
        *(
            [
                "",
                "Every (site, task) pair is withheld by the sites' rule (each line below says why: fewer than "
                f"federation.site.{site_pairs.PRIVACY_KEY}={cfg.federation.site.min_report_subjects} subjects in a "
                "split, or a single class). In a small simulation, lower the minimum (e.g. "
                f"federation.site.{site_pairs.PRIVACY_KEY}=2) or add subjects.",
            ]
            if statuses and all(s.withheld for s in statuses.values())
            else []
        ),
        "",
        "## Per site and task (held-out rows and positives; AUROC [95% CI] per method)",
        "",
        site_pairs.pair_table(per_site, statuses, methods),
        "",
        "## Missing modalities",
        "",
        "A site's held-out rows that have the modality at prediction time, scored with every modality and with "
        "that modality removed from the input (runner.restrict_modalities); each condition fits its own probe "
        "on the same site's train rows.",
        "",
        ablation_table(ablation, statuses) if ablation else "No site had enough rows with a non-EHR modality.",
        "",
        "## Federation: bytes per site per round (MB sent to the site / received from it)",
        "",
        traffic_table(traffic) if traffic else "No round logged.",
        "",
        f"Transport: {fed.transport} in this run (federation.transport=fp32|fp16|int8 to measure another; "
        "benchmarks/update_transport.py compares them).",
        "",
        "## Federation: per-round time split",
        "",
        timing_table(timing) if timing else "No round logged.",
        "",
        "Everything else = the round's wall time minus the slowest site's local training: message "
        "(de)serialisation and transport in Flower's simulation engine, the site's model load and data "
        "sampling, aggregation and the checkpoint.",
        "",
        "## Utility against epsilon (DP-SGD at every site)",
        "",
        *(privacy or ["Not run in this report."]),
    ]


def comparison_tail(
    out: Path, fed_dir: Path, evaluation: Any, skipped: Mapping[str, str], figs: Mapping[str, Path]
) -> list[str]:
    """The report's end: the run's own federated evaluation, what was not evaluated, the plots."""
    lines: list[str] = []
    if evaluation:
        # Per site, with positives and intervals: a mean over sites would weigh a site's AUROC on
        # one held-out positive like any other.
        keys, replies, asked = replies_from_event(evaluation)
        lines += [
            "",
            "## Federated evaluation inside the run: per site and task",
            "",
            "Each site scored its held-out predictions (meds-evaluation format, written at the site) with "
            "meds-evaluation; a (site, task) without a number says why.",
            "",
            outcome_table(keys, replies, asked),
        ]
    # Withheld pairs have their line and reason in the per-site table; the rest are listed here.
    others = {k: v for k, v in skipped.items() if not v.startswith("withheld")}
    if others:
        lines += [
            "",
            f"Not evaluated ({len(others)} site/method/task): "
            + "; ".join(f"{k}: {v}" for k, v in sorted(others.items())[:40])
            + (" ..." if len(others) > 40 else ""),
        ]
    lines += ["", "## Plots", ""]
    for caption, path in figs.items():
        lines += [f"### {caption}", "", f"![{caption}]({_rel(path, out)})", ""]
    lines += [
        "",
        f"Federated run: `{_rel(fed_dir, out)}/` (rounds.jsonl, summary.md, checkpoints). "
        f"Every number above: `{MARKER}`.",
    ]
    return lines


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    refuse_unknown_overrides("demo")
    setup_job_logging()
    try:
        print(run(cfg))
    except RayStartError as err:
        sys.exit(f"simulations.report: {err}")  # one line, exit status 1


if __name__ == "__main__":
    sys.argv = with_task_alias(sys.argv)
    sys.exit(main())
