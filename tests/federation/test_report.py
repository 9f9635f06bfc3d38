"""The comparison report: federated vs centralized vs local-only vs oracle.

One real end-to-end run (Flower simulation on three tiny synthetic sites, tiny model, 2 rounds,
then both baselines, per-site evaluation and the report) through the `make demo` entry point,
~40 s on 2 cores; plus the summary arithmetic of healthfm_core.eval.compare by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from healthfm_core.eval import compare
from healthfm_core.eval.outcomes import replies_from_event
from healthfm_core.eval.report import ResultRow
from healthfm_core.eval.runner import MethodResult
from healthfm_core.protocol import SMALL_CELL
from server.runlog import read_events
from simulations import demo
from simulations.report import METHODS, prepare_out_dir
from simulations.synthetic import generate_federation

SITES = ("biobank", "hospital", "genomics")
ROUNDS, LOCAL_STEPS = 2, 3


def _row(method: str, task: str, horizon: int, auroc: float, ece: float, n: int = 10) -> ResultRow:
    return ResultRow(
        method=method,
        task=task,
        horizon=horizon,
        n=n,
        n_pos=3,
        auroc=auroc,
        auroc_ci=(0.0, 1.0),
        auprc=0.5,
        ece=ece,
        brier=0.2,
    )


def test_summarize_averages_over_pairs_every_method_has() -> None:
    per_site = {
        "a": {
            "m1": MethodResult(rows=[_row("m1", "t2d", 30, 0.6, 0.1), _row("m1", "t2d", 365, 0.7, 0.2)]),
            "m2": MethodResult(rows=[_row("m2", "t2d", 30, 0.8, 0.3)]),
        },
        "b": {
            "m1": MethodResult(rows=[_row("m1", "t2d", 30, 0.9, 0.3), _row("m1", "cad", 30, 0.1, 0.9)]),
            "m2": MethodResult(rows=[_row("m2", "t2d", 30, 0.5, 0.1), _row("m2", "cad", 30, float("nan"), 0.5)]),
        },
    }
    rows = compare.summarize(per_site, ["m1", "m2"])
    # 365 d: only m1 has it; cad at b: m2's AUROC is NaN -> neither pair counts.
    assert [(r.method, r.horizon, r.pairs) for r in rows] == [("m1", 30, 2), ("m2", 30, 2)]
    assert rows[0].auroc == pytest.approx(0.75) and rows[0].ece == pytest.approx(0.2)
    assert rows[1].auroc == pytest.approx(0.65) and rows[1].ece == pytest.approx(0.2)
    assert rows[0].n == 20
    by_site = compare.site_summary(per_site, ["m1", "m2"])
    assert by_site["a"][0].auroc == pytest.approx(0.6) and by_site["b"][1].auroc == pytest.approx(0.5)
    table = compare.site_table(by_site)
    assert "| a | m1 | 0.600 |" in table and "| b | m2 | 0.500 |" in table


def test_modality_removal_refuses_unknown_modality() -> None:
    with pytest.raises(ValueError, match="unknown modality 'ecg'"):
        compare.modality_removal("m", None, None, None, "ecg")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    rc = demo.main(
        [
            "--out",
            str(out / "run"),
            "--rounds",
            str(ROUNDS),
            "--local-steps",
            str(LOCAL_STEPS),
            "scenario=tiny",
            "n_subjects=60",
            f"data_dir={out / 'data'}",
            "eval.n_boot=20",
            "eval.summary_min_positives=1",
            "progress=false",
            "federation.vocab_min_subjects=5",
            "federation.site.min_code_subjects=5",
            "federation.site.min_report_subjects=2",
            "federation.site.min_report_positives=1",
            "federation.eval_tasks=[onset_hypertension_365d]",
            "personalisation.steps=[0,3]",
        ]
    )
    assert rc == 0
    return out / "run"


@pytest.mark.slow  # the demo run's fixture: ~30 s idle (CI's slow stage, SLOW_CI)
def test_report_compares_every_method_per_site_and_task(demo_run: Path) -> None:
    report = (demo_run / "report.md").read_text()
    data = json.loads((demo_run / "comparison.json").read_text())
    # Main table: per task (never averaged across tasks), every method over the same sites.
    main = [(r["key"], r["method"], r["sites"]) for r in data["main"]]
    keys = sorted({k for k, _, _ in main})
    assert keys, "no task evaluated by every method"
    for key in keys:
        mine = [(m, n) for k, m, n in main if k == key]
        assert [m for m, _ in mine] == list(METHODS)
        assert len({n for _, n in mine}) == 1
    for r in data["main"]:  # an interval is defined and proper, or undefined with its reason
        lo, hi = r["auroc_ci"]
        assert (lo < hi and r["auroc_ci_undefined"] is None) or r["auroc_ci_undefined"]
    assert "[0.000, 0.000]" not in report and "[1.000, 1.000]" not in report
    # Per site: every site and task keeps its line, with held-out rows and positives; the three
    # trained regimes see the same rows and labels, so they evaluate the same (task, horizon) pairs.
    assert set(data["rows"]) == set(SITES)
    pairs = {(p["site"], p["key"]): p for p in data["pairs"]}
    assert {s for s, _ in pairs} == set(SITES)
    for site in SITES:
        got = {m: {(r["task"], r["horizon"]) for r in data["rows"][site].get(m, [])} for m in METHODS}
        assert got["federated"] == got["centralized"] == got["local-only"], site
        assert got["federated"] <= got["oracle"], site
        assert re.search(rf"^\| {site} \| \w+ \| \d+ \| <?\d+ \| <?\d+ \| <?\d+ \|", report, re.M), site
    for p in pairs.values():  # a withheld pair names the privacy minimum and has no score anywhere
        if p["withheld"]:
            assert "min_report_subjects=2" in p["withheld"]
            for m in METHODS:
                task = (p["task"], p["horizon"])
                assert task not in {(r["task"], r["horizon"]) for r in data["rows"][p["site"]].get(m, [])}
    _matches_the_runs_own_evaluation(demo_run)
    for png in ("loss_curves.png", "auroc_by_task.png", "bytes_per_round.png", "round_time_split.png"):
        blob = (demo_run / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000, png
        assert f"]({png})" in report


def _matches_the_runs_own_evaluation(run: Path) -> int:
    """The report's federated scores of each (site, task) equal the sites' own evaluation inside
    the run (same rows, same probe): held-out rows, positives and AUROC; a pair the sites gave a
    reason for is withheld in the report. Returns the number of pairs compared."""
    data = json.loads((run / "comparison.json").read_text())
    keys, replies, _ = replies_from_event(json.loads((run / "federation" / "evaluation.json").read_text()))
    rows = {
        (s, r["task"], r["horizon"]): r for s, methods in data["rows"].items() for r in methods.get("federated", [])
    }
    pairs = {(p["site"], p["key"]): p for p in data["pairs"]}
    compared = 0
    for site, reply in replies.items():
        for key, m in reply.tasks.items():
            task, horizon = key.rsplit("_", 1)
            r = rows[(site, task, int(horizon.removesuffix("d")))]
            assert r["n"] == m.n and r["auroc"] == pytest.approx(m.auroc, abs=1e-6), (site, key)
            assert m.positives in (r["n_pos"], SMALL_CELL), (site, key)
            compared += 1
        for key in reply.reasons:
            if (site, key) in pairs:
                assert pairs[(site, key)]["withheld"], (site, key)
    return compared


@pytest.mark.slow  # the demo run's fixture: ~30 s idle (CI's slow stage, SLOW_CI)
def test_budgets_bytes_and_timings_come_from_the_run(demo_run: Path) -> None:
    data = json.loads((demo_run / "comparison.json").read_text())
    assert data["budgets"] == {
        "per_site_steps": ROUNDS * LOCAL_STEPS,
        "centralized_steps": ROUNDS * LOCAL_STEPS * len(SITES),
    }
    rounds = {e["round"]: e for e in read_events(demo_run / "federation" / "rounds.jsonl") if e["event"] == "round"}
    assert sorted(rounds) == list(range(1, ROUNDS + 1))
    for r, event in rounds.items():
        logged = data["bytes"][str(r)]
        assert set(logged) == set(SITES)
        for site, entry in event["sites"].items():
            assert logged[site] == [entry["bytes_sent"], entry["bytes_received"]] and entry["bytes_sent"] > 0
        t = data["timings"][str(r)]
        assert t["other_seconds"] == pytest.approx(t["round_seconds"] - t["local_train_seconds_max"])
    # The biobank holds every group: it receives more than the genomics cohort (no wearables group).
    assert data["bytes"]["1"]["biobank"][0] > data["bytes"]["1"]["genomics"][0]
    # Missing-modality rows exist for the sites that have genomics, with and without it.
    keys = set(data["missing_modality"])
    assert {"biobank|genomics|federated", "genomics|genomics|federated"} <= keys
    for value in data["missing_modality"].values():  # same rows and labels: the same tasks evaluated
        assert {(r["task"], r["horizon"]) for r in value["with"]} == {
            (r["task"], r["horizon"]) for r in value["without"]
        }
        assert all(
            r["method"].endswith(" without genomics") or r["method"].endswith(" without wearables")
            for r in value["without"]
        )


@pytest.mark.slow  # the demo run's fixture
def test_the_demo_shows_each_sites_personalised_model_and_dp_at_epsilon_8(demo_run: Path) -> None:
    """Issue 68: the demo's report carries each site's personalised model (the local steps its
    tuning split kept, every candidate's tuning AUROC) and the federation at epsilon 8 at the DP
    recipe beside the federated run (no DP)."""
    report = (demo_run / "report.md").read_text()
    data = json.loads((demo_run / "comparison.json").read_text())
    assert set(data["personalisation"]) == set(SITES)
    for choice in data["personalisation"].values():
        assert choice["steps"] in (0, 3) and set(choice["tuning_auroc"]) == {"0", "3"}
    assert "Personalised (issue 68)" in report and "| personalised |" in report
    assert "| 8 |" in report and "| none (no DP) |" in report  # the utility-against-epsilon table
    assert "only the modality encoders trained" in report
    line = next(ln for ln in report.splitlines() if ln.startswith("| 8 |"))
    spent = [float(x) for x in line.strip(" |").split("|")[-len(SITES) :]]
    assert all(7.5 < v <= 8.0 + 1e-6 for v in spent), line  # each site spent its target over the run


def test_a_foreign_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "federation").mkdir()
    with pytest.raises(FileExistsError, match="not a previous report run"):
        prepare_out_dir(tmp_path)


@pytest.mark.slow  # a second federation and both baselines on EHR-only sites (~2-3 min on 2 cores)
def test_ehr_only_sites_without_truth_get_no_oracle(tmp_path: Path) -> None:
    """Real data's shape: EHR-only MEDS roots given as site_roots, no truth/ folder. The report
    speaks of no oracle or true risk, and every site keeps its per-site lines."""
    generate_federation(tmp_path / "data", scenario="mimic", seed=0, n_subjects=60, progress=False)
    roots = sorted(p for p in (tmp_path / "data" / "sites").iterdir() if p.is_dir())
    rc = demo.main(
        [
            "--out",
            str(tmp_path / "run"),
            "--rounds",
            "1",
            "--local-steps",
            "2",
            f"site_roots=[{','.join(str(r) for r in roots)}]",
            "task_list=[t2d]",
            "eval.n_boot=20",
            "eval.missing_modality=[]",
            "progress=false",
            "federation.vocab_min_subjects=5",
            "federation.site.min_code_subjects=5",
            "federation.site.min_report_subjects=2",
            "federation.site.min_report_positives=1",
        ]
    )
    assert rc == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "oracle" not in report.lower() and "true risk" not in report.lower()
    data = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert all("oracle" not in methods for methods in data["rows"].values())
    assert {p["site"] for p in data["pairs"]} == {r.name for r in roots}
    for site in (r.name for r in roots):
        assert f"| {site} | onset_t2d |" in report
    assert "...that every method has: ." not in report and "on 0 of 0" not in report
    assert _matches_the_runs_own_evaluation(tmp_path / "run") > 0
