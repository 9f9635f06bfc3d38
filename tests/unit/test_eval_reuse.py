"""A site's evaluation does less work without changing a result: each distinct wearable patch is
encoded once (healthfm_core/eval/patch_reuse.py), a site whose devices record no heart rate
gives its (empty) resting-HR labels without reading its epochs, and ACES reads each MEDS shard
once for all tasks (tests/unit/test_aces_shared.py compares the tables). All are checked against the
straightforward path on real synthetic sites: embeddings bit for bit, metrics exactly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.aces_tasks import aces_labels
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.labels.tasks import visit_prediction_times, wearable_regression_labels
from healthfm_core.data.sequences.tokens import LabelledDataset, make_loader
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.eval import site_eval
from healthfm_core.eval.patch_reuse import PatchReuse, reused_patch_encodings
from healthfm_core.eval.probes import compute_embeddings
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, FederationSetup
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from simulations.synthetic import generate_federation

TASKS = ["onset_hypertension_365d", "onset_t2d_365d", "wearable_resting_hr", "wearable_mean_enmo"]


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteRuntime]:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=40, progress=False)
    return {
        s.name: SiteRuntime(
            SiteConfig(site_root=s.root, site_name=s.name, min_report_subjects=2, min_report_positives=1)
        )
        for s in fed.sites
    }


@pytest.fixture(scope="module")
def setup(runtimes) -> FederationSetup:
    vocab = build_vocabulary([r.code_stats() for r in runtimes.values()], min_subjects=2)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=3)


def _rows(rt: SiteRuntime) -> pa.Table:
    """Visit times and wear-period midpoints: the rows an evaluation embeds at a wearable site."""
    visits = visit_prediction_times(rt.site.read_events(columns=["subject_id", "time", "code"]), n_per_subject=4)
    wear = wearable_regression_labels(rt.site.read_wearables(), target="mean_enmo").select(visits.column_names)
    rows = pa.concat_tables([visits, wear.cast(visits.schema)]).group_by(visits.column_names).aggregate([])
    rows = rows.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    return rows.append_column("boolean_value", pa.array(np.zeros(rows.num_rows, dtype=bool)))


# Batch sizes 1 and 5 (a patch shared across batches; 80 s of the default suite) run in
# `make test-slow`; 32 runs everywhere.
@pytest.mark.parametrize(
    "batch_size", [pytest.param(1, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow), 32]
)
def test_reused_patch_encodings_equal_the_straightforward_embeddings_bit_for_bit(runtimes, setup, batch_size) -> None:
    model = init_model(setup)
    for name in ("biobank", "hospital"):  # with and without heart rate
        rt = runtimes[name]
        dataset = LabelledDataset(rt.sequences(setup), _rows(rt), max_events=256, max_patches=32)
        plain = compute_embeddings(model, make_loader(dataset, batch_size=batch_size, shuffle=False)).x
        with reused_patch_encodings(model) as reuse:
            reused = compute_embeddings(model, make_loader(dataset, batch_size=batch_size, shuffle=False)).x
        np.testing.assert_array_equal(reused, plain)
        assert 0 < reuse.encoded < reuse.asked, (name, reuse)  # patches were shared, and reused
    # Afterwards the encoder is its class's own again, and the cache is gone with the block.
    assert "pool" not in vars(model.wearable_encoder)


def test_patch_reuse_refuses_training_mode_and_gradients(runtimes, setup) -> None:
    model = init_model(setup)
    rt = runtimes["biobank"]
    dataset = LabelledDataset(rt.sequences(setup), _rows(rt), max_events=256, max_patches=32)
    batch, _ = next(iter(make_loader(dataset, batch_size=8, shuffle=False)))
    model.eval()
    with reused_patch_encodings(model), pytest.raises(RuntimeError, match="eval mode"):
        model.embed(batch)  # gradients on: a cached encoding would carry no graph
    model.train()
    with reused_patch_encodings(model), torch.no_grad(), pytest.raises(RuntimeError, match="eval mode"):
        model.embed(batch)  # dropout: a patch's encoding would differ between calls
    assert "pool" not in vars(model.wearable_encoder)


@pytest.mark.slow  # ~10 s idle: CI's slow stage (SLOW_CI)
def test_site_metrics_equal_the_straightforward_path(runtimes, setup, tmp_path: Path, monkeypatch) -> None:
    cfg = EvalConfig(round=1, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256, n_boot=10)
    reported: set[str] = set()
    for name, rt in runtimes.items():
        arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in rt.groups}
        rt.config = rt.config.model_copy(update={"eval_dir": tmp_path / "reuse"})
        rt._eval_dir = None
        fast = rt.evaluate(setup, arrays, cfg)
        with monkeypatch.context() as m:  # the straightforward path: every patch encoded where it is asked
            m.setattr(site_eval, "reused_patch_encodings", lambda model: contextlib.nullcontext(PatchReuse()))
            m.setattr(site_eval, "_may_hold_heart_rate", lambda files: True)
            # ... and ACES reading the shards itself for each task, not once for all of them.
            m.setattr(
                site_eval,
                "aces_labels_shared",
                lambda tasks, root, prediction_times=None, subjects=None: [
                    aces_labels(t, root, prediction_times=prediction_times)
                    for t in tasks  # every subject's
                ],
            )
            rt._labels, rt._eval_dir = {}, None
            rt.config = rt.config.model_copy(update={"eval_dir": tmp_path / "plain"})
            plain = rt.evaluate(setup, arrays, cfg)
        assert fast.tasks == plain.tasks, name
        assert fast.reasons == plain.reasons and fast.num_examples == plain.num_examples, name
        reported |= set(fast.tasks)
    assert {"wearable_mean_enmo", "onset_hypertension_365d"} <= reported  # metrics were compared, not only reasons


def test_a_site_without_heart_rate_gives_its_empty_resting_hr_labels_without_reading_epochs(
    runtimes, monkeypatch
) -> None:
    site = runtimes["hospital"].site  # wearables without PPG
    assert site.wearable_files and not site_eval._may_hold_heart_rate(site.wearable_files)
    assert site_eval._may_hold_heart_rate(runtimes["biobank"].site.wearable_files)
    expected = wearable_regression_labels(site.read_wearables(), target="resting_hr")
    assert expected.num_rows == 0
    with monkeypatch.context() as m:
        m.setattr(type(site), "read_wearables", lambda self, *a, **k: pytest.fail("epochs read"))
        labels = site_eval.task_labels_at_site(
            site, EvalConfig(round=0, tasks=resolve_tasks(TASKS[2:3]), setup_sha256="x").tasks
        )
    got = labels["wearable_resting_hr"]
    assert isinstance(got, pa.Table)
    assert got.equals(expected)


def test_heart_rate_check_reads_only_statistics_and_holds_to_any_value(tmp_path: Path) -> None:
    base = {"subject_id": pa.array([1, 1], pa.int64()), "time": pa.array([0, 30_000_000], pa.timestamp("us"))}
    enmo = pa.array([1.0, 2.0], pa.float32())
    none = pa.table({**base, "enmo_mg": enmo, "hr_bpm": pa.array([None, None], pa.float32())})
    one = pa.table({**base, "enmo_mg": enmo, "hr_bpm": pa.array([None, 60.0], pa.float32())})
    pq.write_table(none, tmp_path / "none.parquet")
    pq.write_table(one, tmp_path / "one.parquet")
    pq.write_table(none, tmp_path / "nostats.parquet", write_statistics=False)
    assert not site_eval._may_hold_heart_rate([tmp_path / "none.parquet"])
    assert site_eval._may_hold_heart_rate([tmp_path / "none.parquet", tmp_path / "one.parquet"])
    assert site_eval._may_hold_heart_rate([tmp_path / "nostats.parquet"])  # unknown: read them
