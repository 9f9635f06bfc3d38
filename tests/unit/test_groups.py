"""Parameter groups: every key has exactly one group; absent modalities get no gradient."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.model.groups import group_parameters, group_sizes
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.groups import GROUPS, group_state_dict, parameter_group
from healthfm_core.terms.model_config import ModelConfig, load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights

VOCAB, TRAITS = 40, 4
# Paper-size vocabulary for the reported parameter count (a realistic MEDS code vocabulary).
PAPER_VOCAB, PAPER_TRAITS = 32768, 16


def build(
    name: str, time_encoding: str = "ct_kernel", meta: bool = False, vocab: int = VOCAB, traits: int = TRAITS
) -> HealthFM:
    cfg = load_model_config(name)
    cfg = ModelConfig.model_validate({**cfg.model_dump(), "time_encoding": time_encoding})
    with torch.device("meta" if meta else "cpu"):
        return HealthFM(cfg, vocab, traits)


@pytest.mark.parametrize("time_encoding", ["ct_kernel", "sinusoidal"])
@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_every_key_has_exactly_one_group(name: str, time_encoding: str) -> None:
    model = build(name, time_encoding, meta=(name == "paper"))
    state = model.state_dict()
    assert {k for k, _ in model.named_parameters()} <= set(state)  # no non-persistent params
    groups = {key: parameter_group(key) for key in state}
    assert set(groups.values()) == set(GROUPS), "every group holds parameters"
    parts = [group_state_dict(state, [g]) for g in GROUPS]
    assert sum(len(p) for p in parts) == len(state)
    assert set().union(*parts) == set(state)
    assert sum(group_sizes(model).values()) == sum(p.numel() for p in model.parameters())


def test_paper_parameter_count_on_meta_device() -> None:
    model = build("paper", meta=True, vocab=PAPER_VOCAB, traits=PAPER_TRAITS)
    sizes = group_sizes(model)
    total = sum(sizes.values())
    print(f"paper (vocab {PAPER_VOCAB}, {PAPER_TRAITS} traits): {total:,} parameters; per group {sizes}")
    # 24 blocks of d=1024 alone are ~302M parameters; the backbone is most of the model.
    assert 300e6 < sizes["shared"] < 320e6
    assert 0.5 < sizes["shared"] / total < 0.9
    assert all(p.is_meta for p in model.parameters())


def test_known_prefixes_and_wrappers() -> None:
    assert parameter_group("backbone.blocks.3.attn.decay.rate_logits") == "shared"
    assert parameter_group("ehr_encoder.code_embedding.weight") == "ehr"
    assert parameter_group("heads.ehr_next_visit.bias") == "ehr"
    assert parameter_group("wearable_encoder.blocks.0.qkv.weight") == "wearables"
    assert parameter_group("heads.wear_predictive.weight") == "wearables"
    assert parameter_group("genomics_encoder.film_final.weight") == "genomics"
    assert parameter_group("heads.prs_recon.weight") == "genomics"
    # torch.compile / DDP / Opacus wrappers prefix keys; the group is that of the bare key.
    assert parameter_group("_orig_mod.heads.prs_recon.weight") == "genomics"
    assert parameter_group("_module.wearable_encoder.mask_token") == "wearables"
    assert parameter_group("module.backbone.query_token") == "shared"


@pytest.mark.parametrize("key", ["decoder.weight", "heads.other.weight", "backbone", "ehr_encoderX.w", ""])
def test_unknown_key_is_an_error(key: str) -> None:
    with pytest.raises(KeyError, match="no parameter group"):
        parameter_group(key)


def test_group_selection() -> None:
    model = build("tiny")
    with pytest.raises(ValueError, match="unknown parameter group"):
        group_state_dict(model.state_dict(), ["ehr", "wearable"])
    params = group_parameters(model, ["wearables"])
    expected = [p for k, p in model.named_parameters() if k.startswith(("wearable_encoder.", "heads.wear_"))]
    assert len(params) == len(expected) and all(a is b for a, b in zip(params, expected))
    sub = group_state_dict(model.state_dict(), ["ehr", "genomics"])
    assert sub and all(parameter_group(k) in ("ehr", "genomics") for k in sub)


def _grads_by_group(model: HealthFM) -> dict[str, float]:
    """Largest |grad| per group (0 where every grad is None or zero)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for key, p in model.named_parameters():
        if p.grad is not None:
            group = parameter_group(key)
            out[group] = max(out[group], float(p.grad.abs().max()))
    return out


@pytest.mark.parametrize("absent", ["padded", "empty"])
@pytest.mark.parametrize(
    "modalities, untouched",
    [
        ({"ehr", "genomics"}, {"wearables"}),
        ({"ehr", "wearables"}, {"genomics"}),
        ({"ehr"}, {"wearables", "genomics"}),
        ({"wearables", "genomics"}, {"ehr"}),
    ],
)
def test_absent_modality_gets_no_gradient(
    modalities: set[str], untouched: set[str], absent: Literal["padded", "empty"]
) -> None:
    torch.manual_seed(0)
    model = build("tiny").train()  # training mode: modality dropout is on as in real training
    batch = random_batch(batch_size=6, modalities=modalities, vocab_size=VOCAB, absent=absent)
    losses = model.pretraining_losses(batch, ObjectiveWeights(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    grads = _grads_by_group(model)
    for group in untouched:
        assert grads[group] == 0.0, f"{group} got gradient {grads[group]} from a batch without it"
    assert grads["shared"] > 0
    for group in {"ehr", "wearables", "genomics"} - untouched:
        assert grads[group] > 0, f"{group} present but untrained"
