"""The trainer's AdamW (healthfm_core/train/trainer.py ``_build_optimizer``): fused where every
parameter is on a GPU (issue 41: kernel launches a step), torch's default elsewhere. The GPU test
runs where a GPU is (benchmarks/gpu_checks.sh, stage tests); healthfm_core only, no flwr."""

from __future__ import annotations

import pytest
import torch

from healthfm_core.train.trainer import TrainConfig, _build_optimizer, fused_adamw

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_checks.sh runs it)")


def _named(device: str) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.0.mlp.weight": (16, 8), "blocks.0.mlp.bias": (16,)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g).to(device))) for n, s in shapes.items()]


def test_the_trainer_fuses_adamw_only_where_every_parameter_is_on_a_gpu() -> None:
    # On CPU the optimizer is torch's default (the per-parameter loop the step-equivalence tests pin).
    assert fused_adamw([]) is None and fused_adamw([p for _, p in _named("cpu")]) is None
    opt = _build_optimizer(_named("cpu"), TrainConfig(steps=1), None)
    assert not any(group["fused"] for group in opt.param_groups)


@gpu
def test_on_a_gpu_the_fused_adamw_steps_as_the_default_one() -> None:
    cfg = TrainConfig(steps=1)
    fused_named, plain_named = _named("cuda"), _named("cuda")
    fused = _build_optimizer(fused_named, cfg, None)
    assert all(group["fused"] for group in fused.param_groups)
    plain = torch.optim.AdamW(
        [
            {"params": [plain_named[0][1]], "weight_decay": cfg.weight_decay},  # as _build_optimizer groups
            {"params": [plain_named[1][1]], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        foreach=True,
    )
    for step in range(3):
        for named, opt in ((fused_named, fused), (plain_named, plain)):
            for i, (_, p) in enumerate(named):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1)) - p.detach()
            opt.step()
    for (_, a), (_, b) in zip(fused_named, plain_named):
        torch.testing.assert_close(a, b)
