"""The kernels' device math: a tile pair's scores on each path, and their mixture gradients.

The paths and their arithmetic are kernels.py's docstring; this module is what a tile pair costs,
called by the kernels' loops (kernels.py) with the tiles tile_loads.py read. Arguments travel in
tuples named as the kernels name them:

    mixture  (lw_ptr, rate_ptr, lam_max): the head's M log-weights and rates, its fastest rate
    qtile    (q, t_q, offs_m, row_ok): a query tile, its times, its rows and which exist
    ktile    (k, v, t_k, kval, offs_n, col_ok): a key tile, its times, which keys are valid
    bounds   (qmin, qmax, kmin, kmax): the host's time bounds of the query tile and key tile
    path     (fast, a, sigma): a planned pair's path (factorised or log), anchor and sign

Device functions: plain until a kernel first runs (jit.py binds ``triton.jit`` of each, and ``tl``).
"""

from __future__ import annotations

from typing import Any

from healthfm_core.kernels.ct_attention.jit import device

tl: Any = None  # triton.language, bound by jit.ensure_built


@device
def _exp(x):
    """e^x as 2^(x log2 e): ``tl.exp2`` lowers to one ex2.approx.ftz (a MUFU op and the multiply),
    where ``tl.exp`` adds a fix-up for subnormal results (a compare and two multiplies a call: 22% of
    the forward bulk's instructions at M = 4, benchmarks/ct_attention_sass.py). Results below fp32's
    smallest normal, 1.2e-38, become 0: nothing here needs them (a probability or key factor that
    small is 0 to the sums it enters). The compile check fails a kernel that still has the fix-up."""
    return tl.exp2(x * 1.4426950408889634)


@device
def _decay(rate, x):
    """e^(-rate x) for a scalar rate: the log2 e scaling folded into the rate, one multiply an element."""
    return tl.exp2((rate * -1.4426950408889634) * x)


@device
def _head_mixture(LW, RATE, h, M: tl.constexpr):
    """Head h's mixture: pointers to its M log-weights and rates, and its fastest rate."""
    lw_ptr = LW + h * M
    rate_ptr = RATE + h * M
    lam_max = tl.load(rate_ptr)
    for m in tl.static_range(1, M):
        lam_max = tl.maximum(lam_max, tl.load(rate_ptr + m))
    return lw_ptr, rate_ptr, lam_max


@device
def _pair_path(bounds, lam_max, CAUSAL: tl.constexpr, SPAN: tl.constexpr):
    """A planned tile pair's path: fast (factorised) or log, the anchor a and the sign sigma."""
    qmin, qmax, kmin, kmax = bounds
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


@device
def _log_mixture(x, mixture, M: tl.constexpr):
    """log sum_m pi_m exp(-lambda_m x), elementwise, by the max-component trick (logsumexp over the
    components): a row's normaliser U_i at x = alpha_i, log K(dt) at x = dt."""
    lw_ptr, rate_ptr, _ = mixture
    mx = tl.load(lw_ptr) - tl.load(rate_ptr) * x
    for m in tl.static_range(1, M):
        mx = tl.maximum(mx, tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * x)
    acc = tl.zeros_like(mx)
    for m in tl.static_range(M):
        acc += _exp(tl.load(lw_ptr + m) - tl.load(rate_ptr + m) * x - mx)
    return mx + tl.log(acc)


@device
def _key_factor(lam, beta, kval):
    # Invalid keys may lie anywhere in time: clamp, then zero them so no inf reaches a product.
    return tl.where(kval, _exp(tl.minimum(-lam * beta, 80.0)), 0.0)


@device
def _log_kernel(t_q, t_k, mixture, CAUSAL: tl.constexpr, M: tl.constexpr):
    """log K(dt) per score; returns (log K, dt)."""
    dt = t_q[:, None] - t_k[None, :]
    if CAUSAL:
        dt = tl.maximum(dt, 0.0)
    else:
        dt = tl.abs(dt)
    return _log_mixture(dt, mixture, M), dt


@device
def _anchored(t_q, t_k, path, mixture, M: tl.constexpr):
    """A factorised pair's time gaps from its anchor a, alpha_i = sigma (t_i - a) and
    beta_j = sigma (a - t_j), and its rows' normaliser U_i (``_log_mixture`` at alpha_i)."""
    _, a, sigma = path
    alpha = sigma * (t_q - a)
    beta = sigma * (a - t_k)
    return alpha, beta, _log_mixture(alpha, mixture, M)


@device
def _component_factors(mixture, m, alpha, beta, u, kval):
    """Component m's factors of a factorised pair: the rows' weights w_im = pi_m e^(-lambda_m alpha_i)
    / c_i and the keys' b_jm = e^(-lambda_m beta_j) (0 at invalid keys), so K_ij / c_i = sum_m w_im b_jm."""
    lw_ptr, rate_ptr, _ = mixture
    lw = tl.load(lw_ptr + m)
    lam = tl.load(rate_ptr + m)
    return _exp(lw - lam * alpha - u), _key_factor(lam, beta, kval)


@device
def _logits(
    qk, t_q, t_k, kval, path, mixture,
    CAUSAL: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """(z, kn): the score is s = z + log(kn); fast path: z = qk + U, kn = K / c; log path: kn = 1."""
    fast, _, _ = path
    if fast:
        alpha, beta, u = _anchored(t_q, t_k, path, mixture, M)
        kn = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m in tl.static_range(M):
            w, b = _component_factors(mixture, m, alpha, beta, u, kval)
            kn += w[:, None] * b[None, :]
        z = qk + u[:, None]
    else:
        log_k, dt = _log_kernel(t_q, t_k, mixture, CAUSAL, M)
        z = qk + log_k
        kn = tl.full((BLOCK_M, BLOCK_N), 1.0, dtype=tl.float32)
    return z, kn


@device
def _score_tile(
    qtile, ktile, bounds, mixture, sm_scale,
    CAUSAL: tl.constexpr, SPAN: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """A planned tile pair scored, as every kernel scores it: (z, kn, mask, path) with the score
    s = z + log(kn) where ``mask`` holds, and the pair's path (``_pair_path``)."""
    q, t_q, _, row_ok = qtile
    k, _, t_k, kval, _, _ = ktile
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
    mask = kval[None, :] & row_ok[:, None]
    if CAUSAL:
        mask = mask & (t_k[None, :] <= t_q[:, None])
    _, _, lam_max = mixture
    path = _pair_path(bounds, lam_max, CAUSAL, SPAN)
    z, kn = _logits(qk, t_q, t_k, kval, path, mixture, CAUSAL, M, BLOCK_M, BLOCK_N)
    return z, kn, mask, path


@device
def _bulk_scores(qk, qtile, ktile, a, mixture, M: tl.constexpr):
    """A bulk tile pair: every valid key at or before the anchor a = kmax <= every query. Built
    from (t_i, a, t_j) alone, so the backward rebuilds the forward's scores bit for bit (both
    walk the same key tiles). Returns (z, kn, factors) with s = z + log kn, z = -inf at invalid
    keys, and factors = (r, alpha, beta): alpha_i = t_i - a >= 0, beta_j = a - t_j >= 0.

    M = 1: z = qk + (log pi - lambda alpha_i) - lambda beta_j, exact (kn and r unused).
    M > 1: r_i = max_c (log pi_c - lambda_c alpha_i), z = qk + r_i, and
    kn_ij = sum_c w_ic b_jc <= M with w_ic = exp(log pi_c - lambda_c alpha_i - r_i) in (0, 1] and
    b_jc = exp(-lambda_c beta_j) <= 1: M exponentials per row and per key of the tile pair and M
    multiply-adds per score, on the ALUs (fp32 throughout; no fp32 matrix product)."""
    _, t_q, _, row_ok = qtile
    _, _, t_k, kval, _, _ = ktile
    lw_ptr, rate_ptr, _ = mixture
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
    return z, kn, (r, alpha, beta)


# --- the mixture's gradients, per query row and component ([rows, M_POW2] accumulators)


@device
def _add_to_component(acc, offs_c, c, x):
    """acc[:, c] + x: a per-row vector added to component c's column of a [rows, M_POW2] accumulator."""
    return acc + tl.where(offs_c[None, :] == c, x[:, None], 0.0)


@device
def _add_mixture_gradients(lw_rows, rate_rows, offs_c, c, g, w, b, alpha, beta):
    """A factorised tile pair's part of component c's gradients, per query row (g = dS / kn, the
    pair's factors w_ic b_jc with alpha_i + beta_j the time gap): d log pi_c = sum_j g_ij w_ic b_jc,
    d lambda_c = -sum_j g_ij w_ic b_jc (alpha_i + beta_j), both as row sums (no sum across warps)."""
    row = tl.sum(g * b[None, :], 1)
    row_beta = tl.sum(g * (b * beta)[None, :], 1)
    lw_rows = _add_to_component(lw_rows, offs_c, c, w * row)
    rate_rows = _add_to_component(rate_rows, offs_c, c, -w * (alpha * row + row_beta))
    return lw_rows, rate_rows


@device
def _bulk_mixture_gradients(lw_rows, rate_rows, offs_c, g, row_ok, kval, factors, mixture, M: tl.constexpr):
    """A bulk tile pair's part (``_bulk_scores``' factors): d log pi_c = sum_j g_ij w_ic b_jc and
    d lambda_c = -sum_j g_ij w_ic b_jc (alpha_i + beta_j), with g = dS / kn (the component's
    responsibility is w_ic b_jc / kn_ij)."""
    r_b, alpha_b, beta_b = factors
    lw_ptr, rate_ptr, _ = mixture
    for c in tl.static_range(M):
        lam_c = tl.load(rate_ptr + c)
        if M == 1:  # the key factor is inside z: w = b = 1
            w_c = tl.where(row_ok, 1.0, 0.0)
            b_c = tl.where(kval, 1.0, 0.0)
        else:
            w_c = tl.where(row_ok, _exp(tl.load(lw_ptr + c) - lam_c * alpha_b - r_b), 0.0)
            b_c = _decay(lam_c, beta_b)  # g is 0 at invalid keys (z = -inf there)
        lw_rows, rate_rows = _add_mixture_gradients(lw_rows, rate_rows, offs_c, c, g, w_c, b_c, alpha_b, beta_b)
    return lw_rows, rate_rows


@device
def _planned_mixture_gradients(
    lw_rows, rate_rows, offs_c, g, ds, qtile, ktile, path, mixture,
    CAUSAL: tl.constexpr, M: tl.constexpr,
):  # fmt: skip
    """A planned tile pair's part: d s_ij / d log pi_m = rho_ijm, d s_ij / d lambda_m = -dt_ij rho_ijm,
    rho_ijm = pi_m exp(-lambda_m dt_ij) / K_ij (the component's responsibility); g = dS / kn, ds = dS."""
    _, t_q, _, row_ok = qtile
    _, _, t_k, kval, _, _ = ktile
    fast, _, _ = path
    lw_ptr, rate_ptr, _ = mixture
    if fast:
        alpha, beta, u = _anchored(t_q, t_k, path, mixture, M)
        for m in tl.static_range(M):
            w, bk = _component_factors(mixture, m, alpha, beta, u, kval)
            w = tl.where(row_ok, w, 0.0)
            lw_rows, rate_rows = _add_mixture_gradients(lw_rows, rate_rows, offs_c, m, g, w, bk, alpha, beta)
    else:
        log_k, dt = _log_kernel(t_q, t_k, mixture, CAUSAL, M)
        for m in tl.static_range(M):
            lw = tl.load(lw_ptr + m)
            lam = tl.load(rate_ptr + m)
            rho_ds = ds * _exp(lw - lam * dt - log_k)
            lw_rows = _add_to_component(lw_rows, offs_c, m, tl.sum(rho_ds, 1))
            rate_rows = _add_to_component(rate_rows, offs_c, m, -tl.sum(rho_ds * dt, 1))
    return lw_rows, rate_rows
