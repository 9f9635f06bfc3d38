"""Several sites' pretraining datasets as one: the centralized baseline pools the sites."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import ConcatDataset

from healthfm_core.data.sequences.tokens import PretrainingDataset


class PooledPretrainingDataset(ConcatDataset):
    """Several sites' PretrainingDatasets as one; `set_epoch` reaches every part, so random
    prediction times change per pass and a resumed run replays the same draws."""

    labelled = False

    def __init__(self, parts: Sequence[PretrainingDataset]) -> None:
        if not parts:
            raise ValueError("PooledPretrainingDataset needs at least one site's dataset")
        super().__init__(list(parts))
        self.parts = list(parts)  # self.datasets typed as PretrainingDatasets (same objects)

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)
