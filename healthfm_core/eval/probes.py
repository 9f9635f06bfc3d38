"""Frozen-representation evaluation: embeddings at prediction_time, linear probes, baselines.

The model is frozen; only a linear map on top of its embedding is fitted, on the train split,
with the L2 strength chosen on the tuning split and metrics reported on held_out. The same
probe runs on simple count features (the baseline a foundation model must beat) so the
comparison isolates the representation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.eval import metrics as M
from healthfm_core.eval.report import RegressionRow, ResultRow
from healthfm_core.model.capabilities import Embedder
from healthfm_core.terms.site_layout import SPLITS

log = logging.getLogger(__name__)

DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_ALPHA_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Two AUROCs closer than this are a tie; the better log-loss (calibration) then decides.
AUROC_TIE = 2e-3


# ---------------------------------------------------------------- features


@dataclass
class Features:
    """One row per (subject, prediction_time) sample, in the order the loader yielded them."""

    subject_id: np.ndarray  # [n] int64
    prediction_time: np.ndarray  # [n] float64 days from the subject's first event
    x: np.ndarray  # [n, d] float64
    y: np.ndarray | None = None  # [n] labels when the loader yields (Batch, labels)

    def __len__(self) -> int:
        return len(self.subject_id)


def _collect(batches: Iterable[Batch | tuple[Batch, torch.Tensor]], featurize, desc: str, progress: bool) -> Features:
    sids, times, xs, ys = [], [], [], []
    for item in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch, labels = item if isinstance(item, tuple) else (item, None)
        xs.append(featurize(batch).detach().to("cpu", torch.float64).numpy())
        sids.append(batch.subject_id.cpu().numpy())
        times.append(batch.prediction_time.cpu().double().numpy())
        if labels is not None:
            ys.append(labels.cpu().double().numpy())
    if not xs:
        raise ValueError(f"{desc}: the loader yielded no batches")
    if ys and len(ys) != len(xs):
        raise ValueError(f"{desc}: some batches came with labels and some without")
    return Features(np.concatenate(sids), np.concatenate(times), np.concatenate(xs), np.concatenate(ys) if ys else None)


def compute_embeddings(
    model: torch.nn.Module,
    batches: Iterable[Batch | tuple[Batch, torch.Tensor]],
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Features:
    """model.embed(batch) for every labelled sample: eval mode, under torch.inference_mode (no
    gradients, no autograd bookkeeping: the same numbers as no_grad, less overhead). The batches hold
    only data at or before each prediction_time (the pipeline's guarantee), so the embedding is
    the representation at prediction_time. The model's training mode is restored afterwards."""
    if not isinstance(model, Embedder):
        raise TypeError(f"compute_embeddings: model {type(model).__name__} has no embed method")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _collect(batches, lambda b: model.embed(b.to(device)).float(), "embeddings", progress)
    finally:
        model.train(was_training)


def count_features(batch: Batch, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] log1p of the number of tokens each code occurs in, over the batch's
    valid EHR tokens (which the pipeline caps to the most recent max_events before prediction_time)."""
    codes = batch.codes.long().flatten(1)
    if codes.numel() and int(codes.max()) >= vocab_size:
        raise ValueError(f"code id {int(codes.max())} is outside the vocabulary of size {vocab_size}")
    counts = torch.zeros(codes.shape[0], vocab_size, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes, batch.code_valid.flatten(1).to(torch.float64))
    return torch.log1p(counts)


def compute_count_features(
    batches: Iterable[Batch | tuple[Batch, torch.Tensor]], vocab_size: int, progress: bool = False
) -> Features:
    """The count-features baseline over a loader of labelled samples."""
    return _collect(batches, lambda b: count_features(b, vocab_size), "count features", progress)


# ---------------------------------------------------------------- standardisation


@dataclass
class Standardizer:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, dtype=np.float64)
        scale = x.std(axis=0)
        # A constant feature stays 0 after centring rather than dividing by zero.
        return cls(x.mean(axis=0), np.where(scale > 1e-12, scale, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: features must be [n, d] and targets [n], got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or Inf")


# ---------------------------------------------------------------- logistic probe


# Newton's method up to this many features (the model's embeddings: d_model 32-256); L-BFGS above
# (count-feature baselines: one feature per vocabulary code, where a [d, d] Hessian per step costs
# more than L-BFGS's gradients).
NEWTON_MAX_FEATURES = 256
# Either solver stops at this largest gradient entry of the mean objective; a gradient of 1e-7
# moves AUROCs by ~1e-6, so tighter only costs time.
LOGISTIC_GTOL = 1e-7


def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float, init: tuple[np.ndarray, float] | None = None, max_iter: int = 500
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression on (already standardised) x, sklearn's convention:
    minimise C * sum(log-loss) + ||w||^2 / 2, bias unpenalised, in float64.

    The objective is strictly convex in w, so both solvers reach the one optimum: damped Newton
    steps (the exact Hessian, a backtracking line search) for up to NEWTON_MAX_FEATURES features,
    L-BFGS-B (scipy) above. On a model's embeddings, which are correlated and badly scaled, Newton
    takes a handful of steps where L-BFGS took ~70 gradient evaluations: the 8 binary tasks of the
    default scenario's city hospital (3,000-5,200 train rows, 32 features, the C grid each) went
    from 0.58 s to 0.19 s, the same C chosen, probabilities within 2e-5. scipy, not
    torch.optim.LBFGS: the first torch optimiser built in a process imports torch._dynamo (1.3-2.2 s
    measured), which a site's evaluation paid in every cold ClientApp."""
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    n, d = xs.shape
    if init is not None:
        theta0 = np.append(np.asarray(init[0], dtype=np.float64), float(init[1]))
    else:
        prevalence = min(max(float(ys.mean()), 1e-6), 1 - 1e-6)
        theta0 = np.append(np.zeros(d), np.log(prevalence / (1 - prevalence)))
    # Dividing the objective by C * n keeps its scale independent of n and C for the optimiser.
    penalty = 1.0 / (2.0 * c * n)
    if d <= NEWTON_MAX_FEATURES:
        theta = _newton_logistic(xs, ys, penalty, theta0, max_iter)
    else:
        theta = _lbfgs_logistic(xs, ys, penalty, theta0, max_iter)
    return theta[:d].copy(), float(theta[d])


def _logistic_objective(xs: np.ndarray, ys: np.ndarray, penalty: float, theta: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean objective at theta = (w, b) and its logits."""
    w, b = theta[:-1], theta[-1]
    logits = xs @ w + b
    return float(np.mean(np.logaddexp(0.0, logits) - ys * logits)) + penalty * float(w @ w), logits


def _newton_logistic(xs: np.ndarray, ys: np.ndarray, penalty: float, theta: np.ndarray, max_iter: int) -> np.ndarray:
    n, d = xs.shape
    ridge = np.full(d + 1, 2.0 * penalty)
    ridge[d] = 0.0  # the bias is not penalised
    loss, logits = _logistic_objective(xs, ys, penalty, theta)
    for _ in range(max_iter):
        p = _sigmoid(logits)
        r = (p - ys) / n
        grad = np.append(xs.T @ r, r.sum()) + ridge * theta
        if np.abs(grad).max() <= LOGISTIC_GTOL:
            break
        s = p * (1.0 - p) / n
        xw = xs * s[:, None]
        hess = np.empty((d + 1, d + 1))
        hess[:d, :d] = xw.T @ xs
        hess[:d, d] = hess[d, :d] = xw.sum(axis=0)
        hess[d, d] = s.sum()
        hess[np.diag_indices(d + 1)] += ridge
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # every probability saturated: the gradient alone
            step = grad
        decrease = float(grad @ step)
        t = 1.0
        while True:  # Armijo backtracking; the objective's rounding allowed for near the optimum
            cand = theta - t * step
            cand_loss, cand_logits = _logistic_objective(xs, ys, penalty, cand)
            if cand_loss <= loss - 1e-4 * t * decrease + 1e-15 * abs(loss) or t < 1e-12:
                break
            t *= 0.5
        if t < 1e-12:  # no step lowers the objective: as close as float64 gets
            break
        theta, loss, logits = cand, cand_loss, cand_logits
    return theta


def _lbfgs_logistic(xs: np.ndarray, ys: np.ndarray, penalty: float, theta0: np.ndarray, max_iter: int) -> np.ndarray:
    n, d = xs.shape

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        loss, logits = _logistic_objective(xs, ys, penalty, theta)
        residual = (_sigmoid(logits) - ys) / n
        return loss, np.append(xs.T @ residual + (2.0 * penalty) * theta[:d], residual.sum())

    # Imported here, not with the module: a site process loads this module at start and scipy only
    # when it evaluates (tests/unit/test_lean_site_process.py).
    from scipy.optimize import minimize

    fit = minimize(
        loss_and_grad,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxcor": 20, "gtol": LOGISTIC_GTOL, "ftol": 1e-14},
    )
    return np.asarray(fit.x)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class LogisticProbe:
    standardizer: Standardizer
    weight: np.ndarray
    bias: float
    c: float
    tuning_auroc: float
    tuning_log_loss: float

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return self.standardizer.transform(x) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))


def fit_logistic_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    select_by: Literal["auroc", "log_loss"] = "auroc",
) -> LogisticProbe:
    """Fit on train for each C of the grid (strongest penalty first, warm-started), keep the C
    with the best tuning AUROC (near-ties, or a one-class tuning split, decided by log-loss)."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_tune = np.asarray(x_tune, dtype=np.float64)
    y_train = np.asarray(y_train).astype(bool)
    y_tune = np.asarray(y_tune).astype(bool)
    _check_xy(x_train, y_train, "train split")
    _check_xy(x_tune, y_tune, "tuning split")
    if y_train.all() or not y_train.any():
        raise ValueError(f"train split has only one class ({int(y_train.sum())} positives of {len(y_train)})")
    if len(y_tune) == 0:
        raise ValueError("tuning split is empty")
    std = Standardizer.fit(x_train)
    xs_train, xs_tune = std.transform(x_train), std.transform(x_tune)
    tune_has_both = bool(y_tune.any() and (~y_tune).any())
    best: LogisticProbe | None = None
    init = None
    for c in sorted(c_grid):
        w, b = fit_logistic(xs_train, y_train, c, init=init)
        init = (w, b)
        p_tune = 1.0 / (1.0 + np.exp(-(xs_tune @ w + b)))
        cand = LogisticProbe(
            std, w, b, c, float(M.auroc(y_tune, p_tune)) if tune_has_both else float("nan"), M.log_loss(y_tune, p_tune)
        )
        if best is None or _better(cand, best, select_by if tune_has_both else "log_loss"):
            best = cand
    assert best is not None
    log.debug("logistic probe: C=%g tuning AUROC %.4f log-loss %.4f", best.c, best.tuning_auroc, best.tuning_log_loss)
    return best


def _better(cand: LogisticProbe, best: LogisticProbe, select_by: str) -> bool:
    if select_by == "auroc" and abs(cand.tuning_auroc - best.tuning_auroc) > AUROC_TIE:
        return cand.tuning_auroc > best.tuning_auroc
    return cand.tuning_log_loss < best.tuning_log_loss


# ---------------------------------------------------------------- cross-fitting


def subject_folds(groups: np.ndarray, y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """[n] fold of each row: whole groups (subjects) per fold, groups with a positive row dealt
    round-robin separately from the rest so every fold gets its share of the rare positives."""
    if n_folds < 3:
        raise ValueError(f"n_folds must be >= 3 (one fold scored, one tunes C, the rest train), got {n_folds}")
    inv, has_pos = M.group_index(groups, y)
    rng = np.random.default_rng(seed)
    fold_of_group = np.empty(len(has_pos), dtype=np.int64)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(has_pos == cls))
        fold_of_group[idx] = (np.arange(len(idx)) + (0 if cls else len(np.flatnonzero(has_pos)))) % n_folds
    return fold_of_group[inv]


def cross_fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    folds: np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold probabilities of the logistic probe for a cohort too small to split once.

    Subjects are dealt into n_folds folds (`subject_folds`). Each fold is scored by a probe fitted
    on n_folds - 2 of the other folds with C chosen on the remaining one (the next fold), so no
    row is ever scored by a probe that saw it or tuned on it, and a subject's rows stay together.
    `folds` (a fold per row, 0..n_folds-1) overrides the dealing. Raises if some fold's training
    part has a single class."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    _check_xy(x, y, "cross-fitting cohort")
    fold = subject_folds(groups, y, n_folds, seed) if folds is None else np.asarray(folds)
    if len(fold) != len(y):
        raise ValueError(f"folds has {len(fold)} entries for {len(y)} rows")
    out = np.full(len(y), np.nan)
    for k in range(n_folds):
        tune = (k + 1) % n_folds
        tr = (fold != k) & (fold != tune)
        if y[tr].all() or not y[tr].any():
            raise ValueError(
                f"cross-fitting fold {k}: the training folds hold {int(y[tr].sum())} positives "
                f"of {int(tr.sum())} rows (one class)"
            )
        probe = fit_logistic_probe(x[tr], y[tr], x[fold == tune], y[fold == tune], c_grid=c_grid)
        out[fold == k] = probe.predict_proba(x[fold == k])
    return out


# ---------------------------------------------------------------- ridge probe


@dataclass
class RidgeProbe:
    standardizer: Standardizer
    weight: np.ndarray
    bias: float
    alpha: float
    tuning_mse: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.standardizer.transform(x) @ self.weight + self.bias


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Minimise mean squared error + alpha ||w||^2 on standardised x (closed form, float64)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    n, d = xt.shape
    y_mean = yt.mean()
    x_mean = xt.mean(dim=0)
    xc = xt - x_mean
    gram = xc.T @ xc / n + alpha * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (yt - y_mean) / n)
    return w.numpy(), float(y_mean - x_mean @ w)


def fit_ridge_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
) -> RidgeProbe:
    """Linear regression probe for a continuous target, alpha chosen by tuning MSE."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_tune = np.asarray(x_tune, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)
    y_tune = np.asarray(y_tune, dtype=np.float64)
    _check_xy(x_train, y_train, "train split")
    _check_xy(x_tune, y_tune, "tuning split")
    if len(y_train) < 2 or len(y_tune) == 0:
        raise ValueError(f"too few samples: {len(y_train)} train, {len(y_tune)} tuning")
    if not (np.isfinite(y_train).all() and np.isfinite(y_tune).all()):
        raise ValueError("regression targets contain NaN or Inf")
    std = Standardizer.fit(x_train)
    xs_train, xs_tune = std.transform(x_train), std.transform(x_tune)
    best: RidgeProbe | None = None
    for alpha in alpha_grid:
        w, b = fit_ridge(xs_train, y_train, alpha)
        mse = float(np.mean((xs_tune @ w + b - y_tune) ** 2))
        if best is None or mse < best.tuning_mse:
            best = RidgeProbe(std, w, b, alpha, mse)
    assert best is not None
    return best


# ---------------------------------------------------------------- task-level evaluation

Split = tuple[np.ndarray, np.ndarray]  # (features [n, d], targets [n])


def evaluate_binary(
    method: str,
    task: str,
    horizon: int | None,
    train: Split,
    tune: Split,
    test: Split,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_boot: int = 1000,
    seed: int = 0,
    test_groups: np.ndarray | None = None,
) -> tuple[ResultRow, np.ndarray]:
    """Fit the logistic probe on train (C from tune), score held-out test: the results row and
    the test probabilities (for the reliability diagram). test_groups (the subject of each test
    row) makes the bootstrap resample subjects rather than rows."""
    probe = fit_logistic_probe(train[0], train[1], tune[0], tune[1], c_grid=c_grid)
    p_test = probe.predict_proba(np.asarray(test[0], dtype=np.float64))
    row = binary_row(method, task, horizon, np.asarray(test[1]).astype(bool), p_test, n_boot, seed, test_groups)
    return row, p_test


def oracle_row(
    task: str,
    horizon: int | None,
    y_test: np.ndarray,
    risk_test: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> ResultRow:
    """The ceiling: the synthetic generator's true risk used directly as the score. ECE and Brier
    are reported only when the risk is a probability (in [0, 1]), NaN otherwise. Samples whose
    risk is NaN (truth.oracle_risk: already diagnosed, or unknown subject) are left out, and
    the row's n says how many remained."""
    risk = np.asarray(risk_test, dtype=np.float64)
    y = np.asarray(y_test).astype(bool)
    known = np.isfinite(risk)
    if not known.all():
        log.warning(
            "oracle %s %s: %d of %d samples have no true risk and are left out",
            task,
            horizon,
            int((~known).sum()),
            len(risk),
        )
    return binary_row(
        "oracle",
        task,
        horizon,
        y[known],
        risk[known],
        n_boot,
        seed,
        None if groups is None else np.asarray(groups)[known],
    )


def evaluate_features(
    method: str,
    task: str,
    horizon: int | None,
    splits: Mapping[str, Features],
    regression: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[ResultRow | RegressionRow, np.ndarray]:
    """Probe labelled features of the train / tuning / held_out splits (each Features with y, as
    compute_embeddings or compute_count_features return them from a labelled loader)."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"{task}: missing split(s) {missing}; have {sorted(splits)}")
    parts: list[Split] = []
    for name in SPLITS:
        f = splits[name]
        if f.y is None:
            raise ValueError(f"{task}: split {name!r} has no labels (use a loader of a LabelledDataset)")
        parts.append((f.x, f.y))
    train, tune, test = parts  # in SPLITS order
    if regression:
        return evaluate_regression(method, task, train, tune, test, n_boot=n_boot, seed=seed)
    return evaluate_binary(method, task, horizon, train, tune, test, n_boot=n_boot, seed=seed)


def binary_row(
    method: str,
    task: str,
    horizon: int | None,
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> ResultRow:
    is_prob = bool((p >= 0).all() and (p <= 1).all())
    ci, undefined = M.auroc_interval(y, p, n_boot=n_boot, seed=seed, groups=groups)
    return ResultRow(
        method=method,
        task=task,
        horizon=horizon,
        n=len(y),
        n_pos=int(y.sum()),
        auroc=float(M.auroc(y, p)),
        auroc_ci=ci,
        auroc_ci_undefined=undefined,
        auprc=float(M.average_precision(y, p)),
        ece=float(M.expected_calibration_error(y, p)) if is_prob else float("nan"),
        brier=float(M.brier_score(y, p)) if is_prob else float("nan"),
    )


def evaluate_regression(
    method: str,
    task: str,
    train: Split,
    tune: Split,
    test: Split,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[RegressionRow, np.ndarray]:
    """Fit the ridge probe on train (alpha from tune), score held-out test."""
    probe = fit_ridge_probe(train[0], train[1], tune[0], tune[1], alpha_grid=alpha_grid)
    pred = probe.predict(np.asarray(test[0], dtype=np.float64))
    return regression_row(method, task, np.asarray(test[1], dtype=np.float64), pred, n_boot, seed), pred


def regression_row(method: str, task: str, y: np.ndarray, pred: np.ndarray, n_boot: int, seed: int) -> RegressionRow:
    m = M.regression_metrics(y, pred, n_boot=n_boot, seed=seed)
    return RegressionRow(method=method, task=task, n=m.n, r2=m.r2, r2_ci=m.r2_ci, mae=m.mae, pearson_r=m.pearson_r)
