"""The fused continuous-time attention kernels: forward and backward with an online softmax.

The math is the one of ``reference.ct_attention_reference`` (this package):

    s_ij = q_i . k_j / sqrt(D) + log K(dt_ij),   K(dt) = sum_m pi_m exp(-lambda_m dt)

Nothing N x N is materialised: each program walks tiles of keys (forward, dq) or queries
(dk/dv) and keeps FlashAttention's running max / normaliser.

How a tile pair (BLOCK_M queries x BLOCK_N keys) is scored
----------------------------------------------------------
Every tile pair is classified from per-tile time bounds (min/max query time of the query
tile, min/max time of the *valid* keys of the key tile), computed on the host:

* skipped: the key tile has no valid key, or (causal) its earliest valid key is later than
  the latest query. The test uses the bounds of the actual tile contents, so skipping is
  exact whatever the token order; sorted times only make more tiles skippable. Loop ranges
  are also trimmed on the host to the first/last visible tile of each row of tiles.
* separated (the common case for time-sorted tokens): all valid keys are at or before every
  query (``kmax <= qmin``), or at or after every query (``kmin >= qmax``). With the anchor
  ``a = kmax`` (resp. ``kmin``) and sigma = +1 (resp. -1), for every valid pair

      exp(-lambda (t_i - t_j)) = exp(-lambda sigma (t_i - a)) * exp(-lambda sigma (a - t_j))

  and both factors are <= 1. The query-side factors are normalised per row in the log domain,
  w_im = pi_m exp(-lambda_m sigma (t_i - a)) / c_i with log c_i = U_i computed by a
  logsumexp over m, so a query years after the whole tile still has weights summing to 1
  (no underflow of K itself). Then K_ij = c_i * sum_m w_im b_jm with b_jm <= 1, and b_j = 1
  for the key at the anchor, so that key's score is exact. A key whose b_jm all underflow is
  > ~87 nats (fp32) below the tile's best key in log K: negligible unless the dot-product
  logits within one tile differ by that much, which no sane attention does.
* overlapping, causal, small span: the tile's time span S (queries and valid keys together)
  satisfies lambda_max * S <= SPAN_LIMIT. Anchor at the middle of the span: every factor lies
  in [exp(-SPAN_LIMIT/2), exp(SPAN_LIMIT/2)], so nothing under- or overflows in fp32, and the
  mixture is a sum of positive terms (no cancellation). Future keys are masked afterwards.
* everything else (overlap with a large span times the fastest rate, e.g. a diagonal tile
  covering years with hour-scale rates; any non-causal overlap): the safe path computes
  log K per score with the max-component trick (M exponentials and one log per score). With
  time-sorted tokens this is at most the diagonal tiles.

The bulk
--------
With time-sorted tokens almost every visible tile pair is separated, keys before queries. Each
kernel walks those first, in one loop without a branch or a causal mask: per query tile (forward,
dQ) the run of key tiles from the first visible one whose valid keys all lie at or before the
tile's earliest query (``k_lo .. k_sep``, from the host's plan); per key tile (dK/dV) the run of
query tiles up to the last visible one that lie wholly at or after it (``q_sep .. q_hi``). Such a
pair is factorised at the key tile's latest valid time a = kmax, from (t_i, a, t_j) alone so that
the backward rebuilds the forward's scores bit for bit (scores.py ``_bulk_scores``):
r_i = max_c (log pi_c - lambda_c (t_i - a)), w_ic = exp(log pi_c - lambda_c (t_i - a) - r_i),
b_jc = exp(-lambda_c (a - t_j)), s_ij = q.k/sqrt(D) + r_i + log sum_c w_ic b_jc (M = 1: the exact
sum of a row and a key term). The online softmax's running max is the bound q.k/sqrt(D) + r_i
(s is at most log M above it), so probabilities may sit below 1 before the P @ V cast: fine in
bf16 and fp32, not fp16, whose pairs all take the planned path below. The remaining pairs
(at most the one or two key tiles a query tile overlaps) are planned one by one:

On the fast paths a score costs one exponential (the softmax one) plus M multiply-adds:
``p_ij = exp(q.k/sqrt(D) + U_i - m_i) * sum_m w_im b_jm``. The per-row and per-key factors
cost M exponentials per row and per key of a tile pair, i.e. a fraction M/BLOCK of a score.

Online softmax with an inexact bound
------------------------------------
``qk + U_i`` bounds the score from above only up to the kernel factor, so after each tile the
row max of ``e_ij = exp(qk + U - m_ref) K_ij`` gives the exact tile max (one log per row);
probabilities are rescaled so the running max is exact and p <= 1 before the fp16/bf16 cast
of the P @ V product. The backward recomputes p from the saved log-normaliser L_i. Its two
kernels run dQ first: each dQ program makes delta_i = dO_i . O_i (fp32) for its query rows, which
it needs, and stores it for the dK/dV kernel, launched after it (on the host that was four launches
a layer: two casts, a product and a sum).

The host's plan (tile time bounds, loop ranges, where each bulk ends) depends on the times, the
key mask and the tiling only: the layers of a model share it (``planned_inputs``), and the
backward reuses the forward's when their tiles agree.

Gradients of the (H, M) mixture parameters are accumulated per program in registers, per query
row until the program ends (a sum across warps per tile pair costs shared memory and a barrier),
and written to a [2, B*H, n_tiles, M] buffer (log-weights, rates) that torch sums in one
reduction: deterministic, no float atomics. The log-weights' partials are stored projected to
zero sum over the components, as the contract's ``shift_free`` would project their sum
(``projects_log_weight_gradient``): exactly 0 at M = 1.

Every exponential is ``_exp`` (exp2): one MUFU operation, where ``tl.exp`` compiles to three more
instructions. ``benchmarks/ct_attention_sass.py`` counts what each loop compiles to, without a GPU.
Times are not differentiated (the entry, ``contract.py``, refuses times that need a gradient).

How this package is laid out
----------------------------
Each kernel below is thin: its tiles and their plan read, then its two loops over tiles (the
stages: ``_fwd_bulk`` and ``_fwd_planned``, ``_dq_bulk`` and ``_dq_planned``, ``_dkdv_planned``
and ``_dkdv_bulk``), then its stores. A stage's step scores a tile pair (scores.py) on tiles read
by tile_loads.py, and adds it to the program's sums with the one update of its kernel
(``_softmax_add``, ``_dq_add``, ``_dkdv_add``). The kernels' parameters are flat (a launch passes
tensors and integers); inside, each tensor travels with its strides as one tuple (tile_loads.py).
The host's tile plan is plan.py, the launches and the autograd Function launch.py, the card's
support support.py, and triton's lazy import jit.py. Triton features used are limited to those of
triton 3.6 (the GPU image) and 3.9 (CPU CI).
"""

from __future__ import annotations

from typing import Any

from healthfm_core.kernels.ct_attention.jit import device
from healthfm_core.kernels.ct_attention.scores import (
    _bulk_mixture_gradients,
    _bulk_scores,
    _exp,
    _head_mixture,
    _planned_mixture_gradients,
    _score_tile,
)
from healthfm_core.kernels.ct_attention.tile_loads import (
    _key_tile,
    _program_head,
    _query_grad_tile,
    _query_grad_tile_delta,
    _query_tile,
    _store_tile,
    _tile_pair,
    _tile_range,
    _visible,
)

tl: Any = None  # triton.language, bound by jit.ensure_built

# Tuples as the device functions name them (tile_loads.py, scores.py), and one more:
#   plan  (QMIN, QMAX, KMIN, KMAX, NQT, NKT): the host plan's per-tile time bounds and tile counts


# ----------------------------------------------------------------------------- a tile pair's step


@device
def _bulk_key_tile(
    keys, head, kt, qtile, plan, mixture, sm_scale,
    M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Key tile ``kt`` of a query tile's bulk, loaded and scored (``_bulk_scores``, anchored at the
    tile's kmax): the step of the bulk's key loops (forward, dQ). Returns (ktile, z, kn, factors)."""
    _, _, _, KMAX, _, NKT = plan
    b, _, _, _, _ = head
    q, _, _, _ = qtile
    ktile = _key_tile(keys, head, kt, BLOCK_N)
    k, _, _, _, _, _ = ktile
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
    a = tl.load(KMAX + b * NKT + kt)
    z, kn, factors = _bulk_scores(qk, qtile, ktile, a, mixture, M)
    return ktile, z, kn, factors


@device
def _scored_key_tile(
    keys, head, kt, qtile, bounds, mixture, sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Key tile ``kt`` loaded and scored against the query tile on its planned path: the step of
    the planned key loops (forward, dQ). Returns (ktile, z, kn, mask, path)."""
    ktile = _key_tile(keys, head, kt, BLOCK_N)
    z, kn, mask, path = _score_tile(
        qtile, ktile, bounds, mixture, sm_scale,
        CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    return ktile, z, kn, mask, path


# ----------------------------------------------------------------------------- the forward


@device
def _softmax_add(acc, l_i, p, alpha_row, v, DOT_PREC: tl.constexpr):
    """The online softmax's update: the running normaliser and output, rescaled by alpha_row
    (e^(old max - new max)), plus the tile's probabilities p (relative to the new max) and p @ v."""
    l_i = l_i * alpha_row + tl.sum(p, 1)
    acc = acc * alpha_row[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i


@device
def _fwd_bulk(
    m_i, l_i, acc, k_lo, k_sep, keys, head, qtile, plan, mixture, sm_scale,
    M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The bulk, key tiles [k_lo, k_sep): factorised scores, no causal mask, no branch. The running
    max is a bound (s <= z + log M), enough for bf16 / fp32 (plan.py ``bulk_allowed``)."""
    for kt in range(k_lo, k_sep):
        ktile, z, kn, _ = _bulk_key_tile(keys, head, kt, qtile, plan, mixture, sm_scale, M, BLOCK_N, DOT_PREC)
        _, v, _, _, _, _ = ktile
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(z - m_s[:, None])
        if M > 1:
            p = p * kn
        alpha_row = _exp(m_i - m_s)
        acc, l_i = _softmax_add(acc, l_i, p, alpha_row, v, DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@device
def _fwd_planned(
    m_i, l_i, acc, k_sep, k_hi, keys, head, qtile, qmin, qmax, plan, mixture, sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The rest, key tiles [k_sep, k_hi): each tile pair planned on its own (module docstring), the
    running max made exact after each tile."""
    QMIN, QMAX, KMIN, KMAX, NQT, NKT = plan
    b, h, bh, offs_d, d_ok = head
    for kt in range(k_sep, k_hi):
        kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            ktile, z, kn, mask, _ = _scored_key_tile(
                keys, head, kt, qtile, (qmin, qmax, kmin, kmax), mixture, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            _, v, _, _, _, _ = ktile
            z = tl.where(mask, z, float("-inf"))
            m_ref = tl.maximum(m_i, tl.max(z, 1))
            m_ref = tl.where(m_ref == float("-inf"), 0.0, m_ref)
            e = tl.where(mask, _exp(z - m_ref[:, None]) * kn, 0.0)
            r = tl.max(e, 1)
            # Exact tile max of the score: the bound qk + U is off by the kernel factor. (No
            # clamp literal such as 1e-38: below fp32's smallest normal, triton 3.6 types it fp64.)
            s_tile = tl.where(r > 0.0, m_ref + tl.log(tl.where(r > 0.0, r, 1.0)), float("-inf"))
            m_new = tl.maximum(m_i, s_tile)
            empty = m_new == float("-inf")
            m_new_s = tl.where(empty, 0.0, m_new)
            alpha_row = _exp(m_i - m_new_s)
            scale_row = tl.where(empty, 0.0, _exp(m_ref - m_new_s))
            p = e * scale_row[:, None]
            acc, l_i = _softmax_add(acc, l_i, p, alpha_row, v, DOT_PREC)
            m_i = m_new
    return m_i, l_i, acc


@device
def _ct_fwd(
    Q, K, V, TQ, TK, KV, LW, RATE, O, LSE,  # noqa: E741 - O: the output, named like Q, K, V
    QMIN, QMAX, KMIN, KMAX, KLO, KSEP, KHI,  # the host's plan (plan.py)
    sqb, sqh, sqn,  # q's strides (batch, head, row); k's, v's and o's below
    skb, skh, skn,
    svb, svh, svn,
    sob, soh, son,
    H, NQ, NK, NQT, NKT, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M: tl.constexpr,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """O and the log-normaliser of one query tile of one head."""
    qt, head = _program_head(NQT, H, D, BLOCK_D)
    b, h, bh, _, _ = head
    queries = ((Q, sqb, sqh, sqn), TQ, NQ)
    keys = ((K, skb, skh, skn), (V, svb, svh, svn), TK, KV, NK)
    plan = (QMIN, QMAX, KMIN, KMAX, NQT, NKT)
    qtile = _query_tile(queries, head, qt, BLOCK_M)
    qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
    mixture = _head_mixture(LW, RATE, h, M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_lo, k_sep, k_hi = _tile_range(KLO, KSEP, KHI, b * NQT, qt)
    m_i, l_i, acc = _fwd_bulk(
        m_i, l_i, acc, k_lo, k_sep, keys, head, qtile, plan, mixture, sm_scale,
        M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    m_i, l_i, acc = _fwd_planned(
        m_i, l_i, acc, k_sep, k_hi, keys, head, qtile, qmin, qmax, plan, mixture, sm_scale,
        CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip

    _, _, offs_m, row_ok = qtile
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    _store_tile((O, sob, soh, son), head, offs_m, row_ok, out)
    tl.store(LSE + bh * NQ + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- the backward: dK, dV


@device
def _dkdv_add(dk, dv, p, q, do, v, delta, DOT_PREC: tl.constexpr):
    """A query tile's part of the key tile's dV (P^T dO) and dK (dS^T Q, before the softmax scale),
    from its probabilities p: dS = P * (dO V^T - delta)."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@device
def _dkdv_planned(
    dk, dv, q_lo, q_sep, queries, grads, head, ktile, kmin, kmax, plan, mixture, sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The rest first, query tiles [q_lo, q_sep): those that overlap this key tile in time."""
    QMIN, QMAX, KMIN, KMAX, NQT, NKT = plan
    q_in, TQ, NQ = queries
    b, h, bh, offs_d, d_ok = head
    k, v, t_k, kval, offs_n, col_ok = ktile
    for qt in range(q_lo, q_sep):
        qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            qtile = _query_tile(queries, head, qt, BLOCK_M)
            do, lse, delta = _query_grad_tile(grads, head, qtile, NQ)
            z, kn, mask, _ = _score_tile(
                qtile, ktile, (qmin, qmax, kmin, kmax), mixture, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            e = _exp(tl.where(mask, z - lse[:, None], float("-inf")))
            p = e * kn
            q, _, _, _ = qtile
            dk, dv = _dkdv_add(dk, dv, p, q, do, v, delta, DOT_PREC)
    return dk, dv


@device
def _dkdv_bulk(
    dk, dv, q_sep, q_hi, queries, grads, head, ktile, kmax, mixture, sm_scale,
    M: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The bulk, query tiles [q_sep, q_hi): those wholly at or after this key tile (anchor a = kmax)."""
    q_in, TQ, NQ = queries
    k, v, t_k, kval, offs_n, col_ok = ktile
    for qt in range(q_sep, q_hi):
        qtile = _query_tile(queries, head, qt, BLOCK_M)
        do, lse, delta = _query_grad_tile(grads, head, qtile, NQ)
        q, _, _, _ = qtile
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
        z, kn, _ = _bulk_scores(qk, qtile, ktile, kmax, mixture, M)
        # lse: a per-row constant, subtracted after the scores (as the forward's max was)
        p = _exp(tl.minimum(z - lse[:, None], 80.0))
        if M > 1:
            p = p * kn
        dk, dv = _dkdv_add(dk, dv, p, q, do, v, delta, DOT_PREC)
    return dk, dv


@device
def _ct_bwd_dkdv(
    Q, K, V, TQ, TK, KV, LW, RATE, DO, LSE, DELTA, DK, DV,
    QMIN, QMAX, KMIN, KMAX, QLO, QSEP, QHI,  # the host's plan (plan.py)
    sqb, sqh, sqn,  # q's strides (batch, head, row); k's (and dk's), v's (and dv's), do's below
    skb, skh, skn,
    svb, svh, svn,
    sdb, sdh, sdn,
    H, NQ, NK, NQT, NKT, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M: tl.constexpr,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key tile of one head (delta = dO . O: the dQ kernel, launched first, made it)."""
    kt, head = _program_head(NKT, H, D, BLOCK_D)
    b, h, _, _, _ = head
    queries = ((Q, sqb, sqh, sqn), TQ, NQ)
    keys = ((K, skb, skh, skn), (V, svb, svh, svn), TK, KV, NK)
    grads = ((DO, sdb, sdh, sdn), LSE, DELTA)
    plan = (QMIN, QMAX, KMIN, KMAX, NQT, NKT)
    ktile = _key_tile(keys, head, kt, BLOCK_N)
    kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
    mixture = _head_mixture(LW, RATE, h, M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_lo, q_sep, q_hi = _tile_range(QLO, QSEP, QHI, b * NKT, kt)
    dk, dv = _dkdv_planned(
        dk, dv, q_lo, q_sep, queries, grads, head, ktile, kmin, kmax, plan, mixture, sm_scale,
        CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dk, dv = _dkdv_bulk(
        dk, dv, q_sep, q_hi, queries, grads, head, ktile, kmax, mixture, sm_scale,
        M, BLOCK_M, DOT_PREC,
    )  # fmt: skip

    _, _, _, _, offs_n, col_ok = ktile
    dk = dk * sm_scale
    _store_tile((DK, skb, skh, skn), head, offs_n, col_ok, dk)
    _store_tile((DV, svb, svh, svn), head, offs_n, col_ok, dv)


# ----------------------------------------------------------------------------- the backward: dQ


@device
def _dq_add(dq, e, kn, do, delta, ktile, KN: tl.constexpr, DOT_PREC: tl.constexpr):
    """A key tile's part of the query tile's dQ (dS K, before the softmax scale), from e = P / kn:
    g = dS / kn = e * (dO V^T - delta), dS = g * kn (``KN``; else kn is 1). Returns (dq, g, dS)."""
    k, v, _, _, _, _ = ktile
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    g = e * (dp - delta[:, None])
    if KN:
        ds = g * kn
    else:
        ds = g
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq, g, ds


@device
def _dq_bulk(
    dq, lw_rows, rate_rows, offs_c, k_lo, k_sep, keys, head, qtile, do, lse, delta, plan, mixture, sm_scale,
    M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, PARAM_GRAD: tl.constexpr,
):  # fmt: skip
    """The bulk, key tiles [k_lo, k_sep), as in the forward, and its mixture gradients."""
    q, t_q, offs_m, row_ok = qtile
    for kt in range(k_lo, k_sep):
        ktile, z, kn, factors = _bulk_key_tile(keys, head, kt, qtile, plan, mixture, sm_scale, M, BLOCK_N, DOT_PREC)
        e = _exp(tl.minimum(z - lse[:, None], 80.0))
        dq, g, _ = _dq_add(dq, e, kn, do, delta, ktile, M > 1, DOT_PREC)
        if PARAM_GRAD:
            _, _, _, kval, _, _ = ktile
            lw_rows, rate_rows = _bulk_mixture_gradients(
                lw_rows, rate_rows, offs_c, g, row_ok, kval, factors, mixture,
                M,
            )  # fmt: skip
    return dq, lw_rows, rate_rows


@device
def _dq_planned(
    dq, lw_rows, rate_rows, offs_c, k_sep, k_hi, keys, head, qtile, qmin, qmax, do, lse, delta, plan, mixture,
    sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, PARAM_GRAD: tl.constexpr,
):  # fmt: skip
    """The rest, key tiles [k_sep, k_hi): each tile pair planned on its own, and its mixture gradients."""
    QMIN, QMAX, KMIN, KMAX, NQT, NKT = plan
    b, h, bh, offs_d, d_ok = head
    for kt in range(k_sep, k_hi):
        kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            ktile, z, kn, mask, path = _scored_key_tile(
                keys, head, kt, qtile, (qmin, qmax, kmin, kmax), mixture, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            e = _exp(tl.where(mask, z - lse[:, None], float("-inf")))
            dq, g, ds = _dq_add(dq, e, kn, do, delta, ktile, True, DOT_PREC)
            if PARAM_GRAD:
                lw_rows, rate_rows = _planned_mixture_gradients(
                    lw_rows, rate_rows, offs_c, g, ds, qtile, ktile, path, mixture,
                    CAUSAL, M,
                )  # fmt: skip
    return dq, lw_rows, rate_rows


@device
def _store_mixture_partials(
    GLW, GRATE, lw_rows, rate_rows, offs_c, bh, qt,
    NQT, M: tl.constexpr, M_POW2: tl.constexpr,
):  # fmt: skip
    """This program's partial of the mixture gradients, summed over its rows, at [bh, qt]. The
    log-weights' partial is projected to zero sum over the M components (the contract's shift_free,
    done here: their sum over the programs is projected too); at M = 1, x - x = 0."""
    part = (bh * NQT + qt) * M_POW2 + offs_c
    lw_part = tl.sum(lw_rows, 0)
    lw_part = tl.where(offs_c < M, lw_part - tl.sum(lw_part, 0) / M, 0.0)
    tl.store(GLW + part, lw_part)
    tl.store(GRATE + part, tl.sum(rate_rows, 0))


@device
def _ct_bwd_dq(
    Q, K, V, TQ, TK, KV, LW, RATE, DO, O, LSE, DELTA, DQ, GLW, GRATE,  # noqa: E741 - O: the forward's output
    QMIN, QMAX, KMIN, KMAX, KLO, KSEP, KHI,  # the host's plan (plan.py)
    sqb, sqh, sqn,  # q's strides (batch, head, row; dq's too); k's, v's, do's and o's below
    skb, skh, skn,
    svb, svh, svn,
    sdb, sdh, sdn,
    sob, soh, son,
    H, NQ, NK, NQT, NKT, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M: tl.constexpr,
    M_POW2: tl.constexpr, CAUSAL: tl.constexpr, SPAN: tl.constexpr, DOT_PREC: tl.constexpr, PARAM_GRAD: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of one head, delta = dO . O for its rows (stored for the dK/dV kernel),
    and (PARAM_GRAD) its partial of the mixture gradients."""
    qt, head = _program_head(NQT, H, D, BLOCK_D)
    b, h, bh, _, _ = head
    offs_c = tl.arange(0, M_POW2)
    queries = ((Q, sqb, sqh, sqn), TQ, NQ)
    keys = ((K, skb, skh, skn), (V, svb, svh, svn), TK, KV, NK)
    grads = ((DO, sdb, sdh, sdn), LSE, DELTA)
    plan = (QMIN, QMAX, KMIN, KMAX, NQT, NKT)
    qtile = _query_tile(queries, head, qt, BLOCK_M)
    do, lse, delta = _query_grad_tile_delta(grads, (O, sob, soh, son), head, qtile, NQ)
    qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
    mixture = _head_mixture(LW, RATE, h, M)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # The mixture gradients per query row and component, summed over the rows once after the loops:
    # a sum across warps in every tile pair (shared memory and a barrier) cost more than the rest.
    lw_rows = tl.zeros((BLOCK_M, M_POW2), dtype=tl.float32)
    rate_rows = tl.zeros((BLOCK_M, M_POW2), dtype=tl.float32)
    k_lo, k_sep, k_hi = _tile_range(KLO, KSEP, KHI, b * NQT, qt)
    dq, lw_rows, rate_rows = _dq_bulk(
        dq, lw_rows, rate_rows, offs_c, k_lo, k_sep, keys, head, qtile, do, lse, delta, plan, mixture, sm_scale,
        M, BLOCK_N, DOT_PREC, PARAM_GRAD,
    )  # fmt: skip
    dq, lw_rows, rate_rows = _dq_planned(
        dq, lw_rows, rate_rows, offs_c, k_sep, k_hi, keys, head, qtile, qmin, qmax, do, lse, delta, plan, mixture,
        sm_scale,
        CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC, PARAM_GRAD,
    )  # fmt: skip

    _, _, offs_m, row_ok = qtile
    dq = dq * sm_scale
    _store_tile((DQ, sqb, sqh, sqn), head, offs_m, row_ok, dq)
    if PARAM_GRAD:
        _store_mixture_partials(GLW, GRATE, lw_rows, rate_rows, offs_c, bh, qt, NQT, M, M_POW2)
