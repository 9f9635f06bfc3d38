"""Every linear layer's weight and bias cast to the autocast dtype once a step, in one op.

Under ``torch.autocast`` each ``nn.Linear`` casts its fp32 weight and bias on the way in (a
kernel launch each) and their gradients back to fp32 on the way out (another each): 16 launches
a backbone layer, ~400 of a ``paper`` step's ~2,500 on a GPU (issue 41's target is 2,000).
Inside ``linear_weights_cast_once`` the linears hold bf16 copies made by one ``_foreach_copy_``
(CUDA's multi-tensor path: a launch per ~20 M elements), which autocast then leaves alone, and
the backward turns their gradients back into fp32 with one more. The numbers are autocast's own:
the same rounding of the same weights, the same fp32 gradients bit for bit.

The parameters are swapped for the copies only while the forward runs; the backward reaches the
real ones through the cast. The trainer's default step uses it; a DP-SGD step
(healthfm_core/privacy/engine.py: a forward and a backward a sample) keeps plain autocast. The
cost: each linear's bf16 weight gradient waits for the end of the backward instead of being cast
as it comes (paper: ~0.7 GB more at the peak).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

ALIGN = 16  # elements: each copy starts 32-byte aligned in fp32, so the copy kernel can vectorise


def _cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of ``tensors`` in ``dtype``: views of one allocation, each start aligned, filled by
    one ``_foreach_copy_`` (two ops, not two a tensor)."""
    sizes = [t.numel() for t in tensors]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // ALIGN) * ALIGN)
    flat = torch.empty(starts[-1], dtype=dtype, device=tensors[0].device)
    copies = [flat[s : s + n].view(t.shape) for s, n, t in zip(starts, sizes, tensors)]
    torch._foreach_copy_(copies, list(tensors))
    return copies


class _CastOnce(torch.autograd.Function):
    """weights (all fp32) -> copies in ``dtype``; gradients back to fp32, None where none came."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        return tuple(_cast(weights, dtype))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if wanted:
            # fp32 gradients as views of one buffer: the parameters' .grad take them as they are
            # (AccumulateGrad keeps a dense tensor of the parameter's strides without a copy).
            came = [g for i in wanted if (g := grads[i]) is not None]
            for i, g in zip(wanted, _cast(came, torch.float32)):
                out[i] = g
        return (None, *out)


def _linear_places(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, "weight" | "bias", parameter) for every fp32 parameter of every nn.Linear."""
    return [
        (module, name, p)
        for module in model.modules()
        if isinstance(module, nn.Linear)
        for name in ("weight", "bias")
        if (p := module._parameters.get(name)) is not None and p.dtype == torch.float32
    ]


@contextlib.contextmanager
def linear_weights_cast_once(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """While open, ``model``'s linear layers compute with copies of their weights and biases in
    ``dtype``, made in one op and differentiable back to the fp32 parameters. ``dtype`` None
    (training in fp32): nothing changes. Use it inside the ``torch.autocast`` of the same dtype;
    a parameter two linears share is cast once for both."""
    places = _linear_places(model)
    if dtype is None or dtype == torch.float32 or not places:
        yield
        return
    weights: list[torch.Tensor] = list({id(p): p for _, _, p in places}.values())
    trained = [w for w in weights if w.requires_grad]
    frozen = [w for w in weights if not w.requires_grad]
    copies = dict(zip(map(id, trained), _CastOnce.apply(dtype, *trained) if trained else ()))
    if frozen:  # copies outside autograd: no linear computes a weight gradient nobody takes
        copies.update(zip(map(id, frozen), _cast(frozen, dtype)))
    try:
        for module, name, p in places:
            module._parameters[name] = copies[id(p)]  # a plain tensor (not a Parameter) while the forward runs
        yield
    finally:
        for module, name, p in places:
            module._parameters[name] = p
