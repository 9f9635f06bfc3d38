"""Tasks and labels: new-onset rules, prediction times, wearable regression, registry, writing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.site_tables import EVENT_SCHEMA, WEAR_SCHEMA, make_site_tables, write_site_tables
from meds import LabelSchema

from healthfm_core.data.labels.tasks import (
    TASKS,
    OnsetTask,
    onset_labels,
    onset_labels_from_events,
    subject_slices,
    task_labels,
    visit_prediction_times,
    wear_period_end_times,
    wearable_regression_labels,
    write_labels,
    write_task_labels,
)
from healthfm_core.data.sites.site import open_site

T0 = datetime(2150, 1, 1)


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def events(rows: Sequence[tuple[int, datetime | None, str]]) -> pa.Table:
    sid, time, code = zip(*rows)
    return pa.table(
        {"subject_id": list(sid), "time": list(time), "code": list(code), "numeric_value": [None] * len(rows)},
        schema=EVENT_SCHEMA,
    )


def pts(rows: list[tuple[int, datetime]]) -> pa.Table:
    sid, t = zip(*rows)
    return pa.table({"subject_id": pa.array(sid, pa.int64()), "prediction_time": pa.array(t, pa.timestamp("us"))})


EV = events(
    [
        (1, day(0), "ICD10//I10"),
        (1, day(100), "ICD10//E11.9"),  # onset of T2D at day 100
        (1, day(500), "ICD10//E11.9"),
        (2, day(0), "ICD10//I10"),
        (2, day(60), "ICD10//I10"),  # follow-up ends at day 60, alive
        (3, day(0), "ICD10//I10"),
        (3, day(70), "MEDS_DEATH"),
        (4, None, "ICD10//E11"),  # a static outcome row: always prevalent
        (4, day(0), "ICD10//I10"),
        (4, day(900), "ICD10//I10"),
        (5, day(0), "ICD10//E1"),  # not E11: a shorter code never matches a longer prefix
        (5, day(900), "ICD10//I10"),
    ]
)


def label_dict(table: pa.Table) -> dict[tuple[int, datetime], bool]:
    LabelSchema.validate(table)
    return {(r["subject_id"], r["prediction_time"]): r["boolean_value"] for r in table.to_pylist()}


def test_new_onset_rules() -> None:
    # subject, prediction time, horizon -> expected label (None = excluded)
    cases = [
        (1, day(50), 90, True),  # onset at 100 in (50, 140]
        (1, day(50), 30, False),  # onset after the window, followed to day 500
        (1, day(99), 1, True),  # onset exactly at the window end counts
        (1, day(100), 30, None),  # onset at the prediction time: prevalent, excluded
        (1, day(100) - timedelta(microseconds=1), 30, True),
        (1, day(200), 30, None),  # prevalent
        (2, day(50), 30, None),  # follow-up ends at 60 < 80, no outcome: censored
        (2, day(50), 10, False),  # observed exactly to the window end
        (3, day(50), 30, False),  # died in the window without the outcome: negative
        (3, day(70), 30, None),  # dead at the prediction time
        (4, day(10), 30, None),  # static outcome row
        (5, day(10), 30, False),
    ]
    for sid, t, h, want in cases:
        got = label_dict(onset_labels_from_events(EV, "ICD10//E11", h, pts([(sid, t)])))
        assert got == ({} if want is None else {(sid, t): want}), (sid, t, h)


def test_onset_matches_bruteforce_reference() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(60):
        times = np.sort(rng.choice(2000, size=rng.integers(2, 12), replace=False))
        for t in times:
            rows.append(
                (s, day(int(t)), str(rng.choice(["ICD10//E11.9", "ICD10//I10", "LAB//x"], p=[0.15, 0.45, 0.4])))
            )
        if rng.random() < 0.2:
            rows.append((s, day(int(times[-1]) + 1), "MEDS_DEATH"))
    ev = events(rows)
    pt = pts([(s, day(int(rng.integers(0, 2000)))) for s in range(60) for _ in range(3)])
    got = label_dict(onset_labels_from_events(ev, "ICD10//E11", 180, pt))

    def reference(s: int, t: datetime) -> bool | None:
        mine = [(r[1], r[2]) for r in rows if r[0] == s]
        onset = min((tt for tt, c in mine if c.startswith("ICD10//E11")), default=None)
        death = min((tt for tt, c in mine if c == "MEDS_DEATH"), default=None)
        last = max(tt for tt, _ in mine)
        end = t + timedelta(days=180)
        if (onset is not None and onset <= t) or (death is not None and death <= t):
            return None
        if onset is not None and onset <= end:
            return True
        return False if (last >= end or (death is not None and death <= end)) else None

    want = {}
    for r in pt.to_pylist():
        lab = reference(r["subject_id"], r["prediction_time"])
        if lab is not None:
            want[(r["subject_id"], r["prediction_time"])] = lab
    assert got == want
    assert any(want.values()) and not all(want.values())


def test_visit_prediction_times() -> None:
    ev = events(
        [(s, day(d), "X") for s in range(1, 30) for d in [0, 5, 9, 20, 31, 40]]
        + [(30, day(1), "MEDS_BIRTH"), (30, day(3), "X"), (30, day(8), "X"), (30, day(9), "MEDS_DEATH")]
    )
    a = visit_prediction_times(ev, n_per_subject=3, seed=0)
    assert a.equals(visit_prediction_times(ev, n_per_subject=3, seed=0))
    assert not a.equals(visit_prediction_times(ev, n_per_subject=3, seed=1))
    rows = a.to_pylist()
    per: dict[int, list[datetime]] = {}
    for r in rows:
        per.setdefault(r["subject_id"], []).append(r["prediction_time"])
    assert all(len(v) == 3 and v == sorted(v) and day(40) not in v for s, v in per.items() if s < 30)
    assert per[30] == [day(3)]  # birth, death and the last visit are never prediction times
    # A subject's draws do not depend on the other subjects.
    only7 = visit_prediction_times(ev.filter(pa.compute.equal(ev["subject_id"], 7)), n_per_subject=3, seed=0)
    assert only7["prediction_time"].to_pylist() == per[7]
    later = visit_prediction_times(ev, n_per_subject=10, min_history_days=10)
    assert all(t >= day(10) for t in later["prediction_time"].to_pylist() if t is not None)
    with pytest.raises(ValueError, match="n_per_subject"):
        visit_prediction_times(ev, n_per_subject=0)


def wear_table(sid: int, start: datetime, n: int, enmo: np.ndarray, hr: np.ndarray | None) -> pa.Table:
    return pa.table(
        {
            "subject_id": [sid] * n,
            "time": [start + timedelta(seconds=30 * i) for i in range(n)],
            "enmo_mg": enmo.astype(np.float32),
            "hr_bpm": pa.array(hr, pa.float32()) if hr is not None else pa.nulls(n, pa.float32()),
        },
        schema=WEAR_SCHEMA,
    )


def test_wearable_regression_targets_second_half() -> None:
    n = 2 * 2880  # two days
    i = np.arange(n)
    enmo = np.where(i % 3 == 0, 5.0, 50.0)  # every third epoch at rest
    hr = np.where(i < n // 2, 90.0, np.where(enmo < 10, 58.0, 75.0))
    period1 = wear_table(1, day(0), n, enmo, hr)
    period2 = wear_table(1, day(100), n, enmo, hr + 2.0)  # a second wear period months later
    no_ppg = wear_table(2, day(3), n, enmo, None)
    short = wear_table(3, day(3), 100, enmo[:100], hr[:100])
    wear = pa.concat_tables([period1, period2, no_ppg, short])
    rhr = wearable_regression_labels(wear, target="resting_hr")
    LabelSchema.validate(rhr)
    assert rhr.to_pylist() == [
        {"subject_id": 1, "prediction_time": day(0) + timedelta(seconds=30 * (n // 2)), "float_value": 58.0},
        {"subject_id": 1, "prediction_time": day(100) + timedelta(seconds=30 * (n // 2)), "float_value": 60.0},
    ]
    activity = wearable_regression_labels(wear, target="mean_enmo")
    assert activity["subject_id"].to_pylist() == [1, 1, 2]
    want = enmo[n // 2 :].mean()
    assert np.allclose(activity["float_value"].to_numpy(), want, rtol=1e-6)
    assert wearable_regression_labels(wear.slice(0, 0)).num_rows == 0
    with pytest.raises(ValueError, match="target"):
        wearable_regression_labels(wear, target="steps")  # type: ignore[arg-type]


def test_wear_period_end_times_are_the_end_of_each_periods_last_epoch() -> None:
    n = 2 * 2880  # two days of 30-s epochs
    enmo, hr = np.full(n, 20.0), np.full(n, 60.0)
    wear = pa.concat_tables(
        [
            wear_table(2, day(3), n, enmo, None),
            wear_table(1, day(100), n, enmo, hr),  # out of order on purpose: the function sorts
            wear_table(1, day(0), n, enmo, hr),
            wear_table(3, day(3), 100, enmo[:100], hr[:100]),  # 50 minutes: shorter than a day, skipped
        ]
    )
    ends = wear_period_end_times(wear)
    assert ends.to_pylist() == [
        {"subject_id": 1, "prediction_time": day(2)},
        {"subject_id": 1, "prediction_time": day(102)},
        {"subject_id": 2, "prediction_time": day(5)},
    ]
    # A gap of more than max_gap_hours inside a day splits it into two periods.
    gap = pa.concat_tables(
        [wear_table(4, day(0), 1440, enmo[:1440], hr[:1440]), wear_table(4, day(0.75), 1440, enmo[:1440], hr[:1440])]
    )
    assert wear_period_end_times(gap, min_period_hours=1.0)["prediction_time"].to_pylist() == [day(0.5), day(1.25)]
    assert wear_period_end_times(gap, max_gap_hours=12.0, min_period_hours=1.0)["prediction_time"].to_pylist() == [
        day(1.25)
    ]
    assert wear_period_end_times(wear.slice(0, 0)).num_rows == 0
    with pytest.raises(ValueError, match="no column 'time'"):
        wear_period_end_times(wear.drop_columns(["time"]))


@pytest.mark.parametrize("rows", [1, 7, 500, 6000])
def test_labels_by_subject_slices_equal_the_whole_tables(rows: int) -> None:
    # A site's epochs are labelled in slices that never split a subject (WEAR_SLICE_ROWS rows):
    # exact because a wear period never spans subjects. Shuffled input, subjects of 30 to 3000
    # epochs, slices far smaller and larger than a subject.
    rng = np.random.default_rng(0)
    n = [3000, 30, 1500, 2900, 800, 64]
    wear = pa.concat_tables(
        [
            wear_table(sid, day(sid), k, rng.uniform(0, 40, k), np.where(rng.random(k) < 0.1, np.nan, 60 + sid))
            for sid, k in enumerate(n, start=1)
        ]
    )
    wear = wear.take(pa.array(rng.permutation(wear.num_rows)))
    slices = list(subject_slices(wear, rows=rows))
    whole = pa.concat_tables(slices)
    expect = wear.sort_by([("subject_id", "ascending"), ("time", "ascending")])
    for col in expect.column_names:  # NaN heart rates: compared as equal where both are NaN
        a, b = (t[col].to_numpy().astype(np.float64) for t in (whole, expect))
        assert np.array_equal(a, b, equal_nan=True), col
    owners = [set(s["subject_id"].to_pylist()) for s in slices]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1 :])  # no subject split
    assert (len(slices) == 1) == (rows >= sum(n))
    for target in ("resting_hr", "mean_enmo"):
        by_slice = pa.concat_tables([wearable_regression_labels(s, target=target) for s in slices])
        assert by_slice.equals(wearable_regression_labels(wear, target=target)), target
        assert by_slice.num_rows > 0
    ends = pa.concat_tables([wear_period_end_times(s, min_period_hours=0.1) for s in slices])
    assert ends.equals(wear_period_end_times(wear, min_period_hours=0.1))


def test_registry_names() -> None:
    onset = {n for n, t in TASKS.items() if isinstance(t, OnsetTask)}
    assert len(onset) == 16
    assert {"onset_t2d_365d", "onset_cad_30d", "onset_hypertension_90d", "onset_copd_180d"} <= onset
    cad, t2d = TASKS["onset_cad_90d"], TASKS["onset_t2d_365d"]
    assert isinstance(cad, OnsetTask) and isinstance(t2d, OnsetTask)
    assert cad.outcome_code_prefix == "ICD10//I25"
    assert t2d.horizon_days == 365
    assert {"wearable_resting_hr", "wearable_mean_enmo"} <= set(TASKS)


def test_task_labels_on_a_site_and_atomic_write(tmp_path: Path) -> None:
    site = open_site(write_site_tables(make_site_tables(), tmp_path / "site"))
    labels = task_labels(
        site,
        ["onset_t2d_30d", "onset_hypertension_30d", "wearable_mean_enmo"],
        prediction_times=pts([(1, datetime(2150, 3, 1, 8)), (2, datetime(2150, 3, 4, 8))]),
    )
    # Subject 1 has E11.9 at the prediction time: excluded from T2D; subject 2 died on day 90,
    # so is followed through 30 days: a T2D negative; its I10 at the prediction time excludes it
    # from hypertension, while subject 1 (no I10, followed 40 days) is a negative.
    assert label_dict(labels["onset_t2d_30d"]) == {(2, datetime(2150, 3, 4, 8)): False}
    assert label_dict(labels["onset_hypertension_30d"]) == {(1, datetime(2150, 3, 1, 8)): False}
    assert labels["wearable_mean_enmo"].num_rows == 0  # two hours of wear < min_period_hours
    same = onset_labels(site, "ICD10//E11", 30, pts([(2, datetime(2150, 3, 4, 8))]))
    assert same.equals(labels["onset_t2d_30d"])
    paths = write_task_labels(labels, tmp_path / "labels")
    assert [p.name for p in paths] == sorted(f"{k}.parquet" for k in labels)
    assert pq.read_table(paths[0]).equals(labels[sorted(labels)[0]])
    bad = labels["onset_t2d_30d"].append_column("extra", pa.array([1]))
    with pytest.raises(Exception, match="extra"):
        write_labels(bad, tmp_path / "labels" / "bad.parquet")
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == sorted(p.name for p in paths)
    with pytest.raises(ValueError, match="unknown task"):
        task_labels(site, ["onset_flu_30d"])
    with pytest.raises(ValueError, match=r"subject_id \[99\]"):
        onset_labels(site, "ICD10//E11", 30, pts([(99, datetime(2150, 3, 4, 8))]))


def test_visit_prediction_times_do_not_depend_on_the_events_order() -> None:
    """Sorted events (a MEDS shard) take the checked fast path, shuffled ones are sorted first: the
    same distinct (subject, time) pairs either way, equal to numpy's unique rows."""
    from healthfm_core.data.labels.tasks import _distinct_pairs, visit_prediction_times

    rng = np.random.default_rng(4)
    n = 5000
    subject = rng.integers(1, 300, n)
    time = np.datetime64("2110-01-01T00:00:00", "us") + rng.integers(0, 400, n).astype("timedelta64[D]")
    code = rng.choice(np.array(["ICD10CM//E11.9", "LOINC//4548-4", "MEDS_BIRTH", "ICD9CM//250.00"]), n)
    order = np.lexsort((time, subject))
    sorted_events = pa.table({"subject_id": subject[order], "time": time[order], "code": code[order]})
    shuffled = sorted_events.take(pa.array(rng.permutation(n)))
    a = visit_prediction_times(sorted_events, n_per_subject=3, seed=2)
    b = visit_prediction_times(shuffled, n_per_subject=3, seed=2)
    assert a.num_rows > 300 and a.equals(b)
    g = rng.integers(0, 50, 2000)
    t = rng.integers(0, 30, 2000)
    want = np.unique(np.stack([g, t], axis=1), axis=0)
    for perm in (np.arange(2000), np.lexsort((t, g))):
        got = _distinct_pairs(g[perm], t[perm])
        assert np.array_equal(np.stack(got, axis=1), want)
