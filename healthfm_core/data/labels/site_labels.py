"""Labels a site supplies itself, where MEDS puts task labels: SITE_ROOT/tasks/<task>/**/*.parquet.

Each file is a MEDS LabelSchema table (subject_id, prediction_time, and one of boolean_value,
integer_value, float_value, categorical_value). `check_site_labels` returns every problem as a
LabelIssue naming the file, the column and an offending value; `read_site_labels` returns the
concatenated, schema-aligned table or raises SiteLabelError with those issues. Checks:

- the schema, by the `meds` package's LabelSchema (not a copy of it);
- no null subject_id / prediction_time;
- every subject_id is a subject of the site (present in data/);
- every prediction_time is at or after the subject's first timed event (a prediction before any
  data has nothing to condition on); one after the subject's last event is allowed, as MEDS's
  LabelSchema allows it (a readmission label at discharge in an export that ends there): a
  warning, and the model sees every event before it;
- the labels are binary (boolean_value): the evaluation fits a logistic probe per site task, so
  integer, float and categorical labels are refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import meds
import polars as pl
import pyarrow as pa
from flexible_schema import SchemaValidationError, TableValidationError

from healthfm_core.data.files.frames import to_polars
from healthfm_core.data.files.layout import parquet_files
from healthfm_core.data.files.parquet_guard import ParquetFooterError, read_parquet
from healthfm_core.data.files.site_paths import OutsideRootError, list_files

TASKS_SUBDIR = "tasks"
MAX_EXAMPLES = 3  # offending values quoted per (file, column, problem)


@dataclass(frozen=True)
class LabelIssue:
    file: Path
    column: str | None
    value: object
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        col = f", column {self.column}" if self.column else ""
        val = f" (value {self.value!r})" if self.value is not None else ""
        return f"{self.file}{col}: {self.message}{val}"


class SiteLabelError(ValueError):
    def __init__(self, issues: list[LabelIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def task_dir(site_root: str | Path, task: str) -> Path:
    return Path(site_root) / TASKS_SUBDIR / task


def site_tasks(site_root: str | Path) -> list[str]:
    """Names of the tasks the site labels itself (directories under tasks/ holding parquet files,
    or links to files out of the site root, which `check_site_labels` then refuses)."""
    root = Path(site_root) / TASKS_SUBDIR
    if not root.is_dir():
        return []
    tasks = []
    for p in sorted(root.iterdir()):
        files, escapes = list_files(Path(site_root), f"{TASKS_SUBDIR}/{p.name}", ".parquet")
        if p.is_dir() and (files or escapes):
            tasks.append(p.name)
    return tasks


def label_files(site_root: str | Path, task: str) -> list[Path]:
    """The task's label files; OutsideRootError for a link among them out of the site root."""
    files, escapes = list_files(Path(site_root), f"{TASKS_SUBDIR}/{task}", ".parquet")
    if escapes:
        raise OutsideRootError(Path(site_root), escapes[0])
    return files


def _subject_ranges(site_root: Path) -> pl.DataFrame:
    """subject_id, first and last timed event of each subject in data/."""
    shards = parquet_files(site_root, meds.data_subdirectory)
    frames = [
        to_polars(read_parquet(p, site_root, columns=[meds.DataSchema.subject_id_name, meds.DataSchema.time_name]))
        for p in shards
    ]
    if not frames:
        return pl.DataFrame(schema={"subject_id": pl.Int64, "first": pl.Datetime("us"), "last": pl.Datetime("us")})
    return (
        pl.concat(frames)
        .group_by(meds.DataSchema.subject_id_name)
        .agg(
            pl.col(meds.DataSchema.time_name).min().alias("first"),
            pl.col(meds.DataSchema.time_name).max().alias("last"),
        )
        .with_columns(pl.col("first").cast(pl.Datetime("us")), pl.col("last").cast(pl.Datetime("us")))
    )


def _check_file(path: Path, ranges: pl.DataFrame) -> tuple[pa.Table | None, list[LabelIssue]]:
    try:
        raw = read_parquet(path)
    except ParquetFooterError as exc:
        return None, [LabelIssue(path, exc.column, exc.value, f"parquet footer refused: {exc.message}")]
    except (OSError, pa.ArrowInvalid) as exc:
        return None, [LabelIssue(path, None, None, f"not a readable parquet file: {exc}")]
    issues: list[LabelIssue] = []
    for col in (meds.LabelSchema.subject_id_name, meds.LabelSchema.prediction_time_name):
        if col not in raw.column_names:
            issues.append(LabelIssue(path, col, None, f"missing required column (columns: {raw.column_names})"))
    values = [
        c for c in ("boolean_value", "integer_value", "float_value", "categorical_value") if c in raw.column_names
    ]
    if not values:
        issues.append(
            LabelIssue(
                path,
                None,
                None,
                "no label column: expected one of boolean_value, integer_value, float_value, categorical_value",
            )
        )
    if values and "boolean_value" not in values:
        issues.append(
            LabelIssue(
                path,
                values[0],
                None,
                f"labels in {', '.join(values)}: site tasks are binary (boolean_value), since the "
                "evaluation fits a logistic probe; write the outcome as boolean_value",
            )
        )
    if issues:
        return None, issues
    try:
        table = meds.LabelSchema.align(raw)
    except (SchemaValidationError, TableValidationError, pa.ArrowException) as exc:
        bad = [
            f.name
            for f in raw.schema
            if f.name in meds.LabelSchema.schema().names
            and raw.schema.field(f.name).type != meds.LabelSchema.schema().field(f.name).type
        ]
        return None, [
            LabelIssue(
                path,
                ", ".join(bad) or None,
                str(raw.schema.field(bad[0]).type) if bad else None,
                f"does not match meds.LabelSchema: {exc}",
            )
        ]
    df = to_polars(table.select([meds.LabelSchema.subject_id_name, meds.LabelSchema.prediction_time_name]))
    df = df.with_row_index("row")
    for col in (meds.LabelSchema.subject_id_name, meds.LabelSchema.prediction_time_name):
        nulls = df.filter(pl.col(col).is_null())
        if nulls.height:
            issues.append(LabelIssue(path, col, None, f"{nulls.height} null value(s), first at row {nulls['row'][0]}"))
    df = df.drop_nulls().join(ranges, on=meds.LabelSchema.subject_id_name, how="left")
    unknown = df.filter(pl.col("first").is_null() & pl.col("last").is_null())
    for sid in unknown[meds.LabelSchema.subject_id_name].unique(maintain_order=True).head(MAX_EXAMPLES):
        issues.append(
            LabelIssue(
                path, "subject_id", sid, f"not a subject of this site ({unknown.height} row(s) with unknown subjects)"
            )
        )
    known = df.filter(pl.col("first").is_not_null())
    pt = pl.col(meds.LabelSchema.prediction_time_name)
    severity: Literal["error", "warning"]
    for cond, what, severity in (
        (pt < pl.col("first"), "before the subject's first event", "error"),
        (pt > pl.col("last"), "after the subject's last event (allowed: the model sees all of it)", "warning"),
    ):
        bad_rows = known.filter(cond)
        for r in bad_rows.head(MAX_EXAMPLES).iter_rows(named=True):
            issues.append(
                LabelIssue(
                    path,
                    "prediction_time",
                    r[meds.LabelSchema.prediction_time_name],
                    f"row {r['row']}, subject_id {r['subject_id']}: {what} "
                    f"({r['first']} .. {r['last']}; {bad_rows.height} such row(s))",
                    severity,
                )
            )
    return table, issues


def check_site_labels(site_root: str | Path, task: str) -> list[LabelIssue]:
    """Every problem with SITE_ROOT/tasks/<task>/**/*.parquet (empty: the labels are usable)."""
    return _read(Path(site_root), task)[1]


def read_site_labels(site_root: str | Path, task: str) -> pa.Table:
    """The site's labels for a task, schema-aligned and concatenated; SiteLabelError if any check
    fails (warnings do not stop them)."""
    table, issues = _read(Path(site_root), task)
    if errors := [i for i in issues if i.severity == "error"]:
        raise SiteLabelError(errors)
    assert table is not None
    return table


def _read(site_root: Path, task: str) -> tuple[pa.Table | None, list[LabelIssue]]:
    files, escapes = list_files(site_root, f"{TASKS_SUBDIR}/{task}", ".parquet")
    if escapes:
        return None, [LabelIssue(e.link, None, None, e.message(site_root)) for e in escapes]
    if not files:
        return None, [LabelIssue(task_dir(site_root, task), None, None, "no label files (*.parquet)")]
    ranges = _subject_ranges(site_root)
    tables, issues = [], []
    for path in files:
        table, file_issues = _check_file(path, ranges)
        issues += file_issues
        if table is not None:
            tables.append(table)
    if any(i.severity == "error" for i in issues):
        return None, issues
    return pa.concat_tables(tables, promote_options="default"), issues


__all__ = [
    "TASKS_SUBDIR",
    "LabelIssue",
    "SiteLabelError",
    "check_site_labels",
    "label_files",
    "read_site_labels",
    "site_tasks",
    "task_dir",
]
