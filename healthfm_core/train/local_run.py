"""One local training run from the federation's settings: what a site trains in a round
(client/site_runtime.py SiteRuntime.train) and what the matched-budget baselines train
(simulations/report.py train_baseline, train_datasets), mapped in one place so they stay in step.

The settings are the federation's lr, weight_decay, batch_size (the optimiser and its batches) and
max_events, max_patches (how each subject's sample is cut); a site reads them from its round's
RoundConfig, a baseline from the job's federation config. Steps, seed and logging are the
caller's: a site trains local_steps at its round's seed, a baseline its matched budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences
from healthfm_core.train.trainer import TrainConfig


@dataclass(frozen=True)
class LocalRun:
    """The federation's settings of one local training run."""

    lr: float
    weight_decay: float
    batch_size: int
    max_events: int
    max_patches: int

    @classmethod
    def of(cls, settings: Any) -> LocalRun:
        """From anything with the federation's field names: a RoundConfig (a site's round), a
        FederationConfig or the jobs' Hydra `federation` group (a baseline)."""
        return cls(
            lr=float(settings.lr),
            weight_decay=float(settings.weight_decay),
            batch_size=int(settings.batch_size),
            max_events=int(settings.max_events),
            max_patches=int(settings.max_patches),
        )

    def dataset(
        self, sequences: SiteSequences, subject_ids: Sequence[int] | np.ndarray, seed: int
    ) -> PretrainingDataset:
        """The subjects' pretraining samples: each subject's history up to a random event time
        (drawn from `seed`), cut to the federation's max_events and max_patches."""
        return PretrainingDataset(
            sequences,
            subject_ids=subject_ids,
            time_mode="random",
            max_events=self.max_events,
            max_patches=self.max_patches,
            seed=seed,
        )

    def train_config(
        self, steps: int, seed: int, *, log_every: int, progress: bool = False, proximal_mu: float = 0.0
    ) -> TrainConfig:
        """`steps` steps of the federation's optimiser settings (AdamW at lr and weight_decay;
        batch_size for the caller's loader)."""
        return TrainConfig(
            steps=steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=seed,
            progress=progress,
            log_every=log_every,
            proximal_mu=proximal_mu,
        )


__all__ = ["LocalRun"]
