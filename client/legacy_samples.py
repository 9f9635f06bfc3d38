"""The record of released evaluation samples of sites from before the release gate
(client/release_gate.py): STATE_DIR/released_eval_samples.json, kept and read, never written.

Before the gate a site remembered each split's subject sample of every evaluation it answered
and refused an evaluation whose sample differed from one of them by 1 to minimum - 1 subjects.
The gate records task keys' rows instead, and knows nothing of those earlier evaluations; so,
where the file exists, an evaluation is still refused whole (`near_earlier_sample`) when a
split's sample differs from one of its samples by 1 to minimum - 1 subjects, as it was: the
site's earlier releases stay covered pairwise, and everything released since by the gate. A
file that does not read fails closed, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.data.files.layout import SPLITS
from healthfm_core.strict_files import StrictFileError, strict_model

RELEASED_SAMPLES_FILE = "released_eval_samples.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["healthfm-released-eval-samples"]
    version: Literal[1]
    samples: list[dict[Literal["train", "tuning", "held_out"], list[int]]]  # each split's subject ids, sorted


class LegacySamplesError(RuntimeError):
    """The record could not be read; no evaluation is answered until it can."""


Sample = dict[str, np.ndarray]  # split -> its subject ids, sorted and distinct


def _sample(chosen: Mapping[Any, Any]) -> Sample:
    return {split: np.unique(np.asarray(chosen[split], dtype=np.int64)) for split in SPLITS}


class LegacySamples:
    """The subject samples a site released metrics over before the release gate (read only)."""

    def __init__(self, state_dir: Path | None) -> None:
        # Read once: nothing writes it any more.
        self.path = Path(state_dir) / RELEASED_SAMPLES_FILE if state_dir is not None else None
        self._samples: list[Sample] = self._read()

    def _read(self) -> list[Sample]:
        if self.path is None or not self.path.exists():
            return []
        try:
            record = strict_model(_Record, self.path.read_bytes(), self.path)
        except (OSError, StrictFileError, UnicodeDecodeError) as err:
            raise LegacySamplesError(f"{self.path}: unreadable ({err})") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "<top level>"
            raise LegacySamplesError(f"{self.path}: field {where}: {first.get('msg')}") from None
        if missing := [i for i, sample in enumerate(record.samples) if set(sample) != set(SPLITS)]:
            raise LegacySamplesError(f"{self.path}: field samples.{missing[0]}: needs the splits {', '.join(SPLITS)}")
        return [_sample(sample) for sample in record.samples]

    def closest(self, chosen: Mapping[str, np.ndarray]) -> tuple[str, int] | None:
        """(split, n): the fewest subjects, n > 0, by which a split of `chosen` (split -> subject
        ids) differs from the same split of a released sample; None when no split differs from
        any (the same sample again, or none released)."""
        new = _sample(chosen)
        sizes = [
            (len(np.setxor1d(new[split], old[split], assume_unique=True)), split)
            for old in self._samples
            for split in SPLITS
        ]
        differ = [(n, split) for n, split in sizes if n]
        if not differ:
            return None
        n, split = min(differ)
        return split, n


__all__ = ["RELEASED_SAMPLES_FILE", "LegacySamples", "LegacySamplesError"]
