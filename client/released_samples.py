"""The held-out subject sets this site has released evaluation metrics over, and the check that
keeps two evaluations from differing by a few subjects.

An evaluation's held-out metrics (rows, positives, AUROC, the score histogram) describe the
subjects it scored, at least the site's minimum of them (`min_report_subjects`). Two evaluations
whose subject sets differ by a few subjects describe those few by difference: with a subject
budget, the keyed sample of K + 1 subjects holds the K of a budget of K (a larger budget keeps the
smaller one's subjects, healthfm_core/eval/subject_sample.py), so a coordinator that asks for K
and then for K + 1 learns, from the held-out positives alone, whether subject K + 1 had the
outcome, for every task; a budget of N - 1 against every subject does the same, and so do two
evaluations around a data refresh that added one subject.

So before an evaluation the site compares its held-out subjects with every set it has released
over: the same set again is fine (every round of a run), and so is a set that differs by at least
the minimum; one that differs by 1 to minimum - 1 subjects is refused for every task
(`near_earlier_sample`), before anything is labelled or scored. What it does not stop: a
combination of three or more evaluations whose pairwise differences are large (noise would; none
is added), and two task definitions whose cohorts differ by a few subjects on one sample.

The sets live in `state_dir`/released_eval_samples.json (the site's own file; subject ids never
leave the site), else in memory for the process. A file that does not read fails closed: the
evaluation errors, naming the file, until the site admin fixes or removes it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import StrictFileError, strict_model

RELEASED_SAMPLES_FILE = "released_eval_samples.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["healthfm-released-eval-samples"]
    version: Literal[1]
    held_out: list[list[int]]  # each set's subject ids, sorted


class ReleasedSamplesError(RuntimeError):
    """The record could not be read or written; no evaluation is answered until it can."""


class ReleasedSamples:
    """The held-out subject sets a site has released metrics over (module docstring)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = Path(state_dir) / RELEASED_SAMPLES_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._sets: list[np.ndarray] = self._read()

    def _read(self) -> list[np.ndarray]:
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
        return [np.unique(np.asarray(ids, dtype=np.int64)) for ids in record.held_out]

    def closest(self, held_out: np.ndarray) -> int:
        """The fewest subjects by which `held_out` differs from a released set other than itself
        (the size of the symmetric difference); 0 when it is one of them or none was released."""
        ids = np.unique(np.asarray(held_out, dtype=np.int64))
        with self._lock:
            sizes = [len(np.setxor1d(ids, old, assume_unique=True)) for old in self._sets]
        return min((n for n in sizes if n), default=0)

    def record(self, held_out: np.ndarray) -> None:
        """Remember `held_out` as released over (written before the reply leaves)."""
        ids = np.unique(np.asarray(held_out, dtype=np.int64))
        with self._lock:
            if any(np.array_equal(ids, old) for old in self._sets):
                return
            sets = [*self._sets, ids]
            if self.path is not None:
                record = _Record(
                    format="healthfm-released-eval-samples", version=1, held_out=[s.tolist() for s in sets]
                )
                try:
                    atomic_write_text(self.path, record.model_dump_json() + "\n")
                except OSError as err:
                    raise ReleasedSamplesError(
                        f"{self.path}: not written ({err}); the evaluation is not answered"
                    ) from None
            self._sets = sets


__all__ = ["RELEASED_SAMPLES_FILE", "ReleasedSamples", "ReleasedSamplesError"]
