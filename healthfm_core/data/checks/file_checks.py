"""What every file of the check goes through: opened inside the site root with its footer
checked, its schema against MEDS's, its rows as claimed, its text UTF-8, its nulls where MEDS allows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flexible_schema import SchemaValidationError, TableValidationError

from healthfm_core.data.checks.problem_log import ProblemLog, true_rows
from healthfm_core.data.files.meds_align import CastError, align_table, cast_problem
from healthfm_core.data.files.parquet_guard import (
    ParquetFooterError,
    invalid_utf8_rows,
    is_text,
    open_parquet,
    show_bytes,
)
from healthfm_core.data.files.site_paths import OutsideRoot

BATCH_ROWS = 1 << 17


def schema_problems(log: ProblemLog, file: str, schema: pa.Schema, meds_schema: Any) -> set[str]:
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


def align_usable(log: ProblemLog, file: str, table: pa.Table, meds_schema: Any, bad: set[str]) -> pa.Table | None:
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


def report_outside_root(log: ProblemLog, escape: OutsideRoot) -> None:
    """A link out of the root, once (metadata/ linked out leads three files out)."""
    file = log.file(escape.link)
    if not any(p.kind == "link_outside_root" and p.file == file for p in log.problems):
        log.add("link_outside_root", file, escape.message(log.root))


def open_checked_parquet(log: ProblemLog, path: Path) -> pq.ParquetFile | None:
    """The file opened as every reader opens it (parquet_guard: the footer checked first)."""
    file = log.file(path)
    try:
        return open_parquet(path)
    except ParquetFooterError as e:
        where = f" (row group {e.row_group})" if e.row_group is not None else ""
        log.add("bad_footer", file, f"parquet footer refused{where}: {e.message}", column=e.column, value=e.value)
    except Exception as e:  # any reader failure is a problem of the file, not of the check
        log.add("unreadable", file, f"cannot read parquet file: {type(e).__name__}: {e}")
    return None


def rows_as_claimed(log: ProblemLog, file: str, handle: pq.ParquetFile, rows: int) -> None:
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


def text_problems(log: ProblemLog, file: str, table: pa.Table, offset: int, shown: set[str] | None = None) -> pa.Table:
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


def read_small_table(log: ProblemLog, path: Path) -> pa.Table | None:
    handle = open_checked_parquet(log, path)
    if handle is None:
        return None
    try:
        table = handle.read()
    except Exception as e:
        log.add("unreadable", log.file(path), f"cannot read parquet file: {type(e).__name__}: {e}")
        return None
    file = log.file(path)
    rows_as_claimed(log, file, handle, table.num_rows)
    return text_problems(log, file, table, 0)


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


def null_rows(log: ProblemLog, file: str, table: pa.Table, meds_schema: Any, offset: int) -> set[str]:
    """Rows where a column that the meds schema declares non-nullable holds null."""
    try:
        meds_schema.validate(
            _nulls_as_text(table.select([c for c in table.column_names if c in meds_schema.schema().names]))
        )
        return set()
    except SchemaValidationError:
        return set()  # a mistyped column: reported by schema_problems
    except TableValidationError as e:
        cols = set(e.nullability_none_err_cols or [])
    for col in cols:
        for i in true_rows(pc.is_null(table.column(col))):
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
