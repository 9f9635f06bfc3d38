"""The kernels' device loads and stores: a program's head, its tiles of q, k, v, dO, and the plan.

Arguments travel in tuples named as the kernels name them:

    head     (b, h, bh, offs_d, d_ok): the program's batch row, head, their flat index, and the
             head dim's columns with which of them exist (BLOCK_D >= D)
    x        (PTR, s_batch, s_head, s_row): a [B, H, N, D] tensor and its strides (q, k, v, o, dO,
             and the gradients, which take their input's strides)
    queries  (q as x, TQ, NQ): the queries, their times, how many a row of the batch has
    keys     (k as x, v as x, TK, KV, NK): the keys and values, their times, which are valid, how many
    grads    (dO as x, LSE, DELTA): what the backward reads per query row besides q
    qtile    (q, t_q, offs_m, row_ok) and ktile (k, v, t_k, kval, offs_n, col_ok): loaded tiles

Device functions: plain until a kernel first runs (jit.py binds ``triton.jit`` of each, and ``tl``).
"""

from __future__ import annotations

from typing import Any

from healthfm_core.kernels.ct_attention.jit import device

tl: Any = None  # triton.language, bound by jit.ensure_built


@device
def _program_head(N_TILES, H, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile and head. One grid axis, a head's tiles consecutive (the order a
    (tiles, B x H) grid runs in): CUDA caps a grid's second axis at 65,535, which B x H passes in
    an evaluation batch of 4,096 subjects at 16 heads, and its first at 2^31 - 1."""
    pid = tl.program_id(0)
    tile = pid % N_TILES
    bh = pid // N_TILES
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    return tile, (b, h, bh, offs_d, d_ok)


@device
def _tile(x, head, offs, ok):
    """Pointers and mask of the [rows, BLOCK_D] tile at rows ``offs`` of a [B, H, N, D] tensor.
    The head's base is computed in 64 bits: ``b * s_batch`` overflows int32 once the tensor (or
    the projection q, k, v are views of) holds 2^31 elements, as an evaluation batch of long
    histories does; the offsets within a head stay 32-bit."""
    PTR, sb, sh, sn = x
    b, h, _, offs_d, d_ok = head
    base = PTR + (b.to(tl.int64) * sb + h.to(tl.int64) * sh)
    return base + offs[:, None] * sn + offs_d[None, :], ok[:, None] & d_ok[None, :]


@device
def _store_tile(x, head, offs, ok, value):
    """``value`` stored at rows ``offs`` of a [B, H, N, D] tensor, cast to its dtype."""
    ptrs, mask = _tile(x, head, offs, ok)
    PTR, _, _, _ = x
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=mask)


@device
def _query_tile(queries, head, qt, BLOCK_M: tl.constexpr):
    """Query tile ``qt``: q, its times, its row offsets and which rows exist."""
    q_in, TQ, NQ = queries
    b, _, _, _, _ = head
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < NQ
    ptrs, ok = _tile(q_in, head, offs_m, row_ok)
    q = tl.load(ptrs, mask=ok, other=0.0)
    t_q = tl.load(TQ + b * NQ + offs_m, mask=row_ok, other=0.0)
    return q, t_q, offs_m, row_ok


@device
def _query_grad_tile(grads, head, qtile, NQ):
    """What the backward reads per query row besides q: dO, the log-normaliser, delta = dO . O."""
    do_in, LSE, DELTA = grads
    _, _, bh, _, _ = head
    _, _, offs_m, row_ok = qtile
    ptrs, ok = _tile(do_in, head, offs_m, row_ok)
    do = tl.load(ptrs, mask=ok, other=0.0)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=row_ok, other=0.0)
    return do, lse, delta


@device
def _query_grad_tile_delta(grads, o_in, head, qtile, NQ):
    """``_query_grad_tile`` for the dQ kernel, which makes delta = dO . O (fp32) for its rows and
    stores it for the dK/dV kernel, launched after it: four launches a layer fewer than the host's
    ``(do.float() * o.float()).sum(-1)``."""
    do_in, LSE, DELTA = grads
    _, _, bh, _, _ = head
    _, _, offs_m, row_ok = qtile
    ptrs, ok = _tile(do_in, head, offs_m, row_ok)
    do = tl.load(ptrs, mask=ok, other=0.0)
    o_ptrs, o_ok = _tile(o_in, head, offs_m, row_ok)
    o = tl.load(o_ptrs, mask=o_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=row_ok, other=float("inf"))
    return do, lse, delta


@device
def _key_tile(keys, head, kt, BLOCK_N: tl.constexpr):
    """Key tile ``kt``: k, v, their times, which keys are valid, the key offsets and which exist."""
    k_in, v_in, TK, KV, NK = keys
    b, _, _, _, _ = head
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < NK
    k_ptrs, ok = _tile(k_in, head, offs_n, col_ok)
    v_ptrs, ok = _tile(v_in, head, offs_n, col_ok)
    k = tl.load(k_ptrs, mask=ok, other=0.0)
    v = tl.load(v_ptrs, mask=ok, other=0.0)
    t_k = tl.load(TK + b * NK + offs_n, mask=col_ok, other=0.0)
    kval = tl.load(KV + b * NK + offs_n, mask=col_ok, other=0) != 0
    return k, v, t_k, kval, offs_n, col_ok


@device
def _tile_pair(A, B, i):
    """Entry i of two per-tile arrays of the host's plan (time bounds)."""
    return tl.load(A + i), tl.load(B + i)


@device
def _tile_range(LO, SEP, HI, row, tile):
    """The host's loop range [lo, hi) of a tile and where its bulk ends or starts (sep), at entry
    ``row + tile`` (row: the batch row's first)."""
    lo, hi = _tile_pair(LO, HI, row + tile)
    sep = tl.load(SEP + row + tile)
    return lo, sep, hi


@device
def _visible(kmin, kmax, qmax, CAUSAL: tl.constexpr):
    """Whether a key tile with valid-key time bounds [kmin, kmax] can be seen by a query tile whose
    latest query is at qmax (kmin > kmax: no valid key)."""
    visible = kmin <= kmax
    if CAUSAL:
        visible = visible & (kmin <= qmax)
    return visible
