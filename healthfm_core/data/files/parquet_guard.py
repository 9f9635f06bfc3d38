"""A site's parquet files read as untrusted input: the footer is checked before the reader
allocates anything for it, and text is checked to be UTF-8 with the row that is not.

pyarrow's reader reserves memory for as many rows as a row group's footer claims before it
decodes a page: a 130 KB shard whose footer claimed 5e9 rows made `read_table` ask for 16 GiB
(`ArrowMemoryError: malloc of size 17179869184 failed`, no file named), while the check, which
streams batches, saw the true 49,519 rows and passed it. Every reader of a site's parquet files
(healthfm_core.data.sites.site, site_check, site_labels, wear_stream, code_stats, aces_tasks) opens them
through `open_parquet` / `read_parquet`, which refuse, naming the file, the row group and the
column, a footer that

- counts rows inconsistently: the file's row count is not the sum of its row groups', or a column
  chunk holds a different number of values than its row group has rows (fewer, for a nested
  column, whose values count list items);
- places a column chunk outside the file's bytes, or in another file (`file_path`);
- claims more rows in a row group than MAX_ROWS_PER_BYTE per byte of the row group's column chunks
  (once above ROWS_ALWAYS_PLAUSIBLE, which no reader can turn into a large allocation).

MAX_ROWS_PER_BYTE is generous: the project's synthetic sites hold at most 0.4 rows per byte, a
MEDS export about as many, and the most compressible table written for the measurement (4 million
rows of one subject, a constant value and nulls, zstd, one row group) about 1,000 (polars;
pyarrow: 114). A footer within these limits that still lies is caught by `client.py check`, which
decodes every row and compares the count (healthfm_core.data.checks.site_check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthfm_core.data.files.site_paths import require_inside

MAX_ROWS_PER_BYTE = 4096
ROWS_ALWAYS_PLAUSIBLE = 1 << 20
_MAGIC_AND_LENGTH = 8  # the footer's 4-byte length and the closing b"PAR1"


class ParquetFooterError(ValueError):
    """A footer the readers refuse: `path`, and where in it (`row_group`, `column`, `value`)."""

    def __init__(
        self,
        path: Path,
        message: str,
        *,
        row_group: int | None = None,
        column: str | None = None,
        value: str | None = None,
    ):
        self.path, self.message, self.row_group, self.column, self.value = path, message, row_group, column, value
        where = [str(path)]
        if row_group is not None:
            where.append(f"row group {row_group}")
        if column is not None:
            where.append(f"column {column}")
        shown = f" (value {value})" if value is not None else ""
        super().__init__(f"{', '.join(where)}: {message}{shown}")


def check_footer(path: Path, handle: pq.ParquetFile) -> None:
    """ParquetFooterError unless the footer's row counts and column chunk sizes are plausible
    for the file's size (the module docstring has the rules)."""
    meta = handle.metadata
    size = path.stat().st_size
    data_end = size - meta.serialized_size - _MAGIC_AND_LENGTH
    group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    if sum(group_rows) != meta.num_rows:
        raise ParquetFooterError(
            path,
            f"the footer claims {meta.num_rows} rows but its row groups hold {sum(group_rows)}",
            value=str(meta.num_rows),
        )
    for g, rows in enumerate(group_rows):
        group = meta.row_group(g)
        chunk_bytes = 0
        for c in range(group.num_columns):
            chunk = group.column(c)
            name = chunk.path_in_schema
            if chunk.file_path:
                raise ParquetFooterError(
                    path,
                    "the column chunk lives in another file; a site reads only its own files",
                    row_group=g,
                    column=name,
                    value=repr(chunk.file_path),
                )
            # Where the chunk starts, as pyarrow computes it (an empty chunk's data page offset is 0).
            start, length = chunk.data_page_offset, chunk.total_compressed_size
            dictionary = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
            if dictionary is not None and 0 < dictionary < start:
                start = dictionary
            if start < 0 or length < 0 or start + length > data_end:
                raise ParquetFooterError(
                    path,
                    f"the column chunk claims bytes {start}..{start + length} of a file whose data ends at byte "
                    f"{data_end}",
                    row_group=g,
                    column=name,
                    value=str(length),
                )
            chunk_bytes += length
            flat = meta.schema.column(c).max_repetition_level == 0
            if chunk.num_values < rows or (flat and chunk.num_values != rows):
                raise ParquetFooterError(
                    path,
                    f"the row group claims {rows} rows but the column holds {chunk.num_values} values",
                    row_group=g,
                    column=name,
                    value=str(rows),
                )
        if rows > max(ROWS_ALWAYS_PLAUSIBLE, MAX_ROWS_PER_BYTE * chunk_bytes):
            first = group.column(0).path_in_schema if group.num_columns else None
            raise ParquetFooterError(
                path,
                f"the row group claims {rows} rows in {chunk_bytes} bytes of column chunks, more than "
                f"{MAX_ROWS_PER_BYTE} rows per byte: the footer is damaged or forged (a reader would "
                f"reserve memory for {rows} rows)",
                row_group=g,
                column=first,
                value=str(rows),
            )


def open_parquet(path: Path, root: Path | None = None) -> pq.ParquetFile:
    """The file's reader, its footer checked (and, given the site root, the path inside it:
    site_paths.OutsideRootError otherwise); ParquetFooterError for a footer the readers refuse.
    pyarrow's own errors (not parquet, truncated) pass through."""
    if root is not None:
        require_inside(root, path)
    handle = pq.ParquetFile(path)
    check_footer(path, handle)
    return handle


def read_parquet(path: Path, root: Path | None = None, **kwargs: Any) -> pa.Table:
    """`pq.read_table(path, **kwargs)` once `open_parquet` accepts the file."""
    open_parquet(path, root)
    return pq.read_table(path, **kwargs)


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def invalid_utf8_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rows (0-based, within `column`) whose text is not UTF-8: text columns, dictionaries of
    text and lists of either; empty for other types. Reading such a value in Python raised an
    UnicodeDecodeError naming neither row nor column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_dictionary(kind):
        bad_entries = invalid_utf8_rows(array.dictionary)
        if bad_entries.size == 0:
            return bad_entries
        return np.flatnonzero(
            pc.fill_null(pc.is_in(array.indices, pa.array(bad_entries)), False).to_numpy(zero_copy_only=False)
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        bad_items = invalid_utf8_rows(array.flatten())
        if bad_items.size == 0:
            return bad_items
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.unique(parents[bad_items])
    if not is_text(kind):
        return np.zeros(0, np.int64)
    try:
        array.validate(full=True)  # the fast path: checks every value's UTF-8 in C++
        return np.zeros(0, np.int64)
    except pa.ArrowInvalid:
        pass
    raw = array.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()).to_pylist()
    bad = []
    for i, value in enumerate(raw):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(i)
    return np.asarray(bad, dtype=np.int64)


def show_bytes(column: pa.Array | pa.ChunkedArray, row: int) -> str:
    """A value that is not UTF-8, as Python shows its bytes (b'LAB//\\xff...')."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_dictionary(kind):
        return show_bytes(array.dictionary, int(array.indices[row].as_py()))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        flat = array.flatten()
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        for j in np.flatnonzero(parents == row):
            if invalid_utf8_rows(flat.slice(int(j), 1)).size:
                return show_bytes(flat, int(j))
        return "?"
    view = array.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
    return repr(view[row].as_py())


__all__ = [
    "MAX_ROWS_PER_BYTE",
    "ROWS_ALWAYS_PLAUSIBLE",
    "ParquetFooterError",
    "check_footer",
    "invalid_utf8_rows",
    "is_text",
    "open_parquet",
    "read_parquet",
    "show_bytes",
]
