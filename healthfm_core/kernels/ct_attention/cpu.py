"""Continuous-time attention on CPU in plain PyTorch, with its own backward.

The math is the one of ``ct_attention_reference`` (docs/architecture.md, "Continuous-time attention"):

    s_ij = q_i . k_j / sqrt(D) + log K(dt_ij),   K(dt) = sum_m pi_m exp(-lambda_m dt)

The reference spends M exponentials and a log per score and materialises several
[B,H,Nq,Nk] (and per-component) tensors. Here the decay is factorised around key-block
anchors, so a score costs one exponential (the softmax's) plus an M-term product.

Key blocks
----------
Valid keys are sorted by time (invalid ones go last) and cut into blocks of ``block`` keys;
each block has the time range [kmin_c, kmax_c] of its valid keys. For a query i and block c:

* separated (t_i >= kmax_c; or, non-causal, t_i <= kmin_c): with the anchor a = kmax_c
  (resp. kmin_c) and sigma = +1 (resp. -1), for every key j of the block

      exp(-lambda (dt_ij)) = exp(-lambda alpha_ic) exp(-lambda beta_j),
      alpha_ic = sigma (t_i - a) >= 0,  beta_j = sigma (a - t_j) >= 0,

  so both factors are <= 1. The query side is normalised in the log domain per (i, c):
  U_ic = log sum_m pi_m exp(-lambda_m alpha_ic), w_icm = pi_m exp(-lambda_m alpha_ic - U_ic),
  and K_ij = exp(U_ic) * sum_m w_icm b_jm with b_jm = exp(-lambda_m beta_j). A query years
  after the block keeps weights summing to 1 (no underflow of K), and the key at the anchor
  has K~ = 1 exactly; a key whose b_jm all underflow is > ~87 nats (fp32) below that key in
  log K, negligible unless dot products within one block differ by as much.
* inside (kmin_c <= t_i < kmax_c): with sorted keys a query is inside at most one block. Its
  ``block`` scores are computed exactly as in the reference (M exponentials each): a fraction
  block / Nk of all scores.
* masked (causal and t_i < kmin_c, or a block with no valid key).

Per-(i, c) factors cost M exponentials per query and block, i.e. M / block per score.
The softmax is shifted by an upper bound instead of the exact row max (sum_m w b <= 1):
max_j qk_ij + max_c U_ic, one cheap row reduction; a chunk where that overshoots by ~46 nats
is redone with the per-block bound max_c (max_{j in c} qk_ij + U_ic). p stays <= 1 and, in
fp32/fp64, no correction pass is needed.

Backward: with P the probabilities and E = exp(qk + U - lse) their factor before the decay,
dS = P (dP - delta) gives dq, dk; the mixture gradients use the component responsibilities
rho_ijm = w_icm b_jm / K~_ij, so sum_ij dS_ij rho_ijm = sum_ij E_ij (dP_ij - delta_i) w_icm b_jm:
two small block contractions, no division, nothing per (score, component) materialised.

Memory: P and E ([B,H,Nq,Nk]) are kept for the backward (cheaper than recomputing at the
model's N of a few hundred); nothing [B,H,Nq,Nk,M] is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from healthfm_core.kernels.ct_attention.contract import AttentionBackend, AttentionCall, astuple_shallow, autocast_off

# Scores per batch chunk (b * H * Nq * Nk): small enough that a chunk's [.., Nq, Nk] tensors
# stay in cache, large enough that per-op overhead does not dominate.
CHUNK_ELEMENTS = 1 << 18
EXP_FLOOR = -80.0
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cpu_path_available() -> bool:
    """Whether this path can run here: plain PyTorch ops only, so whenever torch can run on CPU
    (no compiler, no extension). Kept for dispatch symmetry with the GPU kernel."""
    return torch.backends.cpu.get_cpu_capability() is not None


def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why this path cannot take these inputs (None when it can)."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype} (supported: one of fp16, bf16, fp32, fp64)"
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return f"devices q={q.device} k={k.device} v={v.device} (this path is for CPU tensors)"
    return None


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp in place, arguments clamped at -80: torch's vectorised exp is ~30x slower where the
    result is subnormal (and ~5x on -inf). e^-80 is negligible next to the entries that count
    (every row keeps one near 1), and masked entries are zeroed by a factor or a mask after."""
    return x.clamp_(min=EXP_FLOOR).exp_()


def _mixture(gaps: torch.Tensor, lw: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For gaps x >= 0 [B, Nq, G]: log K(x) [B, H, Nq, G] and the component responsibilities
    pi_m exp(-lambda_m x) / K(x) [B, H, M, Nq, G], shifted by the largest term (no underflow).
    M is an outer dimension: broadcasting over a size-M innermost one is ~10x slower."""
    terms = lw[None, :, :, None, None] - lam[None, :, :, None, None] * gaps[:, None, None]
    top = terms.amax(2, keepdim=True)
    resp = _exp(terms.sub_(top))
    total = resp.sum(2, keepdim=True)
    return (top + total.log()).squeeze(2), resp.div_(total)


def _chunk_forward(q, k, v, t_q, t_k, valid, lw, lam, causal: bool, block: int):
    """Forward for a slice of the batch (compute dtype); returns out and what the backward needs."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    m = lw.shape[1]
    sides = 1 if causal else 2
    # Keys sorted by time, invalid last, padded to whole blocks with invalid keys.
    nkb = -(-nk // block)
    nkp = nkb * block
    inf = float("inf")
    tk_sorted, order = torch.sort(torch.where(valid, t_k, inf), dim=1, stable=True)
    kval = F.pad(valid.gather(1, order), (0, nkp - nk), value=False)
    tk_sorted = torch.where(kval, F.pad(tk_sorted, (0, nkp - nk), value=0.0), 0.0)
    gather_kv = order[:, None, :, None]
    ks = F.pad(k.gather(2, gather_kv.expand(b, h, nk, d)), (0, 0, 0, nkp - nk))
    vs = F.pad(v.gather(2, gather_kv.expand(b, h, nk, dv)), (0, 0, 0, nkp - nk))

    tb = tk_sorted.view(b, nkb, block)
    vb = kval.view(b, nkb, block)
    kmin = torch.where(vb, tb, inf).amin(-1)  # [B, nkb]
    kmax = torch.where(vb, tb, -inf).amax(-1)
    has = vb.any(-1)[:, None, :]
    ti = t_q[:, :, None]  # [B, Nq, 1]
    plus = has & (ti >= kmax[:, None, :])  # [B, Nq, nkb]
    zero = ti.new_zeros(())
    if causal:
        inside = has & (ti >= kmin[:, None, :]) & ~plus
        sel = plus[:, :, None]  # [B, Nq, S, nkb]
        alpha = torch.where(plus, ti - kmax[:, None, :], zero)[:, :, None]
        anchor_of_key = kmax[:, :, None].expand(b, nkb, block).reshape(b, nkp)
        beta = torch.where(kval, anchor_of_key - tk_sorted, zero)[:, None]  # [B, S, Nkp]
    else:
        minus = has & (ti <= kmin[:, None, :]) & ~plus
        inside = has & ~plus & ~minus
        sel = torch.stack([plus, minus], dim=2)
        alpha = torch.stack(
            [torch.where(plus, ti - kmax[:, None, :], zero), torch.where(minus, kmin[:, None, :] - ti, zero)], dim=2
        )
        a_plus = kmax[:, :, None].expand(b, nkb, block).reshape(b, nkp)
        a_minus = kmin[:, :, None].expand(b, nkb, block).reshape(b, nkp)
        beta = torch.stack(
            [torch.where(kval, a_plus - tk_sorted, zero), torch.where(kval, tk_sorted - a_minus, zero)], dim=1
        )

    # Key-side factors b_jm <= 1 (0 for invalid keys) as a block-diagonal [S*nkb*M, Nkp]
    # matrix, so that K~ = w @ it is one matmul with a contiguous result.
    # Rows ordered (m, side, block).
    bf = _exp(-lam[None, :, :, None, None] * beta[:, None, None]).mul_(kval[:, None, None, None])  # [B,H,M,S,Nkp]
    eye = torch.eye(nkb, dtype=bf.dtype)[:, :, None]
    bdiag = (bf.view(b, h, m, sides, nkb, 1, block) * eye).reshape(b, h, m * sides * nkb, nkp)

    # The (at most one) block each query lies inside: its scores are computed exactly.
    has_in = inside.any(-1)  # [B, Nq]
    c_in = inside.to(torch.uint8).argmax(-1)  # [B, Nq]
    idx_t = c_in[:, :, None].expand(b, nq, block)
    t_in = tb.gather(1, idx_t)
    mask_in = vb.gather(1, idx_t) & has_in[:, :, None]
    dt_in = ti - t_in
    if causal:
        mask_in = mask_in & (dt_in >= 0)
    dt_in = torch.where(mask_in, dt_in.abs(), zero)  # [B, Nq, block]

    # One pass over M for both kinds of gap: query-to-anchor (alpha) and inside (dt).
    n_sep = sides * nkb
    log_k, resp = _mixture(torch.cat([alpha.reshape(b, nq, n_sep), dt_in], dim=-1), lw, lam)
    sel_h = sel.reshape(b, 1, nq, n_sep)
    w = (resp[..., :n_sep] * sel_h[:, :, None]).transpose(2, 3).contiguous()  # [B, H, Nq, M, S*nkb]
    u_c = torch.where(sel_h, log_k[..., :n_sep], -inf).view(b, h, nq, sides, nkb).amax(dim=3)
    logk_in = log_k[..., n_sep:]  # [B, H, Nq, block]
    rho_in = resp[..., n_sep:]  # [B, H, M, Nq, block]

    qs = q * (1.0 / math.sqrt(d))
    qk = torch.matmul(qs, ks.transpose(-1, -2))  # [B, H, Nq, Nkp]
    zb = qk.view(b, h, nq, nkb, block)
    idx_s = c_in[:, None, :, None, None].expand(b, h, nq, 1, block)
    s_in = (zb.gather(3, idx_s).squeeze(3) + logk_in).masked_fill_(~mask_in[:, None], -inf)
    # Shift: max_j qk_ij + max_c U_ic bounds every separated score (K~ <= 1) with one cheap
    # row reduction; it overshoots by the spread of qk across the row. Should that reach ~46
    # nats (the row's total under 1e-20), the chunk is redone with per-block maxima, whose
    # overshoot is the spread within one block only.
    in_max = s_in.amax(-1)
    visible = (u_c > -inf).any(-1) | mask_in.any(-1)[:, None]
    for tight in (False, True):
        sep_max = (zb.amax(-1) + u_c).amax(-1) if tight else qk.amax(-1) + u_c.amax(-1)
        row_max = torch.maximum(sep_max, in_max)  # [B, H, Nq]
        row_max = torch.where(torch.isinf(row_max), zero, row_max)
        e = _exp(torch.add(zb, (u_c - row_max[..., None])[..., None])).view(b, h, nq, nkp)
        p = torch.matmul(w.view(b, h, nq, m * n_sep), bdiag).mul_(e)
        p_in = _exp(s_in - row_max[..., None]).mul_(mask_in[:, None])
        # Inside positions hold 0 here (u_c = -inf there); rows without one add zeros.
        p.view(b, h, nq, nkb, block).scatter_add_(3, idx_s, p_in[:, :, :, None])
        total = p.sum(-1, keepdim=True)
        if tight or not bool((visible & (total.squeeze(-1) < 1e-20)).any()):
            break
    inv = torch.where(total > 0, 1.0 / total, zero)  # [B, H, Nq, 1]
    # p and e stay unnormalised: the 1/total goes onto [Nq, D]-sized tensors instead.
    out = torch.matmul(p, vs).mul_(inv)
    saved = (qs, ks, vs, out, inv, p, e, w, bdiag, beta, alpha, order, c_in, mask_in, dt_in, rho_in)
    return out, saved


def _chunk_backward(do, saved, lw, lam, block: int, nk: int, param_grad: bool):
    """Backward for a slice of the batch: (dq, dk, dv, d log_weights, d rates) in compute dtype."""
    qs, ks, vs, out, inv, p, e, w, bdiag, beta, alpha, order, c_in, mask_in, dt_in, rho_in = saved
    b, h, nq, d = qs.shape
    nkp, dv = vs.shape[2], vs.shape[3]
    nkb = nkp // block
    sides = beta.shape[1]
    m = w.shape[3]
    scale = 1.0 / math.sqrt(d)
    do_n = do * inv  # folds the softmax normaliser of the saved (unnormalised) p and e
    delta = (do_n * out).sum(-1, keepdim=True)
    # (dP - delta) / total in one matmul: baddbmm(-delta, do_n, vs^T).
    dp = torch.baddbmm(
        -delta.reshape(b * h, nq, 1), do_n.reshape(b * h, nq, dv), vs.reshape(b * h, nkp, dv).transpose(-1, -2)
    ).view(b, h, nq, nkp)
    ds = p * dp
    dv_s = torch.matmul(p.transpose(-1, -2), do_n)
    dq = torch.matmul(ds, ks).mul_(scale)
    dk_s = torch.matmul(ds.transpose(-1, -2), qs)  # qs carries the 1/sqrt(D)
    order_kv = order[:, None, :, None]
    dk = torch.zeros(b, h, nk, d, dtype=ks.dtype).scatter_(2, order_kv.expand(b, h, nk, d), dk_s[:, :, :nk])
    dvv = torch.zeros(b, h, nk, dv, dtype=vs.dtype).scatter_(2, order_kv.expand(b, h, nk, dv), dv_s[:, :, :nk])
    if not param_grad:
        return dq, dk, dvv, None, None
    g = dp.mul_(e)  # dS / K~ on separated blocks, 0 at inside and masked positions
    # Key factors times beta: the second half of d s / d lambda = -(alpha + beta) rho.
    beta_cols = beta.view(b, 1, 1, sides, 1, nkp).expand(b, 1, m, sides, nkb, nkp).reshape(b, 1, m * sides * nkb, nkp)
    r = torch.matmul(g, torch.cat([bdiag, bdiag * beta_cols], dim=2).transpose(-1, -2))
    r0 = r[..., : m * sides * nkb].reshape(w.shape)
    r1 = r[..., m * sides * nkb :].reshape(w.shape)
    d_lw = (w * r0).sum(dim=(0, 2, 4))
    d_rate = -(w * (alpha.reshape(b, 1, nq, 1, -1) * r0 + r1)).sum(dim=(0, 2, 4))
    idx_s = c_in[:, None, :, None, None].expand(b, h, nq, 1, block)
    # Rows inside no block gathered block 0: mask_in zeroes them (and future keys).
    ds_in = ds.view(b, h, nq, nkb, block).gather(3, idx_s).squeeze(3) * mask_in[:, None]
    coef = torch.stack([ds_in, ds_in * dt_in[:, None]], dim=-1)  # [B, H, Nq, block, 2]
    inside = torch.einsum("bhqjk,bhmqj->khm", coef, rho_in)
    d_lw = d_lw + inside[0]
    d_rate = d_rate - inside[1]
    return dq, dk, dvv, d_lw, d_rate


def default_block(nk: int) -> int:
    """Keys per anchor block: the exact inside scores cost ~block per query, the block-diagonal
    matmuls ~M * Nk / block per score, so the block grows with the sequence."""
    for limit, block in ((256, 16), (1024, 32), (4096, 64)):
        if nk <= limit:
            return block
    return 128


def batch_chunk(h: int, nq: int, nk: int, target: int = CHUNK_ELEMENTS) -> int:
    """Batch elements per chunk so that one [chunk, H, Nq, Nk] score tensor stays cache-sized."""
    return max(1, target // max(1, h * nq * nk))


class _CTAttentionCPU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, t_q, t_k, log_weights, rates, key_valid, causal, block, chunk):
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        ctx.meta = (b, h, nq, nk, d, dv, block, chunk)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, log_weights.dtype, rates.dtype)
        ctx.empty = nq == 0 or nk == 0
        if ctx.empty:
            return q.new_zeros(b, h, nq, dv, dtype=v.dtype)
        lw = log_weights.detach().to(ct)
        lam = rates.detach().to(ct)
        qc, kc, vc = (x.detach().to(ct) for x in (q, k, v))
        tq, tk = t_q.detach().to(ct), t_k.detach().to(ct)
        valid = key_valid.to(torch.bool)
        outs, flat = [], []
        for lo in range(0, b, chunk):
            sl = slice(lo, lo + chunk)
            out, saved = _chunk_forward(qc[sl], kc[sl], vc[sl], tq[sl], tk[sl], valid[sl], lw, lam, causal, block)
            outs.append(out)
            flat.extend(saved)
        ctx.n_saved = len(flat) // len(outs)
        ctx.save_for_backward(lw, lam, *flat)
        return torch.cat(outs).to(v.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        b, h, nq, nk, d, dv, block, chunk = ctx.meta
        q_dt, k_dt, v_dt, lw_dt, rate_dt = ctx.dtypes
        needs = ctx.needs_input_grad
        if ctx.empty:
            return (
                torch.zeros(b, h, nq, d, dtype=q_dt),
                torch.zeros(b, h, nk, d, dtype=k_dt),
                torch.zeros(b, h, nk, dv, dtype=v_dt),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
            )
        lw, lam, *flat = ctx.saved_tensors
        param_grad = bool(needs[5] or needs[6])
        do_all = grad_out.to(lw.dtype)
        parts = []
        for i, lo in enumerate(range(0, b, chunk)):
            saved = flat[i * ctx.n_saved : (i + 1) * ctx.n_saved]
            parts.append(_chunk_backward(do_all[lo : lo + chunk], saved, lw, lam, block, nk, param_grad))
        dq = torch.cat([x[0] for x in parts]).to(q_dt)
        dk = torch.cat([x[1] for x in parts]).to(k_dt)
        dvv = torch.cat([x[2] for x in parts]).to(v_dt)
        d_lw = d_rate = None
        if param_grad:
            d_lw = torch.stack([x[3] for x in parts]).sum(0).to(lw_dt)
            d_rate = torch.stack([x[4] for x in parts]).sum(0).to(rate_dt)
        return dq, dk, dvv, None, None, d_lw, d_rate, None, None, None, None


class CPUAttention(AttentionBackend):
    """Continuous-time attention for CPU tensors (same contract as ``ct_attention_reference``).

    Differentiable in q, k, v, log_weights and rates; the times get no gradient. Options:
    ``block``, keys per anchor block (default ``default_block``); ``chunk``, batch elements
    processed together (default ``batch_chunk``).
    """

    name = "ct_attention_cpu"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
        return check_supported(q, k, v)

    def run(self, call: AttentionCall, block: int | None = None, chunk: int | None = None) -> torch.Tensor:
        q, k = call.q, call.k
        if block is None:
            block = default_block(k.shape[2])
        if block < 1:
            raise ValueError(f"ct_attention_cpu: block must be >= 1, got {block}")
        if chunk is None:
            chunk = batch_chunk(q.shape[1], q.shape[2], k.shape[2])
        if chunk < 1:
            raise ValueError(f"ct_attention_cpu: chunk must be >= 1, got {chunk}")
        out: torch.Tensor = _CTAttentionCPU.apply(*astuple_shallow(call), int(block), chunk)
        return out


ct_attention_cpu = CPUAttention()
