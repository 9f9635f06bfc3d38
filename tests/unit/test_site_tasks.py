"""Tasks as data, evaluated at the sites: TaskSpec resolution and validation, the evaluate message
and reply with a reason for every (site, task) without a metric, predictions in the
meds-evaluation format at the site, the jobs' `tasks=` / `site_roots=` and refused overrides,
and the EHR-only hospital federation end to end.

Sites: the hospital-realistic scenario (EHR only, ICD-9 and ICD-10, 2100s dates), small.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from meds_evaluation.schema import PredictionSchema
from sklearn.metrics import roc_auc_score

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.aces_tasks import TASK_DIR
from healthfm_core.data.labels.task_spec import TaskSpec, resolve_task, resolve_tasks, task_keys
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.metrics import bootstrap_counts
from healthfm_core.eval.outcomes import outcome_rows, outcome_table, replies_from_event
from healthfm_core.eval.score_histogram import score_bin_index
from healthfm_core.model.config import load_model_config
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import (
    SMALL_CELL,
    EvalConfig,
    EvalReply,
    FederationSetup,
    SplitCount,
    TaskMetrics,
    TaskReason,
)
from simulations.overrides import unknown_override, with_task_alias
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
ONSET = ["onset_t2d", "onset_cad", "onset_hypertension", "onset_copd"]


# ---------------------------------------------------------------- task definitions


def test_tasks_resolve_from_names_paths_and_old_names() -> None:
    t2d = resolve_task("t2d")
    assert t2d.kind == "aces" and t2d.name == "onset_t2d" and t2d.horizons_days == [30, 90, 180, 365]
    assert t2d.aces_yaml == (TASK_DIR / "t2d.yaml").read_text()  # the text travels, not the path
    assert resolve_task(f"file:{TASK_DIR / 't2d.yaml'}") == t2d == resolve_task(TASK_DIR / "t2d.yaml")
    # Old synthetic names: the ACES config at that horizon, merged per task.
    merged = resolve_tasks(["onset_t2d_365d", "onset_cad_90d", "onset_t2d_90d", "wearable_resting_hr", "site:readmit"])
    assert task_keys(merged) == ["onset_t2d_365d", "onset_t2d_90d", "onset_cad_90d", "wearable_resting_hr", "readmit"]
    assert [s.kind for s in merged] == ["aces", "aces", "wearable", "site"]
    with pytest.raises(FileNotFoundError, match="nothing"):
        resolve_task("nothing")
    with pytest.raises(ValueError, match="name"):
        resolve_task("site:../../etc")


def test_eval_config_carries_definitions_and_refuses_names_from_a_peer() -> None:
    cfg = EvalConfig(round=1, tasks=["t2d", "site:readmit"], setup_sha256="x")
    flat = cfg.to_flat()
    assert isinstance(flat["tasks"], str) and all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert EvalConfig.from_flat(flat) == cfg
    with pytest.raises(ValueError, match="not a name"):
        EvalConfig.from_flat({**flat, "tasks": json.dumps(["t2d"])})
    bad = json.loads(flat["tasks"])
    bad[0]["horizons_days"] = [0]
    with pytest.raises(ValueError, match="horizons_days"):
        EvalConfig.from_flat({**flat, "tasks": json.dumps(bad)})
    bad[0].update(horizons_days=[30], name="a.b")
    with pytest.raises(ValueError, match="name"):
        EvalConfig.from_flat({**flat, "tasks": json.dumps(bad)})
    with pytest.raises(ValueError, match="aces_yaml"):
        TaskSpec(name="x", kind="site", aces_yaml="a: 1")
    with pytest.raises(ValueError, match="not a wearable task"):
        TaskSpec(name="x", kind="wearable")


def test_eval_reply_reasons_round_trip_and_are_checked() -> None:
    counts = {"train": SplitCount(rows=30, subjects=22, positives=-1), "held_out": SplitCount(rows=0, subjects=0)}
    reply = EvalReply(
        tasks={"onset_t2d_365d": TaskMetrics(n=40, auroc=0.7, auprc=0.2, ece=0.05)},
        reasons={
            "onset_t2d_30d": TaskReason(kind="too_few_subjects", minimum=20, splits=counts),
            "readmit": TaskReason(kind="no_labels"),
        },
        withheld=2,
    )
    metrics = reply.to_records()
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # a MetricRecord holds numbers only
    assert EvalReply.from_records(metrics) == reply
    assert "train 30 rows / 22 subjects / <20 positives" in reply.reasons["onset_t2d_30d"].describe()
    # Counts on fewer subjects than the minimum never leave: the site suppresses them, and a
    # reason that holds one cannot be built (or parsed).
    raw = SplitCount(rows=30, subjects=12, positives=2)
    assert raw.suppressed(20) == SplitCount(rows=-1, subjects=-1, positives=-1)  # 30 rows of 12 subjects
    assert SplitCount(rows=30, subjects=25, positives=25).suppressed(20).positives == -1  # 5 negatives
    with pytest.raises(ValueError, match="small cell"):
        TaskReason(kind="too_few_subjects", minimum=20, splits={"train": raw})
    with pytest.raises(ValueError, match="small cell"):
        EvalReply.from_records({**metrics, "onset_t2d_30d.train.subjects": 12})
    with pytest.raises(ValueError, match="onset_t2d_30d.withheld"):
        EvalReply.from_records(
            {**metrics, "onset_t2d_30d.withheld.bored": 1, "onset_t2d_30d.withheld.too_few_subjects": 0}
        )
    with pytest.raises(ValueError, match="no reason"):
        EvalReply.from_records({**metrics, "other.train.rows": 3})
    with pytest.raises(ValueError, match="both metrics and a reason"):
        EvalReply.from_records({**metrics, "readmit.auroc": 0.5, "readmit.n": 10})
    with pytest.raises(ValueError, match="unknown split"):
        EvalReply.from_records(
            {**metrics, "readmit.later.rows": 3, "readmit.later.subjects": 1, "readmit.later.positives": 0}
        )
    rows = outcome_rows(["onset_t2d_365d", "onset_t2d_30d", "readmit"], {"a": reply}, ["a", "b"])
    assert [(s, k, r) for s, k, r, _ in rows] == [
        ("a", "onset_t2d_365d", "AUROC 0.700"),
        ("a", "onset_t2d_30d", "no metric"),
        ("a", "readmit", "no metric"),
        ("b", "onset_t2d_365d", "no metric"),
        ("b", "onset_t2d_30d", "no metric"),
        ("b", "readmit", "no metric"),
    ]
    assert "no reply from this site" in rows[-1][3] and "no labels" in rows[2][3]
    keys, replies, asked = replies_from_event(
        {"sites": {"a": metrics}, "tasks": ["onset_t2d_365d"], "asked_sites": ["a", "b"]}
    )
    assert keys == ["onset_t2d_365d"] and replies == {"a": reply} and asked == ["a", "b"]
    assert outcome_table(keys, replies, asked).count("\n") == 3


def test_overrides_a_job_does_not_read_are_refused() -> None:
    assert unknown_override(["model=tiny", "site_roots=[a]"], "run") is None
    msg = unknown_override(["+foo=1"], "pretrain")
    assert msg is not None and "reads no key 'foo'" in msg
    msg = unknown_override(["+site_roots=[a]"], "pretrain")
    assert msg is not None and "write site_roots=... (no +)" in msg
    msg = unknown_override(["+federation.extra=1"], "run")
    assert msg is not None and "reads no key 'federation.extra'" in msg
    assert unknown_override(["++seed=3"], "demo") is None
    assert with_task_alias(["prog", "tasks=[t2d,cad]", "model=tiny"]) == ["prog", "task_list=[t2d,cad]", "model=tiny"]


# ---------------------------------------------------------------- evaluation at a hospital site


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("hospital")
    return generate_federation(out, "hospital", seed=0, n_subjects=60, progress=False)


def _setup(roots) -> FederationSetup:
    vocab = build_vocabulary([site_code_stats(open_site(r), min_subjects=5) for r in roots], min_subjects=5)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=0, modalities=["ehr"])


def test_site_evaluates_aces_and_its_own_tasks_with_meds_evaluation(
    hospital, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = hospital.sites[0]
    root = Path(site.root)
    # A task only this site labels: its own LabelSchema file under tasks/<name>/.
    events = pl.concat([pl.read_parquet(p, columns=["subject_id", "time"]) for p in (root / "data").rglob("*.parquet")])
    timed = (
        events.drop_nulls().group_by("subject_id").agg(pl.col("time").min().alias("a"), pl.col("time").max().alias("b"))
    )
    timed = timed.sort("subject_id")
    pt = (timed["a"] + (timed["b"] - timed["a"]) / 2).cast(pl.Datetime("us")).to_numpy()
    rng = np.random.default_rng(0)
    (root / "tasks" / "readmit").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(timed["subject_id"].to_numpy(), pa.int64()),
                "prediction_time": pa.array(pt),
                "boolean_value": pa.array(rng.random(len(pt)) < 0.4),
            }
        ),
        root / "tasks" / "readmit" / "0.parquet",
    )
    setup = _setup([root])
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    cfg = EvalConfig(
        round=1,
        tasks=["onset_hypertension_365d", "site:readmit", "site:elsewhere"],
        setup_sha256=setup.sha256,
        n_boot=10,
    )
    rt = SiteRuntime(
        SiteConfig(site_root=root, min_report_subjects=2, min_report_positives=1, eval_dir=tmp_path / "eval")
    )
    reply = EvalReply.from_records(rt.evaluate(setup, arrays, cfg).to_records(), expected=task_keys(cfg.tasks))
    assert set(reply.tasks) | set(reply.reasons) == {"onset_hypertension_365d", "readmit", "elsewhere"}
    assert reply.reasons["elsewhere"].kind == "no_labels"
    assert "readmit" in reply.tasks, reply.reasons
    assert reply.withheld == len(reply.reasons)
    for key, m in reply.tasks.items():  # scored by meds-evaluation from the file written at the site
        path = tmp_path / "eval" / rt.name / f"{key}.parquet"
        table = pq.read_table(path)
        PredictionSchema.validate(table)
        assert m.auroc is not None and m.auroc_low is not None and m.auroc_high is not None
        assert table.num_rows == m.n and 0 <= m.auroc <= 1
        # The interval is on the same rows as the point: a subject bootstrap of the written file
        # (sklearn's AUROC per resample, whole subjects drawn, stratified as the site draws them).
        y = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
        p = table["predicted_boolean_probability"].to_numpy()
        assert m.positives == (int(y.sum()) if int(y.sum()) >= 2 else SMALL_CELL)
        counts = bootstrap_counts(y, 10, np.random.default_rng(cfg.seed), groups=table["subject_id"].to_numpy())
        boot = [roc_auc_score(np.repeat(y, c.astype(int)), np.repeat(p, c.astype(int))) for c in counts]
        assert (m.auroc_low, m.auroc_high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-9)
        assert m.auroc_low <= m.auroc <= m.auroc_high
        # Its score histogram: the same rows on the server's grid, merged to the site's minimum.
        assert (key in reply.histograms) != (key in reply.histograms_withheld)
        if (h := reply.histograms.get(key)) is not None:
            base = np.bincount(score_bin_index(p, cfg.score_bins, cfg.score_scale)[y], minlength=cfg.score_bins)
            assert h.positives == [int(base[a:b].sum()) for a, b in zip(h.bounds, h.bounds[1:])]
            assert h.minimum == 2 and not [c for c in h.positives + h.negatives if 0 < c < 2]
    assert reply.histograms  # released where both classes reach the minimum
    # Without an eval-dir or state-dir: the same metrics, scored in memory; nothing is written,
    # not even to a temporary directory (it would outlive the process with subject-level rows).
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    unkept = SiteRuntime(SiteConfig(site_root=root, min_report_subjects=2, min_report_positives=1))
    assert unkept.evaluate(setup, arrays, cfg).tasks == reply.tasks
    assert unkept.eval_dir() is None and list(tmp_root.iterdir()) == []
    # Above the site's minimum only: every task withheld, with its counts per split, each below
    # the minimum shown only as such (a small cell).
    strict = SiteRuntime(SiteConfig(site_root=root, min_report_subjects=1000, eval_dir=tmp_path / "eval2"))
    reply = strict.evaluate(setup, arrays, cfg)
    assert not reply.tasks and reply.reasons["readmit"].kind == "too_few_subjects"
    assert reply.reasons["readmit"].minimum == 1000 and reply.reasons["readmit"].splits["train"].rows == SMALL_CELL
    assert not (tmp_path / "eval2").exists()  # nothing scored, nothing written
    # A definition ACES cannot parse: a reason, not a crash.
    broken = TaskSpec(name="broken", kind="aces", aces_yaml="predicates: {}\ntrigger: nothing\n", horizons_days=[30])
    reply = rt.evaluate(setup, arrays, EvalConfig(round=1, tasks=[broken], setup_sha256=setup.sha256, n_boot=10))
    assert reply.reasons["broken_30d"].kind == "invalid_task"


@pytest.mark.slow  # a whole simulation (19 s): in CI's slow stage (Makefile SLOW_CI names it)
def test_hospital_federation_reports_a_metric_or_a_reason_for_every_site_and_task(hospital, tmp_path: Path) -> None:
    """Done means (issue 11), small: three EHR-only hospital sites, ACES tasks, 1 round of 2 steps."""
    roots = ",".join(str(s.root) for s in hospital.sites)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        f"site_roots=[{roots}]",
        "tasks=[t2d,hypertension]",
        "model=tiny",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.max_events=64",
        "federation.vocab_min_subjects=5",
        "federation.site.min_code_subjects=5",
        "federation.site.min_report_subjects=3",
        "federation.site.min_report_positives=1",
        "federation.eval_n_boot=10",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluation = json.loads((out / "evaluation.json").read_text())
    keys, replies, asked = replies_from_event(evaluation)
    assert keys == [f"{t}_{h}d" for t in ("onset_t2d", "onset_hypertension") for h in (30, 90, 180, 365)]
    assert sorted(asked) == sorted(s.name for s in hospital.sites) == sorted(replies)
    for site, reply in replies.items():
        assert set(reply.tasks) | set(reply.reasons) == set(keys), site
    summary = (out / "summary.md").read_text()
    table = summary.split("## Per site and task")[1]
    assert sum(line.startswith("| ") and "|---" not in line for line in table.splitlines()) == 1 + 3 * len(keys)
    # Per task, the federation-wide AUROC from the sites' histograms, or why there is none; every
    # asked site either pooled or named with its reason.
    assert set(evaluation["federation"]) == set(keys) and evaluation["score_bins"] == 50
    for key, pooled in evaluation["federation"].items():
        assert sorted(pooled["sites"] + list(pooled["not_pooled"])) == sorted(asked), key
        assert (pooled["auroc"] is None) == (not pooled["sites"] or bool(pooled["note"])), key
    assert "### Federation-wide AUROC per task" in summary and (out / "evaluation_auroc.png").is_file()
    # One predictions file per scored (site, task) for the probe, and one for MEDS-Tab beside it
    # where the site scored MEDS-Tab on the same rows.
    files = [p.name for p in (out / "sites").rglob("*.parquet")]
    meds_tab = [f for f in files if f.endswith(".meds_tab.parquet")]
    assert len(files) - len(meds_tab) == sum(len(r.tasks) for r in replies.values())
    assert len(meds_tab) == sum(m.meds_tab_auroc is not None for r in replies.values() for m in r.tasks.values())


def test_unknown_plus_override_is_an_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.pretrain", "+site_rootz=[/nowhere]"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "reads no key 'site_rootz'" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_own_sites_everywhere_run_pretrain_report(tmp_path: Path) -> None:
    """Done means (issue 11), full: three EHR-only hospital sites of 300 subjects, every ACES task;
    simulations.run, .pretrain and .report on `site_roots` with `tasks=`: a metric or a reason for
    every (site, task), no oracle (no ground truth), the user's paths used as given."""
    manifest = generate_federation(tmp_path / "data", "hospital", seed=0, n_subjects=300, progress=False)
    roots = "[" + ",".join(str(s.root) for s in manifest.sites) + "]"
    tasks = "tasks=[" + ",".join(str(p) for p in sorted(TASK_DIR.glob("*.yaml"))) + "]"
    common = [
        f"site_roots={roots}",
        tasks,
        "model=tiny",
        "federation.rounds=2",
        "federation.local_steps=5",
        "federation.vocab_min_subjects=5",
        "federation.site.min_code_subjects=5",
        "federation.site.min_report_subjects=5",
        "federation.site.min_report_positives=1",
        "federation.eval_n_boot=10",
    ]

    def job(module: str, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=3600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    job("simulations.run", *common, f"hydra.run.dir={tmp_path / 'run'}")
    keys, replies, asked = replies_from_event(json.loads((tmp_path / "run" / "evaluation.json").read_text()))
    assert len(keys) == 16 and sorted(asked) == sorted(replies) == sorted(s.name for s in manifest.sites)
    assert all(set(r.tasks) | set(r.reasons) == set(keys) for r in replies.values())
    assert any(r.tasks for r in replies.values())

    job("simulations.report", *common, f"out_dir={tmp_path / 'report'}", "eval.n_boot=10", "progress=false")
    report = (tmp_path / "report" / "report.md").read_text()
    table = report.split("## Federated evaluation inside the run: per site and task")[1]
    assert (
        sum(line.startswith("| ") and "|---" not in line for line in table.split("## Plots")[0].splitlines())
        == 1 + 3 * 16
    )
    assert (
        "oracle"
        not in json.loads((tmp_path / "report" / "comparison.json").read_text())["rows"][manifest.sites[0].name]
    )

    job(
        "simulations.pretrain",
        f"site_roots={roots}",
        tasks,
        "model=tiny",
        "train.steps=10",
        "train.batch_size=8",
        "data.min_subjects=5",
        "eval.n_boot=10",
        "eval.label_efficiency.fractions=[]",
        "progress=false",
        "threads=1",
        f"out_dir={tmp_path / 'pretrain'}",
    )
    results = json.loads((tmp_path / "pretrain" / "results.json").read_text())["methods"]
    assert "oracle" not in results
    for method, res in results.items():  # pooled probes: every task key has a row or a reason
        got = {f"{r['task']}_{r['horizon']}d" for r in res["rows"]} | set(res["skipped"])
        assert got == set(keys), method
