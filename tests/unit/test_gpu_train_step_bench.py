"""benchmarks/gpu_train_step.py on CPU: its longer histories keep the batch contract, and a small
run prints a row per model, attention path and shape with the step's counted host syncs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.random_batch import random_batch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_train_step import lengthen, load_native, save_native, step_tokens  # noqa: E402


def test_longer_histories_repeat_each_subjects_tokens_at_shifted_times() -> None:
    batch = random_batch(batch_size=3, n_events=10, modalities=[["ehr"], ["ehr", "wearables"], ["wearables"]])
    long = lengthen(batch, tokens=25, subjects=5)
    assert long.codes.shape[:2] == (5, 25) and long.batch_size == 5
    for s in range(5):
        src = s % 3
        n = int(batch.ehr_valid[src].sum())
        if n == 0:  # a sample without EHR tokens keeps none
            assert not long.ehr_valid[s].any()
            continue
        assert long.ehr_valid[s].all()
        # The first copy is the sample's own tokens; each later copy the same codes, later in time.
        assert torch.equal(long.codes[s, :n], batch.codes[src, :n])
        assert torch.equal(long.codes[s, n : 2 * n], batch.codes[src, :n])
        assert bool((long.times[s, n : 2 * n] > batch.times[src, :n]).all())
        # Nothing after the prediction time (the batch contract).
        assert float(long.times[s].max()) <= float(long.prediction_time[s])
    assert step_tokens(long)[1] == 25 + batch.wear_valid.shape[1] + 1


def test_a_saved_native_batch_comes_back_whole(tmp_path: Path) -> None:
    # A GPU machine without the data tooling runs from a batch written elsewhere (--native-batch).
    batch = random_batch(batch_size=3, n_events=10, modalities=[["ehr"], ["ehr", "wearables"], ["genomics"]])
    save_native(tmp_path / "batch.pt", batch, 321, 7)
    back, vocab, traits = load_native(tmp_path / "batch.pt")
    assert (vocab, traits) == (321, 7)
    for name in batch.__dataclass_fields__:
        got, want = getattr(back, name), getattr(batch, name)
        assert got.dtype == want.dtype and torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), name


@pytest.mark.slow
def test_a_small_cpu_run_prints_every_row_with_its_counts() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_step.py"), "--device", "cpu", "--models", "tiny"]
    cmd += ["--attention", "reference", "auto", "--shapes", "native", "24x4", "--scenario", "tiny"]
    cmd += ["--site", "biobank", "--subjects", "16", "--batch", "4", "--max-events", "16", "--warmup", "1"]
    cmd += ["--repeats", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert [(r[2].strip(), r[3].strip().split(" ")[0]) for r in rows] == [
        ("reference", "native"),
        ("auto", "native"),
        ("reference", "24x4"),
        ("auto", "24x4"),
    ]
    for row in rows:
        assert float(row[6]) > 0  # ms/step
        counted_syncs = int(row[12].split("/")[0])
        assert 0 < counted_syncs <= 24, row  # the bound of tests/unit/test_host_syncs.py
        assert row[9].strip() == "n/a"  # no MFU without a GPU's peak
