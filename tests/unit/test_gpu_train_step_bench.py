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
from gpu_train_step import (  # noqa: E402
    Stepper,
    compiled_around_attention,
    lengthen,
    load_native,
    save_native,
    step_tokens,
)

from healthfm_core.model.attention import IMPL_ENV  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402


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


@pytest.mark.slow
def test_the_backbone_under_torch_compile_trains_as_eager_with_attention_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # --compile's rows: the backbone compiled (on CPU: inductor's C++), each layer's fused attention
    # call a graph break (compiled_around_attention), and after three AdamW steps every parameter
    # where eager's are.
    from torch._dynamo.utils import counters

    # The reference path is plain torch that dynamo could trace: a graph break at each layer is the
    # opaque call's, not an extension's.
    monkeypatch.setenv(IMPL_ENV, "reference")
    counters.clear()
    batch = random_batch(batch_size=3, n_events=12, modalities=[["ehr"], ["ehr", "wearables"], ["ehr", "genomics"]])
    cfg = load_model_config("tiny")
    trained = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = HealthFM(cfg, 40, 4)  # random_batch's vocabulary and traits
        with compiled_around_attention(compiled):
            if compiled:
                model.backbone = torch.compile(model.backbone, dynamic=True)  # type: ignore[assignment]
            stepper = Stepper(model, batch, torch.device("cpu"))
            for _ in range(3):
                stepper()
        trained[compiled] = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["graph_break"].values()) >= cfg.n_layers  # at each layer's attention call
    eager, compiled_params = trained[False], {k.replace("_orig_mod.", ""): v for k, v in trained[True].items()}
    assert eager.keys() == compiled_params.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled_params[key], value, atol=1e-4, rtol=1e-4, msg=key)
