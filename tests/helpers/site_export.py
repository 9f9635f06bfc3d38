"""A site's export refreshed on disk, as a data refresh does it: subjects' rows taken out of
every parquet file of a site root (events, wearables, splits) and written back, or a row added.
The files stay valid MEDS (each subject's rows contiguous, in the file's order)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Removed = dict[Path, pa.Table]  # file -> the rows taken out of it


def export_files(root: Path) -> list[Path]:
    """The site's parquet files that hold subjects' rows."""
    files = sorted((root / "data").rglob("*.parquet")) + sorted((root / "wearables").rglob("*.parquet"))
    splits = root / "metadata" / "subject_splits.parquet"
    return files + ([splits] if splits.exists() else [])


def take_out(root: Path, subjects: Iterable[int]) -> Removed:
    """Remove every row of `subjects` from the export; the rows removed, per file."""
    wanted = pa.array(np.asarray(sorted(set(subjects)), np.int64))
    removed: Removed = {}
    for path in export_files(root):
        table = pq.read_table(path)
        mine = pc.is_in(table["subject_id"], value_set=wanted)
        if pc.any(mine).as_py():
            removed[path] = table.filter(mine)
            pq.write_table(table.filter(pc.invert(mine)), path)
    return removed


def put_back(removed: Removed) -> None:
    """Write rows taken out back into their files, each subject's rows where its id sorts, in
    time order (static rows first)."""
    for path, rows in removed.items():
        table = pa.concat_tables([pq.read_table(path), rows.cast(pq.read_schema(path))])
        keys: list[tuple[str, ...]] = [("subject_id", "ascending")]
        keys += [("time", "ascending", "at_start")] if "time" in table.column_names else []
        order = pc.sort_indices(table, sort_keys=keys)  # stable
        pq.write_table(table.take(order), path)


def add_event(root: Path, subject: int, like: dict[str, object]) -> None:
    """One more event row of `subject` (its other fields from `like`) in the shard that holds it."""
    for path in sorted((root / "data").rglob("*.parquet")):
        table = pq.read_table(path)
        if pc.any(pc.equal(table["subject_id"], subject)).as_py():
            row = pa.Table.from_pylist([{**like, "subject_id": subject}], schema=table.schema)
            put_back({path: row})
            return
    raise ValueError(f"subject {subject} is in no shard of {root}")


__all__ = ["Removed", "add_event", "export_files", "put_back", "take_out"]
