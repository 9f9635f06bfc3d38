"""MEDS-Tab, the tabular baseline MEDS-DEV reports: XGBoost on windowed aggregates of a subject's
MEDS events up to each prediction time, reimplemented from meds-tab's source.

Followed: meds-tab 0.2.0 (the PyPI wheel meds_tab-0.2.0-py3-none-any.whl), package
MEDS_tabular_automl:
- configs/tabularization/default.yaml: window_sizes [1d, 7d, 30d, 365d, full]; aggs static/present,
  static/first, code/count, value/count, value/sum, value/sum_sqd, value/min, value/max;
  min_code_inclusion_count 10 (other filters null).
- describe_codes.py (compute_feature_frequencies, filter_parquet): a feature per code and kind
  (`<code>/code` for timed rows, `<code>/value` for timed rows with a numeric value,
  `<code>/static/present` for static rows, `<code>/static/first` for static rows with a value),
  kept when its row count reaches min_code_inclusion_count; utils.filter_to_codes. Counted here
  over the train split's subjects (meds-tab counts the shards it is given).
- generate_summarized_reps.py (get_rolling_window_indicies): a label row's windows end at the
  subject's last kept timed event at or before prediction_time (join_asof, backward: later events
  are never read; a row with none has empty windows) and span (end - size, end] (polars rolling,
  closed right); "full" is 150 x 52 weeks.
- generate_static_features.py: static/present 1 where the subject has the static code,
  static/first the mean of its static values of the code; the same for every row of a subject.
- xgboost_model.py and configs/model_launcher/xgboost.yaml: xgb.train with booster gbtree, device
  cpu, nthread 1, tree_method hist, objective binary:logistic and XGBoost's other defaults,
  num_boost_round 1000, early_stopping_rounds 5 on the tuning split (its last eval set, logloss).
  MEDS-DEV sweeps hyperparameters with optuna; this baseline uses the defaults.

Deviation, on purpose: meds-tab 0.2.0 aggregates twice (per timestamp, then over the window) with
the same operator on scipy sparse matrices, so its code/count counts timestamps, value/sum_sqd
squares per-timestamp sums and value/min / value/max take implicit zeros into account. Here each
aggregation is what its name says over the window's events: code/count the events of the code,
value/count those with a value, value/sum, value/sum_sqd (sum of squares), value/min, value/max of
their values; static/first averages the subject's static rows of the code only (0.2.0 also
averages any timed rows of a code that is static too). As in meds-tab, an aggregate of 0 is not
stored (sparse), and XGBoost reads a missing entry as missing. Run on tests/unit/test_meds_tab.py's
events (the wheel unpacked, not installed), 0.2.0's own get_flat_ts_rep + generate_summary gave
no value feature at all (get_long_value_df matches codes against feature names such as
"L/value") and code/count totals of 58 where the events number 795 (its per-timestamp step slices
[first, last) of each timestamp's rows, dropping single-event timestamps): what it computes is
not what its names and docs say, so this module follows the names.

Why the package is not used: meds-tab 0.2.0 pins meds-evaluation==0.0.3 (the stack has 0.0.6),
needs meds-transforms, hydra-optuna-sweeper and hydra-joblib-launcher, and plain `xgboost`, which
pulls a 351 MB CUDA NCCL wheel; `xgboost-cpu` is the same library without it.

Cost: the events are sorted once by (subject, code, time) (n log n); then linear in the events
and in the (row, code) pairs of a row's subject that the "full" window holds (at most the stored
values): counts and sums are differences of running sums within each (subject, code) at two
binary-searched bounds per (row, code, window); a minimum or maximum is the running one where the
window starts at the subject's first event of the code (always for "full") and a ufunc.reduceat
over the window's events otherwise (at most a year of the code's events). No Python loop runs
per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # scipy is imported where features are built: a site that never evaluates never loads it
    import scipy.sparse as sp

WINDOW_SIZES: tuple[str, ...] = ("1d", "7d", "30d", "365d", "full")
CODE_AGGREGATIONS: tuple[str, ...] = ("code/count",)
VALUE_AGGREGATIONS: tuple[str, ...] = ("value/count", "value/sum", "value/sum_sqd", "value/min", "value/max")
TS_AGGREGATIONS: tuple[str, ...] = CODE_AGGREGATIONS + VALUE_AGGREGATIONS
STATIC_AGGREGATIONS: tuple[str, ...] = ("static/present", "static/first")
MIN_CODE_INCLUSION_COUNT = 10
US_PER_DAY = 86_400_000_000
FULL_WINDOW_DAYS = 150 * 52 * 7  # meds-tab: pd.Timedelta(150 * 52, unit="W")
XGBOOST_PARAMS: dict[str, str | int] = {
    "booster": "gbtree",
    "device": "cpu",
    "nthread": 1,
    "tree_method": "hist",
    "objective": "binary:logistic",
}
NUM_BOOST_ROUND = 1000
EARLY_STOPPING_ROUNDS = 5
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")


def window_days(size: str) -> int:
    """Days of a meds-tab window size: "<n>d" or "full"."""
    if size == "full":
        return FULL_WINDOW_DAYS
    if size.endswith("d") and size[:-1].isdigit() and int(size[:-1]) > 0:
        return int(size[:-1])
    raise ValueError(f"window size {size!r}: expected '<days>d' (e.g. 7d) or 'full'")


@dataclass(frozen=True)
class MedsTabFeatures:
    """The codes kept for each kind of feature (sorted), the windows and aggregations."""

    code: tuple[str, ...]  # timed codes: code/count
    value: tuple[str, ...]  # timed codes with values: value/*
    static_present: tuple[str, ...]
    static_first: tuple[str, ...]
    windows: tuple[str, ...] = WINDOW_SIZES
    aggregations: tuple[str, ...] = TS_AGGREGATIONS + STATIC_AGGREGATIONS

    def __post_init__(self) -> None:
        for size in self.windows:
            window_days(size)
        unknown = sorted(set(self.aggregations) - set(TS_AGGREGATIONS + STATIC_AGGREGATIONS))
        if unknown:
            raise ValueError(f"aggregation {unknown[0]!r}: expected one of {TS_AGGREGATIONS + STATIC_AGGREGATIONS}")

    def blocks(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(window or "static", aggregation, codes) of each block of columns, in column order."""
        out = []
        for size in self.windows:
            for agg in TS_AGGREGATIONS:
                if agg in self.aggregations:
                    out.append((size, agg, self.code if agg in CODE_AGGREGATIONS else self.value))
        for agg, codes in zip(STATIC_AGGREGATIONS, (self.static_present, self.static_first), strict=True):
            if agg in self.aggregations:
                out.append(("static", agg, codes))
        return out

    def names(self) -> list[str]:
        """Column names as meds-tab writes them: <code>/<aggregation>/<window> (static: no window)."""
        return [
            f"{c}/{agg}" if size == "static" else f"{c}/{agg}/{size}"
            for size, agg, codes in self.blocks()
            for c in codes
        ]

    @property
    def n_features(self) -> int:
        return sum(len(codes) for _, _, codes in self.blocks())


def _columns(events: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.ChunkedArray, np.ndarray]:
    """subject ids, timed mask, times (int64 us, 0 where static), codes, values (NaN: none)."""
    missing = [c for c in EVENT_COLUMNS if c not in events.column_names]
    if missing:
        raise ValueError(f"events: column {missing[0]!r} missing (have {events.column_names})")
    subject = events["subject_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    time = events["time"]
    timed = pc.is_valid(time).to_numpy(zero_copy_only=False)
    t = (
        pc.fill_null(pc.cast(pc.cast(time, pa.timestamp("us")), pa.int64()), 0)
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    value = pc.cast(events["numeric_value"], pa.float64()).to_numpy(zero_copy_only=False)
    value = np.where(np.isfinite(value), value, np.nan)
    return subject, timed, t, events["code"], value


def describe_codes(events: pa.Table, min_code_inclusion_count: int = MIN_CODE_INCLUSION_COUNT) -> MedsTabFeatures:
    """The features of these events (meds-tab's describe step and code filter): each code and kind
    whose row count is at least `min_code_inclusion_count`."""
    _, timed, _, code, value = _columns(events)
    has_value = ~np.isnan(value)

    def kept(mask: np.ndarray) -> tuple[str, ...]:
        counts = pc.value_counts(code.filter(pa.array(mask)))
        names = counts.field("values").to_pylist()
        n = counts.field("counts").to_numpy()
        return tuple(
            sorted(str(c) for c, k in zip(names, n, strict=True) if c is not None and k >= min_code_inclusion_count)
        )

    return MedsTabFeatures(
        code=kept(timed),
        value=kept(timed & has_value),
        static_present=kept(~timed),
        static_first=kept(~timed & has_value),
    )


def _index_in(code: pa.ChunkedArray, codes: Sequence[str]) -> np.ndarray:
    """Each row's position in `codes` (-1: not among them)."""
    found = pc.index_in(pc.cast(code, pa.large_string()), value_set=pa.array(list(codes), pa.large_string()))
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


class _SortedPairs:
    """(major, minor) pairs sorted lexicographically, major dense ids (0, 1, ...): where a query
    pair goes (searchsorted, side right) through one int64 key per pair. The minor values are
    ranked once among the pairs' own distinct values, so a query costs a binary search, no sort."""

    def __init__(self, major: np.ndarray, minor: np.ndarray) -> None:
        self.values = np.unique(minor)
        self.width = np.int64(len(self.values) + 1)
        if (int(major.max(initial=0)) + 1) * int(self.width) >= 2**62:
            raise ValueError("too many distinct keys to search in one pass")
        self.key = major.astype(np.int64) * self.width + np.searchsorted(self.values, minor, side="right")

    def right(self, q_major: np.ndarray, q_minor: np.ndarray) -> np.ndarray:
        """Per query, the number of pairs at or before it: (major, minor) <= (q_major, q_minor)."""
        rank = np.searchsorted(self.values, q_minor, side="right")  # distinct values <= the query's
        return np.searchsorted(self.key, q_major.astype(np.int64) * self.width + rank, side="right")


@dataclass(frozen=True)
class _Groups:
    """Events sorted by (subject, feature code, time), cut into (subject, code) groups."""

    time: np.ndarray
    value: np.ndarray
    group: np.ndarray  # per event: its group
    subject: np.ndarray  # per group
    code: np.ndarray  # per group: position among the feature's codes
    start: np.ndarray  # per group: first event
    first_time: np.ndarray  # per group


def _groups(subject: np.ndarray, code: np.ndarray, time: np.ndarray, value: np.ndarray) -> _Groups:
    order = np.lexsort((time, code, subject))
    subject, code, time, value = subject[order], code[order], time[order], value[order]
    new = np.ones(len(subject), bool)
    if len(subject):
        new[1:] = (subject[1:] != subject[:-1]) | (code[1:] != code[:-1])
    start = np.flatnonzero(new)
    return _Groups(
        time=time,
        value=value,
        group=np.cumsum(new) - 1,
        subject=subject[start],
        code=code[start],
        start=start,
        first_time=time[start],
    )


def _pairs(row_subject: np.ndarray, group_subject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, group) whose group belongs to the row's subject: (pair rows, pair groups)."""
    lo = np.searchsorted(group_subject, row_subject, side="left")
    hi = np.searchsorted(group_subject, row_subject, side="right")
    counts = hi - lo
    rows = np.repeat(np.arange(len(row_subject)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(lo, counts) + offsets


def _window_reduce(values: np.ndarray, a: np.ndarray, b: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """ufunc.reduce of values[a:b] per (a, b), every b > a, in C: the gaps between windows (sorted
    by start) cost at most len(values) in all."""
    if len(a) == 0:
        return np.zeros(0)
    order = np.argsort(a, kind="stable")
    idx = np.empty(2 * len(a), np.int64)
    idx[0::2], idx[1::2] = a[order], b[order]
    out = np.empty(len(a))
    out[order] = ufunc.reduceat(np.append(values, 0.0), idx)[0::2]
    return out


def _running(values: np.ndarray, group: np.ndarray, how: str) -> np.ndarray:
    """Per event, the sum, minimum or maximum of its group's values up to it."""
    frame = pl.DataFrame({"g": group, "v": values})
    col = {"min": pl.col("v").cum_min(), "max": pl.col("v").cum_max()}.get(how, pl.col("v").cum_sum())
    return frame.select(col.over("g"))["v"].to_numpy()


def tabularize(
    events: pa.Table, subject_id: np.ndarray, prediction_time: np.ndarray, features: MedsTabFeatures
) -> sp.csr_matrix:
    """[rows, features.n_features] sparse features of the label rows (subject_id int64,
    prediction_time int64 microseconds), columns in features.names() order. `events`: MEDS events
    (subject_id, time, code, numeric_value) holding at least the rows' subjects; any order."""
    row_subject = np.asarray(subject_id, np.int64)
    row_time = np.asarray(prediction_time, np.int64)
    if row_subject.shape != row_time.shape or row_subject.ndim != 1:
        raise ValueError(f"subject_id {row_subject.shape} and prediction_time {row_time.shape}: two equal 1-d arrays")
    subject, timed, t, code, value = _columns(events)
    code_idx = _index_in(code, features.code)
    value_idx = _index_in(code, features.value)
    n_rows = len(row_subject)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    data: list[np.ndarray] = []

    def put(offset: int, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
        keep = v != 0
        rows.append(r[keep])
        cols.append(offset + c[keep])
        data.append(v[keep])

    # The window's end: the subject's last kept timed event at or before prediction_time.
    kept = timed & (code_idx >= 0)
    order = np.lexsort((t[kept], subject[kept]))
    ev_subject, ev_time = subject[kept][order], t[kept][order]
    known = np.unique(ev_subject)
    dense = np.minimum(np.searchsorted(known, row_subject), max(len(known) - 1, 0))
    has_end = np.zeros(n_rows, bool)
    end = np.full(n_rows, np.iinfo(np.int64).min)
    if len(known):
        pos = _SortedPairs(np.searchsorted(known, ev_subject), ev_time).right(dense, row_time)
        has_end = (known[dense] == row_subject) & (pos > 0)
        has_end &= ev_subject[np.maximum(pos - 1, 0)] == row_subject
        end = np.where(has_end, ev_time[np.maximum(pos - 1, 0)], end)

    code_groups = _groups(subject[kept], code_idx[kept], t[kept], np.ones(int(kept.sum())))
    with_value = timed & (value_idx >= 0) & ~np.isnan(value)
    value_groups = _groups(subject[with_value], value_idx[with_value], t[with_value], value[with_value])
    prepared = {}
    for name, g in (("code", code_groups), ("value", value_groups)):
        r, grp = _pairs(row_subject, g.subject)
        live = has_end[r] & (g.first_time[grp] <= end[r])  # other pairs are empty in every window
        prepared[name] = (g, r[live], grp[live], _SortedPairs(g.group, g.time))
    # Running sums, extremes within each (subject, code) group: a window's sum is the difference of
    # two running sums of its own group (no rounding carried over from other subjects).
    running = {
        how: _running(v, value_groups.group, how)
        for how, v in (
            ("sum", value_groups.value),
            ("sum_sqd", value_groups.value**2),
            ("min", value_groups.value),
            ("max", value_groups.value),
        )
    }
    bounds: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # the value aggregations share them
    offset = 0
    for size, agg, codes in features.blocks():
        if size == "static":
            break
        kind_of_code = "code" if agg in CODE_AGGREGATIONS else "value"
        g, r, grp, search = prepared[kind_of_code]
        if (kind_of_code, size) not in bounds:
            hi = end[r]
            lo = hi - window_days(size) * US_PER_DAY
            bounds[kind_of_code, size] = (search.right(grp, lo), search.right(grp, hi))
        a, b = bounds[kind_of_code, size]
        count = b - a
        some = count > 0
        kind = agg.split("/")[1]
        if kind == "count":
            v = count.astype(np.float64)
        elif kind in ("sum", "sum_sqd"):
            v = np.where(some, running[kind][np.maximum(b - 1, 0)], 0.0)
            drop = some & (a > g.start[grp])  # the part of the group before the window
            v[drop] -= running[kind][a[drop] - 1]
        else:
            v = np.zeros(len(r))
            prefix = some & (a == g.start[grp])  # the window holds the group's first event
            v[prefix] = running[kind][b[prefix] - 1]
            inner = some & ~prefix
            v[inner] = _window_reduce(g.value, a[inner], b[inner], np.minimum if kind == "min" else np.maximum)
        put(offset, r[some], g.code[grp][some], v[some])
        offset += len(codes)

    # Static features: the same for every row of a subject.
    static_rows = ~timed
    for agg, codes in zip(STATIC_AGGREGATIONS, (features.static_present, features.static_first), strict=True):
        if agg not in features.aggregations:
            continue
        idx = _index_in(code, codes)
        mask = static_rows & (idx >= 0)
        if agg == "static/first":
            mask &= ~np.isnan(value)
        frame = (
            pl.DataFrame({"s": subject[mask], "c": idx[mask], "v": value[mask]})
            .group_by(["s", "c"])
            .agg(pl.col("v").mean(), pl.len().alias("n"))
            .sort(["s", "c"])
        )
        s, c = frame["s"].to_numpy(), frame["c"].to_numpy()
        v = np.ones(len(s)) if agg == "static/present" else frame["v"].to_numpy().astype(np.float64)
        r, grp = _pairs(row_subject, s)
        put(offset, r, c[grp], v[grp])
        offset += len(codes)

    import scipy.sparse as sp

    return sp.csr_matrix(
        (
            np.concatenate([*data, np.zeros(0)]),
            (np.concatenate([*rows, np.zeros(0, np.int64)]), np.concatenate([*cols, np.zeros(0, np.int64)])),
        ),
        shape=(n_rows, features.n_features),
    )


@dataclass
class MedsTabModel:
    """A fitted XGBoost booster and the round early stopping kept."""

    booster: object  # xgboost.Booster (typed loosely: xgboost is imported where a model is fitted)
    best_iteration: int

    def predict_proba(self, x: sp.csr_matrix) -> np.ndarray:
        """P(label) per row, from the trees up to the best round on the tuning split."""
        import xgboost as xgb

        booster = self.booster
        if not isinstance(booster, xgb.Booster):
            raise TypeError(f"booster: {type(booster).__name__}, expected xgboost.Booster")
        return np.asarray(booster.predict(xgb.DMatrix(x), iteration_range=(0, self.best_iteration + 1)), np.float64)


def fit_xgboost(
    x_train: sp.csr_matrix, y_train: np.ndarray, x_tuning: sp.csr_matrix, y_tuning: np.ndarray, seed: int = 0
) -> MedsTabModel:
    """meds-tab's XGBoost: its parameters, up to NUM_BOOST_ROUND rounds, early stopping after
    EARLY_STOPPING_ROUNDS rounds without a better tuning logloss."""
    # Imported here: xgboost loads its native library (~0.3 s), needed only when MEDS-Tab runs.
    import xgboost as xgb

    dtrain = xgb.DMatrix(x_train, label=np.asarray(y_train, np.float32))
    dtuning = xgb.DMatrix(x_tuning, label=np.asarray(y_tuning, np.float32))
    booster = xgb.train(
        {**XGBOOST_PARAMS, "seed": seed},
        dtrain,
        num_boost_round=NUM_BOOST_ROUND,
        early_stopping_rounds=EARLY_STOPPING_ROUNDS,
        evals=[(dtrain, "train"), (dtuning, "tuning")],
        verbose_eval=False,
    )
    return MedsTabModel(booster=booster, best_iteration=int(booster.best_iteration))


__all__ = [
    "EVENT_COLUMNS",
    "MIN_CODE_INCLUSION_COUNT",
    "STATIC_AGGREGATIONS",
    "TS_AGGREGATIONS",
    "WINDOW_SIZES",
    "MedsTabFeatures",
    "MedsTabModel",
    "describe_codes",
    "fit_xgboost",
    "tabularize",
    "window_days",
]
