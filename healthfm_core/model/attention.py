"""Continuous-time attention: the one place its math lives.

    dt_ij = t_q_i - t_k_j (causal) or |t_q_i - t_k_j| (non-causal)
    K(dt) = sum_m pi_hm exp(-lambda_hm dt)
    s_ij  = q_i . k_j / sqrt(D) + log K(dt_ij)
    masked: key_valid false, or (causal and t_k_j > t_q_i); an all-masked row gives 0.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMPL_ENV = "HEALTHFM_CT_ATTENTION"
Impl = Literal["reference", "triton", "auto"]
_IMPLS = ("reference", "triton", "auto")


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
    log_kernel = log_decay_kernel(dt, log_weights.to(compute), rates.to(compute))  # [B,H,Nq,Nk]
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
    *,
    impl: Impl | None = None,
) -> torch.Tensor:
    """Continuous-time attention, dispatching to the fused Triton kernel where one applies.

    ``impl`` (or the environment variable HEALTHFM_CT_ATTENTION when ``impl`` is None) is
    "auto" (default: the kernel for CUDA tensors it supports, the reference otherwise),
    "reference", or "triton" (the kernel or an error; on CPU it needs TRITON_INTERPRET=1).
    """
    choice = impl if impl is not None else os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if choice not in _IMPLS:
        source = "impl" if impl is not None else f"environment variable {IMPL_ENV}"
        raise ValueError(f"ct_attention: {source}={choice!r}; expected one of {', '.join(_IMPLS)}")
    if choice == "reference":
        return ct_attention_reference(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
    check_shapes(q, k, v, t_q, t_k, log_weights, rates, key_valid)
    if choice == "auto":
        if not q.is_cuda or t_q.requires_grad or t_k.requires_grad:
            return ct_attention_reference(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
        try:
            from healthfm_core.kernels import ct_attention_triton as kernel
        except ImportError as exc:  # a CUDA machine without triton: still correct, just slower
            logger.warning("ct_attention: triton unavailable (%s); using the reference", exc)
            return ct_attention_reference(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
        if kernel.check_supported(q, k, v, log_weights) is not None:
            return ct_attention_reference(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
        return kernel.ct_attention_triton(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
    from healthfm_core.kernels import ct_attention_triton as kernel

    if t_q.requires_grad or t_k.requires_grad:
        raise ValueError("ct_attention(impl='triton'): the kernel does not differentiate the times")
    return kernel.ct_attention_triton(q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)


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
        raise ValueError(f"ct_attention: q, k, v must be [B,H,N,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if k.shape != (b, h, nk, d) or v.shape[:3] != (b, h, nk):
        raise ValueError(f"ct_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if t_q.shape != (b, nq) or t_k.shape != (b, nk):
        raise ValueError(f"ct_attention: t_q {tuple(t_q.shape)} must be {(b, nq)}, t_k {tuple(t_k.shape)} must be {(b, nk)}")
    if log_weights.dim() != 2 or log_weights.shape[0] != h or rates.shape != log_weights.shape:
        raise ValueError(f"ct_attention: log_weights {tuple(log_weights.shape)} and rates "
                         f"{tuple(rates.shape)} must both be [H={h}, M]")
    if key_valid is not None and key_valid.shape != (b, nk):
        raise ValueError(f"ct_attention: key_valid {tuple(key_valid.shape)} must be {(b, nk)}")


HOURS_PER_DAY = 24.0
DAYS_PER_YEAR = 365.25


class DecayKernel(nn.Module):
    """Learnable mixture-of-exponentials decay K(dt) = sum_m pi_hm exp(-lambda_hm dt), per head.

    - log weights: ``log_softmax`` of free logits, so sum_m pi_hm = 1 exactly;
    - rates: log lambda = log rate_min + sigmoid(theta) (log rate_max - log rate_min), so the
      rates stay within [rate_min, rate_max] per day: they cannot collapse to 0 (no decay at all,
      and no gradient back) nor explode (attending only to the same instant);
    - initialised at log-spaced timescales 1/lambda from ``timescale_min_days`` (an hour) to
      ``timescale_max_days`` (several years), the same for every head, uniform weights.
    """

    def __init__(
        self,
        n_heads: int,
        n_components: int = 4,
        rate_min: float = 1.0 / (30.0 * DAYS_PER_YEAR),
        rate_max: float = 4.0 * HOURS_PER_DAY,
        timescale_min_days: float = 1.0 / HOURS_PER_DAY,
        timescale_max_days: float = 5.0 * DAYS_PER_YEAR,
    ) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"DecayKernel: n_heads must be >= 1, got {n_heads}")
        if n_components < 1:
            raise ValueError(f"DecayKernel: n_components must be >= 1, got {n_components}")
        if not 0.0 < rate_min < rate_max:
            raise ValueError(f"DecayKernel: need 0 < rate_min < rate_max, got {rate_min}, {rate_max}")
        if not 0.0 < timescale_min_days <= timescale_max_days:
            raise ValueError(
                f"DecayKernel: need 0 < timescale_min_days <= timescale_max_days, got "
                f"{timescale_min_days}, {timescale_max_days}"
            )
        init_rates = 1.0 / torch.logspace(
            math.log10(timescale_min_days), math.log10(timescale_max_days), n_components, dtype=torch.float64
        ) if n_components > 1 else torch.tensor([1.0 / math.sqrt(timescale_min_days * timescale_max_days)],
                                                dtype=torch.float64)
        lo, hi = math.log(rate_min), math.log(rate_max)
        if not (rate_min <= init_rates.min().item() and init_rates.max().item() <= rate_max):
            raise ValueError(
                f"DecayKernel: initial rates {init_rates.min().item():.3g}..{init_rates.max().item():.3g}/day "
                f"(from the timescales) fall outside [rate_min={rate_min:.3g}, rate_max={rate_max:.3g}]"
            )
        # Keep the initial point strictly inside the sigmoid's range so theta stays finite.
        frac = ((init_rates.log() - lo) / (hi - lo)).clamp(1e-4, 1 - 1e-4)
        theta = torch.logit(frac).to(torch.float32)
        self.n_heads = n_heads
        self.n_components = n_components
        self.rate_min = rate_min
        self.rate_max = rate_max
        self.weight_logits = nn.Parameter(torch.zeros(n_heads, n_components))
        self.rate_logits = nn.Parameter(theta.expand(n_heads, n_components).clone())

    def log_weights(self) -> torch.Tensor:
        """[H, M] log pi, logsumexp over M = 0."""
        return torch.log_softmax(self.weight_logits, dim=-1)

    def rates(self) -> torch.Tensor:
        """[H, M] lambda per day, within [rate_min, rate_max]."""
        lo, hi = math.log(self.rate_min), math.log(self.rate_max)
        return torch.exp(lo + torch.sigmoid(self.rate_logits) * (hi - lo))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_weights, rates), both [H, M], ready for ``ct_attention``."""
        return self.log_weights(), self.rates()

    @torch.no_grad()
    def rate_range(self) -> dict[str, float]:
        """Smallest and largest rate (per day) and the matching timescales (days), for logging
        (a collapse shows up as rates piling up at rate_min or rate_max)."""
        rates = self.rates()
        lo, hi = rates.min().item(), rates.max().item()
        return {"rate_min": lo, "rate_max": hi, "timescale_max_days": 1.0 / lo, "timescale_min_days": 1.0 / hi}

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_components={self.n_components}, "
                f"rate_min={self.rate_min:.3g}, rate_max={self.rate_max:.3g}")
