"""benchmarks/site_scale.py runs every stage end to end on a tiny cached site (a smoke run: nothing
timed or compared), and a second run reuses the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["base", "raw", "check", "stats", "load", "round", "labels", "forward"]


def _run(cache: Path, *extra: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks/site_scale.py"), "--cache", str(cache), *extra]
    cmd += ["--sizes", "60", "--wear-sizes", "30", "--eval-subjects", "20", "--local-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_every_stage_runs_and_the_cache_is_reused(tmp_path: Path) -> None:
    first = _run(tmp_path)
    lines = first.splitlines()
    for kind in ("hospital", "wearables"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{kind} site "))
        rows = {line.split()[0]: line for line in lines[start + 2 : start + 2 + len(STAGES)]}
        assert list(rows) == STAGES, lines[start : start + 2 + len(STAGES)]
        for line in rows.values():
            assert "failed" not in line and "killed" not in line, line
            assert float(line.split()[6].replace(",", "")) > 0, (
                line
            )  # a peak RSS in MiB (stage, s, cpu s, per row, x raw, x cpu, RSS)
        assert "errors 0" in rows["check"]
    assert "targets (issue 28)" in first
    assert "generated hospital site at 60 subjects" in first and "generated wearables site at 30" in first
    second = _run(tmp_path, "--stages", "base")
    assert "generated" not in second  # the cached sites are reused
