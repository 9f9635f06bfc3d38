"""How the Triton kernels tile a call, and which tiling fits a GPU's shared memory.

A tiling is (block_m, block_n, num_warps, num_stages) for the forward and again for the
backward. Each head dim has a short list of them, preferred first (``TILINGS``); the first one is
the H100's (``default_config``). A GPU refuses to launch a program that asks for more shared
memory a block than it has (triton's launcher raises OutOfResources), and the cards differ by
more than 2x: 227 KiB a block on sm_90 (H100, H200), 163 KiB on sm_80 (A100), 99 KiB on sm_86
and sm_89 (A10, A40, L4, L40S, the RTX cards many hospitals buy), 64 KiB on sm_75 (T4).
``fitted_config`` takes, for the forward and the backward each, the first tiling whose
``shared_memory_bound`` is within the device's limit, or None when none is (the dispatcher then
uses the reference).

Cards below sm_80 (a T4) never get here: ``triton.check_supported`` refuses them
(``MIN_CAPABILITY``).

``shared_memory_bound`` is an upper bound of what triton allocates on sm_80 and newer, written from what the
kernels keep in shared memory (the pipelined key or query tiles, the tiles held for a program's
life, the score tiles converted between layouts), and checked against the compiled kernels by
``aot.py`` for every architecture and head dim in CI (tests/unit/test_ct_attention_aot.py) with
the oldest and the newest triton. It is loose for bf16 on sm_80 (triton keeps fewer buffers
there than the bound allows), so a 99 KiB card may get a smaller tiling than it could run; it is
never below what a compiled kernel asks for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# (block_m, block_n, num_warps, num_stages)
Tiling = tuple[int, int, int, int]

# Per head dim (up to 64; above), forward and backward tilings, preferred first. The first of
# each: benchmarks/ct_attention_tune.py's sweep on an H100 (2026-11-26, N 4,096, M 4: the forward
# 64 x 64 1.37 ms against 1.66 for 128 x 64; the backward's 64 x 64 within 3% of the best).
# Larger head dims need more warps a tile. The rest give up pipeline stages first, then tile size.
# The last, 16 x 16 on two warps, is slow but keeps the largest head dims in fp32 on a 99 KiB card
# off the reference, whose N x N scores a long history does not fit.
TILINGS: dict[bool, tuple[tuple[Tiling, ...], tuple[Tiling, ...]]] = {
    False: (
        ((64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)),
        ((64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)),
    ),
    True: (
        ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)),
        ((64, 64, 8, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 2, 1)),
    ),
}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters (forward and backward)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    bwd_block_m: int = 64
    bwd_block_n: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "bwd_block_m", "bwd_block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")

    @property
    def forward(self) -> Tiling:
        return self.block_m, self.block_n, self.num_warps, self.num_stages

    @property
    def backward(self) -> Tiling:
        return self.bwd_block_m, self.bwd_block_n, self.bwd_num_warps, self.bwd_num_stages


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The kernels' tile width along the head dim: a power of two >= 16 (tl.dot's smallest), the
    columns past ``head_dim`` masked."""
    return max(16, next_power_of_2(head_dim))


def _tilings(head_dim: int) -> tuple[tuple[Tiling, ...], tuple[Tiling, ...]]:
    return TILINGS[head_dim > 64]


def default_config(head_dim: int) -> KernelConfig:
    """The preferred tiling for this head dim (Hopper's; ``fitted_config`` for a given card)."""
    forward, backward = _tilings(head_dim)
    return KernelConfig(*forward[0], *backward[0])


def shared_memory_bound(kernel: str, tiling: Tiling, head_dim: int, element_bytes: int) -> int:
    """Bytes of shared memory triton may allocate for ``kernel`` (``_ct_fwd``, ``_ct_bwd_dkdv``,
    ``_ct_bwd_dq``) at this tiling, an upper bound.

    Forward: ``num_stages`` buffers of a key and a value tile in flight, the query tile, and the
    fp32 score tile converted to the P @ V operand. Backward: the two tiles a program holds (k, v
    for dK/dV; q, dO for dQ) and the two it streams, each with room for a transposed copy (each is
    an operand of two products) counted as half a tile more per dimension, two fp32 score-sized
    tiles (P and dS), and each further stage a copy of the streamed pair. 1 KiB for the per-row
    vectors and the reductions' scratch. The half tile is what the compiled kernels needed: with
    one tile per operand, dK/dV at head dim 128, 64 x 32, bf16 on sm_90 asks for 81,920 bytes against
    a bound of 66,560 (benchmarks' sweep, docs/performance.md)."""
    block_m, block_n, _, stages = tiling
    width = block_d(head_dim) * element_bytes
    if kernel == "_ct_fwd":
        return width * (block_m + 2 * block_n * stages) + 4 * block_m * block_n + 1024
    if kernel in ("_ct_bwd_dkdv", "_ct_bwd_dq"):
        streamed = block_m if kernel == "_ct_bwd_dkdv" else block_n
        tiles = 3 * block_m + 3 * block_n + (stages - 1) * 2 * streamed
        return width * tiles + 8 * block_m * block_n + 1024
    raise ValueError(f"shared_memory_bound: unknown kernel {kernel!r}")


@functools.cache  # asked on every call of every layer
def fitted_config(head_dim: int, dtype: torch.dtype, shared_limit: int | None) -> KernelConfig | None:
    """The first forward and the first backward tiling of ``TILINGS`` whose shared memory bound is
    within ``shared_limit`` bytes a block (None: no limit, the preferred tiling); None when no
    tiling fits."""
    forward, backward = _tilings(head_dim)
    if shared_limit is None:
        return default_config(head_dim)
    size = dtype.itemsize

    def fits(kernels: tuple[str, ...], tiling: Tiling) -> bool:
        return all(shared_memory_bound(k, tiling, head_dim, size) <= shared_limit for k in kernels)

    fwd = next((t for t in forward if fits(("_ct_fwd",), t)), None)
    bwd = next((t for t in backward if fits(("_ct_bwd_dkdv", "_ct_bwd_dq"), t)), None)
    if fwd is None or bwd is None:
        return None
    return KernelConfig(*fwd, *bwd)
