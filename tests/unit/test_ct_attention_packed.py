"""split_qkv (healthfm_core/kernels/ct_attention/packed.py): q, k, v as views of the model's one
projection, and their gradients back into the projection's layout with one copy at most (an unbind
and a view cost two). The Triton path's no-copy case is in test_ct_attention_kernel.py."""

from __future__ import annotations

import pytest
import torch
from helpers.dispatched_ops import DispatchedOps

from healthfm_core.kernels.ct_attention import ct_attention_reference, split_qkv
from healthfm_core.kernels.ct_attention.packed import _SplitQKV, packed_layout

B, N, H, D = 2, 9, 3, 4
COPIES = ("stack", "cat", "clone", "copy_", "_to_copy")


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    projected = torch.randn(B, N, 3 * H * D, generator=g, dtype=torch.float64)
    t = torch.sort(torch.rand(B, N, generator=g, dtype=torch.float64) * 30, dim=1).values
    log_w = torch.log_softmax(torch.randn(H, 2, generator=g, dtype=torch.float64), -1)
    rates = torch.exp(torch.randn(H, 2, generator=g, dtype=torch.float64))
    grad_out = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    return projected, t, log_w, rates, grad_out


def test_the_views_are_the_projections_heads_and_gradients_equal_unbinds() -> None:
    projected, t, log_w, rates, grad_out = _inputs(0)
    x = projected.clone().requires_grad_()
    q, k, v = split_qkv(x, H)
    assert packed_layout(q, k, v) and q.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    y = projected.clone().requires_grad_()
    q0, k0, v0 = y.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    for mine, theirs in zip((q, k, v), (q0, k0, v0)):
        assert torch.equal(mine, theirs)
    out = ct_attention_reference(q, k, v, t, t, log_w, rates)
    with DispatchedOps() as ops:
        (grad,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(ct_attention_reference(q0, k0, v0, t, t, log_w, rates), y, grad_out)
    assert torch.equal(grad, want)
    # Three separate gradients (the reference's): one stack, against an unbind's stack and a clone.
    assert [name for name in ops.names if name in COPIES] == ["stack"]


def test_gradients_already_in_the_projections_layout_are_returned_without_a_copy() -> None:
    buffer = torch.randn(B, N, 3, H, D, dtype=torch.float64)
    dq, dk, dv = buffer.permute(2, 0, 3, 1, 4)
    ctx = type("Ctx", (), {"shape": (B, N, 3 * H * D)})()
    with DispatchedOps() as ops:
        grad, _ = _SplitQKV.backward(ctx, dq, dk, dv)
    assert [name for name in ops.names if name in COPIES] == []
    assert grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(grad, buffer.reshape(B, N, 3 * H * D))


def test_a_missing_gradient_counts_as_zero() -> None:
    projected, t, log_w, rates, grad_out = _inputs(1)
    x = projected.clone().requires_grad_()
    q, k, v = split_qkv(x, H)
    (grad,) = torch.autograd.grad((q * 2).sum() + v.sum(), x)  # k takes no part
    want = torch.zeros(B, N, 3, H, D, dtype=torch.float64)
    want[:, :, 0], want[:, :, 2] = 2.0, 1.0
    assert torch.equal(grad, want.view(B, N, 3 * H * D))


def test_a_projection_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not \[B, N, 3 x 5 heads x D\]"):
        split_qkv(torch.zeros(B, N, 3 * H * D), 5)
