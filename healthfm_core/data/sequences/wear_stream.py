"""A site's wearable files streamed into patches, file by file, without holding the table.

`Site.read_wearables` concatenates every file into one table (for a biobank, 10^7 epochs and
about 300 MiB) before a patch is built. Here each file is a `PatchPart` (wear_patches.py): its
(subject_id, time) columns are read for pass 1 and dropped, then its channels for pass 2, which
writes them into the patch arrays while they are hot. Each column of each file is decoded once
(the time column twice for files off the 30-s grid), the rows and their casts are those of
`Site.read_wearables` (same files, order, subject filter and WEARABLES_SCHEMA types), so the
patches are bit for bit the same. Rows out of (subject, time) order, within or across files,
fall back to `read_wearables`, which sorts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthfm_core.data.files.layout import WEARABLES_SCHEMA, SiteLike
from healthfm_core.data.files.parquet_guard import read_parquet
from healthfm_core.data.sequences.wear_patches import (
    PatchPlan,
    UnplacedPatches,
    UnsortedWearables,
    patches_of_table,
    plan_patches,
)
from healthfm_core.terms.site_layout import WEARABLE_CHANNELS
from healthfm_core.terms.vocabulary import Normalizer


class WearableFilePart:
    """One wearables parquet file (optionally only some subjects) as a `PatchPart`."""

    def __init__(self, path: Path, subject_ids: pa.Array | None = None) -> None:
        self.path, self.subject_ids = path, subject_ids

    def _read(self, columns: list[str]) -> pa.Table:
        kwargs: dict[str, Any] = {"columns": columns}
        if self.subject_ids is not None:
            kwargs["filters"] = pc.is_in(pc.field("subject_id"), value_set=self.subject_ids)
        table = read_parquet(self.path, **kwargs)  # its footer checked first
        return table.cast(pa.schema([WEARABLES_SCHEMA.field(c) for c in columns]))

    def _time_us(self, table: pa.Table) -> pa.ChunkedArray:
        time = table["time"]
        if time.null_count:
            raise ValueError(f"{self.path}: wearables column 'time' has {time.null_count} null values")
        return time.cast(pa.int64())  # timestamp[us] after the cast: the same buffers

    def keys(self) -> pa.Table:
        table = self._read(["subject_id", "time"])
        return pa.table([table["subject_id"], self._time_us(table)], names=["subject_id", "time"])

    def channels(self, with_time: bool) -> pa.Table:
        table = self._read([*(["time"] if with_time else []), *WEARABLE_CHANNELS])
        if not with_time:
            return table
        return table.set_column(0, "time", self._time_us(table))


def wearable_key_table(wearables: pa.Table) -> pa.Table:
    """A WEARABLES_SCHEMA table as build_patches takes it: time as int64 µs, channels in order."""
    time = wearables["time"]
    if time.null_count:
        raise ValueError("wearables column 'time' has null values")
    return pa.table(
        [wearables["subject_id"].cast(pa.int64()), time.cast(pa.int64()), *(wearables[c] for c in WEARABLE_CHANNELS)],
        names=["subject_id", "time", *WEARABLE_CHANNELS],
    )


def site_patches(
    site: SiteLike,
    patch_epochs: int,
    normalisers: Sequence[Normalizer],
    subject_ids: Iterable[int] | None = None,
) -> UnplacedPatches | None:
    """Patches of a site's wearables (of `subject_ids` only, if given), read file by file;
    None when it has no epochs."""
    plan = site_patch_plan(site, patch_epochs, normalisers, subject_ids)
    plan.fill()
    return plan.patches if plan.patches.n_rows else None


def site_patch_plan(
    site: SiteLike,
    patch_epochs: int,
    normalisers: Sequence[Normalizer],
    subject_ids: Iterable[int] | None = None,
) -> PatchPlan:
    """`site_patches` in two steps: pass 1 (keys) now, the channels when the plan's `fill` runs
    (wear_patches.plan_patches). Unsorted rows are sorted and built whole now (nothing to fill)."""
    wanted = None if subject_ids is None else pa.array(np.asarray(list(subject_ids), dtype=np.int64))
    parts = [WearableFilePart(path, wanted) for path in site.wearable_files]
    try:
        return plan_patches(parts, patch_epochs, normalisers)
    except UnsortedWearables:  # rare: read_wearables sorts the whole table
        table = site.read_wearables(None if wanted is None else wanted.to_pylist())
        patches = patches_of_table(wearable_key_table(table.cast(WEARABLES_SCHEMA)), patch_epochs, normalisers)
        return PatchPlan(patches, _nothing_to_fill)


def _nothing_to_fill() -> None:
    pass


__all__ = ["WearableFilePart", "site_patch_plan", "site_patches", "wearable_key_table"]
