"""`python client/client.py check SITE_ROOT [--json] [--strict]`, the site admin's command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import client.client as client_module
from client.client import EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from healthfm_core.data.checks.problem_log import MAX_PROBLEMS_PER_KIND, SiteReport
from healthfm_core.data.checks.site_check import check_site
from healthfm_core.data.labels.aces_tasks import aces_labels, load_task
from healthfm_core.data.labels.tasks import _draw_key, onset_labels_from_events
from healthfm_core.data.sites.site import open_site
from healthfm_core.terms.site_layout import SPLITS
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "client" / "client.py"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )  # a safety net against a hang, not a speed limit


def test_script_accepts_a_valid_site_with_a_readable_summary(site_tables, write_site, tmp_path):
    root = write_site(site_tables)
    # From another directory, as a site admin would run it.
    result = run_cli("check", str(root), cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    for line in (
        "subjects        3",
        "codes           7",
        "2070-07-07 .. 2150-05-30",
        "ehr (2 subjects), wearables (2 subjects), genomics (2 subjects)",
        "wearable days   0.2 (480 epochs)",
        "PRS traits      CAD, T2D",
        "held_out 1, train 2",
    ):
        assert line in out, (line, out)
    assert out.strip().splitlines()[-1].startswith("OK")


@pytest.mark.slow  # CI's slow stage (Makefile SLOW_CI): the default suite's 6 minutes
def test_script_accepts_the_meds_sample_datasets(meds_sample_sites):
    for name, root in meds_sample_sites.items():
        result = run_cli("check", str(root))
        assert result.returncode == EXIT_OK, (name, result.stdout, result.stderr)
        assert "subjects        6" in result.stdout
        # Their codes.parquet lists only some codes: reported, not fatal.
        assert "WARNING" in result.stdout and "not listed in metadata/codes.parquet" in result.stdout


# In this process: the script's own run (exit code, output streams, from another directory) is
# test_script_accepts_a_valid_site_with_a_readable_summary's and test_script_on_a_missing_root_is_one_line_exit_2's.
def test_strict_rejects_unlisted_codes(meds_sample_sites, capsys):
    root = next(iter(meds_sample_sites.values()))
    assert main(["check", str(root), "--strict"]) == EXIT_INVALID
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("ERROR ") for line in lines)
    assert "Traceback" not in err


def test_a_broken_site_is_rejected_one_line_per_problem(site_tables, write_site, capsys):
    t = site_tables.shards["train/0.parquet"]
    values = t.column("numeric_value").to_pylist()
    values[4] = float("nan")
    site_tables.shards["train/0.parquet"] = t.set_column(3, "numeric_value", pa.array(values, pa.float32()))
    site_tables.splits = site_tables.splits.slice(0, 2)
    root = write_site(site_tables)
    assert main(["check", str(root)]) == EXIT_INVALID
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert any(
        "data/train/0.parquet, column numeric_value, row 4, subject 1" in line and "'nan'" in line for line in lines
    )
    assert any("metadata/subject_splits.parquet" in line and "subject 3" in line for line in lines)
    assert "FAILED: 2 error(s)" in err


def test_script_on_a_missing_root_is_one_line_exit_2(tmp_path):
    result = run_cli("check", str(tmp_path / "no_such_site"))
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr


def test_json_output_is_the_site_report(site_tables, write_site, capsys):
    root = write_site(site_tables)
    assert main(["check", str(root), "--json", "--no-progress"]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    coverage = blob.pop("history_coverage")
    report = SiteReport.model_validate(blob)
    assert report.ok and report == check_site(root)
    assert report.summary is not None
    assert report.summary.subjects_per_modality == {"ehr": 2, "wearables": 2, "genomics": 2}
    # Days of history the model sees: every record fits in 256 day-tokens of this small site...
    assert coverage["max_tokens"] == 256 and coverage["fraction_full_history"] == 1.0
    assert coverage["median_days"] == coverage["median_history_days"] > 0
    # ...and one token shows a single day of it.
    assert main(["check", str(root), "--json", "--no-progress", "--max-tokens", "1"]) == EXIT_OK
    narrow = json.loads(capsys.readouterr().out)["history_coverage"]
    assert narrow["median_days"] <= 1.0 < coverage["median_days"] and narrow["fraction_full_history"] < 1.0


def test_json_output_of_a_broken_site(site_tables, write_site, capsys):
    site_tables.shards["train/0.parquet"] = site_tables.shards["train/0.parquet"].drop_columns(["time"])
    root = write_site(site_tables)
    assert main(["check", str(root), "--json"]) == EXIT_INVALID
    blob = json.loads(capsys.readouterr().out)
    assert blob["ok"] is False and blob["summary"] is None and blob["n_errors"] == 1
    (problem,) = blob["problems"]
    assert (problem["file"], problem["column"], problem["kind"]) == ("data/train/0.parquet", "time", "missing_column")


def test_usage_errors_exit_2(capsys):
    assert main([]) == EXIT_USAGE
    assert main(["check"]) == EXIT_USAGE
    assert main(["frobnicate", "x"]) == EXIT_USAGE


def test_an_internal_failure_is_one_line_not_a_traceback(site_tables, write_site, capsys, monkeypatch):
    """Fault injection at the CLI boundary: whatever breaks inside, the admin sees one line."""

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client_module, "run_check", explode)
    assert main(["check", str(write_site(site_tables))]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.strip() == "internal error: RuntimeError: disk on fire (rerun with --debug for details)"


def test_every_generated_synthetic_site_passes_check(tmp_path):
    synthetic = pytest.importorskip("simulations.synthetic")
    if not hasattr(synthetic, "generate_federation"):
        pytest.skip("simulations.synthetic.generate_federation not there yet")
    synthetic.generate_federation(tmp_path / "fed", scenario="default", seed=0, n_subjects=30)
    sites = sorted(p for p in (tmp_path / "fed" / "sites").iterdir() if p.is_dir())
    assert len(sites) >= 4
    seen_modalities: set[str] = set()
    for root in sites:
        report = check_site(root, strict=True)
        assert report.ok, (root.name, [str(p) for p in report.problems])
        assert report.summary is not None
        seen_modalities.update(report.summary.modalities)
        assert main(["check", str(root), "--no-progress"]) == EXIT_OK
    assert seen_modalities == {"ehr", "wearables", "genomics"}
    # Ground truth lives outside every site root.
    assert not any((root / "truth").exists() for root in sites)


# --------------------------------------------------------------------------------------------
# True counts, MEDS variations and value columns, as the site admin reads them.


def test_the_true_number_of_problems_is_printed_with_the_lines_not_shown(site_tables, write_site, capsys):
    n = 100
    rows = [
        (s, datetime(2150, 1, 1) + timedelta(days=d), "LAB//51087//UNK", float("nan") if d == 1 else 1.0)
        for s in range(10, 10 + n)
        for d in range(3)
    ]
    cols = list(zip(*rows))
    site_tables.shards = {
        "train/0.parquet": pa.table(
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
    assert main(["check", str(write_site(site_tables))]) == EXIT_INVALID
    result = capsys.readouterr()
    lines = result.out.strip().splitlines()
    assert len(lines) == MAX_PROBLEMS_PER_KIND + 1
    assert lines[-1] == (
        "ERROR data/train/0.parquet, column numeric_value: and 95 more problem(s) of this kind (non_finite_value)"
    )
    assert result.err.strip() == (
        "FAILED: 100 error(s), 0 warning(s); 95 without a line of their own "
        f"(at most {MAX_PROBLEMS_PER_KIND} lines per kind and file)"
    )


def test_a_polars_export_with_static_rows_last_passes(site_tables, write_site, capsys):
    root = write_site(site_tables)
    for rel, table in site_tables.shards.items():
        cast(pl.DataFrame, pl.from_arrow(table)).sort(
            ["subject_id", "time"], nulls_last=True, maintain_order=True
        ).write_parquet(root / "data" / rel)
    assert main(["check", str(root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ERROR" not in out and "WARNING" not in out
    assert out.strip().splitlines()[-1] == "OK: site is usable (0 warning(s))"


def test_a_value_column_is_a_warning_line_naming_file_column_and_count(site_tables, write_site, capsys):
    t = site_tables.shards["held_out/0.parquet"]
    site_tables.shards["held_out/0.parquet"] = t.append_column("valuenum", pa.array([1.0, 2.0], pa.float64()))
    assert main(["check", str(write_site(site_tables))]) == EXIT_OK
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("WARNING")]
    assert line.startswith(
        "WARNING data/held_out/0.parquet, column valuenum: column 'valuenum' (double) holds "
        "2 non-null value(s) that are ignored"
    )


# --------------------------------------------------------------------------------------------
# check --tasks: rows, subjects and positives per split of each task and horizon.

T2D = REPO / "configs" / "tasks" / "t2d.yaml"


@pytest.fixture(scope="module")
def hospital_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hospital")
    generate_federation(out, "hospital", seed=0, n_subjects=60, progress=False)
    return out / "sites" / "general_hospital"


def _first_four_draws(rows: pa.Table, held_out: set[int]) -> pa.Table:
    """The evaluation's cap by hand: per subject, the 4 rows of smallest draw key (seed 0); every
    row of a held_out subject."""
    sid = rows["subject_id"].to_numpy()
    t = rows["prediction_time"].cast(pa.int64()).to_numpy()
    key = _draw_key(sid, t, 0)
    keep = [
        i
        for s in np.unique(sid)
        for i in sorted(np.flatnonzero(sid == s), key=lambda i: int(key[i]))[: None if int(s) in held_out else 4]
    ]
    return rows.take(pa.array(sorted(keep), pa.int64()))


def _expected_t2d_counts(root: Path, evaluated: bool = False) -> dict[int, dict[str, tuple[int, int, int]]]:
    """By onset_labels_from_events (the task's ICD-9 and ICD-10 outcome codes renamed to one code)
    at every clinical event after the subject's first (never at birth or death), split by the
    site's splits: every row, or (`evaluated`) what the evaluation takes: at most 4 rows a subject
    in train and tuning, held_out whole."""
    events = pa.concat_tables(
        pq.read_table(p, columns=["subject_id", "time", "code"]) for p in sorted((root / "data").glob("*.parquet"))
    )
    events = events.set_column(2, "code", events["code"].cast(pa.string()))
    regex = load_task(T2D).config["predicates"]["outcome"]["code"]["regex"]
    events = events.set_column(
        2, "code", pc.if_else(pc.match_substring_regex(events["code"], regex), pa.scalar("OUTCOME"), events["code"])
    )
    events = cast(pl.DataFrame, pl.from_arrow(events)).sort("subject_id", "time", nulls_last=False).to_arrow()
    # ACES's rows: the onset rules asked at every clinical event with one before it (the task's
    # trigger, clinical_event, and its history window)
    clinical = cast(pl.DataFrame, pl.from_arrow(events)).filter(
        pl.col("time").is_not_null() & ~pl.col("code").is_in(["MEDS_BIRTH", "MEDS_DEATH"])
    )
    every_event = (
        clinical.filter(pl.col("time") > pl.col("time").min().over("subject_id"))
        .select("subject_id", pl.col("time").alias("prediction_time"))
        .unique()
        .to_arrow()
    )
    site = open_site(root)
    splits = cast(pl.DataFrame, pl.from_arrow(site.subject_splits()))
    held_out = set(site.held_out_subjects().tolist())
    out = {}
    horizons = load_task(T2D).metadata.horizons_days
    assert horizons is not None
    for h in horizons:
        rows = onset_labels_from_events(events, "OUTCOME", h, every_event)
        if evaluated:
            rows = _first_four_draws(rows, held_out)
        df = cast(pl.DataFrame, pl.from_arrow(rows)).join(splits, on="subject_id")
        out[h] = {
            s: (g.height, g["subject_id"].n_unique(), int(g["boolean_value"].sum()))
            for s in SPLITS
            for g in [df.filter(pl.col("split") == s)]
        }
    return out


def test_tasks_counts_are_those_the_evaluation_would_see(hospital_site, capsys):
    assert main(["check", str(hospital_site), "--tasks", str(T2D), "--json", "--no-progress"]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    assert blob["ok"] and blob["tasks"]["min_subjects"] == 20
    for key, evaluated in (("splits", False), ("evaluated", True)):
        got = {
            t["horizon_days"]: {s: (c["rows"], c["subjects"], c["positives"]) for s, c in t[key].items()}
            for t in blob["tasks"]["tasks"]
        }
        expected = _expected_t2d_counts(hospital_site, evaluated)
        assert got == expected, key
        assert sum(v[2] for per in expected.values() for v in per.values()) > 0  # positives were seen
    # held_out: every labelled row in both; train: the cap drops rows
    full, taken = _expected_t2d_counts(hospital_site), _expected_t2d_counts(hospital_site, True)
    assert all(full[h]["held_out"] == taken[h]["held_out"] for h in full)
    assert any(full[h]["train"][0] > taken[h]["train"][0] for h in full)
    assert {t["task"] for t in blob["tasks"]["tasks"]} == {"onset_t2d"}


def test_tasks_table_and_a_warning_per_split_below_the_minimum(hospital_site, capsys):
    assert main(["check", str(hospital_site), "--tasks", str(T2D), "--no-progress"]) == EXIT_OK
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("  task ")]
    assert [re.split(r"\s{2,}", line.strip()) for line in header] == [["task", *SPLITS]] * 2
    # The first table: every labelled row; the second (after the "evaluated" line): what the evaluation takes.
    first, second = out.split("\nevaluated ", 1)
    assert "train and tuning up to 4 rows per subject" in second and "held_out every labelled row" in second
    for block, evaluated in ((first, False), (second, True)):
        expected = _expected_t2d_counts(hospital_site, evaluated)
        rows = {
            line.split()[1]: re.split(r"\s{2,}", line.strip())
            for line in block.splitlines()
            if line.startswith("  onset_t2d ")
        }
        assert sorted(rows) == ["180d", "30d", "365d", "90d"]
        for h, per in expected.items():
            assert rows[f"{h}d"] == [f"onset_t2d {h}d", *(" / ".join(map(str, per[s])) for s in SPLITS)]
    tuning = expected[365]["tuning"][1]
    assert tuning < 20
    warn = [line for line in out.splitlines() if line.startswith(f"WARNING {T2D}: onset_t2d 365d:")]
    assert len(warn) == 1 and (
        f"below the minimum 20 (min_report_subjects; small cells re-identify patients): tuning {tuning}" in warn[0]
    )
    assert out.strip().splitlines()[-1].startswith("OK: site is usable (")


def test_tasks_minimum_from_the_flag_and_the_policy(hospital_site, tmp_path, capsys):
    assert main(["check", str(hospital_site), "--tasks", str(T2D), "--json", "--min-subjects", "1"]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    below = [p for p in blob["tasks"]["problems"] if "(min_report_subjects; " in p["message"]]
    assert blob["tasks"]["min_subjects"] == 1 and below == []
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 35\n")
    assert (
        main(
            ["check", str(hospital_site), "--tasks", str(T2D), "--json", "--min-subjects", "1", "--policy", str(policy)]
        )
        == EXIT_OK
    )
    blob = json.loads(capsys.readouterr().out)
    assert blob["tasks"]["min_subjects"] == 35
    assert blob["tasks"]["problems"]
    assert all("below the minimum 35 (min_report_subjects; " in p["message"] for p in blob["tasks"]["problems"])


def test_tasks_from_a_directory_and_bad_arguments(hospital_site, tmp_path, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t2d.yaml").write_text(T2D.read_text())
    (folder / "README.md").write_text("not a task")
    assert main(["check", str(hospital_site), "--tasks", str(folder), "--json"]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    assert [t["horizon_days"] for t in blob["tasks"]["tasks"]] == [30, 90, 180, 365]
    assert main(["check", str(hospital_site), "--tasks", str(tmp_path / "nope.yaml")]) == EXIT_USAGE
    assert "nope.yaml: no such file or directory" in capsys.readouterr().err
    (folder / "broken.yaml").write_text("metadata: {horizons_days: [30]}\npredicates: {}\n")
    assert main(["check", str(hospital_site), "--tasks", str(folder / "broken.yaml")]) == EXIT_INVALID
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if x.startswith("ERROR")]
    assert line.startswith(f"ERROR {folder / 'broken.yaml'}: ") and "metadata" in line
    assert captured.err.startswith("FAILED: 1 error(s)")


def _write_labels(root: Path, task: str, subjects: list[int], times: list[datetime], values: list[bool]) -> Path:
    path = root / "tasks" / task / "0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(subjects, pa.int64()),
                "prediction_time": pa.array(times, pa.timestamp("us")),
                "boolean_value": pa.array(values),
            }
        ),
        path,
    )
    return path


def test_site_labels_are_counted(site_tables, write_site, capsys):
    root = write_site(site_tables)
    when = datetime(2150, 3, 20)
    _write_labels(root, "readmission", [1, 1, 2], [when, when + timedelta(days=1), when], [True, False, False])
    assert main(["check", str(root), "--json", "--min-subjects", "2"]) == EXIT_OK
    (task,) = json.loads(capsys.readouterr().out)["tasks"]["tasks"]
    assert (task["task"], task["source"], task["file"], task["horizon_days"]) == (
        "readmission",
        "site",
        "tasks/readmission",
        None,
    )
    assert task["splits"]["train"] == {
        "rows": 3,
        "subjects": 2,
        "positives": 1,
        "positive_subjects": 1,
        "negative_subjects": 2,
    }
    assert task["splits"]["held_out"] == {
        "rows": 0,
        "subjects": 0,
        "positives": 0,
        "positive_subjects": 0,
        "negative_subjects": 0,
    }
    assert main(["check", str(root), "--min-subjects", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "readmission (site labels)  3 / 2 / 1" in out
    assert (
        "WARNING tasks/readmission: readmission: no metric would leave the site: subjects per split below the "
        "minimum 2 (min_report_subjects; small cells re-identify patients): tuning 0, held_out 0"
    ) in out


def test_site_labels_of_an_unknown_subject_fail_check_with_one_line(site_tables, write_site, capsys):
    root = write_site(site_tables)
    when = datetime(2150, 3, 20)
    _write_labels(root, "readmission", [1, 404], [when, when], [True, False])
    assert main(["check", str(root)]) == EXIT_INVALID
    result = capsys.readouterr()
    assert result.out.strip().splitlines() == [
        "ERROR tasks/readmission/0.parquet, column subject_id: not a subject of this site "
        "(1 row(s) with unknown subjects) (value '404')"
    ]
    assert result.err.strip() == "FAILED: 1 error(s), 0 warning(s)"


def test_tasks_minimum_of_positives_from_the_flag_and_the_policy(hospital_site, tmp_path, capsys):
    """A held_out split with fewer subjects with a positive (or a negative) row than
    min_report_positives: the warning names the key, its value and what it protects; the policy's
    min_positives raises it."""
    root = tmp_path / "site"
    shutil.copytree(hospital_site, root)
    events = pl.read_parquet(root / "data" / "*.parquet").filter(pl.col("time").is_not_null())
    first = events.group_by("subject_id").agg(pl.col("time").min()).sort("subject_id")
    ids = first["subject_id"].to_list()
    _write_labels(root, "readmission", ids, first["time"].to_list(), [s % 2 == 0 for s in ids])
    args = ["check", str(root), "--json", "--min-subjects", "1"]
    assert main([*args, "--min-positives", "1"]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    held = blob["tasks"]["tasks"][0]["splits"]["held_out"]
    assert 0 < held["positives"] < held["rows"] and blob["tasks"]["problems"] == []
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"min_subjects: 1\nmin_positives: {held['rows']}\n")
    assert main([*args, "--min-positives", "1", "--policy", str(policy)]) == EXIT_OK
    blob = json.loads(capsys.readouterr().out)
    (problem,) = blob["tasks"]["problems"]
    assert blob["tasks"]["min_positives"] == held["rows"]
    assert (
        f"held_out has {held['positive_subjects']} subjects with a positive row and {held['negative_subjects']} with a "
        f"negative row ({held['positives']} and {held['rows'] - held['positives']} rows), below the "
        f"minimum {held['rows']} (min_report_positives; small cells re-identify patients)"
    ) in problem["message"]


def test_a_task_whose_trigger_matches_a_birth_row_gets_a_warning(hospital_site, tmp_path, capsys):
    """A task triggered at every event (`_ANY_EVENT`, as the onset tasks were) predicts at each
    timed MEDS_BIRTH: check --tasks says so; the shipped task (clinical_event) gets no such warning."""
    any_event = tmp_path / "t2d_any_event.yaml"
    text = T2D.read_text().replace("trigger: clinical_event", "trigger: _ANY_EVENT")
    text = text.replace("  history_window: history\n  min_history_events: 1\n", "")
    text = text.replace(
        "  history:\n    start: null\n    end: trigger\n    start_inclusive: true\n    end_inclusive: false\n"
        "    has:\n      clinical_event: (1, None)\n",
        "",
    )
    any_event.write_text(text)
    assert main(["check", str(hospital_site), "--tasks", str(any_event), str(T2D), "--json", "--no-progress"]) == 0
    blob = json.loads(capsys.readouterr().out)
    at_birth = [p for p in blob["tasks"]["problems"] if p["kind"] == "trigger_at_birth"]
    assert [p["file"] for p in at_birth] == [str(any_event)]
    assert "_ANY_EVENT" in at_birth[0]["message"] and "MEDS_BIRTH" in at_birth[0]["message"]
    # ... and it does predict at each birth there, where the shipped task does not.
    births = cast(
        pl.DataFrame, pl.from_arrow(open_site(hospital_site).read_events(columns=["subject_id", "time", "code"]))
    ).filter(pl.col("code") == "MEDS_BIRTH")
    counted = {(t["file"], t["horizon_days"]): t for t in blob["tasks"]["tasks"]}
    for file, predicts_at_birth in ((str(any_event), True), (str(T2D), False)):
        labels = aces_labels(load_task(file), hospital_site, [365])[365]
        hit = cast(pl.DataFrame, pl.from_arrow(labels)).join(
            births.select("subject_id", pl.col("time").alias("prediction_time")), on=["subject_id", "prediction_time"]
        )
        assert (hit.height == births.height > 0) if predicts_at_birth else hit.height == 0, file
        assert sum(s["rows"] for s in counted[(file, 365)]["splits"].values()) == labels.num_rows
