"""Which row fills which slot of a token: the pooling rule of tokens.py, in two implementations.

`code_slots` is the rule as written (a five-key lexsort of the rows): every (token, distinct
code) keeps its latest row (ties: the row with a value, then the larger value, then the later
row), and a token's kept codes are ranked by priority, then code id. It pools one sample's cut
bucket and is the reference.

`sorted_code_slots` gives the same result, element for element, for a whole site's rows, which
arrive sorted by token and by time within a token (the order SiteSequences keeps them in): one
stable sort of one int64 key (token, rank of the code) per chunk of whole tokens replaces the
lexsort of every row (24 s of a 10^7-row load), and only the (token, code) groups whose latest
time is shared by two rows are settled by the reference rule. Chunks keep the sort's working set
small; results are concatenated, so the output does not depend on the chunk size.
"""

from __future__ import annotations

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
    return kept, tk, _slots(tk)


def _slots(tk: np.ndarray) -> np.ndarray:
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


def sorted_code_slots(
    token: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: np.ndarray,
    priority: np.ndarray,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`code_slots` of rows sorted by token (non-decreasing) and by time within each token."""
    n = len(token)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if np.any(token[1:] < token[:-1]):
        raise ValueError("sorted_code_slots: rows are not sorted by token")
    rank = code_rank(priority)
    # Chunk bounds at token starts, about chunk_rows apart (a token never straddles two).
    bounds = np.r_[np.flatnonzero(np.r_[True, token[1:] != token[:-1]]), n]
    cuts = np.unique(np.r_[bounds[np.searchsorted(bounds, np.arange(0, n, max(1, chunk_rows)))], n])
    kept_parts = []
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        kept_parts.append(a + _chunk_kept(token[a:b], codes[a:b], values[a:b], has_value[a:b], time_us[a:b], rank))
    kept = np.concatenate(kept_parts)
    tk = token[kept]
    return kept, tk, _slots(tk)


def _chunk_kept(
    token: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: np.ndarray,
    rank: np.ndarray,
) -> np.ndarray:
    """Kept rows of one chunk of whole tokens, in (token, slot) order (chunk-local indices)."""
    n_codes = len(rank)
    key = (token - token[0]) * n_codes + rank[codes]
    # Stable: within a (token, code) group rows stay in time order, ties in row order.
    order = np.argsort(key, kind="stable")
    k = key[order]
    t = time_us[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    # A group whose latest time is shared by two rows: the rule's tie-breaks decide.
    tied = np.zeros(len(k), dtype=bool)
    tied[1:] = last[1:] & (k[1:] == k[:-1]) & (t[1:] == t[:-1])
    kept = order[last]
    if np.any(tied):
        tied_keys = k[tied]
        rows = np.sort(order[np.isin(k, tied_keys)])  # every row of those groups, in row order
        sub = np.lexsort((values[rows], has_value[rows], time_us[rows], codes[rows], token[rows]))
        sk = key[rows][sub]
        sub_last = np.ones(len(sub), dtype=bool)
        sub_last[:-1] = sk[1:] != sk[:-1]
        winners = rows[sub][sub_last]  # sorted by (token, code) = by key within a token
        winners = winners[np.argsort(key[winners], kind="stable")]
        kept[np.flatnonzero(tied[last])] = winners
    return kept


__all__ = ["CHUNK_ROWS", "code_rank", "code_slots", "sorted_code_slots"]
