"""Evaluation replies bounded (issue 40, break 3): an evaluate reply's counts within what the site
declared at setup and what the evaluation asked (server/eval_counts.py), a reply over a bound
rejected and named in the round's record; beside the n-weighted mean, the median over sites
(robust to one site's claims) and the site with the largest share; the pooled AUROC only from
bounded counts. The attacks replayed are the red team's: n = 10^9 (0.809 -> 0.999 weighted,
pooled 1.000 "over 10^9 rows") and a plausible n = 540 (0.982 weighted)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from healthfm_core.eval.federation_auroc import federation_aurocs
from healthfm_core.eval.site_histogram import release_histogram
from healthfm_core.protocol import (
    EvalConfig,
    EvalReply,
    ScoreHistogram,
    SiteCapabilities,
    TaskMetrics,
    aggregate_site_metrics,
    median_site_metrics,
)
from server.eval_counts import DeclaredCounts, declared_counts, eval_count_problem
from server.evaluation import judge_eval_replies
from server.runlog import EventLog, write_summary

KEY = "onset_t2d_365d"
BINS = 50
SUBJECTS = 150  # each site declares 150 subjects at setup (the red team's federation)


def _cfg(max_subjects: int = 0) -> EvalConfig:
    return EvalConfig(round=2, tasks=["t2d"], setup_sha256="ab" * 32, max_subjects=max_subjects, score_bins=BINS)


def _honest(seed: int, n: int, signal: float) -> EvalReply:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + signal * y - 1.0)))
    h = release_histogram(y, p, np.arange(n), BINS, "logit", minimum=10)
    assert isinstance(h, ScoreHistogram)
    auc = float(roc_auc_score(y, p))
    metrics = TaskMetrics(n=n, auroc=auc, positives=int(y.sum()), subjects=n // 3, auroc_low=auc - 0.1, auroc_high=auc + 0.05)  # fmt: skip
    return EvalReply(tasks={KEY: metrics}, histograms={KEY: h})


def _inflated(n: int) -> EvalReply:
    """A perfect-looking site claiming `n` held-out rows: its histogram adds up (positives in the
    top bin, negatives in the bottom), as the red team built it."""
    positives = n // 2
    h = ScoreHistogram(
        bounds=[0, 1, BINS - 1, BINS], positives=[0, 0, positives], negatives=[n - positives, 0, 0], minimum=10
    )
    metrics = TaskMetrics(n=n, auroc=0.999, positives=positives, subjects=min(-(-n // 4), SUBJECTS), auroc_low=0.99, auroc_high=1.0)  # fmt: skip
    return EvalReply(tasks={KEY: metrics}, histograms={KEY: h})


def _sites(attacker: EvalReply) -> dict[str, EvalReply]:
    return {"a": _honest(1, 90, 1.5), "b": _honest(2, 84, 1.2), "c": _honest(3, 96, 1.8), "z": attacker}


def _judge(per_site: dict[str, EvalReply], cfg: EvalConfig) -> tuple[dict[str, EvalReply], dict[str, str]]:
    declared = {s: declared_counts(SiteCapabilities(site=s, modalities=["ehr"], subjects={"ehr": SUBJECTS})) for s in per_site}  # fmt: skip
    return judge_eval_replies({s: r.to_records() for s, r in per_site.items()}, cfg, declared)


def test_an_evaluation_reply_claiming_a_billion_rows_is_rejected_and_named() -> None:
    sites = _sites(_inflated(10**9))
    # Today's attack: the reply parses, and takes the weighted mean and the pooled AUROC with it.
    assert EvalReply.from_records(sites["z"].to_records()).tasks[KEY].n == 10**9
    accepted, rejected = _judge(sites, _cfg())
    assert set(accepted) == {"a", "b", "c"}
    assert "field onset_t2d_365d.n: value 1,000,000,000 > 600" in rejected["z"]
    assert "n_per_subject 4 x 150 subjects (the subjects the site declared at setup)" in rejected["z"]
    honest = {s: sites[s] for s in "abc"}
    assert aggregate_site_metrics(accepted) == aggregate_site_metrics(honest)
    pooled = federation_aurocs([KEY], accepted, ["a", "b", "c", "z"], {"z": "evaluation reply rejected: " + rejected["z"]})  # fmt: skip
    assert pooled[KEY] == federation_aurocs([KEY], honest, ["a", "b", "c", "z"], {"z": "evaluation reply rejected: " + rejected["z"]})[KEY]  # fmt: skip
    pooled_auroc = pooled[KEY].auroc
    assert pooled[KEY].rows == 270 and pooled_auroc is not None and pooled_auroc < 0.9
    assert "evaluation reply rejected: field onset_t2d_365d.n" in pooled[KEY].not_pooled["z"]


@pytest.mark.parametrize(
    ("max_subjects", "n", "field"),
    [
        (
            30,
            121,
            "field onset_t2d_365d.n: value 121 > 120, the most rows a site scores: n_per_subject 4 x 30 subjects",
        ),
        (0, 601, "field onset_t2d_365d.n: value 601 > 600"),
    ],
)
def test_counts_are_bounded_by_the_subject_budget_asked_and_the_subjects_declared(max_subjects, n, field) -> None:  # noqa: ANN001
    accepted, rejected = _judge({"z": _inflated(n)}, _cfg(max_subjects))
    assert not accepted and field in rejected["z"]
    accepted, rejected = _judge({"z": _inflated(n - 1)}, _cfg(max_subjects))
    assert set(accepted) == {"z"} and not rejected


def test_more_subjects_than_declared_or_no_declared_count_is_rejected() -> None:
    over = EvalReply(tasks={KEY: TaskMetrics(n=100, auroc=0.8, subjects=40, available_subjects=151)})
    assert "field onset_t2d_365d.subjects-available: value 151 > 150" in str(
        eval_count_problem(over, _cfg(), DeclaredCounts(SUBJECTS, None))
    )
    over = EvalReply(tasks={KEY: TaskMetrics(n=100, auroc=0.8, subjects=31)})
    assert "field onset_t2d_365d.subjects: value 31 > 30" in str(
        eval_count_problem(over, _cfg(30), DeclaredCounts(SUBJECTS, None))
    )
    fine = EvalReply(tasks={KEY: TaskMetrics(n=100, auroc=0.8, subjects=30)})
    assert "declared no subject count" in str(
        eval_count_problem(fine, _cfg(), DeclaredCounts(None, None))
    )  # fails closed
    assert eval_count_problem(fine, _cfg(30), DeclaredCounts(None, None)) is None  # the budget bounds it alone


def test_a_plausible_inflation_moves_the_weighted_mean_but_not_the_median_and_is_named() -> None:
    """n = 540 is within the bounds of a 150-subject site: it still weighs 540 rows in the mean
    (today 0.982) but the median over sites stays between the honest sites' values, and the site
    with the largest share is named in the records."""
    sites = _sites(_inflated(540))
    accepted, rejected = _judge(sites, _cfg())
    assert not rejected
    honest = cast(list[float], [sites[s].tasks[KEY].auroc for s in "abc"])  # each site's is set (_sites)
    weighted = aggregate_site_metrics(accepted)[f"{KEY}.auroc"]
    median = median_site_metrics(accepted)[f"{KEY}.auroc"]
    assert weighted > max(honest) + 0.03  # the attack on the mean, as reported
    assert min(honest) <= median <= max(honest)
    # With one more honest site, the median is exactly what it was without the attacker's claim,
    # whatever n it claims (one site moves the median by at most one neighbour).
    for n in (90, 540):
        with_more = {**_sites(_inflated(n)), "d": _honest(4, 90, 1.4)}
        assert median_site_metrics(with_more)[f"{KEY}.auroc"] == median_site_metrics(_sites(_inflated(90)) | {"d": _honest(4, 90, 1.4)})[f"{KEY}.auroc"]  # fmt: skip
    pooled = federation_aurocs([KEY], accepted)[KEY]
    assert pooled.largest_site == "z" and pooled.largest_share == pytest.approx(540 / 810)
    assert "largest share z 67% of rows" in pooled.describe()


def test_the_summary_shows_the_median_the_largest_share_and_the_rejected_reply(tmp_path: Path) -> None:
    sites = _sites(_inflated(10**9))
    accepted, rejected = _judge(sites, _cfg())
    out = tmp_path / "run"
    EventLog(out / "rounds.jsonl").write(
        "evaluate",
        round=2,
        sites={s: r.to_records() for s, r in accepted.items()},
        aggregated=aggregate_site_metrics(accepted),
        median=median_site_metrics(accepted),
        tasks=[KEY],
        binary_tasks=[KEY],
        asked_sites=["a", "b", "c", "z"],
        absent={"z": f"evaluation reply rejected: {rejected['z']}"},
        rejected=rejected,
        score_bins=BINS,
        score_scale="logit",
    )
    summary = write_summary(out).read_text()
    row = next(line for line in summary.splitlines() if line.startswith(f"| {KEY} | auroc |"))
    assert f"| {median_site_metrics(accepted)[f'{KEY}.auroc']:.3f} | 270 |" in row
    assert "- site z: field onset_t2d_365d.n: value 1,000,000,000 > 600" in summary
    assert "1,000,000,000" not in summary.split("### Federation-wide AUROC per task")[1].split("z:")[0]


def test_held_out_rows_scored_every_one_are_bounded_by_the_rows_declared_at_setup() -> None:
    """Held-out rows are all scored (issue 42), so n is bounded by the site's timed rows declared
    at setup, not by n_per_subject x subjects; with "all" and no declared rows: rejected."""
    caps = SiteCapabilities(site="z", modalities=["ehr"], subjects={"ehr": SUBJECTS}, rows=5_000)
    assert SiteCapabilities.from_flat(caps.to_flat()) == caps  # the declaration travels
    declared = declared_counts(caps)
    assert declared == DeclaredCounts(SUBJECTS, 5_000)
    every_row = _cfg().model_copy(update={"n_per_subject": "all"})
    honest = EvalReply(tasks={KEY: TaskMetrics(n=2_400, auroc=0.8, subjects=SUBJECTS)})  # 16 rows a subject
    assert eval_count_problem(honest, every_row, declared) is None
    assert eval_count_problem(honest, _cfg(), declared) is None  # the cap no longer bounds held_out
    over = EvalReply(tasks={KEY: TaskMetrics(n=5_001, auroc=0.8, subjects=SUBJECTS)})
    assert "field onset_t2d_365d.n: value 5,001 > 5,000, the timed rows the site declared at setup" in str(
        eval_count_problem(over, every_row, declared)
    )
    assert "declared no row count" in str(eval_count_problem(honest, every_row, DeclaredCounts(SUBJECTS, None)))
