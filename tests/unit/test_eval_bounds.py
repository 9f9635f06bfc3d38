"""Evaluation replies bounded (issue 40, break 3; issue 67, break 2): an evaluate reply's counts
within what the site declared at setup and what the evaluation asked (server/eval_counts.py:
held_out_rows_per_subject x subjects), a reply over a bound rejected and named in the round's
record; beside the n-weighted mean, the median over sites (robust to one site's claims) and the
site with the largest share; the pooled AUROC only from bounded counts. The attacks replayed are
the red team's: n = 10^9 (0.809 -> 0.999 weighted, pooled 1.000 "over 10^9 rows") and a
plausible n = 540 (0.982 weighted; now capped: tests/unit/test_eval_share_cap.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.eval_replies import BINS, KEY, honest_reply, inflated_reply

from healthfm_core.data.labels.tasks import HELD_OUT_ROWS_PER_SUBJECT
from healthfm_core.eval.federation_auroc import federation_aurocs
from healthfm_core.protocol import (
    EvalConfig,
    EvalReply,
    SiteCapabilities,
    TaskMetrics,
    aggregate_site_metrics,
    median_site_metrics,
)
from server.eval_counts import DeclaredCounts, declared_counts, eval_count_problem
from server.evaluation import judge_eval_replies
from server.runlog import EventLog, write_summary

SUBJECTS = 150  # each site declares 150 subjects at setup (the red team's federation)


def _cfg(max_subjects: int = 0) -> EvalConfig:
    return EvalConfig(round=2, tasks=["t2d"], setup_sha256="ab" * 32, max_subjects=max_subjects, score_bins=BINS)


def _honest(seed: int, n: int, signal: float) -> EvalReply:
    return honest_reply(seed, n, signal)


def _inflated(n: int, subjects: int = SUBJECTS) -> EvalReply:
    """A perfect-looking site claiming `n` held-out rows of `subjects` subjects (helpers.eval_replies)."""
    return inflated_reply(n, subjects)


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
    assert "field onset_t2d_365d.n: value 1,000,000,000 > 153,600" in rejected["z"]
    assert "held_out_rows_per_subject 1,024 x 150 subjects (the subjects the site declared at setup)" in rejected["z"]
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
            30 * 1024 + 1,
            "field onset_t2d_365d.n: value 30,721 > 30,720, held_out_rows_per_subject 1,024 x 30 subjects "
            "(the evaluation's subject budget (max_subjects))",
        ),
        (0, 150 * 1024 + 1, "field onset_t2d_365d.n: value 153,601 > 153,600"),
    ],
)
def test_counts_are_bounded_by_the_subject_budget_asked_and_the_subjects_declared(max_subjects, n, field) -> None:  # noqa: ANN001
    subjects = max_subjects or SUBJECTS
    assert HELD_OUT_ROWS_PER_SUBJECT == 1024  # the cap the bounds above are written in
    accepted, rejected = _judge({"z": _inflated(n, subjects)}, _cfg(max_subjects))
    assert not accepted and field in rejected["z"]
    accepted, rejected = _judge({"z": _inflated(n - 1, subjects)}, _cfg(max_subjects))
    assert set(accepted) == {"z"} and not rejected
    # A reply is bounded by the subjects it says it scored, too.
    accepted, rejected = _judge({"z": _inflated(10 * 1024 + 1, 10)}, _cfg(max_subjects))
    assert "value 10,241 > 10,240, held_out_rows_per_subject 1,024 x the 10 subjects it says it scored" in rejected["z"]


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
    assert "- site z: field onset_t2d_365d.n: value 1,000,000,000 > 153,600" in summary
    assert "1,000,000,000" not in summary.split("### Federation-wide AUROC per task")[1].split("z:")[0]


def test_held_out_rows_are_bounded_by_the_rows_declared_at_setup_and_the_cap_per_subject() -> None:
    """Held-out rows are all scored (issue 42) up to held_out_rows_per_subject a subject (issue 67),
    so n is bounded by the cap x subjects, and by the site's timed rows declared at setup; a
    declaration beyond the protocol's maxima is refused at setup."""
    caps = SiteCapabilities(site="z", modalities=["ehr"], subjects={"ehr": SUBJECTS}, rows=5_000)
    assert SiteCapabilities.from_flat(caps.to_flat()) == caps  # the declaration travels
    declared = declared_counts(caps)
    assert declared == DeclaredCounts(SUBJECTS, 5_000)
    every_row = _cfg().model_copy(update={"n_per_subject": "all"})
    honest = EvalReply(tasks={KEY: TaskMetrics(n=2_400, auroc=0.8, subjects=SUBJECTS)})  # 16 rows a subject
    assert eval_count_problem(honest, every_row, declared) is None
    assert eval_count_problem(honest, _cfg(), declared) is None  # n_per_subject does not bound held_out
    over = EvalReply(tasks={KEY: TaskMetrics(n=5_001, auroc=0.8, subjects=SUBJECTS)})
    assert "field onset_t2d_365d.n: value 5,001 > 5,000, the timed rows the site declared at setup" in str(
        eval_count_problem(over, every_row, declared)
    )
    # Without declared rows the cap per subject bounds it (n_per_subject "all" included).
    assert eval_count_problem(honest, every_row, DeclaredCounts(SUBJECTS, None)) is None
    over = EvalReply(tasks={KEY: TaskMetrics(n=153_601, auroc=0.8, subjects=SUBJECTS)})
    assert "value 153,601 > 153,600" in str(eval_count_problem(over, every_row, DeclaredCounts(SUBJECTS, None)))
    for bad in ({"subjects.ehr": 10**9}, {"subjects.ehr": 150, "rows": 150 * 2**25 + 1}, {"subjects.dna": 1}):
        with pytest.raises(ValueError):
            SiteCapabilities.from_flat({**caps.to_flat(), **bad})
