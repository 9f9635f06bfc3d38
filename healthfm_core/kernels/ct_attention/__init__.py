"""Continuous-time attention: the PyTorch reference, the fused Triton kernel and the dispatcher.

reference.py  ct_attention_reference (the math, any device), log_decay_kernel, check_shapes, shift_free
contract.py   AttentionBackend: the one entry every fused path below implements
cpu.py        ct_attention_cpu (fused CPU path in plain PyTorch)
cpu_native.py ct_attention_cpu_native (cpu_native.c built on first use; optional)
triton.py     ct_attention_triton (fused forward/backward; imports triton when it first runs)
packed.py     split_qkv: q, k, v as views of one projection, their gradients back without a copy
tiling.py     the kernels' tilings, and the one that fits a card's shared memory
aot.py        the kernels compiled ahead of time for sm_80/sm_89/sm_90 without a GPU (CI's check)
dispatch.py   ct_attention (HEALTHFM_CT_ATTENTION=reference|cpu|cpu_native|triton|auto) and IMPLEMENTATIONS
"""

from healthfm_core.kernels.ct_attention.dispatch import (
    IMPL_ENV,
    IMPLEMENTATIONS,
    auto_choice,
    ct_attention,
)
from healthfm_core.kernels.ct_attention.packed import split_qkv
from healthfm_core.kernels.ct_attention.reference import (
    check_shapes,
    ct_attention_reference,
    log_decay_kernel,
)
from healthfm_core.kernels.ct_attention.triton import ct_attention_triton

__all__ = [
    "IMPLEMENTATIONS",
    "IMPL_ENV",
    "auto_choice",
    "check_shapes",
    "ct_attention",
    "ct_attention_reference",
    "ct_attention_triton",
    "log_decay_kernel",
    "split_qkv",
]
