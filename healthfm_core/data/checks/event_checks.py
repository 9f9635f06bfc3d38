"""The MEDS event shards' checks, one record batch at a time: subjects contiguous, times sorted,
codes and values sound, number columns no reader reads, each subject in one shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from meds import (
    DataSchema,
    birth_code,
    death_code,
)
from tqdm.auto import tqdm

from healthfm_core.data.checks.aggregates import SiteAggregates
from healthfm_core.data.checks.file_checks import (
    BATCH_ROWS,
    null_rows,
    open_checked_parquet,
    rows_as_claimed,
    schema_problems,
    text_problems,
)
from healthfm_core.data.checks.problem_log import ProblemLog, int_array, time_str, true_rows
from healthfm_core.data.files.layout import (
    CODE_METADATA_FILEPATH,
    DATASET_METADATA_FILEPATH,
    PRS_PREFIX,
    run_values,
)
from healthfm_core.data.files.meds_align import CastError, align_table

# Codes that anchor a timeline without being clinical content (see healthfm_core/data/checks/site_check.py).
NON_EHR_CODES = (birth_code, death_code)

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
_INT64_MIN = np.iinfo(np.int64).min


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
    log: ProblemLog,
    file: str,
    batch: pa.Table,
    offset: int,
    state: _ShardState,
    agg: SiteAggregates,
    listed_codes: set[str] | None,
) -> None:
    n = batch.num_rows
    agg.n_events += n
    null_cols = null_rows(log, file, batch, DataSchema, offset)
    rows = np.arange(offset, offset + n, dtype=np.int64)

    # -- codes: non-empty and listed
    code = batch.column("code")  # text, or a dictionary of text (read so by check_event_shard)
    for i in true_rows(_code_mask(code, lambda v: pc.equal(pc.utf8_trim_whitespace(v), ""))):
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
        for i in true_rows(pc.invert(pc.is_finite(value_col))):
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
    for i in true_rows(pc.and_(is_prs, pc.invert(has_value))):
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
        sid = int_array(sid_col.filter(keep))
        time_col = batch.column("time").filter(keep)
        rows = rows[keep_np]
        code_kept = code.filter(keep)
        is_prs_kept = is_prs.filter(keep)
    else:
        sid = int_array(sid_col)
        time_col = batch.column("time")
        code_kept = code
        is_prs_kept = is_prs
    if sid.size == 0:
        return
    time_valid = np.asarray(pc.is_valid(time_col).to_numpy(zero_copy_only=False), dtype=bool)
    time_us = int_array(pc.fill_null(time_col.cast(pa.int64()), 0))

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
                f"time goes backwards within the subject (row {all_row[j]} has {time_str(all_key[j])})",
                column="time",
                row=all_row[j + 1],
                subject_id=all_sid[j + 1],
                value=time_str(all_key[j + 1]),
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


def check_event_shard(
    log: ProblemLog,
    path: Path,
    agg: SiteAggregates,
    listed_codes: set[str] | None,
    bar: tqdm,
    declared: Iterable[str] = (),
) -> None:
    file = log.file(path)
    handle = open_checked_parquet(log, path)
    if handle is None:
        agg.subjects_incomplete = True
        return
    schema = handle.schema_arrow
    bad = schema_problems(log, file, schema, DataSchema)
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
            batch = text_problems(log, file, batch, offset, agg.codes_seen)  # reported once, not as unlisted too
            _check_event_batch(log, file, batch, offset, state, agg, listed_codes)
            offset += batch.num_rows
            bar.update(batch.num_rows)
    except Exception as e:
        log.add("unreadable", file, f"cannot read rows after row {offset}: {type(e).__name__}: {e}")
        agg.subjects_incomplete = True
        return
    rows_as_claimed(log, file, handle, offset)
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


def check_subject_shards(log: ProblemLog, agg: SiteAggregates) -> None:
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
