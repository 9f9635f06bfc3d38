"""Zero-shot onset forecasting (issue 72): the task's codes in a vocabulary, the head's any-code
probability against a reference computed by hand, the held-out rows it scores, and the labels
with repeats counted."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from helpers.random_batch import date_shifted, random_batch

from healthfm_core.data.labels.aces_tasks import load_task
from healthfm_core.data.labels.repeat_events import counting_repeats
from healthfm_core.data.labels.task_spec import AcesOnsetTask, resolve_tasks, runner_tasks
from healthfm_core.data.labels.tasks import OnsetTask
from healthfm_core.data.sequences.batch import N_SPECIAL_CODES
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.paired_comparison import Comparison
from healthfm_core.eval.row_embeddings import embed_rows
from healthfm_core.eval.runner import MethodResult, build_eval_set
from healthfm_core.eval.zero_shot import (
    NoOutcomeCode,
    NoZeroShot,
    ZeroShotColumn,
    ZeroShotScorer,
    horizon_index,
    outcome_code_ids,
    probabilities,
    zero_shot_columns,
    zero_shot_rows,
)
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.model_config import load_model_config
from simulations.evidence_units import Evidence
from simulations.evidence_zero_shot import FLAT_HEAD, HEAD_KEY, ZERO_SHOT, head_fit, why_lines
from simulations.pretrain import agree_vocabulary
from simulations.synthetic import generate_federation

CODES = [
    "ATC//A10BA02",
    "DIAGNOSIS//ICD//10//E119",  # MIMIC-IV's spelling of E11.9
    "ICD10//E11",
    "ICD10//I10",
    "ICD9CM/250.00",  # type 2
    "ICD9CM/250.01",  # type 1: not the task's
]


def _onset(name: str) -> AcesOnsetTask:
    (task,) = runner_tasks(resolve_tasks([name])).values()
    assert isinstance(task, AcesOnsetTask)
    return task


def _with_outcome(predicates: dict) -> AcesOnsetTask:
    task = _onset("onset_t2d_90d")
    config = {**task.aces.config, "predicates": {**task.aces.config["predicates"], **predicates}}
    return task.model_copy(update={"aces": task.aces.model_copy(update={"config": config})})


def test_the_shipped_tasks_codes_are_found_in_a_vocabulary_as_aces_matches_them() -> None:
    ids = outcome_code_ids(_onset("onset_t2d_90d"), CODES)
    assert [CODES[i - N_SPECIAL_CODES] for i in ids] == ["DIAGNOSIS//ICD//10//E119", "ICD10//E11", "ICD9CM/250.00"]
    assert [CODES[i - N_SPECIAL_CODES] for i in outcome_code_ids(_onset("onset_hypertension_30d"), CODES)] == [
        "ICD10//I10"
    ]
    # An event-table task matches its code prefix.
    plain = OnsetTask(name="onset_x_30d", outcome_code_prefix="ICD10//E1", horizon_days=30)
    assert outcome_code_ids(plain, CODES) == [N_SPECIAL_CODES + 2]
    with pytest.raises(NoOutcomeCode, match=r"task 'onset_copd_30d': its outcome code \(regex \^\(DIAGNOSIS//ICD//9"):
        outcome_code_ids(_onset("onset_copd_30d"), CODES)


def test_a_task_whose_code_is_not_in_the_vocabulary_is_named_with_its_code() -> None:
    """Skipped with why where a run scores every task it can; raised where the task was asked
    for by name (strict_codes: `predict --zero-shot --tasks`)."""
    missing = _with_outcome({"outcome": {"code": {"any": ["ICD10//Z99", "ICD10//Z98"]}}})
    want = r"task 'onset_t2d_90d': its outcome code \(ICD10//Z99, ICD10//Z98\) is not in the model's vocabulary \(6 codes\)"
    with pytest.raises(NoOutcomeCode, match=want):
        outcome_code_ids(missing, CODES)
    plain = OnsetTask(name="onset_y_30d", outcome_code_prefix="ICD10//Z9", horizon_days=30)
    with pytest.raises(NoOutcomeCode, match=r"task 'onset_y_30d': its outcome code \(codes starting ICD10//Z9\)"):
        outcome_code_ids(plain, CODES)
    model = _model()
    tasks = {"z": missing, "ok": _onset("onset_hypertension_30d")}
    columns, skipped = zero_shot_columns(model, tasks, CODES)
    assert [c.key for c in columns] == ["ok"] and "ICD10//Z99" in skipped["z"]
    with pytest.raises(NoOutcomeCode, match="onset_t2d_90d"):
        zero_shot_columns(model, tasks, CODES, strict_codes=True)
    # Other reasons stay skips even then: a horizon the head has no window for.
    wide = OnsetTask(name="wide_45d", outcome_code_prefix="ICD10//I10", horizon_days=45)
    _, skipped = zero_shot_columns(model, {"wide": wide}, CODES, strict_codes=True)
    assert "not 45" in skipped["wide"]


def test_or_of_code_predicates_is_scored_values_and_and_are_refused() -> None:
    task = _with_outcome(
        {"outcome": {"expr": "or(a, b)"}, "a": {"code": "ATC//A10BA02"}, "b": {"code": {"any": ["ICD10//I10"]}}}
    )
    assert outcome_code_ids(task, CODES) == [N_SPECIAL_CODES + 0, N_SPECIAL_CODES + 3]
    with pytest.raises(NoZeroShot, match=r"also constrains \['value_min'\]"):
        outcome_code_ids(_with_outcome({"outcome": {"code": "ICD10//E11", "value_min": 5}}), CODES)
    with pytest.raises(NoZeroShot, match=r"only or\(...\)"):
        outcome_code_ids(_with_outcome({"outcome": {"expr": "and(death, death)"}}), CODES)
    with pytest.raises(NoZeroShot, match="refers to itself"):
        outcome_code_ids(_with_outcome({"outcome": {"expr": "or(outcome, death)"}}), CODES)


def _model(vocab_size: int = 40, n_prs_traits: int = 4) -> HealthFM:
    torch.manual_seed(0)
    return HealthFM(load_model_config("tiny"), vocab_size, n_prs_traits).eval()


def test_horizons_are_the_heads_own() -> None:
    model = _model()
    assert [horizon_index(model, h) for h in (30, 90.0, 180, 365)] == [0, 1, 2, 3]
    with pytest.raises(NoZeroShot, match="not 45"):
        horizon_index(model, 45)
    columns, skipped = zero_shot_columns(model, {"t2d_90": _onset("onset_t2d_90d")}, CODES)
    assert columns == [ZeroShotColumn("t2d_90", 1, (N_SPECIAL_CODES + 1, N_SPECIAL_CODES + 2, N_SPECIAL_CODES + 4))]
    assert not skipped


def test_the_score_is_the_heads_any_code_logit() -> None:
    model = _model()
    batch = random_batch(3, vocab_size=40, seed=1)
    columns = [
        ZeroShotColumn("one", 2, (7,)),
        ZeroShotColumn("two", 0, (9, 11)),
        ZeroShotColumn("three", 3, (5, 6, 30)),
    ]
    query_time = batch.prediction_time[:, None] - torch.tensor([[0.0, 40.0]])  # two queries a sample
    with torch.no_grad():
        got = ZeroShotScorer(model, columns).embed_at(batch, query_time)
        out = model(batch, query_time=query_time)
        logits = model.heads["ehr_future_codes"](out.queries.flatten(0, 1)).unflatten(0, (3, 2)).double()
    assert got.shape == (3, 2, 3)
    p = torch.sigmoid(logits)
    want = []
    for c in columns:  # noisy-OR of the columns' codes, as its logit; one code: its own logit
        any_code = 1 - torch.prod(1 - p[:, :, c.horizon, list(c.codes)], dim=-1)
        want.append(torch.log(any_code / (1 - any_code)))
    assert torch.allclose(got.double(), torch.stack(want, dim=-1), atol=1e-4)
    assert torch.allclose(got[..., 0].double(), logits[:, :, 2, 7], atol=1e-5)
    assert np.allclose(probabilities(np.array([0.0, 2.0])), [0.5, 1 / (1 + np.exp(-2.0))])
    with pytest.raises(NoZeroShot, match="no task"):
        ZeroShotScorer(model, [])


def test_the_score_survives_a_date_shift() -> None:
    """Every time of a sample, its prediction time and its birth moved by the same days (a
    site's date shift): the same zero-shot logits (fp32 times at 100 years: ~1e-5); the birth
    alone moved by 10 years (a different age) changes them by 100 times more."""
    model = _model()
    batch = random_batch(4, vocab_size=40, seed=3)
    scorer = ZeroShotScorer(model, [ZeroShotColumn("a", 1, (6,)), ZeroShotColumn("b", 3, (8, 12))])
    with torch.no_grad():
        base = scorer.embed(batch)
        torch.testing.assert_close(scorer.embed(date_shifted(batch, 36_524.0)), base, atol=3e-5, rtol=0)
        older = scorer.embed(replace(batch, birth_time=batch.birth_time - 3652.5))
    assert (older - base).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory):
    manifest = generate_federation(
        tmp_path_factory.mktemp("zs"), "default", seed=2, n_subjects=120, progress=False, sites=["city_hospital"]
    )
    sites = {s.name: open_site(s.root) for s in manifest.sites}
    vocab = agree_vocabulary(sites, 5)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config("tiny"))
    site = sites["city_hospital"]
    return site, SiteSequences.from_site(site, vocab, tokens=setup.tokens), init_model(setup), vocab


def test_zero_shot_rows_score_every_held_out_row_and_nothing_else(tiny_site) -> None:
    site, seqs, model, vocab = tiny_site
    tasks = {
        **runner_tasks(resolve_tasks(["t2d", "hypertension"])),
        "wide": OnsetTask(name="wide_45d", outcome_code_prefix="ICD10//I10", horizon_days=45),
    }
    data = build_eval_set({"city_hospital": (site, seqs)}, tasks, n_per_subject=2, seed=0)
    res = zero_shot_rows("zero-shot", data, model, vocab.codes, max_events=64, max_patches=8, n_boot=20)
    assert "not 45" in res.skipped["wide"]
    split = data.column("split")
    assert res.rows and res.predictions
    for key, rows in res.scored_rows.items():
        y = data.labels(key)
        assert set(split[rows]) == {"held_out"}
        assert np.array_equal(rows, np.flatnonzero(np.isfinite(y) & (split == "held_out")))  # every one of them
        assert np.array_equal(res.predictions[key][0], y[rows].astype(bool))
    # The scores are the scorer's at each row's own prediction time, as embed_rows gives them.
    key = next(iter(res.scored_rows))
    rows = res.scored_rows[key][:25]
    part = data.sites[0]
    (column,), _ = zero_shot_columns(model, {key: data.tasks[key]}, vocab.codes)
    ref = embed_rows(
        ZeroShotScorer(model, [column]), seqs, part.subject_id[rows], part.prediction_time_us[rows], 64, 8, shared=False
    )
    assert np.allclose(res.predictions[key][1][:25], probabilities(ref.x[:, 0]), atol=1e-5)
    for row in res.rows:
        assert row.method == "zero-shot" and 0 <= row.auroc <= 1


def test_counting_repeats_adds_the_prevalent_rows_and_keeps_the_others(tiny_site) -> None:
    site, seqs, _, _ = tiny_site
    shipped = _onset("onset_hypertension_365d")
    counting = shipped.model_copy(update={"aces": counting_repeats(shipped.aces)})
    assert "outcome" not in counting.aces.config["windows"]["input"]["has"]
    assert counting.aces.config["windows"]["input"]["has"]["death"] == "(None, 0)"
    assert shipped.aces.config["windows"]["input"]["has"]["outcome"] == "(None, 0)"  # the original untouched
    data = build_eval_set({"c": (site, seqs)}, {"new": shipped, "any": counting}, n_per_subject=None, seed=0)
    new, any_ = data.labels("new"), data.labels("any")
    both = np.isfinite(new)
    assert np.all(np.isfinite(any_[both])) and np.array_equal(new[both], any_[both])  # the same rows, same labels
    extra = np.isfinite(any_) & ~both
    assert extra.sum() > 0 and any_[extra].sum() > 0  # prevalent rows, some with a recurrence in the year
    # The extra rows are of subjects diagnosed by then: their first outcome is at or before the row.
    events = site.read_events(columns=["subject_id", "time", "code"])
    hit = pc.starts_with(events["code"], "ICD10//I10").to_numpy(zero_copy_only=False)
    sid = events["subject_id"].to_numpy()[hit]
    when = pc.cast(events["time"], pa.int64()).to_numpy()[hit]
    part = data.sites[0]
    for i in np.flatnonzero(extra)[:20]:
        assert when[sid == part.subject_id[i]].min() <= part.prediction_time_us[i]
    t2d = load_task("t2d")
    own_windows = t2d.metadata.model_copy(update={"horizon_window": None, "horizons_days": None})
    with pytest.raises(ValueError, match="no horizon window"):
        counting_repeats(t2d.model_copy(update={"metadata": own_windows}))
    with pytest.raises(ValueError, match="count repeats already"):
        counting_repeats(counting.aces)


def test_head_fit_pools_the_rows_both_scored_and_matches_a_reference(tiny_site) -> None:
    """The evidence job's why (simulations/evidence_zero_shot.head_fit): per task, on the rows the
    zero-shot head and the probe both scored, the head's mean probability and log loss beside the
    probe's, by hand."""
    site, seqs, model, vocab = tiny_site
    tasks = runner_tasks(resolve_tasks(["hypertension"]))
    data = build_eval_set({"city_hospital": (site, seqs)}, tasks, n_per_subject=2, seed=0)
    zero = zero_shot_rows(ZERO_SHOT, data, model, vocab.codes, max_events=64, max_patches=8, n_boot=10)
    key = next(k for k in zero.predictions if 0 < zero.predictions[k][0].sum())
    rows = zero.scored_rows[key]
    y = zero.predictions[key][0]
    keep = np.arange(len(rows)) % 3 != 0  # the probe scored two rows in three
    rng = np.random.default_rng(0)
    p_probe = np.clip(0.3 * y[keep] + 0.7 * rng.random(int(keep.sum())), 0.01, 0.99)
    probe = MethodResult(predictions={key: (y[keep], p_probe)}, scored_rows={key: rows[keep]})
    fit = head_fit({"city_hospital": data}, {"city_hospital": {ZERO_SHOT: zero, "federated": probe}})
    assert list(fit) == [key]
    f = fit[key]
    yk, pz = y[keep].astype(float), zero.predictions[key][1][keep]
    assert f["rows"] == keep.sum() and math.isclose(f["positive_rate"], yk.mean())
    assert math.isclose(f["zero_shot_mean_p"], pz.mean())
    assert math.isclose(f["zero_shot_logit_sd"], np.std(np.log(pz / (1 - pz))), rel_tol=1e-6, abs_tol=1e-12)
    bce = lambda p: -np.mean(yk * np.log(p) + (1 - yk) * np.log(1 - p))  # noqa: E731
    assert math.isclose(f["zero_shot_log_loss"], bce(pz), rel_tol=1e-9)
    assert math.isclose(f["probe_log_loss"], bce(p_probe), rel_tol=1e-9)
    labels = data.labels(key)
    assert f["train_positives"] == np.nansum(labels[data.column("split") == "train"])


def _comparison(a: str, b: str, d: float, lo: float, hi: float) -> Comparison:
    return Comparison(
        a=a, b=b, n_items=4, n_rows=400, n_subjects=100, mean_a=0.6 + d, mean_b=0.6, difference=d,
        difference_ci=(lo, hi), ratio=1.0, ratio_ci=(1.0, 1.0), fraction_at_or_below_zero=0.5,
    )  # fmt: skip


def test_the_report_says_by_how_much_and_why_where_zero_shot_is_far_below() -> None:
    comps = {
        "federated: zero-shot - probe": _comparison(ZERO_SHOT, "federated", -0.20, -0.25, -0.15),
        "federated: zero-shot - probe on the query state": _comparison(ZERO_SHOT, "q", -0.15, -0.2, -0.1),
        "federated: probe on the query state - probe": _comparison("q", "federated", -0.05, -0.08, -0.02),
        "federated: zero-shot - oracle": _comparison(ZERO_SHOT, "oracle", -0.30, -0.35, -0.25),
        "budget: FedAvg, 10 rounds: zero-shot - probe": _comparison("a", "b", -0.10, -0.15, -0.05),
        "budget: FedAvg, 2 rounds: zero-shot - probe": _comparison("a", "b", -0.25, -0.3, -0.2),
    }
    ev = Evidence()
    fit = {"flat": 1e-4, "varied": 0.8}
    ev.diagnostics["default"][0] = {
        HEAD_KEY: {
            k: {"rows": 50.0, "positive_rate": 0.1, "train_positives": 9.0, "zero_shot_mean_p": 0.48,
                "zero_shot_logit_sd": sd, "zero_shot_log_loss": 0.65, "probe_log_loss": 0.3,
                "zero_shot_auroc": 0.6, "probe_auroc": 0.8}
            for k, sd in fit.items()
        }
    }  # fmt: skip
    text = "\n".join(why_lines("default", ev, comps, far_below=0.05))
    assert "| flat | 50 | 0.100 | 9 | 0.480 | 0.0001 | 0.650 | 0.300 | 0.600 | 0.800 |" in text
    assert f"vary by less than {FLAT_HEAD} (SD over the rows) on 1 of 2 tasks" in text
    assert "-0.200 [-0.250, -0.150] AUROC against its own probe" in text and "(far below)" in text
    assert "the probe sits -0.100 from the oracle" in text
    assert "Likely why: most of the -0.200 is the head's read-out (-0.150)" in text
    assert "the gap narrows as rounds grow (-0.250 to -0.100: budget)" in text  # 2 rounds before 10
    assert "the head's logits hardly vary on 1 of 2 tasks (under-trained: budget)." in text
    near = {**comps, "federated: zero-shot - probe": _comparison(ZERO_SHOT, "federated", -0.02, -0.05, 0.01)}
    text = "\n".join(why_lines("default", Evidence(), near, far_below=0.05))
    assert "within 0.05" in text and "Likely why" not in text
    assert why_lines("default", Evidence(), {}, far_below=0.05) == []
