"""What the comparison reports may say about each (site, task) pair: the rows are the rows the
sites' own evaluation labels, intervals are never silently degenerate, a pair under the privacy
minimum is listed as withheld with its reason, the per-task mean has a subject-bootstrap interval,
and the centralized job refuses site-labelled tasks by name. Fast: one tiny synthetic federation,
no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval import compare, plots, site_pairs
from healthfm_core.eval.probes import binary_row
from healthfm_core.eval.runner import EvalSet, MethodResult, task_display
from healthfm_core.eval.site_eval import task_labels_at_site
from healthfm_core.protocol import EvalConfig, SplitCount
from healthfm_core.protocol.task_reason import TaskReason
from simulations.common import onset_eval_data
from simulations.pretrain import refuse_site_labelled_tasks
from simulations.report import ablation_table
from simulations.synthetic import generate_federation

TASK = "onset_t2d_365d"  # the federation's name; resolved to configs/tasks/t2d.yaml at 365 days


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("federation")
    generate_federation(out, scenario="tiny", seed=0, n_subjects=60, progress=False)
    opened = {p.name: open_site(p) for p in sorted((out / "sites").iterdir())}
    vocab = build_vocabulary([site_code_stats(s, min_subjects=2) for s in opened.values()], min_subjects=2)
    return {n: (s, SiteSequences.from_site(s, vocab)) for n, s in opened.items()}


@pytest.fixture(scope="module")
def per_site_data(sites: dict) -> dict[str, EvalSet]:
    cfg = OmegaConf.create({"seed": 0, "eval": {"onset_tasks": [TASK], "n_per_subject": None}, "site_roots": None})
    return onset_eval_data(cfg, {n: s for n, (s, _) in sites.items()}, {n: q for n, (_, q) in sites.items()})


def test_report_rows_are_the_rows_the_site_evaluation_labels(sites: dict, per_site_data: dict) -> None:
    specs = resolve_tasks([TASK])
    (key,) = per_site_data["biobank"].tasks
    n_per_subject = EvalConfig.model_fields["n_per_subject"].default
    for name, (site, _) in sites.items():
        at_site = task_labels_at_site(site, specs, n_per_subject=n_per_subject, seed=0)[key]
        assert not isinstance(at_site, TaskReason)
        expected = set(
            zip(
                at_site["subject_id"].to_pylist(),
                at_site["prediction_time"].cast("int64").to_pylist(),
                at_site["boolean_value"].to_pylist(),
            )
        )
        part = per_site_data[name].sites[0]
        have = np.isfinite(part.labels[key])
        got = set(
            zip(
                part.subject_id[have].tolist(),
                part.prediction_time_us[have].tolist(),
                part.labels[key][have].astype(bool).tolist(),
            )
        )
        assert expected and got == expected, name


def test_an_interval_on_one_positive_or_one_class_is_undefined_with_its_reason() -> None:
    y = np.array([True, False, False, False, False, False])
    p = np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9])  # the lone positive scores lowest: AUROC 0
    row = binary_row("m", "t2d", 365, y, p, n_boot=50, seed=0, groups=np.arange(6))
    assert row.auroc == 0.0 and np.isnan(row.auroc_ci).all()
    assert row.auroc_ci_undefined and "1 subject(s) with a positive" in row.auroc_ci_undefined
    one_class = binary_row("m", "t2d", 365, np.zeros(6, bool), p, n_boot=50, seed=0)
    assert np.isnan(one_class.auroc_ci).all() and "a single class" in str(one_class.auroc_ci_undefined)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    ok = binary_row("m", "t2d", 365, y, p, n_boot=200, seed=0, groups=np.arange(200) // 2)
    assert ok.auroc_ci_undefined is None and ok.auroc_ci[0] < ok.auroc < ok.auroc_ci[1]
    assert ok.auroc == pytest.approx(roc_auc_score(y, p))


def _fake_results(data: dict[str, EvalSet], seed: int = 0) -> dict[str, dict[str, MethodResult]]:
    """Two methods' held-out scores on every site's rows: the label plus noise (a weaker and a
    stronger one), as evaluate_method would lay them out."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, MethodResult]] = {}
    for name, d in data.items():
        out[name] = {}
        (key,) = d.tasks
        y_all = d.labels(key)
        held = np.flatnonzero(np.isfinite(y_all) & (d.column("split") == "held_out"))
        y = y_all[held].astype(bool)
        for method, signal in (("a", 0.2), ("b", 0.6)):
            p = np.clip(signal * y + (1 - signal) * rng.random(len(y)), 0, 1)
            task, horizon = task_display(d.tasks[key])
            row = binary_row(method, task, horizon, y, p, n_boot=20, seed=0, groups=d.subject_keys()[held])
            out[name][method] = MethodResult(rows=[row], predictions={key: (y, p)}, scored_rows={key: held})
    return out


def test_a_withheld_pair_stays_in_the_table_with_the_minimum_and_its_reason(per_site_data: dict) -> None:
    per_site = _fake_results(per_site_data)
    statuses = site_pairs.pair_statuses(per_site_data, min_subjects=1000)
    assert set(statuses) == {(s, k) for s, d in per_site_data.items() for k in d.tasks}
    assert all(
        "withheld (min_report_subjects=1000, min_report_positives=1): too few subjects" in str(s.withheld)
        for s in statuses.values()
    )
    site_pairs.withhold(per_site, statuses)
    for res in per_site.values():
        for r in res.values():
            assert (
                r.rows == []
                and r.predictions == {}
                and all("min_report_subjects=1000" in v for v in r.skipped.values())
            )
    table = site_pairs.pair_table(per_site, statuses, ["a", "b"])
    for site in per_site_data:  # every site keeps its line, with its reason
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {site} |"))
        assert "| withheld | withheld |" in line and "min_report_subjects=1000" in line
        assert line.count("<1000") >= 2  # held-out rows and subjects below the minimum are not disclosed
    rows, missing = site_pairs.task_summary(per_site, per_site_data, statuses, ["a", "b"], min_positives=1)
    assert rows == [] and set(missing) == set(next(iter(per_site_data.values())).tasks)
    assert "not in this table" in site_pairs.task_table(rows, missing)


def test_task_mean_over_sites_has_a_subject_bootstrap_interval(per_site_data: dict) -> None:
    per_site = _fake_results(per_site_data, seed=1)
    statuses = site_pairs.pair_statuses(per_site_data, min_subjects=1)
    reported = [s for s in statuses.values() if not s.withheld]
    assert reported, "the tiny federation reports no pair at the minimum of 1"
    rows, missing = site_pairs.task_summary(per_site, per_site_data, statuses, ["a", "b"], min_positives=1, n_boot=200)
    assert not missing and [r.method for r in rows] == ["a", "b"]
    for r in rows:
        # The point: the mean over the counted sites of each site's AUROC (sklearn, independently).
        counted = [s.site for s in reported if s.splits["held_out"].positives >= 1]
        expected = np.mean([roc_auc_score(*per_site[s][r.method].predictions[r.key]) for s in counted])
        assert r.sites == len(counted) and r.auroc == pytest.approx(expected)
        assert r.n_pos == sum(statuses[(s, r.key)].splits["held_out"].positives for s in counted)
        if r.auroc_ci_undefined is None:
            assert r.auroc_ci[0] < r.auroc_ci[1]
        else:
            assert np.isnan(r.auroc_ci).all()
    table = site_pairs.task_table(rows, missing)
    assert "[0.000, 0.000]" not in table and "| onset_t2d | 365 | a |" in table


def test_pretrain_refuses_site_labelled_tasks_by_name(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"task_list": ["t2d", "site:readmission_30d"], "dataset": None})
    with pytest.raises(ValueError, match="site:readmission_30d"):
        refuse_site_labelled_tasks(cfg)
    refuse_site_labelled_tasks(OmegaConf.create({"task_list": ["t2d"], "dataset": None}))


def test_loss_plots_draw_only_objectives_with_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An EHR-only run logs the wearable losses as 0 (no data) or not at all: no panel for them."""
    drawn: list = []

    def keep(fig, path):  # the figure as it would be saved
        drawn.append([ax.get_title() for ax in fig.axes if ax.get_visible()])
        return Path(path)

    monkeypatch.setattr(compare, "save_figure", keep)
    monkeypatch.setattr(plots, "save_figure", keep)
    curve = [{"progress": i / 4, "mlm": 2.0 - 0.1 * i, "wearable_recon": 0.0, "total": 2.0 - 0.1 * i} for i in range(5)]
    compare.loss_curves_plot({"federated": curve, "centralized": curve}, tmp_path / "loss.png")
    assert drawn[-1] == ["mlm", "total"]
    history = [{"step": i, "mlm": 2.0 - 0.1 * i, "wearable_recon": 0.0, "total": 2.0, "lr": 1e-3} for i in range(5)]
    plots.training_curves(history, tmp_path / "train.png")
    assert drawn[-1] == ["mlm", "total"]


def test_ablation_table_lists_rows_positives_and_withheld_pairs() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(80) < 0.3
    p_with, p_without = np.clip(0.5 * y + 0.5 * rng.random(80), 0, 1), rng.random(80)
    groups = np.arange(80)
    full = MethodResult(rows=[binary_row("federated", "onset_t2d", 365, y, p_with, 50, 0, groups)])
    without = MethodResult(
        rows=[binary_row("federated without genomics", "onset_t2d", 365, y, p_without, 50, 0, groups)]
    )
    counts = {s: SplitCount(rows=10, subjects=3, positives=1) for s in ("train", "tuning", "held_out")}
    statuses = {
        ("a", "onset_t2d_365d"): site_pairs.PairStatus(
            site="a", key="onset_t2d_365d", task="onset_t2d", horizon=365, splits=counts
        ),
        ("a", "onset_cad_365d"): site_pairs.PairStatus(
            site="a",
            key="onset_cad_365d",
            task="onset_cad",
            horizon=365,
            splits=counts,
            withheld="withheld (min_report_subjects=20): too few subjects",
        ),
    }
    table = ablation_table({("a", "genomics", "federated"): (full, without)}, statuses)
    scored = next(ln for ln in table.splitlines() if "| onset_t2d |" in ln)
    diff = without.rows[0].auroc - full.rows[0].auroc
    assert f"| 80 | {int(y.sum())} |" in scored and scored.endswith(f"| {diff:+.3f} |")
    held = next(ln for ln in table.splitlines() if "| onset_cad |" in ln)
    assert "min_report_subjects=20" in held and "| withheld |" in held
