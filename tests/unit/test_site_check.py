"""Validating a site (healthfm_core.data.checks.site_check): a valid site's summary, broken sites' problems."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers.parquet_footer import set_compressed_sizes, set_row_counts, set_value_counts
from helpers.site_tables import HELD, TRAIN, make_site_tables, set_cell, write_site_tables

from healthfm_core.data.checks import event_checks
from healthfm_core.data.checks.problem_log import MAX_PROBLEMS_PER_KIND, SiteProblem, SiteReport
from healthfm_core.data.checks.site_check import check_site
from healthfm_core.data.files.layout import EPOCH_SECONDS, PRS_PREFIX
from healthfm_core.data.files.parquet_guard import (
    MAX_ROWS_PER_BYTE,
    ROWS_ALWAYS_PLAUSIBLE,
    ParquetFooterError,
    open_parquet,
)
from healthfm_core.data.files.site_paths import OutsideRootError
from healthfm_core.data.sequences.wear_stream import site_patches
from healthfm_core.data.sites.site import Site, SiteDataError, open_site


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
    assert report.summary is not None
    assert report.summary.modalities == ["ehr"]
    assert report.summary.subjects_per_modality == {"ehr": 2, "wearables": 0, "genomics": 0}
    assert report.summary.prs_traits == []


def test_problem_reads_as_one_line():
    p = SiteProblem(
        severity="error",
        file="data/0.parquet",
        column="time",
        row=3,
        subject_id=7,
        value="2150-01-01T00:00:00",
        message="time goes backwards",
    )
    line = str(p)
    assert "\n" not in line
    for part in (
        "ERROR",
        "data/0.parquet",
        "column time",
        "row 3",
        "subject 7",
        "'2150-01-01T00:00:00'",
        "time goes backwards",
    ):
        assert part in line


def test_meds_sample_datasets_are_accepted(meds_sample_sites):
    for name, root in meds_sample_sites.items():
        report = check_site(root)
        assert report.ok, (name, [str(p) for p in report.errors])
        # The samples list only some codes in codes.parquet: warnings by default, errors if strict.
        assert {p.kind for p in report.warnings} == {"unlisted_code"}
        assert report.summary is not None
        assert report.summary.modalities == ["ehr"]
        assert report.summary.n_subjects == 6
        strict = check_site(root, strict=True)
        assert not strict.ok and {p.kind for p in strict.errors} == {"unlisted_code"}


# --------------------------------------------------------------------------------------------
# What MEDS 0.4 allows: each variation is accepted without a problem and read as the canonical site.


def _shard(fn: Callable[[pa.Table], pa.Table], rel: str = TRAIN) -> Callable[[Any], None]:
    def mutate(tables: Any) -> None:
        tables.shards[rel] = fn(tables.shards[rel])

    return mutate


def _static_last(t: pa.Table) -> pa.Table:
    """Each subject's static rows after its timed ones, as polars' sort (nulls last) leaves them."""
    sid = np.asarray(t.column("subject_id").to_numpy())
    static = np.asarray(t.column("time").is_null().to_numpy(zero_copy_only=False))
    return t.take(pa.array(np.lexsort((static, sid))))


def _static_middle(t: pa.Table) -> pa.Table:
    """Subject 1's second PRS row between its timed rows."""
    order = list(range(t.num_rows))
    order.insert(5, order.pop(1))
    return t.take(pa.array(order))


def _all_shards(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Any], None]:
    def mutate(tables: Any) -> None:
        tables.shards = {rel: fn(t) for rel, t in tables.shards.items()}

    return mutate


def _codes_as_polars_writes_them(tables: Any) -> None:
    tables.codes = retype(tables.codes, "code", pa.large_string())
    tables.splits = retype(retype(tables.splits, "split", pa.large_string()), "subject_id", pa.int32())


ALLOWED = {
    "static rows last": _all_shards(_static_last),
    "static row between timed rows": _shard(_static_middle),
    "code large_string": _all_shards(lambda t: retype(t, "code", pa.large_string())),
    "code categorical (dictionary)": _all_shards(
        lambda t: t.set_column(2, "code", t.column("code").dictionary_encode())
    ),
    "text_value string": _shard(lambda t: t.append_column("text_value", pa.array(["note"] * t.num_rows, pa.string()))),
    "text_value large_string": _shard(
        lambda t: t.append_column("text_value", pa.array(["note"] * t.num_rows, pa.large_string()))
    ),
    "numeric_value float64": _all_shards(lambda t: retype(t, "numeric_value", pa.float64())),
    "time timestamp[ms]": _all_shards(lambda t: retype(t, "time", pa.timestamp("ms"))),
    "time timestamp[ns]": _all_shards(lambda t: retype(t, "time", pa.timestamp("ns"))),
    "subject_id int32": _all_shards(lambda t: retype(t, "subject_id", pa.int32())),
    "extra string column": _shard(lambda t: t.append_column("unit", pa.array(["mg/dL"] * t.num_rows))),
    "metadata as polars writes it": _codes_as_polars_writes_them,
}


@pytest.mark.parametrize("mutate", list(ALLOWED.values()), ids=list(ALLOWED))
def test_what_meds_allows_is_accepted_and_read_as_the_canonical_site(mutate, site_tables, write_site, tmp_path):
    canonical = open_site(write_site_tables(make_site_tables(), tmp_path / "canonical"))
    mutate(site_tables)
    root = write_site(site_tables)
    report = check_site(root, strict=True)
    assert report.ok and report.problems == [], [str(p) for p in report.problems]
    assert report.summary == canonical.summary
    cols = ["subject_id", "time", "code", "numeric_value"]
    # The reader gives the pipeline the same rows in the same order: static rows first.
    assert open_site(root).read_events(columns=cols).equals(canonical.read_events(columns=cols))
    assert open_site(root).subject_splits().equals(canonical.subject_splits())


def test_a_site_written_by_polars_passes_and_reads_static_rows_first(site_tables, tmp_path):
    """polars' defaults: large_string code, float64 values, rows sorted with nulls (static) last."""
    root = write_site_tables(site_tables, tmp_path / "canonical")
    canonical = open_site(root)
    for rel, table in site_tables.shards.items():
        df = cast(pl.DataFrame, pl.from_arrow(table)).with_columns(pl.col("numeric_value").cast(pl.Float64))
        df.sort(["subject_id", "time"], nulls_last=True, maintain_order=True).write_parquet(root / "data" / rel)
    shard = pq.read_table(root / "data" / TRAIN)
    assert shard.schema.field("code").type == pa.large_string()
    assert shard.column("time").to_pylist().index(None) == 5  # subject 1's static rows come last
    report = check_site(root)
    assert report.ok and report.problems == [], [str(p) for p in report.problems]
    events = open_site(root).read_events()
    assert events.equals(canonical.read_events())
    assert events.column("time")[0].as_py() is None and events.schema.field("code").type == pa.string()


def test_hospital_scenario_sites_pass_check(tmp_path):
    """The hospital scenario writes sites as a polars MEDS export does (static rows last, large_string)."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.synthetic",
            str(tmp_path / "fed"),
            "--scenario",
            "hospital",
            "--seed",
            "0",
            "--n-subjects",
            "30",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    roots = sorted((tmp_path / "fed" / "sites").iterdir())
    assert roots
    for root in roots:
        assert pq.read_schema(root / "data" / "0.parquet").field("code").type == pa.large_string()
        report = check_site(root)
        assert report.ok, [str(p) for p in report.problems]
        assert report.summary is not None
        assert report.summary.modalities == ["ehr"] and report.summary.n_subjects == 30


# --------------------------------------------------------------------------------------------
# A number column that is not numeric_value: read by nothing, so a warning says so.


def test_a_value_column_that_is_not_numeric_value_is_warned_about(site_tables, write_site):
    t = site_tables.shards[TRAIN]
    t = t.filter(pc.invert(pc.starts_with(t.column("code"), PRS_PREFIX)))  # PRS rows need numeric_value
    values = t.column("numeric_value")
    site_tables.shards[TRAIN] = t.drop_columns(["numeric_value"]).append_column("value", values.cast(pa.float64()))
    n_values = values.length() - values.null_count
    report = check_site(write_site(site_tables))
    assert report.ok  # MEDS allows both an extra column and no numeric_value: a warning, not an error
    (w,) = report.warnings
    assert (w.kind, w.file, w.column) == ("unread_value_column", "data/train/0.parquet", "value")
    assert f"{n_values} non-null value(s) that are ignored" in w.message and "numeric_value" in w.message
    assert str(w).startswith("WARNING data/train/0.parquet, column value: ")


def test_integer_value_columns_are_warned_by_name_ids_are_not(site_tables, write_site):
    t = site_tables.shards[TRAIN]
    n = t.num_rows
    t = t.append_column("valuenum", pa.array(range(n), pa.int64()))
    t = t.append_column("hadm_id", pa.array(range(n), pa.int64()))  # an id: not a value
    t = t.append_column("ref_range_lower", pa.array([None] * (n - 1) + [4.0], pa.float64()))
    site_tables.shards[TRAIN] = t
    report = check_site(write_site(site_tables))
    assert report.ok
    got = {(w.column, w.message.split(" holds ")[1].split(" ")[0]) for w in report.warnings}
    assert got == {("valuenum", str(n)), ("ref_range_lower", "1")}


def test_a_column_declared_in_dataset_json_is_not_warned_about(site_tables, write_site):
    t = site_tables.shards[TRAIN]
    site_tables.shards[TRAIN] = t.append_column("cost", pa.array([1.5] * t.num_rows, pa.float64()))
    site_tables.dataset = {**site_tables.dataset, "other_extension_columns": ["cost"]}
    report = check_site(write_site(site_tables))
    assert report.ok and report.problems == []


# --------------------------------------------------------------------------------------------
# The true number of problems, whatever the lines cut.


def test_the_count_of_problems_is_true_when_lines_are_cut(site_tables, write_site):
    n_subj = 100
    rows = [
        (s, datetime(2150, 1, 1) + timedelta(days=d), "LAB//51087//UNK", float("nan") if d == 1 else 1.0)
        for s in range(10, 10 + n_subj)
        for d in range(3)
    ]
    cols = list(zip(*rows))
    site_tables.shards = {
        TRAIN: pa.table(
            {
                "subject_id": pa.array(cols[0], pa.int64()),
                "time": pa.array(cols[1], pa.timestamp("us")),
                "code": pa.array(cols[2], pa.string()),
                "numeric_value": pa.array(cols[3], pa.float32()),
            }
        )
    }
    site_tables.splits = None
    site_tables.wearables = {}
    report = check_site(write_site(site_tables))
    assert report.n_errors == n_subj and report.n_warnings == 0
    assert len(report.problems) == MAX_PROBLEMS_PER_KIND + 1
    assert report.n_not_shown == n_subj - MAX_PROBLEMS_PER_KIND
    more = report.problems[-1]
    assert more.cut and more.count == n_subj - MAX_PROBLEMS_PER_KIND


# --------------------------------------------------------------------------------------------
# The site's own task labels (SITE_ROOT/tasks/<task>/): validated by check.


def _own_labels(root: Path, subjects: list[int], times: list[datetime]) -> Path:
    path = root / "tasks" / "readmission" / "labels.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(subjects, pa.int64()),
                "prediction_time": pa.array(times, pa.timestamp("us")),
                "boolean_value": pa.array([True] * len(subjects)),
            }
        ),
        path,
    )
    return path


def test_site_labels_of_an_unknown_subject_are_an_error_naming_file_column_value(site_tables, write_site):
    root = write_site(site_tables)
    _own_labels(root, [1, 77], [datetime(2150, 3, 20), datetime(2150, 3, 20)])
    report = check_site(root)
    assert not report.ok
    (p,) = report.errors
    assert (p.kind, p.file, p.column, p.value) == (
        "bad_site_labels",
        "tasks/readmission/labels.parquet",
        "subject_id",
        "77",
    )
    assert str(p) == (
        "ERROR tasks/readmission/labels.parquet, column subject_id: not a subject of this site "
        "(1 row(s) with unknown subjects) (value '77')"
    )


def test_valid_site_labels_are_listed_in_the_summary(site_tables, write_site):
    root = write_site(site_tables)
    _own_labels(root, [1, 2], [datetime(2150, 3, 20), datetime(2150, 3, 20)])
    report = check_site(root)
    assert report.ok, [str(p) for p in report.problems]
    assert report.summary is not None
    assert report.summary.site_tasks == ["readmission"]


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
    tables.splits = pa.concat_tables(
        [tables.splits, pa.table({"subject_id": pa.array([99], pa.int64()), "split": ["tuning"]})]
    )


def _unlisted(tables: Any) -> None:
    tables.shards[TRAIN] = set_cell(tables.shards[TRAIN], "code", 9, "LAB//99999//mg/dL")


def _bad_dataset_json(tables: Any) -> None:
    tables.dataset = {"dataset_name": 42}


BROKEN = [
    Broken(
        "missing column",
        _shard(lambda t: t.drop_columns(["code"])),
        "missing_column",
        "data/train/0.parquet",
        column="code",
    ),
    # float64 numeric_value and timestamp[ms] time are read cast, as MEDS's align reads them (see
    # ALLOWED below); text where a number or time belongs is not guessed at.
    Broken(
        "wrong dtype numeric_value",
        _shard(lambda t: retype(t, "numeric_value", pa.string())),
        "wrong_dtype",
        "data/train/0.parquet",
        column="numeric_value",
        value="string",
    ),
    Broken(
        "wrong dtype subject_id",
        _shard(lambda t: retype(t, "subject_id", pa.string()), HELD),
        "wrong_dtype",
        "data/held_out/0.parquet",
        column="subject_id",
        value="string",
    ),
    Broken(
        "wrong dtype time as text",
        _shard(lambda t: retype(t, "time", pa.string())),
        "wrong_dtype",
        "data/train/0.parquet",
        column="time",
        value="string",
    ),
    Broken(
        "wrong dtype code",
        _shard(lambda t: t.set_column(2, "code", pa.array(range(t.num_rows), pa.int64()))),
        "wrong_dtype",
        "data/train/0.parquet",
        column="code",
        value="int64",
    ),
    Broken(
        "time with nanoseconds",
        _shard(
            lambda t: t.set_column(
                1, "time", pc.add(t.column("time").cast(pa.timestamp("ns")), pa.scalar(7, pa.duration("ns")))
            )
        ),
        "bad_value",
        "data/train/0.parquet",
        column="time",
        value="lose data",
    ),
    Broken(
        "subject_id beyond int64",
        _shard(
            lambda t: t.set_column(
                0, "subject_id", pa.array([2**63 + i for i in t.column("subject_id").to_pylist()], pa.uint64())
            ),
            HELD,
        ),
        "bad_value",
        "data/held_out/0.parquet",
        column="subject_id",
        value="9223372036854775811",
    ),
    Broken(
        "null subject_id",
        _shard(lambda t: set_cell(t, "subject_id", 5, None)),
        "null_value",
        "data/train/0.parquet",
        column="subject_id",
        row=5,
        value="null",
    ),
    Broken(
        "null code",
        _shard(lambda t: set_cell(t, "code", 4, None)),
        "null_value",
        "data/train/0.parquet",
        column="code",
        row=4,
        subject_id=1,
    ),
    Broken(
        "empty code",
        _shard(lambda t: set_cell(t, "code", 4, "  ")),
        "empty_code",
        "data/train/0.parquet",
        column="code",
        row=4,
        subject_id=1,
    ),
    Broken(
        "unsorted times",
        _shard(lambda t: _swap_rows(t, 8, 10)),
        "unsorted_time",
        "data/train/0.parquet",
        column="time",
        row=9,
        subject_id=2,
        value="2150-03-04",
    ),
    Broken(
        "timed row before a static row goes backwards",
        _shard(lambda t: _swap_rows(t, 2, 3)),
        "unsorted_time",
        "data/train/0.parquet",
        column="time",
        row=3,
        subject_id=1,
        value="2090-05-17",
    ),
    Broken(
        "subject not contiguous",
        _shard(lambda t: _swap_rows(t, 6, 7)),
        "subject_not_contiguous",
        "data/train/0.parquet",
        column="subject_id",
        subject_id=1,
        row=7,
    ),
    Broken(
        "subject split across shards",
        _move_subject_1_row_to_held_out,
        "subject_in_many_shards",
        "data/train/0.parquet",
        column="subject_id",
        subject_id=1,
    ),
    Broken(
        "NaN value",
        _shard(lambda t: set_cell(t, "numeric_value", 4, float("nan"))),
        "non_finite_value",
        "data/train/0.parquet",
        column="numeric_value",
        row=4,
        subject_id=1,
        value="nan",
    ),
    Broken(
        "Inf value",
        _shard(lambda t: set_cell(t, "numeric_value", 9, float("-inf"))),
        "non_finite_value",
        "data/train/0.parquet",
        column="numeric_value",
        row=9,
        subject_id=2,
        value="-inf",
    ),
    Broken(
        "PRS without score",
        _shard(lambda t: set_cell(t, "numeric_value", 0, None), HELD),
        "prs_without_value",
        "data/held_out/0.parquet",
        column="numeric_value",
        row=0,
        subject_id=3,
        value="PRS//T2D",
    ),
    Broken(
        "unknown code (strict)",
        _unlisted,
        "unlisted_code",
        "data/train/0.parquet",
        column="code",
        row=9,
        subject_id=2,
        value="LAB//99999//mg/dL",
        strict=True,
    ),
    Broken("unreadable parquet", _unreadable, "unreadable", "data/train/1.parquet"),
    Broken("empty data", _empty_data, "empty_data", "data"),
    Broken("no data directory", _no_data_dir, "empty_data", "data"),
    Broken(
        "splits miss a subject",
        _drop_split_row,
        "split_missing_subject",
        "metadata/subject_splits.parquet",
        column="subject_id",
        subject_id=3,
    ),
    Broken(
        "splits name an unknown subject",
        _split_unknown_subject,
        "split_unknown_subject",
        "metadata/subject_splits.parquet",
        column="subject_id",
        row=3,
        subject_id=99,
    ),
    Broken(
        "dataset.json off schema",
        _bad_dataset_json,
        "bad_dataset_metadata",
        "metadata/dataset.json",
        column="dataset_name",
    ),
    Broken(
        "epoch off the 30 s grid",
        _wear(lambda t: set_cell(t, "time", 3, t.column("time")[3].as_py() + timedelta(seconds=7))),
        "off_grid",
        "wearables/0.parquet",
        column="time",
        row=3,
        subject_id=1,
        value="2150-03-02T00:01:37",
    ),
    Broken(
        "HR out of range",
        _wear(lambda t: set_cell(t, "hr_bpm", 10, 300.0)),
        "out_of_range",
        "wearables/0.parquet",
        column="hr_bpm",
        row=10,
        subject_id=1,
        value="300",
    ),
    Broken(
        "HR too low",
        _wear(lambda t: set_cell(t, "hr_bpm", 250, 5.0)),
        "out_of_range",
        "wearables/0.parquet",
        column="hr_bpm",
        row=250,
        subject_id=2,
        value="5",
    ),
    Broken(
        "negative ENMO",
        _wear(lambda t: set_cell(t, "enmo_mg", 11, -1.0)),
        "out_of_range",
        "wearables/0.parquet",
        column="enmo_mg",
        row=11,
        subject_id=1,
        value="-1",
    ),
    Broken(
        "NaN ENMO",
        _wear(lambda t: set_cell(t, "enmo_mg", 12, float("nan"))),
        "non_finite_value",
        "wearables/0.parquet",
        column="enmo_mg",
        row=12,
        subject_id=1,
        value="nan",
    ),
    Broken(
        "wearables wrong dtype",
        _wear(lambda t: retype(t, "enmo_mg", pa.float64())),
        "wrong_dtype",
        "wearables/0.parquet",
        column="enmo_mg",
        value="double",
    ),
    Broken(
        "wearables missing column",
        _wear(lambda t: t.drop_columns(["hr_bpm"])),
        "missing_column",
        "wearables/0.parquet",
        column="hr_bpm",
    ),
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
    monkeypatch.setattr(event_checks, "BATCH_ROWS", 3)
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
    assert report.summary is not None
    assert report.summary.time_max is not None
    assert report.summary.time_max.year == 2750


def test_null_hr_is_allowed_and_text_value_is_optional(site_tables, write_site):
    t = site_tables.shards[HELD]
    site_tables.shards[HELD] = t.append_column(
        pa.field("text_value", pa.large_string()), pa.array(["genotyped on array v2", None], pa.large_string())
    )
    report = check_site(write_site(site_tables))
    assert report.ok
    assert report.summary is not None
    assert math.isclose(report.summary.wearable_days, site_tables.n_wear_epochs * EPOCH_SECONDS / 86400)


def test_large_shard_in_bounded_batches_is_checked(site_tables, write_site):
    """A shard several batches long: every subject counted once, no false problems."""
    n_subj, per = 3000, 50
    sid = np.repeat(np.arange(10, 10 + n_subj, dtype=np.int64), per)
    base = np.datetime64("2150-01-01T00:00:00", "us").astype(np.int64)
    times = base + np.tile(np.arange(per, dtype=np.int64) * 3_600_000_000, n_subj)
    table = pa.table(
        {
            "subject_id": sid,
            "time": pa.array(times, pa.timestamp("us")),
            "code": pa.array(np.where(np.arange(sid.size) % 2 == 0, "ICD10//I10", "LAB//51087//UNK").tolist()),
            "numeric_value": pa.array(np.ones(sid.size, np.float32)),
        }
    )
    site_tables.shards = {TRAIN: table}
    site_tables.splits = None
    site_tables.wearables = {}
    root = write_site(site_tables)
    assert n_subj * per > event_checks.BATCH_ROWS
    report = check_site(root, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    assert report.summary is not None
    assert report.summary.n_subjects == n_subj and report.summary.n_events == n_subj * per
    assert sum(report.summary.splits.values()) == n_subj


# --------------------------------------------------------------------------------------------
# Untrusted files (issue 26, break 8): forged parquet footers, links out of the site root, text
# that is not UTF-8. Each is refused by name before a reader allocates for it or reads it.

FORGED_ROWS = 5_000_000_000  # the footer of the break: 5e9 rows in one row group of a small shard


def _client_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "client/client.py", "check", str(root), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def _forge_rows_and_values(p: Path) -> None:
    set_row_counts(p, FORGED_ROWS)
    set_value_counts(p, FORGED_ROWS)


def _forge_twice_the_rows(p: Path) -> None:
    set_row_counts(p, 2 * pq.read_metadata(p).num_rows)
    set_value_counts(p, 22)


# The file of the site root, and what makes the footer lie: each must be refused naming the file.
FOOTER_CASES = {
    "data shard, 5e9 rows": (f"data/{TRAIN}", lambda p: set_row_counts(p, FORGED_ROWS)),
    "data shard, 5e9 rows and values": (
        f"data/{TRAIN}",
        _forge_rows_and_values,
    ),
    # Within every footer rule (2x the true rows, values agreeing): only decoding every row tells.
    "data shard, twice its rows": (
        f"data/{TRAIN}",
        _forge_twice_the_rows,
    ),
    "wearables, 5e9 rows": ("wearables/0.parquet", lambda p: set_row_counts(p, FORGED_ROWS)),
    "codes.parquet, 5e9 rows": ("metadata/codes.parquet", lambda p: set_row_counts(p, FORGED_ROWS)),
    "subject_splits.parquet, 5e9 rows": ("metadata/subject_splits.parquet", lambda p: set_row_counts(p, FORGED_ROWS)),
    "a column chunk beyond the file": (f"data/{HELD}", lambda p: set_compressed_sizes(p, 10**9)),
}


@pytest.mark.parametrize("case", list(FOOTER_CASES), ids=list(FOOTER_CASES))
def test_a_forged_parquet_footer_is_refused_naming_the_file(case: str, site_tables, write_site):
    rel, forge = FOOTER_CASES[case]
    root = write_site(site_tables)
    forge(root / rel)
    report = check_site(root)
    assert not report.ok
    named = [p for p in report.errors if p.file == rel and p.kind == "bad_footer"]
    assert named, [str(p) for p in report.problems]
    assert "footer" in named[0].message
    with pytest.raises(SiteDataError, match=rel):
        open_site(root)


@pytest.mark.slow  # CI's slow stage (Makefile SLOW_CI): the default suite's 6 minutes
def test_client_check_names_the_forged_shard_and_exits_1_not_an_internal_error(site_tables, write_site):
    """The break: `check` exited 3 "internal error: ArrowMemoryError: malloc of size 17179869184
    failed" without naming the file (its streaming pass read the true rows, then the coverage
    read allocated for the footer's 5e9)."""
    root = write_site(site_tables)
    set_row_counts(root / "data" / TRAIN, FORGED_ROWS)
    result = _client_check(root)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "internal error" not in result.stderr and "MemoryError" not in result.stdout + result.stderr
    line = next(s for s in result.stdout.splitlines() if s.startswith("ERROR"))
    assert f"data/{TRAIN}" in line and "5000000000" in line and "column subject_id" in line, line


def test_a_file_forged_after_the_site_opened_is_refused_by_its_reader_before_allocating(site_tables, write_site):
    """Every reader checks the footer (healthfm_core.data.files.parquet_guard): a shard replaced after
    open_site's check is refused by name, and Arrow's pool never grows by the footer's claim."""
    root = write_site(site_tables)
    site = open_site(root)
    for path in (root / "data" / TRAIN, root / "wearables" / "0.parquet"):
        set_row_counts(path, FORGED_ROWS)
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    with pytest.raises(ParquetFooterError, match=f"data/{TRAIN}.*row group 0, column subject_id"):
        site.read_events()
    with pytest.raises(ParquetFooterError, match="wearables/0.parquet"):
        site.read_wearables()
    with pytest.raises(ParquetFooterError, match="wearables/0.parquet"):
        site_patches(site, 8, normalisers=[])
    assert pool.max_memory() - before < 1 << 30  # today: 174 GB reserved, or ArrowMemoryError


def test_honest_parquet_files_pass_the_footer_rules(tmp_path):
    """The rules leave room for the most compressible honest file written for them: 2**21 rows of
    one subject with a constant value and nulls, one row group, zstd, by polars and by pyarrow."""
    n = 1 << 21
    table = pa.table(
        {
            "subject_id": pa.array(np.zeros(n, np.int64)),
            "time": pa.array(np.arange(n, dtype=np.int64) * 30_000_000, pa.timestamp("us")),
            "enmo_mg": pa.array(np.zeros(n, np.float32)),
            "hr_bpm": pa.nulls(n, pa.float32()),
        }
    )
    written = []
    for name, write in {
        "polars": lambda p, t: cast(pl.DataFrame, pl.from_arrow(t)).write_parquet(
            p, compression="zstd", row_group_size=n
        ),
        "pyarrow": lambda p, t: pq.write_table(t, p, compression="zstd", row_group_size=n),
    }.items():
        for columns in (table.column_names, ["subject_id", "enmo_mg", "hr_bpm"]):
            path = tmp_path / f"{name}-{len(columns)}.parquet"
            write(path, table.select(columns))
            open_parquet(path)  # raises if refused
            written.append(path.stat().st_size)
    densest = n / min(written)  # rows per byte: about 550 (polars, without the time column)
    assert 100 < densest < MAX_ROWS_PER_BYTE / 4  # a margin of 4 or more over the densest honest file
    assert n > ROWS_ALWAYS_PLAUSIBLE  # judged by the density rule, not let through by its floor


def _other_site(tmp_path: Path) -> Path:
    return write_site_tables(make_site_tables(), tmp_path / "other-site")


@pytest.mark.parametrize("link", ["data/x.parquet", "data/more", "data", "wearables/w.parquet", "metadata"])
def test_a_symlink_out_of_the_site_root_is_refused_naming_link_and_target(link: str, site_tables, tmp_path):
    """The break: data/x.parquet linked to another site's shard was followed silently (check: OK,
    its subjects counted). Files and folders linked out are refused, by check and by open_site."""
    root = write_site_tables(site_tables, tmp_path / "site")
    other = _other_site(tmp_path)
    if link == "data":
        (root / "data").rename(tmp_path / "moved-data")
        target = tmp_path / "moved-data"
    elif link == "metadata":
        (root / "metadata").rename(tmp_path / "moved-metadata")
        target = tmp_path / "moved-metadata"
    else:
        target = {
            "data/x.parquet": other / "data" / TRAIN,
            "data/more": other / "data",
            "wearables/w.parquet": other / "wearables" / "0.parquet",
        }[link]
    (root / link).symlink_to(target)
    report = check_site(root)
    assert not report.ok
    refused = [p for p in report.errors if p.kind == "link_outside_root"]
    assert [p.file for p in refused] == [link], [str(p) for p in report.problems]
    assert str(target.resolve()) in str(refused[0])
    assert "out of the site root" in refused[0].message
    with pytest.raises(SiteDataError, match=link):
        open_site(root)
    if link == "data/x.parquet":  # the break, as a site admin runs it
        result = _client_check(root)
        assert result.returncode == 1 and f"ERROR {link}:" in result.stdout and str(target.resolve()) in result.stdout


def test_a_link_added_after_the_site_opened_is_refused_by_its_readers(site_tables, tmp_path):
    root = write_site_tables(site_tables, tmp_path / "site")
    other = _other_site(tmp_path)
    site = open_site(root)
    (root / "data" / "x.parquet").symlink_to(other / "data" / TRAIN)
    with pytest.raises(OutsideRootError, match=f"data/x.parquet: a symbolic link to {other / 'data' / TRAIN}"):
        Site(root, site.report, site.subject_ids, site._modality_subjects)
    (root / "metadata" / "codes.parquet").unlink()
    (root / "metadata" / "codes.parquet").symlink_to(other / "metadata" / "codes.parquet")
    with pytest.raises(OutsideRootError, match="metadata/codes.parquet"):
        site.code_metadata()


def test_symlinks_that_stay_inside_the_site_root_are_followed(site_tables, tmp_path):
    root = write_site_tables(site_tables, tmp_path / "site")
    (root / "export").mkdir()
    (root / "data" / "held_out").rename(root / "export" / "held_out")
    (root / "data" / "held_out").symlink_to(Path("..") / "export" / "held_out")  # a folder, relative
    (root / "data" / "train" / "0.parquet").rename(root / "export" / "train0.parquet")
    (root / "data" / "train" / "0.parquet").symlink_to(root / "export" / "train0.parquet")  # a file
    (root / "data" / "train" / "again").symlink_to(root / "data" / "train")  # a loop: each file once
    report = check_site(root)
    assert report.ok, [str(p) for p in report.problems]
    assert report.summary is not None
    assert report.summary.n_subjects == 3
    linked_root = tmp_path / "linked-root"  # the root itself may be a link
    linked_root.symlink_to(root)
    assert check_site(linked_root).ok
    assert open_site(linked_root).read_events().num_rows == report.summary.n_events


def test_site_labels_linked_out_of_the_root_are_refused(site_tables, tmp_path):
    root = write_site_tables(site_tables, tmp_path / "site")
    elsewhere = tmp_path / "labels"
    elsewhere.mkdir()
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([1], pa.int64()),
                "prediction_time": pa.array([datetime(2150, 3, 20)], pa.timestamp("us")),
                "boolean_value": [True],
            }
        ),
        elsewhere / "0.parquet",
    )
    (root / "tasks").mkdir()
    (root / "tasks" / "readmission").symlink_to(elsewhere)
    report = check_site(root)
    bad = [p for p in report.errors if p.kind == "bad_site_labels"]
    assert bad and bad[0].file == "tasks/readmission" and f"symbolic link to {elsewhere}" in bad[0].message


def _with_bytes(table: pa.Table, column: str, row: int, raw: bytes) -> pa.Table:
    """`table` with one text value replaced by bytes that are not UTF-8 (pyarrow writes them as they are)."""
    values = [v.encode() if v is not None else None for v in table.column(column).to_pylist()]
    values[row] = raw
    idx = table.schema.get_field_index(column)
    return table.set_column(idx, table.schema.field(idx), pa.array(values, pa.binary()).view(pa.string()))


def test_a_code_that_is_not_utf8_is_named_by_file_column_and_row(site_tables, write_site):
    """The break: `cannot read rows after row 0: UnicodeDecodeError` named the file, not the row."""
    site_tables.shards[TRAIN] = _with_bytes(site_tables.shards[TRAIN], "code", 4, b"LAB//\xff\xfe//UNK")
    root = write_site(site_tables)
    report = check_site(root)
    assert not report.ok
    assert [(p.file, p.column, p.row, p.subject_id, p.kind) for p in report.problems] == [
        (f"data/{TRAIN}", "code", 4, 1, "not_utf8")
    ], [str(p) for p in report.problems]
    assert report.problems[0].value == "b'LAB//\\xff\\xfe//UNK'"


def test_a_dictionary_encoded_code_that_is_not_utf8_is_named_by_row(site_tables, write_site):
    table = _with_bytes(site_tables.shards[TRAIN], "code", 6, b"\xc3(")
    site_tables.shards[TRAIN] = table.set_column(
        table.schema.get_field_index("code"), "code", table.column("code").dictionary_encode()
    )
    report = check_site(write_site(site_tables))
    assert [(p.column, p.row, p.kind) for p in report.errors] == [("code", 6, "not_utf8")], [
        str(p) for p in report.problems
    ]


@pytest.mark.parametrize(
    ("rel", "column", "row"), [("codes.parquet", "code", 2), ("subject_splits.parquet", "split", 1)]
)
def test_metadata_text_that_is_not_utf8_is_named_by_row(rel: str, column: str, row: int, site_tables, write_site):
    """codes.parquet with such a code made check_site raise UnicodeDecodeError (an internal error)."""
    if rel == "codes.parquet":
        site_tables.codes = _with_bytes(site_tables.codes, column, row, b"MEDS_\xffBIRTH")
    else:
        site_tables.splits = _with_bytes(site_tables.splits, column, row, b"tr\xe9in")
    report = check_site(write_site(site_tables))  # never raises
    assert not report.ok
    assert (f"metadata/{rel}", column, row, "not_utf8") in [(p.file, p.column, p.row, p.kind) for p in report.errors]
