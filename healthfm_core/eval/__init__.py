"""Frozen-representation evaluation: embeddings, linear probes, metrics, plots and the report."""

from healthfm_core.eval.metrics import (
    auroc,
    average_precision,
    binary_metrics,
    bootstrap_ci,
    brier_score,
    expected_calibration_error,
    regression_metrics,
)
from healthfm_core.eval.probes import (
    Features,
    compute_count_features,
    compute_embeddings,
    count_features,
    evaluate_binary,
    evaluate_features,
    evaluate_regression,
    fit_logistic_probe,
    fit_ridge_probe,
    oracle_row,
)
from healthfm_core.eval.report import RegressionRow, ResultRow, write_report

__all__ = [
    "Features",
    "RegressionRow",
    "ResultRow",
    "auroc",
    "average_precision",
    "binary_metrics",
    "bootstrap_ci",
    "brier_score",
    "compute_count_features",
    "compute_embeddings",
    "count_features",
    "evaluate_binary",
    "evaluate_features",
    "evaluate_regression",
    "expected_calibration_error",
    "fit_logistic_probe",
    "fit_ridge_probe",
    "oracle_row",
    "regression_metrics",
    "write_report",
]
