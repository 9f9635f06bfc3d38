"""MEDS-Tab's tabulariser against a brute-force computation, its invariance to the events' order,
and its XGBoost on a small synthetic signal."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from healthfm_core.eval.meds_tab import (
    MedsTabFeatures,
    describe_codes,
    fit_xgboost,
    tabularize,
    window_days,
)
from healthfm_core.eval.metrics import auroc

EPOCH = dt.datetime(2100, 1, 1)


def _events(seed: int = 0) -> pa.Table:
    """Four subjects; times on whole days (window boundaries are hit exactly), several events at
    one time, codes with and without values, one rare code, static codes with and without values."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, dt.datetime | None, str, float | None]] = []
    for s in (1, 2, 3, 4):
        for _ in range(60):
            code = str(rng.choice(["A", "B", "L"], p=[0.35, 0.3, 0.35]))
            day = int(rng.integers(0, 800))
            value = (
                float(np.round(rng.normal(1.0, 2.0), 2))
                if code == "L" or (code == "A" and rng.random() < 0.5)
                else None
            )
            rows.append((s, EPOCH + dt.timedelta(days=day), code, value))
        rows.append((s, EPOCH + dt.timedelta(days=100), "L", 5.0))  # same time as another L below
        rows.append((s, EPOCH + dt.timedelta(days=100), "L", -3.0))
        rows.append((s, None, "SEX//F" if s % 2 else "SEX//M", None))
        if s != 4:
            rows.append((s, None, "PRS//t2d", float(s) / 2))
            rows.append((s, None, "PRS//t2d", float(s)))  # two static values: their mean
    # Below and at the minimum count (3): RARE twice, THREE three times, once on a window's edge.
    rows += [(1, EPOCH + dt.timedelta(days=d), "RARE", 1.0) for d in (10, 20)]
    rows += [(2, EPOCH + dt.timedelta(days=d), "THREE", None) for d in (93, 100, 100)]
    # Subject 5: only static rows (its windows are empty).
    rows.append((5, None, "SEX//F", None))
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.large_string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )


def _label_rows() -> tuple[np.ndarray, np.ndarray]:
    subjects, times = [], []
    for s in (1, 2, 3, 4, 5):
        for day in (-5, 0, 50, 100, 107, 365, 400.5, 799, 900):  # before all events, on and between them
            subjects.append(s)
            times.append(int((EPOCH + dt.timedelta(days=day) - dt.datetime(1970, 1, 1)).total_seconds() * 1_000_000))
    return np.array(subjects, np.int64), np.array(times, np.int64)


def _brute_force(events: pa.Table, subjects: np.ndarray, times: np.ndarray, f: MedsTabFeatures) -> np.ndarray:
    """Row by row and window by window, from the events as Python objects."""
    ev = events.to_pylist()
    names = f.names()
    col = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(subjects), len(names)))
    for i, (s, t_us) in enumerate(zip(subjects.tolist(), times.tolist(), strict=True)):
        t = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=t_us)
        mine = [e for e in ev if e["subject_id"] == s]
        timed = [e for e in mine if e["time"] is not None and e["code"] in f.code]
        before = [e["time"] for e in timed if e["time"] <= t]
        if before:
            end = max(before)
            for size in f.windows:
                start = end - dt.timedelta(days=window_days(size))
                inside = [e for e in timed if start < e["time"] <= end]
                for c in f.code:
                    n = sum(e["code"] == c for e in inside)
                    out[i, col[f"{c}/code/count/{size}"]] = n
                for c in f.value:
                    vals = [
                        float(e["numeric_value"]) for e in inside if e["code"] == c and e["numeric_value"] is not None
                    ]
                    if vals:
                        out[i, col[f"{c}/value/count/{size}"]] = len(vals)
                        out[i, col[f"{c}/value/sum/{size}"]] = sum(vals)
                        out[i, col[f"{c}/value/sum_sqd/{size}"]] = sum(v * v for v in vals)
                        out[i, col[f"{c}/value/min/{size}"]] = min(vals)
                        out[i, col[f"{c}/value/max/{size}"]] = max(vals)
        static = [e for e in mine if e["time"] is None]
        for c in f.static_present:
            out[i, col[f"{c}/static/present"]] = float(any(e["code"] == c for e in static))
        for c in f.static_first:
            vals = [float(e["numeric_value"]) for e in static if e["code"] == c and e["numeric_value"] is not None]
            if vals:
                out[i, col[f"{c}/static/first"]] = float(np.mean(vals))
    return out


def test_features_match_a_brute_force_computation() -> None:
    events = _events()
    f = describe_codes(events, min_code_inclusion_count=3)
    assert f.code == ("A", "B", "L", "THREE") and f.value == ("A", "L")  # RARE: 2 rows, THREE: 3
    assert f.static_present == ("PRS//t2d", "SEX//F")  # SEX//M: 2 rows
    assert f.static_first == ("PRS//t2d",)
    subjects, times = _label_rows()
    got = tabularize(events, subjects, times, f).toarray()
    want = _brute_force(events, subjects, times, f)
    assert got.shape == want.shape == (len(subjects), f.n_features)
    bad = np.argwhere(~np.isclose(got, want, rtol=1e-9, atol=1e-6))
    assert not len(bad), [(int(r), f.names()[c], got[r, c], want[r, c]) for r, c in bad[:5]]
    # The cases the brute force covers are there: empty windows, the 7d boundary, statics.
    names = f.names()
    assert not got[subjects == 5][:, [i for i, n in enumerate(names) if "/static/" not in n]].any()
    assert got[:, names.index("SEX//F/static/present")].sum() == 3 * 9  # subjects 1, 3, 5
    day = (times - times[0]) // (86_400 * 10**6) - 5  # the rows' days (the first row is day -5)
    ts = [i for i, n in enumerate(names) if "/static/" not in n]
    assert not got[day == -5][:, ts].any()  # before every event: empty windows, statics only
    # Subject 2 at day 100 (an event day: the window ends there): THREE at days 93, 100, 100;
    # 7 days back is (93, 100], so day 93 is out of the 7d window and in the 30d one.
    row = np.flatnonzero((subjects == 2) & (day == 100))[0]
    assert got[row, names.index("THREE/code/count/7d")] == 2
    assert got[row, names.index("THREE/code/count/30d")] == 3
    assert got[row, names.index("L/value/min/1d")] <= -3 and got[row, names.index("L/value/max/1d")] >= 5
    assert got[row, names.index("PRS//t2d/static/first")] == pytest.approx((1.0 + 2.0) / 2)


def test_events_after_the_prediction_time_are_never_read() -> None:
    events = _events()
    f = describe_codes(events, min_code_inclusion_count=3)
    subjects, times = _label_rows()
    x = tabularize(events, subjects, times, f).toarray()
    cut = int((EPOCH + dt.timedelta(days=300) - dt.datetime(1970, 1, 1)).total_seconds() * 1_000_000)
    t_us = np.array(
        [
            -1 if t is None else int((t - dt.datetime(1970, 1, 1)).total_seconds() * 1_000_000)
            for t in events["time"].to_pylist()
        ]
    )
    early = events.filter(pa.array((t_us <= cut) | (events["time"].is_null().to_numpy(zero_copy_only=False))))
    rows = times <= cut
    np.testing.assert_allclose(tabularize(early, subjects[rows], times[rows], f).toarray(), x[rows], rtol=1e-12)


def test_the_order_of_events_and_subjects_does_not_change_features() -> None:
    events = _events(seed=1)
    f = describe_codes(events, min_code_inclusion_count=3)
    subjects, times = _label_rows()
    x = tabularize(events, subjects, times, f)
    perm = np.random.default_rng(0).permutation(events.num_rows)
    shuffled = events.take(pa.array(perm))
    np.testing.assert_allclose(tabularize(shuffled, subjects, times, f).toarray(), x.toarray(), rtol=1e-12)
    rows = np.random.default_rng(1).permutation(len(subjects))
    np.testing.assert_allclose(
        tabularize(shuffled, subjects[rows], times[rows], f).toarray(), x.toarray()[rows], rtol=1e-12
    )


def test_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window size '2w'"):
        MedsTabFeatures(code=(), value=(), static_present=(), static_first=(), windows=("2w",))


def test_xgboost_learns_a_signal_in_sparse_counts() -> None:
    rng = np.random.default_rng(0)
    n = 600
    signal = rng.poisson(1.0, n)
    noise = rng.poisson(1.0, (n, 5))
    y = rng.random(n) < 1 / (1 + np.exp(-(1.5 * signal - 1.5)))
    dense = np.column_stack([signal, noise]).astype(np.float64)
    import scipy.sparse as sp

    x = sp.csr_matrix(dense)
    tr, tu, ho = slice(0, 300), slice(300, 400), slice(400, n)
    model = fit_xgboost(x[tr], y[tr], x[tu], y[tu])
    p = model.predict_proba(x[ho])
    assert p.shape == (200,) and np.all((p >= 0) & (p <= 1))
    assert model.best_iteration < 1000  # early stopping on the tuning split stopped it
    assert auroc(y[ho], p) > 0.7
