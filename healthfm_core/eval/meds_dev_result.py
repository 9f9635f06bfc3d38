"""A MEDS-DEV task's held-out results, written at the site as MEDS-DEV's own pipeline writes them.

MEDS-DEV (0.0.14) runs a model's `predict` into an output folder (`predictions.parquet`, the
held_out split's rows in meds-evaluation's PredictionSchema), then `meds-dev-evaluation`, which
runs `meds-evaluation-cli predictions_path=... output_dir=...`: meds-evaluation's metrics dict
(`evaluate_binary_classification`, 4 samples per subject, resampling seed 0) as `results.json`;
then `meds-dev-pack-result dataset=... task=... model=... evaluation_fp=results.json
result_fp=...` packs it into a submittable result: `MEDS_DEV.results.Result` as JSON
(dataset, task, model, timestamp, result, version), at most 1.5 KB (`meds-dev-validate-result`).

For every `meds-dev:` task with a score, a site with a predictions directory writes the three
under PRED_DIR/<site>/meds_dev/<MEDS-DEV task>/ (e.g. .../meds_dev/mortality/in_icu/first_24h/):
the probe's held-out predictions (every labelled held_out row, as MEDS-DEV scores), the metrics
meds-evaluation gives for them with its command line's defaults, and the packed result. What a
site submits is its own decision: `result.json` holds aggregates only. MEDS-DEV validates a
result of its current version against its registered models; `healthfm` is not one of them,
so a submission names the model as MEDS-DEV's maintainers register it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from healthfm_core.eval.meds_eval import score_predictions
from healthfm_core.files import atomic_path, atomic_write_text

MEDS_DEV_SUBDIR = "meds_dev"
PREDICTIONS_FILE = "predictions.parquet"  # MEDS-DEV's models write ${output_dir}/predictions.parquet
RESULTS_FILE = "results.json"  # meds-evaluation-cli's output_dir/results.json
RESULT_FILE = "result.json"  # meds-dev-pack-result's result_fp
MODEL_NAME = "healthfm"
MAX_RESULT_BYTES = int(1.5 * 1024)  # meds-dev-validate-result's MAX_SIZE_KB


def meds_dev_result_dir(pred_dir: str | Path, site: str, task: str) -> Path:
    """PRED_DIR/<site>/meds_dev/<MEDS-DEV task path>; ValueError for a task path that would
    leave that folder."""
    parts = Path(task).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or Path(task).is_absolute():
        raise ValueError(f"MEDS-DEV task {task!r}: not a task path (e.g. mortality/in_icu/first_24h)")
    return Path(pred_dir) / site / MEDS_DEV_SUBDIR / Path(*parts)


def meds_dev_version() -> str:
    """The installed meds-dev package's version (the `version` a packed result records)."""
    try:
        return importlib.metadata.version("meds-dev")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def packed_result(
    dataset: str, task: str, results: dict[str, Any], model: str = MODEL_NAME, timestamp: dt.datetime | None = None
) -> dict[str, Any]:
    """MEDS-DEV's Result as its to_json writes it: timestamp in ISO format, UTC."""
    when = timestamp or dt.datetime.now(dt.UTC)
    return {
        "dataset": dataset,
        "task": task,
        "model": model,
        "timestamp": when.isoformat(),
        "result": results,
        "version": meds_dev_version(),
    }


def write_meds_dev_result(out_dir: str | Path, predictions: str | Path, dataset: str, task: str) -> Path:
    """predictions.parquet (a copy of the held-out predictions file), results.json (meds-evaluation's
    metrics of it, as meds-evaluation-cli computes and writes them) and result.json (packed) in
    `out_dir`; returns `out_dir`. ValueError when the packed result is over MEDS-DEV's size limit."""
    out = Path(out_dir)
    target = out / PREDICTIONS_FILE
    with atomic_path(target) as tmp:
        shutil.copyfile(predictions, tmp)
    results = score_predictions(target, samples_per_subject=4, seed=0)  # meds-evaluation-cli's defaults
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=4))
    text = json.dumps(packed_result(dataset, task, results))
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ValueError(f"{out / RESULT_FILE}: {len(text.encode())} bytes, over MEDS-DEV's {MAX_RESULT_BYTES}")
    atomic_write_text(out / RESULT_FILE, text)
    return out


__all__ = [
    "MEDS_DEV_SUBDIR",
    "MODEL_NAME",
    "PREDICTIONS_FILE",
    "RESULTS_FILE",
    "RESULT_FILE",
    "meds_dev_result_dir",
    "packed_result",
    "write_meds_dev_result",
]
