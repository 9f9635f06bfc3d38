"""Fused continuous-time attention in Triton: forward and backward with an online softmax.

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
the backward rebuilds the forward's scores bit for bit (``_bulk_scores``):
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

Triton features used are limited to those of triton 3.6 (the GPU image) and 3.9 (CPU CI).

triton is imported when a kernel first runs, not with this module: it is a heavy optional
dependency, and it fixes compiled vs interpreted mode (TRITON_INTERPRET) when it is imported.
So the device functions below are plain functions until then (``_device`` records them) and
``_ensure_built`` applies ``triton.jit`` to them, in the mode triton's library was built in.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from healthfm_core.kernels.ct_attention.contract import AttentionBackend, AttentionCall, astuple_shallow, autocast_off
from healthfm_core.kernels.ct_attention.packed import packed_layout
from healthfm_core.kernels.ct_attention.tiling import KernelConfig, block_d, fitted_config, next_power_of_2

logger = logging.getLogger(__name__)

# The modules triton and triton.language, bound by _import_triton when a kernel first runs; the
# device functions read ``tl`` from these module globals.
triton: Any = None
tl: Any = None

# lambda_max * (tile time span) above which an overlapping tile takes the log-domain path.
# Mid-span anchoring keeps each factor within exp(+-SPAN_LIMIT / 2) = exp(+-20): safe in fp32.
SPAN_LIMIT = 40.0
MAX_COMPONENTS = 8
# Ampere and newer. On sm_75 (T4) triton 3.6 and 3.9 compile every tl.dot to FMA loops (the compile
# check at sm_75: 8,720 fma.rn.f32 and no mma instruction in the forward, fp16 and bf16 alike), and
# bf16 is not native there. The kernel was written and checked for tensor cores: such a card gets
# the reference (cuBLAS has fp16 tensor-core products on sm_75).
MIN_CAPABILITY = (8, 0)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- device code

_DEVICE_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # name -> plain function, jitted by _ensure_built


def _device(fn: Callable[..., Any]) -> Any:
    """Mark a device function: ``_ensure_built`` replaces it by ``triton.jit(fn)`` in this module.

    Typed Any because the name ends up bound to a triton JITFunction (launched as
    ``kernel[grid](...)``), whose type triton does not export to the checker."""
    _DEVICE_FUNCTIONS[fn.__name__] = fn
    return fn


@_device
def _exp(x):
    """e^x as 2^(x log2 e): ``tl.exp2`` lowers to one ex2.approx.ftz (a MUFU op and the multiply),
    where ``tl.exp`` adds a fix-up for subnormal results (a compare and two multiplies a call: 22% of
    the forward bulk's instructions at M = 4, benchmarks/ct_attention_sass.py). Results below fp32's
    smallest normal, 1.2e-38, become 0: nothing here needs them (a probability or key factor that
    small is 0 to the sums it enters). The compile check fails a kernel that still has the fix-up."""
    return tl.exp2(x * 1.4426950408889634)


@_device
def _decay(rate, x):
    """e^(-rate x) for a scalar rate: the log2 e scaling folded into the rate, one multiply an element."""
    return tl.exp2((rate * -1.4426950408889634) * x)


@_device
def _head_mixture(LW, RATE, h, M: tl.constexpr):
    """Head h's mixture: pointers to its M log-weights and rates, and its fastest rate."""
    lw_ptr = LW + h * M
    rate_ptr = RATE + h * M
    lam_max = tl.load(rate_ptr)
    for m in tl.static_range(1, M):
        lam_max = tl.maximum(lam_max, tl.load(rate_ptr + m))
    return lw_ptr, rate_ptr, lam_max


@_device
def _plan(qmin, qmax, kmin, kmax, lam_max, CAUSAL: tl.constexpr, SPAN: tl.constexpr):
    """Per tile pair: fast (factorised) or log path, the anchor a and the sign sigma."""
    before = kmax <= qmin
    after = kmin >= qmax
    lo = tl.minimum(qmin, kmin)
    hi = tl.maximum(qmax, kmax)
    if CAUSAL:
        fast = before | after | (lam_max * (hi - lo) <= SPAN)
    else:
        fast = before | after
    a = tl.where(before, kmax, tl.where(after, kmin, 0.5 * (lo + hi)))
    sigma = tl.where(after & (~before), -1.0, 1.0)
    return fast, a, sigma


@_device
def _row_norm(alpha, lw_ptr, rate_ptr, M: tl.constexpr):
    """U_i = log sum_m pi_m exp(-lambda_m alpha_i) (logsumexp over the components)."""
    mx = tl.load(lw_ptr) - tl.load(rate_ptr) * alpha
    for m in tl.static_range(1, M):
        mx = tl.maximum(mx, tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * alpha)
    acc = tl.zeros_like(mx)
    for m in tl.static_range(M):
        acc += _exp(tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * alpha - mx)
    return mx + tl.log(acc)


@_device
def _key_factor(lam, beta, kval):
    # Invalid keys may lie anywhere in time: clamp, then zero them so no inf reaches a product.
    return tl.where(kval, _exp(tl.minimum(-lam * beta, 80.0)), 0.0)


@_device
def _log_kernel(t_q, t_k, lw_ptr, rate_ptr, CAUSAL: tl.constexpr, M: tl.constexpr):
    """log K(dt) per score with the max-component trick; returns (log K, dt)."""
    dt = t_q[:, None] - t_k[None, :]
    if CAUSAL:
        dt = tl.maximum(dt, 0.0)
    else:
        dt = tl.abs(dt)
    mx = tl.load(lw_ptr) - tl.load(rate_ptr) * dt
    for m in tl.static_range(1, M):
        mx = tl.maximum(mx, tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * dt)
    acc = tl.zeros_like(mx)
    for m in tl.static_range(M):
        acc += _exp(tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * dt - mx)
    return mx + tl.log(acc), dt


@_device
def _logits(
    qk,
    t_q,
    t_k,
    kval,
    fast,
    a,
    sigma,
    lw_ptr,
    rate_ptr,
    CAUSAL: tl.constexpr,
    M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(z, kn): the score is s = z + log(kn); fast path: z = qk + U, kn = K / c; log path: kn = 1."""
    if fast:
        alpha = sigma * (t_q - a)
        beta = sigma * (a - t_k)
        u = _row_norm(alpha, lw_ptr, rate_ptr, M)
        kn = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m in tl.static_range(M):
            lw = tl.load(lw_ptr + m)
            lam = tl.load(rate_ptr + m)
            w = _exp(lw - lam * alpha - u)
            kn += w[:, None] * _key_factor(lam, beta, kval)[None, :]
        z = qk + u[:, None]
    else:
        log_k, dt = _log_kernel(t_q, t_k, lw_ptr, rate_ptr, CAUSAL, M)
        z = qk + log_k
        kn = tl.full((BLOCK_M, BLOCK_N), 1.0, dtype=tl.float32)
    return z, kn


@_device
def _add_to_component(acc, offs_c, c, x):
    """acc[:, c] + x: a per-row vector added to component c's column of a [rows, M_POW2] accumulator."""
    return acc + tl.where(offs_c[None, :] == c, x[:, None], 0.0)


@_device
def _add_mixture_gradients(lw_rows, rate_rows, offs_c, c, g, w, b, alpha, beta):
    """A factorised tile pair's part of component c's gradients, per query row (g = dS / kn, the
    pair's factors w_ic b_jc with alpha_i + beta_j the time gap): d log pi_c = sum_j g_ij w_ic b_jc,
    d lambda_c = -sum_j g_ij w_ic b_jc (alpha_i + beta_j), both as row sums (no sum across warps)."""
    row = tl.sum(g * b[None, :], 1)
    row_beta = tl.sum(g * (b * beta)[None, :], 1)
    lw_rows = _add_to_component(lw_rows, offs_c, c, w * row)
    rate_rows = _add_to_component(rate_rows, offs_c, c, -w * (alpha * row + row_beta))
    return lw_rows, rate_rows


@_device
def _program(N_TILES):
    """This program's (tile, batch x head). One grid axis, a head's tiles consecutive (the order a
    (tiles, B x H) grid runs in): CUDA caps a grid's second axis at 65,535, which B x H passes in
    an evaluation batch of 4,096 subjects at 16 heads, and its first at 2^31 - 1."""
    pid = tl.program_id(0)
    return pid % N_TILES, pid // N_TILES


@_device
def _tile(PTR, b, h, sb, sh, sn, offs, ok, offs_d, d_ok):
    """Pointers and mask of the [rows, BLOCK_D] tile at rows ``offs`` of a [B, H, N, D] tensor.
    The head's base is computed in 64 bits: ``b * sb`` overflows int32 once the tensor (or the
    projection q, k, v are views of) holds 2^31 elements, as an evaluation batch of long histories
    does; the offsets within a head stay 32-bit."""
    base = PTR + (b.to(tl.int64) * sb + h.to(tl.int64) * sh)
    return base + offs[:, None] * sn + offs_d[None, :], ok[:, None] & d_ok[None, :]


@_device
def _query_tile(Q, TQ, b, h, qt, sqb, sqh, sqn, NQ, offs_d, d_ok, BLOCK_M: tl.constexpr):
    """Query tile ``qt``: q, its times, its row offsets and which rows exist."""
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < NQ
    ptrs, ok = _tile(Q, b, h, sqb, sqh, sqn, offs_m, row_ok, offs_d, d_ok)
    q = tl.load(ptrs, mask=ok, other=0.0)
    t_q = tl.load(TQ + b * NQ + offs_m, mask=row_ok, other=0.0)
    return q, t_q, offs_m, row_ok


@_device
def _query_grad_tile(DO, LSE, DELTA, b, h, bh, sdb, sdh, sdn, NQ, offs_m, row_ok, offs_d, d_ok):
    """What the backward reads per query row besides q: dO, the log-normaliser, delta = dO . O."""
    ptrs, ok = _tile(DO, b, h, sdb, sdh, sdn, offs_m, row_ok, offs_d, d_ok)
    do = tl.load(ptrs, mask=ok, other=0.0)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=row_ok, other=0.0)
    return do, lse, delta


@_device
def _query_grad_tile_delta(DO, O, LSE, DELTA, b, h, bh, sdb, sdh, sdn, sob, soh, son, NQ, offs_m, row_ok, offs_d, d_ok):  # noqa: E741
    """``_query_grad_tile`` for the dQ kernel, which makes delta = dO . O (fp32) for its rows and
    stores it for the dK/dV kernel, launched after it: four launches a layer fewer than the host's
    ``(do.float() * o.float()).sum(-1)``."""
    ptrs, ok = _tile(DO, b, h, sdb, sdh, sdn, offs_m, row_ok, offs_d, d_ok)
    do = tl.load(ptrs, mask=ok, other=0.0)
    o_ptrs, o_ok = _tile(O, b, h, sob, soh, son, offs_m, row_ok, offs_d, d_ok)
    o = tl.load(o_ptrs, mask=o_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + bh * NQ + offs_m, mask=row_ok, other=float("inf"))
    return do, lse, delta


@_device
def _key_tile(K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok, BLOCK_N: tl.constexpr):
    """Key tile ``kt``: k, v, their times, which keys are valid, the key offsets and which exist."""
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < NK
    k_ptrs, ok = _tile(K, b, h, skb, skh, skn, offs_n, col_ok, offs_d, d_ok)
    v_ptrs, ok = _tile(V, b, h, svb, svh, svn, offs_n, col_ok, offs_d, d_ok)
    k = tl.load(k_ptrs, mask=ok, other=0.0)
    v = tl.load(v_ptrs, mask=ok, other=0.0)
    t_k = tl.load(TK + b * NK + offs_n, mask=col_ok, other=0.0)
    kval = tl.load(KV + b * NK + offs_n, mask=col_ok, other=0) != 0
    return k, v, t_k, kval, offs_n, col_ok


@_device
def _tile_pair(A, B, i):
    """Entry i of two per-tile arrays of the host's plan (time bounds, loop ranges)."""
    return tl.load(A + i), tl.load(B + i)


@_device
def _visible(kmin, kmax, qmax, CAUSAL: tl.constexpr):
    """Whether a key tile with valid-key time bounds [kmin, kmax] can be seen by a query tile whose
    latest query is at qmax (kmin > kmax: no valid key)."""
    visible = kmin <= kmax
    if CAUSAL:
        visible = visible & (kmin <= qmax)
    return visible


@_device
def _score_tile(
    q,
    k,
    t_q,
    t_k,
    kval,
    row_ok,
    qmin,
    qmax,
    kmin,
    kmax,
    lam_max,
    lw_ptr,
    rate_ptr,
    sm_scale,
    CAUSAL: tl.constexpr,
    SPAN: tl.constexpr,
    M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One tile pair scored, as every kernel scores it: (z, kn, mask, fast, a, sigma) with the
    score s = z + log(kn) where ``mask`` holds, and the tile's plan (``_plan``)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
    mask = kval[None, :] & row_ok[:, None]
    if CAUSAL:
        mask = mask & (t_k[None, :] <= t_q[:, None])
    fast, a, sigma = _plan(qmin, qmax, kmin, kmax, lam_max, CAUSAL, SPAN)
    z, kn = _logits(qk, t_q, t_k, kval, fast, a, sigma, lw_ptr, rate_ptr, CAUSAL, M, BLOCK_M, BLOCK_N)
    return z, kn, mask, fast, a, sigma


@_device
def _scored_key_tile(
    K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok,
    q, t_q, row_ok, qmin, qmax, kmin, kmax, lam_max, lw_ptr, rate_ptr, sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Key tile ``kt`` loaded and scored against the query tile: the step of the key loops (forward, dQ)."""
    k, v, t_k, kval, offs_n, col_ok = _key_tile(
        K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok, BLOCK_N
    )
    z, kn, mask, fast, a, sigma = _score_tile(
        q, k, t_q, t_k, kval, row_ok, qmin, qmax, kmin, kmax, lam_max, lw_ptr, rate_ptr, sm_scale,
        CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    return k, v, t_k, kval, z, kn, mask, fast, a, sigma


# --- the bulk: key tiles wholly at or before the query tile (see "Bulk tiles" above)


@_device
def _bulk_scores(qk, t_q, row_ok, t_k, kval, a, lw_ptr, rate_ptr, M: tl.constexpr):
    """A bulk tile pair: every valid key at or before the anchor a = kmax <= every query. Built
    from (t_i, a, t_j) alone, so the backward rebuilds the forward's scores bit for bit (both
    walk the same key tiles). Returns (z, kn, r, alpha, beta): s = z + log kn, z = -inf at
    invalid keys, alpha_i = t_i - a >= 0, beta_j = a - t_j >= 0.

    M = 1: z = qk + (log pi - lambda alpha_i) - lambda beta_j, exact (kn unused).
    M > 1: r_i = max_c (log pi_c - lambda_c alpha_i), z = qk + r_i, and
    kn_ij = sum_c w_ic b_jc <= M with w_ic = exp(log pi_c - lambda_c alpha_i - r_i) in (0, 1] and
    b_jc = exp(-lambda_c beta_j) <= 1: M exponentials per row and per key of the tile pair and M
    multiply-adds per score, on the ALUs (fp32 throughout; no fp32 matrix product)."""
    a = tl.where(a > float("-inf"), a, 0.0)  # a key tile without valid keys: any finite anchor
    alpha = tl.where(row_ok, t_q - a, 0.0)
    beta = tl.where(kval, a - t_k, 0.0)
    if M == 1:
        lw0 = tl.load(lw_ptr)
        lam0 = tl.load(rate_ptr)
        z = tl.where(kval[None, :], qk + (lw0 - lam0 * alpha)[:, None] - (lam0 * beta)[None, :], float("-inf"))
        r = alpha  # unused at M = 1
        kn = z  # unused at M = 1
    else:
        r = tl.load(lw_ptr) - tl.load(rate_ptr) * alpha
        for c in tl.static_range(1, M):
            r = tl.maximum(r, tl.load(lw_ptr + c) - tl.load(rate_ptr + c) * alpha)
        kn = tl.zeros_like(qk)
        for c in tl.static_range(M):
            lam_c = tl.load(rate_ptr + c)
            w_c = _exp(tl.load(lw_ptr + c) - lam_c * alpha - r)
            # Not masked: an invalid key has beta 0, so b = 1, and z = -inf zeroes its probability.
            kn += w_c[:, None] * _decay(lam_c, beta)[None, :]
        z = tl.where(kval[None, :], qk + r[:, None], float("-inf"))
    return z, kn, r, alpha, beta


@_device
def _bulk_key_tile(
    K, V, TK, KV, KMAX, b, h, kt, skb, skh, skn, svb, svh, svn, NK, NKT, offs_d, d_ok,
    q, t_q, row_ok, lw_ptr, rate_ptr, sm_scale, M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Key tile ``kt`` of a query tile's bulk, loaded and scored (``_bulk_scores``, anchored at the
    tile's kmax): the step of the bulk's key loops (forward, dQ)."""
    k, v, t_k, kval, offs_n, col_ok = _key_tile(
        K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok, BLOCK_N
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
    a = tl.load(KMAX + b * NKT + kt)
    z, kn, r_b, alpha_b, beta_b = _bulk_scores(qk, t_q, row_ok, t_k, kval, a, lw_ptr, rate_ptr, M)
    return k, v, kval, z, kn, r_b, alpha_b, beta_b


@_device
def _ct_fwd(
    Q,
    K,
    V,
    TQ,
    TK,
    KV,
    LW,
    RATE,
    O,  # noqa: E741 - O: the output, named like Q, K, V
    LSE,
    QMIN,
    QMAX,
    KMIN,
    KMAX,
    KLO,
    KSEP,
    KHI,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    H,
    NQ,
    NK,
    NQT,
    NKT,
    sm_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    M: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPAN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    qt, bh = _program(NQT)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, t_q, offs_m, row_ok = _query_tile(Q, TQ, b, h, qt, sqb, sqh, sqn, NQ, offs_d, d_ok, BLOCK_M)
    qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
    lw_ptr, rate_ptr, lam_max = _head_mixture(LW, RATE, h, M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_lo, k_hi = _tile_pair(KLO, KHI, b * NQT + qt)
    k_sep = tl.load(KSEP + b * NQT + qt)

    # The bulk, [k_lo, k_sep): factorised scores, no causal mask, no branch.
    # The running max is a bound (s <= z + log M), enough for bf16 / fp32 (_bulk_allowed).
    for kt in range(k_lo, k_sep):
        k, v, kval, z, kn, r_b, alpha_b, beta_b = _bulk_key_tile(
            K, V, TK, KV, KMAX, b, h, kt, skb, skh, skn, svb, svh, svn, NK, NKT, offs_d, d_ok,
            q, t_q, row_ok, lw_ptr, rate_ptr, sm_scale, M, BLOCK_N, DOT_PREC,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(z - m_s[:, None])
        if M > 1:
            p = p * kn
        alpha_row = _exp(m_i - m_s)
        l_i = l_i * alpha_row + tl.sum(p, 1)
        acc = acc * alpha_row[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # The rest, [k_sep, k_hi): each tile pair planned on its own (module docstring).
    for kt in range(k_sep, k_hi):
        kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            k, v, t_k, kval, z, kn, mask, fast, a, sigma = _scored_key_tile(
                K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok,
                q, t_q, row_ok, qmin, qmax, kmin, kmax, lam_max, lw_ptr, rate_ptr, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
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
            l_i = l_i * alpha_row + tl.sum(p, 1)
            acc = acc * alpha_row[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    o_ptrs, o_ok = _tile(O, b, h, sob, soh, son, offs_m, row_ok, offs_d, d_ok)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_ok)
    tl.store(LSE + bh * NQ + offs_m, lse, mask=row_ok)


@_device
def _ct_bwd_dkdv(
    Q,
    K,
    V,
    TQ,
    TK,
    KV,
    LW,
    RATE,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    QMIN,
    QMAX,
    KMIN,
    KMAX,
    QLO,
    QSEP,
    QHI,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdb,
    sdh,
    sdn,
    H,
    NQ,
    NK,
    NQT,
    NKT,
    sm_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    M: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPAN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    kt, bh = _program(NKT)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k, v, t_k, kval, offs_n, col_ok = _key_tile(
        K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok, BLOCK_N
    )
    kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
    lw_ptr, rate_ptr, lam_max = _head_mixture(LW, RATE, h, M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_lo, q_hi = _tile_pair(QLO, QHI, b * NKT + kt)
    q_sep = tl.load(QSEP + b * NKT + kt)
    # The rest first, [q_lo, q_sep): query tiles that overlap this key tile in time.
    for qt in range(q_lo, q_sep):
        qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            q, t_q, offs_m, row_ok = _query_tile(Q, TQ, b, h, qt, sqb, sqh, sqn, NQ, offs_d, d_ok, BLOCK_M)
            do, lse, delta = _query_grad_tile(DO, LSE, DELTA, b, h, bh, sdb, sdh, sdn, NQ, offs_m, row_ok, offs_d, d_ok)
            z, kn, mask, fast, a, sigma = _score_tile(
                q, k, t_q, t_k, kval, row_ok, qmin, qmax, kmin, kmax, lam_max, lw_ptr, rate_ptr, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            e = _exp(tl.where(mask, z - lse[:, None], float("-inf")))
            p = e * kn
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)

    # The bulk, [q_sep, q_hi): query tiles wholly at or after this key tile (anchor a = kmax).
    for qt in range(q_sep, q_hi):
        q, t_q, offs_m, row_ok = _query_tile(Q, TQ, b, h, qt, sqb, sqh, sqn, NQ, offs_d, d_ok, BLOCK_M)
        do, lse, delta = _query_grad_tile(DO, LSE, DELTA, b, h, bh, sdb, sdh, sdn, NQ, offs_m, row_ok, offs_d, d_ok)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
        z, kn, r_b, alpha_b, beta_b = _bulk_scores(qk, t_q, row_ok, t_k, kval, kmax, lw_ptr, rate_ptr, M)
        # lse: a per-row constant, subtracted after the scores (as the forward's max was)
        p = _exp(tl.minimum(z - lse[:, None], 80.0))
        if M > 1:
            p = p * kn
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    dk_ptrs, ok = _tile(DK, b, h, skb, skh, skn, offs_n, col_ok, offs_d, d_ok)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok)
    dv_ptrs, ok = _tile(DV, b, h, svb, svh, svn, offs_n, col_ok, offs_d, d_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)


@_device
def _ct_bwd_dq(
    Q,
    K,
    V,
    TQ,
    TK,
    KV,
    LW,
    RATE,
    DO,
    O,  # noqa: E741 - O: the forward output, named like Q, K, V
    LSE,
    DELTA,
    DQ,
    GLW,
    GRATE,
    QMIN,
    QMAX,
    KMIN,
    KMAX,
    KLO,
    KSEP,
    KHI,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdb,
    sdh,
    sdn,
    sob,
    soh,
    son,
    H,
    NQ,
    NK,
    NQT,
    NKT,
    sm_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    M: tl.constexpr,
    M_POW2: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPAN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PARAM_GRAD: tl.constexpr,
):
    qt, bh = _program(NQT)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, M_POW2)
    d_ok = offs_d < D
    q, t_q, offs_m, row_ok = _query_tile(Q, TQ, b, h, qt, sqb, sqh, sqn, NQ, offs_d, d_ok, BLOCK_M)
    do, lse, delta = _query_grad_tile_delta(
        DO, O, LSE, DELTA, b, h, bh, sdb, sdh, sdn, sob, soh, son, NQ, offs_m, row_ok, offs_d, d_ok
    )
    qmin, qmax = _tile_pair(QMIN, QMAX, b * NQT + qt)
    lw_ptr, rate_ptr, lam_max = _head_mixture(LW, RATE, h, M)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # The mixture gradients per query row and component, summed over the rows once after the loops:
    # a sum across warps in every tile pair (shared memory and a barrier) cost more than the rest.
    lw_rows = tl.zeros((BLOCK_M, M_POW2), dtype=tl.float32)
    rate_rows = tl.zeros((BLOCK_M, M_POW2), dtype=tl.float32)
    k_lo, k_hi = _tile_pair(KLO, KHI, b * NQT + qt)
    k_sep = tl.load(KSEP + b * NQT + qt)

    # The bulk, [k_lo, k_sep), as in the forward. A bulk tile pair's mixture gradients:
    # d log pi_c = sum_ij g_ij w_ic b_jc and d lambda_c = -sum_ij g_ij w_ic b_jc (alpha_i + beta_j)
    # with g = dS / kn (the component's responsibility is w_ic b_jc / kn_ij).
    for kt in range(k_lo, k_sep):
        k, v, kval, z, kn, r_b, alpha_b, beta_b = _bulk_key_tile(
            K, V, TK, KV, KMAX, b, h, kt, skb, skh, skn, svb, svh, svn, NK, NKT, offs_d, d_ok,
            q, t_q, row_ok, lw_ptr, rate_ptr, sm_scale, M, BLOCK_N, DOT_PREC,
        )  # fmt: skip
        e = _exp(tl.minimum(z - lse[:, None], 80.0))
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        g = e * (dp - delta[:, None])
        if M > 1:
            ds = g * kn
        else:
            ds = g
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if PARAM_GRAD:
            for c in tl.static_range(M):
                lam_c = tl.load(rate_ptr + c)
                if M == 1:  # the key factor is inside z: w = b = 1
                    w_c = tl.where(row_ok, 1.0, 0.0)
                    b_c = tl.where(kval, 1.0, 0.0)
                else:
                    w_c = tl.where(row_ok, _exp(tl.load(lw_ptr + c) - lam_c * alpha_b - r_b), 0.0)
                    b_c = _decay(lam_c, beta_b)  # g is 0 at invalid keys (z = -inf there)
                lw_rows, rate_rows = _add_mixture_gradients(lw_rows, rate_rows, offs_c, c, g, w_c, b_c, alpha_b, beta_b)

    # The rest, [k_sep, k_hi): each tile pair planned on its own.
    for kt in range(k_sep, k_hi):
        kmin, kmax = _tile_pair(KMIN, KMAX, b * NKT + kt)
        if _visible(kmin, kmax, qmax, CAUSAL):
            k, v, t_k, kval, z, kn, mask, fast, a, sigma = _scored_key_tile(
                K, V, TK, KV, b, h, kt, skb, skh, skn, svb, svh, svn, NK, offs_d, d_ok,
                q, t_q, row_ok, qmin, qmax, kmin, kmax, lam_max, lw_ptr, rate_ptr, sm_scale,
                CAUSAL, SPAN, M, BLOCK_M, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            e = _exp(tl.where(mask, z - lse[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            g = e * (dp - delta[:, None])  # dS / kn
            ds = g * kn
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if PARAM_GRAD:
                # d s_ij / d log pi_m = rho_ijm, d s_ij / d lambda_m = -dt_ij rho_ijm,
                # rho_ijm = pi_m exp(-lambda_m dt_ij) / K_ij (the component's responsibility).
                if fast:
                    alpha = sigma * (t_q - a)
                    beta = sigma * (a - t_k)
                    u = _row_norm(alpha, lw_ptr, rate_ptr, M)
                    for m in tl.static_range(M):
                        lw = tl.load(lw_ptr + m)
                        lam = tl.load(rate_ptr + m)
                        w = tl.where(row_ok, _exp(lw - lam * alpha - u), 0.0)
                        bk = _key_factor(lam, beta, kval)
                        lw_rows, rate_rows = _add_mixture_gradients(
                            lw_rows, rate_rows, offs_c, m, g, w, bk, alpha, beta
                        )
                else:
                    log_k, dt = _log_kernel(t_q, t_k, lw_ptr, rate_ptr, CAUSAL, M)
                    for m in tl.static_range(M):
                        lw = tl.load(lw_ptr + m)
                        lam = tl.load(rate_ptr + m)
                        rho_ds = ds * _exp(lw - lam * dt - log_k)
                        lw_rows = _add_to_component(lw_rows, offs_c, m, tl.sum(rho_ds, 1))
                        rate_rows = _add_to_component(rate_rows, offs_c, m, -tl.sum(rho_ds * dt, 1))
    dq = dq * sm_scale
    dq_ptrs, ok = _tile(DQ, b, h, sqb, sqh, sqn, offs_m, row_ok, offs_d, d_ok)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=ok)
    if PARAM_GRAD:
        part = (bh * NQT + qt) * M_POW2 + offs_c
        # The log-weights' partial projected to zero sum over the M components (the contract's
        # shift_free, done here: their sum over the programs is projected too); at M = 1, x - x = 0.
        lw_part = tl.sum(lw_rows, 0)
        lw_part = tl.where(offs_c < M, lw_part - tl.sum(lw_part, 0) / M, 0.0)
        tl.store(GLW + part, lw_part)
        tl.store(GRATE + part, tl.sum(rate_rows, 0))


def _import_triton() -> None:
    """Bind the module globals ``triton`` and ``tl`` (the device functions read ``tl``)."""
    global triton, tl
    import triton
    import triton.language as tl


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (imports triton).

    triton fixes this when it is imported (TRITON_INTERPRET=1 at that moment): its own
    library functions (tl.zeros, reductions) are built for one mode only, so the answer is
    read from them rather than from the environment now.
    """
    _import_triton()
    return _is_interpreted(tl.zeros)


def unavailable_reason() -> str | None:
    """Why triton cannot be imported here (None when it can)."""
    try:
        _import_triton()
    except ImportError as exc:
        return str(exc)
    return None


def _is_interpreted(fn: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        return False
    return isinstance(fn, InterpretedFunction)


_built_interpreted: bool | None = None  # the mode the device functions were jitted in; None: not yet


def _ensure_built() -> None:
    """Jit this module's device functions, in the same mode as triton's library.

    triton.jit chooses compiled vs interpreted when a function is decorated, so they are
    (re)decorated whenever that mode differs from the library's: otherwise no launch could work.
    """
    global _built_interpreted
    want = interpreting()
    if want == _built_interpreted:
        return
    module = globals()
    for name, fn in _DEVICE_FUNCTIONS.items():
        module[name] = triton.jit(fn)
    _built_interpreted = want


# ----------------------------------------------------------------------------- host code


def _tile_bounds(t: torch.Tensor, valid: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (min, max) of the times of valid positions; (+inf, -inf) for a tile with none."""
    b, n = t.shape
    n_tiles = _cdiv(n, block)
    pad = n_tiles * block - n
    t = torch.nn.functional.pad(t, (0, pad)).view(b, n_tiles, block)
    valid = torch.nn.functional.pad(valid, (0, pad), value=False).view(b, n_tiles, block)
    # Python scalars, not device tensors: torch.tensor(x, device="cuda") is a host sync.
    tmin = torch.where(valid, t, float("inf")).amin(-1)
    tmax = torch.where(valid, t, float("-inf")).amax(-1)
    return tmin.contiguous(), tmax.contiguous()


def _tile_plan(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    kv: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool,
    bulk: bool = True,
) -> dict[str, torch.Tensor]:
    """Tile bounds plus, per query tile, the [lo, hi) range of key tiles that can be visible
    (and per key tile the range of query tiles): exact, from the bounds alone. And where the
    bulk ends: per query tile k_sep, the end of the run of key tiles from k_lo whose valid keys
    are all at or before the tile's earliest query (kmax <= qmin; a tile without valid keys
    too); per key tile q_sep, the start of the run of query tiles up to q_hi for which that
    holds. ``bulk=False``: no bulk (k_sep = k_lo, q_sep = q_hi). No host sync."""
    q_ok = torch.ones_like(t_q, dtype=torch.bool)
    qmin, qmax = _tile_bounds(t_q, q_ok, block_m)
    kmin, kmax = _tile_bounds(t_k, kv, block_n)
    vis = (kmin <= kmax)[:, None, :].expand(-1, qmin.shape[1], -1)  # [B, NQT, NKT]
    if causal:
        vis = vis & (kmin[:, None, :] <= qmax[:, :, None])
    nqt, nkt = vis.shape[1], vis.shape[2]
    kidx = torch.arange(nkt, device=vis.device, dtype=torch.int32)
    qidx = torch.arange(nqt, device=vis.device, dtype=torch.int32)[:, None]
    k_lo = torch.where(vis, kidx, nkt).amin(-1).int()
    k_hi = torch.where(vis, kidx + 1, 0).amax(-1).int()
    q_lo = torch.where(vis, qidx, nqt).amin(1).int()
    q_hi = torch.where(vis, qidx + 1, 0).amax(1).int()
    if bulk:
        before = kmax[:, None, :] <= qmin[:, :, None]  # [B, NQT, NKT]
        k_in = (kidx >= k_lo[:, :, None]) & (kidx < k_hi[:, :, None])
        k_sep = torch.minimum(torch.where(k_in & ~before, kidx, nkt).amin(-1).int(), k_hi)
        q_in = (qidx >= q_lo[:, None, :]) & (qidx < q_hi[:, None, :])
        q_sep = torch.maximum(torch.where(q_in & ~before, qidx + 1, 0).amax(1).int(), q_lo)
    else:
        k_sep, q_sep = k_lo, q_hi
    return {
        "qmin": qmin,
        "qmax": qmax,
        "kmin": kmin,
        "kmax": kmax,
        "k_lo": k_lo.contiguous(),
        "k_sep": k_sep.contiguous(),
        "k_hi": k_hi.contiguous(),
        "q_lo": q_lo.contiguous(),
        "q_sep": q_sep.contiguous(),
        "q_hi": q_hi.contiguous(),
    }


@dataclass(frozen=True)
class PlannedInputs:
    """What the kernels read besides q, k, v and the mixture: the times as fp32, the key mask as
    int8 (both contiguous), and the tile plan (``_tile_plan``)."""

    t_q: torch.Tensor
    t_k: torch.Tensor
    key_valid: torch.Tensor
    plan: dict[str, torch.Tensor]


class _PlanMemo(threading.local):
    """The last call's planned inputs, reused by the next call on the same times and key mask.

    A model's layers attend over one batch's tokens: every layer passes the same ``times`` and
    ``key_valid`` tensors, so the plan (57 small ops, ~47 of them launches on a GPU) and the dtype
    conversions are made once a forward instead of once a layer. A hit needs the very same
    tensor objects at the same version (an in-place write bumps it) and the same tiling; the
    memo holds those tensors, so their identity cannot pass to another tensor while it is kept.
    One entry per thread: a new batch replaces it."""

    key: tuple[Any, ...] | None = None
    sources: tuple[torch.Tensor, ...] = ()
    planned: PlannedInputs | None = None


_plan_memo = _PlanMemo()


def planned_inputs(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    key_valid: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool,
    bulk: bool,
) -> PlannedInputs:
    """The kernels' time and mask inputs and their tile plan, from the memo when the previous call
    had the same ones (``_PlanMemo``)."""
    sources = (t_q, t_k, key_valid)
    # Inference tensors keep no version counter: without one a write could not be seen, so no memo.
    memoised = not any(x.is_inference() for x in sources)
    key = (
        (*(id(x) for x in sources), *(x._version for x in sources), *(tuple(x.shape) for x in sources))
        + (block_m, block_n, causal, bulk)
        if memoised
        else None
    )
    memo = _plan_memo
    if key is not None and memo.planned is not None and memo.key == key:
        return memo.planned
    tq = t_q.to(torch.float32).contiguous()
    tk = t_k.to(torch.float32).contiguous()
    kv_bool = key_valid.to(torch.bool)
    planned = PlannedInputs(
        tq, tk, kv_bool.to(torch.int8).contiguous(), _tile_plan(tq, tk, kv_bool, block_m, block_n, causal, bulk=bulk)
    )
    if key is not None:
        memo.key, memo.sources, memo.planned = key, sources, planned
    return planned


def _bulk_allowed(dtype: torch.dtype) -> bool:
    """The bulk's running max is a bound, not the exact max, so its probabilities may sit well
    below 1 before the cast for P @ V: fine in bf16 and fp32 (fp32's exponent range), not in
    fp16, whose tile pairs all take the planned path (exact max)."""
    return dtype != torch.float16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact fp32 products for fp32 inputs (the reference's accuracy)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index a gradient with its input's strides: keep only layouts that
    # empty_like reproduces (dense, non-overlapping) with a unit last stride.
    if x.stride(-1) == 1 and torch.empty_like(x).stride() == x.stride():
        return x
    return x.contiguous()


class _CTAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, t_q, t_k, log_weights, rates, key_valid, causal, config):
        _ensure_built()
        b, h, nq, d = q.shape
        nk = k.shape[2]
        m = log_weights.shape[1]
        ctx.packed = packed_layout(q, k, v)
        if not ctx.packed:
            q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        planned = planned_inputs(
            t_q, t_k, key_valid, config.block_m, config.block_n, causal, bulk=_bulk_allowed(q.dtype)
        )
        tq, tk, kv, plan = planned.t_q, planned.t_k, planned.key_valid, planned.plan
        lw = log_weights.detach().to(torch.float32).contiguous()
        rate = rates.detach().to(torch.float32).contiguous()
        # [B, H, NQ, D] over a [B, NQ, H, D] buffer (as FlashAttention returns it): the model's
        # heads-to-features reshape of the output is then a view, not a copy a layer.
        o = torch.empty((b, nq, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)
        nqt = _cdiv(nq, config.block_m)
        nkt = _cdiv(nk, config.block_n)
        dot_prec = dot_precision(q.dtype)
        sm_scale = 1.0 / math.sqrt(d)
        _ct_fwd[(nqt * b * h,)](
            q,
            k,
            v,
            tq,
            tk,
            kv,
            lw,
            rate,
            o,
            lse,
            plan["qmin"],
            plan["qmax"],
            plan["kmin"],
            plan["kmax"],
            plan["k_lo"],
            plan["k_sep"],
            plan["k_hi"],
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(o),
            h,
            nq,
            nk,
            nqt,
            nkt,
            sm_scale,
            D=d,
            BLOCK_D=block_d(d),
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            M=m,
            CAUSAL=causal,
            SPAN=SPAN_LIMIT,
            DOT_PREC=dot_prec,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        ctx.save_for_backward(q, k, v, o, lse, tq, tk, kv, lw, rate)
        ctx.causal = causal
        ctx.config = config
        # The backward walks the same plan when its tiles are the forward's (the default): one
        # plan a call instead of two (each ~47 small launches on a GPU).
        ctx.plan = plan if (config.bwd_block_m, config.bwd_block_n) == (config.block_m, config.block_n) else None
        ctx.param_dtypes = (log_weights.dtype, rates.dtype)
        return o

    @staticmethod
    @autocast_off
    def backward(ctx, do):
        _ensure_built()
        q, k, v, o, lse, tq, tk, kv, lw, rate = ctx.saved_tensors
        config: KernelConfig = ctx.config
        causal: bool = ctx.causal
        b, h, nq, d = q.shape
        nk = k.shape[2]
        m = lw.shape[1]
        do = _last_dim_contiguous(do.to(q.dtype))
        delta = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)  # dO . O: the dQ kernel writes it
        plan = ctx.plan
        if plan is None:
            plan = _tile_plan(
                tq, tk, kv != 0, config.bwd_block_m, config.bwd_block_n, causal, bulk=_bulk_allowed(q.dtype)
            )
        nqt = _cdiv(nq, config.bwd_block_m)
        nkt = _cdiv(nk, config.bwd_block_n)
        dot_prec = dot_precision(q.dtype)
        sm_scale = 1.0 / math.sqrt(d)
        # The kernels index dq/dk/dv with q/k/v's strides: the same layout (empty_like keeps it).
        if ctx.packed:
            dq, dk, dv = torch.empty((b, nq, 3, h, d), device=q.device, dtype=q.dtype).permute(2, 0, 3, 1, 4)
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        param_grad = bool(ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        m_pow2 = next_power_of_2(m)
        # The per-program partials of both parameters in one buffer: one reduction, not two.
        partials = torch.empty((2, b * h, nqt, m_pow2), device=q.device, dtype=torch.float32)
        g_lw, g_rate = partials.unbind(0)
        common = dict(
            D=d,
            BLOCK_D=block_d(d),
            BLOCK_M=config.bwd_block_m,
            BLOCK_N=config.bwd_block_n,
            M=m,
            CAUSAL=causal,
            SPAN=SPAN_LIMIT,
            DOT_PREC=dot_prec,
            num_warps=config.bwd_num_warps,
            num_stages=config.bwd_num_stages,
        )
        _ct_bwd_dq[(nqt * b * h,)](
            q,
            k,
            v,
            tq,
            tk,
            kv,
            lw,
            rate,
            do,
            o,
            lse,
            delta,
            dq,
            g_lw,
            g_rate,
            plan["qmin"],
            plan["qmax"],
            plan["kmin"],
            plan["kmax"],
            plan["k_lo"],
            plan["k_sep"],
            plan["k_hi"],
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            *_strides(o),
            h,
            nq,
            nk,
            nqt,
            nkt,
            sm_scale,
            M_POW2=m_pow2,
            PARAM_GRAD=param_grad,
            **common,
        )
        _ct_bwd_dkdv[(nkt * b * h,)](
            q,
            k,
            v,
            tq,
            tk,
            kv,
            lw,
            rate,
            do,
            lse,
            delta,
            dk,
            dv,
            plan["qmin"],
            plan["qmax"],
            plan["kmin"],
            plan["kmax"],
            plan["q_lo"],
            plan["q_sep"],
            plan["q_hi"],
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            h,
            nq,
            nk,
            nqt,
            nkt,
            sm_scale,
            **common,
        )
        d_lw = d_rate = None
        if param_grad:
            # Fixed-order reduction of the per-program partials: deterministic run to run.
            d_lw, d_rate = partials.view(2, b, h, nqt, m_pow2).sum(dim=(1, 3))[:, :, :m].unbind(0)
            d_lw, d_rate = d_lw.to(ctx.param_dtypes[0]), d_rate.to(ctx.param_dtypes[1])
        return dq, dk, dv, None, None, d_lw, d_rate, None, None, None


def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: fp16, bf16, fp32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
    d = q.shape[-1]
    if d > 256 or v.shape[-1] != d:
        return f"head dim {d} (v head dim {v.shape[-1]}); supported: equal q/k/v head dims <= 256"
    m = log_weights.shape[-1]
    if not 1 <= m <= MAX_COMPONENTS:
        return f"M={m} mixture components (supported: 1..{MAX_COMPONENTS})"
    try:
        capability = device_capability(q.device)
        limit = device_shared_memory(q.device)
    except Exception as exc:  # triton's driver did not start here: no launch could succeed either
        reason = f"{q.device}: triton could not read its properties ({type(exc).__name__}: {exc})"
        _warn_once(f"ct_attention: the Triton kernel cannot run on {reason}; using the reference")
        return reason
    if capability is not None and capability < MIN_CAPABILITY:
        reason = (
            f"{q.device}: compute capability {capability[0]}.{capability[1]}; the kernel needs "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (below it triton compiles its matrix products "
            "to FMA loops, without tensor cores, and bf16 is emulated)"
        )
        _warn_once(f"ct_attention: the Triton kernel does not run on {reason}; using the reference")
        return reason
    if fitted_config(d, q.dtype, limit) is None:
        return (
            f"head dim {d} in {q.dtype} on {q.device}: no tiling fits its {limit} bytes of shared memory a block "
            "(healthfm_core/kernels/ct_attention/tiling.py)"
        )
    return None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (major, minor); None off CUDA."""
    if device.type != "cuda":
        return None
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def device_shared_memory(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device``, read as triton's launcher reads it
    before it refuses a kernel (the driver's opt-in maximum); None off CUDA (the interpreter has no
    limit) or where triton is missing."""
    if device.type != "cuda" or unavailable_reason() is not None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_memory_of(index)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


@functools.cache
def _shared_memory_of(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


class TritonAttention(AttentionBackend):
    """Fused continuous-time attention (same contract as ``ct_attention_reference``).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1. Differentiable in q, k, v,
    log_weights and rates (not in the times). Option ``config``: a ``KernelConfig`` (default: the
    one ``tiling.fitted_config`` picks for the device's shared memory).
    """

    name = "ct_attention_triton"
    projects_log_weight_gradient = True  # the dQ kernel stores each program's partial projected

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
        return check_supported(q, k, v, log_weights)

    def unavailable(self, q: torch.Tensor) -> str | None:
        why = unavailable_reason()
        if why is None and q.device.type != "cuda" and not interpreting():
            why = (
                "needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton interpreter on CPU); "
                f"got tensors on {q.device}"
            )
        return why

    def run(self, call: AttentionCall, config: KernelConfig | None = None) -> torch.Tensor:
        if config is None:
            q = call.q
            config = fitted_config(q.shape[-1], q.dtype, device_shared_memory(q.device))
            assert config is not None, "unsupported() refuses a head dim and dtype no tiling fits"
        out: torch.Tensor = _CTAttention.apply(*astuple_shallow(call), config)
        return out


ct_attention_triton = TritonAttention()


def tile_paths(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    key_valid: torch.Tensor,
    rates: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool = True,
) -> dict[str, int]:
    """How many (head, query tile, key tile) pairs the forward kernel scores on each path, from the
    host's tile plan and the rule of ``_plan``: no GPU needed (benchmarks/ct_attention.py --paths).

    skipped: outside the trimmed loop range or not visible; separated: every valid key at or
    before (after) every query, factorised; small_span: overlapping, lambda_max * span <= SPAN_LIMIT,
    factorised around the middle; log: overlapping otherwise, M exponentials and a log per score.
    bulk: of the separated, those in the query tile's bulk (scored without a mask or a branch).
    """
    plan = _tile_plan(t_q.float(), t_k.float(), key_valid.bool(), block_m, block_n, causal)
    qmin, qmax = plan["qmin"][:, :, None], plan["qmax"][:, :, None]  # [B, NQT, 1]
    kmin, kmax = plan["kmin"][:, None, :], plan["kmax"][:, None, :]  # [B, 1, NKT]
    kt = torch.arange(kmin.shape[-1])
    in_range = (kt >= plan["k_lo"][:, :, None]) & (kt < plan["k_hi"][:, :, None])
    visible = in_range & (kmin <= kmax)
    if causal:
        visible = visible & (kmin <= qmax)
    separated = (kmax <= qmin) | (kmin >= qmax)
    span = torch.maximum(qmax, kmax) - torch.minimum(qmin, kmin)
    lam_max = rates.float().amax(-1)  # [H]
    small = (
        (lam_max[:, None, None, None] * span[None] <= SPAN_LIMIT)
        if causal
        else torch.zeros_like(span[None], dtype=torch.bool)
    )
    vis, sep = visible[None], separated[None]
    heads = rates.shape[0]
    bulk = (kt < plan["k_sep"][:, :, None]) & in_range
    counts = {
        "skipped": int((~vis).sum()) * heads,
        "bulk": int((visible & bulk).sum()) * heads,
        "separated": int((vis & sep).sum()) * heads,
        "small_span": int((vis & ~sep & small).sum()),
        "log": int((vis & ~sep & ~small).sum()),
    }
    return counts
