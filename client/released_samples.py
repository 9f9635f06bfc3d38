"""The subject sets this site has released evaluation metrics over, and the check that keeps two
evaluations from differing by a few subjects.

An evaluation's held-out metrics (rows, positives, AUROC, the score histogram) describe the
subjects it scored, at least the site's minimum of them (`min_report_subjects`). Two evaluations
whose subject sets differ by a few subjects describe those few by difference: with a subject
budget, the keyed sample of K + 1 subjects holds the K of a budget of K (a larger budget keeps the
smaller one's subjects, healthfm_core/eval/subject_sample.py), so a coordinator that asks for K
and then for K + 1 learns, from the held-out positives alone, whether subject K + 1 had the
outcome, for every task; a budget of N - 1 against every subject does the same, and so do two
evaluations around a data refresh that added one subject.

The train and tuning splits count too: a reply's withheld tasks carry each split's rows,
subjects and positives, and `num_examples` the rows embedded, so a train sample one subject
larger (the held-out split already whole) would give that subject's rows and outcome away.

So before an evaluation the site compares its sample, split by split, with every sample it has
released over: the same sets again are fine (every round of a run), and so are sets that differ
by at least the minimum; a split that differs by 1 to minimum - 1 subjects refuses the whole
evaluation for every task (`near_earlier_sample`), before anything is labelled or scored.

What it does not stop: a combination of three or more evaluations whose pairwise differences are
large (noise would; none is added), and two task definitions whose cohorts differ by a few
subjects on one sample.

The samples live in `state_dir`/released_eval_samples.json (the site's own file; subject ids never
leave the site), else in memory for the process. A file that does not read fails closed: the
evaluation errors, naming the file, until the site admin fixes or removes it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.data.files.layout import SPLITS
from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import StrictFileError, strict_model

RELEASED_SAMPLES_FILE = "released_eval_samples.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["healthfm-released-eval-samples"]
    version: Literal[1]
    samples: list[dict[Literal["train", "tuning", "held_out"], list[int]]]  # each split's subject ids, sorted


class ReleasedSamplesError(RuntimeError):
    """The record could not be read or written; no evaluation is answered until it can."""


Sample = dict[str, np.ndarray]  # split -> its subject ids, sorted and distinct


def _sample(chosen: Mapping[Any, Any]) -> Sample:
    return {split: np.unique(np.asarray(chosen[split], dtype=np.int64)) for split in SPLITS}


class ReleasedSamples:
    """The subject samples a site has released metrics over (module docstring)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = Path(state_dir) / RELEASED_SAMPLES_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._samples: list[Sample] = self._read()

    def _read(self) -> list[Sample]:
        if self.path is None or not self.path.exists():
            return []
        try:
            record = strict_model(_Record, self.path.read_bytes(), self.path)
        except (OSError, StrictFileError, UnicodeDecodeError) as err:
            raise ReleasedSamplesError(f"{self.path}: unreadable ({err})") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "<top level>"
            raise ReleasedSamplesError(f"{self.path}: field {where}: {first.get('msg')}") from None
        if missing := [i for i, sample in enumerate(record.samples) if set(sample) != set(SPLITS)]:
            raise ReleasedSamplesError(f"{self.path}: field samples.{missing[0]}: needs the splits {', '.join(SPLITS)}")
        return [_sample(sample) for sample in record.samples]

    def closest(self, chosen: Mapping[str, np.ndarray]) -> tuple[str, int] | None:
        """(split, n): the fewest subjects, n > 0, by which a split of `chosen` (split -> subject
        ids) differs from the same split of a released sample; None when no split differs from
        any (the same sample again, or none released)."""
        new = _sample(chosen)
        with self._lock:
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

    def record(self, chosen: Mapping[str, np.ndarray]) -> None:
        """Remember `chosen` as released over (written before the reply leaves)."""
        new = _sample(chosen)
        with self._lock:
            if any(all(np.array_equal(new[s], old[s]) for s in SPLITS) for old in self._samples):
                return
            samples = [*self._samples, new]
            if self.path is not None:
                record = _Record.model_validate(
                    {
                        "format": "healthfm-released-eval-samples",
                        "version": 1,
                        "samples": [{split: ids.tolist() for split, ids in sample.items()} for sample in samples],
                    }
                )
                try:
                    atomic_write_text(self.path, record.model_dump_json() + "\n")
                except OSError as err:
                    raise ReleasedSamplesError(
                        f"{self.path}: not written ({err}); the evaluation is not answered"
                    ) from None
            self._samples = samples


__all__ = ["RELEASED_SAMPLES_FILE", "ReleasedSamples", "ReleasedSamplesError"]
