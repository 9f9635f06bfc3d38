"""``ct_attention``: one entry point that picks an implementation of continuous-time attention.

The implementations are named paths in ``IMPLEMENTATIONS`` (each with the reference's
signature); ``impl`` or the environment variable HEALTHFM_CT_ATTENTION names one of them, or
"auto", which ``auto_choice`` resolves per call from the inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from healthfm_core.kernels.ct_attention.cpu import ct_attention_cpu
from healthfm_core.kernels.ct_attention.cpu_native import ct_attention_cpu_native
from healthfm_core.kernels.ct_attention.jit import unavailable_reason
from healthfm_core.kernels.ct_attention.launch import ct_attention_triton
from healthfm_core.kernels.ct_attention.reference import (
    check_shapes,
    ct_attention_reference,
)

logger = logging.getLogger(__name__)

IMPL_ENV = "HEALTHFM_CT_ATTENTION"
AUTO = "auto"


# name -> implementation; "auto" is not a path but a choice among these.
# Each takes the reference's arguments (docs/architecture.md, "Continuous-time attention").
IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": ct_attention_reference,
    # The fused paths refuse times that need a gradient (contract.py): forced, they say so.
    "triton": ct_attention_triton,
    "cpu": ct_attention_cpu,
    "cpu_native": ct_attention_cpu_native,
}


def auto_choice(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor, log_weights: torch.Tensor
) -> str:
    """The path "auto" takes: the Triton kernel for CUDA tensors it supports; for CPU tensors, the
    compiled CPU kernel where a C compiler built it, else the fused PyTorch CPU path (all faster
    than the reference: benchmarks/ct_attention*.py); the reference otherwise (gradients with
    respect to the times, other devices)."""
    if t_q.requires_grad or t_k.requires_grad:
        return "reference"
    if q.device.type == "cpu":
        if ct_attention_cpu.unsupported(q, k, v, log_weights) is not None:
            return "reference"
        return "cpu_native" if ct_attention_cpu_native.unavailable(q) is None else "cpu"
    if not q.is_cuda:
        return "reference"
    why = unavailable_reason()
    if why is not None:  # a CUDA machine without triton: still correct, just slower
        logger.warning("ct_attention: triton unavailable (%s); using the reference", why)
        return "reference"
    if ct_attention_triton.unsupported(q, k, v, log_weights) is not None:
        return "reference"
    return "triton"


def requested_impl(impl: str | None) -> str:
    """``impl``, or HEALTHFM_CT_ATTENTION when it is None (default "auto"), checked against the names."""
    choice = impl if impl is not None else os.environ.get(IMPL_ENV, AUTO).strip().lower() or AUTO
    names = (*IMPLEMENTATIONS, AUTO)
    if choice not in names:
        source = "impl" if impl is not None else f"environment variable {IMPL_ENV}"
        raise ValueError(f"ct_attention: {source}={choice!r}; expected one of {', '.join(names)}")
    return choice


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
    impl: str | None = None,
) -> torch.Tensor:
    """Continuous-time attention, dispatching to the fused Triton kernel where one applies.

    ``impl`` (or the environment variable HEALTHFM_CT_ATTENTION when ``impl`` is None) is
    "auto" (default: the Triton kernel for CUDA tensors; for CPU tensors the compiled CPU kernel,
    or the fused PyTorch CPU path without a C compiler; the reference otherwise), "reference",
    "cpu" (fused PyTorch), "cpu_native" (compiled; an error without a compiler), or "triton" (the
    kernel or an error; on CPU it needs TRITON_INTERPRET=1).
    """
    choice = requested_impl(impl)
    if choice != "reference":
        check_shapes(q, k, v, t_q, t_k, log_weights, rates, key_valid)
    if choice == AUTO:
        choice = auto_choice(q, k, v, t_q, t_k, log_weights)
    return IMPLEMENTATIONS[choice](q, k, v, t_q, t_k, log_weights, rates, key_valid, causal)
