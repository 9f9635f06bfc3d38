"""Continuous-time attention in plain PyTorch: the reference every implementation must match.

dt_ij = t_q_i - t_k_j (causal) or |t_q_i - t_k_j| (non-causal)
K(dt) = sum_m pi_hm exp(-lambda_hm dt)
s_ij  = q_i . k_j / sqrt(D) + log K(dt_ij)
masked: key_valid false, or (causal and t_k_j > t_q_i); an all-masked row gives 0.

Adding a constant to a head's log_weights shifts every score of a row alike, which the softmax
cancels: the log-weights' gradient sums to zero over the components. Every path returns it so
(``shift_free``), and at M = 1 it is exactly 0.
"""

from __future__ import annotations

import math

import torch


def log_decay_kernel(dt: torch.Tensor, log_weights: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """log K(dt) = log sum_m pi_hm exp(-lambda_hm dt), [B,Nq,Nk] gaps -> [B,H,Nq,Nk].

    Computed around an anchor a_h(dt) = max_m log pi_hm - (min_m lambda_hm) dt:
    log K = a + log sum_m exp((log pi_m - max log pi) - (lambda_m - min lambda) dt). Every
    exponent is <= 0 (no overflow for any gap or rate), the slowest component keeps the sum away
    from 0 at large gaps, and, unlike a logsumexp over a [B,H,Nq,Nk,M] tensor, the M terms are
    accumulated one at a time: the same value at about half the time and memory on CPU.
    """
    lw_max = log_weights.max(dim=-1).values  # [H]
    lam_min = rates.min(dim=-1).values
    d_lw = (log_weights - lw_max[:, None])[None, :, :, None, None]  # [1,H,M,1,1]
    d_lam = (lam_min[:, None] - rates)[None, :, :, None, None]  # <= 0
    gap = dt[:, None]  # [B,1,Nq,Nk]
    total = None
    for m in range(log_weights.shape[-1]):
        term = torch.exp(torch.addcmul(d_lw[:, :, m], d_lam[:, :, m], gap))
        total = term if total is None else total + term
    assert total is not None
    # Only a weight below exp(-87) (fp32) relative to the largest could underflow every term.
    tiny = torch.finfo(total.dtype).tiny
    return torch.addcmul(lw_max[None, :, None, None], -lam_min[None, :, None, None], gap) + total.clamp_min(tiny).log()


class _ShiftFree(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func (vmap, per-sample gradients) can batch it

    @staticmethod
    def forward(log_weights: torch.Tensor) -> torch.Tensor:
        return log_weights.view_as(log_weights)  # a view: no copy (a launch a layer on a GPU)

    @staticmethod
    def setup_context(ctx: object, inputs: object, output: object) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad - grad.mean(dim=-1, keepdim=True)


def shift_free(log_weights: torch.Tensor) -> torch.Tensor:
    """``log_weights`` unchanged (bit for bit, -inf included), with its gradient projected to zero
    sum over the components: g - mean_m(g). The true gradient has zero sum (shift invariance);
    this removes the rounding along that direction, and at M = 1 leaves exactly g - g = 0."""
    if not log_weights.requires_grad:
        return log_weights
    out: torch.Tensor = _ShiftFree.apply(log_weights)
    return out


def ct_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    log_weights: torch.Tensor,
    rates: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Reference continuous-time attention in plain PyTorch (any device, any float dtype).

    q [B,H,Nq,D], k/v [B,H,Nk,D], t_q [B,Nq], t_k [B,Nk] in days, log_weights/rates [H,M],
    key_valid [B,Nk] bool. Scores and the decay are computed in fp32 (fp64 if inputs are fp64).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    d = q.shape[-1]
    dt = t_q.to(compute)[:, :, None] - t_k.to(compute)[:, None, :]  # [B,Nq,Nk]
    if causal:
        masked = dt < 0
        dt = dt.clamp_min(0)
    else:
        masked = torch.zeros_like(dt, dtype=torch.bool)
        dt = dt.abs()
    if key_valid is not None:
        masked = masked | ~key_valid[:, None, :]
    log_kernel = log_decay_kernel(dt, shift_free(log_weights).to(compute), rates.to(compute))  # [B,H,Nq,Nk]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) / math.sqrt(d)
    scores = (scores + log_kernel).masked_fill(masked[:, None], float("-inf"))
    # Rows with no unmasked key: softmax over all -inf is NaN; give them zero weights instead.
    empty = masked.all(dim=-1)[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(compute)).to(q.dtype)


def check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    log_weights: torch.Tensor,
    rates: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> None:
    """Clear errors for mismatched shapes before a kernel launch would read out of bounds."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"ct_attention: q, k, v must be [B,H,N,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if k.shape != (b, h, nk, d) or v.shape[:3] != (b, h, nk):
        raise ValueError(f"ct_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if t_q.shape != (b, nq) or t_k.shape != (b, nk):
        raise ValueError(
            f"ct_attention: t_q {tuple(t_q.shape)} must be {(b, nq)}, t_k {tuple(t_k.shape)} must be {(b, nk)}"
        )
    if log_weights.dim() != 2 or log_weights.shape[0] != h or rates.shape != log_weights.shape:
        raise ValueError(
            f"ct_attention: log_weights {tuple(log_weights.shape)} and rates "
            f"{tuple(rates.shape)} must both be [H={h}, M]"
        )
    if key_valid is not None and key_valid.shape != (b, nk):
        raise ValueError(f"ct_attention: key_valid {tuple(key_valid.shape)} must be {(b, nk)}")
