"""Wearable epochs -> patches of `patch_epochs` 30-s slots, streamed one Arrow chunk at a time.

A site's wearables are the bulk of its rows (10^7 epochs for a few hundred subjects). Fresh
memory is what costs at that size (copying a column costs about what reading it from parquet
does), so no whole column is ever turned into numpy: two passes over zero-copy chunk views, one
to place the patches (how many, where each subject's grid starts), one to normalise the channels
and write them into the preallocated [patches, E, C] outputs, the only large allocations.
Per-chunk temporaries are a few MiB and reused.

The rules (tokens.py's docstring): a subject's grid is anchored at its first epoch; patch k of a
subject holds the epochs whose start lies in [first + k * E * 30 s, first + (k + 1) * E * 30 s),
slot (start - patch start) // 30 s; a patch exists when at least one epoch falls in it; a null
or non-finite channel value is masked and 0. Rows are used sorted by (subject, time), ties in
input order (an unsorted table is sorted once first); of epochs sharing a slot the last wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthfm_core.data.layout import EPOCH_US
from healthfm_core.data.vocab import Normalizer

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


class _Unsorted(Exception):
    """Pass 1 met rows out of (subject, time) order."""


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
        raise _Unsorted
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
            raise _Unsorted
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
    return _Piece(run_len, anchor, base, rows, first), k, rows


def build_patches(
    table: pa.Table,
    subject_ids: np.ndarray,
    patch_epochs: int,
    normalisers: Sequence[Normalizer],
) -> WearablePatches:
    """Patches of a table (subject_id int64, time int64 µs without nulls, one column per channel
    in `normalisers` order). `subject_ids`: sorted, holding every subject of the table."""
    E, C = patch_epochs, len(normalisers)
    patch_us = E * EPOCH_US
    n_subj = len(subject_ids)
    pieces = _pieces(table)

    # ---- Pass 1: runs (subjects), grid anchors, where patches start.
    for attempt in range(2):
        info: list[_Piece] = []
        p_sid, p_k, p_time = [], [], []
        carry, n_patch = _Carry(), 0
        try:
            for b in pieces:
                s, t = _numpy(b, 0), _numpy(b, 1)
                piece, k, rows = _place(s, t, carry, n_patch, E)
                info.append(piece)
                n_patch += len(rows)
                p_sid.append(s[rows])
                p_k.append(k)
                p_time.append(t[rows])
            break
        except _Unsorted:
            if attempt:
                raise
            pieces = _pieces(_sorted_table(table))

    first_us = np.full(n_subj, NO_TIME, dtype=np.int64)
    last_end_us = np.full(n_subj, _NO_END, dtype=np.int64)
    if pieces:
        # A subject cut by a piece boundary has two runs: its first gives the anchor, its last the end.
        sub = np.concatenate([_numpy(b, 0)[np.cumsum(p.run_len) - p.run_len] for b, p in zip(pieces, info)])
        last = np.concatenate([_numpy(b, 1)[np.cumsum(p.run_len) - 1] for b, p in zip(pieces, info)])
        step = sub[1:] != sub[:-1]
        head, tail = np.concatenate([[True], step]), np.concatenate([step, [True]])
        first_us[np.searchsorted(subject_ids, sub[head])] = np.concatenate([p.anchor for p in info])[head]
        last_end_us[np.searchsorted(subject_ids, sub[tail])] = last[tail] + EPOCH_US
    p_sub = np.searchsorted(subject_ids, np.concatenate(p_sid)) if pieces else np.zeros(0, np.int64)
    k_all = np.concatenate(p_k) if pieces else np.zeros(0, np.int64)
    first_end = np.concatenate(p_time) + EPOCH_US if pieces else np.zeros(0, np.int64)

    # ---- Pass 2: normalise each channel and write it into its patch slots.
    epochs = np.zeros((n_patch * E, C), dtype=np.float32)
    mask = np.zeros((n_patch * E, C), dtype=bool)
    for b, piece in zip(pieces, info):
        n = b.num_rows
        dest: slice | np.ndarray
        if piece.base is not None:
            run_start = np.cumsum(piece.run_len) - piece.run_len
            if np.all(piece.base[1:] == piece.base[:-1] + piece.run_len[:-1]):
                dest = slice(int(piece.base[0]), int(piece.base[0]) + n)  # one contiguous block
            else:
                dest = np.repeat(piece.base - run_start, piece.run_len) + np.arange(n)
        else:
            t = _numpy(b, 1)
            e = (t - np.repeat(piece.anchor, piece.run_len)) // EPOCH_US  # epoch on the subject's grid
            rows = piece.patch_rows
            bounds = rows if len(rows) and rows[0] == 0 else np.concatenate([[0], rows])
            seg = np.diff(np.append(bounds, n))
            pid = np.repeat(np.arange(piece.first_patch, piece.first_patch + len(seg), dtype=np.int64), seg)
            dest = pid * E + (e - (e // E) * E)
        for c, norm in enumerate(normalisers):
            column = b.column(2 + c)
            if column.null_count == n and piece.base is not None:
                continue  # all missing, and no slot written twice on a grid: zeros stay
            x = column.to_numpy(zero_copy_only=False)
            ok = np.isfinite(x)
            if ok.all():
                v = norm.apply(x).astype(np.float32, copy=False)
            else:
                v = norm.apply(np.where(ok, x, 0.0)).astype(np.float32, copy=False)
                v[~ok] = 0.0
            epochs[dest, c] = v
            mask[dest, c] = ok

    return WearablePatches(
        offsets=np.searchsorted(p_sub, np.arange(n_subj + 1), side="left").astype(np.int64),
        start_us=first_us[p_sub] + k_all * patch_us,
        first_end_us=first_end,
        epochs=epochs.reshape(n_patch, E, C),
        mask=mask.reshape(n_patch, E, C),
        first_us=first_us,
        last_end_us=last_end_us,
    )


__all__ = ["NO_TIME", "WearablePatches", "build_patches", "sorted_by_subject_time", "subject_ids_of"]
