"""The model side of continuous-time attention: the learnable decay kernel and its summary.

The attention functions live in ``healthfm_core.kernels.ct_attention`` (reference, Triton
kernel, dispatcher); they are re-exported here, where scripts and tests import them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from healthfm_core.kernels.ct_attention import (
    IMPL_ENV,
    check_shapes,
    ct_attention,
    ct_attention_reference,
    log_decay_kernel,
)

__all__ = [
    "DAYS_PER_YEAR",
    "HOURS_PER_DAY",
    "IMPL_ENV",
    "DecayKernel",
    "check_shapes",
    "ct_attention",
    "ct_attention_reference",
    "decay_mixtures",
    "decay_rate_range",
    "decay_rate_summary",
    "log_decay_kernel",
]


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
        init_rates = (
            1.0
            / torch.logspace(
                math.log10(timescale_min_days), math.log10(timescale_max_days), n_components, dtype=torch.float64
            )
            if n_components > 1
            else torch.tensor([1.0 / math.sqrt(timescale_min_days * timescale_max_days)], dtype=torch.float64)
        )
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
        return _log_weights(self.weight_logits)

    def rates(self) -> torch.Tensor:
        """[H, M] lambda per day, within [rate_min, rate_max]."""
        return _rates(self.rate_logits, self.rate_min, self.rate_max)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_weights, rates), both [H, M], ready for ``ct_attention``."""
        return self.log_weights(), self.rates()

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, n_components={self.n_components}, "
            f"rate_min={self.rate_min:.3g}, rate_max={self.rate_max:.3g}"
        )


def _log_weights(weight_logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(weight_logits, dim=-1)


def _rates(rate_logits: torch.Tensor, rate_min: float, rate_max: float) -> torch.Tensor:
    lo, hi = math.log(rate_min), math.log(rate_max)
    return torch.exp(lo + torch.sigmoid(rate_logits) * (hi - lo))


def _alike(kernels: Sequence[DecayKernel]) -> list[list[int]]:
    """Indices of ``kernels`` grouped by what their formula depends on besides the logits (the
    bounds, the number of components, where and in what dtype the logits are), first seen first."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, k in enumerate(kernels):
        key = (k.n_components, k.rate_min, k.rate_max, k.rate_logits.device, k.rate_logits.dtype)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def decay_mixtures(kernels: Sequence[DecayKernel]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each kernel's ``forward()``, (log_weights, rates), computed for all of them at once.

    A model's layers each hold a DecayKernel; computed one by one they cost ~5 ops a layer forward
    and as many backward (on a GPU, launches: ~230 of a ``paper`` step's). Here the logits of alike
    kernels are concatenated, the formula runs once, and each kernel gets its rows: the same
    numbers, a constant number of ops whatever the depth."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(kernels)  # type: ignore[list-item]
    for group in _alike(kernels):
        first = kernels[group[0]]
        if len(group) == 1:
            out[group[0]] = first()
            continue
        heads = [kernels[i].n_heads for i in group]
        log_weights = _log_weights(torch.cat([kernels[i].weight_logits for i in group])).split(heads)
        rates = _rates(torch.cat([kernels[i].rate_logits for i in group]), first.rate_min, first.rate_max).split(heads)
        for i, lw, r in zip(group, log_weights, rates):
            out[i] = (lw, r)
    return out


@torch.no_grad()
def decay_rate_range(module: nn.Module) -> tuple[float, float] | None:
    """(the smallest, the largest) decay rate per day of every DecayKernel in ``module``, in one
    host read; None when it holds none. The trainer's record of every step: a rate is increasing
    in its logit, so each group of alike kernels needs its extreme logits only (``paper``: 10
    ops, where ``decay_rate_summary`` takes 25)."""
    kernels = [k for k in module.modules() if isinstance(k, DecayKernel)]
    if not kernels:
        return None
    ranges = []
    for group in _alike(kernels):
        first = kernels[group[0]]
        theta = torch.cat([kernels[i].rate_logits.flatten() for i in group])
        ranges.append(_rates(torch.stack(torch.aminmax(theta)), first.rate_min, first.rate_max).float())
    extremes = torch.stack(ranges) if len(ranges) > 1 else ranges[0][None]
    low, high = torch.stack([extremes[:, 0].min(), extremes[:, 1].max()]).tolist()
    return low, high


@torch.no_grad()
def decay_rate_summary(module: nn.Module) -> dict[str, float]:
    """Range of the decay rates of every DecayKernel in ``module`` (itself included), for logging:
    a collapse shows up as rates piling up at a bound. Empty when it holds none.

    rate_min_per_day / rate_max_per_day, the matching timescale_max_days / timescale_min_days,
    and rate_at_bound_fraction: the share of rates within 1% (of the log range) of a bound.
    """
    kernels = [k for k in module.modules() if isinstance(k, DecayKernel)]
    if not kernels:
        return {}
    # Alike kernels together (``decay_mixtures``): the trainer logs this every step, and a kernel at
    # a time cost ~12 ops a layer.
    rates, at_bound = [], []
    for group in _alike(kernels):
        first = kernels[group[0]]
        theta = torch.cat([kernels[i].rate_logits.flatten() for i in group])
        r = _rates(theta, first.rate_min, first.rate_max).float()
        log_lo, log_hi = math.log(first.rate_min), math.log(first.rate_max)
        span = log_hi - log_lo
        rates.append(r)
        at_bound.append(((r.log() - log_lo) < 0.01 * span) | ((log_hi - r.log()) < 0.01 * span))
    r = torch.cat(rates)
    names = ("rate_min_per_day", "rate_max_per_day", "timescale_min_days", "timescale_max_days")
    values = [r.min(), r.max(), 1 / r.max(), 1 / r.min(), torch.cat(at_bound).float().mean()]
    # One read on the host (a GPU sync), not one per value: the trainer logs this every step.
    return dict(zip((*names, "rate_at_bound_fraction"), torch.stack(values).tolist()))
