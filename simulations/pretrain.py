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

import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.labels.tasks import TASKS, OnsetTask, Task, rows_per_subject
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.pooled import PooledPretrainingDataset
from healthfm_core.data.sequences.token_settings import TokenSettings
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, make_loader
from healthfm_core.data.sequences.vocab import Vocabulary, build_vocabulary
from healthfm_core.data.sites.site import Site
from healthfm_core.eval import plots
from healthfm_core.eval.metrics import PairedDifference
from healthfm_core.eval.report import ResultRow, results_table, write_report
from healthfm_core.eval.runner import (
    EvalSet,
    MethodFeatures,
    MethodResult,
    PooledEmbedder,
    build_eval_set,
    evaluate_cross_fitted,
    evaluate_method,
    evaluate_method_splits,
    mean_auroc,
    method_features,
    oracle_rows,
    paired_auroc_difference,
    subsample_train,
    task_display,
    wins,
)
from healthfm_core.files import atomic_write_text
from healthfm_core.model.config import ModelConfig, model_config_from_dict
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.model.objective_weights import curriculum_weights
from healthfm_core.protocol import federation_modalities
from healthfm_core.train.checkpoint_dirs import latest_checkpoint
from healthfm_core.train.trainer import TrainConfig, Trainer
from simulations.common import Clock, job_tasks, open_sites, site_labelled, task_entries
from simulations.overrides import refuse_unknown_overrides, with_task_alias
from simulations.synthetic import oracle_risk

log = logging.getLogger("healthfm.simulations.pretrain")


def agree_vocabulary(sites: Mapping[str, Site], min_subjects: int) -> Vocabulary:
    return build_vocabulary(
        [site_code_stats(s, min_subjects=min_subjects) for s in sites.values()], min_subjects=min_subjects
    )


def token_settings(cfg: DictConfig) -> TokenSettings:
    """The job's tokenisation (`data.token_window_days`, `data.max_codes_per_token`), checked."""
    keys = ("token_window_days", "max_codes_per_token")
    return TokenSettings.parse({k: cfg.data[k] for k in keys if cfg.data.get(k) is not None}, "pretrain config data")


def pooled_train_loader(cfg: DictConfig, sites: Mapping[str, Site], seqs: Mapping[str, SiteSequences]):
    parts = []
    for name, site in sites.items():
        splits = site.subject_splits()
        train = splits["subject_id"].to_numpy()[np.asarray(splits["split"].to_pylist()) == "train"]
        parts.append(
            PretrainingDataset(
                seqs[name],
                subject_ids=train,
                time_mode=cfg.train.time_mode,
                max_events=cfg.data.max_events,
                max_patches=cfg.data.max_patches,
                seed=int(cfg.seed),
            )
        )
    pooled = PooledPretrainingDataset(parts)
    log.info("pretraining on %d train subjects pooled from %d sites", len(pooled), len(parts))
    return make_loader(pooled, batch_size=cfg.train.batch_size, shuffle=True, seed=int(cfg.seed), drop_last=True)


def pretrain(
    cfg: DictConfig,
    mcfg: ModelConfig,
    vocab: Vocabulary,
    loader,
    out: Path,
    device: torch.device,
    modalities: Sequence[str] | None = None,
) -> tuple[HealthFM, dict[str, torch.Tensor], list[dict[str, float]]]:
    """Pretrain one model (holding `modalities`, the sites' union); returns it, its initial weights
    (the random-init baseline) and the per-step history. Checkpoints go to out/checkpoints;
    resume=true continues from the latest."""
    torch.manual_seed(int(cfg.seed))
    model = HealthFM(mcfg, vocab.vocab_size, vocab.n_prs_traits, modalities).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = int(cfg.train.steps)
    tcfg = TrainConfig(
        steps=steps,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        batch_size=cfg.train.batch_size,
        seed=int(cfg.seed),
        warmup_steps=cfg.train.warmup_steps,
        schedule=cfg.train.schedule,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        progress=bool(cfg.progress),
    )
    trainer = Trainer(
        model,
        loader,
        tcfg,
        weights_fn=lambda step: curriculum_weights(step, steps, mcfg),
        checkpoint_dir=out / "checkpoints",
    )
    history_path = out / "history.json"
    history: list[dict[str, float]] = []
    if cfg.resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        start = trainer.resume_from(ckpt)
        if history_path.is_file():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] < start]
        log.info("resumed %s at step %d of %d", ckpt, start, steps)
    log.info(
        "pretraining %s (%d parameters) for %d steps, batch %d",
        mcfg.name,
        model.num_parameters(),
        steps,
        cfg.train.batch_size,
    )
    if trainer.state is None or trainer.state.step < steps:
        history += trainer.fit().history
    atomic_write_text(history_path, json.dumps(history))
    return model, init_state, history


def evaluate_model_methods(
    cfg: DictConfig, data: EvalSet, methods: Mapping[str, torch.nn.Module | None], vocab: Vocabulary
) -> tuple[dict[str, MethodResult], dict[str, MethodResult], dict[str, MethodFeatures]]:
    """Features and probes for each method (None = count features): held_out results, the same
    probes scored on tuning, and each method's features (for the label-efficiency curve)."""
    results: dict[str, MethodResult] = {}
    tuning: dict[str, MethodResult] = {}
    features: dict[str, MethodFeatures] = {}
    poolings = list(cfg.eval.poolings)
    for name, model in methods.items():
        t0 = time.perf_counter()
        embedder = None if model is None else PooledEmbedder(model, poolings)
        feats = method_features(
            data,
            embedder,
            vocab_size=vocab.vocab_size,
            max_events=cfg.data.max_events,
            max_patches=cfg.data.max_patches,
            batch_size=cfg.eval.batch_size,
            progress=bool(cfg.progress),
        )
        # One forward pass, one column block per pooling: "query" keeps the method's name.
        blocks = (
            {name: feats.x}
            if model is None
            else dict(
                zip(
                    [name if p == "query" else f"{name}_{p}pool" for p in poolings],
                    np.split(feats.x, len(poolings), axis=1),
                )
            )
        )
        for method, x in blocks.items():
            mf = MethodFeatures(x, feats.present, feats.rows)
            # The same probes scored on tuning too: what design choices are compared on.
            by_split = evaluate_method_splits(
                method,
                data,
                mf,
                ("held_out", "tuning"),
                n_boot={"held_out": int(cfg.eval.n_boot), "tuning": 10},
                seed=int(cfg.seed),
            )
            results[method], tuning[method] = by_split["held_out"], by_split["tuning"]
            features[method] = mf
        log.info("method %s: %d rows in %.1f s", name, len(feats.x), time.perf_counter() - t0)
    return results, tuning, features


def label_efficiency(
    cfg: DictConfig, data: EvalSet, features: Mapping[str, MethodFeatures], results: Mapping[str, MethodResult]
) -> dict[str, dict[float, list[float]]]:
    """Mean held_out AUROC over the summary pairs when the probe sees the labels of only a
    fraction of the train subjects (same subjects for every method, `repeats` draws per
    fraction): what pretraining buys when labels are scarce. {method: {fraction: [per draw]}}."""
    k = int(cfg.eval.summary_min_positives)
    keys = [
        key
        for key, (y, _) in results["pretrained"].predictions.items()
        if isinstance(data.tasks[key], OnsetTask) and int(y.sum()) >= k
    ]
    if not keys:
        return {}
    curves: dict[str, dict[float, list[float]]] = {m: {} for m in cfg.eval.label_efficiency.methods if m in features}
    for fraction in cfg.eval.label_efficiency.fractions:
        repeats = 1 if fraction >= 1 else int(cfg.eval.label_efficiency.repeats)
        for rep in range(repeats):
            for method in curves:
                f = features[method]
                rows = subsample_train(data, f.rows, float(fraction), seed=int(cfg.seed) + rep)
                sel = np.isin(f.rows, rows)
                res = evaluate_method(
                    method,
                    data,
                    MethodFeatures(f.x[sel], f.present[sel], f.rows[sel]),
                    tasks=keys,
                    n_boot=1,
                    seed=int(cfg.seed),
                )
                auc = {(r.task, r.horizon): r.auroc for r in res.rows}
                # A task the draw left without 2 train positives scores as chance (0.5) for every method.
                curves[method].setdefault(float(fraction), []).append(
                    float(np.mean([auc.get(task_display(data.tasks[key]), 0.5) for key in keys]))
                )
    return curves


def label_efficiency_lines(curves: Mapping[str, Mapping[float, Sequence[float]]]) -> list[str]:
    fractions = sorted({f for c in curves.values() for f in c})
    lines = ["| method | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---|" + "---:|" * len(fractions)]
    for method, c in curves.items():
        lines.append(
            f"| {method} | "
            + " | ".join(
                f"{np.mean(c[f]):.3f}" + (f" ± {np.std(c[f]):.3f}" if len(c[f]) > 1 else "") for f in fractions
            )
            + " |"
        )
    return ["\n".join(lines)]


@dataclasses.dataclass
class Ablation:
    """The test-time modality ablation: its rows, per-condition results and paired differences."""

    data: EvalSet
    results: dict[str, MethodResult]  # "<cohort>: pretrained[<modalities>]" -> cross-fitted results
    cohorts: dict[str, int]  # cohort -> rows
    differences: dict[str, PairedDifference | None]  # "<cohort>: <condition> - <first condition>"


def modality_ablation(
    cfg: DictConfig,
    sites: Mapping[str, Site],
    seqs: Mapping[str, SiteSequences],
    model: torch.nn.Module,
    tasks: Mapping[str, Task],
    vocab: Vocabulary,
) -> Ablation:
    """Per cohort and condition: the pretrained model's probe with only those modalities.

    The rows are the end of every wear period of the sites that have wearables (when the device
    data is freshest; at visits it is mostly months old), with the onset tasks asked there. A
    cohort is the rows that have every `require`d modality at that time; each condition removes
    the other modalities from the input. Such cohorts are too small for one train / tuning /
    held_out split, so each condition's probe is cross-fitted over all the cohort's rows
    (folds by subject) and scored out of fold; conditions are compared on the same rows with a
    subject bootstrap. Features are computed once per distinct modality set."""
    spec = cfg.eval.modality_ablation
    order = ("ehr", "wearables", "genomics")
    onset = {k: t for k, t in tasks.items() if isinstance(t, OnsetTask)}
    wearing = {n: (sites[n], seqs[n]) for n in sites if sites[n].wearable_files}
    data = build_eval_set(wearing, onset, seed=int(cfg.seed), onset_times=spec.prediction_times)
    present = method_features(
        data,
        None,
        vocab_size=vocab.vocab_size,
        max_events=cfg.data.max_events,
        max_patches=cfg.data.max_patches,
        batch_size=cfg.eval.batch_size,
    ).present
    cohorts = {}
    for cohort, c in spec.cohorts.items():
        need = [order.index(m) for m in c.require]
        cohorts[cohort] = np.flatnonzero(present[:, need].all(axis=1))
        log.info(
            "ablation cohort %s: %d rows (wear-period ends) have %s", cohort, len(cohorts[cohort]), "+".join(c.require)
        )
    by_keep: dict[tuple[str, ...], set[int]] = {}
    for cohort, c in spec.cohorts.items():
        for keep in c.conditions:
            by_keep.setdefault(tuple(m for m in order if m in keep), set()).update(cohorts[cohort].tolist())
    pooling = cfg.eval.ablation_pooling  # one pooling, or a list of them (the evidence job's probe_poolings)
    embedder = PooledEmbedder(model, [pooling] if isinstance(pooling, str) else list(pooling))
    feats = {
        key: method_features(
            data,
            embedder,
            rows=np.array(sorted(rows), dtype=np.int64),
            keep=key,
            max_events=cfg.data.max_events,
            max_patches=cfg.data.max_patches,
            batch_size=cfg.eval.batch_size,
        )
        for key, rows in by_keep.items()
        if rows
    }
    results: dict[str, MethodResult] = {}
    differences: dict[str, PairedDifference | None] = {}
    for cohort, c in spec.cohorts.items():
        labels = []
        for keep in c.conditions:
            key = tuple(m for m in order if m in keep)
            if key not in feats:
                continue
            f = feats[key]
            sel = np.isin(f.rows, cohorts[cohort])
            label = f"{cohort}: pretrained[{'+'.join(key)}]"
            results[label] = evaluate_cross_fitted(
                label,
                data,
                MethodFeatures(f.x[sel], f.present[sel], f.rows[sel]),
                n_folds=int(spec.n_folds),
                n_boot=int(cfg.eval.n_boot),
                seed=int(cfg.seed),
                min_positives=int(cfg.eval.summary_min_positives),
            )
            labels.append(label)
        for other in labels[1:]:
            common = [k for k in onset if k in results[other].scored_rows and k in results[labels[0]].scored_rows]
            name = f"{cohort}: {other.split(': ')[1]} - {labels[0].split(': ')[1]}"
            differences[name] = paired_auroc_difference(
                data, results[other], results[labels[0]], common, n_boot=int(cfg.eval.n_boot), seed=int(cfg.seed)
            )
    return Ablation(data, results, {k: len(v) for k, v in cohorts.items()}, differences)


def main_differences(
    cfg: DictConfig, data: EvalSet, results: Mapping[str, MethodResult]
) -> dict[str, PairedDifference | None]:
    """Pretrained against each baseline: mean held_out AUROC difference over the onset pairs with
    at least summary_min_positives held_out positives, subject bootstrap shared by all pairs."""
    k = int(cfg.eval.summary_min_positives)
    out: dict[str, PairedDifference | None] = {}
    for method in [m for m in results if m.startswith("pretrained")]:
        suffix = method[len("pretrained") :]
        for other in dict.fromkeys((f"random_init{suffix}", "random_init", "counts")):
            if other not in results or other == method:
                continue
            keys = [
                key
                for key, res in results[method].predictions.items()
                if isinstance(data.tasks[key], OnsetTask)
                and key in results[other].scored_rows
                and int(res[0].sum()) >= k
            ]
            out[f"{method} - {other}"] = paired_auroc_difference(
                data, results[method], results[other], keys, n_boot=int(cfg.eval.n_boot), seed=int(cfg.seed)
            )
    return out


def difference_lines(diffs: Mapping[str, PairedDifference | None]) -> list[str]:
    lines = ["| comparison | pairs | mean AUROC difference | 95% CI | resamples <= 0 |", "|---|---:|---:|---|---:|"]
    for name, d in diffs.items():
        if d is None:
            lines.append(f"| {name} | 0 | n/a | n/a | n/a |")
        else:
            lines.append(
                f"| {name} | {d.n_tasks} | {d.mean:+.3f} | [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}] | "
                f"{d.fraction_at_or_below_zero:.3f} |"
            )
    return ["\n".join(lines)]


def make_plots(
    out: Path, history: list[dict[str, float]], results: Mapping[str, MethodResult], data: EvalSet
) -> dict[str, Path]:
    figs: dict[str, Path] = {
        "Training curves per objective (pretrained model)": plots.training_curves(
            history, out / "training_curves.png", title="Pretraining"
        )
    }
    rows = [r for res in results.values() for r in res.rows]
    for base in sorted({r.task for r in rows}):
        figs[f"AUROC per horizon: {base}"] = plots.horizon_auroc_plot(rows, out / f"auroc_{base}.png", task=base)
    for key, task in data.tasks.items():
        if not isinstance(task, OnsetTask):
            continue
        base, horizon = task_display(task)
        longest = max(
            t.horizon_days for t in data.tasks.values() if isinstance(t, OnsetTask) and task_display(t)[0] == base
        )
        preds = {m: res.predictions[key] for m, res in results.items() if key in res.predictions}
        if horizon == longest and preds:
            figs[f"Reliability: {base} {horizon} d"] = plots.reliability_diagram(
                preds, out / f"reliability_{base}_{horizon}d.png", title=f"{base}, {horizon} d (held_out)"
            )
    return figs


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def wins_line(rows: Sequence[ResultRow], method: str, other: str, min_positives: int) -> str:
    """ "<method> beats <other> on w of n pairs", or, when they share no pair, that they share none."""
    w, n = wins(rows, method, other)
    if n == 0:
        return (
            f"{method} and {other} share no task/horizon pair with >= {min_positives} held_out positives: not compared."
        )
    return f"{method} beats {other} on {w} of {n} task/horizon pairs."


NOTES_DOC = "docs/researcher.md"  # what the numbers below mean


def summary_notes(
    cfg: DictConfig,
    clock: Clock,
    sites: Mapping[str, Site],
    vocab: Vocabulary,
    model: HealthFM,
    history: list[dict[str, float]],
    results: Mapping[str, MethodResult],
    ablation: Ablation | None,
    tuning: Mapping[str, MethodResult],
    differences: Mapping[str, PairedDifference | None],
    curves: Mapping[str, Mapping[float, Sequence[float]]],
) -> list[str]:
    """The report's computed lines, each with a short caption; NOTES_DOC explains them."""
    # Summaries count only pairs with enough held_out positives: an AUROC over 1-3 positives is noise.
    k = int(cfg.eval.summary_min_positives)
    notes = run_notes(cfg, clock, sites, vocab, model)
    if history:
        notes += training_notes(history, model)
    notes += result_notes(cfg, k, results, tuning, differences, curves)
    if ablation is not None:
        notes += ablation_notes(cfg, k, ablation)
    abl_results = ablation.results if ablation is not None else {}
    skipped = {f"{m}/{k}": why for m, res in {**results, **abl_results}.items() for k, why in res.skipped.items()}
    if skipped:
        notes.append(
            "Not evaluated (too few rows or positives): " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        )
    return notes


def run_notes(
    cfg: DictConfig, clock: Clock, sites: Mapping[str, Site], vocab: Vocabulary, model: HealthFM
) -> list[str]:
    """What ran: the command, the time, the sites, the vocabulary, the model and its training."""
    return [
        f"Command: `python -m simulations.pretrain {' '.join(sys.argv[1:])}`. How to read this report: `{NOTES_DOC}`.",
        f"Wall time {clock.total / 60:.1f} min on {torch.get_num_threads()} torch thread(s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items())
        + ".",
        "Sites (pooled train splits for pretraining): "
        + "; ".join(
            f"{n}: {s.summary.n_subjects} subjects, " + ", ".join(f"{m} {c}" for m, c in s.subject_counts.items() if c)
            for n, s in sites.items()
        )
        + ".",
        f"Vocabulary {vocab.vocab_size} ids ({len(vocab.codes)} codes seen in >= {vocab.min_subjects} subjects), "
        f"PRS traits {vocab.prs_traits}. Model `{model.cfg.name}` ({model.num_parameters():,} parameters, "
        f"time encoding {model.cfg.time_encoding}); {cfg.train.steps} steps x batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr} ({cfg.train.schedule}), samples capped at {cfg.data.max_events} EHR tokens "
        f"({token_settings(cfg).describe()}) / {cfg.data.max_patches} one-hour patches.",
    ]


def training_notes(history: list[dict[str, float]], model: HealthFM) -> list[str]:
    """The pretraining losses, first steps against last, and the decay rates after training."""
    notes: list[str] = []
    window = max(1, min(50, len(history) // 2))
    first, tail = history[:window], history[-window:]
    keys = [k for k in history[0] if k not in ("step", "lr", "grad_norm", "rate_min", "rate_max")]

    def mean_present(part: list[dict[str, float]], key: str) -> float:
        # 0 is a step whose batch had no data for the loss (pretraining_losses' convention).
        vals = [h[key] for h in part if key == "total" or h[key] != 0.0]
        return float(np.mean(vals)) if vals else float("nan")

    # An objective with no data in the whole run (the wearable losses at EHR-only sites) is named, not shown as n/a.
    empty = [k for k in keys if not np.isfinite(mean_present(history, k))]
    notes.append(
        f"Pretraining losses (mean of the first -> last {window} steps that have each loss): "
        + ", ".join(
            f"{k} {_fmt(mean_present(first, k))} -> {_fmt(mean_present(tail, k))}" for k in keys if k not in empty
        )
        + "."
        + (f" No data in this run for: {', '.join(empty)}." if empty else "")
    )
    rates = model.decay_rate_summary()
    if rates:
        notes.append(
            f"Decay rates after training: {rates['rate_min_per_day']:.3g} .. "
            f"{rates['rate_max_per_day']:.3g} per day (timescales {rates['timescale_min_days']:.3g} .. "
            f"{rates['timescale_max_days']:.3g} days), {rates['rate_at_bound_fraction']:.0%} at a bound."
        )
    return notes


def result_notes(
    cfg: DictConfig,
    k: int,
    results: Mapping[str, MethodResult],
    tuning: Mapping[str, MethodResult],
    differences: Mapping[str, PairedDifference | None],
    curves: Mapping[str, Mapping[float, Sequence[float]]],
) -> list[str]:
    """The summary: mean AUROCs over the pairs with >= k held_out positives (and on tuning), wins,
    paired differences, label efficiency, the oracle's gap."""
    rows = [r for res in results.values() for r in res.rows if r.n_pos >= k]
    means = mean_auroc(rows)
    notes: list[str] = []
    notes.append("## Summary")
    means = {m: v for m, v in means.items() if np.isfinite(v)}
    if means:
        notes.append(
            f"Mean held_out AUROC over the pairs with >= {k} held_out positives that every method has: "
            + ", ".join(f"{m} {_fmt(v)}" for m, v in sorted(means.items()))
            + "."
        )
    else:
        notes.append(
            f"No (task, horizon) pair has >= {k} held_out positives for every method (eval.summary_min_positives), "
            "so no mean is given: the table below has each pair's rows, positives and interval."
        )
    tuning_means = mean_auroc([r for res in tuning.values() for r in res.rows if r.n_pos >= k])
    tuning_means = {m: v for m, v in tuning_means.items() if np.isfinite(v)}
    if tuning_means:
        notes.append(
            "The same probes scored on tuning: "
            + ", ".join(f"{m} {_fmt(v)}" for m, v in sorted(tuning_means.items()))
            + "."
        )
    for name in differences:
        method, other = name.split(" - ")
        notes.append(wins_line(rows, method, other, k))
    if differences:
        notes.append("Paired AUROC differences on the same held_out rows (subject bootstrap shared by all pairs):")
        notes += difference_lines(differences)
    if curves:
        notes.append(
            f"Label efficiency: mean held_out AUROC against the share of train subjects whose labels the "
            f"probe sees ({cfg.eval.label_efficiency.repeats} draws per share below 1, mean ± sd)."
        )
        notes += label_efficiency_lines(curves)
    if "oracle" in results and "pretrained" in results:
        w, n = wins(rows, "oracle", "pretrained")
        notes.append(
            f"The oracle (true risk) is above pretrained on {w} of {n} pairs; mean gap "
            f"{_fmt(means.get('oracle', np.nan) - means.get('pretrained', np.nan))}."
            if n
            else f"No pair with >= {k} held_out positives has both the oracle and pretrained: no gap to give."
        )
    return notes


def ablation_notes(cfg: DictConfig, k: int, ablation: Ablation) -> list[str]:
    """The test-time modality ablation per cohort: means, wins, paired differences, the table."""
    notes: list[str] = []
    spec = cfg.eval.modality_ablation
    notes.append("## Test-time modality ablation (pretrained model)")
    notes.append(
        f"Rows: onset tasks at {spec.prediction_times.replace('_', ' ')} of the sites with wearables "
        f"({len(ablation.data)} rows, all splits); probes cross-fitted over {spec.n_folds} folds by "
        f"subject; a task needs {k} positives in the cohort."
    )
    abl_rows = [r for res in ablation.results.values() for r in res.rows]
    for cohort in spec.cohorts:
        shown = [r for r in abl_rows if r.method.startswith(f"{cohort}:")]
        if not shown:
            notes.append(f"Cohort {cohort} ({ablation.cohorts.get(cohort, 0)} rows): no task had {k} positives.")
            continue
        m = mean_auroc(shown)
        notes.append(
            f"Cohort {cohort} ({ablation.cohorts[cohort]} rows), mean AUROC over the tasks every condition "
            "has: " + ", ".join(f"{name.split(': ')[1]} {_fmt(v)}" for name, v in m.items()) + "."
        )
        methods = sorted({r.method for r in shown}, key=len)
        for a in methods[1:]:
            notes.append(wins_line(shown, a, methods[0], k).replace(f"{cohort}: ", ""))
        mine = {d: v for d, v in ablation.differences.items() if d.startswith(f"{cohort}:")}
        if mine:
            notes += difference_lines(mine)
        notes.append(results_table(shown))
    return notes


def results_json(
    results: Mapping[str, MethodResult],
    ablation: Ablation | None,
    tuning: Mapping[str, MethodResult],
    differences: Mapping[str, PairedDifference | None],
) -> str:
    def dump(res: Mapping[str, MethodResult]) -> dict:
        return {
            m: {
                "rows": [r.model_dump() for r in v.rows],
                "regression_rows": [r.model_dump() for r in v.regression_rows],
                "skipped": v.skipped,
            }
            for m, v in res.items()
        }

    def diffs(d: Mapping[str, PairedDifference | None]) -> dict:
        return {k: None if v is None else v.model_dump() for k, v in d.items()}

    return json.dumps(
        {
            "methods": dump(results),
            "tuning": dump(tuning),
            "differences": diffs(differences),
            "modality_ablation": {} if ablation is None else dump(ablation.results),
            "modality_ablation_differences": {} if ablation is None else diffs(ablation.differences),
        },
        indent=1,
        allow_nan=True,
    )


def refuse_site_labelled_tasks(cfg: DictConfig) -> None:
    """`site:<name>` tasks have labels only inside each site (SITE_ROOT/tasks/<name>/), which a
    pooled centralized job does not evaluate: refused before any work, naming them, rather than
    left out of the report without a word."""
    if (entries := task_entries(cfg)) is None:
        return
    if named := site_labelled(resolve_tasks(entries)):
        raise ValueError(
            f"tasks: {', '.join(named)}: site-labelled tasks are evaluated only by the sites themselves, in a "
            "federation's evaluation (python -m simulations.run or simulations.report with the same tasks=); "
            "simulations.pretrain pools the sites and has no such evaluation. Drop them from tasks= here."
        )


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    refuse_site_labelled_tasks(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    mcfg = model_config_from_dict(
        cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True)), source=f"model={cfg.model.name}"
    )

    sites, truth_dir, scenario = open_sites(
        cfg.scenario, cfg.data.dir, int(cfg.seed), cfg.data.n_subjects, cfg.get("site_roots")
    )
    clock.lap("data (generate or reuse, open sites)")
    vocab = agree_vocabulary(sites, int(cfg.data.min_subjects))
    vocab.save(out / "vocabulary.json")
    seqs = {name: SiteSequences.from_site(site, vocab, tokens=token_settings(cfg)) for name, site in sites.items()}
    modalities = federation_modalities([site.modalities for site in sites.values()], vocab)
    clock.lap("vocabulary and sequences")

    loader = pooled_train_loader(cfg, sites, seqs)
    model, init_state, history = pretrain(cfg, mcfg, vocab, loader, out, device, modalities)
    clock.lap("pretraining")

    onset = (
        [k for k, v in TASKS.items() if isinstance(v, OnsetTask)]
        if cfg.eval.onset_tasks == "all"
        else list(cfg.eval.onset_tasks)
    )
    tasks: dict[str, Task] = job_tasks(cfg, [*onset, *cfg.eval.regression_tasks])
    if "wearables" not in modalities:  # no site has wearables: no rows for the wearable regressions
        tasks = {k: t for k, t in tasks.items() if isinstance(t, OnsetTask)}
    data = build_eval_set(
        {n: (sites[n], seqs[n]) for n in sites},
        tasks,
        n_per_subject=rows_per_subject(cfg.eval.n_per_subject),
        seed=int(cfg.seed),
    )
    random_model = HealthFM(mcfg, vocab.vocab_size, vocab.n_prs_traits, modalities).to(device)
    random_model.load_state_dict(init_state)
    methods: dict[str, torch.nn.Module | None] = {"counts": None, "pretrained": model, "random_init": random_model}
    if cfg.eval.sinusoidal_ablation:
        clock.lap("evaluation rows")
        sin_cfg = model_config_from_dict(
            {**mcfg.model_dump(), "time_encoding": "sinusoidal"}, source="sinusoidal ablation"
        )
        sin_model, _, _ = pretrain(cfg, sin_cfg, vocab, loader, out / "sinusoidal", device, modalities)
        methods["pretrained_sinusoidal"] = sin_model
        clock.lap("pretraining (sinusoidal ablation)")
    results, tuning, features = evaluate_model_methods(cfg, data, methods, vocab)
    if truth_dir is not None and scenario is not None:  # the oracle only where ground truth exists
        code_to_disease = {d.code: name for name, d in scenario.diseases.items()}
        results["oracle"] = oracle_rows(
            data, functools.partial(oracle_risk, truth_dir), code_to_disease, n_boot=cfg.eval.n_boot, seed=int(cfg.seed)
        )
    clock.lap("evaluation (features and probes)")
    differences = main_differences(cfg, data, results)
    curves = label_efficiency(cfg, data, features, results) if cfg.eval.label_efficiency.fractions else {}
    del features
    clock.lap("label efficiency")
    # The ablation's rows are wear-period ends: without a site with wearables there are none.
    ablation = (
        modality_ablation(cfg, sites, seqs, model, tasks, vocab)
        if cfg.eval.modality_ablation.enabled and "wearables" in modalities
        else None
    )
    if cfg.eval.modality_ablation.enabled and ablation is None:
        log.info("modality ablation skipped: no site has wearables")
    clock.lap("modality ablation")

    figs = make_plots(out, history, results, data)
    if curves:
        figs["Label efficiency: held-out AUROC against the share of train labels"] = plots.label_efficiency_plot(
            curves, out / "label_efficiency.png"
        )
    rows = [r for res in results.values() for r in res.rows]
    regression_rows = [r for res in results.values() for r in res.regression_rows]
    atomic_write_text(out / "results.json", results_json(results, ablation, tuning, differences))
    notes = summary_notes(cfg, clock, sites, vocab, model, history, results, ablation, tuning, differences, curves)
    report = write_report(
        out / "report.md",
        rows,
        plots=figs,
        regression_rows=regression_rows,
        title=f"HealthFM centralized pretraining: model {mcfg.name}, "
        + (f"scenario {scenario.name}" if scenario is not None else f"{len(sites)} sites of your own"),
        notes=notes,
    )
    log.info("total wall time %.1f min", clock.total / 60)
    return report


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    refuse_unknown_overrides("pretrain")
    try:
        refuse_site_labelled_tasks(cfg)
    except ValueError as err:
        sys.exit(f"simulations.pretrain: {err}")  # one line, exit status 1
    report = run(cfg)
    print(report)


if __name__ == "__main__":
    sys.argv = with_task_alias(sys.argv)
    main()
