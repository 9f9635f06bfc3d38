"""The subject sample a capped federated evaluation scores (EvalConfig.max_subjects).

A site ranks the subjects of each split (train, tuning, held_out) by a keyed hash of subject_id
(the run's seed is the key) and takes the first `max_subjects`; the evaluation labels, embeds,
fits on (train, tuning) and scores (held_out) every row of those subjects, all tasks alike. The
rank depends on the subject id and the key only, never on the model, the round or the other
subjects, so every evaluation of a run scores the same subjects (round-to-round numbers are
paired), a larger budget keeps the smaller one's subjects, and the ids never leave the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthfm_core.data.labels.tasks import _mix64  # the splitmix64 finaliser the visit times use
from healthfm_core.terms.site_layout import SPLITS

# Salt of the rank's hash: its own stream, apart from the visit prediction times' (same seed).
_SAMPLE_SALT = np.uint64(0x5EED_CA95_0B1E_C7ED)
_GOLDEN = 0x9E3779B97F4A7C15


def subject_rank(subject_ids: np.ndarray, key: int) -> np.ndarray:
    """The keyed hash that orders subjects (uint64; lower first)."""
    k = np.uint64((int(key) * _GOLDEN) % 2**64) ^ _SAMPLE_SALT
    return _mix64(_mix64(np.asarray(subject_ids).astype(np.int64).view(np.uint64) ^ k))


def sample_subjects(subject_ids: np.ndarray, max_subjects: int, key: int) -> np.ndarray:
    """The min(max_subjects, n) distinct subjects of `subject_ids` first in the keyed order,
    sorted by id; every distinct subject when max_subjects is 0."""
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    if max_subjects < 0:
        raise ValueError(f"max_subjects: value {max_subjects}: must be >= 0 (0: every subject)")
    if max_subjects == 0 or len(ids) <= max_subjects:
        return ids
    order = np.lexsort((ids, subject_rank(ids, key)))  # ties (never seen in practice) by id
    return np.sort(ids[order[:max_subjects]])


@dataclass(frozen=True)
class SubjectSample:
    """A site's evaluation sample: per split, the subjects chosen of those the split has."""

    max_subjects: int  # 0: every subject
    chosen: dict[str, np.ndarray]  # per split: the chosen subject ids, sorted
    available: dict[str, int]  # per split: the subjects the split has

    def subjects(self) -> np.ndarray:
        """Every chosen subject, sorted (what the site labels and embeds)."""
        return np.sort(np.concatenate([self.chosen[s] for s in SPLITS]))

    def keep(self, table: pa.Table) -> pa.Table:
        """The rows of `table` (a task's labels) of the chosen subjects, in order; the table
        itself without a budget."""
        if not self.max_subjects:
            return table
        return table.filter(pa.array(np.isin(table["subject_id"].to_numpy(), self.subjects())))


def draw_sample(split_ids: Mapping[str, np.ndarray], max_subjects: int, key: int) -> SubjectSample:
    """Per split (the site's subject_splits), at most `max_subjects` subjects (sample_subjects)."""
    return SubjectSample(
        max_subjects=max_subjects,
        chosen={s: sample_subjects(split_ids[s], max_subjects, key) for s in SPLITS},
        available={s: len(np.unique(split_ids[s])) for s in SPLITS},
    )


__all__ = ["SubjectSample", "draw_sample", "sample_subjects", "subject_rank"]
