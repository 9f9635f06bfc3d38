"""Pretraining objectives: finite with any modalities, targets as specified, curriculum, balance."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.model.healthfm import EPOCH_DAYS, FutureCodesHead, HealthFM, ReconstructionMasks
from healthfm_core.model.objectives import (
    combine_losses,
    future_codes_loss,
    future_window_targets,
    next_visit_loss,
    predictive_coding_loss,
    pretraining_losses,
    prs_reconstruction_loss,
    sample_future_anchors,
    sample_masks,
)
from healthfm_core.protocol import RoundConfig
from healthfm_core.terms.model_config import CurriculumConfig, PretrainingConfig, load_model_config
from healthfm_core.terms.objective_weights import (
    CROSS_MODAL,
    INTRA_MODAL,
    LOSS_NAMES,
    ObjectiveWeights,
    curriculum_weights,
)
from healthfm_core.terms.site_layout import MODALITIES

VOCAB, TRAITS = 40, 4
SUBSETS = [set(c) for r in (1, 2, 3) for c in itertools.combinations(MODALITIES, r)]
# Which losses have data for a batch whose samples all hold these modalities.
NEEDS = {
    "ehr_masked_code": {"ehr"},
    "ehr_masked_value": {"ehr"},
    "wear_masked": {"wearables"},
    "prs_masked": {"genomics"},
    "next_visit": {"ehr"},
    "future_codes": {"ehr"},
    "predictive": {"ehr", "wearables"},
    "align": {"ehr", "wearables"},
}


def tiny_model(seed: int = 0) -> HealthFM:
    torch.manual_seed(seed)
    return HealthFM(load_model_config("tiny"), VOCAB, TRAITS)


@pytest.mark.parametrize("modalities", SUBSETS, ids=lambda s: "+".join(sorted(s)))
def test_losses_finite_and_zero_without_data(modalities: set[str]) -> None:
    model = tiny_model().eval()  # no modality dropout: every sample keeps what it has
    batch = random_batch(batch_size=6, modalities=modalities, vocab_size=VOCAB)
    losses = model.pretraining_losses(batch, ObjectiveWeights(), generator=torch.Generator().manual_seed(0))
    assert set(losses) == set(LOSS_NAMES) | {"total"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
    for name, needs in NEEDS.items():
        if needs <= modalities:
            assert losses[name] > 0, f"{name} should have data with {modalities}"
        else:
            assert losses[name] == 0, f"{name} has no data with {modalities}"


def test_losses_finite_in_training_with_mixed_samples() -> None:
    model = tiny_model().train()
    rows = [{"ehr"}, {"wearables"}, {"genomics"}, {"ehr", "wearables"}, {"ehr", "wearables", "genomics"}, {"ehr"}]
    batch = random_batch(batch_size=6, modalities=rows, vocab_size=VOCAB)
    for seed in range(5):
        losses = model.pretraining_losses(batch, ObjectiveWeights(), generator=torch.Generator().manual_seed(seed))
        assert all(torch.isfinite(v) for v in losses.values())
        losses["total"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_empty_batch_gives_a_zero_total_that_backpropagates() -> None:
    model = tiny_model()
    batch = random_batch(batch_size=2, modalities={"ehr"}, vocab_size=VOCAB)
    empty = replace(batch, ehr_valid=torch.zeros_like(batch.ehr_valid))
    losses = model.pretraining_losses(empty, ObjectiveWeights())
    assert float(losses["total"].detach()) == 0.0 and losses["total"].requires_grad
    losses["total"].backward()


def test_zero_weights_leave_parameters_untouched() -> None:
    model = tiny_model()
    batch = random_batch(vocab_size=VOCAB)
    only_prs = ObjectiveWeights(**{name: 0.0 for name in LOSS_NAMES if name != "prs_masked"})
    model.pretraining_losses(batch, only_prs, torch.Generator().manual_seed(0))["total"].backward()
    touched = {k.split(".")[0] for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"genomics_encoder", "heads"}


def test_training_steps_decrease_the_total() -> None:
    model = tiny_model(seed=1).train()
    batch = random_batch(batch_size=6, vocab_size=VOCAB, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(30):
        losses = model.pretraining_losses(batch, ObjectiveWeights(), torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        totals.append(float(losses["total"].detach()))
    assert totals[-1] < totals[0] - 1.0, totals
    # and under plain weighted sums too
    model = tiny_model(seed=1).train()
    cfg = model.cfg.pretraining.model_copy(update={"loss_balance": "none"})
    model.cfg = model.cfg.model_copy(update={"pretraining": cfg})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = last = 0.0
    for step in range(30):
        losses = model.pretraining_losses(batch, ObjectiveWeights(), torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        value = float(losses["total"].detach())
        first, last = (value, last) if step == 0 else (first, value)
    assert last < 0.8 * first


# ----------------------------------------------------------------------------- targets


def _batch(
    codes_times: list[tuple[int, float]], patch_times: list[float], prediction_time: float, epochs: int = 4
) -> Batch:
    """One sample by hand: EHR (code, time) pairs, one token of one code each, and wearable
    patches starting at patch_times."""
    n, p = len(codes_times), len(patch_times)
    return Batch(
        subject_id=torch.tensor([1]),
        prediction_time=torch.tensor([prediction_time]),
        codes=torch.tensor([[[c] for c, _ in codes_times]]),
        values=torch.zeros(1, n, 1),
        has_value=torch.zeros(1, n, 1, dtype=torch.bool),
        times=torch.tensor([[t for _, t in codes_times]]),
        ehr_valid=torch.ones(1, n, dtype=torch.bool),
        wear_epochs=torch.randn(1, p, epochs, 2, generator=torch.Generator().manual_seed(0)),
        wear_epoch_mask=torch.ones(1, p, epochs, 2, dtype=torch.bool),
        wear_times=torch.tensor([patch_times]),
        wear_valid=torch.ones(1, p, dtype=torch.bool),
        prs=torch.zeros(1, TRAITS),
        prs_valid=torch.zeros(1, TRAITS, dtype=torch.bool),
        birth_time=torch.tensor([-365.25 * 50]),
    )


def _constant_head(head: torch.nn.Module, logits: dict[int, float], default: float) -> None:
    """Make a head output fixed logits whatever its input."""
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(default)
        for code, value in logits.items():
            head.bias[code] = value


@pytest.mark.parametrize("repeat_weight", [0.0, 0.1, 1.0])
def test_next_visit_repeat_codes_are_down_weighted(repeat_weight: float) -> None:
    """Visit 2 repeats code 5 from visit 1 and adds code 7. A model that predicts 7 right and
    misses the repeat pays for the repeat only through repeat_weight; one that copies history
    (predicts 5) but misses the new code 7 pays in full."""
    model = tiny_model().eval()
    batch = _batch([(5, 0.0), (5, 10.2), (7, 10.2)], [], prediction_time=20.0)
    cfg = PretrainingConfig(next_visit_repeat_weight=repeat_weight)
    out = model(batch)
    _constant_head(model.heads["ehr_next_visit"], {7: 20.0, 5: -20.0}, default=-20.0)
    misses_repeat = float(next_visit_loss(model, out, batch, cfg, None)["next_visit"].detach())
    assert misses_repeat == pytest.approx(repeat_weight * 20.0, abs=1e-4)
    _constant_head(model.heads["ehr_next_visit"], {7: -20.0, 5: 20.0}, default=-20.0)
    misses_new = float(next_visit_loss(model, out, batch, cfg, None)["next_visit"].detach())
    assert misses_new == pytest.approx(0.5 * 20.0, abs=1e-4)  # balanced: half from the positives


def test_without_the_separate_repeat_term_a_repeat_costs_what_a_new_onset_does() -> None:
    """separate_repeats=False (the pitfall's naive objective): one balanced term over every code,
    so missing the repeat (5) or the new onset (7) costs the same: half the mean over the two
    positives, 0.5 x 20 / 2, where the separate terms charge the repeat 0.1 x 20 and the new onset 10."""
    model = tiny_model().eval()
    batch = _batch([(5, 0.0), (5, 10.2), (7, 10.2)], [], prediction_time=20.0)
    cfg = PretrainingConfig(separate_repeats=False)
    out = model(batch)
    for logits in ({7: 20.0, 5: -20.0}, {7: -20.0, 5: 20.0}):
        _constant_head(model.heads["ehr_next_visit"], logits, default=-20.0)
        loss = float(next_visit_loss(model, out, batch, cfg, None)["next_visit"].detach())
        assert loss == pytest.approx(0.5 * 20.0 / 2, abs=1e-4)
    future = PretrainingConfig(future_horizons_days=(30.0,), separate_repeats=False)
    anchor, has_anchor = torch.tensor([10.0]), torch.tensor([True])
    batch = _batch([(5, 0.0), (5, 10.0), (5, 20.0), (7, 20.0), (9, 100.0)], [], prediction_time=100.0)
    out = model(batch, query_time=anchor)
    head = model.heads["ehr_future_codes"]
    assert isinstance(head, FutureCodesHead)
    with torch.no_grad():
        head.horizon_bias.zero_()
    for logits in ({7: 20.0, 5: -20.0}, {7: -20.0, 5: 20.0}):
        _constant_head(head.out, logits, default=-20.0)
        loss = float(future_codes_loss(model, out, batch, anchor, has_anchor, future)["future_codes"].detach())
        assert loss == pytest.approx(0.5 * 20.0 / 2, abs=1e-4)


def test_next_visit_needs_a_second_visit() -> None:
    model = tiny_model().eval()
    batch = _batch([(5, 3.0), (6, 3.0)], [], prediction_time=20.0)
    assert next_visit_loss(model, model(batch), batch, PretrainingConfig(), None) == {}


def test_predictive_coding_targets_are_the_window_after_the_patch() -> None:
    """Patch at day 10; codes at day 0 (before), 50 (in the 180-day window) and 400 (after it)."""
    model = tiny_model().eval()
    batch = _batch([(4, 0.0), (6, 50.0), (8, 400.0)], [10.0], prediction_time=500.0)
    cfg = PretrainingConfig(predictive_horizon_days=180.0)
    out = model(batch)
    masks = ReconstructionMasks(wear=torch.zeros(1, 1, dtype=torch.bool))
    _constant_head(model.heads["wear_predictive"], {6: 20.0}, default=-20.0)
    assert float(predictive_coding_loss(model, out, batch, masks, cfg, None)["predictive"].detach()) < 1e-6
    _constant_head(model.heads["wear_predictive"], {4: 20.0, 8: 20.0}, default=-20.0)
    wrong = float(predictive_coding_loss(model, out, batch, masks, cfg, None)["predictive"].detach())
    assert wrong > 10.0
    # No EHR event after the patch: the record is censored there, no anchor.
    late = _batch([(4, 0.0)], [10.0], prediction_time=500.0)
    assert predictive_coding_loss(model, model(late), late, masks, cfg, None) == {}


def test_alignment_ignores_other_samples_of_the_same_subject() -> None:
    model = tiny_model().eval()
    batch = random_batch(batch_size=4, modalities={"ehr", "wearables"}, vocab_size=VOCAB)
    losses = model.pretraining_losses(batch, ObjectiveWeights())
    assert losses["align"] > 0
    same = replace(batch, subject_id=torch.full_like(batch.subject_id, 7))
    assert float(model.pretraining_losses(same, ObjectiveWeights())["align"].detach()) == 0.0


def test_sample_masks_cover_every_sample() -> None:
    batch = random_batch(batch_size=8, vocab_size=VOCAB, seed=2)
    cfg = PretrainingConfig(ehr_mask_prob=0.0, wear_mask_prob=0.0, prs_mask_prob=1.0)
    masks = sample_masks(batch, cfg, torch.Generator().manual_seed(0))
    assert masks.ehr is not None and masks.wear is not None and masks.prs is not None
    assert (masks.ehr.flatten(1).sum(1) == 1).all() and not (masks.ehr & ~batch.code_valid).any()
    assert (masks.wear.sum(1) == 1).all() and not (masks.wear & ~batch.wear_valid).any()
    several = batch.prs_valid.sum(1) >= 2
    # all-but-one trait masked where there are several, none where there is one
    assert ((batch.prs_valid & ~masks.prs).sum(1)[several] == 1).all()
    assert not masks.prs[~several].any()


def test_epochs_after_prediction_time_are_not_reconstruction_targets() -> None:
    model = tiny_model().eval()
    batch = _batch([(4, 0.0), (6, 5.0)], [10.0 - 1.5 * EPOCH_DAYS], prediction_time=10.0)
    out = model(batch)
    assert out.epoch_valid[0, 0, :, 0].tolist() == [True, True, False, False]


# ----------------------------------------------------------------------------- balance, curriculum


def test_log_balance_divides_each_gradient_by_its_loss() -> None:
    cfg = PretrainingConfig(loss_balance="log", balance_eps=0.01)
    small = torch.tensor(0.5, requires_grad=True)
    large = torch.tensor(50.0, requires_grad=True)
    weights = ObjectiveWeights(ehr_masked_code=2.0, wear_masked=1.0)
    total = combine_losses({"ehr_masked_code": large, "wear_masked": small}, weights, cfg)
    assert total is not None
    total.backward()
    assert large.grad is not None and small.grad is not None
    assert float(large.grad) == pytest.approx(2.0 / 50.01)
    assert float(small.grad) == pytest.approx(1.0 / 0.51)
    assert float(total.detach()) == pytest.approx(2 * math.log(50.01) + math.log(0.51))
    plain = combine_losses(
        {"ehr_masked_code": large, "wear_masked": small}, weights, PretrainingConfig(loss_balance="none")
    )
    assert plain is not None
    assert float(plain.detach()) == pytest.approx(100.5)
    assert combine_losses({"align": large}, ObjectiveWeights(align=0.0), cfg) is None


def test_curriculum_is_monotone() -> None:
    cfg = load_model_config("tiny")
    total = 200
    weights = [curriculum_weights(step, total, cfg) for step in range(total + 1)]
    intra = [w.ehr_masked_code for w in weights]
    cross = [w.align for w in weights]
    assert all(a >= b for a, b in zip(intra, intra[1:]))
    assert all(a <= b for a, b in zip(cross, cross[1:]))
    assert cross[0] == 0.0 and cross[-1] == 1.0
    assert intra[0] == 1.0 and intra[-1] == pytest.approx(cfg.curriculum.intra_floor)
    for w in weights:  # every intra objective moves together, every cross objective too
        d = w.model_dump()
        assert len({d[n] for n in INTRA_MODAL}) == 1 and len({d[n] for n in CROSS_MODAL}) == 1
    start = int(cfg.curriculum.cross_start * total)
    assert cross[start] == 0.0 and cross[start + 2] > 0.0
    assert curriculum_weights(10 * total, total, cfg) == weights[-1]  # past the end: clamped


def test_curriculum_step_function_and_errors() -> None:
    cur = CurriculumConfig(cross_start=0.5, cross_end=0.5, intra_floor=0.0)
    assert curriculum_weights(4, 10, cur).align == 0.0
    assert curriculum_weights(5, 10, cur).align == 1.0
    with pytest.raises(ValueError, match="total"):
        curriculum_weights(1, 0, cur)
    with pytest.raises(ValueError, match="cross_end"):
        CurriculumConfig(cross_start=0.6, cross_end=0.2)


def test_curriculum_off_and_objectives_off() -> None:
    """The ablations' weights: the curriculum off gives every objective 1 at every step; an
    objective off is 0 throughout, the others keep their schedule."""
    off = CurriculumConfig(enabled=False)
    assert {curriculum_weights(step, 10, off) for step in (0, 5, 10)} == {ObjectiveWeights()}
    cur = CurriculumConfig(objectives_off=("align", "ehr_masked_value"))
    plain = CurriculumConfig()
    for step in range(11):
        w, ref = curriculum_weights(step, 10, cur).model_dump(), curriculum_weights(step, 10, plain).model_dump()
        assert w["align"] == w["ehr_masked_value"] == 0.0
        assert {k: v for k, v in w.items() if k not in cur.objectives_off} == {
            k: v for k, v in ref.items() if k not in cur.objectives_off
        }
    both = CurriculumConfig(enabled=False, objectives_off=("future_codes",))
    assert curriculum_weights(0, 10, both) == ObjectiveWeights(future_codes=0.0)
    with pytest.raises(ValueError, match=r"objectives_off holds \['alignment'\]"):
        CurriculumConfig(objectives_off=("alignment",))
    with pytest.raises(ValueError, match="repeats a name"):
        CurriculumConfig(objectives_off=("align", "align"))


def test_objective_weights_round_trip_and_validation() -> None:
    weights = ObjectiveWeights(align=0.25, predictive=0.5)
    flat = RoundConfig(round=1, rounds=1, local_steps=1, lr=1e-3, setup_sha256="x", weights=weights).to_flat()
    assert json.loads(flat["weights"])["align"] == 0.25
    assert RoundConfig.from_flat({**flat, "server-round": 1}).weights == weights
    with pytest.raises(ValueError):
        ObjectiveWeights(align=-1.0)
    with pytest.raises(ValueError, match="typo"):
        RoundConfig.from_flat({**flat, "weights": '{"typo": 1.0}'})


def test_module_function_matches_method() -> None:
    model = tiny_model().eval()
    batch = random_batch(vocab_size=VOCAB)
    a = model.pretraining_losses(batch, ObjectiveWeights(), torch.Generator().manual_seed(3))
    b = pretraining_losses(model, batch, ObjectiveWeights(), torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- future codes


def test_future_codes_trains_the_query_token_and_its_head() -> None:
    model = tiny_model().eval()
    batch = random_batch(batch_size=6, modalities={"ehr", "wearables", "genomics"}, vocab_size=VOCAB)
    only = ObjectiveWeights(**{name: 0.0 for name in LOSS_NAMES if name != "future_codes"})
    losses = model.pretraining_losses(batch, only, torch.Generator().manual_seed(0))
    assert losses["future_codes"] > 0
    losses["total"].backward()
    assert model.backbone.query_token.grad is not None and model.backbone.query_token.grad.abs().sum() > 0
    head = model.heads["ehr_future_codes"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # The query reads the history: the encoder below it learns from this objective too.
    grad = model.ehr_encoder.code_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_future_codes_is_zero_without_a_future_window() -> None:
    model = tiny_model().eval()
    # The whole record spans 20 days: no anchor leaves even the 30-day window inside it.
    batch = _batch([(5, 0.0), (6, 10.0), (7, 20.0)], [], prediction_time=25.0)
    anchor, has_anchor = sample_future_anchors(batch, model.cfg.pretraining, torch.Generator().manual_seed(0))
    assert anchor.shape == has_anchor.shape == (1, model.cfg.pretraining.future_anchors_per_sample)
    assert not bool(has_anchor.any()) and bool((anchor == 25.0).all())
    losses = model.pretraining_losses(batch, ObjectiveWeights(), torch.Generator().manual_seed(0))
    assert float(losses["future_codes"]) == 0.0
    assert torch.isfinite(losses["total"])


def test_future_anchors_leave_a_window_inside_the_record() -> None:
    cfg = PretrainingConfig()
    batch = random_batch(batch_size=8, modalities={"ehr"}, vocab_size=VOCAB, seed=3)
    events = batch.ehr_valid & (batch.times <= batch.prediction_time[:, None])
    record_end = batch.times.masked_fill(~events, -float("inf")).max(dim=1).values
    seen_anchors = set()
    for seed in range(10):
        anchor, has_anchor = sample_future_anchors(batch, cfg, torch.Generator().manual_seed(seed))
        again, _ = sample_future_anchors(batch, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(anchor, again)  # the generator decides
        assert bool(has_anchor.any())
        assert anchor.shape == (8, cfg.future_anchors_per_sample)
        for b, q in has_anchor.nonzero().tolist():
            t = float(anchor[b, q])
            assert bool(((batch.times[b] == t) & events[b]).any()), "an anchor is an event time"
            assert t + min(cfg.future_horizons_days) < float(record_end[b])
            seen_anchors.add((b, t))
    assert len(seen_anchors) > int(has_anchor.any(dim=1).sum())  # anchors vary with the draw


def test_several_query_tokens_each_give_the_single_query_state() -> None:
    """Q anchors in one pass: no query reads another, so each query's state (and the loss built
    on it) is what a forward pass with that query alone gives."""
    model = tiny_model().eval()
    batch = random_batch(batch_size=4, modalities={"ehr", "wearables"}, vocab_size=VOCAB, seed=4)
    anchors = torch.stack([batch.prediction_time * f for f in (0.3, 0.6, 1.0)], dim=1)  # [B, 3]
    out = model(batch, query_time=anchors)
    assert out.queries.shape == (4, 3, model.cfg.d_model)
    for q in range(3):
        single = model(batch, query_time=anchors[:, q])
        torch.testing.assert_close(out.queries[:, q], single.embedding, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.states[:, :-3], single.states[:, :-1], rtol=1e-5, atol=1e-5)
    # The targets of a [B, Q] anchor are those of each column alone.
    multi = future_window_targets(batch, anchors, 90.0, VOCAB)
    for q in range(3):
        for got, want in zip(multi, future_window_targets(batch, anchors[:, q], 90.0, VOCAB)):
            assert torch.equal(got[:, q], want)
    with pytest.raises(ValueError, match="query_time"):
        model(batch, query_time=torch.zeros(4, 0))


def test_future_window_targets_censoring_and_history() -> None:
    # History {5} up to the anchor at day 10; later: code 7 at day 40, code 5 at day 100, 9 at day 300.
    batch = _batch([(5, 0.0), (5, 10.0), (7, 40.0), (5, 100.0), (9, 300.0)], [], prediction_time=300.0)
    anchor = torch.tensor([10.0])
    targets, seen, covered = future_window_targets(batch, anchor, 60.0, VOCAB)
    assert targets[0].nonzero().flatten().tolist() == [7]
    assert seen[0].nonzero().flatten().tolist() == [5]
    assert bool(covered[0])
    targets, _, covered = future_window_targets(batch, anchor, 365.0, VOCAB)
    assert targets[0].nonzero().flatten().tolist() == [5, 7, 9]
    assert not bool(covered[0])  # the record ends at day 300 < 375: absent codes are unknown


@pytest.mark.parametrize("repeat_weight", [0.0, 0.1, 1.0])
def test_future_codes_repeats_down_weighted_and_censored_negatives_ignored(repeat_weight: float) -> None:
    """Anchor at day 10 (history {5}); within 30 days come 5 (repeat) and 7 (new). A head that
    gets 7 right and misses 5 pays only repeat_weight x the repeat term."""
    model = tiny_model().eval()
    batch = _batch([(5, 0.0), (5, 10.0), (5, 20.0), (7, 20.0), (9, 100.0)], [], prediction_time=100.0)
    cfg = PretrainingConfig(future_horizons_days=(30.0,), future_codes_repeat_weight=repeat_weight)
    anchor, has_anchor = torch.tensor([10.0]), torch.tensor([True])
    out = model(batch, query_time=anchor)
    head = model.heads["ehr_future_codes"]
    assert isinstance(head, FutureCodesHead)
    _constant_head(head.out, {7: 20.0, 5: -20.0}, default=-20.0)
    with torch.no_grad():
        head.horizon_bias.zero_()
    loss = float(future_codes_loss(model, out, batch, anchor, has_anchor, cfg)["future_codes"].detach())
    assert loss == pytest.approx(repeat_weight * 20.0, abs=1e-4)
    # With the record ending inside the window, the wrong negatives (none predicted) stay out:
    # same head predicting 9 (absent from the window) costs nothing when the window is censored.
    _constant_head(head.out, {7: 20.0, 5: 20.0, 9: 20.0}, default=-20.0)
    censored = _batch([(5, 0.0), (5, 10.0), (5, 20.0), (7, 20.0)], [], prediction_time=20.0)
    out = model(censored, query_time=anchor)
    loss = float(future_codes_loss(model, out, censored, anchor, has_anchor, cfg)["future_codes"].detach())
    assert loss == pytest.approx(0.0, abs=1e-4)
    out = model(batch, query_time=anchor)  # covered window: predicting 9 is a false positive
    loss = float(future_codes_loss(model, out, batch, anchor, has_anchor, cfg)["future_codes"].detach())
    # balanced: 0.5 x (one false positive among the 35 new-onset negatives: real codes 3..39 minus 5, 7)
    assert loss == pytest.approx(0.5 * 20.0 / 35, abs=1e-3)


def test_moving_an_event_past_the_window_changes_targets_not_the_query_state() -> None:
    model = tiny_model().eval()
    anchor, has_anchor = torch.tensor([50.0]), torch.tensor([True])
    cfg = PretrainingConfig(future_horizons_days=(180.0,))
    inside = _batch([(5, 0.0), (6, 50.0), (7, 150.0), (8, 600.0)], [20.0], prediction_time=600.0)
    moved = _batch([(5, 0.0), (6, 50.0), (7, 400.0), (8, 600.0)], [20.0], prediction_time=600.0)
    out_inside = model(inside, query_time=anchor)
    out_moved = model(moved, query_time=anchor)
    torch.testing.assert_close(out_inside.embedding, out_moved.embedding, rtol=0, atol=0)
    t_inside, _, _ = future_window_targets(inside, anchor, 180.0, VOCAB)
    t_moved, _, _ = future_window_targets(moved, anchor, 180.0, VOCAB)
    assert t_inside[0, 7] == 1 and t_moved[0, 7] == 0
    a = future_codes_loss(model, out_inside, inside, anchor, has_anchor, cfg)["future_codes"]
    b = future_codes_loss(model, out_moved, moved, anchor, has_anchor, cfg)["future_codes"]
    assert not torch.isclose(a, b)


def test_pretraining_places_the_query_at_the_anchor() -> None:
    """Through pretraining_losses: the loss equals future_codes_loss on a forward pass with the
    query at the sampled anchor (same generator draws), not at prediction_time."""
    model = tiny_model().eval()
    batch = random_batch(batch_size=4, modalities={"ehr"}, vocab_size=VOCAB, seed=2)
    cfg = model.cfg.pretraining
    g = torch.Generator().manual_seed(5)
    masks = sample_masks(batch, cfg, g)
    anchor, has_anchor = sample_future_anchors(batch, cfg, g)
    assert bool(has_anchor.any())
    assert bool((anchor < batch.prediction_time[:, None]).where(has_anchor, torch.tensor(True)).all())
    expected = future_codes_loss(model, model(batch, masks=masks, query_time=anchor), batch, anchor, has_anchor, cfg)
    got = model.pretraining_losses(batch, ObjectiveWeights(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(got["future_codes"], expected["future_codes"])


def test_prs_reconstruct_shown_scores_every_trait() -> None:
    # Issue 31: with prs_reconstruct_shown the PRS loss covers the visible traits too (the masked
    # term alone is minimised by a constant when traits are independent, and erases the scores).
    batch = random_batch(vocab_size=VOCAB, seed=2)
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    plain = HealthFM(cfg, vocab_size=VOCAB, n_prs_traits=batch.prs.shape[1]).eval()
    both = HealthFM(
        cfg.model_copy(update={"pretraining": cfg.pretraining.model_copy(update={"prs_reconstruct_shown": True})}),
        vocab_size=VOCAB,
        n_prs_traits=batch.prs.shape[1],
    ).eval()
    both.load_state_dict(plain.state_dict())
    hidden = torch.zeros_like(batch.prs_valid)
    hidden[:, 0] = batch.prs_valid[:, 0] & (batch.prs_valid.sum(1) >= 2)
    masks = ReconstructionMasks(prs=hidden)
    out = plain(batch, masks)
    assert out.genomics_cond is not None
    err = (plain.heads["prs_recon"](out.genomics_cond).float() - batch.prs.float()) ** 2
    seen = batch.prs_valid & out.present["genomics"][:, None]
    masked_only = prs_reconstruction_loss(plain, out, batch, masks)["prs_masked"]
    every = prs_reconstruction_loss(both, out, batch, masks)["prs_masked"]
    assert torch.allclose(masked_only, err[hidden & seen].mean())
    assert torch.allclose(every, err[seen].mean())
