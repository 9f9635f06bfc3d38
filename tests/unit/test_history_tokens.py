"""One EHR token per time bucket: pooling invariance, the per-token cap, masking of code slots,
and the coverage of history on dense (~10 rows per timestamp) data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import cast

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers.random_batch import random_batch
from helpers.site_tables import EVENT_SCHEMA

from healthfm_core.data.checks.coverage import history_coverage_days
from healthfm_core.data.sequences.batch import MASK_CODE, N_SPECIAL_CODES, PAD_CODE, UNK_CODE
from healthfm_core.data.sequences.code_stats import events_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences, to_us
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.model.objectives import ehr_reconstruction_losses, sample_masks
from healthfm_core.model.outputs import ReconstructionMasks
from healthfm_core.terms.model_config import PretrainingConfig, load_model_config
from healthfm_core.terms.vocabulary import Vocabulary

T0 = datetime(2150, 1, 1)
VOCAB = 40


def table(rows: Sequence[tuple[int, datetime | None, str, float | None]]) -> pa.Table:
    return pa.table({n: list(c) for n, c in zip(EVENT_SCHEMA.names, zip(*rows))}, schema=EVENT_SCHEMA)


def vocab_of(ev: pa.Table) -> Vocabulary:
    return build_vocabulary([events_code_stats(ev)], min_subjects=1)


def us(t: datetime) -> int:
    return int(to_us(pa.array([t]))[0])


# ----------------------------------------------------------------------------- pooling


def test_token_does_not_depend_on_the_order_of_its_codes() -> None:
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), VOCAB, 4).eval()
    batch = random_batch(batch_size=4, vocab_size=VOCAB, codes_per_token=5, seed=3)
    assert (batch.code_valid.sum(-1) > 1).any()  # some tokens do pool several codes
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    shuffled = replace(
        batch, codes=batch.codes[..., perm], values=batch.values[..., perm], has_value=batch.has_value[..., perm]
    )
    a, b = model(batch), model(shuffled)
    torch.testing.assert_close(a.ehr_tokens, b.ehr_tokens, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-5)
    # Control: which value belongs to which code matters (per-code value gates).
    valued = batch.has_value.sum(-1) >= 2
    assert valued.any()
    swapped = batch.values.clone()
    for i, j in valued.nonzero().tolist():
        slots = batch.has_value[i, j].nonzero().flatten()[:2]
        swapped[i, j, slots] = swapped[i, j, slots.flip(0)]
    moved = model(replace(batch, values=swapped)).ehr_tokens
    assert not torch.allclose(moved, a.ehr_tokens, atol=1e-6)


def test_pipeline_token_is_independent_of_row_order() -> None:
    rows: list[tuple[int, datetime | None, str, float | None]] = [
        (1, T0 + timedelta(hours=h), f"LAB//{k}", float(k + h)) for h in (1, 5, 30) for k in range(6)
    ]
    rows += [(1, T0 + timedelta(hours=5), "LAB//2", 99.0), (1, None, "GENDER//F", None)]
    ev = table(rows)
    vocab = vocab_of(ev)
    shuffled = ev.take(np.random.default_rng(0).permutation(ev.num_rows))
    a = SiteSequences(ev, None, vocab).sample(0, us(T0 + timedelta(days=3)))
    b = SiteSequences(shuffled, None, vocab).sample(0, us(T0 + timedelta(days=3)))
    for name in ("codes", "values", "has_value", "times"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # Day buckets from the first row (hour 1): hours 1 and 5 pool, hour 30 is the next day.
    assert len(a.times) == 1 + 2 and a.times.tolist() == pytest.approx([0.0, 4 / 24, 29 / 24])
    # Each code once per token, its latest row: LAB//2 has 2+5=7 at hour 5 (and 99 at hour 5 too:
    # same time, the larger value wins) rather than 3 at hour 1.
    lab2 = vocab.code_id("LAB//2")
    expected = vocab.normalise_values(np.array([lab2]), np.array([99.0]))[0][0]
    assert (a.codes[1] == lab2).sum() == 1 and a.values[1][a.codes[1] == lab2][0] == expected
    assert (a.codes[1] != PAD_CODE).sum() == 6
    ts = SiteSequences(ev, None, vocab, token_window_days=0).sample(0, us(T0 + timedelta(days=3)))
    assert len(ts.times) == 1 + 3  # one token per exact timestamp


# ----------------------------------------------------------------------------- cap


def test_cap_keeps_the_rarest_codes_and_drops_unknown_first() -> None:
    t = T0 + timedelta(days=1)
    panel = [(1, t, f"C{k:02d}", float(k)) for k in range(40)]
    # C{k} appears k more times at subject 2: the rarest codes are C00, C01, ...
    extra = [(2, T0 + timedelta(minutes=m), f"C{k:02d}", 0.0) for k in range(40) for m in range(k)]
    vocab = vocab_of(table(panel + extra))
    ev = table([*panel, (1, t, "NOT_IN_VOCAB", None)])
    seqs = SiteSequences(ev, None, vocab)
    one = seqs.sample(0, us(t), max_codes_per_token=32)
    assert one.codes.shape == (1, 32)
    assert one.codes[0].tolist() == [vocab.code_id(f"C{k:02d}") for k in range(32)]  # rarest first, in order
    assert UNK_CODE not in one.codes
    wide = seqs.sample(0, us(t), max_codes_per_token=64)
    assert wide.codes.shape == (1, 41) and wide.codes[0, -1] == UNK_CODE  # UNK ranks last
    assert np.array_equal(
        wide.values[0, :40],
        np.array(
            [
                vocab.normalise_values(np.array([vocab.code_id(f"C{k:02d}")]), np.array([float(k)]))[0][0]
                for k in range(40)
            ],
            np.float32,
        ),
    )
    with pytest.raises(ValueError, match="max_codes_per_token"):
        seqs.sample(0, us(t), max_codes_per_token=0)
    # max_events caps tokens: the static token and the most recent buckets.
    days = table(
        [
            (1, None, "GENDER//F", None),
            *[(1, T0 + timedelta(days=d, hours=h), "X", 1.0) for d in range(10) for h in (1, 2)],
        ]
    )
    smp = SiteSequences(days, None, vocab_of(days)).sample(0, us(T0 + timedelta(days=20)), max_events=4)
    assert smp.times.tolist() == pytest.approx([0.0, 7 + 1 / 24, 8 + 1 / 24, 9 + 1 / 24])


def test_a_token_holds_only_rows_up_to_prediction_time() -> None:
    ev = table([(1, T0 + timedelta(hours=h), f"LAB//{h}", 1.0) for h in (1, 3, 6)])
    seqs = SiteSequences(ev, None, vocab_of(ev))
    smp = seqs.sample(0, us(T0 + timedelta(hours=4)))
    assert smp.codes.shape == (1, 2) and smp.times.tolist() == pytest.approx([2 / 24])  # hours 1, 3
    assert seqs.vocab.code_id("LAB//6") not in smp.codes


# ----------------------------------------------------------------------------- masking


def test_masks_are_code_slots_of_visible_tokens() -> None:
    batch = random_batch(batch_size=6, vocab_size=VOCAB, codes_per_token=4, seed=5)
    masks = sample_masks(batch, PretrainingConfig(ehr_mask_prob=0.5), torch.Generator().manual_seed(0))
    visible = batch.code_valid & (batch.times <= batch.prediction_time[:, None])[..., None]
    assert masks.ehr is not None
    assert masks.ehr.shape == batch.codes.shape
    assert not (masks.ehr & ~visible).any() and (masks.ehr.flatten(1).sum(1) >= 1).all()
    partly = masks.ehr.any(-1) & (visible & ~masks.ehr).any(-1)
    assert partly.any()  # some tokens keep some of their codes


def test_hidden_codes_reach_the_targets_not_the_model() -> None:
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), VOCAB, 4).eval()
    batch = random_batch(batch_size=4, vocab_size=VOCAB, codes_per_token=4, seed=6)
    masks = sample_masks(batch, PretrainingConfig(ehr_mask_prob=0.3), torch.Generator().manual_seed(1))
    assert masks.ehr is not None
    hidden = masks.ehr & batch.code_valid
    other = replace(
        batch,
        codes=torch.where(
            hidden, (batch.codes + 1 - N_SPECIAL_CODES) % (VOCAB - N_SPECIAL_CODES) + N_SPECIAL_CODES, batch.codes
        ),
        values=torch.where(hidden, batch.values + 3.0, batch.values),
    )
    out, out_other = model(batch, masks=masks), model(other, masks=masks)
    torch.testing.assert_close(out.states, out_other.states, rtol=0, atol=0)
    a = ehr_reconstruction_losses(model, out, batch, masks)
    b = ehr_reconstruction_losses(model, out_other, other, masks)
    assert set(a) == {"ehr_masked_code", "ehr_masked_value"}
    assert float(a["ehr_masked_code"].detach()) != float(b["ehr_masked_code"].detach())
    # A token with every slot hidden is the pure MASK token.
    full = ReconstructionMasks(ehr=batch.code_valid.clone())
    tokens = model(batch, masks=full).ehr_tokens
    enc = model.ehr_encoder
    mask_token = enc(
        torch.tensor([[[MASK_CODE]]]),
        torch.zeros(1, 1, 1),
        torch.zeros(1, 1, 1, dtype=torch.bool),
        torch.ones(1, 1, 1, dtype=torch.bool),
    )[0, 0]
    torch.testing.assert_close(tokens[batch.ehr_valid], mask_token.expand(int(batch.ehr_valid.sum()), -1))


def test_hand_made_code_set_target() -> None:
    """Token with codes {5, 7, 9}: 7 and 9 hidden, 5 shown -> targets {7, 9}, 5 left out."""
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), 12, 4).eval()
    batch = random_batch(batch_size=1, n_events=2, vocab_size=12, modalities={"ehr"}, seed=0)
    batch = replace(
        batch,
        codes=torch.tensor([[[5, 7, 9], [4, 0, 0]]]),
        values=torch.zeros(1, 2, 3),
        has_value=torch.zeros(1, 2, 3, dtype=torch.bool),
        times=torch.tensor([[1.0, 2.0]]),
        ehr_valid=torch.ones(1, 2, dtype=torch.bool),
        prediction_time=torch.tensor([3.0]),
    )
    masks = ReconstructionMasks(ehr=torch.tensor([[[False, True, True], [False, False, False]]]))
    head = model.heads["ehr_code"]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-2.0)
        head.bias[5] = -50.0  # would be a huge loss if 5 counted as a negative... it is excluded
        head.bias[7] = head.bias[9] = 2.0
    loss = ehr_reconstruction_losses(model, model(batch, masks=masks), batch, masks)["ehr_masked_code"]
    expected = 0.5 * (
        torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(-2.0))
    )
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- coverage


def dense_export(n_subjects: int = 30, years: float = 4.0, rate_per_day: float = 0.78, panel: int = 10) -> pa.Table:
    """A dense export like the real one: timestamps at random times (Poisson, `rate_per_day`),
    each a panel of `panel` lab rows, so the last 256 rows span about a month."""
    rng = np.random.default_rng(0)
    sid: list[int] = []
    times: list[datetime | None] = []
    codes: list[str] = []
    values: list[float | None] = []
    for s in range(n_subjects):
        n = rng.poisson(rate_per_day * 365.25 * years)
        at = np.sort(rng.uniform(0, 365.25 * years, n))
        for t in at:
            for k in range(panel):
                sid.append(s)
                times.append(T0 + timedelta(days=float(t)))
                codes.append(f"LAB//{50860 + k}//mg/dL")
                values.append(float(rng.normal()))
        sid.append(s)
        times.append(None)
        codes.append("GENDER//F")
        values.append(None)
        sid.append(s)
        times.append(T0 - timedelta(days=365.25 * 60))
        codes.append("MEDS_BIRTH")
        values.append(None)
    return pa.table({"subject_id": sid, "time": times, "code": codes, "numeric_value": values}, schema=EVENT_SCHEMA)


def test_dense_export_history_spans_a_year_at_default_settings() -> None:
    ev = dense_export()
    per_event = history_coverage_days(ev, 256, per_event=True)
    per_stamp = history_coverage_days(ev, 256, token_window_days=0)
    per_day = history_coverage_days(ev, 256)
    assert per_stamp["mean_rows_per_token"] == pytest.approx(10, rel=0.01)  # ~10 rows per timestamp
    assert 15 < cast(float, per_event["median_days"]) < 60  # the real export's month
    assert cast(float, per_stamp["median_days"]) > 8 * cast(float, per_event["median_days"])
    assert (
        cast(float, per_day["median_days"]) >= 365 > cast(float, per_stamp["median_days"])
    )  # why a token is a day by default
    assert per_day["median_history_days"] == pytest.approx(365.25 * 4, rel=0.02)  # MEDS_BIRTH is not history
    # The summary agrees with what the pipeline hands the model at each subject's last row.
    seqs = SiteSequences(ev, None, vocab_of(ev))
    spans = []
    for i in range(seqs.n_subjects):
        smp = seqs.sample(i, int(seqs.last_time_us[i]), max_events=256)
        timed = smp.times[1:]  # after the static token; the birth row is out of reach here
        spans.append(smp.prediction_time - timed.min())
    # Token times are a bucket's latest row; the coverage counts from its earliest: < 1 day apart.
    assert abs(np.median(spans) - per_day["median_days"]) < 1.0


def test_coverage_by_hand() -> None:
    rows = [
        (1, None, "GENDER//F", None),
        (1, None, "PRS//T2D", 0.3),
        (1, T0 - timedelta(days=9000), "MEDS_BIRTH", None),
    ]
    rows += [(1, T0 + timedelta(days=d, hours=h), "X", None) for d in (0, 10, 20, 30) for h in (0, 1)]
    rows += [(2, T0 + timedelta(days=5), "X", None)]
    ev = table(rows)
    full = history_coverage_days(ev, 256)
    assert full["n_subjects"] == 2 and full["fraction_full_history"] == 1.0
    assert full["median_days"] == pytest.approx((30 + 1 / 24 + 0) / 2)  # subjects: 30 days + 1 h and 0
    # 3 tokens: static + the two last days (20 and 30): 10 days and 1 hour for subject 1.
    three = history_coverage_days(ev.filter(pa.compute.equal(ev["subject_id"], 1)), 3)
    assert three["median_days"] == pytest.approx(10 + 1 / 24) and three["fraction_full_history"] == 0.0
    # Per event: static rows count one each (GENDER; PRS is not a token), so 3 slots = 2 rows.
    per_event = history_coverage_days(ev.filter(pa.compute.equal(ev["subject_id"], 1)), 3, per_event=True)
    assert per_event["median_days"] == pytest.approx(1 / 24)
    with pytest.raises(ValueError, match="max_tokens"):
        history_coverage_days(ev, 0)
