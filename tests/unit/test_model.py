"""HealthFM model: configs, forward over any modality subset, causality at prediction_time."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, cast

import pytest
import torch
from helpers.random_batch import date_shifted, random_batch

from healthfm_core.data.sequences.batch import N_SPECIAL_CODES
from healthfm_core.model.healthfm import EPOCH_DAYS, Block, HealthFM
from healthfm_core.terms.model_config import ModelConfig, load_model_config
from healthfm_core.terms.site_layout import MODALITIES

VOCAB, TRAITS = 40, 4
SUBSETS = [set(c) for r in (1, 2, 3) for c in itertools.combinations(MODALITIES, r)]


def tiny_model(seed: int = 0, **overrides: object) -> HealthFM:
    torch.manual_seed(seed)
    cfg = load_model_config("tiny")
    if overrides:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
    return HealthFM(cfg, VOCAB, TRAITS).eval()


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_configs_load(name: str) -> None:
    cfg = load_model_config(name)
    assert cfg.name == name
    assert cfg.d_model % cfg.n_heads == 0


def test_paper_config_is_the_paper_size() -> None:
    cfg = load_model_config("paper")
    assert (cfg.n_layers, cfg.d_model, cfg.wearable.n_layers) == (24, 1024, 6)


def test_load_by_path_and_unknown_name(tmp_path: Path) -> None:
    cfg = load_model_config(Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
    assert cfg.name == "tiny"
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        load_model_config("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text(load_model_config("tiny").model_dump_json().replace('"n_heads":2,', '"n_heads":3,', 1))
    with pytest.raises(ValueError, match=r"(?s)bad.yaml.*divisible"):
        load_model_config(bad)


def test_config_rejects_unknown_field_and_bad_rates() -> None:
    base = load_model_config("tiny").model_dump()
    with pytest.raises(ValueError, match="typo_field"):
        ModelConfig.model_validate({**base, "typo_field": 1})
    with pytest.raises(ValueError, match="min_rate_per_day"):
        ModelConfig.model_validate({**base, "min_rate_per_day": 10.0, "max_rate_per_day": 1.0})


# ----------------------------------------------------------------------------- forward


def test_tiny_forward_is_fast_and_shaped() -> None:
    model = tiny_model()
    batch = random_batch(batch_size=8, n_events=32, n_patches=8, epochs_per_patch=120, vocab_size=VOCAB)
    # CPU time of this process, not wall time: a loaded machine must not fail a fast forward.
    start = time.process_time()
    with torch.no_grad():
        out = model(batch)
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"tiny forward took {elapsed:.2f}s"
    assert out.states.shape == (8, 32 + 8 + 1, model.cfg.d_model)
    assert out.embedding.shape == (8, model.cfg.d_model)
    assert torch.isfinite(out.states).all()


@pytest.mark.parametrize("modalities", SUBSETS, ids=lambda s: "+".join(sorted(s)))
@pytest.mark.parametrize("absent", ["padded", "empty"])
def test_any_modality_subset(modalities: set[str], absent: Literal["padded", "empty"]) -> None:
    model = tiny_model()
    batch = random_batch(modalities=modalities, vocab_size=VOCAB, absent=absent)
    out = model(batch)
    assert torch.isfinite(out.embedding).all()
    for name in MODALITIES:
        assert bool(out.present[name].all()) == (name in modalities)
    # Padding and zero width are the same batch to the model.
    other = random_batch(modalities=modalities, vocab_size=VOCAB, absent="empty" if absent == "padded" else "padded")
    torch.testing.assert_close(model(other).embedding, out.embedding)


def test_mixed_modalities_per_sample() -> None:
    model = tiny_model()
    rows = [{"ehr"}, {"wearables"}, {"genomics"}, {"ehr", "wearables", "genomics"}, {"wearables", "genomics"}]
    batch = random_batch(batch_size=5, modalities=rows, vocab_size=VOCAB)
    out = model(batch)
    assert torch.isfinite(out.embedding).all()
    assert out.present["wearables"].tolist() == [False, True, False, True, True]


def test_sample_embedding_does_not_depend_on_batch_mates() -> None:
    model = tiny_model()
    batch = random_batch(batch_size=4, vocab_size=VOCAB, seed=3)
    alone = _take(batch, [2])
    torch.testing.assert_close(model.embed(alone), model.embed(batch)[2:3], atol=1e-5, rtol=1e-5)


def _take(batch, idx):
    return batch.rows(idx)


def test_order_of_tokens_does_not_matter() -> None:
    """Causality is by time: permuting EHR tokens (and patches) leaves the embedding unchanged."""
    model = tiny_model()
    batch = random_batch(vocab_size=VOCAB, seed=5)
    perm_e = torch.randperm(batch.codes.shape[1], generator=torch.Generator().manual_seed(1))
    perm_p = torch.randperm(batch.wear_times.shape[1], generator=torch.Generator().manual_seed(2))
    shuffled = replace(
        batch,
        codes=batch.codes[:, perm_e],
        values=batch.values[:, perm_e],
        has_value=batch.has_value[:, perm_e],
        times=batch.times[:, perm_e],
        ehr_valid=batch.ehr_valid[:, perm_e],
        wear_epochs=batch.wear_epochs[:, perm_p],
        wear_epoch_mask=batch.wear_epoch_mask[:, perm_p],
        wear_times=batch.wear_times[:, perm_p],
        wear_valid=batch.wear_valid[:, perm_p],
    )
    torch.testing.assert_close(model.embed(shuffled), model.embed(batch), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- causality


def _add_future(batch, model_vocab: int):
    """Put data after prediction_time into padding slots: an EHR event, a patch, and later epochs
    of a patch that straddles prediction_time."""
    b = replace(
        batch,
        **{
            k: getattr(batch, k).clone()
            for k in (
                "codes",
                "values",
                "has_value",
                "times",
                "ehr_valid",
                "wear_epochs",
                "wear_epoch_mask",
                "wear_times",
                "wear_valid",
            )
        },
    )
    pt = b.prediction_time
    for i in range(b.batch_size):
        free = (~b.ehr_valid[i]).nonzero().flatten()
        slot = int(free[0]) if len(free) else b.codes.shape[1] - 1
        b.codes[i, slot, 0] = model_vocab - 1  # a token with one code (slot 0) and a value
        b.values[i, slot, 0], b.has_value[i, slot, 0] = 3.0, True
        b.times[i, slot] = pt[i] + 1.5
        b.ehr_valid[i, slot] = True
        patches = b.wear_valid[i].nonzero().flatten()
        if len(patches) >= 2:
            # the last patch starts 2.5 epochs before prediction_time: epochs 3.. are the future
            last = int(patches[-1])
            b.wear_times[i, last] = pt[i] - 2.5 * EPOCH_DAYS
            b.wear_epochs[i, last, 3:] = 5.0
            b.wear_epoch_mask[i, last, :] = True
    return b


@pytest.mark.parametrize("time_encoding", ["ct_kernel", "sinusoidal"])
def test_embed_uses_nothing_after_prediction_time(time_encoding: str) -> None:
    model = tiny_model(time_encoding=time_encoding)
    batch = random_batch(batch_size=4, n_events=12, n_patches=4, vocab_size=VOCAB, seed=7)
    base = _add_future(batch, VOCAB)
    changed = replace(base, codes=base.codes.clone(), wear_epochs=base.wear_epochs.clone(), times=base.times.clone())
    future_ehr = base.times > base.prediction_time[:, None]
    assert future_ehr.any()
    changed.codes[future_ehr] = N_SPECIAL_CODES + 1
    changed.times[future_ehr] += 10.0
    straddling = (base.wear_times > base.prediction_time[:, None] - 3 * EPOCH_DAYS) & base.wear_valid
    assert straddling.any()
    changed.wear_epochs[:, :, 3:][straddling] = -7.0  # epochs after prediction_time
    torch.testing.assert_close(model.embed(changed), model.embed(base))
    # Control: the same kind of change before prediction_time does change the embedding.
    past = base.ehr_valid & (base.times < base.prediction_time[:, None])
    control = replace(base, codes=base.codes.masked_fill(past[..., None] & base.code_valid, N_SPECIAL_CODES + 1))
    assert not torch.allclose(model.embed(control), model.embed(base))


def test_missing_prs_traits_are_ignored() -> None:
    model = tiny_model()
    # FiLM starts at identity: give it a non-zero map so genomics matters.
    assert model.genomics_encoder is not None
    with torch.no_grad():
        for p in model.genomics_encoder.parameters():
            p.normal_(std=0.3)
    batch = random_batch(vocab_size=VOCAB, seed=11)
    noisy = replace(batch, prs=torch.where(batch.prs_valid, batch.prs, torch.full_like(batch.prs, 9.0)))
    torch.testing.assert_close(model.embed(noisy), model.embed(batch))
    shifted = replace(batch, prs=batch.prs + batch.prs_valid.float())
    assert not torch.allclose(model.embed(shifted), model.embed(batch))


def test_genomics_does_not_decay_with_time() -> None:
    """Moving all times (and prediction_time) far later leaves the genomics effect unchanged."""
    model = tiny_model()
    assert model.genomics_encoder is not None
    with torch.no_grad():
        for p in model.genomics_encoder.parameters():
            p.normal_(std=0.3)
    batch = random_batch(vocab_size=VOCAB, seed=12)
    no_prs = replace(batch, prs_valid=torch.zeros_like(batch.prs_valid))

    def shift(b, days):
        return replace(
            b,
            times=b.times + days,
            wear_times=b.wear_times + days,
            prediction_time=b.prediction_time + days,
            birth_time=b.birth_time + days,
        )

    def query_state(b):
        return model(b).embedding  # the FiLM path (embed also carries the static conditioning itself)

    effect_now = query_state(batch) - query_state(no_prs)
    effect_later = query_state(shift(batch, 3000.0)) - query_state(shift(no_prs, 3000.0))
    assert effect_now.abs().max() > 1e-3
    torch.testing.assert_close(effect_later, effect_now, atol=2e-4, rtol=1e-3)


def test_embedding_is_the_query_state_then_the_genomics_conditioning() -> None:
    """HealthFM.embed, what every probe, `client.py embed` and a task head read (issue 31): the
    query state, then on a model with genomics the encoder's conditioning, zero without PRS."""
    model = tiny_model()
    batch = random_batch(vocab_size=VOCAB, seed=13)
    batch = replace(batch, prs_valid=batch.prs_valid & (torch.arange(len(batch.prs_valid)) > 0)[:, None])
    has = batch.prs_valid.any(dim=-1)
    assert has.any() and (~has).any()
    d, h = model.cfg.d_model, model.cfg.genomics.d_hidden
    x = model.embed(batch)
    assert x.shape == (len(has), model.embedding_width) and model.embedding_width == d + h
    torch.testing.assert_close(x[:, :d], model(batch).embedding)
    mask = batch.prs_valid.float()
    assert model.genomics_encoder is not None
    by_hand = model.genomics_encoder.mlp(torch.cat([batch.prs * mask, mask], dim=-1))
    torch.testing.assert_close(x[has, d:], by_hand[has])
    assert torch.equal(x[~has, d:], torch.zeros_like(x[~has, d:]))
    at = model.embed_at(batch, batch.prediction_time.float()[:, None])[:, 0]
    torch.testing.assert_close(at, x, atol=1e-5, rtol=1e-5)
    # Without genomics the embedding is the query state alone.
    torch.manual_seed(0)
    plain = HealthFM(load_model_config("tiny"), VOCAB, 0).eval()
    no_prs = replace(batch, prs_valid=torch.zeros_like(batch.prs_valid))
    assert plain.embedding_width == d
    torch.testing.assert_close(plain.embed(no_prs), plain(no_prs).embedding)


# ----------------------------------------------------------------------------- dropout, decay


def test_modality_dropout_drops_whole_modalities_never_all() -> None:
    model = tiny_model(modality_dropout=0.9).train()
    present = torch.rand(500, 3, generator=torch.Generator().manual_seed(0)) < 0.7
    kept = model._modality_dropout(present, torch.Generator().manual_seed(1))
    assert not (kept & ~present).any()
    assert (kept.any(1) == present.any(1)).all()
    assert (kept.sum() / present.sum()) < 0.6  # most present modalities were dropped
    assert torch.equal(model.eval()._modality_dropout(present, None), present)


def test_modality_dropout_in_forward() -> None:
    model = tiny_model(modality_dropout=0.6).train()
    batch = random_batch(batch_size=16, vocab_size=VOCAB)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    n_present = sum(out.present[m].int() for m in MODALITIES)
    assert (n_present >= 1).all() and (n_present < 3).any()
    dropped_wear = ~out.present["wearables"]
    assert not out.wear_valid[dropped_wear].any()


def test_decay_rates_stay_within_bounds_and_report() -> None:
    model = tiny_model()
    summary = model.decay_rate_summary()
    cfg = model.cfg
    assert summary["timescale_min_days"] == pytest.approx(cfg.init_timescale_min_days, rel=1e-3)
    assert summary["timescale_max_days"] == pytest.approx(cfg.init_timescale_max_days, rel=1e-3)
    with torch.no_grad():
        for block in cast(list[Block], list(model.backbone.blocks)):
            decay = block.attn.decay
            assert decay is not None
            decay.rate_logits.copy_(torch.randn_like(decay.rate_logits) * 1e3)
    summary = model.decay_rate_summary()
    assert cfg.min_rate_per_day * (1 - 1e-5) <= summary["rate_min_per_day"]
    assert summary["rate_max_per_day"] <= cfg.max_rate_per_day * (1 + 1e-5)
    assert summary["rate_at_bound_fraction"] == 1.0
    first_decay = cast(Block, model.backbone.blocks[0]).attn.decay
    assert first_decay is not None
    log_weights, _ = first_decay()
    torch.testing.assert_close(log_weights.logsumexp(-1), torch.zeros(cfg.n_heads))


def test_sinusoidal_ablation_has_no_decay_parameters() -> None:
    model = tiny_model(time_encoding="sinusoidal")
    assert not any("decay" in k for k in model.state_dict())
    assert model.decay_rate_summary() == {}
    out = model(random_batch(vocab_size=VOCAB))
    assert torch.isfinite(out.embedding).all()


def test_bad_batch_is_rejected() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="traits"):
        model(random_batch(n_prs_traits=TRAITS + 1, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="vocab_size"):
        model(random_batch(vocab_size=VOCAB + 5))


def test_query_state_at_query_time_ignores_everything_after_it() -> None:
    """A query placed at t sees only tokens at or before t: changing a later event's code or value,
    or the epochs of a wearable patch that completes after t, leaves its state bit-identical;
    changing an earlier event does not (so the check can fail)."""
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), 40, 4).eval()
    batch = random_batch(batch_size=3, modalities={"ehr", "wearables", "genomics"}, vocab_size=40, seed=4)
    query_time = batch.prediction_time * 0.5
    base = model(batch, query_time=query_time).embedding
    later = batch.ehr_valid & (batch.times > query_time[:, None])
    earlier = batch.ehr_valid & (batch.times <= query_time[:, None])
    later_slots, earlier_slots = later[..., None] & batch.code_valid, earlier[..., None] & batch.code_valid
    assert bool(later.any()) and bool(earlier.any())
    codes = torch.where(later_slots, (batch.codes + 1).clamp_max(39).clamp_min(3), batch.codes)
    values = torch.where(later_slots, batch.values + 5.0, batch.values)
    n_epochs = batch.wear_epochs.shape[2]
    patch_end = batch.wear_times + n_epochs * EPOCH_DAYS
    late_patch = batch.wear_valid & (patch_end > query_time[:, None])
    epochs = torch.where(late_patch[..., None, None], batch.wear_epochs + 3.0, batch.wear_epochs)
    changed = replace(batch, codes=codes, values=values, has_value=batch.has_value | later_slots, wear_epochs=epochs)
    torch.testing.assert_close(model(changed, query_time=query_time).embedding, base, rtol=0, atol=0)
    # Default query time is prediction_time: the same change is then visible.
    assert not torch.allclose(model(changed).embedding, model(batch).embedding)
    before = replace(batch, codes=torch.where(earlier_slots, (batch.codes + 1).clamp_max(39).clamp_min(3), batch.codes))
    assert not torch.allclose(model(before, query_time=query_time).embedding, base)


def test_query_time_must_have_one_entry_per_sample() -> None:
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), 40, 4)
    batch = random_batch(batch_size=3, vocab_size=40)
    with pytest.raises(ValueError, match="query_time"):
        model(batch, query_time=torch.zeros(2))


def test_age_enters_through_birth_time_and_survives_a_date_shift() -> None:
    """The age embedding: a different birth changes the embedding, an unknown one (NaN) adds
    nothing, and shifting every time and the birth together (a date shift) changes nothing."""
    model = tiny_model().eval()
    batch = random_batch(vocab_size=VOCAB, modalities=[("ehr",), ("ehr", "wearables")] * 2, batch_size=4, seed=21)
    assert torch.isfinite(batch.birth_time).all()
    with torch.no_grad():
        base = model.embed(batch)
        older = model.embed(replace(batch, birth_time=batch.birth_time - 3652.5))
        assert (older - base).abs().amax(dim=1).min() > 1e-4
        torch.testing.assert_close(model.embed(date_shifted(batch, 12345.0)), base, atol=2e-4, rtol=1e-3)
        unknown = replace(batch, birth_time=torch.full_like(batch.birth_time, float("nan")))
        age_out = cast(torch.nn.Linear, model.backbone.age_embedding[-1])
        age_out.bias.data += 1.0  # any age term would now show
        a = model.embed(unknown)
        age_out.bias.data -= 1.0
        torch.testing.assert_close(a, model.embed(unknown))
