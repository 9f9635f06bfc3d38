"""The linears' weights cast once a step (healthfm_core/train/weight_cast.py): the numbers are
autocast's own, bit for bit, in fewer ops; parameters come back whatever happens."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers.random_batch import random_batch
from torch import nn

from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights
from healthfm_core.train.host_syncs import count_host_syncs
from healthfm_core.train.trainer import forward_losses
from healthfm_core.train.weight_cast import linear_weights_cast_once

# On a GPU (benchmarks/gpu_checks.sh, stage tests) the step is checked on CUDA too: bf16 autocast
# and _foreach_copy_'s multi-tensor path there.
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _step(
    cast_once: bool, freeze: str | None = None, device: torch.device = DEVICES[0]
) -> tuple[list[float], dict[str, torch.Tensor | None], int, set[str]]:
    """One step under bf16 autocast, the weights cast once or (``cast_once`` False) by each linear."""
    batch = random_batch(batch_size=6, n_events=24, n_patches=5, epochs_per_patch=8, vocab_size=120, seed=3)
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), 120, 4).to(device)
    batch = batch.to(device)
    if freeze is not None:
        model.get_parameter(freeze).requires_grad_(False)
    with count_host_syncs() as count:
        names, values, losses = forward_losses(
            model, batch, ObjectiveWeights(), torch.Generator().manual_seed(0), 0, device, torch.bfloat16, cast_once
        )
        losses["total"].backward()
    linear = {
        f"{m}.{n}"
        for m, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for n, _ in module.named_parameters()
    }
    return values, {n: p.grad for n, p in model.named_parameters()}, count.ops, linear


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("freeze", [None, "backbone.blocks.0.attn.qkv.weight"])
def test_a_step_is_autocasts_own_bit_for_bit_in_fewer_ops(freeze: str | None, device: torch.device) -> None:
    values, grads, ops, linear = _step(False, freeze, device)
    values_once, grads_once, ops_once, _ = _step(True, freeze, device)
    # Bit for bit on CPU; on CUDA within the reordering of atomic adds (embedding and scatter
    # gradients) that any two runs there show.
    exact = device.type == "cpu"
    assert values_once == values if exact else values_once == pytest.approx(values, rel=1e-5)
    assert grads_once.keys() == grads.keys()
    for name, g in grads.items():
        got = grads_once[name]
        assert (got is None) == (g is None), name
        if g is not None:
            assert got is not None and got.dtype == torch.float32 and got.stride() == g.stride(), name
            if exact:
                assert torch.equal(got, g), name
            else:
                torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6, msg=name)
    if freeze is not None:
        assert grads_once[freeze] is None
    # Each trained linear weight and bias: one cast forward and one back, become one allocation
    # and one copy each way a step; a frozen one: one cast forward, become one of each (and no
    # weight gradient computed for it).
    n_cast = sum(grads[n] is not None for n in linear)
    n_frozen = len(linear) - n_cast
    assert n_cast > 50 and n_frozen == (freeze is not None)
    assert ops_once == ops - 2 * n_cast + 4 + (2 - 1) * n_frozen, (ops, ops_once, n_cast)


def test_parameters_come_back_even_when_the_forward_fails() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="the forward failed"), linear_weights_cast_once(model, torch.bfloat16):
        layer = model[0]
        assert isinstance(layer, nn.Linear)
        assert layer.weight.dtype == torch.bfloat16 and not isinstance(layer.weight, nn.Parameter)
        raise RuntimeError("the forward failed")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in after.values())


def test_fp32_training_changes_nothing() -> None:
    model = nn.Linear(4, 3)
    for dtype in (None, torch.float32):
        with linear_weights_cast_once(model, dtype):
            assert isinstance(model.weight, nn.Parameter)


def test_a_weight_two_linears_share_is_cast_once_and_gets_both_gradients() -> None:
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Linear(5, 5), shared)  # the same module twice, and a tie below
    tied = nn.Linear(5, 5)
    tied.weight = shared.weight
    model.append(tied)
    x = torch.randn(3, 5)
    grads = []
    for once in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with linear_weights_cast_once(model, torch.bfloat16) if once else contextlib.nullcontext():
                assert tied.weight is shared.weight  # one copy for both places
                out = model(x)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == len(list(model.parameters()))
    for plain, once_grad in zip(*grads):
        assert torch.equal(plain, once_grad)
