"""ACES labels with each shard read once for every task (aces_labels_shared, what a site's
evaluation uses) equal the per-task path where ACES reads the shards itself (aces_labels): the
predicate frames column for column and the label tables row for row, on synthetic sites of two
scenarios (one code system, and the hospital's ICD-9 plus ICD-10), for every task file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from omegaconf import DictConfig

from healthfm_core.data.labels import aces_tasks
from healthfm_core.data.labels.aces_tasks import TASK_DIR, aces_labels, aces_labels_shared, load_task
from healthfm_core.data.labels.task_spec import aces_task, resolve_tasks
from healthfm_core.data.labels.tasks import cap_rows_per_subject, visit_prediction_times
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.site_eval import task_labels_at_site
from simulations.synthetic import generate_federation

TASKS = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def site_roots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    roots = []
    for scenario in ("tiny", "hospital"):
        fed = generate_federation(tmp_path_factory.mktemp(scenario), scenario, seed=0, n_subjects=60, progress=False)
        roots += [s.root for s in fed.sites]
    return roots


def test_predicates_from_a_read_frame_equal_aces_own_loader(site_roots: list[Path]) -> None:
    from aces.predicates import get_predicates_df

    compared = 0
    for root in site_roots:
        for shard in aces_tasks._shards(root):
            frame = aces_tasks._meds_frame(shard)
            for name in TASKS:
                task = load_task(name)
                assert task.metadata.horizons_days is not None
                for v in aces_tasks._variants(task):
                    cfg = aces_tasks._parse(task.config_for(task.metadata.horizons_days[0], *v), name)
                    ours = aces_tasks._predicates_from_frame(cfg, frame)
                    theirs = get_predicates_df(cfg, DictConfig({"path": str(shard), "standard": "meds"}))
                    assert ours.schema == theirs.schema, (root.name, shard.name, name, v)
                    assert ours.equals(theirs), (root.name, shard.name, name, v)
                    compared += 1
    assert compared >= 2 * len(TASKS) * len(site_roots)


@pytest.mark.slow  # 30 s of the default suite; CI's slow stage runs it (Makefile SLOW_CI)
def test_shared_labels_equal_the_per_task_labels_and_read_each_shard_once(site_roots, monkeypatch) -> None:
    reads: list[Path] = []
    real = aces_tasks._meds_frame

    def counted_read(shard: Path) -> pl.DataFrame:
        reads.append(shard)
        return real(shard)

    monkeypatch.setattr(aces_tasks, "_meds_frame", counted_read)
    tasks = [load_task(name) for name in TASKS]
    rows = 0
    for root in site_roots:
        site = open_site(root)
        times = visit_prediction_times(site.read_events(columns=["subject_id", "time", "code"]), n_per_subject=4)
        reads.clear()
        shared = aces_labels_shared(tasks, root, prediction_times=times)
        assert sorted(reads) == aces_tasks._shards(root)  # once each, for all tasks and variants
        for task, got in zip(tasks, shared, strict=True):
            want = aces_labels(task, root, prediction_times=times)
            assert list(got) == list(want), (root.name, task.name)
            for h in want:
                assert got[h].equals(want[h]), (root.name, task.name, h)
                rows += want[h].num_rows
        unrestricted = aces_labels_shared(tasks[:1], root)[0]
        for h, table in aces_labels(tasks[0], root).items():
            assert unrestricted[h].equals(table), (root.name, tasks[0].name, h)
    assert rows > 0  # labels were compared, not only empty tables


def test_labels_of_some_subjects_are_their_rows_among_all(site_roots) -> None:
    # A capped evaluation queries only its sample's events: the same rows as theirs among every
    # subject's labels, for a half of the subjects (with an id the site lacks) and for none.
    tasks = [load_task(name) for name in TASKS]
    root = site_roots[-1]  # the hospital: ICD-9 and ICD-10
    full = aces_labels_shared(tasks, root)
    ids = np.unique(open_site(root).read_events(columns=["subject_id"])["subject_id"].to_numpy())
    some = np.append(ids[::2], ids.max() + 1)
    for subjects in (some, ids[:0]):
        part = aces_labels_shared(tasks, root, subjects=subjects)
        for task, got, want in zip(tasks, part, full, strict=True):
            for h in want:
                mask = pa.array(np.isin(want[h]["subject_id"].to_numpy(), subjects))
                assert got[h].equals(want[h].filter(mask)), (task.name, h, len(subjects))
    assert sum(t.num_rows for by_h in full for t in by_h.values()) > 0


def test_a_one_class_shard_query_is_not_logged_as_a_task_problem(site_roots, caplog, monkeypatch) -> None:
    # One subject's labels are one class: ES-ACES warns about "the extracted cohort" for a query
    # that covers one shard's few subjects. That says nothing about the task; the site's own
    # one_class reason does. The filter drops only that warning, and only while labelling.
    root = site_roots[-1]
    tasks = [load_task("hypertension")]
    full = aces_labels_shared(tasks, root)[0]
    one = np.array([full[max(full)]["subject_id"][0].as_py()])
    with monkeypatch.context() as m:  # without the filter: ES-ACES's warning is there
        m.setattr(aces_tasks._OneShardCohort, "filter", lambda self, record: True)
        caplog.clear()
        aces_labels_shared(tasks, root, subjects=one)
        assert any("All labels in the extracted cohort" in r.getMessage() for r in caplog.records)
    caplog.clear()
    aces_labels_shared(tasks, root, subjects=one)
    assert not any("All labels in the extracted cohort" in r.getMessage() for r in caplog.records)
    assert not logging.getLogger("aces.query").filters  # removed afterwards


def test_a_sites_task_labels_follow_the_spec_order_with_an_invalid_task_kept_apart(site_roots) -> None:
    root = site_roots[0]
    specs = resolve_tasks(["onset_t2d_365d", "onset_cad_90d", "onset_t2d_90d", "wearable_resting_hr"])
    bad = specs[0].model_copy(update={"name": "broken", "aces_yaml": "windows: [not, a, mapping]"})
    labels = task_labels_at_site(open_site(root), [bad, *specs])
    assert labels["broken_365d"].kind == "invalid_task" and labels["broken_90d"].kind == "invalid_task"
    for spec in specs:
        if spec.kind != "aces":
            continue
        held = open_site(root).held_out_subjects()
        for h, table in aces_labels(
            aces_task(spec), root
        ).items():  # ACES's rows: train and tuning capped, held_out whole
            got = labels[f"{spec.name}_{h}d"]
            assert isinstance(got, pa.Table)
            assert got.equals(cap_rows_per_subject(table, 4, seed=0, every_row_of=held))
    assert list(labels) == [*bad.keys(), *[k for s in specs for k in s.keys()]]
