"""How much of a subject's history the model sees: the coverage `client.py check --json` reports.

At each subject's last EHR observation, the model sees the static token and the most recent
`max_tokens - 1` time buckets (tokens.py). The coverage of a subject is the number of days from
the earliest clinical row inside those buckets to that last observation. MEDS_BIRTH rows take a
token like any row but do not count as history (a birth row would otherwise make every short
record look decades long); PRS rows are not EHR tokens. `per_event=True` measures the old
one-token-per-row layout, for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from meds import birth_code as BIRTH_CODE

from healthfm_core.data.files.layout import PRS_PREFIX
from healthfm_core.data.sequences.tokens import DEFAULT_TOKEN_WINDOW_DAYS, US_PER_DAY, to_us, token_buckets

_NO_TIME = np.iinfo(np.int64).max  # what to_us gives a null time (static rows)


def history_coverage_days(
    events: pa.Table,
    max_tokens: int = 256,
    token_window_days: float = DEFAULT_TOKEN_WINDOW_DAYS,
    per_event: bool = False,
    quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
) -> dict[str, float | int | str]:
    """Days of history visible at each subject's last EHR row, summarised over subjects.

    `events`: MEDS rows with `subject_id` and `time` (and `code`, to tell static PRS rows and
    MEDS_BIRTH apart; without it every row counts as history). Returns JSON-ready numbers:
    n_subjects (with a timed clinical row), median_days and q<p>_days of the visible span,
    median_history_days (the whole record), fraction_full_history (subjects whose whole record
    fits), mean_rows_per_token, and the settings used.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for col in ("subject_id", "time"):
        if col not in events.column_names:
            raise ValueError(f"events table has no column {col!r} (columns: {events.column_names})")
    subject = events["subject_id"].to_numpy().astype(np.int64)
    time_us = to_us(events["time"], "time")
    n = events.num_rows
    if "code" in events.column_names and n:
        code = events["code"].combine_chunks()
        is_prs = pc.fill_null(pc.starts_with(code, PRS_PREFIX), False).to_numpy(zero_copy_only=False)
        is_birth = pc.fill_null(pc.equal(code, BIRTH_CODE), False).to_numpy(zero_copy_only=False)
    else:
        is_prs, is_birth = np.zeros(n, bool), np.zeros(n, bool)
    timed = time_us != _NO_TIME
    static = ~timed & ~is_prs

    t_sub, t_time, t_birth = subject[timed], time_us[timed], is_birth[timed]
    order = np.lexsort((t_time, t_sub))
    t_sub, t_time, t_birth = t_sub[order], t_time[order], t_birth[order]
    token = np.arange(len(t_sub), dtype=np.int64) if per_event else token_buckets(t_sub, t_time, token_window_days)
    runs, starts = np.unique(t_sub, return_index=True)
    ends = np.r_[starts[1:], len(t_sub)].astype(np.int64)

    # Static slots per subject: one pooled token, or one per static row in the per-event layout.
    st_runs, st_counts = np.unique(subject[static], return_counts=True)
    n_static = np.zeros(len(runs), np.int64)
    at = np.searchsorted(st_runs, runs)
    hit = at < len(st_runs)
    hit[hit] = st_runs[at[hit]] == runs[hit]
    n_static[hit] = st_counts[at[hit]] if per_event else 1
    n_timed = max_tokens - np.minimum(n_static, max_tokens)

    # Index of the next clinical (non-birth) row at or after each row (len = none).
    idx = np.where(~t_birth, np.arange(len(t_sub)), len(t_sub))
    next_clinical = np.minimum.accumulate(idx[::-1])[::-1] if len(idx) else idx
    next_clinical = np.r_[next_clinical, len(t_sub)]
    first_clinical = next_clinical[starts]
    has_clinical = first_clinical < ends
    last = t_time[ends - 1]
    first_visible_token = token[ends - 1] - n_timed + 1
    first_row = np.maximum(starts, np.searchsorted(token, first_visible_token, side="left"))
    earliest = next_clinical[first_row]
    sees = (n_timed > 0) & (earliest < ends)
    visible_days = np.where(sees, (last - t_time[np.minimum(earliest, len(t_time) - 1)]) / US_PER_DAY, 0.0)
    history_days = (last - t_time[np.minimum(first_clinical, len(t_time) - 1)]) / US_PER_DAY
    visible_days, history_days = visible_days[has_clinical], history_days[has_clinical]

    n_tokens = len(np.unique(token)) if len(token) else 0
    result: dict[str, float | int | str] = {
        "max_tokens": int(max_tokens),
        "tokens": "event" if per_event else ("timestamp" if token_window_days == 0 else f"{token_window_days:g}d"),
        "n_subjects": int(has_clinical.sum()),
        "mean_rows_per_token": float(len(t_sub) / n_tokens) if n_tokens else 0.0,
    }
    if not len(visible_days):
        return {**result, "median_days": 0.0, "median_history_days": 0.0, "fraction_full_history": 0.0}
    result["median_days"] = float(np.median(visible_days))
    for q in quantiles:
        result[f"q{round(100 * q):02d}_days"] = float(np.quantile(visible_days, q))
    result["median_history_days"] = float(np.median(history_days))
    result["fraction_full_history"] = float(np.mean(visible_days >= history_days - 1e-9))
    return result


__all__ = ["history_coverage_days"]
