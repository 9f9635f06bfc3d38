"""Parquet files grown batch by batch: one row group per batch of subjects, so a table of a whole
site is never held in memory. A file written from one batch is byte-identical to pq.write_table's."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetAppender:
    """Open writers by path; `append` adds a table to its file (created on the first call).

    Every later table must have the first table's schema (cast to it: a batch whose column is
    all null may come typed otherwise); a mismatch raises naming the file. Close before the
    files are read or moved (a context manager closes on exit, also on error)."""

    def __init__(self, parquet_options: dict) -> None:
        self.options = parquet_options
        self.writers: dict[Path, pq.ParquetWriter] = {}

    def append(self, table: pa.Table, path: Path) -> None:
        writer = self.writers.get(path)
        if writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self.writers[path] = pq.ParquetWriter(path, table.schema, **self.options)
        elif not table.schema.equals(writer.schema):
            try:
                table = table.cast(writer.schema)
            except (pa.ArrowInvalid, ValueError) as err:
                raise ValueError(
                    f"{path}: batch schema {table.schema} does not match the file's {writer.schema}"
                ) from err
        writer.write_table(table)

    def close(self) -> None:
        writers, self.writers = list(self.writers.values()), {}
        for w in writers:
            w.close()

    def __enter__(self) -> ParquetAppender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
