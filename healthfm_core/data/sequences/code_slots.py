"""Which row fills which slot of a token: the pooling rule of tokens.py, in two implementations.

`code_slots` is the rule as written (a five-key lexsort of the rows): every (token, distinct
code) keeps its latest row (ties: the row with a value, then the larger value, then the later
row), and a token's kept codes are ranked by priority, then code id. It pools one sample's cut
bucket and is the reference.

`sorted_slot_chunks` gives the same result, element for element, for a whole site's rows, which
arrive grouped by token (CSR offsets, no per-row token array) and sorted by time within a token
(the order SiteSequences keeps them in), one chunk of tokens at a time: one
stable sort of one int64 key (token, rank of the code) per chunk of whole tokens replaces the
lexsort of every row (24 s of a 10^7-row load), and only the (token, code) groups whose latest
time is shared by two rows are settled by the reference rule. Chunks keep the sort's working set
small; results are concatenated, so the output does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

CHUNK_ROWS = 1 << 20  # rows per sort: bounded temporaries, cache-sized keys


def code_slots(
    token: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: np.ndarray,
    priority: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row kept, its token, its slot) for every (token, distinct code), in (token, slot) order,
    uncapped, for rows in any order."""
    # Latest row per (token, code): sort so that it comes last in its group.
    order = np.lexsort((values, has_value, time_us, codes, token))
    tk, cd = token[order], codes[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (tk[1:] != tk[:-1]) | (cd[1:] != cd[:-1])
    kept = order[last]
    # Rank the token's codes by priority (then code id): the slot order the cap cuts.
    tk, cd = token[kept], codes[kept]
    rank_order = np.lexsort((cd, priority[cd], tk))
    kept, tk = kept[rank_order], tk[rank_order]
    return kept, tk, slots_of(tk)


def slots_of(tk: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal (sorted) tokens."""
    if not len(tk):
        return np.zeros(0, np.int64)
    group_start = np.flatnonzero(np.r_[True, tk[1:] != tk[:-1]])
    return np.arange(len(tk)) - np.repeat(group_start, np.diff(np.r_[group_start, len(tk)]))


def code_rank(priority: np.ndarray) -> np.ndarray:
    """Each code id's place in the slot order (priority ascending, then code id)."""
    order = np.lexsort((np.arange(len(priority)), priority))
    rank = np.empty(len(priority), dtype=np.int64)
    rank[order] = np.arange(len(priority), dtype=np.int64)
    return rank


def sorted_slot_chunks(
    offsets: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: Any,
    priority: np.ndarray,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """`code_slots` of rows grouped by token as CSR `offsets` (token g: rows offsets[g]:offsets[g + 1],
    sorted by time within a token), one chunk of whole tokens at a time: (first row, first token,
    end token, kept rows (chunk-local), how many each token of the chunk keeps), in (token, slot)
    order. No per-row
    token array is ever built: a site pools in the memory of one chunk beyond its rows."""
    n = len(codes)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or np.any(offsets[1:] < offsets[:-1]):
        raise ValueError("sorted_slot_chunks: offsets must rise from 0 to the number of rows")
    if n == 0:
        return
    rank = code_rank(priority)
    n_groups = len(offsets) - 1
    # Chunk bounds at token starts, about chunk_rows apart (a token never straddles two).
    cuts = np.unique(np.r_[np.searchsorted(offsets, np.arange(0, n, max(1, chunk_rows)), side="left"), n_groups])
    for g0, g1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        a, b = int(offsets[g0]), int(offsets[g1])
        if a == b:
            continue
        sizes = np.diff(offsets[g0 : g1 + 1])
        # (token, rank of the code) as one int64, token chunk-local: no per-row token array.
        key = np.repeat(np.arange(0, (g1 - g0) * len(rank), len(rank), dtype=np.int64), sizes)
        key += rank[codes[a:b]]
        kept, dropped_tokens = _chunk_kept(key, len(rank), codes[a:b], values[a:b], has_value[a:b], time_us, a)
        sizes -= np.bincount(dropped_tokens, minlength=g1 - g0)
        yield a, g0, g1, kept, sizes


def sorted_code_slots(
    offsets: np.ndarray, *columns: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`code_slots` (kept row, token, slot) of rows grouped by token as CSR `offsets` and sorted by
    time within each token, whole: `columns` are `sorted_slot_chunks`'s (codes, values,
    has_value, time_us, priority). The reference for the chunks, which tokens.py streams."""
    chunks = sorted_slot_chunks(offsets, *columns, chunk_rows=chunk_rows)
    parts = [(a + kept, np.repeat(np.arange(g0, g1), counts)) for a, g0, g1, kept, counts in chunks]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    tk = np.concatenate([t for _, t in parts])
    return np.concatenate([k for k, _ in parts]), tk, slots_of(tk)


def _chunk_kept(
    key: np.ndarray,
    n_codes: int,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: Any,
    first_row: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows in (token, slot) order, the token of each row not kept) of one chunk of whole
    tokens, chunk-local: `key` is token * n_codes + the code's rank, `codes`, `values`,
    `has_value` the chunk's; `time_us` the whole site's, the chunk starting at `first_row`."""
    # Stable: within a (token, code) group rows stay in time order, ties in row order.
    order = np.argsort(key, kind="stable")
    k = key[order]
    same = k[1:] == k[:-1]  # sorted position i and i + 1 in one group
    last = np.ones(len(k), dtype=bool)
    last[:-1] = ~same
    kept = order[last]
    # Only groups of two or more rows (a few percent of a site's rows) are looked at again.
    pairs = np.flatnonzero(same)
    dropped_tokens = k[pairs] // n_codes
    # A group whose latest time is shared by two rows: the rule's tie-breaks decide. Rows are
    # time-sorted within a group, so its last two rows say.
    pairs = pairs[last[pairs + 1]]  # i: the next-to-last row of its group, i + 1 the last
    if not len(pairs):
        return kept, dropped_tokens
    tied_pairs = pairs[time_us[first_row + order[pairs]] == time_us[first_row + order[pairs + 1]]]
    if len(tied_pairs):
        rows = np.sort(order[np.isin(k, k[tied_pairs])])  # every row of those groups, in row order
        rk = key[rows]
        sub = np.lexsort((values[rows], has_value[rows], time_us[first_row + rows], codes[rows], rk // n_codes))
        sk = rk[sub]
        sub_last = np.ones(len(sub), dtype=bool)
        sub_last[:-1] = sk[1:] != sk[:-1]
        winners = rows[sub][sub_last]  # sorted by (token, code) = by key within a token
        winners = winners[np.argsort(key[winners], kind="stable")]
        tied = np.zeros(len(k), dtype=bool)
        tied[tied_pairs + 1] = True
        kept[np.flatnonzero(tied[last])] = winners
    return kept, dropped_tokens


__all__ = ["CHUNK_ROWS", "code_rank", "code_slots", "slots_of", "sorted_code_slots", "sorted_slot_chunks"]
