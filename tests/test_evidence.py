"""The evidence job (issue 14): its pieces by hand, and one real `--quick` run whose report's
structure is checked (every question answered with a number or a reason, every interval
ordered, the JSON's keys). The numbers of a quick run are not evidence and are not asserted.
The quick run is four Flower simulations plus training and probes: 2 min 56 s on an idle 2-core
machine (25 min at load ~30). CI runs it (Makefile SLOW_CI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from healthfm_core.data.batch import Batch
from healthfm_core.data.synthetic import load_scenario
from healthfm_core.eval.evidence import Comparison, compare_paired, comparison_plot, with_prefix
from healthfm_core.eval.metrics import paired_difference
from healthfm_core.eval.tabular import NEVER_DAYS, tabular_features
from simulations.evidence import QUESTIONS, with_preset_flags

ROOT = Path(__file__).resolve().parents[1]


def _items(seed: int, n: int = 300, tasks: int = 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tasks):
        y = rng.random(n) < 0.2
        good = y + rng.normal(0, 0.8, n)
        bad = y + rng.normal(0, 3.0, n)
        out.append((y, good, bad, np.arange(n) // 2))  # two rows per subject
    return out


def test_compare_paired_agrees_with_paired_difference_and_orders_methods() -> None:
    items = _items(0)
    c = compare_paired(items, "good", "bad", n_boot=200, seed=3)
    d = paired_difference(items, n_boot=200, seed=3)
    assert c.difference == pytest.approx(d.mean)
    assert c.difference_ci == pytest.approx(d.ci)  # the same resamples
    assert c.difference_ci[0] > 0 and c.ratio_ci[0] > 1
    assert c.n_subjects == 150 and c.n_items == 3
    same = compare_paired([(y, a, a, g) for y, a, _, g in items], "a", "a", n_boot=50)
    assert same.difference == 0 and same.difference_ci == (0.0, 0.0) and same.ratio == 1.0


def test_thin_items_leave_only_their_own_resamples() -> None:
    # Thin items (one positive subject each) lose their class in about a third of the resamples
    # each; with twenty of them almost no resample keeps them all. Each is left out of those
    # resamples' means only, so every resample still counts and the interval is a real interval.
    rng = np.random.default_rng(1)
    thin = []
    for _ in range(20):
        y = np.zeros(200, bool)
        y[rng.integers(200)] = True
        thin.append((y, y + rng.normal(0, 1, 200), rng.normal(0, 1, 200), np.arange(200) // 2))
    c = compare_paired(_items(0) + thin, "good", "bad", n_boot=300, seed=2)
    lo, hi = c.difference_ci
    assert np.isfinite([lo, hi]).all() and hi - lo > 0.01
    assert lo <= c.difference <= hi and lo > 0


def test_runs_never_share_a_subject() -> None:
    both = with_prefix(_items(0), "s|0|") + with_prefix(_items(1), "s|1|")
    assert compare_paired(both, "good", "bad", n_boot=20).n_subjects == 300


def test_tabular_features_last_value_time_since_age_prs() -> None:
    v = 8
    codes = torch.tensor([[[5, 0], [6, 0], [5, 7]]])
    values = torch.tensor([[[0.5, 0.0], [0.0, 0.0], [0.7, 0.0]]])
    has_value = torch.tensor([[[True, False], [False, False], [True, False]]])
    batch = Batch(
        subject_id=torch.tensor([1]),
        prediction_time=torch.tensor([10.0]),
        codes=codes,
        values=values,
        has_value=has_value,
        times=torch.tensor([[1.0, 2.0, 3.0]]),
        ehr_valid=torch.tensor([[True, True, True]]),
        wear_epochs=torch.zeros(1, 0, 1, 2),
        wear_epoch_mask=torch.zeros(1, 0, 1, 2, dtype=torch.bool),
        wear_times=torch.zeros(1, 0),
        wear_valid=torch.zeros(1, 0, dtype=torch.bool),
        prs=torch.tensor([[1.5, 0.0]]),
        prs_valid=torch.tensor([[True, False]]),
        birth_time=torch.tensor([-50 * 365.25]),
    )
    x = tabular_features(batch, v)[0].numpy()
    counts, last, has_last, since = x[:v], x[v : 2 * v], x[2 * v : 3 * v], x[3 * v : 4 * v]
    assert counts[5] == pytest.approx(math.log1p(2)) and counts[6] == pytest.approx(math.log1p(1))
    assert last[5] == pytest.approx(0.7) and has_last[5] == 1 and has_last[6] == 0 and last[6] == 0
    assert since[5] == pytest.approx(math.log1p(7)) and since[6] == pytest.approx(math.log1p(8))
    assert since[4] == pytest.approx(math.log1p(NEVER_DAYS))
    age, age_missing = x[4 * v], x[4 * v + 1]
    assert age == pytest.approx(50 + 10 / 365.25, rel=1e-5) and age_missing == 0
    assert list(x[4 * v + 2 :]) == pytest.approx([1.5, 0.0, 1.0, 0.0])


def test_trajectories_scenario_adds_nonlinear_terms_only_there() -> None:
    assert all(d.nonlinear for d in load_scenario("trajectories").diseases.values())
    assert not any(d.nonlinear for d in load_scenario("default").diseases.values())


def test_plots_take_intervals_that_miss_their_point(tmp_path: Path) -> None:
    # A percentile bootstrap interval need not contain the point estimate (the full job once
    # ended in its report on matplotlib's "'xerr' must not contain negative values").
    off = Comparison(
        a="federated",
        b="pooled",
        n_items=4,
        n_rows=400,
        n_subjects=200,
        mean_a=0.70,
        mean_b=0.72,
        difference=-0.02,
        difference_ci=(-0.01, 0.03),
        ratio=0.97,
        ratio_ci=(0.98, 1.04),
        fraction_at_or_below_zero=0.5,
    )
    nan = off.model_copy(update={"difference_ci": (float("nan"), float("nan"))})
    for ratio in (False, True):
        path = comparison_plot({"missed": off, "nan": nan}, tmp_path / f"c{ratio}.png", "t", ratio=ratio)
        assert path.stat().st_size > 0


def test_preset_flags() -> None:
    assert with_preset_flags(["x", "--quick", "a=1"]) == ["x", "preset=quick", "a=1"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evidence")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "simulations.evidence", "--quick", f"out_dir={out}", f"data_root={out / 'data'}"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=1800,
    )
    return out


def _ordered(lo: float, point: float, hi: float) -> bool:
    # A percentile bootstrap interval is ordered; it need not contain the point estimate.
    if not all(np.isfinite([lo, hi])):
        return True  # an interval a quick run could not estimate is NaN, and says so
    return bool(np.isfinite(point)) and lo <= hi


@pytest.mark.slow  # the whole job at CI size: four Flower simulations, training and probes
def test_quick_report_answers_every_question(quick: Path) -> None:
    dump = json.loads((quick / "evidence.json").read_text())
    assert {"preset", "questions", "verdicts", "plan_seconds", "stage_seconds", "config"} <= set(dump)
    assert dump["preset"] == "quick"
    scenarios = dump["config"]["scenarios"]
    assert set(scenarios) == {"default", "trajectories"}
    assert set(dump["questions"]) == set(QUESTIONS)
    for q, per_scenario in dump["questions"].items():
        assert set(per_scenario) == set(scenarios), q
        for scenario, entry in per_scenario.items():
            answered = entry["comparisons"] or entry.get("calibration")
            assert answered or entry.get("reason"), f"{q} {scenario}: neither a number nor a reason"
            for name, c in entry["comparisons"].items():
                assert _ordered(c["difference_ci"][0], c["difference"], c["difference_ci"][1]), (q, name, c)
                assert _ordered(c["ratio_ci"][0], c["ratio"], c["ratio_ci"][1]), (q, name, c)
                assert c["n_items"] >= 1 and c["n_subjects"] >= 1
            for r in entry.get("calibration", []):
                assert 0 <= r["ece"] <= 1 and r["ece_ci"][0] <= r["ece_ci"][1]
    # Privacy ran for default only in the quick preset: trajectories states why.
    assert "not run" in dump["questions"]["q4"]["trajectories"]["reason"]
    for scenario in scenarios:
        assert [v["question"] for v in dump["verdicts"][scenario]] == list(QUESTIONS)
    report = (quick / "report.md").read_text()
    for q in QUESTIONS:
        assert f"## {q}:" in report
    for line in report.splitlines():
        if line.startswith("!["):
            assert (quick / line.split("](")[1].rstrip(")")).is_file(), line
    # The job probes the models itself, so its federations ask for no federated evaluation
    # (federation.eval_tasks: []): the server logs the skip and records no evaluation event.
    fed = quick / "units" / "default-seed0" / "federation"
    events = [json.loads(line)["event"] for line in (fed / "rounds.jsonl").read_text().splitlines() if line]
    assert "round" in events and "evaluate" not in events
    assert "evaluation after round 2: skipped (eval_tasks is empty)" in (fed / "server.log").read_text()
