"""A whole batch of samples gathered from a site's CSR arrays in one numpy pass.

`SiteSequences.sample` builds one sample with a few dozen small numpy calls and `collate` then
copies it into the padded batch: at 2,000 samples that per-call overhead is most of the batch
stage. Here every sample's slices are turned into flat index arrays (`ranges`) and scattered
straight into the padded arrays. The rules are those of `sample` + `collate` (tokens.py), element
for element the same operations, so a batch is bit for bit `collate([sample(...) ...])`
(tests/unit/test_pipeline_equivalence.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from healthfm_core.data.sequences.codes import PAD_CODE

US_PER_DAY = 86_400_000_000


def ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, position within its range, value) of every integer of [start[i], stop[i]),
    range after range (stop >= start)."""
    n = stop - start
    owner = np.repeat(np.arange(len(n), dtype=np.int64), n)
    pos = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return owner, pos, start[owner] + pos


def segment_searchsorted(values: Any, start: np.ndarray, stop: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """start[i] + searchsorted(values[start[i]:stop[i]], keys[i], side="right") for every i
    (each segment sorted; `values` an array, or anything sliced into one, as RowTimes)."""
    return np.array(
        [
            a + int(np.searchsorted(values[a:b], k, side="right"))
            for a, b, k in zip(start.tolist(), stop.tolist(), keys)
        ],
        dtype=np.int64,
    ).reshape(len(start))


@dataclass
class PooledEntries:
    """Tokens pooled once per site (tokens.py), CSR over groups (buckets, or subjects for the
    static token): an entry is the index of the row it keeps (uint32 while the rows fit), in slot
    order. About one entry per row (hospital: 0.99), so a copy of the rows' code, value and
    has_value would cost 7 B a row where the index costs 4. An entry's slot is its place in its
    group (entry - offsets[group]): not stored."""

    offsets: np.ndarray  # [G + 1] entries of group g: offsets[g]:offsets[g + 1]
    rows: np.ndarray  # [entries] the row each entry keeps

    def take(
        self, entries: np.ndarray | slice, columns: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows' codes, values and has_value (`columns`) at `entries`."""
        rows = self.rows[entries]
        return columns[0][rows], columns[1][rows], columns[2][rows]


@dataclass
class TokenSlices:
    """Per sample of a batch: which pooled rows make its EHR tokens (tokens.py's `_tokens`)."""

    n_static: np.ndarray  # [B] 0/1: the static token is there
    b_first: np.ndarray  # [B] first whole bucket
    b_end: np.ndarray  # [B] one past the last whole bucket
    n_tok: np.ndarray  # [B] tokens in all (static, whole buckets, the cut one)


def gather_tokens(
    slices: TokenSlices,
    static: PooledEntries,
    static_rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    static_index: np.ndarray,
    buckets: PooledEntries,
    bucket_rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_codes: int,
    cut_width: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded [B, N, K] codes, values, has_value of the static and whole-bucket tokens (the cut
    bucket's row, the last, is left for the caller). K as collate makes it: the widest sample,
    each sample min(max_codes, its widest token), 1 for a sample without tokens."""
    B = len(slices.n_tok)
    st_offsets, bp_offsets = static.offsets, buckets.offsets
    n_static_codes = (st_offsets[static_index + 1] - st_offsets[static_index]) * slices.n_static
    owner, _, bucket = ranges(slices.b_first, slices.b_end)
    widest = n_static_codes.copy()
    if len(bucket):
        # Only the batch's buckets: a diff of every offset cost O(site) a batch (x3 a 16k site's batch).
        np.maximum.at(widest, owner, bp_offsets[bucket + 1] - bp_offsets[bucket])
    widest = np.maximum(widest, cut_width)
    k = np.where(slices.n_tok > 0, np.minimum(max_codes, widest), 1)
    N = max(1, int(slices.n_tok.max(initial=0)))
    K = max(1, int(k.max(initial=0)))
    codes = np.full((B, N, K), PAD_CODE, dtype=np.int64)
    values = np.zeros((B, N, K), dtype=np.float32)
    has_value = np.zeros((B, N, K), dtype=bool)
    # Static token: its first min(count, k) codes in slot order.
    s_owner, s_pos, s_entry = ranges(st_offsets[static_index], st_offsets[static_index] + np.minimum(n_static_codes, k))
    codes[s_owner, 0, s_pos], values[s_owner, 0, s_pos], has_value[s_owner, 0, s_pos] = static.take(
        s_entry, static_rows
    )
    # Whole buckets: entry e of bucket b goes to row n_static + (b - b_first), its slot, if < k.
    e_owner, _, entry = ranges(bp_offsets[slices.b_first], bp_offsets[slices.b_end])
    e_bucket = np.searchsorted(bp_offsets, entry, side="right") - 1
    row = slices.n_static[e_owner] + e_bucket - slices.b_first[e_owner]
    slot = entry - bp_offsets[e_bucket]  # entries of a bucket are stored in slot order
    keep = slot < k[e_owner]
    e_owner, row, slot, entry = e_owner[keep], row[keep], slot[keep], entry[keep]
    codes[e_owner, row, slot], values[e_owner, row, slot], has_value[e_owner, row, slot] = buckets.take(
        entry, bucket_rows
    )
    return codes, values, has_value


def gather_patches(
    p_start: np.ndarray,
    p_vis: np.ndarray,
    pt: np.ndarray,
    t0: np.ndarray,
    start_us: np.ndarray,
    epochs: np.ndarray,
    mask: np.ndarray,
    patch_epochs: int,
    epoch_us: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded [B, P, E, C] epochs and mask, [B, P] times (days) and valid of patches
    p_start[i]:p_vis[i]; a last patch that straddles pt has its late epochs zeroed and masked."""
    B = len(p_start)
    E, C = epochs.shape[1:]
    n = p_vis - p_start
    P = max(1, int(n.max(initial=0)))
    wear = np.zeros((B, P, E, C), dtype=np.float32)
    wmask = np.zeros((B, P, E, C), dtype=bool)
    wtimes = np.zeros((B, P), dtype=np.float32)
    owner, pos, patch = ranges(p_start, p_vis)
    wear[owner, pos] = epochs[patch]
    wmask[owner, pos] = mask[patch]
    wtimes[owner, pos] = ((start_us[patch] - t0[owner]) / US_PER_DAY).astype(np.float32)
    has = np.flatnonzero(n > 0)
    last_start = start_us[p_vis[has] - 1]
    straddle = last_start + patch_epochs * epoch_us > pt[has]
    i, last_start = has[straddle], last_start[straddle]
    if len(i):
        late = last_start[:, None] + (np.arange(patch_epochs) + 1) * epoch_us > pt[i][:, None]  # [b, E]
        w, m = wear[i, n[i] - 1], wmask[i, n[i] - 1]
        w[late], m[late] = 0.0, False
        wear[i, n[i] - 1], wmask[i, n[i] - 1] = w, m
    present = np.asarray(wmask.any(axis=(2, 3)))
    return wear, wmask, wtimes, present


__all__ = ["TokenSlices", "gather_patches", "gather_tokens", "ranges", "segment_searchsorted"]
