"""Positives that are their own stay's discharge codes: the leakage `check --tasks` warns about.

MIMIC-IV (and the mimic scenario, simulations/synthetic/mimic.py) times a stay's
diagnoses at its discharge. An onset task asked during a stay then finds the stay's own billing
codes in its horizon and calls them a new onset. A stay runs from a `HOSPITAL_ADMISSION//...`
event to the next `HOSPITAL_DISCHARGE//...` event of the subject; a prediction time is inside it
when the next admission-or-discharge event after it (strictly) is a discharge, the rule of the
onset configs' `rest_of_stay` window (configs/tasks/*.yaml). A positive row is a same-stay
positive when its prediction time is inside a stay and its first outcome after the prediction
time lies within `STAY_END_DAYS` of that stay's discharge. A prediction time outside any stay is
never one, whatever its outcome.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import polars as pl
import pyarrow as pa

from healthfm_core.data.files.layout import ADMISSION_PREFIX, DISCHARGE_PREFIX, parquet_files
from healthfm_core.data.files.parquet_guard import read_parquet
from healthfm_core.data.labels.aces_tasks import AcesTask, label_event_times

STAY_END_DAYS = 1.0
LEAKY_SHARE = 0.5  # warn when more than this share of a task's positives are same-stay positives


def stay_edges(site_root: str | Path) -> pl.DataFrame:
    """(subject_id, time, is_discharge) of each timed admission or discharge, sorted; an
    instant with both counts as a discharge (a transfer: the stay before it ends there)."""
    parts = [pl.DataFrame(schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "is_discharge": pl.Boolean})]
    root = Path(site_root)
    for shard in parquet_files(root, "data"):
        table = read_parquet(shard, root, columns=["subject_id", "time", "code"])
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        code = pl.col("code").cast(pl.Utf8)
        parts.append(
            frame.filter(
                pl.col("time").is_not_null()
                & (code.str.starts_with(ADMISSION_PREFIX) | code.str.starts_with(DISCHARGE_PREFIX))
            )
            .group_by(pl.col("subject_id").cast(pl.Int64), pl.col("time").cast(pl.Datetime("us")))
            .agg(code.str.starts_with(DISCHARGE_PREFIX).any().alias("is_discharge"))
        )
    return pl.concat(parts).sort("subject_id", "time")


def stay_end_of(rows: pl.DataFrame, edges: pl.DataFrame) -> pl.Series:
    """Per row (subject_id, prediction_time), the discharge ending the stay it lies inside, or
    null when it lies outside every stay (the next edge after it is an admission, or none)."""
    nxt = _next(rows.select("subject_id", "prediction_time"), edges.rename({"time": "_edge"}), "_edge")
    end = pl.when(pl.col("is_discharge").fill_null(False)).then(pl.col("_edge")).otherwise(None)
    return nxt.select(end.alias("stay_end"))["stay_end"]


def same_stay_positives(labels: pa.Table, edges: pl.DataFrame, outcomes: pl.DataFrame) -> tuple[int, int]:
    """(same-stay positives, positives) among `labels`' positive rows (module docstring).
    `edges`: stay_edges of the site; `outcomes`: (subject_id, time) of the task's outcome events
    (aces_tasks.label_event_times)."""
    frame = pl.from_arrow(labels.select(["subject_id", "prediction_time", "boolean_value"]))
    assert isinstance(frame, pl.DataFrame)
    pos = frame.filter(pl.col("boolean_value")).select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )
    if pos.is_empty() or edges.is_empty():
        return 0, pos.height
    pos = pos.with_columns(stay_end_of(pos, edges).alias("stay_end"))
    first = _next(pos, outcomes.rename({"time": "outcome"}), "outcome")
    near = (pl.col("outcome") - pl.col("stay_end")).abs() <= pl.duration(microseconds=int(STAY_END_DAYS * 86_400e6))
    return int(first.filter(pl.col("stay_end").is_not_null() & near).height), pos.height


def task_stay_leakage(task: AcesTask, tables: dict[int, pa.Table], site_root: str | Path) -> dict[int, tuple[int, int]]:
    """same_stay_positives of each horizon's labels of an ACES task at a site."""
    edges = stay_edges(site_root)
    outcomes = label_event_times(task, site_root) if not edges.is_empty() else pl.DataFrame()
    return {h: same_stay_positives(t, edges, outcomes) for h, t in tables.items()}


def _next(rows: pl.DataFrame, events: pl.DataFrame, on: str) -> pl.DataFrame:
    """`rows` (subject_id, prediction_time, ...) with the subject's first `events[on]` strictly
    after each prediction time (null: none), in the rows' order."""
    keyed = rows.with_row_index("_row").sort("subject_id", "prediction_time")
    with warnings.catch_warnings():  # sorted above by (subject, time), which polars cannot see with `by`
        warnings.filterwarnings("ignore", "Sortedness of columns cannot be checked")
        out = keyed.join_asof(
            events.sort("subject_id", on),
            left_on="prediction_time",
            right_on=on,
            by="subject_id",
            strategy="forward",
            allow_exact_matches=False,
        )
    return out.sort("_row").drop("_row")


__all__ = [
    "LEAKY_SHARE",
    "STAY_END_DAYS",
    "same_stay_positives",
    "stay_edges",
    "stay_end_of",
    "task_stay_leakage",
]
