"""One site's personalised model in a simulation (issue 68): the federated model after local steps
on the site's own train split, the count chosen on its tuning split, scored on its held-out rows.

What a site does with `client.py personalise` (client/personalise.py), here on a simulated site
for the evidence job (simulations/evidence_personal.py) and the comparison report
(simulations/report.py): healthfm_core/train/adapt.py trains once to the largest candidate,
keeping a snapshot at each count; each snapshot's probes are fitted on train, C chosen on tuning,
and scored on tuning and held_out; healthfm_core/eval/personal_choice.py keeps the count with the
best mean tuning AUROC (the fewest steps on a tie), or the site's local-only model where it is a
candidate and every adapted model is below it. The held-out scores of the kept model are the
site's `personalised` results; held_out plays no part in the choice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from healthfm_core.data.sequences.tokens import PretrainingDataset, make_loader
from healthfm_core.data.sites.site import Site
from healthfm_core.eval.metrics import auroc
from healthfm_core.eval.personal_choice import PersonalChoice, choose_steps
from healthfm_core.eval.runner import EvalSet, MethodFeatures, MethodResult, evaluate_method_splits, method_features
from healthfm_core.protocol import groups_for_modalities, site_seed
from healthfm_core.terms.objective_weights import ObjectiveWeights
from healthfm_core.train.adapt import adapt_snapshots
from healthfm_core.train.local_run import LocalRun

METHOD = "personalised"
SEED_ROUND = 1_000_003  # the adaptation's seed stream (site_seed's round): after any round a run could have


def adapted_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with the adapted groups' weights."""
    out = copy.deepcopy(model)
    out.load_state_dict({**out.state_dict(), **state})
    return out


def tuning_aurocs(result: MethodResult) -> dict[str, float]:
    """Per task key, the probe's AUROC on the rows it scored (NaN where they hold one class)."""
    return {
        key: float(auroc(y, p)) if 0 < int(np.sum(y)) < len(y) else float("nan")
        for key, (y, p) in result.predictions.items()
    }


def personalise_site(
    model: torch.nn.Module,
    site: Site,
    dataset: PretrainingDataset,
    data: EvalSet,
    view: Callable[[torch.nn.Module], Any],
    steps: Sequence[int],
    run: LocalRun,
    weights: ObjectiveWeights,
    seed: int,
    eval_settings: Mapping[str, Any],
    n_boot: int,
    federated: MethodFeatures | None = None,
    local_only: MethodFeatures | None = None,
) -> tuple[MethodResult, PersonalChoice]:
    """The site's personalised held-out results and the choice. `model`: the federated model;
    `dataset`: the site's train split; `data`: its evaluation rows; `view`: what the probes read of
    a model; `eval_settings`: method_features' max_events, max_patches, batch_size; `federated`:
    the federated model's features on `data` where already computed (the 0-step candidate);
    `local_only`: the site's local-only model's features on `data`, a candidate too (kept when
    every adapted model is below it on tuning; personal_choice.py)."""
    name = data.sites[0].name
    groups = groups_for_modalities([m for m in site.modalities if site.subject_counts.get(m, 0) > 0])
    stream = site_seed(seed, SEED_ROUND, name)
    loader = make_loader(
        dataset, batch_size=run.batch_size, shuffle=True, seed=stream, drop_last=len(dataset) > run.batch_size
    )
    snapshots = adapt_snapshots(model, loader, run, steps, stream, groups, weights)
    results: dict[int, dict[str, MethodResult]] = {}
    for k, state in snapshots.items():
        feats = (
            federated
            if k == 0 and federated is not None
            else method_features(data, view(adapted_model(model, state)), **eval_settings)
        )
        results[k] = evaluate_method_splits(
            f"{METHOD} ({k} steps)",
            data,
            feats,
            ("held_out", "tuning"),
            n_boot={"held_out": n_boot, "tuning": 1},
            seed=seed,
        )
    splits = {"held_out": n_boot, "tuning": 1}
    local = None
    if local_only is not None:
        local = evaluate_method_splits("local-only", data, local_only, tuple(splits), n_boot=splits, seed=seed)
    choice = choose_steps(
        {k: tuning_aurocs(r["tuning"]) for k, r in results.items()},
        local_only=None if local is None else tuning_aurocs(local["tuning"]),
    )
    kept = local["held_out"] if local is not None and choice.local_only else results[choice.steps]["held_out"]
    personal = MethodResult(
        rows=[r.model_copy(update={"method": METHOD}) for r in kept.rows],
        predictions=kept.predictions,
        scored_rows=kept.scored_rows,
        skipped=kept.skipped,
    )
    return personal, choice


__all__ = ["METHOD", "adapted_model", "personalise_site", "tuning_aurocs"]
