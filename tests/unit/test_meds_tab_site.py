"""MEDS-Tab beside the probe at a site: the same held-out rows, its predictions in the
meds-evaluation format, its metrics in the reply (checked as a peer's), and none when switched off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from meds_evaluation.schema import PredictionSchema
from sklearn.metrics import average_precision_score, roc_auc_score

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.task_spec import task_keys
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.metrics import bootstrap_counts
from healthfm_core.eval.outcomes import outcome
from healthfm_core.model.config import load_model_config
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, EvalReply, FederationSetup, TaskMetrics, aggregate_site_metrics
from server.runlog import EventLog, write_summary
from simulations.synthetic import generate_federation

TASKS = ["onset_hypertension_365d", "site:readmit"]


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small hospital site with its own binary task (two prediction times per subject)."""
    out = tmp_path_factory.mktemp("hospital")
    root = Path(generate_federation(out, "hospital", seed=0, n_subjects=60, progress=False).sites[0].root)
    events = pl.concat([pl.read_parquet(p, columns=["subject_id", "time"]) for p in (root / "data").rglob("*.parquet")])
    span = (
        events.drop_nulls().group_by("subject_id").agg(pl.col("time").min().alias("a"), pl.col("time").max().alias("b"))
    )
    span = span.sort("subject_id")
    times = [(span["a"] + (span["b"] - span["a"]) * f).cast(pl.Datetime("us")).to_numpy() for f in (0.4, 0.7)]
    rng = np.random.default_rng(0)
    (root / "tasks" / "readmit").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(np.tile(span["subject_id"].to_numpy(), 2), pa.int64()),
                "prediction_time": pa.array(np.concatenate(times)),
                "boolean_value": pa.array(rng.random(2 * len(span)) < 0.4),
            }
        ),
        root / "tasks" / "readmit" / "0.parquet",
    )
    return root


def test_meds_tab_is_scored_on_the_probes_rows_and_can_be_switched_off(site_root: Path, tmp_path: Path) -> None:
    vocab = build_vocabulary([site_code_stats(open_site(site_root), min_subjects=5)], min_subjects=5)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=0, modalities=["ehr"])
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    cfg = EvalConfig(round=1, tasks=TASKS, setup_sha256=setup.sha256, n_boot=10)
    rt = SiteRuntime(
        SiteConfig(site_root=site_root, min_report_subjects=2, min_report_positives=1, eval_dir=tmp_path / "eval")
    )
    reply = EvalReply.from_records(rt.evaluate(setup, arrays, cfg).to_records(), expected=task_keys(cfg.tasks))
    assert "readmit" in reply.tasks, reply.reasons
    for key, m in reply.tasks.items():
        probe = pq.read_table(tmp_path / "eval" / rt.name / f"{key}.parquet")
        tab = pq.read_table(tmp_path / "eval" / rt.name / f"{key}.meds_tab.parquet")
        PredictionSchema.validate(tab)
        # The same held-out rows and labels as the probe, in the same order.
        assert tab.num_rows == probe.num_rows == m.n
        for col in ("subject_id", "prediction_time", "boolean_value"):
            assert tab[col].equals(probe[col])
        y = tab["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
        p = tab["predicted_boolean_probability"].to_numpy().astype(np.float64)
        assert m.meds_tab_auroc == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert m.meds_tab_auprc == pytest.approx(average_precision_score(y, p), abs=1e-6)
        counts = bootstrap_counts(y, 10, np.random.default_rng(cfg.seed), groups=tab["subject_id"].to_numpy())
        boot = [roc_auc_score(np.repeat(y, c.astype(int)), np.repeat(p, c.astype(int))) for c in counts]
        # float32 probabilities in the file: ties may differ from the float64 the site scored.
        assert (m.meds_tab_auroc_low, m.meds_tab_auroc_high) == pytest.approx(
            tuple(np.quantile(boot, [0.025, 0.975])), abs=0.02
        )
        assert "MEDS-Tab AUROC" in outcome(reply, key)[0]
    off = SiteRuntime(
        SiteConfig(site_root=site_root, min_report_subjects=2, min_report_positives=1, eval_dir=tmp_path / "off")
    )
    quiet = off.evaluate(setup, arrays, cfg.model_copy(update={"meds_tab": False}))
    assert set(quiet.tasks) == set(reply.tasks)
    for key, m in quiet.tasks.items():
        assert m.meds_tab_auroc is None and m.meds_tab_auprc is None and m.meds_tab_auroc_low is None
        assert m.auroc == reply.tasks[key].auroc  # the probe's number does not depend on the switch
        assert not any("meds-tab" in k for k in quiet.to_records())
    assert not list((tmp_path / "off").rglob("*.meds_tab.parquet"))


def test_eval_config_carries_the_switch() -> None:
    cfg = EvalConfig(round=1, tasks=TASKS, setup_sha256="x", meds_tab=False)
    flat = cfg.to_flat()
    assert flat["meds-tab"] is False and EvalConfig.from_flat(flat).meds_tab is False
    assert EvalConfig.from_flat(EvalConfig(round=1, tasks=TASKS, setup_sha256="x").to_flat()).meds_tab is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"meds_tab_auroc": 1.5}, "must be NaN"),
        ({"meds_tab_auprc": -0.1}, "must be NaN"),
        ({"meds_tab_auroc": 0.7, "meds_tab_auroc_low": 0.6}, "go together"),
        ({"meds_tab_auroc": 0.7, "meds_tab_auroc_low": 0.9, "meds_tab_auroc_high": 0.8}, "above"),
        ({"meds_tab_auroc_low": 0.6, "meds_tab_auroc_high": 0.8}, "without meds_tab_auroc"),
    ],
)
def test_meds_tab_fields_out_of_range_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskMetrics(n=10, auroc=0.6, **fields)


def test_a_peers_meds_tab_metric_is_checked_and_round_trips() -> None:
    good = {"t.auroc": 0.6, "t.n": 10, "t.meds-tab-auroc": 0.7, "t.meds-tab-auprc": 0.4}
    good |= {"t.meds-tab-auroc-low": 0.5, "t.meds-tab-auroc-high": 0.8}
    reply = EvalReply.from_records(good)
    assert reply.tasks["t"].meds_tab_auroc == 0.7 and reply.to_records()["t.meds-tab-auroc-high"] == 0.8
    with pytest.raises(ValueError, match=r"field t\.meds-tab-auroc: value 1\.5"):
        EvalReply.from_records({**good, "t.meds-tab-auroc": 1.5})
    with pytest.raises(ValueError, match="beside a binary task's auroc"):
        EvalReply.from_records({"t.r2": 0.3, "t.n": 10, "t.meds-tab-auroc": 0.7})


def test_meds_tab_is_averaged_over_sites_like_the_probe() -> None:
    a = EvalReply(tasks={"t": TaskMetrics(n=10, auroc=0.6, meds_tab_auroc=0.7, meds_tab_auprc=0.2)})
    b = EvalReply(tasks={"t": TaskMetrics(n=30, auroc=0.5, meds_tab_auroc=0.9, meds_tab_auprc=0.4)})
    c = EvalReply(tasks={"t": TaskMetrics(n=20, auroc=0.5)})  # a site that ran without MEDS-Tab
    out = aggregate_site_metrics({"a": a, "b": b, "c": c})
    assert out["t.meds-tab-auroc"] == pytest.approx((10 * 0.7 + 30 * 0.9) / 40)
    assert out["t.meds-tab-auprc"] == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)
    assert out["t.auroc"] == pytest.approx((10 * 0.6 + 30 * 0.5 + 20 * 0.5) / 60) and out["t.n"] == 60


def test_summary_shows_meds_tab_beside_the_probe(tmp_path: Path) -> None:
    a = EvalReply(
        tasks={"t": TaskMetrics(n=10, auroc=0.6, auroc_low=0.4, auroc_high=0.8, meds_tab_auroc=0.7)}
        | {"u": TaskMetrics(n=10, auroc=0.6, meds_tab_auroc=0.75, meds_tab_auroc_low=0.5, meds_tab_auroc_high=0.9)}
    )
    b = EvalReply(tasks={"t": TaskMetrics(n=30, auroc=0.5)})  # a site that ran without MEDS-Tab
    per_site = {"a": a, "b": b}
    EventLog(tmp_path / "rounds.jsonl").write(
        "evaluate",
        round=1,
        sites={s: r.to_records() for s, r in per_site.items()},
        aggregated=aggregate_site_metrics(per_site),
        tasks=["t", "u"],
        asked_sites=["a", "b"],
    )
    summary = write_summary(tmp_path).read_text()
    # b's 30 rows weigh 2 x a's 10 (the share cap): (10 x 0.6 + 20 x 0.5) / 30; rows: the task's
    # rows over all sites, as claimed
    assert "| t | auroc | 0.533 | 0.550 | 40 | b 67% | b 20 | not reported by 2 site(s) | 2 |" in summary
    assert "| t | meds-tab-auroc | 0.700 | 0.700 | 40 | b 67% | b 20 | not reported by 2 site(s) | 1 |" in summary
    assert "| a | u | 10 | - | AUROC 0.600; MEDS-Tab AUROC 0.750 [0.500, 0.900] |" in summary
    assert "| b | t | 30 | - | AUROC 0.500 |" in summary
