"""ACES task configs (configs/tasks/) give the same new-onset labels as tasks.onset_labels_from_events.

ACES predicts at every clinical event after the first (trigger clinical_event, history window);
today's pipeline at visit_prediction_times. Both are compared at every such event of every subject
(old rules given ACES's times) and at the visit times (ACES output restricted with prediction_times=). On the hospital scenario the old
function cannot match two coding systems with one prefix, so the events it sees have the task's
outcome codes (ICD-9 and ICD-10) renamed to one code first.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from healthfm_core.data.labels.aces_tasks import PREDICTION_TIME_CODE, aces_labels, aces_labels_shared, load_task
from healthfm_core.data.labels.tasks import (
    DISEASES,
    onset_labels_from_events,
    visit_prediction_times,
    wear_period_end_times,
)
from healthfm_core.data.sites.site import open_site
from simulations.synthetic import generate_federation

TASK_NAMES = list(DISEASES)  # t2d, cad, hypertension, copd: one configs/tasks/<name>.yaml each
N_SUBJECTS = 60


def _events(root: Path) -> pa.Table:
    t = pa.concat_tables(
        pq.read_table(p, columns=["subject_id", "time", "code"]) for p in sorted((root / "data").glob("*.parquet"))
    )
    return t.set_column(2, "code", t["code"].cast(pa.string()))


def _clinical(events: pa.Table) -> pl.DataFrame:
    """Timed events that are neither a birth nor a death (nor a prediction-time mark)."""
    return cast(pl.DataFrame, pl.from_arrow(events)).filter(
        pl.col("time").is_not_null() & ~pl.col("code").is_in(["MEDS_BIRTH", "MEDS_DEATH", PREDICTION_TIME_CODE])
    )


def _with_history(times: pa.Table, events: pa.Table) -> pa.Table:
    """The (subject_id, prediction_time) rows with a clinical event strictly before them: where
    the shipped tasks may predict (min_history_events 1)."""
    first = _clinical(events).group_by("subject_id").agg(pl.col("time").min().alias("first"))
    df = cast(pl.DataFrame, pl.from_arrow(times)).join(first, on="subject_id", how="inner")
    return df.filter(pl.col("prediction_time") > pl.col("first")).drop("first").to_arrow()


def _all_event_times(events: pa.Table) -> pa.Table:
    """Every clinical event's time with a clinical history before it: the shipped tasks' triggers."""
    df = _clinical(events).select("subject_id", pl.col("time").alias("prediction_time")).unique()
    return _with_history(df.sort("subject_id", "prediction_time").to_arrow(), events)


def _sorted(t: pa.Table) -> pl.DataFrame:
    return cast(pl.DataFrame, pl.from_arrow(t)).sort("subject_id", "prediction_time")


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for scenario in ("tiny", "hospital"):
        m = generate_federation(
            tmp_path_factory.mktemp(scenario), scenario, seed=0, n_subjects=N_SUBJECTS, progress=False
        )
        out[scenario] = m.sites_dir
    return out


def _old_events(events: pa.Table, scenario: str, task_name: str) -> tuple[pa.Table, str]:
    """Events and the prefix today's onset_labels would use for this task."""
    if scenario != "hospital":
        return events, DISEASES[task_name]
    regex = load_task(task_name).config["predicates"]["outcome"]["code"]["regex"]
    hit = pc.match_substring_regex(events["code"], regex)
    return events.set_column(2, "code", pc.if_else(hit, pa.scalar("OUTCOME"), events["code"])), "OUTCOME"


@pytest.mark.slow  # 22 s: CI's slow stage (Makefile SLOW_CI) keeps it gating
def test_aces_equals_onset_labels(federations: dict[str, Path]) -> None:
    rows = []
    for scenario, sites_dir in federations.items():
        for site_root in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
            events = _events(site_root)
            all_times = _all_event_times(events)
            visits = visit_prediction_times(events, n_per_subject=4, seed=0)
            visit_df = cast(pl.DataFrame, pl.from_arrow(visits))
            for name in TASK_NAMES:
                task = load_task(name)
                new = aces_labels(task, site_root)
                old_events, prefix = _old_events(events, scenario, name)
                for h, new_h in new.items():
                    old_all = onset_labels_from_events(old_events, prefix, h, all_times)
                    # Every timed event: identical rows and labels.
                    assert _sorted(new_h).equals(_sorted(old_all)), (scenario, site_root.name, name, h)
                    old_v = _sorted(onset_labels_from_events(old_events, prefix, h, _with_history(visits, events)))
                    new_v = _sorted(new_h).join(visit_df, on=["subject_id", "prediction_time"], how="inner")
                    assert new_v.equals(old_v)
                    rows.append((scenario, site_root.name, name, h, old_v, new_v))
    # The side-by-side table at today's default prediction times (visit_prediction_times), summed over sites.
    agg: dict[tuple, list[int]] = {}
    for scenario, _, name, h, old_v, new_v in rows:
        acc = agg.setdefault((scenario, name, h), [0] * 6)
        for i, df in enumerate((old_v, new_v)):
            acc[i * 3] += df["subject_id"].n_unique()
            acc[i * 3 + 1] += df.height
            acc[i * 3 + 2] += int(df["boolean_value"].sum())
    lines = [
        f"{'scenario':<9}{'task':<13}{'h':>4} | {'old subj':>8}{'rows':>6}{'pos':>5} | {'ACES subj':>9}{'rows':>6}{'pos':>5}"
    ]
    for (scenario, name, h), a in agg.items():
        lines.append(f"{scenario:<9}{name:<13}{h:>4} | {a[0]:>8}{a[1]:>6}{a[2]:>5} | {a[3]:>9}{a[4]:>6}{a[5]:>5}")
    print("\n" + "\n".join(lines))
    assert sum(a[2] for a in agg.values()) > 0  # the comparison saw positives


def test_prediction_times_filter(federations: dict[str, Path]) -> None:
    root = federations["hospital"] / "general_hospital"
    events = _events(root)
    visits = visit_prediction_times(events, n_per_subject=2, seed=3)
    full = aces_labels("t2d", root, horizons_days=[90])[90]
    kept = aces_labels("t2d", root, horizons_days=[90], prediction_times=visits)[90]
    expect = _sorted(full).join(
        cast(pl.DataFrame, pl.from_arrow(visits)), on=["subject_id", "prediction_time"], how="inner"
    )
    assert 0 < kept.num_rows < full.num_rows
    assert _sorted(kept).equals(expect)


def test_hospital_onsets_in_both_coding_systems(federations: dict[str, Path]) -> None:
    """The cross-coding predicate finds every diagnosis the generator wrote, ICD-9 and ICD-10 alike."""
    truth = federations["hospital"].parent / "truth"
    seen = set()
    for site_root in sorted(p for p in federations["hospital"].iterdir() if p.is_dir()):
        events = cast(pl.DataFrame, pl.from_arrow(_events(site_root)))
        onsets = pl.read_parquet(truth / site_root.name / "onsets.parquet")
        for disease, name in (("T2D", "t2d"), ("CAD", "cad"), ("HTN", "hypertension"), ("COPD", "copd")):
            regex = load_task(name).config["predicates"]["outcome"]["code"]["regex"]
            first = (
                events.filter(pl.col("code").str.contains(regex))
                .group_by("subject_id")
                .agg(pl.col("time").min().alias("first"))
            )
            o = onsets.filter(pl.col("disease") == disease).join(first, on="subject_id", how="left")
            assert o["diagnosis_time"].cast(pl.Int64).fill_null(-1).equals(o["first"].cast(pl.Int64).fill_null(-1)), (
                disease
            )
            seen |= set(o["diagnosis_code"].drop_nulls().str.slice(0, 19).to_list())
    assert {"DIAGNOSIS//ICD//9//", "DIAGNOSIS//ICD//10/"} <= seen


def _write_site(root: Path, rows: list[tuple[int, dt.datetime | None, str]]) -> Path:
    (root / "data").mkdir(parents=True)
    pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row"
    ).with_columns(numeric_value=pl.lit(None, pl.Float32)).write_parquet(root / "data" / "0.parquet")
    return root


def test_rules_on_hand_made_subjects(tmp_path: Path) -> None:
    """Prevalent and censored rows excluded, death within the horizon a negative, a positive kept
    even when the record ends soon after it, across ICD-9 and ICD-10."""
    d = dt.datetime
    rows = [
        (1, d(2110, 1, 1), "DIAGNOSIS//ICD//9//25000"),
        (1, d(2110, 3, 1), "LAB//50931//mg/dL"),
        (1, d(2112, 1, 1), "X"),  # prevalent
        (2, d(2110, 1, 1), "X"),
        (2, d(2110, 2, 1), "DIAGNOSIS//ICD//10//E119"),  # positive, record ends at the onset
        (3, d(2110, 1, 1), "X"),
        (3, d(2110, 2, 1), "MEDS_DEATH"),  # dies within 90 d: negative
        (4, d(2110, 1, 1), "X"),
        (4, d(2110, 2, 1), "X"),  # record ends within 90 d: censored
        (5, d(2110, 1, 1), "X"),
        (5, d(2110, 4, 1), "X"),
        (5, None, "GENDER//F"),  # observed through 90 d: negative
    ]
    # Each subject born (a timed MEDS_BIRTH, as MIMIC-IV writes it) and seen once before 2110:
    # the minimum history the shipped tasks ask for at a prediction time.
    history = [(s, d(2060, 1, 1), "MEDS_BIRTH") for s in range(1, 6)]
    history += [(s, d(2109, 6, 1), "VISIT") for s in range(1, 6)]
    got = aces_labels("t2d", _write_site(tmp_path / "site", history + rows), horizons_days=[90])[90]
    first = cast(pl.DataFrame, pl.from_arrow(got)).filter(pl.col("prediction_time") == d(2110, 1, 1)).sort("subject_id")
    assert first.select("subject_id", "boolean_value").rows() == [(2, True), (3, False), (5, False)]
    # Never at birth, nor at the first clinical event (no history before it).
    assert not cast(pl.DataFrame, pl.from_arrow(got))["prediction_time"].is_in([d(2060, 1, 1), d(2109, 6, 1)]).any()


def test_no_prediction_at_birth_or_without_history(tmp_path: Path) -> None:
    """The shipped onset tasks predict at clinical events with at least min_history_events clinical
    events strictly before: not at a timed birth, a death, a static row, nor a subject's first
    visit; a file's metadata.min_history_events raises the minimum. Every task, every horizon."""
    d = dt.datetime
    rows = [
        (1, None, "GENDER//F"),
        (1, d(2050, 1, 1), "MEDS_BIRTH"),
        (1, d(2100, 1, 1), "VISIT"),  # first clinical event: no history
        (1, d(2100, 1, 1), "LAB//1//x"),  # the same time: still the first
        (1, d(2100, 6, 1), "VISIT"),  # one clinical event before: a row
        (1, d(2101, 1, 1), "VISIT"),  # two before
        (1, d(2103, 1, 1), "VISIT"),  # the record goes on past every horizon
        (2, d(2060, 1, 1), "MEDS_BIRTH"),
        (2, d(2060, 1, 1), "VISIT"),  # at birth time but clinical: the first, no history
        (2, d(2100, 1, 1), "VISIT"),
        (2, d(2103, 1, 1), "VISIT"),
    ]
    root = _write_site(tmp_path / "site", rows)
    tasks = [load_task(name) for name in TASK_NAMES]
    for task, labels in zip(tasks, aces_labels_shared(tasks, root), strict=True):
        for h, table in labels.items():
            got = cast(pl.DataFrame, pl.from_arrow(table)).select("subject_id", "prediction_time").rows()
            assert (1, d(2050, 1, 1)) not in got and (2, d(2060, 1, 1)) not in got, (task.name, h)
            assert (1, d(2100, 1, 1)) not in got, (task.name, h)
            assert {(1, d(2100, 6, 1)), (1, d(2101, 1, 1)), (2, d(2100, 1, 1))} <= set(got), (task.name, h)
        if task.name == "onset_t2d":  # ACES's own loader gives the same rows
            assert aces_labels(task, root, [90])[90].equals(labels[90])
    text = (Path(load_task("t2d").path)).read_text().replace("min_history_events: 1", "min_history_events: 2")
    stricter = tmp_path / "t2d_2.yaml"
    stricter.write_text(text)
    got_stricter = set(
        cast(pl.DataFrame, pl.from_arrow(aces_labels(stricter, root, [90])[90]))
        .select("subject_id", "prediction_time")
        .rows()
    )
    # ACES counts a window's rows: subject 1's first visit has two (VISIT and LAB), subject 2's one.
    assert (2, d(2100, 1, 1)) not in got_stricter
    assert {(1, d(2100, 6, 1)), (1, d(2101, 1, 1))} <= got_stricter


def test_times_as_events_label_wear_period_ends_as_the_event_rules_do(federations: dict[str, Path]) -> None:
    """The modality ablation asks at wear-period ends, where the MEDS events have no event: ACES,
    triggered at every timed event, gives no row there. With times_as_events the times join the
    record as events, and the labels equal the event rules' (onset_labels_from_events) on the same
    record with those events added."""
    checked = positives = 0
    for scenario, sites_dir in federations.items():
        for site_root in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
            site = open_site(site_root)
            if not site.wearable_files:
                continue
            times = wear_period_end_times(site.read_wearables())
            events = _events(site_root)
            marks = pa.table(
                {
                    "subject_id": times["subject_id"],
                    "time": times["prediction_time"].cast(events.schema.field("time").type),
                    "code": pa.array([PREDICTION_TIME_CODE] * times.num_rows, pa.string()),
                }
            )
            with_marks = pa.concat_tables([events, marks])
            for name in TASK_NAMES:
                task = load_task(name)
                (plain,) = aces_labels_shared([task], site_root, prediction_times=times)
                (asked,) = aces_labels_shared([task], site_root, prediction_times=times, times_as_events=True)
                old_events, prefix = _old_events(with_marks, scenario, name)
                for h in task.horizons:
                    ref = _sorted(onset_labels_from_events(old_events, prefix, h, _with_history(times, events)))
                    assert _sorted(asked[h]).equals(ref), (scenario, site_root.name, name, h)
                    assert plain[h].num_rows < asked[h].num_rows  # without: only where an event falls
                    checked += asked[h].num_rows
                    positives += int(pc.sum(asked[h]["boolean_value"]).as_py() or 0)
    print(f"\n{checked} rows at wear-period ends, {positives} positive")
    assert checked > 0 and positives > 0
