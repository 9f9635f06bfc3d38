"""The hospital scenario writes EHR-only sites shaped like a real MEDS export (MIMIC-IV MEDS style)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def test_cli_writes_realistic_hospital_sites(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.synthetic",
            str(out),
            "--scenario",
            "hospital",
            "--seed",
            "0",
            "--n-subjects",
            "40",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    sites = sorted(p.name for p in (out / "sites").iterdir())
    assert sites == ["community_hospital", "general_hospital", "university_hospital"]
    for name in sites:
        root = out / "sites" / name
        assert not (root / "wearables").exists() or not any((root / "wearables").glob("*.parquet"))
        shard = root / "data" / "0.parquet"
        assert pq.read_schema(shard).field("code").type == pa.large_string()  # as polars writes it
        df = pl.read_parquet(shard)
        codes = df["code"]
        assert not codes.str.starts_with("PRS//").any()  # EHR only
        assert codes.str.contains(r"^DIAGNOSIS//ICD//9//").any() and codes.str.contains(r"^DIAGNOSIS//ICD//10//").any()
        assert codes.str.contains(r"^LAB//\d+//").any() and codes.str.starts_with("MEDICATION//").any()
        # Static rows (null time) last within each subject; MEDS_BIRTH timed; dates of follow-up in the 2100s.
        last = df.group_by("subject_id", maintain_order=True).agg(
            pl.col("time").is_null().arg_true().min().alias("first_static"),
            pl.len().alias("n"),
            pl.col("time").is_null().sum().alias("n_static"),
        )
        assert (last["first_static"] == last["n"] - last["n_static"]).all()
        assert df.filter(pl.col("code") == "MEDS_BIRTH")["time"].null_count() == 0
        years = df.filter(pl.col("code") != "MEDS_BIRTH")["time"].dt.year().drop_nulls()
        assert cast(int, years.min()) >= 2100
        # Dense panels: the chemistry panel puts 11 rows at one timestamp.
        per_time = df.filter(pl.col("code").str.starts_with("LAB//")).group_by("subject_id", "time").len()["len"]
        assert (per_time >= 11).any()
        onsets = pl.read_parquet(out / "truth" / name / "onsets.parquet")
        assert {"diagnosis_code", "diagnosis_time", "prevalent"} <= set(onsets.columns)
        assert (onsets["diagnosis_code"].is_null() == onsets["diagnosis_time"].is_null()).all()
