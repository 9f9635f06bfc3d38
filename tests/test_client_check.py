"""`python client/client.py check SITE_ROOT [--json] [--strict]`, the site admin's command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import client.client as client_module
from client.client import EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from healthfm_core.data.site_check import SiteReport, check_site

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "client" / "client.py"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)  # a safety net against a hang, not a speed limit


def test_script_accepts_a_valid_site_with_a_readable_summary(site_tables, write_site, tmp_path):
    root = write_site(site_tables)
    # From another directory, as a site admin would run it.
    result = run_cli("check", str(root), cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    for line in ("subjects        3", "codes           7", "2070-07-07 .. 2150-05-30",
                 "ehr (2 subjects), wearables (2 subjects), genomics (2 subjects)",
                 "wearable days   0.2 (480 epochs)", "PRS traits      CAD, T2D", "held_out 1, train 2"):
        assert line in out, (line, out)
    assert out.strip().splitlines()[-1].startswith("OK")


def test_script_accepts_the_meds_sample_datasets(meds_sample_sites):
    for name, root in meds_sample_sites.items():
        result = run_cli("check", str(root))
        assert result.returncode == EXIT_OK, (name, result.stdout, result.stderr)
        assert "subjects        6" in result.stdout
        # Their codes.parquet lists only some codes: reported, not fatal.
        assert "WARNING" in result.stdout and "not listed in metadata/codes.parquet" in result.stdout


def test_script_strict_rejects_unlisted_codes(meds_sample_sites):
    root = next(iter(meds_sample_sites.values()))
    result = run_cli("check", str(root), "--strict")
    assert result.returncode == EXIT_INVALID
    lines = result.stdout.strip().splitlines()
    assert lines and all(line.startswith("ERROR ") for line in lines)
    assert "Traceback" not in result.stderr


def test_script_rejects_a_broken_site_one_line_per_problem(site_tables, write_site):
    t = site_tables.shards["train/0.parquet"]
    values = t.column("numeric_value").to_pylist()
    values[4] = float("nan")
    site_tables.shards["train/0.parquet"] = t.set_column(3, "numeric_value", pa.array(values, pa.float32()))
    site_tables.splits = site_tables.splits.slice(0, 2)
    root = write_site(site_tables)
    result = run_cli("check", str(root))
    assert result.returncode == EXIT_INVALID
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert any("data/train/0.parquet, column numeric_value, row 4, subject 1" in line and "'nan'" in line
               for line in lines)
    assert any("metadata/subject_splits.parquet" in line and "subject 3" in line for line in lines)
    assert "FAILED: 2 error(s)" in result.stderr


def test_script_on_a_missing_root_is_one_line_exit_2(tmp_path):
    result = run_cli("check", str(tmp_path / "no_such_site"))
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr


def test_json_output_is_the_site_report(site_tables, write_site, capsys):
    root = write_site(site_tables)
    assert main(["check", str(root), "--json", "--no-progress"]) == EXIT_OK
    report = SiteReport.model_validate(json.loads(capsys.readouterr().out))
    assert report.ok and report == check_site(root)
    assert report.summary.subjects_per_modality == {"ehr": 2, "wearables": 2, "genomics": 2}


def test_json_output_of_a_broken_site(site_tables, write_site, capsys):
    site_tables.shards["train/0.parquet"] = site_tables.shards["train/0.parquet"].drop_columns(["time"])
    root = write_site(site_tables)
    assert main(["check", str(root), "--json"]) == EXIT_INVALID
    blob = json.loads(capsys.readouterr().out)
    assert blob["ok"] is False and blob["summary"] is None and blob["n_errors"] == 1
    (problem,) = blob["problems"]
    assert (problem["file"], problem["column"], problem["kind"]) == ("data/train/0.parquet", "time",
                                                                   "missing_column")


def test_usage_errors_exit_2(capsys):
    assert main([]) == EXIT_USAGE
    assert main(["check"]) == EXIT_USAGE
    assert main(["frobnicate", "x"]) == EXIT_USAGE


def test_an_internal_failure_is_one_line_not_a_traceback(site_tables, write_site, capsys, monkeypatch):
    """Fault injection at the CLI boundary: whatever breaks inside, the admin sees one line."""
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client_module, "check_site", explode)
    assert main(["check", str(write_site(site_tables))]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.strip() == "internal error: RuntimeError: disk on fire (rerun with --debug for details)"


def test_every_generated_synthetic_site_passes_check(tmp_path):
    synthetic = pytest.importorskip("healthfm_core.data.synthetic")
    if not hasattr(synthetic, "generate_federation"):
        pytest.skip("healthfm_core.data.synthetic.generate_federation not there yet")
    synthetic.generate_federation(tmp_path / "fed", scenario="default", seed=0, n_subjects=30)
    sites = sorted(p for p in (tmp_path / "fed" / "sites").iterdir() if p.is_dir())
    assert len(sites) >= 4
    seen_modalities = set()
    for root in sites:
        report = check_site(root, strict=True)
        assert report.ok, (root.name, [str(p) for p in report.problems])
        seen_modalities.update(report.summary.modalities)
        assert main(["check", str(root), "--no-progress"]) == EXIT_OK
    assert seen_modalities == {"ehr", "wearables", "genomics"}
    # Ground truth lives outside every site root.
    assert not any((root / "truth").exists() for root in sites)
