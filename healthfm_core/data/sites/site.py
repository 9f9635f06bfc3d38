"""Reading one site's data (a MEDS root plus the wearables sidecar, healthfm_core.data.files.layout).

`open_site` runs the check (healthfm_core.data.checks.site_check) and returns a `Site` to read from,
or raises `SiteDataError` listing every error; errors confined to the site's own task labels
(tasks/<task>/) are logged and leave the site open (those tasks answer `invalid_labels`). Reads go to parquet on each call.

The reader, not the file, guarantees what the pipeline relies on: columns of MEDS's types
(a polars or pandas export is read cast, healthfm_core.data.files.meds_align) and, in `read_events`,
each subject's rows contiguous with its static rows (null time) first, then in time order.
Every file is opened as untrusted input (healthfm_core.data.files.parquet_guard, site_paths): a footer
claiming rows its bytes cannot hold, or a link out of the site root, is refused by name, before
pyarrow allocates for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from meds import CodeMetadataSchema, DataSchema, SubjectSplitSchema

from healthfm_core.data.checks.problem_log import LABEL_ERROR_KINDS, SiteProblem, SiteReport, SiteSummary
from healthfm_core.data.checks.site_check import run_check
from healthfm_core.data.files.layout import (
    CODE_METADATA_FILEPATH,
    DATA_SUBDIRECTORY,
    DATASET_METADATA_FILEPATH,
    SUBJECT_SPLITS_FILEPATH,
    WEARABLES_SCHEMA,
    WEARABLES_SUBDIRECTORY,
    hash_splits,
    in_subject_order,
    parquet_files,
)
from healthfm_core.data.files.meds_align import align_table, sort_events
from healthfm_core.data.files.parquet_guard import open_parquet, read_parquet
from healthfm_core.data.files.site_paths import require_inside
from healthfm_core.data.sequences.wear_patches import sorted_by_subject_time
from healthfm_core.strict_files import read_json
from healthfm_core.terms.site_layout import HELD_OUT_SPLIT, MODALITIES

logger = logging.getLogger(__name__)


class SiteDataError(Exception):
    """Raised by `open_site` when a site has errors; `.problems` holds every problem."""

    def __init__(self, problems: Sequence[SiteProblem], root: str | Path | None = None):
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        n = sum(p.count for p in errors)  # true count: an "and N more" line stands for N
        head = f"site {root} has {n} error(s)" if root else f"{n} error(s)"
        super().__init__("\n".join([head + ":", *(str(p) for p in errors)]))


def _normalise_events(table: pa.Table, want_numeric: bool = True) -> pa.Table:
    """Give every shard the same core columns of MEDS's types: cast as MEDS's align casts
    (large_string code, float64 numeric_value, ...), numeric_value null float32 if absent."""
    table = align_table(table, DataSchema.schema())
    if want_numeric and "numeric_value" not in table.column_names:
        table = table.append_column(pa.field("numeric_value", pa.float32()), pa.nulls(table.num_rows, pa.float32()))
    return table


def _text_dictionary(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A dictionary column of text as dictionary<string> (its values cast, its indices kept);
    None for anything else (then the column is cast as any other)."""
    kind = column.type
    if not pa.types.is_dictionary(kind) or not (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        return None
    return pa.chunked_array(
        [pa.DictionaryArray.from_arrays(c.indices, c.dictionary.cast(pa.string())) for c in column.chunks],
        pa.dictionary(kind.index_type, pa.string()),
    )


class Site:
    """A validated site root. Build with `open_site`; reads go to parquet on each call."""

    def __init__(
        self, root: str | Path, report: SiteReport, subject_ids: np.ndarray, modality_subjects: dict[str, np.ndarray]
    ):
        if report.summary is None:
            raise SiteDataError(report.problems, root)
        self.root = Path(root)
        self.report = report
        self.summary: SiteSummary = report.summary
        self.subject_ids = subject_ids  # sorted unique subjects with rows in data/
        self._modality_subjects = modality_subjects
        self.data_files: list[Path] = parquet_files(self.root, DATA_SUBDIRECTORY)
        # In subject order, so that files sharded by subject read in (subject, time) order.
        self.wearable_files: list[Path] = in_subject_order(parquet_files(self.root, WEARABLES_SUBDIRECTORY))

    def __repr__(self) -> str:
        return f"Site({str(self.root)!r}, subjects={self.summary.n_subjects}, modalities={self.modalities})"

    @property
    def modalities(self) -> list[str]:
        return list(self.summary.modalities)

    @property
    def subject_counts(self) -> dict[str, int]:
        return dict(self.summary.subjects_per_modality)

    def modality_subjects(self, modality: str) -> np.ndarray:
        """Sorted subject ids that have data of one modality ("ehr", "wearables", "genomics")."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return self._modality_subjects[modality]

    def iter_event_shards(
        self, columns: Sequence[str] | None = None, paths: Sequence[Path] | None = None, dictionary_code: bool = False
    ) -> Iterator[pa.Table]:
        """One MEDS shard at a time (all columns by default, numeric_value always present), in file
        order or in the order of `paths` (some of data_files; use `read_events` for the reading
        order). `dictionary_code`: the code column comes dictionary-encoded (dictionary<string>),
        as parquet stores it: a shard's few distinct codes are not expanded into a string a row
        (the tokeniser looks up the dictionary only)."""
        read_dictionary = ["code"] if dictionary_code and (columns is None or "code" in columns) else None
        for path in self.data_files if paths is None else paths:
            table = read_parquet(path, self.root, columns=self._present(path, columns), read_dictionary=read_dictionary)
            yield self._shape(table, columns, keep_dictionary=dictionary_code)

    def read_events(self, subject_ids: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """Events of the given subjects (all if None), shards in path order; within a shard each
        subject's rows are contiguous, static rows (null time) first, then by time (ties in file
        order), whatever order the file has them in (when `columns` include subject_id and time)."""
        wanted = None if subject_ids is None else pa.array(np.asarray(list(subject_ids), dtype=np.int64))
        tables = []
        for path in self.data_files:
            if wanted is not None:
                table = read_parquet(
                    path,
                    self.root,
                    columns=self._present(path, columns),
                    filters=pc.is_in(pc.field("subject_id"), value_set=wanted),
                )
            else:
                table = read_parquet(path, self.root, columns=self._present(path, columns))
            table = self._shape(table, columns)
            if "subject_id" in table.column_names and "time" in table.column_names:
                table = sort_events(table)
            tables.append(table)
        if not tables:
            raise SiteDataError([], self.root)
        return pa.concat_tables(tables, promote_options="default")

    def read_wearables(self, subject_ids: Iterable[int] | None = None) -> pa.Table:
        """Wearable epochs (WEARABLES_SCHEMA) sorted by subject and time; empty if none."""
        wanted = None if subject_ids is None else pa.array(np.asarray(list(subject_ids), dtype=np.int64))
        tables = []
        for path in self.wearable_files:
            kwargs: dict[str, Any] = {"columns": WEARABLES_SCHEMA.names}
            if wanted is not None:
                kwargs["filters"] = pc.is_in(pc.field("subject_id"), value_set=wanted)
            tables.append(read_parquet(path, self.root, **kwargs).cast(WEARABLES_SCHEMA))
        if not tables:
            return WEARABLES_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        if sorted_by_subject_time(table):  # the usual case: skip a sort of 10^7 rows
            return table
        return table.sort_by([("subject_id", "ascending"), ("time", "ascending")])

    def subject_splits(self) -> pa.Table:
        """(subject_id, split) for every subject; a deterministic hash split if no file."""
        path = self.root / SUBJECT_SPLITS_FILEPATH
        if path.is_file():
            table = read_parquet(path, self.root, columns=["subject_id", "split"])
            return align_table(table, SubjectSplitSchema.schema())
        return hash_splits(self.subject_ids)

    def held_out_subjects(self) -> np.ndarray:
        """The subject ids of the held_out split (subject_splits): scored on every labelled row."""
        splits = self.subject_splits()
        held = pc.equal(splits["split"], HELD_OUT_SPLIT)
        return splits.filter(held)["subject_id"].to_numpy(zero_copy_only=False).astype(np.int64)

    def code_metadata(self) -> pa.Table:
        """metadata/codes.parquet, or an empty table with the MEDS schema if absent."""
        path = self.root / CODE_METADATA_FILEPATH
        if path.is_file():
            return align_table(read_parquet(path, self.root), CodeMetadataSchema.schema())
        return CodeMetadataSchema.schema().empty_table()

    def dataset_metadata(self) -> dict[str, Any]:
        path = self.root / DATASET_METADATA_FILEPATH
        return read_json(require_inside(self.root, path)) if path.is_file() else {}

    def _present(self, path: Path, columns: Sequence[str] | None) -> list[str] | None:
        """Requested columns that the shard has (numeric_value is added later if missing)."""
        if columns is None:
            return None
        names = set(open_parquet(path, self.root).schema_arrow.names)
        missing = [c for c in columns if c not in names and c != "numeric_value"]
        if missing:
            raise KeyError(f"{path}: no column(s) {missing}")
        return [c for c in columns if c in names]

    @staticmethod
    def _shape(table: pa.Table, columns: Sequence[str] | None, keep_dictionary: bool = False) -> pa.Table:
        at = table.schema.get_field_index("code")
        code = _text_dictionary(table.column(at)) if keep_dictionary and at >= 0 else None
        if code is not None:  # MEDS's string type on the dictionary's values, not on every row
            table = table.remove_column(at)
        table = _normalise_events(table, want_numeric=columns is None or "numeric_value" in columns)
        if code is not None:
            table = table.add_column(at, "code", code)
        return table if columns is None else table.select(list(columns))


def open_site(root: str | Path, progress: bool = False, strict: bool = False) -> Site:
    """Check a site and open it for reading; raises SiteDataError listing every error."""
    report, subjects = run_check(root, progress, strict)
    if report.summary is None or any(
        p.severity == "error" and p.kind not in LABEL_ERROR_KINDS for p in report.problems
    ):
        raise SiteDataError(report.problems, root)
    # A bad label file refuses its task, not the site: each problem is logged here, naming the
    # file, and the evaluation answers that task `invalid_labels` (healthfm_core.eval.site_eval).
    for p in report.problems:
        if p.severity == "error":
            logger.error("site %s: %s (that task is reported as invalid_labels; the others run)", root, p)
    if report.warnings:
        logger.warning(
            "site %s: %d warning(s), e.g. %s (see `client.py check`)", root, report.n_warnings, report.warnings[0]
        )
    return Site(root, report, subjects.subject_ids, subjects.per_modality)


__all__ = ["Site", "SiteDataError", "open_site"]
