"""Continuous-time attention: the PyTorch reference, the fused Triton kernel and the dispatcher.

reference.py  ct_attention_reference (the math, any device), log_decay_kernel, check_shapes, shift_free
contract.py   AttentionBackend: the one entry every fused path below implements
cpu.py        ct_attention_cpu (fused CPU path in plain PyTorch)
cpu_native.py ct_attention_cpu_native (cpu_native.c built on first use; optional)
kernels.py    the fused Triton kernels (forward, dQ, dK/dV): thin kernels over their loops' stages
scores.py     their device math (a tile pair's scores on each path, the mixture's gradients)
tile_loads.py their device loads and stores (a program's head, its tiles)
jit.py        triton imported when a kernel first runs, the device functions jitted in its mode
plan.py       the host's tile plan (which tile pairs, where the bulk ends) and its memo
launch.py     ct_attention_triton: the launches and the autograd Function
support.py    whether a card and a call's inputs can take the kernels
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
from healthfm_core.kernels.ct_attention.launch import ct_attention_triton
from healthfm_core.kernels.ct_attention.packed import split_qkv
from healthfm_core.kernels.ct_attention.reference import (
    check_shapes,
    ct_attention_reference,
    log_decay_kernel,
)

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
