"""Centralized pretraining and frozen-probe evaluation on the pooled synthetic sites.

    python -m simulations.pretrain model=small scenario=default
    python -m simulations.pretrain model=tiny scenario=tiny data.n_subjects=100 train.steps=20
    python -m simulations.pretrain ... out_dir=runs/pretrain/x resume=true   # continue a run

The centralized baseline: every site's train split is pooled into one dataset (what the
federation is compared with). Steps: generate or reuse the synthetic federation, open each
site, agree the vocabulary from per-site aggregate statistics, pretrain HealthFM with the
curriculum, then evaluate frozen linear probes (pretrained, the same architecture at its random
initialisation, count features, and the generator's true risk as the ceiling), the test-time
modality ablation and optionally a sinusoidal-time model. Writes report.md with PNG plots,
results.json, history.json, vocabulary.json and checkpoints/ to the output directory and prints
the report's path. Composition only: the pieces live in healthfm_core.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.site import Site, open_site
from healthfm_core.data.synthetic import ScenarioConfig, oracle_risk, synthetic_sites
from healthfm_core.data.tasks import TASKS, OnsetTask, Task
from healthfm_core.data.tokens import PretrainingDataset, SiteSequences, make_loader
from healthfm_core.data.vocab import Vocabulary, build_vocabulary, site_code_stats
from healthfm_core.eval import plots
from healthfm_core.eval.report import results_table, write_report
from healthfm_core.eval.runner import (
    EvalSet,
    MethodFeatures,
    MethodResult,
    PooledEmbedder,
    PooledPretrainingDataset,
    build_eval_set,
    evaluate_method,
    mean_auroc,
    method_features,
    oracle_rows,
    task_display,
    wins,
)
from healthfm_core.files import atomic_write_text
from healthfm_core.model.config import ModelConfig, model_config_from_dict
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.model.objectives import curriculum_weights
from healthfm_core.train import TrainConfig, Trainer, latest_checkpoint

log = logging.getLogger("healthfm.simulations.pretrain")

MAIN_METHODS = ("pretrained", "random_init", "counts", "oracle")


class Clock:
    """Wall time per phase, for the report (the budget is part of the deliverable)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        log.info("%s: %.1f s", phase, now - since)
        return now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def open_sites(cfg: DictConfig) -> tuple[dict[str, Site], Path | None, ScenarioConfig | None]:
    # simulations.run owns the reuse-or-generate rule; imported here so both jobs share the data.

    scenario = OmegaConf.to_container(cfg.scenario, resolve=True)
    manifest = synthetic_sites(cfg.data.dir, scenario, int(cfg.seed), cfg.data.n_subjects)
    sites = {s.name: open_site(s.root) for s in manifest.sites}
    truth = Path(manifest.truth_dir)
    return sites, truth, ScenarioConfig.model_validate_json((truth / "scenario.json").read_text())


def agree_vocabulary(sites: Mapping[str, Site], min_subjects: int) -> Vocabulary:
    return build_vocabulary([site_code_stats(s, min_subjects=min_subjects) for s in sites.values()],
                            min_subjects=min_subjects)


def pooled_train_loader(cfg: DictConfig, sites: Mapping[str, Site], seqs: Mapping[str, SiteSequences]):
    parts = []
    for name, site in sites.items():
        splits = site.subject_splits()
        train = splits["subject_id"].to_numpy()[np.asarray(splits["split"].to_pylist()) == "train"]
        parts.append(PretrainingDataset(seqs[name], subject_ids=train, time_mode=cfg.train.time_mode,
                                        max_events=cfg.data.max_events, max_patches=cfg.data.max_patches,
                                        seed=int(cfg.seed)))
    pooled = PooledPretrainingDataset(parts)
    log.info("pretraining on %d train subjects pooled from %d sites", len(pooled), len(parts))
    return make_loader(pooled, batch_size=cfg.train.batch_size, shuffle=True, seed=int(cfg.seed), drop_last=True)


def pretrain(cfg: DictConfig, mcfg: ModelConfig, vocab: Vocabulary, loader, out: Path,
             device: torch.device) -> tuple[HealthFM, dict[str, torch.Tensor], list[dict[str, float]]]:
    """Pretrain one model; returns it, its initial weights (the random-init baseline) and the
    per-step history. Checkpoints go to out/checkpoints; resume=true continues from the latest."""
    torch.manual_seed(int(cfg.seed))
    model = HealthFM(mcfg, vocab.vocab_size, vocab.n_prs_traits).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = int(cfg.train.steps)
    tcfg = TrainConfig(
        steps=steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
        batch_size=cfg.train.batch_size, seed=int(cfg.seed), warmup_steps=cfg.train.warmup_steps,
        schedule=cfg.train.schedule, log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every,
        progress=bool(cfg.progress),
    )
    trainer = Trainer(model, loader, tcfg, weights_fn=lambda step: curriculum_weights(step, steps, mcfg),
                      checkpoint_dir=out / "checkpoints")
    history_path = out / "history.json"
    history: list[dict[str, float]] = []
    if cfg.resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        start = trainer.resume_from(ckpt)
        if history_path.is_file():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] < start]
        log.info("resumed %s at step %d of %d", ckpt, start, steps)
    log.info("pretraining %s (%d parameters) for %d steps, batch %d", mcfg.name, model.num_parameters(), steps,
             cfg.train.batch_size)
    if trainer.state is None or trainer.state.step < steps:
        history += trainer.fit().history
    atomic_write_text(history_path, json.dumps(history))
    return model, init_state, history


def evaluate_model_methods(cfg: DictConfig, data: EvalSet, methods: Mapping[str, torch.nn.Module | None],
                           vocab: Vocabulary) -> tuple[dict[str, MethodResult], dict[str, MethodResult], np.ndarray]:
    """Features and probes for each method (None = count features): held_out results, the same
    probes scored on tuning, and the per-row modality presence (for the ablation cohorts)."""
    results: dict[str, MethodResult] = {}
    tuning: dict[str, MethodResult] = {}
    present = None
    poolings = list(cfg.eval.poolings)
    for name, model in methods.items():
        t0 = time.perf_counter()
        embedder = None if model is None else PooledEmbedder(model, poolings)
        feats = method_features(data, embedder, vocab_size=vocab.vocab_size, max_events=cfg.data.max_events,
                                max_patches=cfg.data.max_patches, batch_size=cfg.eval.batch_size,
                                progress=bool(cfg.progress))
        present = feats.present
        # One forward pass, one column block per pooling: "query" keeps the method's name.
        blocks = {name: feats.x} if model is None else dict(zip(
            [name if p == "query" else f"{name}_{p}pool" for p in poolings], np.split(feats.x, len(poolings), axis=1)))
        for method, x in blocks.items():
            mf = MethodFeatures(x, feats.present, feats.rows)
            results[method] = evaluate_method(method, data, mf, n_boot=cfg.eval.n_boot, seed=int(cfg.seed))
            # The same probes scored on tuning: what design choices are compared on.
            tuning[method] = evaluate_method(method, data, mf, n_boot=10, seed=int(cfg.seed), score_split="tuning")
        log.info("method %s: %d rows in %.1f s", name, len(feats.x), time.perf_counter() - t0)
    assert present is not None
    return results, tuning, present


def modality_ablation(cfg: DictConfig, data: EvalSet, model: torch.nn.Module,
                      present: np.ndarray) -> dict[str, MethodResult]:
    """Per cohort and condition: the pretrained model's probe with only those modalities.
    Features are computed once per distinct modality set over the union of the cohorts' rows."""
    order = ("ehr", "wearables", "genomics")
    cohorts = {}
    for cohort, spec in cfg.eval.modality_ablation.cohorts.items():
        need = [order.index(m) for m in spec.require]
        cohorts[cohort] = np.flatnonzero(present[:, need].all(axis=1))
        log.info("ablation cohort %s: %d rows have %s at prediction time", cohort, len(cohorts[cohort]),
                 "+".join(spec.require))
    by_keep: dict[tuple[str, ...], Any] = {}
    for cohort, spec in cfg.eval.modality_ablation.cohorts.items():
        for keep in spec.conditions:
            key = tuple(m for m in order if m in keep)
            by_keep.setdefault(key, set()).update(cohorts[cohort].tolist())
    feats = {}
    for key, rows in by_keep.items():
        rows = np.array(sorted(rows), dtype=np.int64)
        if len(rows):
            feats[key] = method_features(data, PooledEmbedder(model, [cfg.eval.ablation_pooling]), rows=rows, keep=key, max_events=cfg.data.max_events,
                                         max_patches=cfg.data.max_patches, batch_size=cfg.eval.batch_size)
    onset = [k for k, t in data.tasks.items() if isinstance(t, OnsetTask)]
    out: dict[str, MethodResult] = {}
    for cohort, spec in cfg.eval.modality_ablation.cohorts.items():
        for keep in spec.conditions:
            key = tuple(m for m in order if m in keep)
            if key not in feats:
                continue
            f = feats[key]
            sel = np.isin(f.rows, cohorts[cohort])
            sub = MethodFeatures(f.x[sel], f.present[sel], f.rows[sel])
            label = f"{cohort}: pretrained[{'+'.join(key)}]"
            out[label] = evaluate_method(label, data, sub, tasks=onset, n_boot=cfg.eval.n_boot, seed=int(cfg.seed))
    return out


def make_plots(out: Path, history: list[dict[str, float]], results: Mapping[str, MethodResult],
               data: EvalSet) -> dict[str, Path]:
    figs: dict[str, Path] = {"Training curves per objective (pretrained model)":
                             plots.training_curves(history, out / "training_curves.png", title="Pretraining")}
    rows = [r for res in results.values() for r in res.rows]
    for base in sorted({r.task for r in rows}):
        figs[f"AUROC per horizon: {base}"] = plots.horizon_auroc_plot(rows, out / f"auroc_{base}.png", task=base)
    for key, task in data.tasks.items():
        if not isinstance(task, OnsetTask):
            continue
        base, horizon = task_display(task)
        longest = max(t.horizon_days for t in data.tasks.values()
                      if isinstance(t, OnsetTask) and task_display(t)[0] == base)
        preds = {m: res.predictions[key] for m, res in results.items() if key in res.predictions}
        if horizon == longest and preds:
            figs[f"Reliability: {base} {horizon} d"] = plots.reliability_diagram(
                preds, out / f"reliability_{base}_{horizon}d.png", title=f"{base}, {horizon} d (held_out)")
    return figs


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def summary_notes(cfg: DictConfig, clock: Clock, sites: Mapping[str, Site], vocab: Vocabulary, model: HealthFM,
                  history: list[dict[str, float]], results: Mapping[str, MethodResult],
                  ablation: Mapping[str, MethodResult], tuning: Mapping[str, MethodResult]) -> list[str]:
    # Summaries count only pairs with enough held_out positives: an AUROC over 1-3 positives is noise.
    k = int(cfg.eval.summary_min_positives)
    rows = [r for res in results.values() for r in res.rows if r.n_pos >= k]
    means = mean_auroc(rows)
    notes = [
        f"Command: `python -m simulations.pretrain {' '.join(sys.argv[1:])}`",
        f"Wall time {clock.total / 60:.1f} min on {torch.get_num_threads()} torch thread(s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()) + ".",
        "Sites (pooled train splits for pretraining): " + "; ".join(
            f"{n}: {s.summary.n_subjects} subjects, " + ", ".join(f"{m} {c}" for m, c in s.subject_counts.items() if c)
            for n, s in sites.items()) + ".",
        f"Vocabulary {vocab.vocab_size} ids ({len(vocab.codes)} codes seen in >= {vocab.min_subjects} subjects), "
        f"PRS traits {vocab.prs_traits}. Model `{model.cfg.name}` ({model.num_parameters():,} parameters, "
        f"time encoding {model.cfg.time_encoding}); {cfg.train.steps} steps x batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr} ({cfg.train.schedule}), samples capped at {cfg.data.max_events} events / "
        f"{cfg.data.max_patches} one-hour patches.",
    ]
    if history:
        window = max(1, min(50, len(history) // 2))
        first, tail = history[:window], history[-window:]
        keys = [k for k in history[0] if k not in ("step", "lr", "grad_norm", "rate_min", "rate_max")]
        notes.append(f"Pretraining losses (mean of the first -> last {window} steps): " + ", ".join(
            f"{k} {np.mean([h[k] for h in first]):.3f} -> {np.mean([h[k] for h in tail]):.3f}" for k in keys) + ".")
        rates = model.decay_rate_summary()
        if rates:
            notes.append(f"Decay rates after training: {rates['rate_min_per_day']:.3g} .. "
                         f"{rates['rate_max_per_day']:.3g} per day (timescales {rates['timescale_min_days']:.3g} .. "
                         f"{rates['timescale_max_days']:.3g} days), {rates['rate_at_bound_fraction']:.0%} at a bound.")
    notes.append("## Summary")
    notes.append(f"Summaries count the task/horizon pairs with at least {k} held_out positives (all pairs are in "
                 "the table below). Mean held_out AUROC over the pairs every method has: "
                 + ", ".join(f"{m} {_fmt(v)}" for m, v in sorted(means.items())) + ".")
    tuning_means = mean_auroc([r for res in tuning.values() for r in res.rows if r.n_pos >= k])
    if tuning_means:
        notes.append("The same probes scored on the tuning split (the split design choices such as pooling or "
                     "steps are compared on; held_out is only reported): "
                     + ", ".join(f"{m} {_fmt(v)}" for m, v in sorted(tuning_means.items())) + ".")
    for method in [m for m in results if m.startswith("pretrained")]:
        suffix = method[len("pretrained"):]
        for other in dict.fromkeys((f"random_init{suffix}", "random_init", "counts")):
            if other in results and other != method:
                w, n = wins(rows, method, other)
                notes.append(f"{method} beats {other} on {w} of {n} task/horizon pairs.")
    if "oracle" in results and "pretrained" in results:
        w, n = wins(rows, "oracle", "pretrained")
        notes.append(f"The oracle (true risk) is above pretrained on {w} of {n} pairs; mean gap "
                     f"{_fmt(means.get('oracle', np.nan) - means.get('pretrained', np.nan))}.")
    if ablation:
        notes.append("## Test-time modality ablation (pretrained model)")
        notes.append("Cohorts are the rows (all splits) that have the required modalities at prediction time; "
                     "each condition removes the other modalities from the input and fits its own probe.")
        abl_rows = [r for res in ablation.values() for r in res.rows]
        for cohort in cfg.eval.modality_ablation.cohorts:
            shown = [r for r in abl_rows if r.method.startswith(f"{cohort}:")]
            mine = [r for r in shown if r.n_pos >= k]
            if not mine:
                notes.append(f"Cohort {cohort}: no task had enough rows.")
                continue
            m = mean_auroc(mine)
            notes.append(f"Cohort {cohort}, mean AUROC: " + ", ".join(f"{k.split(': ')[1]} {_fmt(v)}" for k, v in m.items()))
            methods = sorted({r.method for r in mine}, key=len)
            for a in methods[1:]:
                w, n = wins(mine, a, methods[0])
                notes.append(f"{a.split(': ')[1]} beats {methods[0].split(': ')[1]} on {w} of {n} pairs.")
            notes.append(results_table(shown))
    skipped = {f"{m}/{k}": why for m, res in {**results, **ablation}.items() for k, why in res.skipped.items()}
    if skipped:
        notes.append("Not evaluated (too few rows or positives): " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return notes


def results_json(results: Mapping[str, MethodResult], ablation: Mapping[str, MethodResult],
                 tuning: Mapping[str, MethodResult]) -> str:
    def dump(res: Mapping[str, MethodResult]) -> dict:
        return {m: {"rows": [r.model_dump() for r in v.rows], "regression_rows": [r.model_dump() for r in v.regression_rows],
                    "skipped": v.skipped} for m, v in res.items()}
    return json.dumps({"methods": dump(results), "modality_ablation": dump(ablation), "tuning": dump(tuning)},
                      indent=1, allow_nan=True)


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    mcfg = model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True), source=f"model={cfg.model.name}")

    t = time.perf_counter()
    sites, truth_dir, scenario = open_sites(cfg)
    t = clock("data (generate or reuse, open sites)", t)
    vocab = agree_vocabulary(sites, int(cfg.data.min_subjects))
    vocab.save(out / "vocabulary.json")
    seqs = {name: SiteSequences.from_site(site, vocab) for name, site in sites.items()}
    t = clock("vocabulary and sequences", t)

    loader = pooled_train_loader(cfg, sites, seqs)
    model, init_state, history = pretrain(cfg, mcfg, vocab, loader, out, device)
    t = clock("pretraining", t)

    onset = [k for k, v in TASKS.items() if isinstance(v, OnsetTask)] if cfg.eval.onset_tasks == "all" else list(cfg.eval.onset_tasks)
    tasks: dict[str, Task] = {k: TASKS[k] for k in [*onset, *cfg.eval.regression_tasks]}
    data = build_eval_set({n: (sites[n], seqs[n]) for n in sites}, tasks, n_per_subject=int(cfg.eval.n_per_subject),
                          seed=int(cfg.seed))
    random_model = HealthFM(mcfg, vocab.vocab_size, vocab.n_prs_traits).to(device)
    random_model.load_state_dict(init_state)
    methods: dict[str, torch.nn.Module | None] = {"counts": None, "pretrained": model, "random_init": random_model}
    if cfg.eval.sinusoidal_ablation:
        t = clock("evaluation rows", t)
        sin_cfg = model_config_from_dict({**mcfg.model_dump(), "time_encoding": "sinusoidal"}, source="sinusoidal ablation")
        sin_model, _, _ = pretrain(cfg, sin_cfg, vocab, loader, out / "sinusoidal", device)
        methods["pretrained_sinusoidal"] = sin_model
        t = clock("pretraining (sinusoidal ablation)", t)
    results, tuning, present = evaluate_model_methods(cfg, data, methods, vocab)
    code_to_disease = {d.code: name for name, d in scenario.diseases.items()}
    results["oracle"] = oracle_rows(data, functools.partial(oracle_risk, truth_dir), code_to_disease,
                                    n_boot=cfg.eval.n_boot, seed=int(cfg.seed))
    t = clock("evaluation (features and probes)", t)
    ablation = modality_ablation(cfg, data, model, present) if cfg.eval.modality_ablation.enabled else {}
    t = clock("modality ablation", t)

    figs = make_plots(out, history, results, data)
    rows = [r for res in results.values() for r in res.rows]
    regression_rows = [r for res in results.values() for r in res.regression_rows]
    atomic_write_text(out / "results.json", results_json(results, ablation, tuning))
    notes = summary_notes(cfg, clock, sites, vocab, model, history, results, ablation, tuning)
    report = write_report(out / "report.md", rows, plots=figs, regression_rows=regression_rows,
                          title=f"HealthFM centralized pretraining: model {mcfg.name}, scenario {scenario.name}",
                          notes=notes)
    log.info("total wall time %.1f min", clock.total / 60)
    return report


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    print(report)


if __name__ == "__main__":
    main()
