"""Site-supplied labels under SITE_ROOT/tasks/<name>/: read, validated, errors naming file, column, value."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from healthfm_core.data.checks.site_check import check_site
from healthfm_core.data.labels.site_labels import (
    SiteLabelError,
    check_site_labels,
    read_site_labels,
    site_tasks,
)
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sites.site import SiteDataError, open_site
from healthfm_core.eval.site_eval import task_labels_at_site
from healthfm_core.protocol import TaskReason

D = dt.datetime


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 2, 2],
            "time": [D(2110, 1, 1), D(2111, 1, 1), None, D(2112, 1, 1), D(2113, 6, 1)],
            "code": ["MEDS_BIRTH", "X", "GENDER//F", "X", "Y"],
            "numeric_value": pl.Series([None] * 5, dtype=pl.Float32),
        }
    ).write_parquet(tmp_path / "data" / "0.parquet")  # polars: large_string code, static row last
    return tmp_path


def _labels(root: Path, name: str, rel: str, **cols: list) -> Path:
    path = root / "tasks" / name / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(cols).write_parquet(path)
    return path


def test_valid_labels_across_nested_files(site: Path) -> None:
    _labels(
        site, "readmission", "held_out/0.parquet", subject_id=[1], prediction_time=[D(2110, 6, 1)], boolean_value=[True]
    )
    _labels(
        site,
        "readmission",
        "train/0.parquet",
        subject_id=[2, 2],
        prediction_time=[D(2112, 1, 1), D(2113, 6, 1)],
        boolean_value=[False, True],
    )
    assert site_tasks(site) == ["readmission"]
    assert check_site_labels(site, "readmission") == []
    table = read_site_labels(site, "readmission")
    assert table.num_rows == 3 and str(table.schema.field("prediction_time").type) == "timestamp[us]"


def test_errors_name_file_column_value(site: Path) -> None:
    bad = _labels(
        site,
        "t",
        "0.parquet",
        subject_id=[1, 7, 2],
        prediction_time=[D(2109, 1, 1), D(2112, 1, 1), D(2120, 1, 1)],
        boolean_value=[True, False, True],
    )
    issues = check_site_labels(site, "t")
    by_col = {(i.column, str(i.value)) for i in issues}
    assert ("subject_id", "7") in by_col
    assert ("prediction_time", "2109-01-01 00:00:00") in by_col  # before subject 1's first event
    assert ("prediction_time", "2120-01-01 00:00:00") in by_col  # after subject 2's last event
    assert all(i.file == bad for i in issues) and len(issues) == 3
    severity = {(i.column, str(i.value)): i.severity for i in issues}
    assert severity[("prediction_time", "2120-01-01 00:00:00")] == "warning"  # MEDS allows it
    assert severity[("prediction_time", "2109-01-01 00:00:00")] == "error"
    with pytest.raises(SiteLabelError, match=r"0\.parquet, column subject_id: not a subject of this site"):
        read_site_labels(site, "t")


def test_schema_errors(site: Path) -> None:
    _labels(site, "nolabel", "0.parquet", subject_id=[1], prediction_time=[D(2110, 6, 1)])
    _labels(site, "notime", "0.parquet", subject_id=[1], boolean_value=[True])
    _labels(site, "badtype", "0.parquet", subject_id=[1], prediction_time=["not a time"], boolean_value=[True])
    assert "no label column" in str(check_site_labels(site, "nolabel")[0])
    assert check_site_labels(site, "notime")[0].column == "prediction_time"
    issue = check_site_labels(site, "badtype")[0]
    assert issue.column == "prediction_time" and "meds.LabelSchema" in issue.message
    assert "no label files" in str(check_site_labels(site, "absent")[0])


def test_a_prediction_time_after_the_last_event_is_a_warning_and_the_labels_are_used(site: Path) -> None:
    """MEDS's LabelSchema allows any prediction time: an export's readmission labels at discharge
    lie after the subject's last event when the export ends there. The model sees all of it."""
    _labels(
        site,
        "readmit",
        "0.parquet",
        subject_id=[2, 2],
        prediction_time=[D(2112, 1, 1), D(2130, 1, 1)],
        boolean_value=[False, True],
    )
    (issue,) = check_site_labels(site, "readmit")
    assert issue.severity == "warning" and "after the subject's last event" in issue.message
    assert read_site_labels(site, "readmit").num_rows == 2
    report = check_site(site)
    (problem,) = [p for p in report.problems if p.kind == "site_labels_after_last_event"]
    assert problem.severity == "warning" and report.n_errors == 0, report.problems


@pytest.mark.parametrize(
    ("column", "values"),
    [("integer_value", [0, 3]), ("float_value", [0.5, 1.5]), ("categorical_value", ["low", "high"])],
)
def test_labels_that_are_not_binary_are_refused_with_the_reason(site: Path, column: str, values: list) -> None:
    path = _labels(
        site, "kind", "0.parquet", subject_id=[2, 2], prediction_time=[D(2112, 1, 1), D(2113, 6, 1)], **{column: values}
    )
    (issue,) = check_site_labels(site, "kind")
    assert issue.severity == "error" and issue.file == path and issue.column == column
    assert "site tasks are binary (boolean_value)" in issue.message
    with pytest.raises(SiteLabelError, match="binary"):
        read_site_labels(site, "kind")


def test_bad_label_files_refuse_their_task_not_the_site(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`check` fails on a bad label file, but the runtime opens the site: that task answers
    invalid_labels (its file named in the site's log), the good task keeps its labels."""
    _labels(
        site,
        "good",
        "0.parquet",
        subject_id=[1, 2],
        prediction_time=[D(2110, 6, 1), D(2112, 6, 1)],
        boolean_value=[True, False],
    )
    _labels(site, "floaty", "0.parquet", subject_id=[1], prediction_time=[D(2110, 6, 1)], float_value=[0.5])
    (site / "tasks" / "unreadable").mkdir()
    (site / "tasks" / "unreadable" / "0.parquet").write_bytes(b"PAR1 not parquet" * 8)
    report = check_site(site)
    assert not report.ok and {p.file for p in report.errors} == {"tasks/floaty/0.parquet", "tasks/unreadable/0.parquet"}
    assert report.summary is not None and report.summary.site_tasks == ["floaty", "good", "unreadable"]
    with caplog.at_level("ERROR"):
        opened = open_site(site)
        labels = task_labels_at_site(opened, resolve_tasks(["site:good", "site:floaty", "site:unreadable"]))
    assert labels["floaty"] == TaskReason(kind="invalid_labels") == labels["unreadable"]
    assert not isinstance(labels["good"], TaskReason) and labels["good"].num_rows == 2
    assert "tasks/floaty/0.parquet" in caplog.text and "tasks/unreadable/0.parquet" in caplog.text
    # An error in the data itself still refuses the site.
    (site / "data" / "0.parquet").write_bytes(b"PAR1 not parquet" * 8)
    with pytest.raises(SiteDataError, match="data/0.parquet"):
        open_site(site)
