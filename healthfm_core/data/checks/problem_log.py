"""The check's report and its problem log: every problem one line naming file, column, row or
subject and value, repeated problems of a kind cut to a few lines with a true count.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, computed_field

# Repeated problems of one kind in one file are cut to this many, plus an "and N more" line.
MAX_PROBLEMS_PER_KIND = 5

# Problems confined to a site's own task labels (tasks/<task>/): `check` fails on them, but the site
# still opens (healthfm_core.data.sites.site.open_site) and only those tasks go without labels.
LABEL_ERROR_KINDS = ("bad_site_labels",)


class SiteProblem(BaseModel):
    """One problem found in a site. `row` is 0-based within `file`."""

    severity: Literal["error", "warning"]
    file: str  # relative to the site root, posix separators
    column: str | None = None
    row: int | None = None
    subject_id: int | None = None
    value: str | None = None
    message: str
    kind: str = ""  # stable machine-readable tag, e.g. "unsorted_time" (an addition to the brief)
    # How many problems this line stands for: 1, or N on an "and N more" line (`cut`: those N
    # problems have no line of their own).
    count: int = 1
    cut: bool = False

    def __str__(self) -> str:
        where = [self.file]
        if self.column is not None:
            where.append(f"column {self.column}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.subject_id is not None:
            where.append(f"subject {self.subject_id}")
        value = f" (value {self.value!r})" if self.value is not None else ""
        return f"{self.severity.upper()} {', '.join(where)}: {self.message}{value}"


class SiteSummary(BaseModel):
    n_subjects: int
    n_events: int
    n_codes: int
    time_min: datetime | None  # over timed events; None when every row is static
    time_max: datetime | None
    modalities: list[str]  # in MODALITIES order
    subjects_per_modality: dict[str, int]
    wearable_days: float  # total epoch time across subjects, in days
    prs_traits: list[str]
    splits: dict[str, int]  # split name -> subjects
    splits_from_file: bool = True  # False: deterministic split (no subject_splits.parquet)
    n_wearable_epochs: int = 0
    site_tasks: list[str] = []  # tasks the site labels itself (SITE_ROOT/tasks/<task>/)


class SiteReport(BaseModel):
    root: str
    problems: list[SiteProblem]
    summary: SiteSummary | None  # None when the site has errors: its numbers would mislead
    ok: bool
    strict: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_errors(self) -> int:
        """Every error found, including those whose lines were cut."""
        return sum(p.count for p in self.problems if p.severity == "error")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_warnings(self) -> int:
        return sum(p.count for p in self.problems if p.severity == "warning")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_not_shown(self) -> int:
        """Problems without a line of their own (counted on "and N more" lines)."""
        return sum(p.count for p in self.problems if p.cut)

    @property
    def errors(self) -> list[SiteProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[SiteProblem]:
        return [p for p in self.problems if p.severity == "warning"]


class ProblemLog:
    """Collects a site root's problems, keeping the first MAX_PROBLEMS_PER_KIND of each (file, kind).
    Knows the root: ``file(path)`` is a path as its problems name it."""

    def __init__(self, root: Path, strict: bool):
        self.root = root
        self.strict = strict
        self.problems: list[SiteProblem] = []
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._severity: dict[tuple[str, str], str] = {}
        self._column: dict[tuple[str, str], str | None] = {}

    def add(
        self,
        kind: str,
        file: str,
        message: str,
        *,
        column: str | None = None,
        row: int | None = None,
        subject_id: int | None = None,
        value: Any = None,
        severity: Literal["error", "warning"] = "error",
        strict_error: bool = False,
    ) -> None:
        if strict_error and self.strict:
            severity = "error"
        key = (file, kind)
        self._counts[key] += 1
        self._severity[key] = severity
        self._column[key] = column
        if self._counts[key] > MAX_PROBLEMS_PER_KIND:
            return
        self.problems.append(
            SiteProblem(
                severity=severity,
                file=file,
                column=column,
                row=None if row is None else int(row),
                subject_id=None if subject_id is None else int(subject_id),
                value=None if value is None else show_value(value),
                message=message,
                kind=kind,
            )
        )

    def file(self, path: Path) -> str:
        """``path`` as a problem names it: relative to the site root, posix separators (a path
        outside the root, as a link's target, whole)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    @property
    def has_errors(self) -> bool:
        return any(s == "error" for s in self._severity.values())

    def finish(self) -> list[SiteProblem]:
        out = list(self.problems)
        for (file, kind), n in self._counts.items():
            if n > MAX_PROBLEMS_PER_KIND:
                out.append(
                    SiteProblem(
                        severity=self._severity[(file, kind)],  # type: ignore[arg-type]
                        file=file,
                        column=self._column[(file, kind)],
                        message=f"and {n - MAX_PROBLEMS_PER_KIND} more problem(s) of this kind ({kind})",
                        kind=kind,
                        count=n - MAX_PROBLEMS_PER_KIND,
                        cut=True,
                    )
                )
        # Errors first, then in the order found: the first line is the one to fix first.
        out.sort(key=lambda p: p.severity != "error")
        return out


def show_value(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def time_str(us: int | None) -> str:
    """A timestamp[us] as ISO text; numpy renders any year (MIMIC-style 2100s and beyond)."""
    if us is None:
        return "null"
    unit = "us" if int(us) % 1_000_000 else "s"  # whole seconds read better without .000000
    return str(np.datetime64(int(us), "us").astype(f"datetime64[{unit}]"))


def to_datetime(us: int) -> datetime | None:
    try:
        return datetime(1970, 1, 1) + timedelta(microseconds=int(us))
    except OverflowError:  # beyond Python's years 1..9999
        return None


def int_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64/timestamp values as int64 numpy (nulls must be filtered out first)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def true_rows(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices where a boolean arrow mask is true (null counts as false)."""
    mask = pc.fill_null(mask, False)
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))
