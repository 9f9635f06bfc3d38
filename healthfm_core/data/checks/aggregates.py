"""What the check keeps across a site's record batches: per-subject and per-code aggregates only."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class SiteAggregates:
    """Everything the check keeps across batches: per-subject and per-code aggregates only."""

    def __init__(self) -> None:
        self.n_events = 0
        self.time_min: int | None = None
        self.time_max: int | None = None
        self.codes_seen: set[str] = set()
        self.prs_traits: set[str] = set()
        self.shard_subjects: list[tuple[str, np.ndarray]] = []  # (file, sorted unique ids)
        self.ehr_subjects: list[np.ndarray] = []
        self.prs_subjects: list[np.ndarray] = []
        self.wear_subjects: list[tuple[str, np.ndarray]] = []
        self.n_wear_epochs = 0
        # A shard that could not be read leaves the subject set incomplete: checks that need
        # every subject (splits naming unknown subjects) would only echo that first problem.
        self.subjects_incomplete = False

    def subjects(self) -> np.ndarray:
        arrays = [a for _, a in self.shard_subjects]
        return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)

    @staticmethod
    def _union(arrays: Iterable[np.ndarray]) -> np.ndarray:
        arrays = list(arrays)
        return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)

    def modality_subjects(self) -> dict[str, np.ndarray]:
        return {
            "ehr": self._union(self.ehr_subjects),
            "wearables": self._union(a for _, a in self.wear_subjects),
            "genomics": self._union(self.prs_subjects),
        }
