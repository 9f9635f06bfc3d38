"""The local training loop and its checkpoints (healthfm_core.train)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from helpers.random_batch import random_batch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.groups import GROUPS, parameter_group
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights
from healthfm_core.train.checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from healthfm_core.train.trainer import TrainConfig, Trainer, learning_rate, resolve_precision, train_local

VOCAB, TRAITS = 40, 4


class Weights(BaseModel):
    fit: float = 1.0


class ToyFM(nn.Module):
    """A few-hundred-parameter stand-in whose keys fall in the real parameter groups. Its loss
    uses the generator (token dropping) and nn.Dropout (global RNG), so resuming must restore
    both kinds of randomness to reproduce a run."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ehr_encoder = nn.Embedding(VOCAB, d)
        self.wearable_encoder = nn.Linear(2, d)
        self.genomics_encoder = nn.Linear(TRAITS, d)
        self.backbone = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Dropout(0.2), nn.Linear(d, 1))

    @staticmethod
    def target(batch: Batch) -> torch.Tensor:
        return ((batch.codes % 3 == 0) & batch.code_valid).float().flatten(1).mean(1) * 4 + batch.prs[:, 0]

    def pretraining_losses(self, batch: Batch, weights: Weights, generator: torch.Generator | None = None):
        keep = batch.code_valid & (torch.rand(batch.codes.shape, generator=generator) > 0.1)
        ehr = (self.ehr_encoder(batch.codes) * keep[..., None]).sum((1, 2)) / keep.sum((1, 2)).clamp(min=1)[:, None]
        wear = self.wearable_encoder(batch.wear_epochs.mean(dim=(1, 2)))
        pred = self.backbone(ehr + wear + self.genomics_encoder(batch.prs)).squeeze(-1)
        fit = ((pred - self.target(batch)) ** 2).mean()
        return {"fit": fit, "total": weights.fit * fit}


def toy_data(n: int = 4, batch_size: int = 8) -> list[Batch]:
    return [random_batch(batch_size, vocab_size=VOCAB, n_prs_traits=TRAITS, seed=i) for i in range(n)]


def toy_model(seed: int = 0) -> ToyFM:
    torch.manual_seed(seed)
    return ToyFM()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CFG: dict[str, Any] = dict(lr=1e-2, progress=False, seed=3, weight_decay=0.01, grad_clip=1.0)


def test_loss_decreases_on_a_tiny_problem() -> None:
    model = toy_model()
    result = train_local(model, toy_data(), TrainConfig(steps=80, **CFG), weights_fn=Weights())
    losses = [h["fit"] for h in result.history]
    assert len(result.history) == 80
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert all(math.isfinite(h["grad_norm"]) and h["lr"] == 1e-2 for h in result.history)


def test_only_chosen_groups_change_and_are_returned() -> None:
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), vocab_size=VOCAB, n_prs_traits=TRAITS)
    # A parameter the caller froze inside a chosen group stays frozen (and unchanged).
    first_ehr = next(n for n, _ in model.named_parameters() if parameter_group(n) == "ehr")
    dict(model.named_parameters())[first_ehr].requires_grad_(False)
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    before = snapshot(model)
    data = [random_batch(6, vocab_size=VOCAB, n_prs_traits=TRAITS, seed=i) for i in range(2)]
    result = train_local(
        model, data, TrainConfig(steps=3, **CFG), groups=["ehr", "shared"], weights_fn=ObjectiveWeights()
    )
    after = model.state_dict()

    assert result.groups == ["ehr", "shared"]
    expected_keys = {k for k in after if parameter_group(k) in ("ehr", "shared")}
    assert set(result.group_state) == expected_keys
    changed_groups = set()
    assert torch.equal(after[first_ehr], before[first_ehr])
    for key, value in after.items():
        if parameter_group(key) in ("wearables", "genomics"):
            assert torch.equal(value, before[key]), f"{key} of an untrained group changed"
        elif not torch.equal(value, before[key]):
            changed_groups.add(parameter_group(key))
    assert changed_groups == {"ehr", "shared"}
    # Returned tensors are copies: training on does not alter them.
    assert all(torch.equal(result.group_state[k], after[k]) for k in expected_keys)
    # requires_grad is restored exactly (frozen stays frozen, the rest trainable again).
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen_before
    assert result.examples == 6 * 3
    assert set(result.examples_per_group) == {"ehr", "shared"}
    assert "rate_min" in result.history[0] and 0 < result.history[0]["rate_min"] <= result.history[0]["rate_max"]


def test_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        train_local(toy_model(), toy_data(), TrainConfig(steps=1, **CFG), groups=["nonsense"], weights_fn=Weights())


def _resume_cfg(steps: int = 6) -> TrainConfig:
    return TrainConfig(steps=steps, warmup_steps=2, schedule="cosine", **CFG)


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path) -> None:
    data = toy_data(n=4)  # 4 batches: the 6 steps wrap into a second pass over the data
    full = toy_model()
    ref = train_local(full, data, _resume_cfg(), weights_fn=Weights())

    first = toy_model()
    part = train_local(first, data, _resume_cfg(), weights_fn=Weights(), stop_step=3)
    save_checkpoint(tmp_path / "ck", first, part.state, config=_resume_cfg().model_dump(mode="json"))
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it

    second = toy_model(seed=99)  # different initial weights: all must come from the checkpoint
    ckpt = load_checkpoint(tmp_path / "ck", second)
    assert ckpt.step == 3 and ckpt.config["steps"] == 6
    rest = train_local(
        second, data, TrainConfig(**ckpt.config), weights_fn=Weights(), start_step=ckpt.step, state=ckpt.state
    )

    for key, value in full.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert [h["fit"] for h in part.history + rest.history] == [h["fit"] for h in ref.history]
    assert rest.state.step == 6


def test_periodic_checkpoints_and_dataloader_resume(tmp_path) -> None:
    """A shuffled DataLoader, periodic checkpoints, and a resume in a 'fresh process' (new loader)."""
    samples = toy_data(n=5, batch_size=1)

    def loader() -> DataLoader:
        return DataLoader(
            cast("Dataset[Batch]", samples),  # a list serves as a map-style dataset
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(7),
            collate_fn=lambda xs: Batch(
                **{f: torch.cat([getattr(x, f) for x in xs]) for f in Batch.__dataclass_fields__}
            ),
        )

    cfg = TrainConfig(steps=8, checkpoint_every=4, keep_checkpoints=5, **CFG)
    full = toy_model()
    train_local(full, loader(), cfg, weights_fn=Weights(), checkpoint_dir=tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["step-00000004", "step-00000008"]
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-00000008"

    resumed = toy_model(seed=5)
    trainer = Trainer(resumed, loader(), cfg, weights_fn=Weights())
    assert trainer.resume_from(tmp_path / "run" / "step-00000004") == 4
    assert trainer.state is not None
    assert trainer.state.epoch == 1 and trainer.state.batch_in_epoch == 1  # 3 batches per pass
    trainer.fit()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_optimizer_state_carries_over_by_name() -> None:
    """A site trains ehr+shared, then shared only with the returned state: moments are matched
    by parameter name, and lr comes from the new config rather than the saved state."""
    model = toy_model()
    a = train_local(model, toy_data(), TrainConfig(steps=2, **CFG), groups=["ehr", "shared"], weights_fn=Weights())
    cfg = TrainConfig(steps=2, **{**CFG, "lr": 1e-3})
    b = train_local(model, toy_data(), cfg, groups=["shared"], weights_fn=Weights(), state=a.state)
    assert set(b.state.param_names) == {n for n, _ in model.named_parameters() if parameter_group(n) == "shared"}
    assert b.state.optimizer is not None
    assert all(g["lr"] == 1e-3 for g in b.state.optimizer["param_groups"])
    # Adam's step counter continued from the first call for the shared parameters.
    assert all(float(s["step"]) == 4 for s in b.state.optimizer["state"].values())


def test_corrupted_checkpoint_is_refused(tmp_path) -> None:
    model = toy_model()
    result = train_local(model, toy_data(), TrainConfig(steps=2, **CFG), weights_fn=Weights())
    path = save_checkpoint(tmp_path / "ck", model, result.state)
    load_checkpoint(path, toy_model())  # intact: loads

    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupted"):
        load_checkpoint(path, toy_model())

    path2 = save_checkpoint(tmp_path / "ck2", model, result.state)
    (path2 / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt.*missing"):
        load_checkpoint(path2)

    path3 = save_checkpoint(tmp_path / "ck3", model, result.state)
    meta = json.loads((path3 / "checkpoint.json").read_text())
    del meta["files"]
    (path3 / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint.json"):
        load_checkpoint(path3)

    with pytest.raises(CheckpointError, match="no checkpoint metadata"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    model = toy_model()
    path = save_checkpoint(tmp_path / "ck", model, TrainState(step=0))

    class Other(ToyFM):
        def __init__(self) -> None:
            super().__init__()
            self.backbone.append(nn.Linear(1, 1))

    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, Other())


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path) -> None:
    model = toy_model()
    save_checkpoint(tmp_path / "ck", model, TrainState(step=1))
    save_checkpoint(tmp_path / "ck", model, TrainState(step=2))
    assert load_checkpoint(tmp_path / "ck").step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_non_finite_loss_stops_with_a_clear_error_and_restores_flags() -> None:
    class Exploding(ToyFM):
        def pretraining_losses(self, batch, weights, generator=None):
            out = super().pretraining_losses(batch, weights, generator)
            return {"fit": out["fit"] * float("nan"), "total": out["total"] * float("nan")}

    model = Exploding()
    with pytest.raises(FloatingPointError, match=r"step 0: non-finite loss \['fit', 'total'\]"):
        train_local(model, toy_data(), TrainConfig(steps=2, **CFG), groups=["ehr"], weights_fn=Weights())
    assert all(p.requires_grad for p in model.parameters())


def test_config_validation_and_schedule() -> None:
    with pytest.raises(ValidationError):
        TrainConfig(steps=0)
    with pytest.raises(ValidationError):
        TrainConfig(steps=10, precision="fp16")  # type: ignore[arg-type]  # deliberately wrong: not a precision
    with pytest.raises(ValidationError):
        TrainConfig(steps=10, learning_rate=1.0)  # type: ignore[call-arg]  # unknown field, deliberately
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(cfg, s) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1
    assert set(GROUPS) == {"shared", "ehr", "wearables", "genomics"}


def test_precision_auto_takes_bf16_only_where_the_card_has_it_natively(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No GPU here: the card is what torch would report for it. A T4 (7.5) emulates bf16, and torch's
    # is_bf16_supported() says yes there; auto must train in fp32 on it, as docs/site-admin.md says.
    asked: list[torch.device] = []

    def card(capability: tuple[int, int]) -> Callable[[torch.device], tuple[int, int]]:
        def get_device_capability(device: torch.device) -> tuple[int, int]:
            asked.append(device)
            return capability

        return get_device_capability

    gpu = torch.device("cuda", 1)
    for capability, auto in (
        ((7, 5), None),
        ((8, 0), torch.bfloat16),
        ((8, 9), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", card(capability))
        assert resolve_precision("auto", gpu) == auto, capability
        assert resolve_precision("fp32", gpu) is None
    assert set(asked) == {gpu}  # the card trained on, not the current device
    monkeypatch.setattr(torch.cuda, "get_device_capability", card((7, 5)))
    with caplog.at_level("WARNING"):
        assert resolve_precision("bf16", gpu) == torch.bfloat16  # asked for: given, with a warning
    assert "compute capability 7.5): bf16 is emulated" in caplog.text
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_proximal_mu_zero_is_the_plain_step_and_positive_pulls_toward_the_start() -> None:
    # FedProx (issue 31): mu=0 trains bit for bit as before; mu>0 ends nearer the weights it
    # started from (the global model of a round), and further mu nearer still.
    def run(**extra: Any) -> dict[str, torch.Tensor]:
        model = toy_model()
        train_local(model, toy_data(), TrainConfig(steps=30, **CFG, **extra), weights_fn=Weights())
        return snapshot(model)

    start = snapshot(toy_model())
    plain, zero = run(), run(proximal_mu=0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)

    def distance(w: dict[str, torch.Tensor]) -> float:
        return float(sum(((w[k] - start[k]) ** 2).sum() for k in w if w[k].is_floating_point()) ** 0.5)

    d0, d1, d10 = distance(plain), distance(run(proximal_mu=1.0)), distance(run(proximal_mu=10.0))
    assert d10 < d1 < d0, (d0, d1, d10)
