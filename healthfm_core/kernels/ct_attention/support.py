"""Whether the fused kernels (kernels.py) run on a card and take a call's inputs.

The card is read as triton's launcher reads it (compute capability, shared memory a block); each
answer is cached per device, and a card refused for its age or unreadable properties is named in
one warning.
"""

from __future__ import annotations

import functools
import logging

import torch

from healthfm_core.kernels.ct_attention.jit import unavailable_reason
from healthfm_core.kernels.ct_attention.tiling import fitted_config

logger = logging.getLogger(__name__)

MAX_COMPONENTS = 8
# Ampere and newer. On sm_75 (T4) triton 3.6 and 3.9 compile every tl.dot to FMA loops (the compile
# check at sm_75: 8,720 fma.rn.f32 and no mma instruction in the forward, fp16 and bf16 alike), and
# bf16 is not native there. The kernel was written and checked for tensor cores: such a card gets
# the reference (cuBLAS has fp16 tensor-core products on sm_75).
MIN_CAPABILITY = (8, 0)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
