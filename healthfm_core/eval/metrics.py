"""Binary and regression metrics with seeded, vectorised bootstrap confidence intervals.

Every binary metric is written for sample *weights* so that one code path serves both the
point estimate (all weights 1) and the bootstrap: a bootstrap resample is the vector of how
many times each original sample was drawn. That turns B resamples into B rows of a
[B, n] count matrix and the metrics into a few matrix products over the original, sorted
scores, with no per-resample sorting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

ECE_BINS = 10
# Bootstrap resamples are processed in chunks so the [chunk, n] count matrix stays small.
_BOOTSTRAP_CELLS = 4_000_000


def _check_binary(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and scores must be 1-d of equal length, got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if y.dtype != bool:
        uniq = np.unique(y)
        if not np.isin(uniq, [0, 1]).all():
            raise ValueError(f"labels must be 0/1 or bool, got values {uniq[:5].tolist()}")
        y = y.astype(bool)
    if not np.isfinite(p).all():
        raise ValueError("scores contain NaN or Inf")
    return y, p


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """[B, n] float64 weights; None means the single unweighted sample."""
    if weights is None:
        return np.ones((1, n))
    w = np.asarray(weights, dtype=np.float64)
    return w[None, :] if w.ndim == 1 else w


def _tie_groups(p: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sample order by score and the start of each tie group in that order (equal scores
    form one group, so ties are handled as one threshold)."""
    key = -p if descending else p
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    return order, starts


def _group_sums(w: np.ndarray, mask: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[B, G]: per tie group, the weight of the samples selected by mask (O(B n), no [n, G] matrix)."""
    return np.add.reduceat(w[:, order] * mask[order], starts, axis=1)


def auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U).

    NaN when a class is absent. Returns a float, or one value per row of weights if 2-d.
    """
    y, p = _check_binary(y, p)
    w = _as_weights(weights, len(y))
    order, starts = _tie_groups(p, descending=False)
    pos = _group_sums(w, y, order, starts)
    neg = _group_sums(w, ~y, order, starts)
    neg_below = np.cumsum(neg, axis=1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    denom = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan)
    return _ret(out, weights)


def average_precision(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """AP = sum over thresholds of (recall step) x precision, tied scores forming one threshold
    (the step-wise, non-interpolated definition sklearn uses). NaN without positives."""
    y, p = _check_binary(y, p)
    w = _as_weights(weights, len(y))
    order, starts = _tie_groups(p, descending=True)
    pos = _group_sums(w, y, order, starts)
    neg = _group_sums(w, ~y, order, starts)
    tp = np.cumsum(pos, axis=1)
    fp = np.cumsum(neg, axis=1)
    total_pos = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        out = np.where(total_pos[:, 0] > 0, (pos * precision).sum(axis=1) / total_pos[:, 0], np.nan)
    return _ret(out, weights)


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None, n_bins: int = ECE_BINS
) -> np.ndarray | float:
    """Count-weighted ECE: sum_b (n_b / n) |mean(y)_b - mean(p)_b| over equal-width bins of
    [0, 1]; the last bin includes 1. Empty bins contribute nothing."""
    y, p = _check_binary(y, p)
    if (p < 0).any() or (p > 1).any():
        raise ValueError("ECE needs probabilities in [0, 1]")
    w = _as_weights(weights, len(y))
    bins = reliability_bins(p, n_bins)
    onehot = np.zeros((len(y), n_bins))
    onehot[np.arange(len(y)), bins] = 1.0
    count = w @ onehot
    sum_y = w @ (onehot * y[:, None])
    sum_p = w @ (onehot * p[:, None])
    # |sum_y - sum_p| / n equals (n_b / n) |mean_y - mean_p| per bin.
    out = np.abs(sum_y - sum_p).sum(axis=1) / count.sum(axis=1)
    return _ret(out, weights)


def brier_score(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Mean squared error between the probability and the 0/1 outcome."""
    y, p = _check_binary(y, p)
    w = _as_weights(weights, len(y))
    out = w @ (p - y) ** 2 / w.sum(axis=1)
    return _ret(out, weights)


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    y, p = _check_binary(y, p)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def reliability_bins(p: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin index of each probability, 1.0 falling in the last bin."""
    return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1)


def _ret(out: np.ndarray, weights: np.ndarray | None) -> np.ndarray | float:
    return float(out[0]) if weights is None or np.asarray(weights).ndim == 1 else out


def group_index(groups: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group number of each row [n], whether each group has a positive row [n_groups]): what
    resampling or dealing whole subjects, stratified by outcome, starts from."""
    if len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} rows")
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.ravel()
    has_pos = np.zeros(inv.max() + 1 if len(inv) else 0, dtype=bool)
    has_pos[inv[np.asarray(y, dtype=bool)]] = True
    return inv, has_pos


def bootstrap_counts(
    y: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    stratified: bool = True,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """[n_boot, n] resample multiplicities. Stratified: positives and negatives are resampled
    separately so every resample keeps both classes (rare outcomes otherwise give NaN AUROCs).

    With `groups` (e.g. the subject of each row) whole groups are resampled, every row of a
    group getting the group's multiplicity: rows of one subject (several prediction times) are
    not independent, and resampling them one by one gives intervals that are too narrow.
    Stratification is then by whether a group has any positive row."""
    n = len(y)
    if groups is not None:
        inv, has_pos = group_index(groups, y)
        return bootstrap_counts(has_pos, n_boot, rng, stratified)[:, inv]
    if not stratified:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    counts = np.zeros((n_boot, n))
    for cls in (True, False):
        idx = np.flatnonzero(np.asarray(y, dtype=bool) == cls)
        if len(idx):
            counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def bootstrap_ci(
    metric: Callable[..., np.ndarray | float],
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a weight-aware metric above (seeded, vectorised);
    `groups` resamples whole groups (subjects), see bootstrap_counts."""
    y, p = _check_binary(y, p)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOTSTRAP_CELLS // max(len(y), 1)))
    values = []
    for start in range(0, n_boot, chunk):
        counts = bootstrap_counts(y, min(chunk, n_boot - start), rng, stratified, groups)
        values.append(np.asarray(metric(y, p, weights=counts)))
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


MIN_INTERVAL_SUBJECTS = 2  # per class: with one positive subject every resample holds the same positive


def auroc_interval(
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
    alpha: float = 0.05,
) -> tuple[tuple[float, float], str | None]:
    """The subject-bootstrap interval of the AUROC (bootstrap_ci) and, when it is undefined, why:
    a single class, fewer than MIN_INTERVAL_SUBJECTS subjects with a positive row (or with only
    negative rows), or resamples that all give one value. Undefined is (NaN, NaN) with the reason,
    never a zero-width interval: the stratified resamples keep a lone positive in every draw, so
    its AUROC (0 or 1 on a handful of rows) would come back as [0, 0] or [1, 1]."""
    nan2 = (float("nan"), float("nan"))
    y = np.asarray(y, dtype=bool)
    if len(y) == 0:
        return nan2, "no rows"
    _, has_pos = group_index(np.arange(len(y)) if groups is None else np.asarray(groups), y)
    pos, neg = int(has_pos.sum()), int((~has_pos).sum())
    unit = "row" if groups is None else "subject"
    if pos == 0 or neg == 0:
        return nan2, f"a single class ({int(y.sum())} positives among {len(y)} rows)"
    if min(pos, neg) < MIN_INTERVAL_SUBJECTS:
        return nan2, (
            f"{pos} {unit}(s) with a positive, {neg} without: an interval needs {MIN_INTERVAL_SUBJECTS} of each"
        )
    lo, hi = bootstrap_ci(auroc, y, p, n_boot=n_boot, seed=seed, alpha=alpha, groups=groups)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return nan2, "no resample had both classes"
    if lo == hi:
        return nan2, f"all {n_boot} resamples gave AUROC {lo:.3f}: too few subjects for an interval"
    return (lo, hi), None


class PairedDifference(BaseModel):
    """Mean over tasks of metric(a) - metric(b) on the same rows, with a bootstrap interval."""

    model_config = ConfigDict(frozen=True)
    n_tasks: int
    mean: float
    ci: tuple[float, float]
    fraction_at_or_below_zero: float  # share of resamples where a does not beat b (a one-sided p-value)


def paired_resamples(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    metric: Callable[..., np.ndarray | float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both methods' metric per task, on the rows as they are and on `n_boot` subject resamples
    shared by every task and both methods: (point_a [T], point_b [T], boot_a [n_boot, T],
    boot_b [n_boot, T]). items: per task (y, p_a, p_b, group), both methods' scores on the same
    rows and the group (subject) of each row; a subject is drawn once for all tasks (stratified
    by whether it has any positive row in any task), so the correlation between tasks and between
    the two methods is kept. Any statistic of the two (a difference, a ratio of means) then gets
    its interval from the same resamples."""
    metric = auroc if metric is None else metric
    if not items:
        raise ValueError("a paired comparison needs at least one task")
    checked = []
    for y, pa_, pb, g in items:
        y, pa_ = _check_binary(y, pa_)
        _, pb = _check_binary(y, pb)
        if len(g) != len(y):
            raise ValueError(f"groups has {len(g)} entries for {len(y)} rows")
        checked.append((y, pa_, pb, np.asarray(g)))
    y_all = np.concatenate([y for y, *_ in checked])
    g_all = np.concatenate([g for *_, g in checked])
    bounds = np.cumsum([0] + [len(y) for y, *_ in checked])

    def both(weights: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        # weights[i]: task i's sample weights (None: unweighted) -> ([.., T], [.., T]).
        a = [np.asarray(metric(y, pa_, weights=w)) for (y, pa_, _, _), w in zip(checked, weights)]
        b = [np.asarray(metric(y, pb, weights=w)) for (y, _, pb, _), w in zip(checked, weights)]
        return np.stack(a, axis=-1), np.stack(b, axis=-1)

    point_a, point_b = both([None] * len(checked))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOTSTRAP_CELLS // max(bounds[-1], 1)))
    boot_a, boot_b = [], []
    for start in range(0, n_boot, chunk):
        draws = bootstrap_counts(y_all, min(chunk, n_boot - start), rng, groups=g_all)  # [chunk, all rows]
        a, b = both([draws[:, bounds[i] : bounds[i + 1]] for i in range(len(checked))])
        boot_a.append(a)
        boot_b.append(b)
    return point_a, point_b, np.concatenate(boot_a), np.concatenate(boot_b)


def row_set_resamples(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    metric: Callable[..., np.ndarray | float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """paired_resamples for items (y_a, p_a, group_a, y_b, p_b, group_b) whose two methods score
    rows of their own: every row of every item and both sets gets its subject's multiplicity from
    one draw of the subjects (stratified by whether a subject has a positive row anywhere), so the
    two metrics stay paired by subject. -> (point_a [T], point_b [T], boot_a, boot_b [n_boot, T])."""
    metric = auroc if metric is None else metric
    if not items:
        raise ValueError("a row-set comparison needs at least one task")
    sets: list[tuple[np.ndarray, np.ndarray]] = []
    groups = []
    for ya, pa_, ga, yb, pb, gb in items:
        for y, p, g in ((ya, pa_, ga), (yb, pb, gb)):
            y, p = _check_binary(y, p)
            if len(g) != len(y):
                raise ValueError(f"groups has {len(g)} entries for {len(y)} rows")
            sets.append((y, p))
            groups.append(np.asarray(g))
    y_all = np.concatenate([y for y, _ in sets])
    g_all = np.concatenate(groups)
    bounds = np.cumsum([0] + [len(y) for y, _ in sets])

    def scores(weights: Sequence[np.ndarray | None]) -> np.ndarray:  # [.., 2T]: a, b of each item in turn
        return np.stack([np.asarray(metric(y, p, weights=w)) for (y, p), w in zip(sets, weights)], axis=-1)

    point = scores([None] * len(sets))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOTSTRAP_CELLS // max(bounds[-1], 1)))
    boot = []
    for start in range(0, n_boot, chunk):
        draws = bootstrap_counts(y_all, min(chunk, n_boot - start), rng, groups=g_all)
        boot.append(scores([draws[:, bounds[i] : bounds[i + 1]] for i in range(len(sets))]))
    b = np.concatenate(boot)
    return point[0::2], point[1::2], b[:, 0::2], b[:, 1::2]


def paired_difference(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    metric: Callable[..., np.ndarray | float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedDifference:
    """Is method a better than method b over several tasks scored on the same subjects?

    items: per task (y, p_a, p_b, group), as `paired_resamples` takes them. The interval is for
    the mean difference itself (subjects resampled once for all tasks and both methods), much
    narrower than the two methods' separate intervals suggest when their errors are correlated.
    """
    if not items:
        raise ValueError("paired_difference needs at least one task")
    point_a, point_b, boot_a, boot_b = paired_resamples(items, metric, n_boot, seed)
    point = float(np.mean(point_a - point_b))
    v = np.mean(boot_a - boot_b, axis=1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return PairedDifference(
            n_tasks=len(items), mean=point, ci=(float("nan"), float("nan")), fraction_at_or_below_zero=float("nan")
        )
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return PairedDifference(
        n_tasks=len(items), mean=point, ci=(float(lo), float(hi)), fraction_at_or_below_zero=float(np.mean(v <= 0))
    )


class BinaryMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)
    n: int
    n_pos: int
    auroc: float
    auroc_ci: tuple[float, float]
    auprc: float
    auprc_ci: tuple[float, float]
    ece: float
    brier: float


def binary_metrics(
    y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> BinaryMetrics:
    """All binary metrics of one (labels, probabilities) pair, with bootstrap CIs."""
    y, p = _check_binary(y, p)
    both = bool(y.any() and (~y).any())
    nan_ci = (float("nan"), float("nan"))
    return BinaryMetrics(
        n=len(y),
        n_pos=int(y.sum()),
        auroc=float(auroc(y, p)),
        auroc_ci=bootstrap_ci(auroc, y, p, n_boot, seed, alpha) if both else nan_ci,
        auprc=float(average_precision(y, p)),
        auprc_ci=bootstrap_ci(average_precision, y, p, n_boot, seed, alpha) if both else nan_ci,
        ece=float(expected_calibration_error(y, p)),
        brier=float(brier_score(y, p)),
    )


# ---------------------------------------------------------------- regression


def r2_score(y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Coefficient of determination 1 - SSE/SST (weighted per bootstrap row)."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    w = _as_weights(weights, len(y))
    wsum = w.sum(axis=1, keepdims=True)
    mean = (w @ y)[:, None] / wsum
    sse = w @ (y - pred) ** 2
    sst = (w * (y[None, :] - mean) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)
    return _ret(out, weights)


class RegressionMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)
    n: int
    r2: float
    r2_ci: tuple[float, float]
    mae: float
    pearson_r: float


def regression_metrics(
    y: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> RegressionMetrics:
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if y.shape != pred.shape or y.ndim != 1:
        raise ValueError(f"targets and predictions must be 1-d of equal length, got {y.shape} and {pred.shape}")
    if not (np.isfinite(y).all() and np.isfinite(pred).all()):
        raise ValueError("targets or predictions contain NaN or Inf")
    rng = np.random.default_rng(seed)
    n = len(y)
    chunk = max(1, min(n_boot, _BOOTSTRAP_CELLS // max(n, 1)))
    boots = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - start)).astype(np.float64)
        boots.append(np.asarray(r2_score(y, pred, weights=counts)))
    v = np.concatenate(boots)
    v = v[np.isfinite(v)]
    ci = (float("nan"), float("nan"))
    if len(v):
        lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
        ci = (float(lo), float(hi))
    r = float(np.corrcoef(y, pred)[0, 1]) if n > 1 and y.std() > 0 and pred.std() > 0 else float("nan")
    return RegressionMetrics(
        n=n, r2=float(r2_score(y, pred)), r2_ci=ci, mae=float(np.abs(y - pred).mean()), pearson_r=r
    )
