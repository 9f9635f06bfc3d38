"""The privacy floor's names and defaults: the site keys behind the minimums a number must clear
before it leaves a site, named wherever a number is withheld by them (the task check, reasons,
summaries), their defaults (the site runtime's, client/site_runtime.py, and the task check's);
and what the positives floor counts: subjects, not rows."""

from __future__ import annotations

import numpy as np

MIN_SUBJECTS_KEY = "min_report_subjects"
MIN_POSITIVES_KEY = "min_report_positives"
DEFAULT_MIN_SUBJECTS = 20  # min_report_subjects' default
DEFAULT_MIN_POSITIVES = 5  # min_report_positives' default
SMALL_CELL_RISK = "small cells re-identify patients"


def class_subjects(y: np.ndarray, subject: np.ndarray) -> tuple[int, int]:
    """(subjects with a positive row, subjects with a negative row): held_out scores every
    labelled row, so a subject with many rows is still one subject, whatever rows would count."""
    y = np.asarray(y).astype(bool)
    subject = np.asarray(subject)
    return len(np.unique(subject[y])), len(np.unique(subject[~y]))
