"""Validating a site (healthfm_core.data.site_check): a valid site's summary, broken sites' problems."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import HELD, TRAIN, set_cell

from healthfm_core.data import site_check as site_check_module
from healthfm_core.data.layout import EPOCH_SECONDS, PRS_PREFIX
from healthfm_core.data.site_check import MAX_PROBLEMS_PER_KIND, SiteProblem, SiteReport, check_site


def retype(table: pa.Table, column: str, type_: pa.DataType) -> pa.Table:
    idx = table.schema.get_field_index(column)
    return table.set_column(idx, pa.field(column, type_), table.column(column).cast(type_))



# --------------------------------------------------------------------------------------------
# A valid site


def test_valid_site_is_accepted_with_the_right_summary(site_tables, write_site):
    root = write_site(site_tables)
    report = check_site(root)
    assert report.ok, [str(p) for p in report.problems]
    assert report.problems == []
    s = report.summary
    assert s is not None
    assert s.n_subjects == 3
    assert s.n_events == sum(t.num_rows for t in site_tables.shards.values())
    assert s.n_codes == 7
    # Years in the 2000s and 2100s (MIMIC-style shifts) are plain dates.
    assert s.time_min == datetime(2070, 7, 7)
    assert s.time_max == datetime(2150, 3, 1, 8) + timedelta(days=90)
    assert s.modalities == ["ehr", "wearables", "genomics"]
    # subject 3 has only PRS + MEDS_BIRTH: genomics, not EHR.
    assert s.subjects_per_modality == {"ehr": 2, "wearables": 2, "genomics": 2}
    assert s.n_wearable_epochs == site_tables.n_wear_epochs
    assert s.wearable_days == pytest.approx(site_tables.n_wear_epochs * EPOCH_SECONDS / 86400)
    assert s.prs_traits == ["CAD", "T2D"]
    assert s.splits == {"train": 2, "held_out": 1} and s.splits_from_file


def test_report_round_trips_through_json(site_tables, write_site):
    report = check_site(write_site(site_tables))
    again = SiteReport.model_validate_json(report.model_dump_json())
    assert again.summary == report.summary and again.ok


def test_modalities_follow_the_data(site_tables, write_site):
    # EHR only: drop PRS rows and wearables.
    for rel, t in site_tables.shards.items():
        site_tables.shards[rel] = t.filter(pc.invert(pc.starts_with(t.column("code"), PRS_PREFIX)))
    site_tables.wearables = {}
    report = check_site(write_site(site_tables))
    assert report.ok
    assert report.summary.modalities == ["ehr"]
    assert report.summary.subjects_per_modality == {"ehr": 2, "wearables": 0, "genomics": 0}
    assert report.summary.prs_traits == []


def test_problem_reads_as_one_line():
    p = SiteProblem(severity="error", file="data/0.parquet", column="time", row=3, subject_id=7,
                    value="2150-01-01T00:00:00", message="time goes backwards")
    line = str(p)
    assert "\n" not in line
    for part in ("ERROR", "data/0.parquet", "column time", "row 3", "subject 7", "'2150-01-01T00:00:00'",
                 "time goes backwards"):
        assert part in line


def test_meds_sample_datasets_are_accepted(meds_sample_sites):
    for name, root in meds_sample_sites.items():
        report = check_site(root)
        assert report.ok, (name, [str(p) for p in report.errors])
        # The samples list only some codes in codes.parquet: warnings by default, errors if strict.
        assert {p.kind for p in report.warnings} == {"unlisted_code"}
        assert report.summary.modalities == ["ehr"]
        assert report.summary.n_subjects == 6
        strict = check_site(root, strict=True)
        assert not strict.ok and {p.kind for p in strict.errors} == {"unlisted_code"}



# --------------------------------------------------------------------------------------------
# The corpus of broken sites: each must be rejected with the right problem.


@dataclass
class Broken:
    id: str
    mutate: Callable[[Any], None]
    kind: str
    file: str
    column: str | None = None
    row: int | None = None
    subject_id: int | None = None
    value: str | None = None  # substring of the reported value
    strict: bool = False


def _shard(fn: Callable[[pa.Table], pa.Table], rel: str = TRAIN) -> Callable[[Any], None]:
    def mutate(tables: Any) -> None:
        tables.shards[rel] = fn(tables.shards[rel])

    return mutate


def _wear(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Any], None]:
    def mutate(tables: Any) -> None:
        tables.wearables["0.parquet"] = fn(tables.wearables["0.parquet"])

    return mutate


def _swap_rows(t: pa.Table, i: int, j: int) -> pa.Table:
    order = list(range(t.num_rows))
    order[i], order[j] = order[j], order[i]
    return t.take(order)


def _move_subject_1_row_to_held_out(tables: Any) -> None:
    train = tables.shards[TRAIN]
    last = train.slice(6, 1)  # subject 1's last event
    tables.shards[TRAIN] = pa.concat_tables([train.slice(0, 6), train.slice(7)])
    tables.shards[HELD] = pa.concat_tables([tables.shards[HELD], last])


def _unreadable(tables: Any) -> None:
    tables.shards["train/1.parquet"] = None  # written as garbage below


def _empty_data(tables: Any) -> None:
    for rel in tables.shards:
        tables.shards[rel] = tables.shards[rel].slice(0, 0)
    tables.splits = tables.splits.slice(0, 0)
    tables.wearables = {}


def _no_data_dir(tables: Any) -> None:
    tables.shards = {}
    tables.splits = None
    tables.wearables = {}


def _drop_split_row(tables: Any) -> None:
    tables.splits = tables.splits.slice(0, 2)  # subject 3 in no split


def _split_unknown_subject(tables: Any) -> None:
    tables.splits = pa.concat_tables([tables.splits, pa.table({"subject_id": pa.array([99], pa.int64()),
                                                               "split": ["tuning"]})])


def _unlisted(tables: Any) -> None:
    tables.shards[TRAIN] = set_cell(tables.shards[TRAIN], "code", 9, "LAB//99999//mg/dL")


def _bad_dataset_json(tables: Any) -> None:
    tables.dataset = {"dataset_name": 42}


BROKEN = [
    Broken("missing column", _shard(lambda t: t.drop_columns(["code"])), "missing_column", "data/train/0.parquet",
           column="code"),
    Broken("wrong dtype numeric_value", _shard(lambda t: retype(t, "numeric_value", pa.float64())), "wrong_dtype",
           "data/train/0.parquet", column="numeric_value", value="double"),
    Broken("wrong dtype subject_id", _shard(lambda t: retype(t, "subject_id", pa.string()), HELD), "wrong_dtype",
           "data/held_out/0.parquet", column="subject_id", value="string"),
    Broken("wrong dtype time unit", _shard(lambda t: retype(t, "time", pa.timestamp("ms"))), "wrong_dtype",
           "data/train/0.parquet", column="time", value="timestamp[ms]"),
    Broken("null subject_id", _shard(lambda t: set_cell(t, "subject_id", 5, None)), "null_value",
           "data/train/0.parquet", column="subject_id", row=5, value="null"),
    Broken("null code", _shard(lambda t: set_cell(t, "code", 4, None)), "null_value", "data/train/0.parquet",
           column="code", row=4, subject_id=1),
    Broken("empty code", _shard(lambda t: set_cell(t, "code", 4, "  ")), "empty_code", "data/train/0.parquet",
           column="code", row=4, subject_id=1),
    Broken("unsorted times", _shard(lambda t: _swap_rows(t, 8, 10)), "unsorted_time", "data/train/0.parquet",
           column="time", row=9, subject_id=2, value="2150-03-04"),
    Broken("static row after timed", _shard(lambda t: _swap_rows(t, 1, 2)), "unsorted_time",
           "data/train/0.parquet", column="time", row=2, subject_id=1, value="null"),
    Broken("subject not contiguous", _shard(lambda t: _swap_rows(t, 6, 7)), "subject_not_contiguous",
           "data/train/0.parquet", column="subject_id", subject_id=1, row=7),
    Broken("subject split across shards", _move_subject_1_row_to_held_out, "subject_in_many_shards",
           "data/train/0.parquet", column="subject_id", subject_id=1),
    Broken("NaN value", _shard(lambda t: set_cell(t, "numeric_value", 4, float("nan"))), "non_finite_value",
           "data/train/0.parquet", column="numeric_value", row=4, subject_id=1, value="nan"),
    Broken("Inf value", _shard(lambda t: set_cell(t, "numeric_value", 9, float("-inf"))), "non_finite_value",
           "data/train/0.parquet", column="numeric_value", row=9, subject_id=2, value="-inf"),
    Broken("PRS without score", _shard(lambda t: set_cell(t, "numeric_value", 0, None), HELD), "prs_without_value",
           "data/held_out/0.parquet", column="numeric_value", row=0, subject_id=3, value="PRS//T2D"),
    Broken("unknown code (strict)", _unlisted, "unlisted_code", "data/train/0.parquet", column="code", row=9,
           subject_id=2, value="LAB//99999//mg/dL", strict=True),
    Broken("unreadable parquet", _unreadable, "unreadable", "data/train/1.parquet"),
    Broken("empty data", _empty_data, "empty_data", "data"),
    Broken("no data directory", _no_data_dir, "empty_data", "data"),
    Broken("splits miss a subject", _drop_split_row, "split_missing_subject", "metadata/subject_splits.parquet",
           column="subject_id", subject_id=3),
    Broken("splits name an unknown subject", _split_unknown_subject, "split_unknown_subject",
           "metadata/subject_splits.parquet", column="subject_id", row=3, subject_id=99),
    Broken("dataset.json off schema", _bad_dataset_json, "bad_dataset_metadata", "metadata/dataset.json",
           column="dataset_name"),
    Broken("epoch off the 30 s grid", _wear(lambda t: set_cell(t, "time", 3, t.column("time")[3].as_py()
                                                               + timedelta(seconds=7))),
           "off_grid", "wearables/0.parquet", column="time", row=3, subject_id=1, value="2150-03-02T00:01:37"),
    Broken("HR out of range", _wear(lambda t: set_cell(t, "hr_bpm", 10, 300.0)), "out_of_range",
           "wearables/0.parquet", column="hr_bpm", row=10, subject_id=1, value="300"),
    Broken("HR too low", _wear(lambda t: set_cell(t, "hr_bpm", 250, 5.0)), "out_of_range",
           "wearables/0.parquet", column="hr_bpm", row=250, subject_id=2, value="5"),
    Broken("negative ENMO", _wear(lambda t: set_cell(t, "enmo_mg", 11, -1.0)), "out_of_range",
           "wearables/0.parquet", column="enmo_mg", row=11, subject_id=1, value="-1"),
    Broken("NaN ENMO", _wear(lambda t: set_cell(t, "enmo_mg", 12, float("nan"))), "non_finite_value",
           "wearables/0.parquet", column="enmo_mg", row=12, subject_id=1, value="nan"),
    Broken("wearables wrong dtype", _wear(lambda t: retype(t, "enmo_mg", pa.float64())), "wrong_dtype",
           "wearables/0.parquet", column="enmo_mg", value="double"),
    Broken("wearables missing column", _wear(lambda t: t.drop_columns(["hr_bpm"])), "missing_column",
           "wearables/0.parquet", column="hr_bpm"),
]


def _write_broken(case: Broken, site_tables: Any, write_site: Callable) -> Path:
    case.mutate(site_tables)
    garbage = [rel for rel, t in site_tables.shards.items() if t is None]
    for rel in garbage:
        del site_tables.shards[rel]
    root = write_site(site_tables)
    for rel in garbage:
        (root / "data" / rel).write_bytes(b"PAR1 this is not a parquet file")
    return root


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_broken_site_is_rejected_with_the_right_problem(case: Broken, site_tables, write_site):
    root = _write_broken(case, site_tables, write_site)
    report = check_site(root, strict=case.strict)
    assert not report.ok
    assert report.summary is None
    matching = [p for p in report.errors if p.kind == case.kind]
    assert matching, f"no {case.kind} error; got {[str(p) for p in report.problems]}"
    p = matching[0]
    assert p.file == case.file
    assert p.message
    if case.column is not None:
        assert p.column == case.column
    if case.row is not None:
        assert p.row == case.row
    if case.subject_id is not None:
        assert p.subject_id == case.subject_id
    if case.value is not None:
        assert p.value is not None and case.value in p.value, p
    # The rest of the site is still fine: only problems of the kind under test are errors,
    # except where one fault implies another (an empty split table alongside empty data).
    assert {q.kind for q in report.errors} <= {case.kind, "split_missing_subject", "null_value", "empty_code"}


def test_unknown_code_is_a_warning_by_default(site_tables, write_site):
    _unlisted(site_tables)
    report = check_site(write_site(site_tables))
    assert report.ok and report.summary is not None
    (warning,) = report.warnings
    assert warning.kind == "unlisted_code" and warning.value == "LAB//99999//mg/dL" and warning.row == 9


def test_missing_code_metadata_is_a_warning_unless_strict(site_tables, write_site):
    site_tables.codes = None
    root = write_site(site_tables)
    assert check_site(root).ok
    assert [p.kind for p in check_site(root).warnings] == ["missing_metadata"]
    assert [p.kind for p in check_site(root, strict=True).errors] == ["missing_metadata"]


def test_nonexistent_root_is_one_problem(tmp_path):
    report = check_site(tmp_path / "nowhere")
    assert not report.ok and [p.kind for p in report.problems] == ["no_site_root"]


def test_repeated_problems_are_capped(site_tables, write_site):
    wear = site_tables.wearables["0.parquet"]
    hr = wear.column("hr_bpm").to_pylist()
    for i in range(20):
        hr[i] = 400.0
    site_tables.wearables["0.parquet"] = wear.set_column(3, "hr_bpm", pa.array(hr, pa.float32()))
    report = check_site(write_site(site_tables))
    hr_problems = [p for p in report.problems if p.kind == "out_of_range"]
    assert len(hr_problems) == MAX_PROBLEMS_PER_KIND + 1
    assert [p.row for p in hr_problems[:MAX_PROBLEMS_PER_KIND]] == list(range(MAX_PROBLEMS_PER_KIND))
    assert f"and {20 - MAX_PROBLEMS_PER_KIND} more" in hr_problems[-1].message


def test_rows_are_counted_across_record_batches(site_tables, write_site, monkeypatch):
    """Sorting, contiguity and row numbers hold across batch boundaries within a shard."""
    monkeypatch.setattr(site_check_module, "BATCH_ROWS", 3)
    root = write_site(site_tables)
    assert check_site(root).ok
    site_tables.shards[TRAIN] = _swap_rows(site_tables.shards[TRAIN], 5, 6)  # same time: still sorted
    site_tables.shards[TRAIN] = _swap_rows(site_tables.shards[TRAIN], 8, 10)
    report = check_site(write_site(site_tables))
    (p,) = report.errors
    assert (p.kind, p.row, p.subject_id) == ("unsorted_time", 9, 2)


def test_far_future_and_real_codes_are_valid(site_tables, write_site):
    t = site_tables.shards[TRAIN]
    times = t.column("time").to_pylist()
    times = [None if x is None else x.replace(year=x.year + 600) for x in times]  # year 2750
    site_tables.shards[TRAIN] = t.set_column(1, t.schema.field(1), pa.array(times, pa.timestamp("us")))
    report = check_site(write_site(site_tables))
    assert report.ok, [str(p) for p in report.problems]
    assert report.summary.time_max.year == 2750


def test_null_hr_is_allowed_and_text_value_is_optional(site_tables, write_site):
    t = site_tables.shards[HELD]
    site_tables.shards[HELD] = t.append_column(pa.field("text_value", pa.large_string()),
                                               pa.array(["genotyped on array v2", None], pa.large_string()))
    report = check_site(write_site(site_tables))
    assert report.ok
    assert math.isclose(report.summary.wearable_days, site_tables.n_wear_epochs * EPOCH_SECONDS / 86400)


def test_large_shard_in_bounded_batches_is_checked(site_tables, write_site):
    """A shard several batches long: every subject counted once, no false problems."""
    n_subj, per = 3000, 50
    sid = np.repeat(np.arange(10, 10 + n_subj, dtype=np.int64), per)
    base = np.datetime64("2150-01-01T00:00:00", "us").astype(np.int64)
    times = base + np.tile(np.arange(per, dtype=np.int64) * 3_600_000_000, n_subj)
    table = pa.table({
        "subject_id": sid,
        "time": pa.array(times, pa.timestamp("us")),
        "code": pa.array(np.where(np.arange(sid.size) % 2 == 0, "ICD10//I10", "LAB//51087//UNK").tolist()),
        "numeric_value": pa.array(np.ones(sid.size, np.float32)),
    })
    site_tables.shards = {TRAIN: table}
    site_tables.splits = None
    site_tables.wearables = {}
    root = write_site(site_tables)
    assert n_subj * per > site_check_module.BATCH_ROWS
    report = check_site(root, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    assert report.summary.n_subjects == n_subj and report.summary.n_events == n_subj * per
    assert sum(report.summary.splits.values()) == n_subj
