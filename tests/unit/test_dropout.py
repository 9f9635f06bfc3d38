"""The cheap CPU dropout: the right keep rate, unbiased in expectation, seeded, gradients through
the mask, and a drop-in for nn.Dropout in modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthfm_core.model.dropout import LEVELS, Dropout, dropout, keep_threshold


@pytest.mark.parametrize("p", [0.1, 0.15, 0.5, 1 / 3, 0.9])
def test_unbiased_by_construction(p: float) -> None:
    threshold, scale = keep_threshold(p)
    keep = (LEVELS // 2 - 1 - threshold + 1) / LEVELS  # share of int16 values >= threshold
    assert abs(keep - (1 - p)) <= 0.5 / LEVELS
    assert math.isclose(keep * scale, 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_mean(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last 64-bit draw is used in part
    out = dropout(torch.ones(n), p)
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma
    _, scale = keep_threshold(p)
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, scale]))
    assert abs(out.double().mean().item() - 1.0) < 5 * sigma * scale


def test_every_16_bit_lane_is_uniform() -> None:
    # Four uniforms per 64-bit draw: the top lane too must be signed (a 63-bit draw would make
    # it never negative and keep every fourth element far too often).
    torch.manual_seed(1)
    out = dropout(torch.ones(4 * 200_000), 0.5).view(-1, 4)
    kept = (out != 0).double().mean(0)
    assert ((kept - 0.5).abs() < 0.01).all(), kept


def test_identity_cases_seeding_and_gradient() -> None:
    x = torch.randn(64, 33)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.3, training=False) is x
    assert (dropout(x, 1.0) == 0).all()
    with pytest.raises(ValueError, match="p must be"):
        dropout(x, 1.5)
    torch.manual_seed(7)
    a = dropout(x, 0.2)
    torch.manual_seed(7)
    assert torch.equal(a, dropout(x, 0.2))
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    out = dropout(leaf, 0.2)
    out.sum().backward()
    _, scale = keep_threshold(0.2)
    torch.testing.assert_close(leaf.grad, (a != 0).float() * scale)
    half = dropout(x.bfloat16(), 0.2)
    assert half.dtype == torch.bfloat16 and half.shape == x.shape


def test_module_is_a_drop_in_for_nn_dropout() -> None:
    module = Dropout(0.25)
    assert isinstance(module, nn.Dropout) and module.p == 0.25
    seq = nn.Sequential(nn.Linear(4, 4), module)
    assert list(seq.state_dict()) == list(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25)).state_dict())
    x = torch.randn(8, 4)
    module.eval()
    assert module(x) is x
    module.train()
    assert ((module(x) == 0).sum() > 0) and module(x).shape == x.shape
