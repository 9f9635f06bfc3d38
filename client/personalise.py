"""`client.py personalise`: the release adapted to this site (personalisation), chosen on the
site's tuning split, written next to the release for embed / probe / predict (`--personal DIR`).

A site joins a federation for a better model than it could train alone; the federated model is
one model for every site's population, and at a site unlike the others it can score below a
model the site trains alone (docs/evidence.md, issue 68). As the field does (FedAvg, then local
fine-tuning), the site takes local steps on its own train split from the release's weights, with
the run's own pretraining objectives at its last round's weights (healthfm_core/train/adapt.py:
no labels needed to train), keeps a snapshot at each candidate count (`--steps`, 0 = the release
unchanged), and keeps the count whose linear probes score best on its tuning split
(healthfm_core/eval/personal_choice.py: mean tuning AUROC over the binary tasks every candidate
scored; the fewest steps on a tie). held_out is never read. The choice and every candidate's
tuning AUROC are printed and written (healthfm_core/personal_weights.py). Nothing leaves the site.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from client.model_use import UseError, embed_rows_at_site, splits_of
from client.site_runtime import SiteRuntime
from healthfm_core.data.sequences.tokens import make_loader
from healthfm_core.eval.metrics import auroc
from healthfm_core.eval.personal_choice import PersonalChoice, choose_steps
from healthfm_core.eval.probes import fit_logistic_probe
from healthfm_core.personal_weights import write_personal
from healthfm_core.protocol import EvalConfig, TaskReason
from healthfm_core.release import ModelRelease
from healthfm_core.train.adapt import adapt_snapshots, candidate_steps, last_round_weights
from healthfm_core.train.local_run import LocalRun

log = logging.getLogger("healthfm.client")

DEFAULT_STEPS = (0, 20, 80)  # the evidence job's candidates (configs/evidence.yaml personalisation.steps)
DEFAULT_LR = 3e-3  # the evidence job's federation lr
DEFAULT_BATCH = 16  # and batch size
WEIGHT_DECAY = 0.01  # the federation's default (server/config.py FederationConfig.weight_decay)


@dataclass
class Personalised:
    out: Path
    choice: PersonalChoice
    groups: list[str]
    train_subjects: int


def tuning_rows(labels: Mapping[str, pa.Table | TaskReason], runtime: SiteRuntime) -> dict[str, pa.Table]:
    """Per binary task key, its train and tuning rows with a `split` column (held_out left out)."""
    out = {}
    for key, table in labels.items():
        if isinstance(table, TaskReason) or "boolean_value" not in table.column_names or table.num_rows == 0:
            continue
        split = splits_of(runtime, table["subject_id"].to_numpy())
        keep = np.isin(split, ("train", "tuning"))
        out[key] = table.filter(pa.array(keep)).append_column("split", pa.array(split[keep].astype(str)))
    return out


def tuning_aurocs(
    runtime: SiteRuntime, release: ModelRelease, rows: Mapping[str, pa.Table], cfg: EvalConfig, progress: bool
) -> dict[str, float]:
    """Per task key, the tuning AUROC of the probe fitted on train (C chosen on tuning) on
    `release`'s embeddings (every distinct row embedded once for all tasks); NaN where a split
    holds one class."""
    keys = [pa.table({"subject_id": t["subject_id"], "prediction_time": t["prediction_time"]}) for t in rows.values()]
    union = pa.concat_tables(keys).group_by(["subject_id", "prediction_time"]).aggregate([])
    x_all = embed_rows_at_site(runtime, release, union, cfg.max_events, cfg.max_patches, cfg.batch_size, progress).x
    where = {
        (s, t): i for i, (s, t) in enumerate(zip(union["subject_id"].to_pylist(), union["prediction_time"].to_pylist()))
    }
    out: dict[str, float] = {}
    for key, table in rows.items():
        y = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
        split = table["split"].to_numpy(zero_copy_only=False)
        train, tune = split == "train", split == "tuning"
        if not (0 < y[train].sum() < train.sum() and 0 < y[tune].sum() < tune.sum()):
            out[key] = float("nan")
            continue
        pos = [where[k] for k in zip(table["subject_id"].to_pylist(), table["prediction_time"].to_pylist())]
        x = x_all[pos]
        probe = fit_logistic_probe(x[train], y[train], x[tune], y[tune])
        out[key] = float(auroc(y[tune], probe.predict_proba(x[tune])))
    return out


def personalise_at_site(
    runtime: SiteRuntime,
    release: ModelRelease,
    cfg: EvalConfig,
    out: Path,
    steps: Sequence[int] = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: bool = False,
) -> Personalised:
    """Adapt the release on the site's train split, choose the steps on its tuning split, write
    the kept weights to `out` (refused when it exists: nothing is trained then)."""
    if out.exists():
        raise UseError(f"{out}: already exists (choose another --out, or remove it)")
    counts = candidate_steps(steps)
    setup = release.setup
    groups = [g for g in runtime.groups if g in setup.groups]
    run = LocalRun(lr=lr, weight_decay=WEIGHT_DECAY, batch_size=batch_size, max_events=cfg.max_events,
                   max_patches=cfg.max_patches)  # fmt: skip
    dataset = run.dataset(runtime.sequences(setup), runtime.split_ids()["train"], seed)
    if len(dataset) == 0:
        raise UseError(f"site {runtime.site.root}: no train-split subject has a timed observation to adapt on")
    rows = tuning_rows(runtime.labels(cfg), runtime)
    if not rows:
        raise UseError(
            f"site {runtime.site.root}: no binary task has train and tuning rows here to choose the steps on"
        )
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, drop_last=len(dataset) > batch_size)
    weights = last_round_weights(setup.model, max(1, release.meta.round))
    snapshots = adapt_snapshots(release.model, loader, run, counts, seed, groups, weights, progress)
    scores: dict[int, dict[str, float]] = {}
    for k, state in snapshots.items():
        scores[k] = tuning_aurocs(runtime, adapted(release, state), rows, cfg, progress)
        log.info("personalise: %d steps: tuning AUROC %s", k, scores[k])
    choice = choose_steps(scores)
    arrays = {name: value.numpy() for name, value in snapshots[choice.steps].items()}
    meta = {
        "site": runtime.name,
        "groups": groups,
        "steps": choice.steps,
        "tuning_auroc": {str(k): (v if np.isfinite(v) else None) for k, v in choice.tuning_auroc.items()},
        "tasks": choice.tasks,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
    }
    write_personal(out, arrays, release, meta)
    return Personalised(out=out, choice=choice, groups=groups, train_subjects=len(dataset))


def adapted(release: ModelRelease, state: Mapping[str, torch.Tensor]) -> ModelRelease:
    """The release with `state`'s weights in a copy of its model (eval mode)."""
    model = copy.deepcopy(release.model)
    model.load_state_dict({**model.state_dict(), **state})
    model.eval()
    return ModelRelease(path=release.path, meta=release.meta, setup=release.setup, model=model)


def describe(result: Personalised) -> str:
    """What `personalise` prints: every candidate's tuning AUROC and the steps kept."""
    lines = [
        f"personalised on {result.train_subjects} train subjects (groups {', '.join(result.groups)}); "
        f"mean tuning AUROC over {len(result.choice.tasks)} task(s):"
    ]
    for k, v in sorted(result.choice.tuning_auroc.items()):
        mark = "  <- kept" if k == result.choice.steps else ""
        lines.append(f"  {k:>5} local steps: {v:.4f}{mark}" if np.isfinite(v) else f"  {k:>5} local steps: n/a{mark}")
    if not result.choice.tasks:
        lines.append(
            "no task has both classes in this site's train and tuning splits: nothing to choose on, "
            f"so the fewest steps offered ({result.choice.steps}) are kept"
        )
    lines.append(f"-> {result.out} (use it with embed / probe / predict --personal {result.out})")
    return "\n".join(lines)


__all__ = ["DEFAULT_STEPS", "Personalised", "adapted", "describe", "personalise_at_site"]
