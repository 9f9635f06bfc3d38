"""Continuous-time attention: the one place its math lives.

    dt_ij = t_q_i - t_k_j (causal) or |t_q_i - t_k_j| (non-causal)
    K(dt) = sum_m pi_hm exp(-lambda_hm dt)
    s_ij  = q_i . k_j / sqrt(D) + log K(dt_ij)
    masked: key_valid false, or (causal and t_k_j > t_q_i); an all-masked row gives 0.
"""

from __future__ import annotations

import math

import torch


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
    # log K(dt) = logsumexp_m (log pi_hm - lambda_hm dt): stable for large gaps and fast rates.
    lw = log_weights.to(compute)[None, :, None, None, :]  # [1,H,1,1,M]
    lam = rates.to(compute)[None, :, None, None, :]
    log_kernel = torch.logsumexp(lw - lam * dt[:, None, :, :, None], dim=-1)  # [B,H,Nq,Nk]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) / math.sqrt(d)
    scores = (scores + log_kernel).masked_fill(masked[:, None], float("-inf"))
    # Rows with no unmasked key: softmax over all -inf is NaN; give them zero weights instead.
    empty = masked.all(dim=-1)[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(compute)).to(q.dtype)


def ct_attention(
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
    """Continuous-time attention, dispatching to the fused kernel where one applies."""
    return ct_attention_reference(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
