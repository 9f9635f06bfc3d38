"""Frozen-probe evaluation: metrics against hand/brute-force values, probes, plots, report."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.eval import metrics as M
from healthfm_core.eval.plots import horizon_auroc_plot, reliability_diagram, training_curves
from healthfm_core.eval.probes import (
    Features,
    compute_count_features,
    compute_embeddings,
    count_features,
    cross_fit_logistic,
    evaluate_binary,
    evaluate_features,
    evaluate_regression,
    fit_logistic_probe,
    fit_ridge_probe,
    oracle_row,
    subject_folds,
)
from healthfm_core.eval.report import ResultRow, write_report
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.site_layout import SPLITS

# ---------------------------------------------------------------- metrics


def brute_force_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg) by comparing every positive with every negative."""
    pos, neg = p[y], p[~y]
    u = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return u / (len(pos) * len(neg))


def test_auroc_equals_brute_force_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(120) < 0.3
        p = np.round(rng.random(120), 1)  # heavy ties
        assert M.auroc(y, p) == pytest.approx(brute_force_auroc(y, p), abs=1e-12)
    assert M.auroc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert M.auroc(np.array([1, 0]), np.array([0.2, 0.9])) == 0.0
    assert M.auroc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(M.auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_average_precision_hand_examples() -> None:
    # Thresholds 0.9 (P=1, R=.5), 0.8 (P=.5, R=.5), 0.7 (P=2/3, R=1): AP = .5*1 + .5*2/3.
    assert M.average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    # A tie forms one threshold: 0.5 (P=1/2, R=1/2), 0.2 (P=2/3, R=1): AP = .25 + 1/3.
    assert M.average_precision(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.2])) == pytest.approx(0.25 + 1 / 3)
    assert M.average_precision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0


def test_ece_and_brier_hand_examples() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95])
    # Bins: [0,.1): n=1 |0-.05|; [.1,.2): n=2 |.5-.15|; [.9,1]: n=1 |1-.95| -> (.05 + .7 + .05)/4.
    assert M.expected_calibration_error(y, p) == pytest.approx(0.2)
    assert M.brier_score(y, p) == pytest.approx((0.05**2 + 0.15**2 + 0.85**2 + 0.05**2) / 4)
    # A probability of exactly 1 falls in the last bin; perfect predictions have ECE 0.
    assert M.expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error(y, p + 1)


def test_weighted_metrics_equal_metrics_on_the_resampled_data() -> None:
    """The bootstrap relies on weights = resample counts giving the metric of the resample."""
    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.4
    p = np.round(rng.random(60), 2)
    counts = M.bootstrap_counts(y, 4, rng)
    for metric in (M.auroc, M.average_precision, M.expected_calibration_error, M.brier_score):
        batched = cast(np.ndarray, metric(y, p, weights=counts))  # one value per weights row
        for row, w in zip(batched, counts):
            idx = np.repeat(np.arange(60), w.astype(int))
            assert row == pytest.approx(metric(y[idx], p[idx]), abs=1e-12), metric.__name__
    assert (counts[:, y].sum(1) == y.sum()).all()  # stratified: class sizes kept


def test_bootstrap_ci_is_seeded_and_contains_the_estimate() -> None:
    rng = np.random.default_rng(2)
    y = rng.random(400) < 0.25
    p = np.clip(0.25 + 0.3 * (y - 0.25) + 0.2 * rng.standard_normal(400), 0, 1)
    point = M.auroc(y, p)
    lo, hi = M.bootstrap_ci(M.auroc, y, p, n_boot=300, seed=5)
    assert lo < point < hi and hi - lo < 0.2
    assert (lo, hi) == M.bootstrap_ci(M.auroc, y, p, n_boot=300, seed=5)
    assert (lo, hi) != M.bootstrap_ci(M.auroc, y, p, n_boot=300, seed=6)
    m = M.binary_metrics(y, p, n_boot=200)
    assert m.n == 400 and m.n_pos == int(y.sum()) and m.auroc == point
    assert m.auprc_ci[0] < m.auprc < m.auprc_ci[1]


def test_group_bootstrap_resamples_whole_subjects() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 3)  # 40 subjects, 3 rows each
    y = np.zeros(120, dtype=bool)
    y[[0, 1, 30, 61, 62, 100]] = True  # 4 subjects with a positive row
    counts = M.bootstrap_counts(y, 50, np.random.default_rng(1), groups=groups)
    assert counts.shape == (50, 120)
    # Every row of a subject is drawn as often as the subject; subjects are drawn 40 times in
    # all, and the 4 with a positive 4 times (stratified by subject).
    assert np.all(counts.reshape(50, 40, 3) == counts.reshape(50, 40, 3)[:, :, :1])
    per_subject = counts[:, ::3]
    assert np.all(per_subject.sum(axis=1) == 40)
    assert np.all(per_subject[:, [0, 10, 20, 33]].sum(axis=1) == 4)
    # Rows of one subject are not independent: duplicating every row 3 times leaves the subject
    # bootstrap's interval as it was, while the row bootstrap's shrinks.
    p = rng.random(40)
    y40 = rng.random(40) < 0.3
    one = M.bootstrap_ci(M.auroc, y40, p, n_boot=400, seed=2, groups=np.arange(40))
    tripled = M.bootstrap_ci(M.auroc, np.repeat(y40, 3), np.repeat(p, 3), n_boot=400, seed=2, groups=groups)
    rows = M.bootstrap_ci(M.auroc, np.repeat(y40, 3), np.repeat(p, 3), n_boot=400, seed=2)
    assert np.allclose(one, tripled)
    assert rows[1] - rows[0] < 0.8 * (one[1] - one[0])
    with pytest.raises(ValueError, match="groups has 3 entries"):
        M.bootstrap_counts(y, 5, rng, groups=groups[:3])


def test_paired_difference_of_two_scores_on_the_same_subjects() -> None:
    rng = np.random.default_rng(3)
    items_same, items_better = [], []
    for _ in range(3):
        n = 600
        risk = rng.standard_normal(n)
        y = rng.random(n) < 1 / (1 + np.exp(-(2 * risk - 3)))
        good = risk + 0.5 * rng.standard_normal(n)
        bad = risk + 2.0 * rng.standard_normal(n)
        groups = np.arange(n) // 2  # the same 300 subjects in every task
        items_same.append((y, good, good.copy(), groups))
        items_better.append((y, good, bad, groups))
    same = M.paired_difference(items_same, n_boot=200, seed=0)
    assert same.n_tasks == 3 and same.mean == 0.0 and same.ci == (0.0, 0.0) and same.fraction_at_or_below_zero == 1.0
    better = M.paired_difference(items_better, n_boot=300, seed=0)
    direct = np.mean([M.auroc(y, a) - M.auroc(y, b) for y, a, b, _ in items_better])
    assert better.mean == pytest.approx(direct)
    assert 0 < better.ci[0] < better.mean < better.ci[1] and better.fraction_at_or_below_zero == 0.0
    reverse = M.paired_difference([(y, b, a, g) for y, a, b, g in items_better], n_boot=300, seed=0)
    assert reverse.mean == pytest.approx(-better.mean) and reverse.fraction_at_or_below_zero == 1.0
    with pytest.raises(ValueError, match="at least one task"):
        M.paired_difference([])


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="0/1"):
        M.auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="equal length"):
        M.brier_score(np.array([0, 1]), np.array([0.1]))


# ---------------------------------------------------------------- probes


def logistic_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = np.zeros(d)
    w[:3] = [1.5, -1.0, 0.8]
    x = rng.standard_normal((n, d)) * 2.0 + 1.0  # unstandardised on purpose
    prob = 1 / (1 + np.exp(-((x - 1.0) / 2.0 @ w - 1.0)))
    return x, rng.random(n) < prob, prob, w


def test_logistic_probe_recovers_a_linear_signal_and_is_calibrated() -> None:
    x, y, prob, w = logistic_data(6000, 12, seed=0)
    tr, tu, te = slice(0, 3000), slice(3000, 4000), slice(4000, 6000)
    probe = fit_logistic_probe(x[tr], y[tr], x[tu], y[tu])
    cos = probe.weight @ w / (np.linalg.norm(probe.weight) * np.linalg.norm(w))
    assert cos > 0.97
    p_test = probe.predict_proba(x[te])
    assert M.auroc(y[te], p_test) > M.auroc(y[te], prob[te]) - 0.02
    assert M.expected_calibration_error(y[te], p_test) < 0.04
    assert probe.c in (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def test_logistic_probe_matches_the_penalised_optimum() -> None:
    """At the solution, the gradient of C*sum(logloss) + |w|^2/2 vanishes (w on standardised x)."""
    x, y, _, _ = logistic_data(500, 5, seed=3)
    probe = fit_logistic_probe(x, y, x, y, c_grid=[0.05])
    xs = probe.standardizer.transform(x)
    r = 1 / (1 + np.exp(-(xs @ probe.weight + probe.bias))) - y
    n = len(y)  # gradient of the objective as minimised: mean log-loss + |w|^2 / (2 C n)
    assert np.abs((xs.T @ r + probe.weight / 0.05) / n).max() < 1e-6
    assert abs(r.sum() / n) < 1e-6
    # ... and it differs from the unpenalised fit (the penalty is really applied).
    assert np.linalg.norm(fit_logistic_probe(x, y, x, y, c_grid=[1e4]).weight) > 1.05 * np.linalg.norm(probe.weight)


@pytest.mark.parametrize("c", [1e-3, 1.0, 1e4])
def test_both_logistic_solvers_reach_scikit_learns_optimum(c: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Newton (up to NEWTON_MAX_FEATURES features) and L-BFGS (above) minimise the same objective
    as scikit-learn's LogisticRegression: correlated, badly scaled features and rare positives, as
    a model's embeddings give, from a cold start and warm-started from another C's fit."""
    from sklearn.linear_model import LogisticRegression

    from healthfm_core.eval import probes

    rng = np.random.default_rng(7)
    n, d = 3000, 24
    mixing = rng.standard_normal((d, d)) * np.logspace(-2, 1, d)  # condition number ~1e3
    x = rng.standard_normal((n, d)) @ mixing
    x = (x - x.mean(0)) / x.std(0)
    y = rng.random(n) < 1 / (1 + np.exp(-(x[:, :3] @ [1.0, -0.5, 0.3] - 3.5)))  # ~4% positives
    ref = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y)
    warm = (rng.standard_normal(d) * 0.1, -2.0)
    for newton_up_to in (d, d - 1):  # the model's path, then the count baselines' path
        monkeypatch.setattr(probes, "NEWTON_MAX_FEATURES", newton_up_to)
        for init in (None, warm):
            w, b = probes.fit_logistic(x, y, c, init=init)
            scale = np.abs(ref.coef_[0]).max() + abs(ref.intercept_[0])
            assert np.abs(w - ref.coef_[0]).max() < 1e-4 * scale
            assert abs(b - ref.intercept_[0]) < 1e-4 * scale


def test_logistic_probe_refuses_a_single_class() -> None:
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="only one class"):
        fit_logistic_probe(x, np.zeros(20), x, np.zeros(20))


def test_subject_folds_keep_subjects_whole_and_spread_the_positives() -> None:
    groups = np.repeat(np.arange(100), 4)
    y = np.zeros(400, dtype=bool)
    y[np.arange(0, 400, 40)] = True  # 10 subjects with one positive row each
    fold = subject_folds(groups, y, n_folds=5, seed=0)
    assert all(len(set(fold[groups == g])) == 1 for g in range(100))
    assert np.bincount(fold[y], minlength=5).tolist() == [2, 2, 2, 2, 2]
    assert sorted(np.bincount(fold[::4], minlength=5).tolist()) == [20] * 5
    with pytest.raises(ValueError, match="n_folds"):
        subject_folds(groups, y, n_folds=2)


def test_cross_fitted_probe_never_sees_the_rows_it_scores() -> None:
    x, y, prob, _ = logistic_data(2000, 6, seed=4)
    groups = np.arange(2000) // 2
    p = cross_fit_logistic(x, y, groups, n_folds=5, seed=1)
    assert np.isfinite(p).all() and M.auroc(y, p) > M.auroc(y, prob) - 0.03
    # A fold's scores depend only on the other folds' labels: flipping every label in one fold
    # leaves that fold's out-of-fold probabilities exactly as they were.
    fold = subject_folds(groups, y, 5, seed=1)
    flipped = y.copy()
    flipped[fold == 2] = ~flipped[fold == 2]
    p2 = cross_fit_logistic(x, flipped, groups, n_folds=5, folds=fold)
    assert np.array_equal(p2[fold == 2], p[fold == 2])
    assert not np.allclose(p2[fold == 0], p[fold == 0])  # fold 0 was trained or tuned on fold 2
    with pytest.raises(ValueError, match="one class"):
        cross_fit_logistic(x[:50], np.eye(1, 50, 0, dtype=bool)[0], np.arange(50), n_folds=5)


def test_ridge_probe_recovers_a_linear_target() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1500, 8))
    y = x @ np.arange(8.0) + 3.0 + 0.5 * rng.standard_normal(1500)
    probe = fit_ridge_probe(x[:800], y[:800], x[800:1100], y[800:1100])
    pred = probe.predict(x[1100:])
    assert M.r2_score(y[1100:], pred) > 0.99
    row, _ = evaluate_regression(
        "m", "hr", (x[:800], y[:800]), (x[800:1100], y[800:1100]), (x[1100:], y[1100:]), n_boot=100
    )
    assert row.r2_ci[0] < row.r2 < row.r2_ci[1] and row.n == 400 and row.pearson_r > 0.99


def test_evaluate_binary_and_oracle_rows() -> None:
    x, y, prob, _ = logistic_data(3000, 6, seed=7)
    row, p = evaluate_binary(
        "counts", "t2d", 365, (x[:1500], y[:1500]), (x[1500:2000], y[1500:2000]), (x[2000:], y[2000:]), n_boot=100
    )
    oracle = oracle_row("t2d", 365, y[2000:], prob[2000:], n_boot=100)
    assert row.n == 1000 and row.n_pos == int(y[2000:].sum()) and p.shape == (1000,)
    assert row.auroc_ci[0] <= row.auroc <= row.auroc_ci[1]
    assert oracle.method == "oracle" and oracle.auroc >= row.auroc - 0.02
    # A score that is not a probability gets no calibration metrics.
    assert np.isnan(oracle_row("t2d", 365, y[2000:], 5 * prob[2000:], n_boot=10).ece)
    # Samples without a true risk (already diagnosed in the truth) are left out of the oracle.
    risk = prob[2000:].copy()
    risk[:100] = np.nan
    assert oracle_row("t2d", 365, y[2000:], risk, n_boot=10).n == 900
    # The same through Features of the three splits.
    feats = {
        name: Features(np.arange(len(y[sl])), np.zeros(len(y[sl])), x[sl], y[sl].astype(float))
        for name, sl in zip(SPLITS, (slice(0, 1500), slice(1500, 2000), slice(2000, 3000)))
    }
    row2, _ = evaluate_features("counts", "t2d", 365, feats, n_boot=100)
    assert row2 == row
    with pytest.raises(ValueError, match="missing split"):
        evaluate_features("counts", "t2d", 365, {"train": feats["train"]})


# ---------------------------------------------------------------- features


def test_count_features_by_hand() -> None:
    batch = random_batch(2, n_events=4, vocab_size=8, n_prs_traits=2, seed=0)
    # Tokens of up to two codes (0 = PAD); the 4th token of each sample is padding.
    batch.codes = torch.tensor([[[3, 0], [3, 5], [0, 0], [6, 0]], [[4, 7], [7, 0], [0, 0], [7, 0]]])
    batch.ehr_valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    f = count_features(batch, vocab_size=8)
    expected = torch.zeros(2, 8, dtype=torch.float64)
    expected[0, 3], expected[0, 5] = np.log1p(2), np.log1p(1)
    expected[1, 4], expected[1, 7] = np.log1p(1), np.log1p(2)  # the invalid 4th token is not counted
    assert torch.allclose(f, expected)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_features(batch, vocab_size=5)


def test_embeddings_use_eval_mode_and_keep_labels() -> None:
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), vocab_size=40, n_prs_traits=4)
    model.train()
    batches = [(random_batch(3, seed=i), torch.tensor([0.0, 1.0, float(i)])) for i in range(2)]
    a = compute_embeddings(model, batches)
    b = compute_embeddings(model, batches)
    assert a.x.shape == (6, model.embedding_width) and np.isfinite(a.x).all()
    np.testing.assert_array_equal(a.x, b.x)  # eval mode: no modality dropout, deterministic
    assert model.training  # restored
    np.testing.assert_array_equal(a.y, [0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(a.subject_id, [1000, 1001, 1002] * 2)
    counts = compute_count_features(batches, vocab_size=40)
    assert counts.x.shape == (6, 40) and counts.y is not None
    # The embedding depends on the history: two different samples give different vectors.
    assert not np.allclose(a.x[0], a.x[1])


# ---------------------------------------------------------------- plots and report


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plots_and_report(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.clip(y * 0.4 + rng.random(300) * 0.6, 0, 1)
    rows = [
        ResultRow(
            method=m,
            task="t2d",
            horizon=h,
            n=300,
            n_pos=90,
            auroc=a,
            auroc_ci=(a - 0.05, a + 0.05),
            auprc=0.5,
            ece=0.05,
            brier=0.2,
        )
        for m, a0 in (("healthfm", 0.75), ("counts", 0.65))
        for h, a in zip((30, 90, 180, 365), (a0, a0 - 0.01, a0 - 0.02, a0 - 0.03))
    ]
    rows.append(
        ResultRow(
            method="oracle",
            task="t2d",
            horizon=365,
            n=300,
            n_pos=90,
            auroc=0.9,
            auroc_ci=(float("nan"), float("nan")),
            auprc=0.8,
            ece=float("nan"),
            brier=0.1,
        )
    )
    rel = reliability_diagram({"healthfm": (y, p), "counts": (y, rng.random(300))}, tmp_path / "plots" / "rel.png")
    hor = horizon_auroc_plot(rows, tmp_path / "plots" / "t2d.png", task="t2d")
    history = [
        {"step": s, "total": 2 / (s + 1), "ehr_masked_code": 1.0, "lr": 1e-3, "rate_min": 1e-3, "rate_max": 20.0}
        for s in range(30)
    ]
    cur = training_curves(history, tmp_path / "plots" / "train.png")
    assert all(_is_png(x) for x in (rel, hor, cur))
    with pytest.raises(ValueError, match="no result rows"):
        horizon_auroc_plot(rows, tmp_path / "x.png", task="copd")

    report = write_report(
        tmp_path / "report.md",
        rows,
        {"Reliability": rel, "T2D by horizon": hor},
        notes=["Pretrained on the default federation."],
    )
    text = report.read_text()
    assert "| t2d | 30 | counts | 300 | 90 | 0.650 | [0.600, 0.700] |" in text
    assert "| t2d | 365 | oracle | 300 | 90 | 0.900 | n/a |" in text
    assert "![Reliability](plots/rel.png)" in text
    assert "Pretrained on the default federation." in text
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_result_row_validation() -> None:
    with pytest.raises(Exception, match="auroc"):
        ResultRow(
            method="m",
            task="t",
            horizon=30,
            n=1,
            n_pos=0,
            auroc="high",  # type: ignore[arg-type]  # deliberately wrong: auroc must be a number
            auroc_ci=(0, 1),
            auprc=0.1,
            ece=0.1,
            brier=0.1,
        )
