"""Predictions in the meds-evaluation format, written at the site and scored with meds-evaluation itself.

One parquet per (site, task): PRED_DIR/<site>/<task>.parquet, meds_evaluation.schema.PredictionSchema
(the MEDS LabelSchema plus predicted_boolean_value bool and predicted_boolean_probability float32).
`score_predictions` returns meds-evaluation's own metrics dict:

    {"samples_equally_weighted": {binary_accuracy, f1_score, roc_auc_score, average_precision_score,
                                  calibration_error, brier_score},
     "subjects_equally_weighted": {... the same over a per-subject resample ...}}

Only aggregate numbers leave a site, and only above its policy's minimum cohort (client's job).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from meds_evaluation.schema import PredictionSchema

from healthfm_core.files import atomic_path


def prediction_path(pred_dir: str | Path, site: str, task: str) -> Path:
    return Path(pred_dir) / site / f"{task}.parquet"


def predictions_table(labels: pa.Table, probabilities: np.ndarray, threshold: float = 0.5) -> pa.Table:
    """Labels (subject_id, prediction_time, boolean_value) with the model's probabilities, aligned
    to PredictionSchema; predicted_boolean_value is probability >= threshold."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(p) != labels.num_rows:
        raise ValueError(f"probabilities: {len(p)} values for {labels.num_rows} label rows")
    if not np.all(np.isfinite(p)):
        raise ValueError(
            f"probabilities: {int((~np.isfinite(p)).sum())} non-finite value(s), first {p[~np.isfinite(p)][0]!r}"
        )
    cols = {
        name: labels[name]
        for name in (
            PredictionSchema.subject_id_name,
            PredictionSchema.prediction_time_name,
            PredictionSchema.boolean_value_name,
        )
    }
    cols[PredictionSchema.predicted_boolean_value_name] = pa.array(p >= threshold, pa.bool_())
    cols[PredictionSchema.predicted_boolean_probability_name] = pa.array(p.astype(np.float32), pa.float32())
    return PredictionSchema.align(pa.table(cols))


def write_predictions(path: str | Path, labels: pa.Table, probabilities: np.ndarray, threshold: float = 0.5) -> Path:
    """Write one (site, task) predictions file atomically; returns its path."""
    table = predictions_table(labels, probabilities, threshold)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def score_predictions(predictions: str | Path | pa.Table, samples_per_subject: int = 4, seed: int = 0) -> dict:
    """meds-evaluation's binary-classification metrics of a predictions file or table."""
    # Imported here: meds_evaluation.evaluate loads scikit-learn and scipy (~1.6 s, ~140 MB in every
    # process that imports a site's code), needed only when a site scores its predictions.
    from meds_evaluation.evaluate import evaluate_binary_classification
    from sklearn.exceptions import UndefinedMetricWarning

    table = pq.read_table(predictions) if isinstance(predictions, (str, Path)) else predictions
    if table.num_rows == 0:
        raise ValueError(f"{predictions if isinstance(predictions, (str, Path)) else 'predictions'}: no rows to score")
    positives = pc.sum(pc.cast(table[PredictionSchema.boolean_value_name], pa.int64())).as_py() or 0
    with warnings.catch_warnings():
        if 0 < positives < table.num_rows:
            # meds-evaluation also scores a per-subject resample (`subjects_equally_weighted`),
            # which can draw none of a rare task's positives: scikit-learn then warns about an
            # undefined metric in that half alone. The per-sample half, which sites report, has
            # both classes here, so those warnings would only alarm a site admin. A table of one
            # class keeps them: its own metrics are undefined.
            warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
            warnings.filterwarnings("ignore", message="No positive class found in y_true")
        return evaluate_binary_classification(
            pl.from_arrow(table), samples_per_subject=samples_per_subject, resampling_seed=seed
        )


__all__ = ["prediction_path", "predictions_table", "score_predictions", "write_predictions"]
