"""The site's metadata checks: code metadata, dataset metadata, subject splits, and the labels
the site supplies itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from meds import (
    CodeMetadataSchema,
    DatasetMetadataSchema,
    SubjectSplitSchema,
)

from healthfm_core.data.checks.file_checks import (
    align_usable,
    null_rows,
    read_small_table,
    report_outside_root,
    schema_problems,
)
from healthfm_core.data.checks.problem_log import ProblemLog, int_array, show_value
from healthfm_core.data.files.layout import (
    CODE_METADATA_FILEPATH,
    DATASET_METADATA_FILEPATH,
    SUBJECT_SPLITS_FILEPATH,
)
from healthfm_core.data.files.site_paths import outside_root
from healthfm_core.data.labels.site_labels import check_site_labels
from healthfm_core.strict_files import StrictFileError, read_json

# dataset.json keys that declare extra data columns (MEDS DatasetMetadataSchema).
DECLARED_COLUMN_KEYS = (
    "code_modifier_columns",
    "raw_source_id_columns",
    "additional_value_modality_columns",
    "site_id_columns",
    "other_extension_columns",
)


def read_code_metadata(log: ProblemLog) -> set[str] | None:
    path = log.root / CODE_METADATA_FILEPATH
    file = log.file(path)
    if not path.is_file():
        log.add(
            "missing_metadata",
            file,
            "code metadata file is missing; codes cannot be checked",
            severity="warning",
            strict_error=True,
        )
        return None
    if (escape := outside_root(log.root, path)) is not None:
        report_outside_root(log, escape)
        return None
    table = read_small_table(log, path)
    if table is None:
        return None
    bad = schema_problems(log, file, table.schema, CodeMetadataSchema)
    table = None if "code" in bad else align_usable(log, file, table, CodeMetadataSchema, bad)
    if table is None:
        return None
    null_rows(log, file, table.select(["code"]), CodeMetadataSchema, 0)
    return set(table.column("code").drop_null().to_pylist())


def check_dataset_metadata(log: ProblemLog) -> set[str]:
    """Validate dataset.json; returns the extra data columns it declares (code modifiers, ...)."""
    path = log.root / DATASET_METADATA_FILEPATH
    file = log.file(path)
    if not path.is_file():
        log.add("missing_metadata", file, "dataset metadata file is missing", severity="warning", strict_error=True)
        return set()
    if (escape := outside_root(log.root, path)) is not None:
        report_outside_root(log, escape)
        return set()
    try:
        blob = read_json(path)
    except StrictFileError as e:
        log.add("bad_json", file, f"not valid JSON: {e}")
        return set()
    try:
        DatasetMetadataSchema.validate(blob)
    except Exception as err:
        # flexible_schema wraps the jsonschema error that names the field
        cause: BaseException = err.__cause__ or err
        field = "/".join(str(p) for p in getattr(cause, "absolute_path", [])) or None
        msg = getattr(cause, "message", None) or str(cause)
        log.add(
            "bad_dataset_metadata",
            file,
            f"does not match MEDS DatasetMetadataSchema: {msg}",
            column=field,
            value=show_value(getattr(cause, "instance", None)) if field else None,
        )
        return set()
    declared = [blob.get(k) or [] for k in DECLARED_COLUMN_KEYS] if isinstance(blob, dict) else []
    return {c for cols in declared if isinstance(cols, list) for c in cols if isinstance(c, str)}


def check_splits(log: ProblemLog, subjects: np.ndarray, complete: bool) -> dict[str, int] | None:
    """Validate subject_splits.parquet against the data's subjects; split sizes or None."""
    path = log.root / SUBJECT_SPLITS_FILEPATH
    file = log.file(path)
    if not path.is_file():
        return None
    if (escape := outside_root(log.root, path)) is not None:
        report_outside_root(log, escape)
        return {}
    table = read_small_table(log, path)
    if table is None:
        return {}
    bad = schema_problems(log, file, table.schema, SubjectSplitSchema)
    table = None if bad & {"subject_id", "split"} else align_usable(log, file, table, SubjectSplitSchema, bad)
    if table is None:
        return {}
    nulls = null_rows(log, file, table, SubjectSplitSchema, 0)
    if nulls:
        table = table.filter(pc.and_(pc.is_valid(table.column("subject_id")), pc.is_valid(table.column("split"))))
    ids = int_array(table.column("subject_id"))
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    for s in np.flatnonzero(counts > 1):
        log.add(
            "duplicate_split_subject",
            file,
            "subject is listed more than once",
            column="subject_id",
            subject_id=uniq[s],
            value=str(uniq[s]),
        )
    for s in np.setdiff1d(uniq, subjects) if complete else []:
        row = int(np.flatnonzero(ids == s)[0])
        log.add(
            "split_unknown_subject",
            file,
            "split names a subject with no rows in data/",
            column="subject_id",
            row=row,
            subject_id=s,
            value=str(s),
        )
    for s in np.setdiff1d(subjects, uniq):
        log.add(
            "split_missing_subject",
            file,
            "subject in data/ is not in any split",
            column="subject_id",
            subject_id=s,
            value=str(s),
        )
    names, sizes = np.unique(np.asarray(table.column("split").to_pylist(), dtype=object), return_counts=True)
    return {str(k): int(v) for k, v in zip(names, sizes)}


def check_own_labels(log: ProblemLog, task: str) -> None:
    """The site's own labels of one task (SITE_ROOT/tasks/<task>/), by healthfm_core.data.labels.site_labels."""
    try:
        issues = check_site_labels(log.root, task)
    except Exception as e:  # a file site_labels cannot even compare with the data
        log.add("bad_site_labels", f"tasks/{task}", f"cannot check the labels: {type(e).__name__}: {e}")
        return
    for issue in issues:
        log.add(
            "bad_site_labels" if issue.severity == "error" else "site_labels_after_last_event",
            log.file(issue.file),
            issue.message,
            column=issue.column,
            value=None if issue.value is None else str(issue.value),
            severity=issue.severity,
        )
