"""The evidence job (issue 14): its pieces by hand, and one real `--quick` run whose report's
structure is checked (every question answered with a number or a reason, every interval
ordered, the JSON's keys). The numbers of a quick run are not evidence and are not asserted.
The quick run is four Flower simulations plus training and probes: 2 min 56 s on an idle 2-core
machine (25 min at load ~30); the slow test then resumes it (resume=true: every unit loaded, only
the report redrawn) and checks the numbers are the same. `make test-slow` runs it (6.4 min on the
project's 2-core machine, too long for CI's 60 minutes: Makefile, SLOW_CI)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.eval.compare import privacy_table
from healthfm_core.eval.metrics import auroc, bootstrap_counts, paired_difference
from healthfm_core.eval.paired_comparison import (
    Comparison,
    compare_draws,
    compare_paired,
    compare_row_sets,
    comparison_plot,
    ratio_curve_plot,
    with_prefix,
)
from healthfm_core.eval.tabular import NEVER_DAYS, tabular_features
from simulations.evidence import (
    BUDGET_KEY,
    QUESTIONS,
    calibration_rows,
    finished_unit,
    plan_stages,
    prepare_out_dir,
    unit_config,
    verdicts,
    with_preset_flags,
)
from simulations.evidence_federations import FED_DONE, clear_unfinished_unit, federation
from simulations.evidence_units import (
    ARRAYS,
    DONE,
    Evidence,
    UnitConfigMismatch,
    UnitFileError,
    load_unit,
    save_unit,
    unit_fingerprint,
)
from simulations.synthetic import load_scenario

ROOT = Path(__file__).resolve().parents[2]


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


def test_compare_row_sets_is_compare_paired_on_shared_rows_and_pairs_by_subject() -> None:
    items = _items(3)
    same = [(y, pa_, g, y, pb, g) for y, pa_, pb, g in items]
    assert compare_row_sets(same, "a", "b", n_boot=200).model_dump() == {
        **compare_paired(items, "a", "b", n_boot=200).model_dump(),
        "n_rows": 2 * sum(len(it[0]) for it in items),
    }
    # b scores a subset of a's rows with the same scores: every resample draws each subject once
    # for both sets, so the difference is that of the same people's rows, by hand below.
    y, p, _, g = items[0]
    keep = g < 100
    c = compare_row_sets([(y, p, g, y[keep], p[keep], g[keep])], "all rows", "subset", n_boot=300, seed=4)
    assert math.isclose(c.difference, auroc(y, p) - auroc(y[keep], p[keep]))
    rng = np.random.default_rng(4)
    w = bootstrap_counts(y, 300, rng, groups=g)  # [300, rows]: one draw of the subjects per resample
    diffs = np.asarray(auroc(y, p, weights=w)) - np.asarray(auroc(y[keep], p[keep], weights=w[:, keep]))
    assert np.allclose(c.difference_ci, np.quantile(diffs, [0.025, 0.975]))
    assert c.n_items == 1 and c.n_subjects == len(np.unique(g))


def test_compare_draws_covers_the_draws_and_is_compare_paired_for_one() -> None:
    items = _items(0)
    one = compare_draws([items], "good", "bad", n_boot=200, seed=3)
    assert one == compare_paired(items, "good", "bad", n_boot=200, seed=3)
    # Five draws of `good` on the same rows and subjects: three as good, two much worse. The
    # interval over draws and subjects is wider than any one draw's subject-only interval.
    rng = np.random.default_rng(9)
    draws = []
    for k in range(5):
        noise = 0.8 if k < 3 else 2.5
        draws.append([(y, y + rng.normal(0, noise, len(y)), b, g) for y, _, b, g in items])
    c = compare_draws(draws, "good", "bad", n_boot=400, seed=1)
    singles = [compare_paired(d, "good", "bad", n_boot=400, seed=1) for d in draws]
    assert c.difference == pytest.approx(np.mean([s.difference for s in singles]))
    width = c.difference_ci[1] - c.difference_ci[0]
    assert width > max(s.difference_ci[1] - s.difference_ci[0] for s in singles)
    assert c.n_items == 15 and c.n_subjects == 150  # the draws share their subjects


def test_evidence_combines_a_settings_draws() -> None:
    ev = Evidence()
    items = _items(0)
    for d in (1, 2, 3):
        ev.add("default", f"q4|eps=8 draw {d} - no DP", f"eps=8 draw {d}", "no DP", 0, items)
        ev.add("default", f"q4|eps=3 draw {d} - eps=8 draw {d}", f"eps=3 draw {d}", f"eps=8 draw {d}", 0, items)
    comps = ev.compare(50)
    both = comps[("default", "q4|eps=8 - no DP")]
    assert (both.a, both.b, both.n_items) == ("eps=8", "no DP", 9)
    assert comps[("default", "q4|eps=3 - eps=8")].b == "eps=8"
    assert ("default", "q4|eps=8 draw 2 - no DP") in comps


def test_budget_curve_keys_and_plot(tmp_path: Path) -> None:
    m = BUDGET_KEY.match("q1|budget: FedProx, 16 rounds")
    assert m is not None and (m["strategy"], int(m["rounds"])) == ("FedProx", 16)
    c = compare_paired(_items(0), "good", "bad", n_boot=50)
    path = ratio_curve_plot({"FedAvg": {4: c, 8: c}, "FedAdam": {4: c}}, tmp_path / "curve.png", "t", reference=0.98)
    assert path.is_file()


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


# ---------------------------------------------------------------- a unit's evidence on disk


def _fill(ev: Evidence, scenario: str, seed: int) -> None:
    """What a unit leaves: paired items (one key in every seed, one in this seed only, one with
    a single class: a note), calibration arrays, summary rows (a NaN AUROC), curves, privacy."""
    ev.add(scenario, "q1|all horizons", "federated", "pooled", seed, _items(seed))
    ev.add(scenario, f"q2|site {seed}", "federated", "local-only", seed, _items(seed + 10, n=80, tasks=2))
    one_class = (np.zeros(20, bool), np.ones(20), np.ones(20), np.arange(20))
    ev.add(scenario, "q2|thin", "federated", "local-only", seed, [one_class])
    # Issue 72: two label definitions on rows of their own (b's rows a subset of a's).
    (y, pa_, _, g), *_ = _items(seed + 20, n=120, tasks=1)
    ev.add_row_sets(scenario, "r|two row sets", "a", "b", seed, [(y, pa_, g, y[:80], pa_[:80], g[:80])])
    rng = np.random.default_rng(seed)
    for h in (30, 365):
        y = rng.random(60) < 0.3
        ev.calibration[(scenario, h)].append(
            (y, rng.random(60), np.char.add(f"{scenario}|{seed}|", np.arange(60).astype(str)))
        )
    ev.summaries[scenario][seed] = [
        {"method": "federated", "horizon": 30, "auroc": float("nan"), "ece": 0.1, "pairs": 2, "n": 60},
        {"method": "pooled", "horizon": None, "auroc": 0.7, "ece": 0.05, "pairs": 4, "n": 120},
    ]
    curves = ev.curves.setdefault(scenario, {m: {} for m in ("federated", "random init", "tabular")})
    for share in (0.05, 1.0):
        curves["federated"].setdefault(share, []).append(0.6 + share / 10 + seed / 100)
    ev.privacy[scenario][seed] = {
        "settings": {"eps=8": 8.0, "no DP": None},
        "spent": {"eps=8": {"hospital_a": 7.9}},
        "noise_multiplier": {"eps=8": {"hospital_a": 0.8}},
        "steps_per_site": 4,
        "summary": [],
        "table": "| x |",
    }


def _same(a: object, b: object) -> bool:
    """Equal, key order and key types included, NaN equal to NaN."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and [(k, type(k)) for k in a] == [(k, type(k)) for k in b]
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def _assert_same_evidence(a: Evidence, b: Evidence) -> None:
    for field in ("items", "row_sets", "methods", "per_seed", "calibration", "summaries", "curves", "privacy", "notes"):
        assert _same(dict(getattr(a, field)), dict(getattr(b, field))), field


def test_a_units_evidence_round_trips_and_merges_like_one_run(tmp_path: Path) -> None:
    direct = Evidence()  # the old job: every unit into one Evidence
    merged = Evidence()
    for seed in (0, 1):
        _fill(direct, "default", seed)
        unit = Evidence()
        _fill(unit, "default", seed)
        save_unit(tmp_path / f"default-seed{seed}", unit, "default", seed, {"seed": seed}, {"stage": 1.5})
        loaded = load_unit(tmp_path / f"default-seed{seed}")
        _assert_same_evidence(unit, loaded)
        merged.merge(loaded)
    _assert_same_evidence(direct, merged)
    assert merged.notes["default"] == ["seed 0: q2|thin: no task had both federated and local-only scored"] + [
        "seed 1: q2|thin: no task had both federated and local-only scored"
    ]
    assert list(merged.compare(n_boot=40).items()) == list(direct.compare(n_boot=40).items())
    assert _same(calibration_rows(merged, "default", 20), calibration_rows(direct, "default", 20))


def _saved_unit(tmp_path: Path) -> Path:
    unit = Evidence()
    _fill(unit, "default", 0)
    save_unit(tmp_path / "u", unit, "default", 0, {"seed": 0}, {})
    return tmp_path / "u"


def _rehash(unit_dir: Path) -> None:
    # A JSON that vouches for the npz as it now is: the npz's own checks must catch it.
    doc = json.loads((unit_dir / DONE).read_text())
    doc["npz_sha256"] = hashlib.sha256((unit_dir / ARRAYS).read_bytes()).hexdigest()
    (unit_dir / DONE).write_text(json.dumps(doc))


def test_a_damaged_unit_is_refused_naming_its_file(tmp_path: Path) -> None:
    unit_dir = _saved_unit(tmp_path)
    npz, doc = (unit_dir / ARRAYS).read_bytes(), (unit_dir / DONE).read_text()

    (unit_dir / ARRAYS).write_bytes(npz[: len(npz) // 2])  # truncated
    with pytest.raises(UnitFileError, match=rf"{ARRAYS}: sha256 .* npz_sha256"):
        load_unit(unit_dir)
    _rehash(unit_dir)
    with pytest.raises(UnitFileError, match=rf"{ARRAYS}: not a readable npz"):
        load_unit(unit_dir)
    with np.load(io.BytesIO(npz)) as full:  # a readable npz short of one listed array
        np.savez(unit_dir / ARRAYS, **{k: full[k] for k in full.files if k != "i0_1_pa"})
    _rehash(unit_dir)
    with pytest.raises(UnitFileError, match=rf"{ARRAYS}: array i0_1_pa missing"):
        load_unit(unit_dir)
    (unit_dir / ARRAYS).unlink()
    with pytest.raises(UnitFileError, match=rf"{ARRAYS}: missing"):
        load_unit(unit_dir)

    (unit_dir / ARRAYS).write_bytes(npz)
    (unit_dir / DONE).write_text(doc[: len(doc) // 2])  # truncated
    with pytest.raises(UnitFileError, match=rf"{DONE}: not valid JSON"):
        load_unit(unit_dir)
    (unit_dir / DONE).write_text(doc.replace('"seed": 0', '"seed": "zero"', 1))
    with pytest.raises(UnitFileError, match=rf"{DONE}: .*seed: Input should be a valid integer"):
        load_unit(unit_dir)
    (unit_dir / DONE).write_text(doc)
    _assert_same_evidence(load_unit(unit_dir), load_unit(unit_dir))  # restored: reads again


def _job_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("evidence", overrides=["preset=quick", *overrides])


def test_the_plan_prints_issue_72s_stages_where_they_run_and_only_refuses_an_unknown_variant() -> None:
    stages = dict(plan_stages(_job_config()))
    # quick: the pitfall and one ablation variant in `default`, zero-shot in every unit.
    assert (
        stages["default seed 0: zero-shot and repeated events"]
        > stages["trajectories seed 0: zero-shot and repeated events"]
        > 0
    )
    assert "default seed 0: objective ablations (1 pooled trainings)" in stages
    assert not any(s.startswith("trajectories seed 0: objective ablations") for s in stages)
    full = dict(plan_stages(_job_config("preset=full")))
    assert [s for s in full if "objective ablations" in s] == [
        "default seed 0: objective ablations (6 pooled trainings)",
        "trajectories seed 0: objective ablations (6 pooled trainings)",
    ]
    assert sum("zero-shot and repeated events" in s for s in full) == 6
    off = dict(plan_stages(_job_config("zero_shot.enabled=false", "objective_ablation.scenarios=[]")))
    assert not any("zero-shot" in s or "objective" in s for s in off)
    with pytest.raises(ValueError, match=r"objective_ablation.only names \['no such'\]"):
        plan_stages(_job_config("objective_ablation.only=[no such]"))


def test_resume_refuses_a_unit_of_another_config_and_reruns_an_unfinished_one(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units" / "default-seed0"

    def fingerprint(*overrides: str) -> dict:
        return unit_fingerprint(unit_config(_job_config(*overrides), "default", 0, unit_dir), "default")

    fp = fingerprint()
    # Where, how fast, and what only the report reads: the same unit.
    assert fp == fingerprint("out_dir=/elsewhere", "threads=2", "resume=true", "eval.n_boot=7", "seeds=[0,1]")
    assert fp["privacy_budget"]["runs_here"] is True
    assert fingerprint("privacy_budget.seeds=[1]")["privacy_budget"]["runs_here"] is False

    assert finished_unit(unit_dir, fp) is None  # never ran: it runs
    unit = Evidence()
    _fill(unit, "default", 0)
    save_unit(unit_dir, unit, "default", 0, fp, {"default seed 0: data": 2.0})
    (unit_dir / DONE).rename(unit_dir / "stopped.json")
    assert finished_unit(unit_dir, fp) is None  # arrays but no done-marker: it reruns
    (unit_dir / "stopped.json").rename(unit_dir / DONE)
    loaded, seconds = finished_unit(unit_dir, fp)  # type: ignore[misc]
    _assert_same_evidence(unit, loaded)
    assert seconds == {"default seed 0: data": 2.0}

    with pytest.raises(UnitConfigMismatch, match=rf"{DONE}: config field federation.lr is 0.003 .* but 0.01 now"):
        finished_unit(unit_dir, fingerprint("federation.lr=0.01"))
    with pytest.raises(UnitConfigMismatch, match=r"config field n_subjects is 80"):
        finished_unit(unit_dir, fingerprint("n_subjects=90"))


def test_resume_keeps_only_an_evidence_jobs_units(tmp_path: Path) -> None:
    (tmp_path / "units" / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a previous evidence job"):
        prepare_out_dir(tmp_path, resume=True)
    (tmp_path / ".evidence.started").touch()
    prepare_out_dir(tmp_path, resume=True)
    assert (tmp_path / "units" / "x").is_dir()  # kept for the resumed job
    prepare_out_dir(tmp_path, resume=False)
    assert not (tmp_path / "units").exists()  # as before: a fresh run clears the previous one


def test_a_stopped_unit_keeps_only_its_finished_federations(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units" / "default-seed0"
    for fed in ("federation", "privacy/eps-8-draw1", "privacy/eps-8-draw2", "budget/fedavg-8-rounds"):
        (unit_dir / fed / "checkpoints").mkdir(parents=True)
        (unit_dir / fed / "server.log").write_text("...")
    for fed in ("federation", "privacy/eps-8-draw1"):  # finished; the others stopped midway
        (unit_dir / fed / FED_DONE).write_text("{}")
    (unit_dir / ARRAYS).write_bytes(b"partial")
    clear_unfinished_unit(unit_dir)
    left = sorted(str(p.relative_to(unit_dir)) for p in unit_dir.rglob("*"))
    assert left == sorted(
        ["federation", "privacy", "privacy/eps-8-draw1"]
        + [
            f"{fed}/{name}"
            for fed in ("federation", "privacy/eps-8-draw1")
            for name in ("checkpoints", "server.log", FED_DONE)
        ]
    )
    clear_unfinished_unit(tmp_path / "never-ran")  # nothing there: nothing to do


def test_a_finished_federation_of_another_config_or_a_damaged_marker_is_refused(tmp_path: Path) -> None:
    cfg = unit_config(_job_config(), "default", 0, tmp_path)
    fed_dir = tmp_path / "federation"
    fed_dir.mkdir()
    recorded = unit_fingerprint(unit_config(_job_config("federation.lr=0.01"), "default", 0, tmp_path), "default")
    doc = {"format": 1, "fingerprint": recorded, "round": 2, "seconds": 41.5}
    (fed_dir / FED_DONE).write_text(json.dumps(doc))
    # Refused before anything is loaded or trained, naming the file and the field.
    with pytest.raises(UnitConfigMismatch, match=rf"{FED_DONE}: config field federation.lr is 0.01 .* but 0.003 now"):
        federation(cfg, fed_dir, "default")
    (fed_dir / FED_DONE).write_text(json.dumps({**doc, "round": "two"}))
    with pytest.raises(UnitFileError, match=rf"{FED_DONE}: not a valid finished-federation file \(round: "):
        federation(cfg, fed_dir, "default")
    (fed_dir / FED_DONE).write_text(json.dumps({**doc, "format": 7}))
    with pytest.raises(UnitFileError, match=rf"{FED_DONE}: field format is 7"):
        federation(cfg, fed_dir, "default")
    assert sorted(p.name for p in fed_dir.iterdir()) == [FED_DONE]  # nothing removed or written


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


def _resume_quick(out: Path) -> str:
    """The quick job again in out with resume=true; its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    resumed = subprocess.run(
        [sys.executable, "-m", "simulations.evidence", "--quick", f"out_dir={out}", f"data_root={out / 'data'}"]
        + ["resume=true"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=1800,
        capture_output=True,
        text=True,
    )
    return resumed.stdout + resumed.stderr


def _ordered(lo: float, point: float, hi: float) -> bool:
    # A percentile bootstrap interval is ordered; it need not contain the point estimate.
    if not all(np.isfinite([lo, hi])):
        return True  # an interval a quick run could not estimate is NaN, and says so
    return bool(np.isfinite(point)) and lo <= hi


SIZE_CURVE = "subjects a site"  # the size curve's comparison names (simulations/evidence_dp.py KEY)


def _size_curve(dump: dict[str, Any]) -> list[str]:
    return [name for entry in dump["questions"]["q4"].values() for name in entry["comparisons"] if SIZE_CURVE in name]


def _without_size_curve(dump: dict[str, Any]) -> dict[str, Any]:
    """evidence.json's questions and verdicts without the DP size curve's comparisons and verdict."""
    questions = {
        q: {
            scenario: {**entry, "comparisons": {k: c for k, c in entry["comparisons"].items() if SIZE_CURVE not in k}}
            for scenario, entry in per.items()
        }
        for q, per in dump["questions"].items()
    }
    verdicts = {
        scenario: [v for v in vs if not v["target"].startswith("DP's cost by a site's size")]
        for scenario, vs in dump["verdicts"].items()
    }
    return {"questions": questions, "verdicts": verdicts}


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
        # Every question in order; q1 has a second verdict, the budget curve's (not run at CI size).
        asked = [v["question"] for v in dump["verdicts"][scenario]]
        assert list(dict.fromkeys(asked)) == list(QUESTIONS) and asked.count("q1") == 2
        assert "not measured" in dump["verdicts"][scenario][1]["detail"]
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

    # resume=true on the finished run: every unit loads from its evidence file (no stage trains,
    # the Flower runs stay untouched) and the report's numbers are the same.
    for unit_name in ("default-seed0", "trajectories-seed0"):
        assert (quick / "units" / unit_name / "evidence_unit.json").is_file()
    rounds_mtime = (fed / "rounds.jsonl").stat().st_mtime_ns
    logged = _resume_quick(quick)
    stages = [s for s in dump["plan_seconds"] if s != "comparisons, report and plots"]
    for stage in stages:
        assert f"{stage}: loaded from" in logged, stage
    again = json.loads((quick / "evidence.json").read_text())
    assert sorted(again["loaded_stages"]) == sorted(stages)
    for key in ("questions", "verdicts"):  # NaN included: compared as written
        assert json.dumps(again[key]) == json.dumps(dump[key]), key
    assert (fed / "rounds.jsonl").stat().st_mtime_ns == rounds_mtime

    # A unit stopped after some of its federations (its done-marker gone, and the no-DP
    # federation's, which stopped midway): resumed, it loads the finished federations, trains the
    # other again, and the report's numbers are the same (training is deterministic at the seed).
    unit = quick / "units" / "default-seed0"
    (unit / "evidence_unit.json").unlink()
    (unit / "privacy" / "no-dp" / FED_DONE).unlink()
    dp_rounds = unit / "privacy" / "eps-8" / "rounds.jsonl"
    dp_mtime = dp_rounds.stat().st_mtime_ns
    logged = _resume_quick(quick)
    for fed_dir in (fed, unit / "privacy" / "eps-8"):
        assert f"{fed_dir}: finished federation loaded" in logged
    assert "trajectories seed 0: federation: loaded from" in logged
    assert "default seed 0: federation: loaded from" not in logged
    assert (fed / "rounds.jsonl").stat().st_mtime_ns == rounds_mtime
    assert dp_rounds.stat().st_mtime_ns == dp_mtime
    assert (unit / "privacy" / "no-dp" / FED_DONE).is_file()  # trained again, and marked
    again = json.loads((quick / "evidence.json").read_text())
    # The DP size curve (issue 68) trains one site alone, not a federation: nothing of it is kept
    # but the unit's evidence, so the rerun unit draws its secret noise anew; its numbers differ,
    # everything else is the same.
    assert _size_curve(again) and _size_curve(dump)
    for key in ("questions", "verdicts"):
        assert json.dumps(_without_size_curve(again)[key]) == json.dumps(_without_size_curve(dump)[key]), key


def test_privacy_table_names_each_draw() -> None:
    table = privacy_table([], {"eps=8 draw 2": 8.0, "eps=8": 8.0, "no DP": None}, {})
    assert "| 8 (draw 2) |" in table and "| 8 |" in table and "| none (no DP) |" in table


def test_q4_monotonicity_reads_epsilons_over_their_draws_not_draws_paired_by_index() -> None:
    # Draw i of eps=3 and draw i of eps=8 are independent federations: one such pair clearly
    # apart (the full job's eps=3 draw 3 vs eps=8 draw 3) is no inversion; the pooled step is.
    def comp(a: str, b: str, ci: tuple[float, float]) -> Comparison:
        d = (ci[0] + ci[1]) / 2
        return Comparison(a=a, b=b, n_items=50, n_rows=500, n_subjects=400, mean_a=0.7 + d, mean_b=0.7,
                          difference=d, difference_ci=ci, ratio=1 + d / 0.7, ratio_ci=(1 + ci[0] / 0.7, 1 + ci[1] / 0.7),
                          fraction_at_or_below_zero=0.5)  # fmt: skip

    cfg = _job_config()
    comps = {
        "q4|eps=8 - no DP": comp("eps=8", "no DP", (-0.03, 0.01)),
        "q4|eps=3 draw 3 - eps=8 draw 3": comp("eps=3 draw 3", "eps=8 draw 3", (0.005, 0.041)),
        "q4|eps=3 - eps=8": comp("eps=3", "eps=8", (-0.022, 0.019)),
    }
    # q4's draws verdict (the second q4 verdict, since issue 68, is DP's cost by a site's size)
    (q4,) = [v for v in verdicts(cfg, "default", comps, []) if v.question == "q4" and "monotone" in v.target]
    assert q4.met is True and "monotone within intervals" in q4.detail
    comps["q4|eps=3 - eps=8"] = comp("eps=3", "eps=8", (0.004, 0.03))
    (q4,) = [v for v in verdicts(cfg, "default", comps, []) if v.question == "q4" and "monotone" in v.target]
    assert q4.met is False and q4.detail.endswith("inverted: eps=3 vs eps=8")


def test_budget_verdict_reads_each_strategy_curve() -> None:
    def comp(ratio: float) -> Comparison:
        return Comparison(a="fed", b="pooled", n_items=50, n_rows=500, n_subjects=400, mean_a=0.7 * ratio, mean_b=0.7,
                          difference=0.7 * ratio - 0.7, difference_ci=(-0.05, 0.05), ratio=ratio,
                          ratio_ci=(ratio - 0.04, ratio + 0.04), fraction_at_or_below_zero=0.5)  # fmt: skip

    cfg = _job_config()
    comps = {
        "q1|all horizons": comp(0.99),
        "q1|budget: FedAvg, 4 rounds": comp(0.95),
        "q1|budget: FedAvg, 8 rounds": comp(0.985),
        "q1|budget: FedAvg, 16 rounds": comp(0.97),
        "q1|budget: FedAdam, 4 rounds": comp(0.93),
        "q1|budget: FedAdam, 16 rounds": comp(0.96),
    }
    (_, budget) = [v for v in verdicts(cfg, "default", comps, []) if v.question == "q1"]
    assert budget.met is True
    assert "FedAvg 0.950 / 0.985 / 0.970 at 4 / 8 / 16 rounds: reaches it at 8 rounds" in budget.detail
    assert "FedAdam 0.930 / 0.960 at 4 / 16 rounds: below it; best 0.960 [0.920, 1.000] at 16 rounds" in budget.detail
    del comps["q1|budget: FedAvg, 8 rounds"]
    (_, budget) = [v for v in verdicts(cfg, "default", comps, []) if v.question == "q1"]
    assert budget.met is False  # no strategy at any budget: the curve flattens below the target
    (_, budget) = [v for v in verdicts(cfg, "default", {"q1|all horizons": comp(0.99)}, []) if v.question == "q1"]
    assert budget.met is None and budget.detail.startswith("not measured")
