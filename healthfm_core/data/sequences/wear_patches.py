"""Wearable epochs -> patches of `patch_epochs` 30-s slots, streamed one piece at a time.

A site's wearables are the bulk of its rows (10^7 epochs for a few hundred subjects). Fresh
memory is what costs at that size (copying a column costs about what reading it from parquet
does), so no whole column is ever turned into numpy and, when reading files, no whole table is
held: the rows come in parts (`PatchPart`: a table, or one parquet file, wear_stream.py), each
read twice, columns apart. Pass 1 reads (subject, time) part by part to place the patches (how
many, where each subject's grid starts); pass 2 reads the channels part by part, normalises
them and writes them straight into the preallocated [patches, E, C] outputs, the only large
allocations. A part's Arrow buffers are released before the next is read, and per-piece
temporaries are a few MiB.

The rules (tokens.py's docstring): a subject's grid is anchored at its first epoch; patch k of a
subject holds the epochs whose start lies in [first + k * E * 30 s, first + (k + 1) * E * 30 s),
slot (start - patch start) // 30 s; a patch exists when at least one epoch falls in it; a null
or non-finite channel value is masked and 0. Rows are used sorted by (subject, time), ties in
input order (an unsorted table is sorted once first); of epochs sharing a slot the last wins.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from healthfm_core.data.files.layout import EPOCH_US
from healthfm_core.data.files.read_ahead import read_ahead
from healthfm_core.terms.vocabulary import Normalizer

NO_TIME = np.iinfo(np.int64).max  # "no epoch" in first_us (tokens.py's _NO_TIME)
_NO_END = np.iinfo(np.int64).min
_CHUNK_ROWS = 1 << 20  # rows per streamed piece: temporaries of ~8 MiB per int64 array


@dataclass
class WearablePatches:
    """A site's patches, CSR over subjects (rows of `subject_ids`)."""

    offsets: np.ndarray  # [S + 1] int64: subject i's patches are offsets[i]:offsets[i + 1]
    start_us: np.ndarray  # [P] int64 patch start (on the subject's grid)
    first_end_us: np.ndarray  # [P] int64 end of the patch's first epoch
    epochs: np.ndarray  # [P, E, C] float32 normalised, 0 where masked
    mask: np.ndarray  # [P, E, C] bool
    first_us: np.ndarray  # [S] int64 first epoch start (NO_TIME: none)
    last_end_us: np.ndarray  # [S] int64 end of the last epoch (int64 min: none)


class PatchPart(Protocol):
    """Some wearable rows, readable twice: the same rows in the same order each time."""

    def keys(self) -> pa.Table:
        """subject_id int64, time int64 µs (no nulls)."""
        ...

    def channels(self, with_time: bool) -> pa.Table:
        """The channel columns in normaliser order, after the time column when `with_time`."""
        ...


class TablePart:
    """An in-memory table (subject_id, time int64 µs, then the channels) as a part."""

    def __init__(self, table: pa.Table, n_channels: int) -> None:
        self.table, self.n_channels = table, n_channels

    def keys(self) -> pa.Table:
        return self.table.select([0, 1])

    def channels(self, with_time: bool) -> pa.Table:
        return self.table.select([*([1] if with_time else []), *range(2, 2 + self.n_channels)])


@dataclass
class UnplacedPatches:
    """Patches keyed by the wearables' own subjects; `placed` lays them on a site's subjects."""

    subject_ids: np.ndarray  # [W] int64 sorted subjects with epochs
    patch_subject: np.ndarray  # [P] int64 row of subject_ids of each patch (non-decreasing)
    start_us: np.ndarray  # [P] int64
    first_end_us: np.ndarray  # [P] int64
    epochs: np.ndarray  # [P, E, C] float32
    mask: np.ndarray  # [P, E, C] bool
    first_us: np.ndarray  # [W] int64 first epoch start
    last_end_us: np.ndarray  # [W] int64 end of the last epoch
    n_rows: int  # epochs read

    def placed(self, subject_ids: np.ndarray) -> WearablePatches:
        """The patches over `subject_ids` (sorted, a superset of this one's subjects)."""
        n_subj = len(subject_ids)
        rows = np.searchsorted(subject_ids, self.subject_ids)
        if np.any(rows >= n_subj) or np.any(subject_ids[np.minimum(rows, max(n_subj - 1, 0))] != self.subject_ids):
            raise ValueError("UnplacedPatches.placed: subject_ids do not hold every subject with wearables")
        first_us = np.full(n_subj, NO_TIME, dtype=np.int64)
        last_end_us = np.full(n_subj, _NO_END, dtype=np.int64)
        first_us[rows], last_end_us[rows] = self.first_us, self.last_end_us
        return WearablePatches(
            offsets=np.searchsorted(rows[self.patch_subject], np.arange(n_subj + 1), side="left").astype(np.int64),
            start_us=self.start_us,
            first_end_us=self.first_end_us,
            epochs=self.epochs,
            mask=self.mask,
            first_us=first_us,
            last_end_us=last_end_us,
        )


def subject_ids_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Sorted distinct ids of an int64 column, one chunk at a time (runs collapsed first)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    runs = []
    for chunk in chunks:
        a = chunk.to_numpy(zero_copy_only=False)
        if len(a):
            runs.append(a[np.concatenate([[True], a[1:] != a[:-1]])])
    return np.unique(np.concatenate(runs)).astype(np.int64) if runs else np.zeros(0, np.int64)


def _pieces(table: pa.Table) -> list[pa.RecordBatch]:
    """Aligned record batches of at most _CHUNK_ROWS rows (many small chunks are merged first)."""
    n_chunks = max((c.num_chunks for c in table.columns), default=0)
    if n_chunks > 16 and table.num_rows < 1024 * n_chunks:  # per-piece overhead would dominate
        table = table.combine_chunks()
    return [b for b in table.to_batches(max_chunksize=_CHUNK_ROWS) if b.num_rows]


def _numpy(batch: pa.RecordBatch, i: int) -> np.ndarray:
    return batch.column(i).to_numpy(zero_copy_only=False)


def _is_sorted(pieces: list[pa.RecordBatch]) -> bool:
    """Whether rows are ordered by (subject, time), chunk by chunk with the seam checked."""
    prev: tuple[np.generic, np.generic] | None = None
    for b in pieces:
        s, t = _numpy(b, 0), _numpy(b, 1)
        if prev is not None and (prev[0] > s[0] or (prev[0] == s[0] and prev[1] > t[0])):
            return False
        brk = s[1:] != s[:-1]
        runs = s[np.flatnonzero(brk) + 1]
        # Subjects ascend iff each run's id exceeds the one before (runs are maximal).
        if (len(runs) and (runs[0] <= s[0] or np.any(runs[1:] <= runs[:-1]))) or not ((t[1:] >= t[:-1]) | brk).all():
            return False
        prev = (s[-1], t[-1])
    return True


def sorted_by_subject_time(table: pa.Table) -> bool:
    """Whether a table's rows are ordered by (subject_id, time), one chunk at a time (no copy)."""
    if table.num_rows < 2:
        return True
    return _is_sorted(_pieces(table.select(["subject_id", "time"])))


def _sorted_table(table: pa.Table) -> pa.Table:
    """Rows by (subject, time), ties in input order (lexsort is stable)."""
    s = table.column(0).to_numpy()
    t = table.column(1).to_numpy()
    return table.take(pa.array(np.lexsort((t, s))))


class UnsortedWearables(Exception):
    """Pass 1 met rows out of (subject, time) order (the caller sorts and builds again)."""


@dataclass
class _Piece:
    """What pass 1 learns about one piece, for pass 2: where each row goes in the flat
    [patches * E] slot array. On a grid piece (every run consecutive 30-s epochs) run r's rows
    go to base[r] + 0, 1, ...; otherwise each row's slot is recomputed from its time."""

    run_len: np.ndarray  # rows per subject run in the piece
    anchor: np.ndarray  # per run: its grid anchor (the subject's first epoch)
    base: np.ndarray | None  # per run, grid pieces only: flat slot of its first row
    patch_rows: np.ndarray  # local row of each patch that starts in the piece
    first_patch: int  # global index of the patch holding the piece's first row
    run_sid: np.ndarray  # per run: its subject
    run_last_us: np.ndarray  # per run: its last row's time
    row0: int = 0  # the piece's first row in its part
    n_rows: int = 0


class _Carry:
    """The last row of the pieces read so far (a subject may go on in the next piece)."""

    def __init__(self) -> None:
        self.sid: int | None = None
        self.anchor = self.time = self.k = 0


def _place(s: np.ndarray, t: np.ndarray, carry: _Carry, n_patch: int, E: int) -> tuple[_Piece, np.ndarray, np.ndarray]:
    """Pass 1 on one piece: (piece, k of each patch that starts in it, its local first row)."""
    n = len(s)
    patch_us = E * EPOCH_US
    brk = s[1:] != s[:-1]
    run_start = np.concatenate([[0], np.flatnonzero(brk) + 1])
    run_len = np.diff(np.append(run_start, n))
    run_sid = s[run_start]
    continuing = carry.sid is not None and int(s[0]) == carry.sid
    if (carry.sid is not None and (int(s[0]) < carry.sid or (continuing and int(t[0]) < carry.time))) or np.any(
        run_sid[1:] <= run_sid[:-1]
    ):
        raise UnsortedWearables
    anchor = t[run_start]
    if continuing:  # the previous piece's last subject goes on: keep its anchor
        anchor[0] = carry.anchor
    d = t[1:] - t[:-1]
    grid = bool(((d == EPOCH_US) | brk).all()) and (not continuing or int(t[0]) - carry.time == EPOCH_US)
    if grid:
        # Run r's row j is epoch o[r] + j of its subject's grid: patches start where that is 0 mod E.
        o = (t[run_start] - anchor) // EPOCH_US
        j0 = (-o) % E
        count = np.maximum(0, (run_len - j0 + E - 1) // E)
        m = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        rows = np.repeat(run_start + j0, count) + E * m
        k = np.repeat((o + j0) // E, count) + m
        opens = o % E == 0  # the run's first row opens a patch (else it goes on the last one)
        first = n_patch - (0 if opens[0] else 1)
        patch_of_run = n_patch + np.cumsum(count) - count - (~opens)
        base = patch_of_run * E + o % E
    else:
        if not ((d >= 0) | brk).all():
            raise UnsortedWearables
        kk = (t - np.repeat(anchor, run_len)) // patch_us
        new = np.empty(n, dtype=bool)
        new[0] = not (continuing and int(kk[0]) == carry.k)
        new[1:] = brk | (kk[1:] != kk[:-1])
        rows = np.flatnonzero(new)
        k = kk[rows]
        first = n_patch if new[0] else n_patch - 1
        base = None
    carry.sid, carry.anchor, carry.time = int(s[-1]), int(anchor[-1]), int(t[-1])
    carry.k = (carry.time - carry.anchor) // patch_us
    return _Piece(run_len, anchor, base, rows, first, run_sid, t[run_start + run_len - 1]), k, rows


def build_patches(
    table: pa.Table,
    subject_ids: np.ndarray,
    patch_epochs: int,
    normalisers: Sequence[Normalizer],
) -> WearablePatches:
    """Patches of a table (subject_id int64, time int64 µs without nulls, one column per channel
    in `normalisers` order). `subject_ids`: sorted, holding every subject of the table."""
    return patches_of_table(table, patch_epochs, normalisers).placed(subject_ids)


def patches_of_table(table: pa.Table, patch_epochs: int, normalisers: Sequence[Normalizer]) -> UnplacedPatches:
    """`patches_of_parts` of one in-memory table (as `build_patches`), sorted first if need be."""
    try:
        return patches_of_parts([TablePart(table, len(normalisers))], patch_epochs, normalisers)
    except UnsortedWearables:
        return patches_of_parts([TablePart(_sorted_table(table), len(normalisers))], patch_epochs, normalisers)


def patches_of_parts(
    parts: Sequence[PatchPart], patch_epochs: int, normalisers: Sequence[Normalizer]
) -> UnplacedPatches:
    """Patches of the parts' rows taken in order as one table; UnsortedWearables if those rows
    are not ordered by (subject, time)."""
    plan = plan_patches(parts, patch_epochs, normalisers)
    plan.fill()
    return plan.patches


@dataclass
class PatchPlan:
    """Pass 1 done: `patches` has every array but epochs and mask, which are allocated (zeros)
    and written by `fill` (pass 2). Nothing reads them before: a caller may do other work (a
    site's EHR rows) while `fill` runs in another thread; numpy and parquet decoding release
    the GIL, so the two overlap."""

    patches: UnplacedPatches
    fill: Callable[[], None]


def plan_patches(parts: Sequence[PatchPart], patch_epochs: int, normalisers: Sequence[Normalizer]) -> PatchPlan:
    """Pass 1 of `patches_of_parts` now, pass 2 as the plan's `fill`; UnsortedWearables (from
    pass 1) if the rows are not ordered by (subject, time)."""
    E, C = patch_epochs, len(normalisers)
    patch_us = E * EPOCH_US

    # ---- Pass 1: runs (subjects), grid anchors, where patches start; keys dropped part by part.
    info: list[list[_Piece]] = []
    p_sid: list[np.ndarray] = []
    p_k: list[np.ndarray] = []
    p_time: list[np.ndarray] = []
    carry, n_patch, n_rows = _Carry(), 0, 0
    for keys in read_ahead([part.keys for part in parts], "wear-read"):
        placed = _place_part(_pieces(keys), carry, n_patch, E, p_sid, p_k, p_time)
        del keys  # its buffers go back to the pool before the next part is read
        info.append(placed)
        n_patch += sum(len(p.patch_rows) for p in placed)
        n_rows += sum(p.n_rows for p in placed)
    pieces = [p for placed in info for p in placed]

    if pieces:
        # A subject cut by a piece boundary has two runs: its first gives the anchor, its last the end.
        sub = np.concatenate([p.run_sid for p in pieces])
        step = sub[1:] != sub[:-1]
        head, tail = np.concatenate([[True], step]), np.concatenate([step, [True]])
        w_sids = sub[head].astype(np.int64)
        first_us = np.concatenate([p.anchor for p in pieces])[head].astype(np.int64)
        last_end_us = np.concatenate([p.run_last_us for p in pieces])[tail] + EPOCH_US
        p_sub = np.searchsorted(w_sids, np.concatenate(p_sid)).astype(np.int64)
        k_all = np.concatenate(p_k)
        first_end = np.concatenate(p_time) + EPOCH_US
    else:
        w_sids, first_us, last_end_us = (np.zeros(0, np.int64) for _ in range(3))
        p_sub, k_all, first_end = (np.zeros(0, np.int64) for _ in range(3))

    # ---- Pass 2 (fill): channels part by part, normalised straight into their patch slots.
    epochs = np.zeros((n_patch * E, C), dtype=np.float32)
    mask = np.zeros((n_patch * E, C), dtype=bool)
    todo = [(part, placed, any(p.base is None for p in placed)) for part, placed in zip(parts, info) if placed]

    def fill() -> None:
        reads = [functools.partial(part.channels, with_time) for part, _, with_time in todo]  # off grid: by time
        for (_, placed, with_time), channels in zip(todo, read_ahead(reads, "wear-read")):
            for piece in placed:
                _write_piece(channels.slice(piece.row0, piece.n_rows), piece, with_time, E, normalisers, epochs, mask)
            del channels

    patches = UnplacedPatches(
        subject_ids=w_sids,
        patch_subject=p_sub,
        start_us=first_us[p_sub] + k_all * patch_us,
        first_end_us=first_end,
        epochs=epochs.reshape(n_patch, E, C),
        mask=mask.reshape(n_patch, E, C),
        first_us=first_us,
        last_end_us=last_end_us,
        n_rows=n_rows,
    )
    return PatchPlan(patches, fill)


def _place_part(
    pieces: list[pa.RecordBatch],
    carry: _Carry,
    n_patch: int,
    E: int,
    p_sid: list[np.ndarray],
    p_k: list[np.ndarray],
    p_time: list[np.ndarray],
) -> list[_Piece]:
    """Pass 1 on one part's pieces; appends each patch's subject, k and first time."""
    placed, row0 = [], 0
    for b in pieces:
        s, t = _numpy(b, 0), _numpy(b, 1)
        piece, k, rows = _place(s, t, carry, n_patch, E)
        piece.row0, piece.n_rows = row0, b.num_rows
        row0 += b.num_rows
        n_patch += len(rows)
        placed.append(piece)
        p_sid.append(s[rows])
        p_k.append(k)
        p_time.append(t[rows])
    return placed


def _column(table: pa.Table, i: int) -> pa.Array:
    column = table.column(i)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _write_piece(
    piece_table: pa.Table,
    piece: _Piece,
    with_time: bool,
    E: int,
    normalisers: Sequence[Normalizer],
    epochs: np.ndarray,
    mask: np.ndarray,
) -> None:
    """Normalise one piece's channels and write them into their slots of epochs/mask [P * E, C]."""
    n = piece.n_rows
    dest: slice | np.ndarray
    if piece.base is not None:
        run_start = np.cumsum(piece.run_len) - piece.run_len
        if np.all(piece.base[1:] == piece.base[:-1] + piece.run_len[:-1]):
            dest = slice(int(piece.base[0]), int(piece.base[0]) + n)  # one contiguous block
        else:
            dest = np.repeat(piece.base - run_start, piece.run_len) + np.arange(n)
    else:
        t = _column(piece_table, 0).to_numpy(zero_copy_only=False)
        e = (t - np.repeat(piece.anchor, piece.run_len)) // EPOCH_US  # epoch on the subject's grid
        rows = piece.patch_rows
        bounds = rows if len(rows) and rows[0] == 0 else np.concatenate([[0], rows])
        seg = np.diff(np.append(bounds, n))
        pid = np.repeat(np.arange(piece.first_patch, piece.first_patch + len(seg), dtype=np.int64), seg)
        dest = pid * E + (e - (e // E) * E)
    for c, norm in enumerate(normalisers):
        column = _column(piece_table, c + int(with_time))
        if column.null_count == n and piece.base is not None:
            continue  # all missing, and no slot written twice on a grid: zeros stay
        x = column.to_numpy(zero_copy_only=False)
        ok = np.isfinite(x)
        all_ok = bool(ok.all())
        if isinstance(dest, slice):  # normalised in place, in the output
            out = epochs[dest, c]
            norm.apply(x if all_ok else np.where(ok, x, 0.0), out=out)
            if not all_ok:
                out[~ok] = 0.0
            mask[dest, c] = True if all_ok else ok
            continue
        if all_ok:
            v = norm.apply(x).astype(np.float32, copy=False)
        else:
            v = norm.apply(np.where(ok, x, 0.0)).astype(np.float32, copy=False)
            v[~ok] = 0.0
        epochs[dest, c] = v
        mask[dest, c] = ok


__all__ = [
    "NO_TIME",
    "PatchPart",
    "PatchPlan",
    "TablePart",
    "UnplacedPatches",
    "UnsortedWearables",
    "WearablePatches",
    "build_patches",
    "patches_of_parts",
    "patches_of_table",
    "plan_patches",
    "sorted_by_subject_time",
    "subject_ids_of",
]
