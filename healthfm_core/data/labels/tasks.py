"""Prediction tasks and their labels (MEDS LabelSchema).

New-onset tasks (`onset_labels`): for an outcome code prefix (e.g. `ICD10//E11` matches
`ICD10//E11` and `ICD10//E11.9`), a horizon h in days and prediction times pt:

- a subject whose first outcome time o is at or before pt is EXCLUDED (prevalent, not positive);
- a subject dead (`MEDS_DEATH`) at or before pt is excluded;
- positive: pt < o <= pt + h;
- negative: no outcome in (pt, pt + h] and the subject is observed through the window: its last
  timed event is at or after pt + h, or it died within the window without the outcome (death is
  a competing event, a negative);
- otherwise (follow-up ends before pt + h, no death, no outcome) the row is EXCLUDED as censored:
  its label is unknown. The end of follow-up is the subject's last timed MEDS event;
- a pt inside a hospital stay is EXCLUDED (leakage guard, as configs/tasks/*.yaml's rest_of_stay):
  the next `HOSPITAL_ADMISSION//` or `HOSPITAL_DISCHARGE//` event strictly after pt is a discharge.
  MIMIC-IV times a stay's diagnoses at its discharge; asked during the stay, the stay's own codes
  would be a "new onset". A pt outside every stay (or at a site without such codes) is unaffected.

Default prediction times (`visit_prediction_times`): up to `n_per_subject` of the subject's
distinct timed-event times ("visits", birth and death rows are not visits), excluding its last one (nothing to predict after it),
drawn with a hash of (seed, subject_id, time): deterministic, and a subject's draws do not
depend on which other subjects the site holds.

Physiological regression (`wearable_regression_labels`): each wear period (epochs with gaps
below `max_gap_hours`) is split at its middle epoch; prediction_time is the start of that epoch
(so the model sees exactly the first half: epochs ending at or before it), the target
(float_value) is over the second half: resting heart rate (mean HR of low-activity epochs,
ENMO < `rest_enmo_mg`) for `target="resting_hr"`, mean ENMO (mg) for `target="mean_enmo"`.
Only subjects with wearables get rows; resting HR needs enough non-null HR epochs, so sites whose
devices have no PPG give no resting-HR rows (use mean ENMO there).

Wear-period ends (`wear_period_end_times`): the same periods, prediction_time at the end of each
one's last epoch. The modality ablation asks its onset questions there, where a subject's
wearable data is freshest (visit times mostly fall months away from any wear period).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from meds import LabelSchema, birth_code, death_code
from pydantic import BaseModel, ConfigDict, Field

from healthfm_core.data.files.layout import ADMISSION_PREFIX, DISCHARGE_PREFIX, EPOCH_US, SiteLike
from healthfm_core.data.sequences.event_rows import NO_TIME as _NO_TIME
from healthfm_core.data.sequences.event_rows import US_PER_DAY, to_us
from healthfm_core.data.sequences.wear_patches import sorted_by_subject_time
from healthfm_core.files import atomic_path

log = logging.getLogger(__name__)

DEATH_CODE = death_code  # "MEDS_DEATH"
BIRTH_CODE = birth_code  # "MEDS_BIRTH"
DEFAULT_HORIZONS_DAYS = (30, 90, 180, 365)
DISEASES: dict[str, str] = {  # short task name -> outcome code prefix (agreed synthetic names)
    "t2d": "ICD10//E11",
    "cad": "ICD10//I25",
    "hypertension": "ICD10//I10",
    "copd": "ICD10//J44",
}

LABEL_SCHEMA_BOOL = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_(), nullable=False),
    ]
)
LABEL_SCHEMA_FLOAT = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("float_value", pa.float32(), nullable=False),
    ]
)


# ------------------------------------------------------------------------------ small helpers


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixed uint64 hash, vectorised."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _subject_arrays(events: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """(sorted unique subject ids, row subject index, row time µs, code array) of a MEDS table."""
    for col in ("subject_id", "time", "code"):
        if col not in events.column_names:
            raise ValueError(f"events table has no column {col!r} (columns: {events.column_names})")
    sid = events["subject_id"].to_numpy()
    subjects, inv = np.unique(sid, return_inverse=True)
    code = events["code"].combine_chunks() if events.num_rows else pa.array([], pa.string())
    return subjects, inv, to_us(events["time"], "time"), code


def _first_time(group: np.ndarray, time_us: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, _NO_TIME, dtype=np.int64)
    np.minimum.at(out, group[mask], time_us[mask])
    return out


def validate_labels(table: pa.Table) -> pa.Table:
    """Check a table against meds.LabelSchema (raises with the offending columns)."""
    LabelSchema.validate(table)
    return table


# ------------------------------------------------------------------------------ prediction times


def _distinct_pairs(group: np.ndarray, time_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (group, time) pairs, sorted by group then time: what np.unique(axis=0) gives,
    without its sort of the pairs as opaque bytes (0.34 s for a 440k-event hospital). A MEDS
    shard is already sorted by subject and time, so sorted input is only checked."""
    if len(group) > 1:
        ordered = (group[1:] > group[:-1]) | ((group[1:] == group[:-1]) & (time_us[1:] >= time_us[:-1]))
        if not ordered.all():
            order = np.lexsort((time_us, group))
            group, time_us = group[order], time_us[order]
    first = np.ones(len(group), dtype=bool)
    first[1:] = (group[1:] != group[:-1]) | (time_us[1:] != time_us[:-1])
    return group[first], time_us[first]


def _draw_key(subject_id: np.ndarray, time_us: np.ndarray, seed: int) -> np.ndarray:
    """The hash that orders a subject's candidate times for sampling: a function of (seed,
    subject, time) alone, so a subject's draws never depend on the other subjects or shards."""
    mixed_subject = _mix64(subject_id.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64))
    return _mix64(mixed_subject ^ time_us.astype(np.uint64))


ALL_ROWS = "all"  # n_per_subject's spelling of "every row" in a config (None in Python)
# At most this many of a held-out subject's rows per task key are scored (EvalConfig's
# held_out_rows_per_subject), drawn as n_per_subject's rows are. Far above any subject we know:
# at most 466 rows of one task key on the generated sites (the hospital scenario at full size,
# 1,500 subjects a site, whose onset tasks ask at every clinical event), at most 8 timed events a
# subject on the MEDS sample datasets (tests/unit/test_held_out_cap.py), so an honest site scores
# every labelled row as MEDS-DEV does; it bounds the rows an evaluate reply may claim
# (server/eval_counts.py).
HELD_OUT_ROWS_PER_SUBJECT = 1024


def rows_per_subject(value: int | str | None) -> int | None:
    """A config's n_per_subject as cap_rows_per_subject takes it: an int, or None for "all"/null."""
    if value is None or (isinstance(value, str) and value.strip().lower() == ALL_ROWS):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"n_per_subject: {value!r} is neither a number of rows nor {ALL_ROWS!r}") from None
    if n < 1:
        raise ValueError(f"n_per_subject must be >= 1 (or {ALL_ROWS!r} for every row), got {n}")
    return n


def cap_rows_per_subject(
    labels: pa.Table,
    n_per_subject: int | None,
    seed: int = 0,
    every_row_of: np.ndarray | None = None,
    every_row_cap: int | None = HELD_OUT_ROWS_PER_SUBJECT,
) -> pa.Table:
    """At most `n_per_subject` of each subject's label rows, drawn by `_draw_key` (None: all).

    A task's rows are ACES's (trigger, windows, gaps and exclusions decide them); this is the
    evaluation's cost knob applied to those rows afterwards, never a filter that decides which
    times a task may have. Tasks triggered at every event draw mostly the same times (the
    same hash ranks a subject's times in every task), so their union stays near the cap.
    `every_row_of`: subjects whose rows are all kept (the held-out split: scored on every
    labelled row, as MEDS-DEV scores; the cap only bounds what probes are fitted and tuned on),
    up to `every_row_cap` of a subject's (HELD_OUT_ROWS_PER_SUBJECT, drawn the same way; None:
    every one), a cap honest data does not reach that bounds what a site can claim it scored.
    Returns the kept rows, all columns, sorted by subject and prediction time.
    """
    for name, cap in (("n_per_subject", n_per_subject), ("every_row_cap", every_row_cap)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1 (or None for every row), got {cap}")
    sid = labels["subject_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    t = to_us(labels["prediction_time"], "prediction_time")
    held = np.zeros(len(sid), bool) if every_row_of is None else np.isin(sid, np.asarray(every_row_of, np.int64))
    unbounded = np.iinfo(np.int64).max
    limit = np.where(held, every_row_cap or unbounded, n_per_subject or unbounded)
    if len(sid) == 0 or bool((limit == unbounded).all()):
        keep = np.arange(len(sid))
    else:
        key = _draw_key(sid, t, seed)
        order = np.lexsort((key, sid))
        grouped = sid[order]
        rank = np.arange(len(grouped)) - np.searchsorted(grouped, grouped, side="left")
        keep = order[rank < limit[order]]
    keep = keep[np.lexsort((t[keep], sid[keep]))]
    return labels.take(pa.array(keep, pa.int64()))


def visit_prediction_times(
    events: pa.Table, n_per_subject: int | None = 4, seed: int = 0, min_history_days: float = 0.0
) -> pa.Table:
    """Up to `n_per_subject` distinct timed-event times per subject (not its last), hash-sampled
    (None: every one).

    Times earlier than `min_history_days` after the subject's first timed event are skipped.
    Returns (subject_id int64, prediction_time timestamp[us]) sorted by subject and time.
    """
    if n_per_subject is not None and n_per_subject < 1:
        raise ValueError(f"n_per_subject must be >= 1, got {n_per_subject}")
    subjects, inv, time_us, code = _subject_arrays(events)
    # Birth and death rows are not visits: no prediction is made at them.
    not_visit = pc.fill_null(pc.is_in(code, value_set=pa.array([BIRTH_CODE, DEATH_CODE])), False)
    timed = (time_us != _NO_TIME) & ~not_visit.to_numpy(zero_copy_only=False)
    g, t = _distinct_pairs(inv[timed].astype(np.int64), time_us[timed])
    if len(g) == 0:
        return pa.table({"subject_id": pa.array([], pa.int64()), "prediction_time": pa.array([], pa.timestamp("us"))})
    last = np.ones(len(g), dtype=bool)
    last[:-1] = g[1:] != g[:-1]
    first_t = t[np.searchsorted(g, g, side="left")]
    keep = ~last & (t - first_t >= int(min_history_days * US_PER_DAY))
    g, t = g[keep], t[keep]
    key = _draw_key(subjects[g], t, seed)
    order = np.lexsort((key, g))
    g, t = g[order], t[order]
    rank = np.arange(len(g)) - np.searchsorted(g, g, side="left")
    sel = rank < (len(g) if n_per_subject is None else n_per_subject)
    g, t = g[sel], t[sel]
    order = np.lexsort((t, g))
    return pa.table(
        {
            "subject_id": pa.array(subjects[g[order]], pa.int64()),
            "prediction_time": pa.array(t[order], pa.int64()).cast(pa.timestamp("us")),
        }
    )


# ------------------------------------------------------------------------------ onset labels


def inside_stay(
    edge_group: np.ndarray, edge_time: np.ndarray, edge_discharge: np.ndarray, group: np.ndarray, time_us: np.ndarray
) -> np.ndarray:
    """Per query (group, time_us): whether the group's first stay edge strictly after it is a
    discharge (the query lies inside a stay). Edges: (group, time, is_discharge) of each
    admission or discharge event; at an instant with both, the discharge counts."""
    n_edges = len(edge_group)
    g = np.concatenate([edge_group, group]).astype(np.int64)
    t = np.concatenate([edge_time, time_us]).astype(np.int64)
    # Edges sort before queries at the same instant: an edge at the query's time is not "after" it;
    # discharges before admissions at one instant, so the discharge is the one found.
    kind = np.concatenate([np.where(edge_discharge, 0, 1), np.full(len(group), 2)])
    order = np.lexsort((kind, t, g))
    position = np.where(order < n_edges, np.arange(len(order)), len(order))
    nxt = np.minimum.accumulate(position[::-1])[::-1]  # the first edge at or after each position
    query_pos = np.empty(len(group), dtype=np.int64)
    query_pos[order[order >= n_edges] - n_edges] = np.flatnonzero(order >= n_edges)
    found = nxt[query_pos]
    ok = found < len(order)
    edge = order[np.minimum(found, len(order) - 1)] if len(order) else np.zeros(len(group), np.int64)
    same = ok & (g[edge] == group.astype(np.int64)) & (edge < n_edges)
    out = np.zeros(len(group), dtype=bool)
    out[same] = np.asarray(edge_discharge)[edge[same]]
    return out


def onset_labels_from_events(
    events: pa.Table,
    outcome_code_prefix: str,
    horizon_days: float,
    prediction_times: pa.Table,
    death_code: str = DEATH_CODE,
) -> pa.Table:
    """New-onset labels (rules in the module docstring) from a MEDS events table."""
    if horizon_days <= 0:
        raise ValueError(f"horizon_days must be > 0, got {horizon_days}")
    if not outcome_code_prefix:
        raise ValueError("outcome_code_prefix must not be empty")
    for col in ("subject_id", "prediction_time"):
        if col not in prediction_times.column_names:
            raise ValueError(f"prediction_times has no column {col!r} (columns: {prediction_times.column_names})")
    subjects, inv, time_us, code = _subject_arrays(events)
    n = len(subjects)
    timed = time_us != _NO_TIME
    is_outcome = pc.fill_null(pc.starts_with(code, outcome_code_prefix), False).to_numpy(zero_copy_only=False)
    is_death = pc.fill_null(pc.equal(code, death_code), False).to_numpy(zero_copy_only=False)
    onset = _first_time(inv, time_us, timed & is_outcome, n)
    # An outcome recorded as a static row (no time) is prevalent at every prediction time.
    onset[np.unique(inv[~timed & is_outcome])] = np.iinfo(np.int64).min
    death = _first_time(inv, time_us, timed & is_death, n)
    is_discharge = pc.fill_null(pc.starts_with(code, DISCHARGE_PREFIX), False).to_numpy(zero_copy_only=False)
    is_admission = pc.fill_null(pc.starts_with(code, ADMISSION_PREFIX), False).to_numpy(zero_copy_only=False)
    edge = timed & (is_discharge | is_admission)
    follow_up_end = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(follow_up_end, inv[timed], time_us[timed])

    pt_sid = prediction_times["subject_id"].to_numpy()
    pt = to_us(prediction_times["prediction_time"], "prediction_time")
    if np.any(pt == _NO_TIME):
        raise ValueError("prediction_times column 'prediction_time' has null values")
    s = np.searchsorted(subjects, pt_sid)
    s_c = np.minimum(s, max(n - 1, 0))
    known = (s_c < n) & (subjects[s_c] == pt_sid) if n else np.zeros(len(pt_sid), bool)
    if not np.all(known):
        bad = np.unique(pt_sid[~known])
        raise ValueError(f"prediction_times: subject_id {bad[:5].tolist()} not present in the events")
    o, d, f = onset[s_c], death[s_c], follow_up_end[s_c]
    end = pt + int(round(horizon_days * US_PER_DAY))
    prevalent = o <= pt
    dead = d <= pt
    positive = (o > pt) & (o <= end)
    observed = (f >= end) | (d <= end)
    in_stay = inside_stay(inv[edge], time_us[edge], is_discharge[edge], s_c, pt)
    keep = ~prevalent & ~dead & (positive | observed) & ~in_stay
    out = pa.table(
        {
            "subject_id": pa.array(pt_sid[keep], pa.int64()),
            "prediction_time": pa.array(pt[keep], pa.int64()).cast(pa.timestamp("us")),
            "boolean_value": pa.array(positive[keep], pa.bool_()),
        },
        schema=LABEL_SCHEMA_BOOL,
    )
    log.debug(
        "%s %gd: %d rows -> %d labels (%d positive; excluded %d prevalent, %d dead, %d censored, %d inside a stay)",
        outcome_code_prefix,
        horizon_days,
        len(pt),
        out.num_rows,
        int(positive[keep].sum()),
        int(prevalent.sum()),
        int((dead & ~prevalent).sum()),
        int((~prevalent & ~dead & ~positive & ~observed).sum()),
        int((~prevalent & ~dead & (positive | observed) & in_stay).sum()),
    )
    return validate_labels(out)


def onset_labels(
    site: SiteLike,
    outcome_code_prefix: str,
    horizon_days: float,
    prediction_times: pa.Table | None = None,
    seed: int = 0,
    n_per_subject: int = 4,
) -> pa.Table:
    """New-onset labels for a site; prediction times default to `visit_prediction_times`."""
    events = site.read_events(columns=["subject_id", "time", "code"])
    if prediction_times is None:
        prediction_times = visit_prediction_times(events, n_per_subject=n_per_subject, seed=seed)
    return onset_labels_from_events(events, outcome_code_prefix, horizon_days, prediction_times)


# ------------------------------------------------------------------------------ wearable regression


def _require_columns(wearables: pa.Table, need: Sequence[str]) -> None:
    for col in need:
        if col not in wearables.column_names:
            raise ValueError(f"wearables table has no column {col!r} (columns: {wearables.column_names})")


def _wear_columns(part: pa.Table, values: bool = True) -> tuple[np.ndarray, ...]:
    """(subject_id, time µs[, enmo, hr]) of a slice from subject_slices (sorted already)."""
    _require_columns(part, ("subject_id", "time", "enmo_mg", "hr_bpm") if values else ("subject_id", "time"))
    cols = [part["subject_id"].to_numpy(), to_us(part["time"], "time")]
    if values:  # as stored (float32, nulls as NaN): the label sums are taken in float64 anyway
        cols += [part[c].to_numpy(zero_copy_only=False) for c in ("enmo_mg", "hr_bpm")]
    return tuple(cols)


def _wear_periods(sid: np.ndarray, t: np.ndarray, max_gap_hours: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wear periods of sorted epochs: a new one at each new subject or gap above max_gap_hours.
    Returns (period index per epoch, first epoch of each period, span in µs of each period)."""
    new = np.ones(len(sid), dtype=bool)
    new[1:] = (sid[1:] != sid[:-1]) | (np.diff(t) > int(max_gap_hours * 3_600_000_000))
    period = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    span = t[np.append(starts[1:], len(sid)) - 1] + EPOCH_US - t[starts]
    return period, starts, span


# Rows per slice when a site's epochs are labelled: numpy's temporaries of a slice stay in cache,
# those of a whole wearable site (10^7-10^8 epochs) do not. Measured on the default scenario's
# wearable clinic (34.5M epochs, 2 cores): resting-HR labels in 0.72 s by slices of 2^20 rows,
# 5.1 s over the whole table at once; the same rows.
WEAR_SLICE_ROWS = 1 << 20


def subject_slices(wearables: pa.Table, rows: int = WEAR_SLICE_ROWS) -> Iterator[pa.Table]:
    """The table sorted by (subject_id, time), as zero-copy slices of about `rows` rows that
    never split a subject's epochs (a wear period never spans two subjects): a slice ends before
    the first row of its last subject, whose epochs may go on; a subject longer than `rows`
    widens its slice (doubling) until the slice holds it whole."""
    _require_columns(wearables, ("subject_id", "time"))
    if not sorted_by_subject_time(wearables):  # site data is sorted already (Site.read_wearables)
        wearables = wearables.sort_by([("subject_id", "ascending"), ("time", "ascending")])
    subject = wearables["subject_id"]
    start, n = 0, wearables.num_rows
    while start < n:
        length = min(rows, n - start)
        while start + length < n:
            sid = subject.slice(start, length).to_numpy()
            cut = int(np.searchsorted(sid, sid[-1]))  # the last subject's first row here
            if cut > 0:
                length = cut
                break
            length = min(2 * length, n - start)  # one subject fills the slice: widen it
        yield wearables.slice(start, length)
        start += length


def wear_period_end_times(wearables: pa.Table, max_gap_hours: float = 6.0, min_period_hours: float = 24.0) -> pa.Table:
    """(subject_id, prediction_time) at the end of each wear period (the end of its last epoch):
    the moment a wearable study reads a period out, when the device data is freshest. Periods
    shorter than min_period_hours are skipped. Sorted by subject and time."""
    parts = [pa.table({"subject_id": pa.array([], pa.int64()), "prediction_time": pa.array([], pa.timestamp("us"))})]
    for part in subject_slices(wearables):
        sid, t = _wear_columns(part, values=False)
        _, starts, span = _wear_periods(sid, t, max_gap_hours)
        last = np.append(starts[1:], len(sid)) - 1
        ok = span >= int(min_period_hours * 3_600_000_000)
        parts.append(
            pa.table(
                {
                    "subject_id": pa.array(sid[starts[ok]], pa.int64()),
                    "prediction_time": pa.array(t[last[ok]] + EPOCH_US, pa.int64()).cast(pa.timestamp("us")),
                }
            )
        )
    return pa.concat_tables(parts).combine_chunks()


def wearable_regression_labels(
    wearables: pa.Table,
    target: Literal["resting_hr", "mean_enmo"] = "resting_hr",
    max_gap_hours: float = 6.0,
    min_period_hours: float = 24.0,
    rest_enmo_mg: float = 10.0,
    min_target_epochs: int = 60,
) -> pa.Table:
    """One label per wear period: the second half's resting HR or mean ENMO (float_value)."""
    if target not in ("resting_hr", "mean_enmo"):
        raise ValueError(f"target must be 'resting_hr' or 'mean_enmo', got {target!r}")
    parts = [LABEL_SCHEMA_FLOAT.empty_table()]
    for part in subject_slices(wearables):
        sid, t, enmo, hr = _wear_columns(part)
        period, starts, span = _wear_periods(sid, t, max_gap_hours)
        counts = np.diff(np.append(starts, len(sid)))
        mid = starts + counts // 2
        second = np.arange(len(sid)) >= mid[period]
        if target == "resting_hr":
            use = second & np.isfinite(hr) & np.isfinite(enmo) & (enmo < rest_enmo_mg)
            val = hr
        else:
            use = second & np.isfinite(enmo)
            val = enmo
        n_use = np.bincount(period[use], minlength=len(starts))
        total = np.bincount(period[use], weights=val[use], minlength=len(starts))
        ok = (span >= int(min_period_hours * 3_600_000_000)) & (n_use >= min_target_epochs)
        parts.append(
            pa.table(
                {
                    "subject_id": pa.array(sid[mid[ok]], pa.int64()),
                    "prediction_time": pa.array(t[mid[ok]], pa.int64()).cast(pa.timestamp("us")),
                    "float_value": pa.array((total[ok] / n_use[ok]).astype(np.float32), pa.float32()),
                },
                schema=LABEL_SCHEMA_FLOAT,
            )
        )
    return validate_labels(pa.concat_tables(parts).combine_chunks())


# ------------------------------------------------------------------------------ task registry


class OnsetTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["onset"] = "onset"
    name: str
    outcome_code_prefix: str
    horizon_days: float = Field(gt=0)


class WearableTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["wearable_regression"] = "wearable_regression"
    name: str
    target: Literal["resting_hr", "mean_enmo"]


Task = OnsetTask | WearableTask


def default_tasks() -> dict[str, Task]:
    """onset_<disease>_<h>d for each disease x 30/90/180/365 d, plus the wearable tasks."""
    tasks: dict[str, Task] = {}
    for short, prefix in DISEASES.items():
        for h in DEFAULT_HORIZONS_DAYS:
            name = f"onset_{short}_{h}d"
            tasks[name] = OnsetTask(name=name, outcome_code_prefix=prefix, horizon_days=h)
    for target in ("resting_hr", "mean_enmo"):
        name = f"wearable_{target}"
        tasks[name] = WearableTask(name=name, target=target)
    return tasks


TASKS: dict[str, Task] = default_tasks()


def task_labels(
    site: SiteLike,
    tasks: Iterable[str | Task] | None = None,
    prediction_times: pa.Table | None = None,
    seed: int = 0,
    n_per_subject: int = 4,
) -> dict[str, pa.Table]:
    """Labels of several tasks, reading the site once (events and, if needed, wearables)."""
    chosen: list[Task] = []
    for t in TASKS.values() if tasks is None else tasks:
        if isinstance(t, str):
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; known: {sorted(TASKS)}")
            t = TASKS[t]
        chosen.append(t)
    out: dict[str, pa.Table] = {}
    onset = [t for t in chosen if isinstance(t, OnsetTask)]
    if onset:
        events = site.read_events(columns=["subject_id", "time", "code"])
        pts = prediction_times
        if pts is None:
            pts = visit_prediction_times(events, n_per_subject=n_per_subject, seed=seed)
        for t in onset:
            out[t.name] = onset_labels_from_events(events, t.outcome_code_prefix, t.horizon_days, pts)
    wear_tasks = [t for t in chosen if isinstance(t, WearableTask)]
    if wear_tasks:
        wearables = site.read_wearables()
        for t in wear_tasks:
            out[t.name] = wearable_regression_labels(wearables, target=t.target)
    return out


def write_labels(table: pa.Table, path: str | Path) -> Path:
    """Validate against meds.LabelSchema and write parquet atomically (temp file + rename)."""
    validate_labels(table)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_task_labels(labels: dict[str, pa.Table], out_dir: str | Path) -> list[Path]:
    """Write each task's labels to OUT_DIR/<task>.parquet (never under a site's data/)."""
    return [write_labels(tab, Path(out_dir) / f"{name}.parquet") for name, tab in sorted(labels.items())]


__all__: Sequence[str] = [
    "DEATH_CODE",
    "HELD_OUT_ROWS_PER_SUBJECT",
    "DISEASES",
    "OnsetTask",
    "TASKS",
    "Task",
    "WearableTask",
    "default_tasks",
    "onset_labels",
    "onset_labels_from_events",
    "task_labels",
    "validate_labels",
    "visit_prediction_times",
    "wearable_regression_labels",
    "write_labels",
    "write_task_labels",
]
