"""The wearable encoder's epoch attention (EpochBlock) against an explicit fp64 reference: outputs
and input/parameter gradients for all-present, partially present and mixed batches, and patches
with a single present epoch. Guards any faster path of the block (benchmarks/epoch_attention.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from healthfm_core.model.healthfm import EpochBlock

N_EPOCHS = 120


def reference(block: EpochBlock, x: Tensor, present: Tensor) -> Tensor:
    """EpochBlock written out in fp64: softmax over present keys only, absent queries still attend."""
    n, e, d = x.shape
    h = block.n_heads
    qkv = block.qkv(block.norm1(x)).view(n, e, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1) @ v
    x = x + block.proj(attn.transpose(1, 2).reshape(n, e, d))
    return x + block.mlp(block.norm2(x))


def presence(pattern: str, n: int, gen: torch.Generator) -> Tensor:
    present = torch.ones(n, N_EPOCHS, dtype=torch.bool)
    if pattern in ("partial", "mixed"):
        rows = range(n) if pattern == "partial" else range(0, n, 3)
        for i in rows:
            present[i] = torch.rand(N_EPOCHS, generator=gen) < 0.5
            present[i, 0] = True
    if pattern == "single":
        present[:] = False
        present[torch.arange(n), torch.randint(N_EPOCHS, (n,), generator=gen)] = True
    if pattern == "mixed":  # a single-epoch patch and a full one in the same batch as partial ones
        present[1] = False
        present[1, N_EPOCHS - 1] = True
    return present


@pytest.mark.parametrize("pattern", ["all", "partial", "mixed", "single"])
@pytest.mark.parametrize(("d", "heads"), [(16, 2), (64, 4)])  # the tiny and small wearable encoders
def test_epoch_block_matches_fp64_reference(pattern: str, d: int, heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = EpochBlock(d, heads, 2.0, 0.0)
    n = 10
    present = presence(pattern, n, gen)
    x = torch.randn(n, N_EPOCHS, d, generator=gen)
    grad_out = torch.randn(n, N_EPOCHS, d, generator=gen)

    x32 = x.clone().requires_grad_()
    out = block(x32, present)
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}

    block64 = EpochBlock(d, heads, 2.0, 0.0).double()
    block64.load_state_dict(block.state_dict())
    x64 = x.double().requires_grad_()
    ref = reference(block64, x64, present)
    ref.backward(grad_out.double())

    assert x32.grad is not None and x64.grad is not None
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    for name, p in block64.named_parameters():  # sums over n x E rows: fp32 accumulation, looser atol
        assert p.grad is not None, name
        torch.testing.assert_close(grads[name], p.grad.float(), rtol=1e-4, atol=5e-5)


def test_absent_keys_do_not_reach_present_epochs() -> None:
    """Changing an absent epoch's input changes nothing at the present epochs."""
    torch.manual_seed(0)
    block = EpochBlock(16, 2, 2.0, 0.0)
    present = torch.ones(2, N_EPOCHS, dtype=torch.bool)
    present[:, 60:] = False
    x = torch.randn(2, N_EPOCHS, 16)
    y = x.clone()
    y[:, 60:] += 100.0
    torch.testing.assert_close(block(x, present)[:, :60], block(y, present)[:, :60])
