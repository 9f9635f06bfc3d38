"""From parquet to Batch: no token after prediction_time, time-shift invariance, UNK, padding, PRS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from helpers.site_tables import EVENT_SCHEMA, WEAR_SCHEMA, make_site_tables, write_site_tables

from healthfm_core.data.files.layout import EPOCH_US
from healthfm_core.data.labels.tasks import task_labels
from healthfm_core.data.sequences.batch import PAD_CODE, UNK_CODE, Batch
from healthfm_core.data.sequences.code_stats import events_code_stats, site_code_stats, wearable_stats
from healthfm_core.data.sequences.tokens import (
    LabelledDataset,
    PretrainingDataset,
    SiteSequences,
    collate,
    make_loader,
    to_us,
)
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from simulations.synthetic import generate_federation

T0 = datetime(2150, 1, 1)
US = timedelta(microseconds=1)


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def events(rows: Sequence[tuple[int, datetime | None, str, float | None]]) -> pa.Table:
    return pa.table({n: list(c) for n, c in zip(EVENT_SCHEMA.names, zip(*rows))}, schema=EVENT_SCHEMA)


def wear(sid: int, start: datetime, n: int, hr: bool = True) -> pa.Table:
    i = np.arange(n)
    return pa.table(
        {
            "subject_id": [sid] * n,
            "time": [start + timedelta(seconds=30 * int(k)) for k in i],
            "enmo_mg": (10.0 + i % 13).astype(np.float32),
            "hr_bpm": pa.array(np.where(i % 5 == 0, np.nan, 60.0 + i % 9), pa.float32(), from_pandas=True)
            if hr
            else pa.nulls(n, pa.float32()),
        },
        schema=WEAR_SCHEMA,
    )


def vocab_for(ev: pa.Table, wr: pa.Table | None = None):
    stats = events_code_stats(ev)
    if wr is not None:
        w = wearable_stats(wr)
        stats = stats.model_copy(update={"wearables": w.wearables, "n_wearable_subjects": w.n_wearable_subjects})
    return build_vocabulary([stats], min_subjects=1)


EV = events(
    [
        (1, None, "PRS//T2D", 1.5),
        (1, None, "SEX//F", None),
        (1, day(0), "ICD10//I10", None),
        (1, day(1), "LAB//HBA1C", 6.1),
        (1, day(2), "ICD10//E11.9", None),
        (1, day(2), "LAB//HBA1C", 7.3),
        (1, day(3), "LAB//HBA1C", 7.0),
        (2, None, "PRS//CAD", -0.7),
        (2, day(5), "ICD10//I10", None),
    ]
)
W0 = day(1) + timedelta(hours=12)
WR = wear(1, W0, 300)  # 2.5 one-hour patches


def test_events_at_prediction_time_kept_one_microsecond_later_dropped() -> None:
    seqs = SiteSequences(EV, WR, vocab_for(EV, WR))
    s = int(seqs.index_of([1])[0])
    at = seqs.sample(s, int(to_us(pa.array([day(2)]))[0]))
    before = seqs.sample(s, int(to_us(pa.array([day(2) - US]))[0]))
    assert len(at.codes) == 1 + 3  # the static token + tokens of days 0, 1, 2 (two codes on day 2)
    assert len(before.codes) == 1 + 2
    assert (at.codes[-1] != PAD_CODE).sum() == 2 and (before.codes[-1] != PAD_CODE).sum() == 1
    assert at.times.max() == pytest.approx(2.0) and before.times.max() == pytest.approx(1.0)
    assert at.prediction_time == pytest.approx(2.0)


@pytest.mark.parametrize("k", [0, 118, 119, 120, 130, 299])
def test_epoch_visible_only_once_it_has_ended(k: int) -> None:
    seqs = SiteSequences(EV, WR, vocab_for(EV, WR))
    end_k = int(to_us(pa.array([W0]))[0]) + (k + 1) * EPOCH_US  # end of epoch k
    at, before = seqs.sample(0, end_k), seqs.sample(0, end_k - 1)
    assert at.wear_epoch_mask[..., 0].sum() == k + 1  # epochs 0..k
    assert before.wear_epoch_mask[..., 0].sum() == k
    assert len(at.wear_times) == k // 120 + 1
    # A patch whose first epoch has not ended is not there at all.
    assert len(before.wear_times) == (k - 1) // 120 + 1 if k > 0 else len(before.wear_times) == 0
    # Hidden epochs carry no data.
    assert np.all(at.wear_epochs[~at.wear_epoch_mask] == 0)


@pytest.mark.parametrize("window", [0.0, 1.0])
def test_no_token_after_prediction_time_random_site(window: float) -> None:
    rng = np.random.default_rng(0)
    rows, wears = [], []
    for s in range(25):
        t = np.sort(rng.integers(0, 400 * 24 * 3600, rng.integers(1, 40))) * 1_000_000
        for tt in t:
            rows.append(
                (s, T0 + timedelta(microseconds=int(tt)), str(rng.choice(["A", "B", "C"])), float(rng.normal()))
            )
        if s % 2:
            wears.append(
                wear(
                    s,
                    T0 + timedelta(days=int(rng.integers(0, 300)), seconds=30 * int(rng.integers(0, 2880))),
                    int(rng.integers(1, 700)),
                    hr=bool(s % 3),
                )
            )
    ev, wr = events(rows), pa.concat_tables(wears)
    seqs = SiteSequences(ev, wr, vocab_for(ev, wr), patch_epochs=60, token_window_days=window)
    ev_us, ev_sid = to_us(ev["time"]), ev["subject_id"].to_numpy()
    ev_code = np.array(ev["code"].to_pylist())
    w_us, w_sid = to_us(wr["time"]), wr["subject_id"].to_numpy()
    for s in range(25):
        i = int(seqs.index_of([s])[0])
        candidates = np.concatenate([ev_us[ev_sid == s], w_us[w_sid == s] + EPOCH_US])
        for pt in np.concatenate([candidates, candidates - 1, candidates + 1, rng.choice(candidates, 3) + 7]):
            smp = seqs.sample(i, int(pt), max_events=10_000, max_patches=10_000)
            seen = (ev_sid == s) & (ev_us <= pt)
            first = ev_us[ev_sid == s].min()
            bucket = ev_us[seen] if window == 0 else (ev_us[seen] - first) // int(window * 86_400_000_000)
            assert len(smp.codes) == len(np.unique(bucket))  # one token per bucket with a visible row
            assert (smp.codes != PAD_CODE).sum() == len({(k, c) for k, c in zip(bucket, ev_code[seen])})
            assert smp.wear_epoch_mask[..., 0].sum() == np.sum((w_sid == s) & (w_us + EPOCH_US <= pt))
            assert np.all(smp.times <= smp.prediction_time + 1e-3)
            assert np.all(smp.wear_times <= smp.prediction_time + 1e-3)


def shifted(tables, delta: timedelta):
    def shift(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("time")
        return t.set_column(i, t.schema.field(i), pc.add(t["time"], pa.scalar(delta, pa.duration("us"))))

    tables.shards = {k: shift(v) for k, v in tables.shards.items()}
    tables.wearables = {k: shift(v) for k, v in tables.wearables.items()}
    return tables


def batches_of(site, vocab, labels: pa.Table) -> list:
    seqs = SiteSequences.from_site(site, vocab, patch_epochs=60)
    out = [collate([PretrainingDataset(seqs)[i] for i in range(3)])]
    b, y = next(iter(make_loader(LabelledDataset(seqs, labels), batch_size=8, shuffle=False)))
    return out + [b, y]


def test_time_shift_invariance(tmp_path: Path) -> None:
    """The fixture lives in the 2150s; moving every date back 130 years (and 90 s) changes nothing."""
    delta = timedelta(days=-130 * 365, seconds=90)
    a = open_site(write_site_tables(make_site_tables(), tmp_path / "a"))
    b = open_site(write_site_tables(shifted(make_site_tables(), delta), tmp_path / "b"))
    vocab = build_vocabulary([site_code_stats(a, min_subjects=1)], min_subjects=1)
    assert vocab == build_vocabulary([site_code_stats(b, min_subjects=1)], min_subjects=1)
    pts = [datetime(2150, 3, 1, 8), datetime(2150, 3, 2, 0, 31), datetime(2150, 3, 4, 8)]
    labels = pa.table(
        {
            "subject_id": pa.array([1, 1, 2], pa.int64()),
            "prediction_time": pa.array(pts, pa.timestamp("us")),
            "boolean_value": [True, False, True],
        }
    )
    labels_b = labels.set_column(1, "prediction_time", pa.array([t + delta for t in pts], pa.timestamp("us")))
    out_a, out_b = batches_of(a, vocab, labels), batches_of(b, vocab, labels_b)
    for x, y in zip(out_a, out_b):
        if isinstance(x, Batch):
            for f in fields(Batch):
                assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f.name
        else:
            assert torch.equal(x, y)
    assert out_a[1].wear_valid.any()  # wearables did reach the labelled batch


def test_birth_time_gives_the_age_even_when_the_birth_row_is_cut() -> None:
    born = events(
        [
            (1, day(-365.25 * 40), "MEDS_BIRTH", None),
            *[(1, day(d), "ICD10//I10", None) for d in range(1, 6)],
            (2, day(5), "ICD10//I10", None),
        ]
    )
    seqs = SiteSequences(born, None, vocab_for(born))
    one = seqs.sample(int(seqs.index_of(np.array([1]))[0]), int(to_us(pa.array([day(5)]))[0]), max_events=2)
    assert len(one.codes) == 2 and one.birth_time == 0.0  # the clock starts at birth
    assert one.prediction_time - one.birth_time == pytest.approx(365.25 * 40 + 5)
    two = seqs.sample(int(seqs.index_of(np.array([2]))[0]), int(to_us(pa.array([day(5)]))[0]))
    assert np.isnan(two.birth_time)  # no MEDS_BIRTH row: age unknown
    batch = collate([one, two])
    assert batch.birth_time[0] == 0.0 and torch.isnan(batch.birth_time[1])


def test_unknown_codes_are_unk_without_value() -> None:
    known = events([(1, day(0), "LAB//HBA1C", 6.0), (2, day(0), "LAB//HBA1C", 7.0)])
    vocab = vocab_for(known)
    seqs = SiteSequences(EV, None, vocab)
    smp = seqs.sample(0, int(to_us(pa.array([day(10)]))[0]))
    hba1c = vocab.code_id("LAB//HBA1C")
    # Tokens: static, days 0, 1, 2, 3; a known code ranks before UNK within a token.
    assert smp.codes.tolist() == [
        [UNK_CODE, PAD_CODE],
        [UNK_CODE, PAD_CODE],
        [hba1c, PAD_CODE],
        [hba1c, UNK_CODE],
        [hba1c, PAD_CODE],
    ]
    assert smp.has_value.tolist() == [[False, False], [False, False], [True, False], [True, False], [True, False]]
    assert np.all(smp.values[smp.codes == UNK_CODE] == 0)


def test_padding_and_validity() -> None:
    seqs = SiteSequences(EV, WR, vocab_for(EV, WR))
    samples = [seqs.sample(0, int(to_us(pa.array([day(2)]))[0])), seqs.sample(1, int(to_us(pa.array([day(9)]))[0]))]
    b = collate(samples)
    assert b.codes.shape == (2, 4, 2) and b.wear_epochs.shape == (2, 3, 120, 2)  # 2.5 h of wear
    assert b.ehr_valid.sum(1).tolist() == [4, 1]
    assert torch.equal((b.codes != PAD_CODE).any(-1), b.ehr_valid)
    assert b.code_valid.sum().item() == 5 + 1
    assert torch.all(b.values[~b.code_valid] == 0) and not b.has_value[~b.code_valid].any()
    assert b.wear_valid.tolist() == [[True] * 3, [False] * 3]
    assert b.wear_epoch_mask[0, 2, :, 0].sum() == 60  # the last patch is half full
    assert torch.equal(b.wear_valid, b.wear_epoch_mask.flatten(2).any(-1))
    assert not b.wear_epoch_mask[1].any() and torch.all(b.wear_epochs[1] == 0)
    # Null heart rate is masked in the HR channel only.
    assert not b.wear_epoch_mask[0, 0, 0, 1] and b.wear_epoch_mask[0, 0, 0, 0]
    # Padded times repeat the row's last real time (never later than prediction_time).
    assert torch.all(b.times <= b.prediction_time[:, None] + 1e-4)
    assert b.prediction_time.tolist() == pytest.approx([2.0, 4.0])  # subject 2 starts on day 5
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])


def test_prs_in_vocabulary_trait_order() -> None:
    vocab = vocab_for(
        events(
            [
                (s, None, c, v)
                for s, c, v in [
                    (1, "PRS//T2D", 1.0),
                    (2, "PRS//T2D", -1.0),
                    (1, "PRS//CAD", 0.5),
                    (2, "PRS//CAD", -0.5),
                ]
            ]
        )
    )
    assert vocab.prs_traits == ["CAD", "T2D"]
    seqs = SiteSequences(EV, None, vocab)
    b = collate([seqs.sample(0, int(to_us(pa.array([day(4)]))[0])), seqs.sample(1, int(to_us(pa.array([day(5)]))[0]))])
    assert b.prs_valid.tolist() == [[False, True], [True, False]]
    assert b.prs[0, 1].item() == pytest.approx(1.5)  # T2D: z-scores with mean 0, sd 1 stay as they are
    assert b.prs[1, 0].item() == pytest.approx(-1.4)  # CAD: sd 0.5 -> -0.7 / 0.5
    assert not b.has_modality()["genomics"].logical_not().any()


def test_max_events_keeps_static_and_most_recent() -> None:
    seqs = SiteSequences(EV, WR, vocab_for(EV, WR))
    smp = seqs.sample(0, int(to_us(pa.array([day(3)]))[0]), max_events=3, max_patches=1)
    assert smp.times.tolist() == pytest.approx([0.0, 2.0, 3.0])
    assert smp.codes[0, 0] == seqs.vocab.code_id("SEX//F")
    assert len(smp.wear_times) == 1 and smp.wear_times[0] == pytest.approx(1.5 + 2 / 24)


def test_datasets_and_loader() -> None:
    seqs = SiteSequences(EV, WR, vocab_for(EV, WR))
    last = PretrainingDataset(seqs)
    assert len(last) == 2 and last[0].prediction_time == pytest.approx(3.0)
    rnd = PretrainingDataset(seqs, time_mode="random", seed=3)
    draws = [rnd[0].prediction_time for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in (0.0, 1.0, 2.0, 3.0)
    seen = set()
    for epoch in range(12):
        rnd.set_epoch(epoch)
        seen.add(rnd[0].prediction_time)
    assert len(seen) > 1
    labels = pa.table(
        {
            "subject_id": pa.array([2, 1], pa.int64()),
            "prediction_time": pa.array([day(5), day(1)], pa.timestamp("us")),
            "float_value": pa.array([3.5, -1.0], pa.float32()),
        }
    )
    batch, y = next(iter(make_loader(LabelledDataset(seqs, labels), batch_size=4, shuffle=False)))
    assert batch.subject_id.tolist() == [2, 1] and y.tolist() == [3.5, -1.0]
    assert batch.ehr_valid.sum(1).tolist() == [1, 3]
    pre = next(iter(make_loader(last, batch_size=4, shuffle=True, seed=1)))
    assert isinstance(pre, Batch) and sorted(pre.subject_id.tolist()) == [1, 2]
    with pytest.raises(ValueError, match=r"subject_id \[7\]"):
        LabelledDataset(seqs, labels.set_column(0, "subject_id", pa.array([7, 1], pa.int64())))
    with pytest.raises(ValueError, match="float_value"):
        LabelledDataset(seqs, labels.select(["subject_id", "prediction_time"]))
    with pytest.raises(ValueError, match="time_mode"):
        PretrainingDataset(seqs, time_mode="first")  # type: ignore[arg-type]


def test_end_to_end_on_synthetic_federation(tmp_path: Path) -> None:
    fed = generate_federation(tmp_path / "fed", scenario="tiny", seed=1, n_subjects=30, progress=False)
    sites = [open_site(s.root) for s in fed.sites]
    vocab = build_vocabulary([site_code_stats(s, min_subjects=3) for s in sites], min_subjects=5)
    assert {"ICD10//E11", "ICD10//I10"} & {c[:10] for c in vocab.codes}
    for site in sites:
        seqs = SiteSequences.from_site(site, vocab)
        n_batches = 0
        for batch in make_loader(PretrainingDataset(seqs, max_events=256), batch_size=16):
            n_batches += 1
            assert torch.all(
                batch.times[batch.ehr_valid]
                <= batch.prediction_time[:, None].expand_as(batch.times)[batch.ehr_valid] + 1e-2
            )
            assert torch.isfinite(batch.values).all() and torch.isfinite(batch.wear_epochs).all()
        assert n_batches == 2
        labels = task_labels(site, ["onset_hypertension_365d"])["onset_hypertension_365d"]
        assert labels.num_rows > 0
        ds = LabelledDataset(seqs, labels)
        batch, y = collate([ds[i] for i in range(len(ds))]), torch.tensor(labels["boolean_value"].to_pylist()).float()
        # New onset: no labelled sample already carries the outcome code in its history.
        htn = torch.tensor([vocab.code_id(c) for c in vocab.codes if c.startswith("ICD10//I10")])
        assert not torch.isin(batch.codes, htn).any()
        assert y.shape[0] == batch.batch_size
