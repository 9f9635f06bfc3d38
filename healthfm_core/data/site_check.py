"""Validating one site's data (a MEDS root plus the wearables sidecar): `client.py check`.

`check_site` validates a site root (healthfm_core.data.layout) in bounded memory (one record
batch at a time, keeping only per-subject aggregates) and never raises on bad data: every
problem becomes a `SiteProblem` naming file, column, row (0-based, within the file) or subject,
and the offending value. healthfm_core.data.site opens a site that passes for reading.

Conformance with MEDS uses the `meds` package's own schemas (DataSchema, CodeMetadataSchema,
SubjectSplitSchema, DatasetMetadataSchema), read as MEDS's own `align` reads them: a column whose
type casts losslessly to the schema's (large_string code, float64 numeric_value, timestamp[ns],
...; healthfm_core.data.meds_align) is accepted and read cast. The project's checks come on top:
subjects contiguous and their timed rows time-sorted within a shard (static rows, null time, may
sit anywhere within the subject: MEDS does not place them; the reader sorts them first), each
subject in one shard only, codes non-empty and listed in codes.parquet, values finite, wearable
epochs on the 30-second grid with plausible ranges, splits covering exactly the subjects, and the
site's own task labels (SITE_ROOT/tasks/<task>/, healthfm_core.data.site_labels) valid.

A number column of the data that is not numeric_value (a float column, or an integer one named
like `value`, `valuenum`, `result`) is read by nothing: a warning says how many values that
leaves unread, unless dataset.json declares the column (code modifier, raw source id, ...).

Files are untrusted input, opened as every reader opens them: a link out of the site root is
an error naming link and target (healthfm_core.data.site_paths), a parquet footer whose row counts
or column chunk sizes its file cannot hold is refused before anything is read, and one that
claims other rows than its pages hold is refused after the streaming pass counted them
(healthfm_core.data.parquet_guard); text that is not UTF-8 is an error naming file, column and row.

Problem counts are true counts: repeated problems of one kind in one file are cut to
MAX_PROBLEMS_PER_KIND lines plus one "and N more" line whose `count` is N.

Policy on codes missing from codes.parquet: MEDS allows incomplete code metadata (the
meds-testing-helpers samples have unlisted codes), so an unlisted code is a warning by
default and an error with `strict=True`; so are a missing codes.parquet or dataset.json.

Modalities: `wearables` when wearables/ holds rows, `genomics` when any `PRS//` code exists,
`ehr` when any other code exists, not counting MEDS_BIRTH / MEDS_DEATH: a genomics cohort
that records only birth dates beside its scores has nothing for the EHR encoder to learn from.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flexible_schema import SchemaValidationError, TableValidationError
from meds import (
    CodeMetadataSchema,
    DataSchema,
    DatasetMetadataSchema,
    SubjectSplitSchema,
    birth_code,
    death_code,
)
from pydantic import BaseModel, computed_field
from tqdm.auto import tqdm

from healthfm_core.data.layout import (
    CODE_METADATA_FILEPATH,
    DATA_SUBDIRECTORY,
    DATASET_METADATA_FILEPATH,
    EPOCH_SECONDS,
    EPOCH_US,
    MODALITIES,
    PRS_PREFIX,
    SUBJECT_SPLITS_FILEPATH,
    WEARABLES_SCHEMA,
    WEARABLES_SUBDIRECTORY,
    hash_splits,
    run_values,
)
from healthfm_core.data.meds_align import CastError, align_table, cast_problem
from healthfm_core.data.parquet_guard import ParquetFooterError, invalid_utf8_rows, is_text, open_parquet, show_bytes
from healthfm_core.data.site_labels import check_site_labels, site_tasks
from healthfm_core.data.site_paths import OutsideRoot, list_files, outside_root
from healthfm_core.strict_files import StrictFileError, read_json

logger = logging.getLogger(__name__)

HR_MIN_BPM = 20.0
HR_MAX_BPM = 250.0
# Codes that anchor a timeline without being clinical content (see the module docstring).
NON_EHR_CODES = (birth_code, death_code)

# Repeated problems of one kind in one file are cut to this many, plus an "and N more" line.
MAX_PROBLEMS_PER_KIND = 5
BATCH_ROWS = 1 << 17
_EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
# An integer column with one of these names holds measurements more likely than ids (a float
# column of any name does): MIMIC's valuenum, OMOP's value_as_number, common ETL names.
VALUE_LIKE_NAMES = frozenset(
    {
        "value",
        "values",
        "valuenum",
        "value_num",
        "numeric",
        "num_value",
        "numeric_val",
        "value_numeric",
        "value_as_number",
        "result",
        "result_value",
        "resultnum",
        "result_num",
        "lab_value",
        "measurement",
        "measurement_value",
        "amount",
        "val",
    }
)
# dataset.json keys that declare extra data columns (MEDS DatasetMetadataSchema).
_DECLARED_COLUMN_KEYS = (
    "code_modifier_columns",
    "raw_source_id_columns",
    "additional_value_modality_columns",
    "site_id_columns",
    "other_extension_columns",
)
_INT64_MIN = np.iinfo(np.int64).min


# --------------------------------------------------------------------------------------------
# Reports


# Problems confined to a site's own task labels (tasks/<task>/): `check` fails on them, but the site
# still opens (healthfm_core.data.site.open_site) and only those tasks go without labels.
LABEL_ERROR_KINDS = ("bad_site_labels",)


class SiteProblem(BaseModel):
    """One problem found in a site. `row` is 0-based within `file`."""

    severity: Literal["error", "warning"]
    file: str  # relative to the site root, posix separators
    column: str | None = None
    row: int | None = None
    subject_id: int | None = None
    value: str | None = None
    message: str
    kind: str = ""  # stable machine-readable tag, e.g. "unsorted_time" (an addition to the brief)
    # How many problems this line stands for: 1, or N on an "and N more" line (`cut`: those N
    # problems have no line of their own).
    count: int = 1
    cut: bool = False

    def __str__(self) -> str:
        where = [self.file]
        if self.column is not None:
            where.append(f"column {self.column}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.subject_id is not None:
            where.append(f"subject {self.subject_id}")
        value = f" (value {self.value!r})" if self.value is not None else ""
        return f"{self.severity.upper()} {', '.join(where)}: {self.message}{value}"


class SiteSummary(BaseModel):
    n_subjects: int
    n_events: int
    n_codes: int
    time_min: datetime | None  # over timed events; None when every row is static
    time_max: datetime | None
    modalities: list[str]  # in MODALITIES order
    subjects_per_modality: dict[str, int]
    wearable_days: float  # total epoch time across subjects, in days
    prs_traits: list[str]
    splits: dict[str, int]  # split name -> subjects
    splits_from_file: bool = True  # False: deterministic split (no subject_splits.parquet)
    n_wearable_epochs: int = 0
    site_tasks: list[str] = []  # tasks the site labels itself (SITE_ROOT/tasks/<task>/)


class SiteReport(BaseModel):
    root: str
    problems: list[SiteProblem]
    summary: SiteSummary | None  # None when the site has errors: its numbers would mislead
    ok: bool
    strict: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_errors(self) -> int:
        """Every error found, including those whose lines were cut."""
        return sum(p.count for p in self.problems if p.severity == "error")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_warnings(self) -> int:
        return sum(p.count for p in self.problems if p.severity == "warning")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_not_shown(self) -> int:
        """Problems without a line of their own (counted on "and N more" lines)."""
        return sum(p.count for p in self.problems if p.cut)

    @property
    def errors(self) -> list[SiteProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[SiteProblem]:
        return [p for p in self.problems if p.severity == "warning"]


class _ProblemLog:
    """Collects problems, keeping the first MAX_PROBLEMS_PER_KIND of each (file, kind)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[SiteProblem] = []
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._severity: dict[tuple[str, str], str] = {}
        self._column: dict[tuple[str, str], str | None] = {}

    def add(
        self,
        kind: str,
        file: str,
        message: str,
        *,
        column: str | None = None,
        row: int | None = None,
        subject_id: int | None = None,
        value: Any = None,
        severity: Literal["error", "warning"] = "error",
        strict_error: bool = False,
    ) -> None:
        if strict_error and self.strict:
            severity = "error"
        key = (file, kind)
        self._counts[key] += 1
        self._severity[key] = severity
        self._column[key] = column
        if self._counts[key] > MAX_PROBLEMS_PER_KIND:
            return
        self.problems.append(
            SiteProblem(
                severity=severity,
                file=file,
                column=column,
                row=None if row is None else int(row),
                subject_id=None if subject_id is None else int(subject_id),
                value=None if value is None else _show(value),
                message=message,
                kind=kind,
            )
        )

    @property
    def has_errors(self) -> bool:
        return any(s == "error" for s in self._severity.values())

    def finish(self) -> list[SiteProblem]:
        out = list(self.problems)
        for (file, kind), n in self._counts.items():
            if n > MAX_PROBLEMS_PER_KIND:
                out.append(
                    SiteProblem(
                        severity=self._severity[(file, kind)],  # type: ignore[arg-type]
                        file=file,
                        column=self._column[(file, kind)],
                        message=f"and {n - MAX_PROBLEMS_PER_KIND} more problem(s) of this kind ({kind})",
                        kind=kind,
                        count=n - MAX_PROBLEMS_PER_KIND,
                        cut=True,
                    )
                )
        # Errors first, then in the order found: the first line is the one to fix first.
        out.sort(key=lambda p: p.severity != "error")
        return out


def _show(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _time_str(us: int | None) -> str:
    """A timestamp[us] as ISO text; numpy renders any year (MIMIC-style 2100s and beyond)."""
    if us is None:
        return "null"
    unit = "us" if int(us) % 1_000_000 else "s"  # whole seconds read better without .000000
    return str(np.datetime64(int(us), "us").astype(f"datetime64[{unit}]"))


def _to_datetime(us: int) -> datetime | None:
    try:
        return datetime(1970, 1, 1) + timedelta(microseconds=int(us))
    except OverflowError:  # beyond Python's years 1..9999
        return None


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _int_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64/timestamp values as int64 numpy (nulls must be filtered out first)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _true_rows(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices where a boolean arrow mask is true (null counts as false)."""
    mask = pc.fill_null(mask, False)
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


# --------------------------------------------------------------------------------------------
# The check


class _Aggregates:
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


def _schema_problems(log: _ProblemLog, file: str, schema: pa.Schema, meds_schema: Any) -> set[str]:
    """Validate a parquet schema with a `meds` schema as MEDS's `align` would (a type that casts
    losslessly to the schema's is fine: meds_align.cast_problem); returns the unusable columns."""
    bad: set[str] = set()
    try:
        meds_schema.validate(schema)
    except SchemaValidationError as e:
        for col in e.missing_req_cols or []:
            bad.add(col)
            log.add(
                "missing_column",
                file,
                f"required column {col!r} is missing",
                column=col,
                value=f"columns present: {', '.join(schema.names)}",
            )
        for col, want, got in e.mistyped_cols or []:
            why = cast_problem(got, want)
            if why is None:
                continue  # read cast, as MEDS's align reads it
            bad.add(col)
            log.add("wrong_dtype", file, f"column {col!r} {why}", column=col, value=str(got))
        for col in e.disallowed_extra_cols or []:
            log.add("extra_column", file, f"column {col!r} is not allowed here", column=col)
            bad.add(col)
    return bad


def _align_usable(log: _ProblemLog, file: str, table: pa.Table, meds_schema: Any, bad: set[str]) -> pa.Table | None:
    """`table` with its usable columns cast to the meds schema's types (None: a value does not cast)."""
    try:
        return align_table(table, pa.schema([f for f in meds_schema.schema() if f.name not in bad]))
    except CastError as e:
        log.add(
            "bad_value",
            file,
            f"a value of {e.column} does not read as {e.want}",
            column=e.column,
            value=" ".join(e.detail.split()),
        )
        return None


def _outside_root(log: _ProblemLog, root: Path, escape: OutsideRoot) -> None:
    """A link out of the root, once (metadata/ linked out leads three files out)."""
    file = _rel(root, escape.link)
    if not any(p.kind == "link_outside_root" and p.file == file for p in log.problems):
        log.add("link_outside_root", file, escape.message(root))


def _open_parquet(log: _ProblemLog, root: Path, path: Path) -> pq.ParquetFile | None:
    """The file opened as every reader opens it (parquet_guard: the footer checked first)."""
    file = _rel(root, path)
    try:
        return open_parquet(path)
    except ParquetFooterError as e:
        where = f" (row group {e.row_group})" if e.row_group is not None else ""
        log.add("bad_footer", file, f"parquet footer refused{where}: {e.message}", column=e.column, value=e.value)
    except Exception as e:  # any reader failure is a problem of the file, not of the check
        log.add("unreadable", file, f"cannot read parquet file: {type(e).__name__}: {e}")
    return None


def _rows_as_claimed(log: _ProblemLog, file: str, handle: pq.ParquetFile, rows: int) -> None:
    """The rows decoded are the rows the footer claims: what the readers allocate for."""
    claimed = handle.metadata.num_rows
    if rows != claimed:
        log.add(
            "bad_footer",
            file,
            f"parquet footer claims {claimed} rows, its pages hold {rows}: the footer is damaged or forged",
            value=str(claimed),
        )


def _escaped(array: pa.Array) -> pa.Array:
    """Text whose bytes are not UTF-8 shown with those bytes escaped (\\xNN)."""
    view = pa.large_binary() if pa.types.is_large_string(array.type) else pa.binary()
    raw = array.view(view).to_pylist()
    return pa.array([None if v is None else v.decode("utf-8", "backslashreplace") for v in raw], array.type)


def _text_problems(
    log: _ProblemLog, file: str, table: pa.Table, offset: int, shown: set[str] | None = None
) -> pa.Table:
    """Each value of a text column that is not UTF-8 reported with its row; the table returned
    with those values shown as text (their bytes escaped, added to `shown`), so that the other
    checks go on."""
    for name in table.column_names:
        column = table.column(name)
        rows = invalid_utf8_rows(column)
        if rows.size == 0:
            continue
        subjects = table.column("subject_id") if "subject_id" in table.column_names else None
        for i in rows:
            log.add(
                "not_utf8",
                file,
                f"{name} is not valid UTF-8 text",
                column=name,
                row=offset + int(i),
                subject_id=None if subjects is None or name == "subject_id" else _subject_at(subjects, int(i)),
                value=show_bytes(column, int(i)),
            )
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if is_text(array.type):
            fixed = _escaped(array)
            if shown is not None:
                shown.update(str(fixed[int(i)].as_py()) for i in rows)
        elif pa.types.is_dictionary(array.type) and is_text(array.type.value_type):
            fixed = pa.DictionaryArray.from_arrays(array.indices, _escaped(array.dictionary))
            if shown is not None:
                shown.update(str(fixed[int(i)].as_py()) for i in rows)
        else:  # dictionaries, lists of text: null where not UTF-8 (reported above)
            bad = np.zeros(table.num_rows, dtype=bool)
            bad[rows] = True
            fixed = array.take(pa.array(np.arange(table.num_rows), mask=bad))
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), fixed)
    return table


def _subject_at(subjects: pa.ChunkedArray | pa.Array, row: int) -> int | None:
    value = subjects[row].as_py()
    return value if isinstance(value, int) else None


def _read_small_table(log: _ProblemLog, root: Path, path: Path) -> pa.Table | None:
    handle = _open_parquet(log, root, path)
    if handle is None:
        return None
    try:
        table = handle.read()
    except Exception as e:
        log.add("unreadable", _rel(root, path), f"cannot read parquet file: {type(e).__name__}: {e}")
        return None
    file = _rel(root, path)
    _rows_as_claimed(log, file, handle, table.num_rows)
    return _text_problems(log, file, table, 0)


def _nulls_as_text(table: pa.Table) -> pa.Table:
    """A dictionary column of text as a text column of empty strings with the same nulls: what the
    meds schema's validation needs to see (its type and its nulls), without the rows' text."""
    for at, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type) and pa.types.is_string(field.type.value_type):
            column = table.column(at).combine_chunks()
            offsets = pa.py_buffer(np.zeros(len(column) + 1, dtype=np.int32).tobytes())
            validity = column.indices.buffers()[0] if column.null_count else None
            shown = pa.Array.from_buffers(
                pa.string(), len(column), [validity, offsets, pa.py_buffer(b"")], column.null_count, column.offset
            )
            table = table.set_column(at, pa.field(field.name, pa.string()), shown)
    return table


def _null_rows(log: _ProblemLog, file: str, table: pa.Table, meds_schema: Any, offset: int) -> set[str]:
    """Rows where a column that the meds schema declares non-nullable holds null."""
    try:
        meds_schema.validate(
            _nulls_as_text(table.select([c for c in table.column_names if c in meds_schema.schema().names]))
        )
        return set()
    except SchemaValidationError:
        return set()  # a mistyped column: reported by _schema_problems
    except TableValidationError as e:
        cols = set(e.nullability_none_err_cols or [])
    for col in cols:
        for i in _true_rows(pc.is_null(table.column(col))):
            subject = table.column("subject_id")[int(i)].as_py() if "subject_id" in table.column_names else None
            log.add(
                "null_value",
                file,
                f"{col} is null",
                column=col,
                row=offset + int(i),
                subject_id=subject if col != "subject_id" else None,
                value="null",
            )
    return cols


class _ShardState:
    """Carry between record batches of one shard: the last row's subject, the last timed row's
    subject, time and row, and the non-null counts of number columns that nothing reads."""

    def __init__(self, unread_columns: Iterable[str] = ()) -> None:
        self.last_subject: int | None = None
        self.last_timed_subject: int | None = None
        self.last_key: int = _INT64_MIN
        self.last_row: int = -1
        self.unread_values: dict[str, int] = {c: 0 for c in unread_columns}
        self.run_subjects: list[np.ndarray] = []
        self.run_rows: list[np.ndarray] = []


def _check_event_batch(
    log: _ProblemLog,
    file: str,
    batch: pa.Table,
    offset: int,
    state: _ShardState,
    agg: _Aggregates,
    listed_codes: set[str] | None,
) -> None:
    n = batch.num_rows
    agg.n_events += n
    null_cols = _null_rows(log, file, batch, DataSchema, offset)
    rows = np.arange(offset, offset + n, dtype=np.int64)

    # -- codes: non-empty and listed
    code = batch.column("code")  # text, or a dictionary of text (read so by _check_event_shard)
    for i in _true_rows(_code_mask(code, lambda v: pc.equal(pc.utf8_trim_whitespace(v), ""))):
        log.add(
            "empty_code",
            file,
            "code is empty",
            column="code",
            row=offset + int(i),
            subject_id=batch.column("subject_id")[int(i)].as_py(),
            value=code[int(i)].as_py(),
        )
    for value in _code_values(code):
        if value in agg.codes_seen:
            continue
        agg.codes_seen.add(value)
        if value.startswith(PRS_PREFIX):
            agg.prs_traits.add(value[len(PRS_PREFIX) :])
        if listed_codes is not None and value not in listed_codes and value.strip():
            i = _first_row_of(code, value)
            log.add(
                "unlisted_code",
                file,
                f"code is not listed in {CODE_METADATA_FILEPATH}",
                column="code",
                row=offset + i,
                subject_id=batch.column("subject_id")[i].as_py(),
                value=value,
                severity="warning",
                strict_error=True,
            )

    # -- numeric values: finite; PRS rows carry their score
    if "numeric_value" in batch.column_names:
        value_col = batch.column("numeric_value")
        for i in _true_rows(pc.invert(pc.is_finite(value_col))):
            log.add(
                "non_finite_value",
                file,
                "numeric_value is not finite",
                column="numeric_value",
                row=offset + int(i),
                subject_id=batch.column("subject_id")[int(i)].as_py(),
                value=str(value_col[int(i)].as_py()),
            )
        has_value = pc.is_valid(value_col)
    else:
        has_value = pa.array(np.zeros(n, dtype=bool))
    is_prs = pc.fill_null(_code_mask(code, lambda v: pc.starts_with(v, PRS_PREFIX)), False)
    for i in _true_rows(pc.and_(is_prs, pc.invert(has_value))):
        log.add(
            "prs_without_value",
            file,
            "PRS row has no numeric_value (the standardised score)",
            column="numeric_value",
            row=offset + int(i),
            subject_id=batch.column("subject_id")[int(i)].as_py(),
            value=code[int(i)].as_py(),
        )

    # -- subjects: contiguous, timed rows time-sorted (rows with null subject skipped; static rows
    #    may sit anywhere within the subject)
    sid_col = batch.column("subject_id")
    keep = pc.is_valid(sid_col)
    if "subject_id" in null_cols:
        keep_np = np.asarray(pc.fill_null(keep, False).to_numpy(zero_copy_only=False), dtype=bool)
        sid = _int_array(sid_col.filter(keep))
        time_col = batch.column("time").filter(keep)
        rows = rows[keep_np]
        code_kept = code.filter(keep)
        is_prs_kept = is_prs.filter(keep)
    else:
        sid = _int_array(sid_col)
        time_col = batch.column("time")
        code_kept = code
        is_prs_kept = is_prs
    if sid.size == 0:
        return
    time_valid = np.asarray(pc.is_valid(time_col).to_numpy(zero_copy_only=False), dtype=bool)
    time_us = _int_array(pc.fill_null(time_col.cast(pa.int64()), 0))

    if time_valid.any():
        lo, hi = int(time_us[time_valid].min()), int(time_us[time_valid].max())
        agg.time_min = lo if agg.time_min is None else min(agg.time_min, lo)
        agg.time_max = hi if agg.time_max is None else max(agg.time_max, hi)

    t_sid, t_key, t_row = sid[time_valid], time_us[time_valid], rows[time_valid]
    if t_sid.size:
        has_carry = state.last_timed_subject is not None
        all_sid = np.concatenate([[state.last_timed_subject], t_sid]) if has_carry else t_sid
        all_key = np.concatenate([[state.last_key], t_key]) if has_carry else t_key
        all_row = np.concatenate([[state.last_row], t_row]) if has_carry else t_row
        same = all_sid[1:] == all_sid[:-1]
        for j in np.flatnonzero(same & (all_key[1:] < all_key[:-1])):
            log.add(
                "unsorted_time",
                file,
                f"time goes backwards within the subject (row {all_row[j]} has {_time_str(all_key[j])})",
                column="time",
                row=all_row[j + 1],
                subject_id=all_sid[j + 1],
                value=_time_str(all_key[j + 1]),
            )
        state.last_timed_subject, state.last_key, state.last_row = int(t_sid[-1]), int(t_key[-1]), int(t_row[-1])

    has_carry = state.last_subject is not None
    starts = np.concatenate([[not has_carry or sid[0] != state.last_subject], sid[1:] != sid[:-1]])
    state.run_subjects.append(sid[starts])
    state.run_rows.append(rows[starts])
    state.last_subject = int(sid[-1])

    # -- modalities, per subject
    anchor = pc.fill_null(_code_mask(code_kept, lambda v: pc.is_in(v, pa.array(NON_EHR_CODES))), True)
    ehr_mask = pc.and_(pc.and_(pc.invert(is_prs_kept), pc.invert(anchor)), pc.is_valid(code_kept))
    ehr_np = np.asarray(pc.fill_null(ehr_mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    prs_np = np.asarray(pc.fill_null(is_prs_kept, False).to_numpy(zero_copy_only=False), dtype=bool)
    if ehr_np.any():
        agg.ehr_subjects.append(run_values(sid[ehr_np]))
    if prs_np.any():
        agg.prs_subjects.append(run_values(sid[prs_np]))


def _code_mask(code: pa.Array | pa.ChunkedArray, test: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """`test` (a vectorised predicate on text) per row of the code column; on a dictionary column
    it runs on the dictionary's values only and is spread to the rows through the indices."""
    array = code.combine_chunks() if isinstance(code, pa.ChunkedArray) else code
    if pa.types.is_dictionary(array.type):
        return test(array.dictionary).take(array.indices)
    return test(array)


def _code_values(code: pa.Array | pa.ChunkedArray) -> list[str]:
    """The distinct non-null codes of a column (text or dictionary of text)."""
    array = code.combine_chunks() if isinstance(code, pa.ChunkedArray) else code
    if pa.types.is_dictionary(array.type):
        used = pc.unique(array.indices.drop_null())
        return array.dictionary.take(used).to_pylist()
    return pc.unique(array.drop_null()).to_pylist()


def _first_row_of(code: pa.Array | pa.ChunkedArray, value: str) -> int:
    array = code.combine_chunks() if isinstance(code, pa.ChunkedArray) else code
    if pa.types.is_dictionary(array.type):
        entries = np.flatnonzero(pc.fill_null(pc.equal(array.dictionary, value), False).to_numpy(zero_copy_only=False))
        indices = pc.fill_null(array.indices, -1).to_numpy(zero_copy_only=False)
        return int(np.flatnonzero(np.isin(indices, entries))[0])
    return int(pc.index(array, value).as_py())


def unread_number_columns(schema: pa.Schema, declared: Iterable[str] = ()) -> list[str]:
    """Columns of a data shard that hold numbers nothing reads: not MEDS's core columns, not
    declared in dataset.json, and either floating point or an integer named like a value."""
    core = set(DataSchema.schema().names)
    skip = core | set(declared)
    out = []
    for field in schema:
        t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if field.name in skip:
            continue
        if (
            pa.types.is_floating(t)
            or pa.types.is_decimal(t)
            or (pa.types.is_integer(t) and field.name.lower() in VALUE_LIKE_NAMES)
        ):
            out.append(field.name)
    return out


def _dictionary_reader(path: Path, schema: pa.Schema, handle: pq.ParquetFile) -> pq.ParquetFile:
    """The shard's reader with a text `code` column decoded as a dictionary (the footer was checked
    on `handle`, which reads the same file)."""
    field = schema.field("code") if "code" in schema.names else None
    if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        return handle
    return pq.ParquetFile(path, read_dictionary=["code"])


def _align_keeping_code_dictionary(batch: pa.Table, target: pa.Schema) -> pa.Table:
    """align_table, a dictionary `code` kept as dictionary<string> (its values cast, not its rows)."""
    at = batch.schema.get_field_index("code")
    if at < 0 or not pa.types.is_dictionary(batch.schema.field(at).type):
        return align_table(batch, target)
    code = batch.column(at).combine_chunks()
    values = align_table(pa.table({"code": code.dictionary}), target).column("code").combine_chunks()
    aligned = align_table(batch.remove_column(at), target)
    return aligned.add_column(at, "code", pa.DictionaryArray.from_arrays(code.indices, values))


def _check_event_shard(
    log: _ProblemLog,
    root: Path,
    path: Path,
    agg: _Aggregates,
    listed_codes: set[str] | None,
    bar: tqdm,
    declared: Iterable[str] = (),
) -> None:
    file = _rel(root, path)
    handle = _open_parquet(log, root, path)
    if handle is None:
        agg.subjects_incomplete = True
        return
    schema = handle.schema_arrow
    bad = _schema_problems(log, file, schema, DataSchema)
    if bad & set(_EVENT_COLUMNS):
        agg.subjects_incomplete = True
        bar.update(handle.metadata.num_rows)
        return  # row checks on a malformed column would only repeat the schema problem
    columns = [c for c in _EVENT_COLUMNS if c in schema.names]
    state = _ShardState(unread_number_columns(schema, declared))
    target = DataSchema.schema()
    offset = 0
    # Codes read as a dictionary: the text checks run on each batch's distinct codes, not its rows.
    reader = _dictionary_reader(path, schema, handle)
    try:
        for record_batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns + list(state.unread_values)):
            batch = pa.Table.from_batches([record_batch])
            for col in state.unread_values:
                state.unread_values[col] += batch.num_rows - batch.column(col).null_count
            try:
                batch = _align_keeping_code_dictionary(batch.select(columns), target)
            except CastError as e:
                log.add(
                    "bad_value",
                    file,
                    f"a value of {e.column} does not read as {e.want} (rows {offset}..{offset + batch.num_rows - 1})",
                    column=e.column,
                    value=" ".join(e.detail.split()),
                )
                agg.subjects_incomplete = True
                return
            batch = _text_problems(log, file, batch, offset, agg.codes_seen)  # reported once, not as unlisted too
            _check_event_batch(log, file, batch, offset, state, agg, listed_codes)
            offset += batch.num_rows
            bar.update(batch.num_rows)
    except Exception as e:
        log.add("unreadable", file, f"cannot read rows after row {offset}: {type(e).__name__}: {e}")
        agg.subjects_incomplete = True
        return
    _rows_as_claimed(log, file, handle, offset)
    for col, n_values in state.unread_values.items():
        if n_values:
            kind = schema.field(col).type
            log.add(
                "unread_value_column",
                file,
                f"column {col!r} ({kind}) holds {n_values} non-null value(s) that are ignored: only numeric_value "
                "is read as a value (rename it numeric_value if these are the measurements, or declare it "
                f"in {DATASET_METADATA_FILEPATH})",
                column=col,
                severity="warning",
            )

    if not state.run_subjects:
        agg.shard_subjects.append((file, np.zeros(0, np.int64)))
        return
    run_subjects = np.concatenate(state.run_subjects)
    run_rows = np.concatenate(state.run_rows)
    subjects, first, counts = np.unique(run_subjects, return_index=True, return_counts=True)
    for s in np.flatnonzero(counts > 1):
        again = run_rows[np.flatnonzero(run_subjects == subjects[s])[1]]
        log.add(
            "subject_not_contiguous",
            file,
            f"subject's rows are not contiguous (first block starts at row {run_rows[first[s]]}, "
            f"another block starts at row {again})",
            column="subject_id",
            row=again,
            subject_id=subjects[s],
            value=str(subjects[s]),
        )
    agg.shard_subjects.append((file, subjects))


def _check_subject_shards(log: _ProblemLog, agg: _Aggregates) -> None:
    """Each subject lives in exactly one shard."""
    if len(agg.shard_subjects) < 2:
        return
    ids = np.concatenate([a for _, a in agg.shard_subjects])
    shard = np.concatenate([np.full(a.size, i) for i, (_, a) in enumerate(agg.shard_subjects)])
    order = np.argsort(ids, kind="stable")
    ids, shard = ids[order], shard[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    for j in dup:
        first_file = agg.shard_subjects[shard[j]][0]
        file = agg.shard_subjects[shard[j + 1]][0]
        log.add(
            "subject_in_many_shards",
            file,
            f"subject also has rows in {first_file}; MEDS keeps each subject in one shard",
            column="subject_id",
            subject_id=ids[j + 1],
            value=str(ids[j + 1]),
        )


def _check_wearables_file(log: _ProblemLog, root: Path, path: Path, agg: _Aggregates, bar: tqdm) -> None:
    file = _rel(root, path)
    handle = _open_parquet(log, root, path)
    if handle is None:
        return
    schema = handle.schema_arrow
    bad = False
    for field in WEARABLES_SCHEMA:
        if field.name not in schema.names:
            log.add(
                "missing_column",
                file,
                f"required column {field.name!r} is missing",
                column=field.name,
                value=f"columns present: {', '.join(schema.names)}",
            )
            bad = True
        elif schema.field(field.name).type != field.type:
            got = schema.field(field.name).type
            log.add(
                "wrong_dtype",
                file,
                f"column {field.name!r} has type {got}, wearables want {field.type}",
                column=field.name,
                value=str(got),
            )
            bad = True
    if bad:
        bar.update(handle.metadata.num_rows)
        return
    subjects: list[np.ndarray] = []
    offset = 0
    try:
        for record_batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=WEARABLES_SCHEMA.names):
            batch = pa.Table.from_batches([record_batch])
            _check_wearables_batch(log, file, batch, offset)
            sid = batch.column("subject_id")
            subjects.append(np.unique(_int_array(sid.filter(pc.is_valid(sid)))))
            agg.n_wear_epochs += batch.num_rows
            offset += batch.num_rows
            bar.update(batch.num_rows)
    except Exception as e:
        log.add("unreadable", file, f"cannot read rows after row {offset}: {type(e).__name__}: {e}")
        return
    _rows_as_claimed(log, file, handle, offset)
    agg.wear_subjects.append((file, _Aggregates._union(subjects)))


def _check_wearables_batch(log: _ProblemLog, file: str, batch: pa.Table, offset: int) -> None:
    sid = batch.column("subject_id")

    def report(kind: str, column: str, mask: Any, message: str, show: Any) -> None:
        rows = np.flatnonzero(mask) if isinstance(mask, np.ndarray) else _true_rows(mask)
        for i in rows:
            log.add(
                kind,
                file,
                message,
                column=column,
                row=offset + int(i),
                subject_id=sid[int(i)].as_py(),
                value=show(int(i)),
            )

    for col in ("subject_id", "time", "enmo_mg"):
        report("null_value", col, pc.is_null(batch.column(col)), f"{col} is null", lambda i: "null")
    time = batch.column("time")
    time_valid = np.asarray(pc.is_valid(time).to_numpy(zero_copy_only=False), dtype=bool)
    time_us = _int_array(pc.fill_null(time.cast(pa.int64()), 0))
    # numpy's % takes the divisor's sign, so epochs before 1970 are judged like any other.
    report(
        "off_grid",
        "time",
        time_valid & (time_us % EPOCH_US != 0),
        f"epoch start is not on the {EPOCH_SECONDS}-second grid",
        lambda i: _time_str(int(time_us[i])),
    )
    enmo = batch.column("enmo_mg")
    report(
        "non_finite_value",
        "enmo_mg",
        pc.invert(pc.is_finite(enmo)),
        "enmo_mg is not finite",
        lambda i: str(enmo[i].as_py()),
    )
    report(
        "out_of_range", "enmo_mg", pc.less(enmo, 0.0), "enmo_mg is negative (ENMO >= 0)", lambda i: str(enmo[i].as_py())
    )
    hr = batch.column("hr_bpm")
    hr_bad = pc.or_(pc.invert(pc.is_finite(hr)), pc.or_(pc.less(hr, HR_MIN_BPM), pc.greater(hr, HR_MAX_BPM)))
    report(
        "out_of_range",
        "hr_bpm",
        hr_bad,
        f"hr_bpm outside {HR_MIN_BPM:g}..{HR_MAX_BPM:g} (null if unknown)",
        lambda i: str(hr[i].as_py()),
    )


def _read_code_metadata(log: _ProblemLog, root: Path) -> set[str] | None:
    path = root / CODE_METADATA_FILEPATH
    file = _rel(root, path)
    if not path.is_file():
        log.add(
            "missing_metadata",
            file,
            "code metadata file is missing; codes cannot be checked",
            severity="warning",
            strict_error=True,
        )
        return None
    if (escape := outside_root(root, path)) is not None:
        _outside_root(log, root, escape)
        return None
    table = _read_small_table(log, root, path)
    if table is None:
        return None
    bad = _schema_problems(log, file, table.schema, CodeMetadataSchema)
    table = None if "code" in bad else _align_usable(log, file, table, CodeMetadataSchema, bad)
    if table is None:
        return None
    _null_rows(log, file, table.select(["code"]), CodeMetadataSchema, 0)
    return set(table.column("code").drop_null().to_pylist())


def _check_dataset_metadata(log: _ProblemLog, root: Path) -> set[str]:
    """Validate dataset.json; returns the extra data columns it declares (code modifiers, ...)."""
    path = root / DATASET_METADATA_FILEPATH
    file = _rel(root, path)
    if not path.is_file():
        log.add("missing_metadata", file, "dataset metadata file is missing", severity="warning", strict_error=True)
        return set()
    if (escape := outside_root(root, path)) is not None:
        _outside_root(log, root, escape)
        return set()
    try:
        blob = read_json(path)
    except StrictFileError as e:
        log.add("bad_json", file, f"not valid JSON: {e}")
        return set()
    try:
        DatasetMetadataSchema.validate(blob)
    except Exception as err:
        # flexible_schema wraps the jsonschema error that names the field
        cause: BaseException = err.__cause__ or err
        field = "/".join(str(p) for p in getattr(cause, "absolute_path", [])) or None
        msg = getattr(cause, "message", None) or str(cause)
        log.add(
            "bad_dataset_metadata",
            file,
            f"does not match MEDS DatasetMetadataSchema: {msg}",
            column=field,
            value=_show(getattr(cause, "instance", None)) if field else None,
        )
        return set()
    declared = [blob.get(k) or [] for k in _DECLARED_COLUMN_KEYS] if isinstance(blob, dict) else []
    return {c for cols in declared if isinstance(cols, list) for c in cols if isinstance(c, str)}


def _check_splits(log: _ProblemLog, root: Path, subjects: np.ndarray, complete: bool) -> dict[str, int] | None:
    """Validate subject_splits.parquet against the data's subjects; split sizes or None."""
    path = root / SUBJECT_SPLITS_FILEPATH
    file = _rel(root, path)
    if not path.is_file():
        return None
    if (escape := outside_root(root, path)) is not None:
        _outside_root(log, root, escape)
        return {}
    table = _read_small_table(log, root, path)
    if table is None:
        return {}
    bad = _schema_problems(log, file, table.schema, SubjectSplitSchema)
    table = None if bad & {"subject_id", "split"} else _align_usable(log, file, table, SubjectSplitSchema, bad)
    if table is None:
        return {}
    nulls = _null_rows(log, file, table, SubjectSplitSchema, 0)
    if nulls:
        table = table.filter(pc.and_(pc.is_valid(table.column("subject_id")), pc.is_valid(table.column("split"))))
    ids = _int_array(table.column("subject_id"))
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    for s in np.flatnonzero(counts > 1):
        log.add(
            "duplicate_split_subject",
            file,
            "subject is listed more than once",
            column="subject_id",
            subject_id=uniq[s],
            value=str(uniq[s]),
        )
    for s in np.setdiff1d(uniq, subjects) if complete else []:
        row = int(np.flatnonzero(ids == s)[0])
        log.add(
            "split_unknown_subject",
            file,
            "split names a subject with no rows in data/",
            column="subject_id",
            row=row,
            subject_id=s,
            value=str(s),
        )
    for s in np.setdiff1d(subjects, uniq):
        log.add(
            "split_missing_subject",
            file,
            "subject in data/ is not in any split",
            column="subject_id",
            subject_id=s,
            value=str(s),
        )
    names, sizes = np.unique(np.asarray(table.column("split").to_pylist(), dtype=object), return_counts=True)
    return {str(k): int(v) for k, v in zip(names, sizes)}


def _check_own_labels(log: _ProblemLog, root: Path, task: str) -> None:
    """The site's own labels of one task (SITE_ROOT/tasks/<task>/), by healthfm_core.data.site_labels."""
    try:
        issues = check_site_labels(root, task)
    except Exception as e:  # a file site_labels cannot even compare with the data
        log.add("bad_site_labels", f"tasks/{task}", f"cannot check the labels: {type(e).__name__}: {e}")
        return
    for issue in issues:
        log.add(
            "bad_site_labels" if issue.severity == "error" else "site_labels_after_last_event",
            _rel(root, issue.file),
            issue.message,
            column=issue.column,
            value=None if issue.value is None else str(issue.value),
            severity=issue.severity,
        )


def _total_rows(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except Exception:
            pass  # reported as unreadable by the check itself
    return total


@dataclass(frozen=True)
class CheckedSubjects:
    """The subjects a check found: what healthfm_core.data.site needs to open the site."""

    subject_ids: np.ndarray  # sorted unique subjects with rows in data/
    per_modality: dict[str, np.ndarray]  # modality -> sorted subject ids


def run_check(root: str | Path, progress: bool = False, strict: bool = False) -> tuple[SiteReport, CheckedSubjects]:
    """`check_site`, also returning the subjects it found (one pass over the data for both)."""
    root = Path(root)
    log = _ProblemLog(strict)
    agg = _Aggregates()
    report_root = str(root)
    if not root.is_dir():
        log.add("no_site_root", ".", f"site root {root} does not exist or is not a directory", value=str(root))
        report = SiteReport(root=report_root, problems=log.finish(), summary=None, ok=False, strict=strict)
        return report, CheckedSubjects(agg.subjects(), agg.modality_subjects())

    data_files, data_escapes = list_files(root, DATA_SUBDIRECTORY, ".parquet")
    wear_files, wear_escapes = list_files(root, WEARABLES_SUBDIRECTORY, ".parquet")
    for escape in data_escapes + wear_escapes:
        _outside_root(log, root, escape)
    agg.subjects_incomplete = bool(data_escapes)
    declared = _check_dataset_metadata(log, root)
    listed_codes = _read_code_metadata(log, root)

    with tqdm(
        total=_total_rows(data_files + wear_files),
        unit="rows",
        desc=f"checking {root.name}",
        disable=not progress,
        leave=False,
    ) as bar:
        for path in data_files:
            _check_event_shard(log, root, path, agg, listed_codes, bar, declared)
        for path in wear_files:
            _check_wearables_file(log, root, path, agg, bar)

    if not data_files and not data_escapes:
        log.add(
            "empty_data", DATA_SUBDIRECTORY, f"no MEDS data shards: {DATA_SUBDIRECTORY}/**/*.parquet matched nothing"
        )
    elif agg.n_events == 0 and not log.has_errors:
        log.add("empty_data", DATA_SUBDIRECTORY, "the MEDS data shards hold no rows", value="0 rows")
    _check_subject_shards(log, agg)

    subjects = agg.subjects()
    for file, wear in agg.wear_subjects if not agg.subjects_incomplete else []:
        for s in np.setdiff1d(wear, subjects):
            log.add(
                "wearables_unknown_subject",
                file,
                "subject has wearables but no rows in data/; its wearables are ignored",
                column="subject_id",
                subject_id=s,
                value=str(s),
                severity="warning",
            )

    splits = _check_splits(log, root, subjects, complete=not agg.subjects_incomplete)
    own_tasks = site_tasks(root)
    data_sound = not log.has_errors
    if data_sound:  # labels are checked against the data: only once the data is sound
        for task in own_tasks:
            _check_own_labels(log, root, task)
    splits_from_file = splits is not None
    if splits is None:
        names, sizes = np.unique(
            np.asarray(hash_splits(subjects).column("split").to_pylist(), dtype=object), return_counts=True
        )
        splits = {str(k): int(v) for k, v in zip(names, sizes)}

    summary = None
    time_min = _to_datetime(agg.time_min) if agg.time_min is not None else None
    time_max = _to_datetime(agg.time_max) if agg.time_max is not None else None
    if (agg.time_min is not None and time_min is None) or (agg.time_max is not None and time_max is None):
        log.add(
            "time_out_of_python_range",
            DATA_SUBDIRECTORY,
            "times outside years 1..9999 cannot be shown as dates",
            value=f"{_time_str(agg.time_min)} .. {_time_str(agg.time_max)}",
            severity="warning",
        )
    per_modality = agg.modality_subjects()
    # Bad label files of a task (its own tasks/<task>/) make the check fail but not the data's
    # numbers: the summary stands, and open_site opens the site without those tasks' labels.
    if data_sound and not any(p.severity == "error" and p.kind not in LABEL_ERROR_KINDS for p in log.problems):
        counts = {m: int(per_modality[m].size) for m in MODALITIES}
        summary = SiteSummary(
            n_subjects=int(subjects.size),
            n_events=agg.n_events,
            n_codes=len(agg.codes_seen),
            time_min=time_min,
            time_max=time_max,
            modalities=[m for m in MODALITIES if counts[m] > 0],
            subjects_per_modality=counts,
            wearable_days=agg.n_wear_epochs * EPOCH_SECONDS / 86400.0,
            prs_traits=sorted(agg.prs_traits),
            splits=splits,
            splits_from_file=splits_from_file,
            n_wearable_epochs=agg.n_wear_epochs,
            site_tasks=own_tasks,
        )
    problems = log.finish()
    ok = not any(p.severity == "error" for p in problems)
    report = SiteReport(root=report_root, problems=problems, summary=summary, ok=ok, strict=strict)
    return report, CheckedSubjects(subjects, per_modality)


def check_site(root: str | Path, progress: bool = False, strict: bool = False) -> SiteReport:
    """Validate a site root; never raises on bad data (problems go into the report)."""
    report, _ = run_check(root, progress, strict)
    for p in report.problems:
        logger.debug("%s", p)
    return report


__all__ = [
    "BATCH_ROWS",
    "MAX_PROBLEMS_PER_KIND",
    "LABEL_ERROR_KINDS",
    "CheckedSubjects",
    "SiteProblem",
    "SiteReport",
    "SiteSummary",
    "check_site",
    "run_check",
]
