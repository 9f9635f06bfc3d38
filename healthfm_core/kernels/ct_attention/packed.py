"""q, k and v as views of one [B, N, 3 x H x D] projection, and their gradients back into one buffer.

The backbone projects q, k and v with one linear layer. Unpacked with ``view(...).permute(...)``
and a tuple assignment (an ``unbind``), autograd assembles the three gradients with a ``stack``
(a copy) whose permuted result the ``view``'s backward copies again to the projection's layout: two
copies of 3 x B x N x H x D elements a layer, two launches on a GPU. The Triton path already writes
dq, dk and dv into one buffer of the projection's layout (``packed_layout``); ``split_qkv`` hands
that buffer back as the projection's gradient without a copy, and any other path's three gradients
with one.
"""

from __future__ import annotations

from typing import Any

import torch


def packed_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q, k, v ([B, H, N, D] each) are the three slices of one contiguous [B, N, 3, H, D] buffer, as
    ``split_qkv`` makes them and the Triton path's backward writes their gradients."""
    b, h, n, d = q.shape
    hd = h * d
    return (
        k.shape == q.shape
        and v.shape == q.shape
        and q.stride() == k.stride() == v.stride() == (n * 3 * hd, d, 3 * hd, 1)
        and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        and k.storage_offset() - q.storage_offset() == hd
        and v.storage_offset() - k.storage_offset() == hd
    )


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
        b, n, width = projected.shape
        ctx.shape = (b, n, width)
        q, k, v = projected.view(b, n, 3, n_heads, width // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None) -> Any:
        b, n, width = ctx.shape
        grads = (dq, dk, dv)
        if all(g is not None for g in grads) and packed_layout(*grads):  # type: ignore[arg-type]
            assert dq is not None
            return dq.as_strided((b, n, width), (n * width, width, 1), dq.storage_offset()), None
        like = next(g for g in grads if g is not None)
        parts = [(g if g is not None else torch.zeros_like(like)).transpose(1, 2) for g in grads]
        return torch.stack(parts, dim=2).view(b, n, width), None


def split_qkv(projected: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [B, N, 3 x H x D] projection as q, k, v of shape [B, H, N, D] (views, no copy); their
    gradients come back into the projection's layout with no copy when they already share it (the
    Triton path), with one otherwise."""
    if projected.dim() != 3 or projected.shape[-1] % (3 * n_heads) != 0:
        raise ValueError(
            f"split_qkv: projection of shape {tuple(projected.shape)} is not [B, N, 3 x {n_heads} heads x D]"
        )
    q, k, v = _SplitQKV.apply(projected, n_heads)
    return q, k, v
