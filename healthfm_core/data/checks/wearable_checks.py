"""The wearables sidecar's checks, one record batch at a time: the 30-second grid, plausible
ranges, subjects sorted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from healthfm_core.data.checks.aggregates import SiteAggregates
from healthfm_core.data.checks.file_checks import BATCH_ROWS, open_checked_parquet, rows_as_claimed
from healthfm_core.data.checks.problem_log import ProblemLog, int_array, time_str, true_rows
from healthfm_core.data.files.layout import (
    EPOCH_SECONDS,
    EPOCH_US,
    WEARABLES_SCHEMA,
)

HR_MIN_BPM = 20.0
HR_MAX_BPM = 250.0


def check_wearables_file(log: ProblemLog, path: Path, agg: SiteAggregates, bar: tqdm) -> None:
    file = log.file(path)
    handle = open_checked_parquet(log, path)
    if handle is None:
        return
    schema = handle.schema_arrow
    bad = False
    for field in WEARABLES_SCHEMA:
        if field.name not in schema.names:
            log.add(
                "missing_column",
                file,
                f"required column {field.name!r} is missing",
                column=field.name,
                value=f"columns present: {', '.join(schema.names)}",
            )
            bad = True
        elif schema.field(field.name).type != field.type:
            got = schema.field(field.name).type
            log.add(
                "wrong_dtype",
                file,
                f"column {field.name!r} has type {got}, wearables want {field.type}",
                column=field.name,
                value=str(got),
            )
            bad = True
    if bad:
        bar.update(handle.metadata.num_rows)
        return
    subjects: list[np.ndarray] = []
    offset = 0
    try:
        for record_batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=WEARABLES_SCHEMA.names):
            batch = pa.Table.from_batches([record_batch])
            _check_wearables_batch(log, file, batch, offset)
            sid = batch.column("subject_id")
            subjects.append(np.unique(int_array(sid.filter(pc.is_valid(sid)))))
            agg.n_wear_epochs += batch.num_rows
            offset += batch.num_rows
            bar.update(batch.num_rows)
    except Exception as e:
        log.add("unreadable", file, f"cannot read rows after row {offset}: {type(e).__name__}: {e}")
        return
    rows_as_claimed(log, file, handle, offset)
    agg.wear_subjects.append((file, SiteAggregates._union(subjects)))


def _check_wearables_batch(log: ProblemLog, file: str, batch: pa.Table, offset: int) -> None:
    sid = batch.column("subject_id")

    def report(kind: str, column: str, mask: Any, message: str, show: Any) -> None:
        rows = np.flatnonzero(mask) if isinstance(mask, np.ndarray) else true_rows(mask)
        for i in rows:
            log.add(
                kind,
                file,
                message,
                column=column,
                row=offset + int(i),
                subject_id=sid[int(i)].as_py(),
                value=show(int(i)),
            )

    for col in ("subject_id", "time", "enmo_mg"):
        report("null_value", col, pc.is_null(batch.column(col)), f"{col} is null", lambda i: "null")
    time = batch.column("time")
    time_valid = np.asarray(pc.is_valid(time).to_numpy(zero_copy_only=False), dtype=bool)
    time_us = int_array(pc.fill_null(time.cast(pa.int64()), 0))
    # numpy's % takes the divisor's sign, so epochs before 1970 are judged like any other.
    report(
        "off_grid",
        "time",
        time_valid & (time_us % EPOCH_US != 0),
        f"epoch start is not on the {EPOCH_SECONDS}-second grid",
        lambda i: time_str(int(time_us[i])),
    )
    enmo = batch.column("enmo_mg")
    report(
        "non_finite_value",
        "enmo_mg",
        pc.invert(pc.is_finite(enmo)),
        "enmo_mg is not finite",
        lambda i: str(enmo[i].as_py()),
    )
    report(
        "out_of_range", "enmo_mg", pc.less(enmo, 0.0), "enmo_mg is negative (ENMO >= 0)", lambda i: str(enmo[i].as_py())
    )
    hr = batch.column("hr_bpm")
    hr_bad = pc.or_(pc.invert(pc.is_finite(hr)), pc.or_(pc.less(hr, HR_MIN_BPM), pc.greater(hr, HR_MAX_BPM)))
    report(
        "out_of_range",
        "hr_bpm",
        hr_bad,
        f"hr_bpm outside {HR_MIN_BPM:g}..{HR_MAX_BPM:g} (null if unknown)",
        lambda i: str(hr[i].as_py()),
    )
