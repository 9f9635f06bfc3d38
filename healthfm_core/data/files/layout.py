"""The on-disk contract of a site root, in code: every module reads names from here, but for the
few the wire protocol shares (the modalities, the split names, the wearable channels:
healthfm_core/terms/site_layout.py).

A site root, as docs/architecture.md lays it out::

    data/**/*.parquet                MEDS DataSchema shards (e.g. data/train/0.parquet)
    metadata/codes.parquet           MEDS CodeMetadataSchema
    metadata/subject_splits.parquet  MEDS SubjectSplitSchema (optional: `hash_splits` instead)
    metadata/dataset.json            MEDS DatasetMetadataSchema
    wearables/**/*.parquet           WEARABLES_SCHEMA, one row per 30-second epoch

The MEDS paths come from the `meds` package, and the split names are MEDS's, so they follow the
standard.
Polygenic risk scores are MEDS rows with code `PRS//<trait>` and the standardised score in
numeric_value. A site's modalities: `wearables` when wearables/ holds rows, `genomics` when any
`PRS//` code exists, `ehr` when any other clinical code exists (healthfm_core.data.checks.site_check).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from meds import (
    SubjectSplitSchema,
    code_metadata_filepath,
    data_subdirectory,
    dataset_metadata_filepath,
    subject_splits_filepath,
)

from healthfm_core.data.files.site_paths import OutsideRootError, list_files
from healthfm_core.terms.site_layout import HELD_OUT_SPLIT, TRAIN_SPLIT, TUNING_SPLIT

# Folders and files under a site root (relative, posix separators).
DATA_SUBDIRECTORY: str = data_subdirectory  # "data"
CODE_METADATA_FILEPATH: str = code_metadata_filepath  # "metadata/codes.parquet"
SUBJECT_SPLITS_FILEPATH: str = subject_splits_filepath  # "metadata/subject_splits.parquet"
DATASET_METADATA_FILEPATH: str = dataset_metadata_filepath  # "metadata/dataset.json"
WEARABLES_SUBDIRECTORY = "wearables"

# Deterministic split used when metadata/subject_splits.parquet is absent (`hash_splits`).
DEFAULT_SPLIT_FRACTIONS = {TRAIN_SPLIT: 0.8, TUNING_SPLIT: 0.1, HELD_OUT_SPLIT: 0.1}

PRS_PREFIX = "PRS//"  # code of a polygenic risk score row: PRS_PREFIX + trait
# A hospital stay's edges as MIMIC-IV MEDS writes them (HOSPITAL_ADMISSION//<type>//<location>,
# HOSPITAL_DISCHARGE//<location>): the onset tasks' leakage guard reads stays from them.
ADMISSION_PREFIX = "HOSPITAL_ADMISSION//"
DISCHARGE_PREFIX = "HOSPITAL_DISCHARGE//"

# Wearables: one row per 30-second epoch, `time` its start on the 30-second grid.
EPOCH_SECONDS = 30
EPOCH_US = EPOCH_SECONDS * 1_000_000
WEARABLES_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us"), nullable=False),  # epoch start
        pa.field("enmo_mg", pa.float32(), nullable=False),
        pa.field("hr_bpm", pa.float32(), nullable=True),  # null: no PPG or no signal
    ]
)


class SiteLike(Protocol):
    """What the data pipeline reads from a site; healthfm_core.data.sites.site.Site is the real one."""

    @property
    def wearable_files(self) -> list[Path]: ...

    def iter_event_shards(
        self, columns: Sequence[str] | None = None, paths: Sequence[Path] | None = None, dictionary_code: bool = False
    ) -> Iterator[pa.Table]: ...

    def read_events(self, subject_ids: Any = None, columns: Sequence[str] | None = None) -> pa.Table: ...

    def read_wearables(self, subject_ids: Any = None) -> pa.Table: ...


def parquet_files(root: Path, subdirectory: str) -> list[Path]:
    """`root/subdirectory/**/*.parquet`, sorted by path (absent folder: none); OutsideRootError
    for a symbolic link among them that leaves the site root (healthfm_core.data.files.site_paths)."""
    files, escapes = list_files(root, subdirectory, ".parquet")
    if escapes:
        raise OutsideRootError(root, escapes[0])
    return files


def in_subject_order(paths: Sequence[Path]) -> list[Path]:
    """The files ordered by their smallest (subject_id, time), as their parquet statistics give
    them (footers only, no data), ties and files without statistics in path order, the latter
    last. Why: an export sharded by subject writes 0.parquet, 1.parquet, ... 10.parquet, whose
    path order (0, 1, 10, 11, ..., 2) is not subject order, so their rows, read file by file, were
    out of (subject, time) order and every reader sorted 10^7 epochs again; in subject order they
    concatenate sorted. Readers still check the order and sort when files overlap."""

    def key(path: Path) -> tuple[int, int, int, str]:
        try:
            meta = pq.ParquetFile(path).metadata
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            sid, time = names.index("subject_id"), names.index("time")
            firsts = []
            for g in range(meta.num_row_groups):
                s, t = meta.row_group(g).column(sid).statistics, meta.row_group(g).column(time).statistics
                if meta.row_group(g).num_rows == 0:
                    continue
                if s is None or t is None or not (s.has_min_max and t.has_min_max):
                    return (1, 0, 0, path.as_posix())
                firsts.append((int(s.min_raw), int(t.min_raw)))
            first = min(firsts) if firsts else (np.iinfo(np.int64).max, 0)
            return (0, first[0], first[1], path.as_posix())
        except (OSError, ValueError, TypeError, pa.ArrowException):  # the readers report a bad file
            return (1, 0, 0, path.as_posix())

    return sorted(paths, key=key)


def disjoint_subject_order(paths: Sequence[Path]) -> list[Path] | None:
    """The files in subject order when their parquet statistics (footers only) say that no two
    hold the same subject; None when two may (or a file has no statistics). Why: read in that
    order, shards named 0, 1, 10, ..., 2 join without moving a row, and the order among files
    that share no subject decides nothing (ties are only ever within one subject)."""
    by_file: dict[Path, tuple[int, int]] = {}
    try:
        for path in paths:
            meta = pq.ParquetFile(path).metadata
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            sid = names.index("subject_id")
            for g in range(meta.num_row_groups):
                if meta.row_group(g).num_rows == 0:
                    continue
                stats = meta.row_group(g).column(sid).statistics
                if stats is None or not stats.has_min_max:
                    return None
                lo, hi = by_file.get(path, (int(stats.min_raw), int(stats.max_raw)))
                by_file[path] = (min(lo, int(stats.min_raw)), max(hi, int(stats.max_raw)))
    except (OSError, ValueError, TypeError, pa.ArrowException):  # the readers report a bad file
        return None
    order = sorted(by_file, key=lambda path: by_file[path])
    if any(by_file[a][1] >= by_file[b][0] for a, b in zip(order[:-1], order[1:])):
        return None
    return order + [path for path in paths if path not in by_file]  # empty files: nothing to place


def run_values(grouped: np.ndarray) -> np.ndarray:
    """The value of each run of equal values: for ids grouped by subject (MEDS keeps a subject's
    rows together) the distinct subjects, in O(n) with one byte a row of scratch (np.unique's
    inverse took 8); a subject in two runs appears twice, so a union over parts deduplicates."""
    if len(grouped) == 0:
        return grouped[:0].copy()
    return grouped[np.r_[0, np.flatnonzero(grouped[1:] != grouped[:-1]) + 1]]


def hash_splits(subject_ids: np.ndarray) -> pa.Table:
    """Deterministic train/tuning/held_out split by a hash of subject_id (80/10/10).

    Used when a site ships no subject_splits.parquet; the same subject always lands in the same
    split, whatever order or subset of subjects is asked about.
    """
    ids = np.asarray(subject_ids, dtype=np.int64)
    x = ids.astype(np.uint64)
    # splitmix64 finaliser: consecutive ids spread uniformly (uint64 arithmetic wraps on purpose).
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    names = list(DEFAULT_SPLIT_FRACTIONS)
    edges = np.cumsum(list(DEFAULT_SPLIT_FRACTIONS.values()))
    which = np.minimum(np.searchsorted(edges, u, side="right"), len(names) - 1)
    split = np.asarray(names, dtype=object)[which]
    return pa.table(
        {"subject_id": pa.array(ids, pa.int64()), "split": pa.array(split.tolist(), pa.string())},
        schema=SubjectSplitSchema.schema(),
    )


__all__ = [
    "ADMISSION_PREFIX",
    "DISCHARGE_PREFIX",
    "CODE_METADATA_FILEPATH",
    "DATASET_METADATA_FILEPATH",
    "DATA_SUBDIRECTORY",
    "DEFAULT_SPLIT_FRACTIONS",
    "EPOCH_SECONDS",
    "EPOCH_US",
    "PRS_PREFIX",
    "SUBJECT_SPLITS_FILEPATH",
    "WEARABLES_SCHEMA",
    "WEARABLES_SUBDIRECTORY",
    "SiteLike",
    "disjoint_subject_order",
    "hash_splits",
    "parquet_files",
    "run_values",
]
