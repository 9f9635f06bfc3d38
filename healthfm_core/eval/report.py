"""The evaluation results table and the markdown report that presents it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from healthfm_core.files import atomic_write_text


class ResultRow(BaseModel):
    """One (method, task, horizon) score on the held-out split of a binary task."""

    model_config = ConfigDict(frozen=True)
    method: str
    task: str
    horizon: int | None = Field(None, description="prediction horizon in days; None if the task has none")
    n: int
    n_pos: int
    auroc: float
    auroc_ci: tuple[float, float]
    auprc: float
    ece: float
    brier: float
    # Why auroc_ci is (NaN, NaN) when it is: metrics.auroc_interval's reason (one class, too few subjects).
    auroc_ci_undefined: str | None = None


class RegressionRow(BaseModel):
    """One (method, task) score on the held-out split of a continuous task."""

    model_config = ConfigDict(frozen=True)
    method: str
    task: str
    n: int
    r2: float
    r2_ci: tuple[float, float]
    mae: float
    pearson_r: float


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci: tuple[float, float], why: str | None = None) -> str:
    if any(math.isnan(v) for v in ci):
        return f"undefined: {why}" if why else "n/a"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def auroc_cell(r: ResultRow) -> str:
    """AUROC with its interval, or with the reason its interval is undefined (one table cell)."""
    return f"{_f(r.auroc)} {_ci(r.auroc_ci, r.auroc_ci_undefined)}"


def results_table(rows: Sequence[ResultRow]) -> str:
    """Markdown table of binary results, sorted by task, horizon, then method."""
    lines = [
        "| task | horizon (d) | method | n | n_pos | AUROC | 95% CI | AUPRC | ECE | Brier |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.task, r.horizon if r.horizon is not None else -1, r.method)):
        lines.append(
            f"| {r.task} | {r.horizon if r.horizon is not None else '-'} | {r.method} | {r.n} | {r.n_pos} "
            f"| {_f(r.auroc)} | {_ci(r.auroc_ci, r.auroc_ci_undefined)} | {_f(r.auprc)} | {_f(r.ece)} | {_f(r.brier)} |"
        )
    return "\n".join(lines)


def regression_table(rows: Sequence[RegressionRow]) -> str:
    lines = [
        "| task | method | n | R² | 95% CI | MAE | Pearson r |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.task, r.method)):
        lines.append(
            f"| {r.task} | {r.method} | {r.n} | {_f(r.r2)} | {_ci(r.r2_ci)} | {_f(r.mae)} | {_f(r.pearson_r)} |"
        )
    return "\n".join(lines)


def write_report(
    path: str | Path,
    rows: Sequence[ResultRow],
    plots: Mapping[str, str | Path] | None = None,
    regression_rows: Sequence[RegressionRow] = (),
    title: str = "HealthFM evaluation",
    notes: Sequence[str] = (),
) -> Path:
    """Markdown report: notes, the binary results table, the regression table, then each plot
    (linked relative to the report's folder so the folder can be moved as a whole)."""
    path = Path(path)
    parts = [f"# {title}", ""]
    for note in notes:
        parts += [note, ""]
    if rows:
        parts += ["## New-onset tasks (held-out split, frozen linear probe)", "", results_table(rows), ""]
    if regression_rows:
        parts += ["## Regression tasks (held-out split, ridge probe)", "", regression_table(regression_rows), ""]
    if plots:
        parts += ["## Plots", ""]
        for caption, plot in plots.items():
            plot = Path(plot)
            try:
                rel = os.path.relpath(plot.resolve(), path.parent.resolve())
            except ValueError:  # another drive (Windows): fall back to the absolute path
                rel = str(plot.resolve())
            parts += [f"### {caption}", "", f"![{caption}]({Path(rel).as_posix()})", ""]
    text = "\n".join(parts)
    atomic_write_text(path, text)
    return path
