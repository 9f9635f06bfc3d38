"""Reading MEDS tables as MEDS 0.4 allows them to be written: types cast, rows put in order.

The `meds` schemas pin each core column's type, but MEDS's own `PyArrowSchema.align` accepts a
table whose columns cast to those types without changing the data, and real exports use that
room: polars writes `code` and `text_value` as large_string (dictionary when categorical), pandas
writes timestamp[ns], MEDS < 0.4 wrote text_value as string, many ETLs keep numeric_value as
float64 or write ids as int32. `cast_problem` says whether a column's type reads as the schema's
(the check reports those that do not), `align_table` casts a table (the reader and the check read
the same values). Casts stay within a family (integers to int64, timestamps and dates to
timestamp[us], text to text, numbers to float32): a subject_id written as text or a time written
as text is not read, since guessing a format is not a lossless cast.

Order: MEDS keeps a subject's rows contiguous and sorted by time, but says nothing of where its
static rows (null time) go; polars sorts nulls last. `sort_events` gives the order the pipeline
reads: within each subject (subjects in file order), static rows first, then by time, ties in file
order; it returns the table unchanged when it is in that order already (the usual case).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_INT64_MIN = np.iinfo(np.int64).min


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def cast_problem(got: pa.DataType, want: pa.DataType) -> str | None:
    """None when a column of type `got` reads as `want` (the same type or a lossless cast within
    its family), else why not."""
    if got == want or pa.types.is_null(got):  # an all-null column (polars writes `null`) casts to any type
        return None
    if pa.types.is_integer(want):
        ok = pa.types.is_integer(got)
    elif pa.types.is_timestamp(want):
        ok = pa.types.is_timestamp(got) or pa.types.is_date(got)
    elif pa.types.is_floating(want):
        ok = _is_number(got)
    elif _is_text(want):
        ok = _is_text(got)
    elif _is_list(want):
        ok = _is_list(got) and cast_problem(got.value_type, want.value_type) is None
    else:
        ok = False
    return None if ok else f"has type {got}, MEDS wants {want}"


def _cast(column: pa.ChunkedArray | pa.Array, want: pa.DataType) -> pa.ChunkedArray | pa.Array:
    # Numbers to float32 (the MEDS value type) are cast unchecked: an int64 above 2**24 or a
    # float64 value loses digits exactly as MEDS's float32 numeric_value means it to; an overflow
    # becomes inf, which the check reports as a value that is not finite.
    safe = not (pa.types.is_floating(want) and _is_number(column.type))
    return column.cast(want, safe=safe)


class CastError(ValueError):
    """A column whose type reads as MEDS's but one of whose values does not (an id above int64,
    a timestamp[ns] with nanoseconds)."""

    def __init__(self, column: str, got: pa.DataType, want: pa.DataType, detail: str):
        self.column, self.got, self.want, self.detail = column, got, want, detail
        super().__init__(f"column {column!r}: cannot read {got} as {want}: {detail}")


def align_table(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Cast `table`'s columns that `target` names to its types (others untouched, order kept).
    Raises CastError for a value that does not cast, ValueError for a type that does not read
    (see `cast_problem`)."""
    for field in target:
        if field.name not in table.column_names:
            continue
        got = table.schema.field(field.name).type
        if got == field.type:
            continue
        why = cast_problem(got, field.type)
        if why is not None:
            raise ValueError(f"column {field.name!r} {why}")
        try:
            column = _cast(table.column(field.name), field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise CastError(field.name, got, field.type, str(e)) from None
        idx = table.schema.get_field_index(field.name)
        table = table.set_column(idx, pa.field(field.name, field.type), column)
    return table


def static_first_key(time: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 sort key of a timestamp column: microseconds, static rows (null) before any time."""
    if isinstance(time, pa.ChunkedArray):
        time = time.combine_chunks() if time.num_chunks != 1 else time.chunk(0)
    if pa.types.is_timestamp(time.type) and time.type.unit != "us":
        time = time.cast(pa.timestamp("us"))
    us = time.cast(pa.int64()) if not pa.types.is_int64(time.type) else time
    return np.asarray(pc.fill_null(us, _INT64_MIN).to_numpy(zero_copy_only=False), dtype=np.int64)


def event_order(subject_id: np.ndarray, key: np.ndarray) -> np.ndarray | None:
    """Permutation putting rows in reading order (see the module docstring), or None when they
    are in it already. `key` from `static_first_key`."""
    if len(subject_id) < 2:
        return None
    same = subject_id[1:] == subject_id[:-1]
    if not np.any(same & (key[1:] < key[:-1])):
        return None
    _, first, inverse = np.unique(subject_id, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # subjects in file order
    return np.lexsort((key, rank[inverse.reshape(-1)]))  # lexsort is stable: ties keep file order


def sort_events(table: pa.Table) -> pa.Table:
    """A MEDS events table in reading order (see the module docstring); needs subject_id and time."""
    if table.num_rows < 2:
        return table
    sid = np.asarray(table.column("subject_id").to_numpy(), dtype=np.int64)
    order = event_order(sid, static_first_key(table.column("time")))
    return table if order is None else table.take(pa.array(order))


__all__ = ["CastError", "align_table", "cast_problem", "event_order", "sort_events", "static_first_key"]
