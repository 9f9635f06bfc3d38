"""No row at birth or before the first clinical event from any shipped task, on every path that
makes rows (issue 42): `aces_labels`, the site evaluation's labels, `check --tasks`, `client.py
embed/probe` (model_use.task_rows) and the simulations' and evidence job's evaluation rows
(runner.build_site_rows). The default scenario's sites time MEDS_BIRTH and start the records near
it, so a task triggered at every event (as the onset tasks were) does predict at birth there:
the same task with `trigger: _ANY_EVENT` is the check that each path could fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from client.model_use import task_rows
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.checks.task_check import count_tasks
from healthfm_core.data.labels.aces_tasks import TASK_DIR, aces_labels, load_task
from healthfm_core.data.labels.task_spec import resolve_tasks, runner_tasks
from healthfm_core.data.labels.tasks import DISEASES
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.runner import build_site_rows
from healthfm_core.eval.site_eval import task_labels_at_site
from healthfm_core.protocol import EvalConfig
from simulations.rows_at_birth import early_rows, main, onset_tasks
from simulations.synthetic import generate_federation


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default")
    manifest = generate_federation(out, "default", seed=0, n_subjects=40, progress=False, sites=["city_hospital"])
    return Path(manifest.sites[0].root)


def _too_early(root: Path, rows: pa.Table) -> pl.DataFrame:
    """The rows at or before the subject's first clinical event (a birth row is one)."""
    events = cast(pl.DataFrame, pl.from_arrow(open_site(root).read_events(columns=["subject_id", "time", "code"])))
    first = (
        events.filter(pl.col("time").is_not_null() & ~pl.col("code").is_in(["MEDS_BIRTH", "MEDS_DEATH"]))
        .group_by("subject_id")
        .agg(pl.col("time").min().cast(pl.Datetime("us")).alias("first"))
    )
    df = cast(pl.DataFrame, pl.from_arrow(rows.select(["subject_id", "prediction_time"])))
    return df.join(first, on="subject_id", how="left").filter(
        pl.col("first").is_null() | (pl.col("prediction_time") <= pl.col("first"))
    )


def _births(root: Path, rows: pa.Table) -> int:
    events = cast(pl.DataFrame, pl.from_arrow(open_site(root).read_events(columns=["subject_id", "time", "code"])))
    born = events.filter(pl.col("code") == "MEDS_BIRTH").select(
        "subject_id", pl.col("time").cast(pl.Datetime("us")).alias("prediction_time")
    )
    return (
        cast(pl.DataFrame, pl.from_arrow(rows.select(["subject_id", "prediction_time"])))
        .join(born, on=born.columns)
        .height
    )


@pytest.fixture
def any_event_task(tmp_path: Path) -> Path:
    """t2d.yaml as the onset tasks were before issue 42: triggered at every event, no history."""
    any_event = tmp_path / "t2d_any_event.yaml"
    text = (TASK_DIR / "t2d.yaml").read_text().replace("trigger: clinical_event", "trigger: _ANY_EVENT")
    text = text.replace("  history_window: history\n  min_history_events: 1\n", "")
    text = text.replace(
        "  history:\n    start: null\n    end: trigger\n    start_inclusive: true\n    end_inclusive: false\n"
        "    has:\n      clinical_event: (1, None)\n",
        "",
    )
    assert "history" not in yaml.safe_load(text)["windows"]
    any_event.write_text(text)
    return any_event


def test_a_task_at_every_event_would_predict_at_birth_here(site_root: Path, any_event_task: Path) -> None:
    old = aces_labels(load_task(any_event_task), site_root, [365])[365]
    assert _births(site_root, old) > 0 and _too_early(site_root, old).height > 0


def test_the_evidence_rows_count_names_the_rows_at_birth(
    site_root: Path, any_event_task: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """simulations.rows_at_birth (the evidence job's share, docs/evidence.md) counts what this
    module's reference counts: the any-event task's held-out rows at birth, and none of t2d's."""
    site = open_site(site_root)
    old = {k: t for k, t in onset_tasks([str(any_event_task)]).items() if k.endswith("_365d")}
    (count,) = early_rows("city_hospital", site, old, 2, 0, "held_out")
    held = set(site.held_out_subjects().tolist())
    table = aces_labels(load_task(any_event_task), site_root, [365])[365]
    table = table.filter(pc.is_in(table["subject_id"], pa.array(sorted(held), pa.int64())))
    assert count.rows == table.num_rows > 0
    assert count.at_birth == _births(site_root, table) > 0
    assert count.without_history == _too_early(site_root, table).height >= count.at_birth
    assert main([str(site_root), "--tasks", "t2d", "--n-per-subject", "all"]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1]
    assert total.startswith("| all | all |") and total.endswith("| 0 (0.0%) | 0 |"), total


@pytest.mark.slow  # 26 s on the shared 2-core machine: CI's slow stage (Makefile SLOW_CI)
def test_no_shipped_task_predicts_at_birth_or_without_history_on_any_path(site_root: Path) -> None:
    site = open_site(site_root)
    names = list(DISEASES)
    specs = resolve_tasks(names)
    labels = task_labels_at_site(site, specs, n_per_subject="all")  # the site evaluation, every task
    for key, table in labels.items():
        assert isinstance(table, pa.Table) and table.num_rows > 0 and _too_early(site_root, table).height == 0, key
    t2d = aces_labels(load_task("t2d"), site_root)  # aces_labels: the reference of the shared read
    assert all(isinstance(got := labels[f"onset_t2d_{h}d"], pa.Table) and got.equals(table) for h, table in t2d.items())
    report = count_tasks(site, [TASK_DIR / "t2d.yaml"], n_per_subject="all")  # check --tasks
    assert not [p for p in report.problems if p.kind == "trigger_at_birth"]
    assert [sum(s.rows for s in c.splits.values()) for c in report.tasks] == [t.num_rows for t in t2d.values()]
    runtime = SiteRuntime(SiteConfig(site_root=site_root))  # client.py embed / probe
    rows = task_rows(runtime, EvalConfig(round=0, tasks=resolve_tasks(names), setup_sha256="x", n_per_subject="all"))
    assert rows.num_rows > 0 and _too_early(site_root, rows).height == 0
    built = build_site_rows(site_root.name, site, None, runner_tasks(specs[:1]), n_per_subject="all")  # type: ignore[arg-type]
    sampled = pa.table(
        {"subject_id": built.subject_id, "prediction_time": pa.array(built.prediction_time_us).cast(pa.timestamp("us"))}
    )
    assert sampled.num_rows > 0 and _too_early(site_root, sampled).height == 0  # simulations, evidence job
