"""Predictions written in the meds-evaluation format and scored by meds-evaluation agree with sklearn and ours."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from meds_evaluation.schema import PredictionSchema
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from healthfm_core.eval.meds_eval import (
    prediction_path,
    score_predictions,
    write_predictions,
)
from healthfm_core.eval.metrics import auroc


def _labels(n: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    y = rng.random(n) < 0.3
    score = np.clip(0.3 + 0.25 * y + 0.2 * rng.standard_normal(n), 0.0, 1.0)
    t = np.datetime64("2110-01-01T00:00:00", "us") + (rng.integers(0, 3650, n) * 86_400_000_000).astype(
        "timedelta64[us]"
    )
    labels = pa.table(
        {
            "subject_id": pa.array(rng.integers(1, 80, n), pa.int64()),
            "prediction_time": pa.array(t, pa.timestamp("us")),
            "boolean_value": pa.array(y),
        }
    )
    return labels, score


def test_write_and_score(tmp_path: Path) -> None:
    labels, score = _labels(400, np.random.default_rng(0))
    path = write_predictions(prediction_path(tmp_path, "general_hospital", "onset_t2d_365d"), labels, score)
    assert path == tmp_path / "general_hospital" / "onset_t2d_365d.parquet"
    written = pq.read_table(path)
    PredictionSchema.validate(written)
    assert written.schema.field("predicted_boolean_probability").type == pa.float32()
    metrics = score_predictions(path)
    y = labels["boolean_value"].to_numpy(zero_copy_only=False)
    p32 = score.astype(np.float32)
    got = metrics["samples_equally_weighted"]
    assert got["roc_auc_score"] == pytest.approx(roc_auc_score(y, p32), abs=1e-12)
    assert got["roc_auc_score"] == pytest.approx(float(auroc(y.astype(float), p32.astype(float))), abs=1e-9)
    assert 0.6 < got["roc_auc_score"] < 0.95
    assert got["binary_accuracy"] == pytest.approx(float(np.mean((p32 >= 0.5) == y)))
    assert set(metrics) == {"samples_equally_weighted", "subjects_equally_weighted"}


def test_rejects_bad_input(tmp_path: Path) -> None:
    labels, score = _labels(10, np.random.default_rng(1))
    with pytest.raises(ValueError, match="9 values for 10 label rows"):
        write_predictions(tmp_path / "x.parquet", labels, score[:9])
    score[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_predictions(tmp_path / "x.parquet", labels, score)


def test_a_resample_without_positives_scores_quietly_and_the_samples_half_is_unchanged(tmp_path: Path) -> None:
    """A rare task: one positive row among its subject's many rows. meds-evaluation's per-subject
    resample (4 rows per subject) draws none of it, where scikit-learn warns of undefined metrics;
    the per-sample half the sites report has both classes and is scored as before, without a warning."""
    from meds_evaluation.utils import _resample

    n_subjects, rows_each = 30, 40
    subject = np.repeat(np.arange(1, n_subjects + 1), rows_each)
    y = np.zeros(len(subject), bool)
    y[5] = True  # subject 1's sixth row
    rng = np.random.default_rng(3)
    score = np.clip(0.2 + 0.5 * y + 0.1 * rng.standard_normal(len(y)), 0.0, 1.0)
    t = np.datetime64("2110-01-01T00:00:00", "us") + (
        np.tile(np.arange(rows_each), n_subjects) * 86_400_000_000
    ).astype("timedelta64[us]")
    labels = pa.table({"subject_id": subject, "prediction_time": pa.array(t, pa.timestamp("us")), "boolean_value": y})
    path = write_predictions(tmp_path / "rare.parquet", labels, score)
    drawn = _resample(pl.from_arrow(pq.read_table(path)), n_samples=4, random_seed=0)
    assert not drawn["boolean_value"].any()  # the condition: the resample holds no positive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping score_predictions fails the test
        metrics = score_predictions(path, seed=0)
    got = metrics["samples_equally_weighted"]
    assert got["roc_auc_score"] == pytest.approx(roc_auc_score(y, score.astype(np.float32)), abs=1e-12)
    assert np.isnan(metrics["subjects_equally_weighted"]["roc_auc_score"])
    # A table of one class keeps scikit-learn's warnings: its own metrics are undefined.
    one_class = write_predictions(
        tmp_path / "none.parquet", labels.set_column(2, "boolean_value", pa.array(np.zeros(len(y), bool))), score
    )
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(score_predictions(one_class, seed=0)["samples_equally_weighted"]["roc_auc_score"])
