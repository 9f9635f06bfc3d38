"""Vocabulary from aggregate statistics: exact merges, suppression, JSON, determinism."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from helpers.site_tables import EVENT_SCHEMA, WEAR_SCHEMA, SiteTables, write_site_tables
from pydantic import ValidationError

from healthfm_core.data.sequences.batch import N_SPECIAL_CODES, UNK_CODE
from healthfm_core.data.sequences.code_stats import (
    CodeStats,
    NumericStats,
    QuantileSketch,
    SiteCodeStats,
    events_code_stats,
    grouped_numeric_stats,
    merge_site_stats,
    site_code_stats,
)
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.terms.vocabulary import Vocabulary


def random_events(n_subjects: int, seed: int, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows_per = rng.integers(1, 30, n_subjects)
    sid = np.repeat(np.arange(first_id, first_id + n_subjects), rows_per)
    n = len(sid)
    codes = rng.choice(["ICD10//E11.9", "LAB//51087//UNK", "LAB//LDL", "MED//metformin", "PRS//T2D"], n)
    lab = (codes == "LAB//51087//UNK") | (codes == "LAB//LDL") | (codes == "PRS//T2D")
    vals = np.where(codes == "LAB//LDL", rng.lognormal(4.8, 0.3, n), rng.normal(6.0, 1.2, n))
    vals = np.where(lab, vals, np.nan).astype(np.float32)
    base = np.datetime64("2150-01-01T00:00:00", "us")
    times = base + (rng.integers(0, 10_000, n) * 86_400_000_000).astype("timedelta64[us]")
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": pa.array(np.sort(times), pa.timestamp("us")),
            "code": pa.array(codes, pa.string()),
            "numeric_value": pa.array(vals, pa.float32(), from_pandas=True),
        },
        schema=EVENT_SCHEMA,
    )


def test_moments_and_quantiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    group = rng.integers(0, 3, 5000)
    x = np.where(group == 0, rng.normal(-3, 2, 5000), rng.lognormal(2, 1, 5000))
    x[::97] = 0.0
    stats = grouped_numeric_stats(group, x, 3)
    for g in range(3):
        xs = x[group == g]
        st = stats[g]
        assert st is not None
        assert st.count == len(xs)
        assert st.mean == pytest.approx(xs.mean(), rel=1e-12)
        assert st.variance == pytest.approx(xs.var(), rel=1e-10)
        assert st.sketch.count == len(xs)
        for q, got in zip([0.05, 0.25, 0.5, 0.75, 0.95], st.sketch.quantiles([0.05, 0.25, 0.5, 0.75, 0.95])):
            want = np.quantile(xs, q, method="lower")
            assert abs(got - want) <= 0.0101 * abs(want) + 1e-12, (g, q, got, want)


def test_merge_of_two_halves_equals_whole() -> None:
    whole = random_events(300, seed=1)
    sid = whole["subject_id"].to_numpy()
    h1, h2 = whole.filter(pa.array(sid < 150)), whole.filter(pa.array(sid >= 150))
    a = events_code_stats(whole)
    b = merge_site_stats([events_code_stats(h1), events_code_stats(h2)])
    assert a.n_subjects == b.n_subjects == 300
    assert a.n_events == b.n_events == whole.num_rows
    assert a.codes.keys() == b.codes.keys()
    for code in a.codes:
        ca, cb = a.codes[code], b.codes[code]
        assert (ca.n_subjects, ca.n_events) == (cb.n_subjects, cb.n_events)
        assert (ca.numeric is None) == (cb.numeric is None)
        if ca.numeric is not None:
            assert cb.numeric is not None
            assert ca.numeric.count == cb.numeric.count
            assert ca.numeric.n_subjects == cb.numeric.n_subjects
            assert cb.numeric.mean == pytest.approx(ca.numeric.mean, rel=1e-12)
            assert cb.numeric.m2 == pytest.approx(ca.numeric.m2, rel=1e-10)
            assert cb.numeric.sketch == ca.numeric.sketch  # bucket counts add exactly


def _site(root: Path, events: pa.Table, wearables: pa.Table | None = None) -> Path:
    codes = sorted(set(events["code"].to_pylist()))
    sid = np.unique(events["subject_id"].to_numpy())
    tables = SiteTables(
        shards={"train/0.parquet": events},
        codes=pa.table(
            {"code": codes, "description": codes, "parent_codes": pa.array([None] * len(codes), pa.list_(pa.string()))}
        ),
        splits=pa.table({"subject_id": pa.array(sid, pa.int64()), "split": ["train"] * len(sid)}),
        wearables={} if wearables is None else {"0.parquet": wearables},
    )
    return write_site_tables(tables, root)


def _wearables(subjects: list[int], hr: bool = True) -> pa.Table:
    n = 20
    start = datetime(2150, 6, 1)
    rows: dict[str, list[Any]] = {"subject_id": [], "time": [], "enmo_mg": [], "hr_bpm": []}
    for s in subjects:
        for i in range(n):
            rows["subject_id"].append(s)
            rows["time"].append(start + timedelta(seconds=30 * i))
            rows["enmo_mg"].append(float(5 + (s * 7 + i) % 40))
            rows["hr_bpm"].append(float(55 + (s + i) % 30) if hr else None)
    return pa.table(rows, schema=WEAR_SCHEMA)


def test_site_stats_halves_on_disk_equal_whole(tmp_path: Path) -> None:
    whole = random_events(60, seed=2)
    sid = whole["subject_id"].to_numpy()
    wear = _wearables(list(range(0, 60, 3)))
    wsid = wear["subject_id"].to_numpy()
    sites = {
        "whole": open_site(_site(tmp_path / "whole", whole, wear)),
        "h1": open_site(_site(tmp_path / "h1", whole.filter(pa.array(sid < 30)), wear.filter(pa.array(wsid < 30)))),
        "h2": open_site(_site(tmp_path / "h2", whole.filter(pa.array(sid >= 30)), wear.filter(pa.array(wsid >= 30)))),
    }
    st = {k: site_code_stats(s, min_subjects=1) for k, s in sites.items()}
    merged = merge_site_stats([st["h1"], st["h2"]])
    assert merged.n_wearable_subjects == st["whole"].n_wearable_subjects == 20
    for ch in ("enmo_mg", "hr_bpm"):
        assert merged.wearables[ch].count == st["whole"].wearables[ch].count == 400
        assert merged.wearables[ch].mean == pytest.approx(st["whole"].wearables[ch].mean, rel=1e-12)
        assert merged.wearables[ch].sketch == st["whole"].wearables[ch].sketch
    assert {c: s.n_subjects for c, s in merged.codes.items()} == {c: s.n_subjects for c, s in st["whole"].codes.items()}
    vocab_a = build_vocabulary([st["whole"]], min_subjects=1)
    vocab_b = build_vocabulary([st["h1"], st["h2"]], min_subjects=1)
    assert vocab_a.codes == vocab_b.codes
    assert vocab_a.prs_traits == vocab_b.prs_traits == ["T2D"]
    for code in vocab_a.numeric:  # robust normalisation comes from identical merged sketches
        assert vocab_a.numeric[code] == vocab_b.numeric[code]


def test_site_suppresses_rare_codes_and_thin_numeric_summaries(tmp_path: Path) -> None:
    t = datetime(2150, 1, 1)
    rows = []
    for s in range(6):  # a common code in 6 subjects, a value on it for only 2 of them
        rows.append((s, t, "ICD10//I10", 1.0 if s < 2 else None))
        rows.append((s, t, "LAB//x", float(s)))
    rows.append((0, t + timedelta(days=1), "RARE//secret", 3.0))
    rows.append((1, t + timedelta(days=1), "RARE//secret", 4.0))
    rows.sort(key=lambda r: (r[0], r[1]))  # subjects contiguous, time-sorted (the site rules)
    events = pa.table({n: list(c) for n, c in zip(EVENT_SCHEMA.names, zip(*rows))}, schema=EVENT_SCHEMA)
    site = open_site(_site(tmp_path / "s", events, _wearables([0, 1])))
    stats = site_code_stats(site, min_subjects=3)
    dumped = stats.model_dump_json()
    assert "RARE//secret" not in dumped  # the name itself is never revealed
    assert set(stats.codes) == {"ICD10//I10", "LAB//x"}
    assert stats.codes["ICD10//I10"].n_subjects == 6
    assert stats.codes["ICD10//I10"].numeric is None  # only 2 subjects carry a value
    assert stats.codes["LAB//x"].numeric is not None and stats.codes["LAB//x"].numeric.count == 6
    assert stats.wearables == {} and stats.n_wearable_subjects == 0  # 2 wearable subjects < 3
    assert site_code_stats(site, min_subjects=2).codes["RARE//secret"].n_subjects == 2
    with pytest.raises(ValueError, match="min_subjects"):
        site_code_stats(site, min_subjects=0)


def test_federation_threshold_and_id_layout() -> None:
    a = events_code_stats(random_events(40, seed=3))
    b = events_code_stats(random_events(40, seed=4, first_id=1000))
    # A code seen in 2 subjects at each site passes a federation threshold of 4, not of 5.
    rare = SiteCodeStats(
        min_subjects=1, n_subjects=2, n_events=2, codes={"DX//rare": CodeStats(n_subjects=2, n_events=2)}
    )
    v4 = build_vocabulary([a, b, rare, rare.model_copy()], min_subjects=4)
    v5 = build_vocabulary([a, b, rare, rare.model_copy()], min_subjects=5)
    assert "DX//rare" in v4.codes and "DX//rare" not in v5.codes
    assert v4.codes == sorted(v4.codes)
    assert not any(c.startswith("PRS//") for c in v4.codes)
    assert v4.code_id(v4.codes[0]) == N_SPECIAL_CODES
    assert v4.vocab_size == N_SPECIAL_CODES + len(v4.codes)
    ids = v4.encode(pa.array(["LAB//LDL", "NOT//THERE", "LAB//LDL", "ICD10//E11.9"]))
    assert ids.tolist() == [v4.code_id("LAB//LDL"), UNK_CODE, v4.code_id("LAB//LDL"), v4.code_id("ICD10//E11.9")]
    # LDL is log-normal: the robust centre is near exp(4.8), values are clipped.
    ldl = v4.numeric["LAB//LDL"]
    assert ldl.center == pytest.approx(np.exp(4.8), rel=0.05)
    vals, has = v4.normalise_values(
        np.array([v4.code_id("LAB//LDL")] * 3 + [UNK_CODE]), np.array([ldl.center, 1e9, np.nan, 5.0])
    )
    assert vals.tolist()[:2] == [0.0, ldl.clip] and has.tolist() == [True, True, False, False]


def test_vocabulary_deterministic_regardless_of_site_order() -> None:
    stats = [events_code_stats(random_events(30, seed=s, first_id=100 * s)) for s in range(3)]
    outs = {build_vocabulary(list(p), min_subjects=2).model_dump_json() for p in itertools.permutations(stats)}
    assert len(outs) == 1
    merged = {merge_site_stats(list(p)).model_dump_json() for p in itertools.permutations(stats)}
    assert len(merged) == 1


def test_json_round_trips(tmp_path: Path) -> None:
    stats = events_code_stats(random_events(50, seed=5))
    again = SiteCodeStats.model_validate_json(stats.model_dump_json())
    assert again == stats
    vocab = build_vocabulary([stats], min_subjects=3)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.code_id(vocab.codes[-1]) == vocab.code_id(vocab.codes[-1])
    assert list(tmp_path.iterdir()) == [tmp_path / "vocab.json"]  # no temp file left behind


def test_invalid_peer_statistics_are_rejected(tmp_path: Path) -> None:
    good = json.loads(events_code_stats(random_events(10, seed=6)).model_dump_json())
    bad = json.loads(json.dumps(good))
    bad["codes"]["LAB//LDL"]["n_subjects"] = -1
    with pytest.raises(ValidationError, match="n_subjects"):
        SiteCodeStats.model_validate(bad)
    bad = json.loads(json.dumps(good))
    bad["codes"]["LAB//LDL"]["numeric"]["mean"] = float("nan")
    with pytest.raises(ValidationError, match="non-finite"):
        SiteCodeStats.model_validate(bad)
    bad = json.loads(json.dumps(good))
    bad["wearables"] = {"steps": {"count": 1, "mean": 0.0, "m2": 0.0}}
    with pytest.raises(ValidationError, match="unknown wearable channel"):
        SiteCodeStats.model_validate(bad)
    with pytest.raises(ValueError, match="alpha"):
        QuantileSketch(alpha=0.01).merge(QuantileSketch(alpha=0.02))
    (tmp_path / "v.json").write_text("{}")
    with pytest.raises(ValueError, match="v.json"):
        Vocabulary.load(tmp_path / "v.json")
    with pytest.raises(ValueError, match="at least one site"):
        build_vocabulary([])


def test_chan_merge_matches_direct() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(1e4, 3, 1000), rng.normal(1e4 + 5, 1, 10)
    sx = grouped_numeric_stats(np.zeros(1000, int), x, 1)[0]
    sy = grouped_numeric_stats(np.zeros(10, int), y, 1)[0]
    assert sx is not None and sy is not None
    m = sx.merge(sy)
    z = np.concatenate([x, y])
    assert isinstance(m, NumericStats)
    assert m.mean == pytest.approx(z.mean(), rel=1e-14)
    assert m.m2 == pytest.approx(((z - z.mean()) ** 2).sum(), rel=1e-9)
