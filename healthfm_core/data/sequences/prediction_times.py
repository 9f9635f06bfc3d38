"""A site's unlabelled samples at given (subject, prediction time) rows: what evaluation embeds."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.tokens import Sample, SiteSequences


class PredictionTimesDataset(Dataset):
    """Unlabelled samples of a site at given (subject_id, prediction_time µs) rows, in order."""

    labelled = False

    def __init__(
        self,
        seqs: SiteSequences,
        subject_ids: np.ndarray,
        prediction_time_us: np.ndarray,
        max_events: int,
        max_patches: int,
    ) -> None:
        if len(subject_ids) != len(prediction_time_us):
            raise ValueError(f"{len(subject_ids)} subject ids but {len(prediction_time_us)} prediction times")
        self.index = seqs.index_of(subject_ids)
        self.pt_us = np.asarray(prediction_time_us, dtype=np.int64)
        self.seqs, self.max_events, self.max_patches = seqs, max_events, max_patches

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        return self.seqs.sample(int(self.index[i]), int(self.pt_us[i]), self.max_events, self.max_patches)

    def batch(self, indices: list[int]) -> Batch:
        """`collate([self[i] for i in indices])`, built at once (`SiteSequences.batch`)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self.seqs.batch(self.index[rows], self.pt_us[rows], self.max_events, self.max_patches)
