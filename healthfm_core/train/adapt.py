"""Site adaptation (personalisation): local steps on one site's own train split after the
federation's last round, starting from the federated weights.

This is FedAvg followed by local fine-tuning, the field's plainest personalisation and a strong
one (each site keeps the shared model's start and moves it towards its own population). The same
self-supervised pretraining objectives train it, so a site needs no labels to adapt; only the
choice of how many steps to keep reads labels, and only the tuning split's
(`healthfm_core.eval.personal_choice`). 0 steps is a candidate: the federated model unchanged.

`adapt_snapshots` trains once, to the largest candidate, and keeps the trained groups' weights at
every candidate count on the way (the trainer continues exactly where a piece stopped, so the
snapshot at k steps is the model a k-step run would give). Nothing here leaves the site: the
adapted weights are the site's own (client.py personalise writes them next to the release).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.terms.groups import group_state_dict
from healthfm_core.terms.model_config import ModelConfig
from healthfm_core.terms.objective_weights import ObjectiveWeights, curriculum_weights
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import TrainState, train_local


def candidate_steps(steps: Iterable[int]) -> list[int]:
    """The candidate step counts, sorted and distinct; each must be >= 0."""
    counts = sorted({int(s) for s in steps})
    if not counts or counts[0] < 0:
        raise ValueError(f"adaptation step counts must be a non-empty list of integers >= 0, got {list(steps)}")
    return counts


def last_round_weights(model_config: ModelConfig, rounds: int) -> ObjectiveWeights:
    """The objective weights of a run's last round (the server's curriculum at round `rounds` of
    `rounds`): what a site's local steps after the run continue with."""
    if rounds < 1:
        raise ValueError(f"a run has at least one round, got {rounds}")
    return curriculum_weights(rounds - 1, rounds, model_config)


def adapt_snapshots(
    model: torch.nn.Module,
    data: Iterable[Batch],
    run: LocalRun,
    steps: Sequence[int],
    seed: int,
    groups: Sequence[str],
    weights: ObjectiveWeights,
    progress: bool = False,
) -> dict[int, dict[str, torch.Tensor]]:
    """{k: the `groups`' state_dict entries (CPU copies) after k local steps from `model`'s
    weights} for every candidate k in `steps` (0: `model`'s own). `model` is not changed: a copy
    trains. `data`: the site's train batches (run.batch_size each), re-iterated as needed."""
    counts = candidate_steps(steps)
    work = copy.deepcopy(model)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    if counts[0] == 0:
        snapshots[0] = {
            k: v.detach().to("cpu", copy=True) for k, v in group_state_dict(work.state_dict(), groups).items()
        }
    total = counts[-1]
    if total == 0:
        return snapshots
    cfg = run.train_config(total, seed, log_every=total, progress=progress)
    state: TrainState | None = None
    done = 0
    for k in (c for c in counts if c > 0):
        result: Any = train_local(
            work, data, cfg, groups=groups, weights_fn=weights, start_step=done, state=state, stop_step=k
        )
        state, done = result.state, k
        snapshots[k] = result.group_state
    return snapshots


__all__ = ["adapt_snapshots", "candidate_steps", "last_round_weights"]
