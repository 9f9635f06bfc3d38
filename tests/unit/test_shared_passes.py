"""One forward pass serves several evaluation rows of a subject (healthfm_core/data/sequences/shared_passes.py,
healthfm_core/eval/row_embeddings.py): every row's embedding and modality presence equal those of
its own pass, on synthetic sites with wearables, genomics and EHR only, with the windows cut short
(truncation), rows whose prediction time cuts a day's bucket or a wearable patch, rows before the
subject's first observation and duplicate rows. And the rows it refuses would be wrong in a shared
pass: the rules are needed, not just safe."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.tasks import visit_prediction_times, wearable_regression_labels
from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.shared_passes import shared_passes
from healthfm_core.data.sequences.tokens import US_PER_DAY
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.eval.row_embeddings import embed_rows
from healthfm_core.eval.runner import PooledEmbedder
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.model_config import load_model_config
from simulations.synthetic import generate_federation


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteRuntime]:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=1, n_subjects=24, progress=False)
    return {
        s.name: SiteRuntime(SiteConfig(site_root=s.root, site_name=s.name, min_report_subjects=2)) for s in fed.sites
    }


@pytest.fixture(scope="module")
def setup(runtimes) -> FederationSetup:
    vocab = build_vocabulary([r.code_stats() for r in runtimes.values()], min_subjects=2)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=5)


def _rows(rt: SiteRuntime) -> tuple[np.ndarray, np.ndarray]:
    """(subject ids, prediction times µs): visit times and wear-period midpoints (what evaluation
    embeds), every distinct event time of the first subjects (times inside a day's bucket), a row
    a day before each subject's first event, and every visit row twice."""
    events = rt.site.read_events(columns=["subject_id", "time", "code"])
    visits = visit_prediction_times(events, n_per_subject=4)
    parts = [visits, visits]
    if rt.site.wearable_files:
        wear = wearable_regression_labels(rt.site.read_wearables(), target="mean_enmo")
        parts.append(wear.select(visits.column_names).cast(visits.schema))
    timed = events.filter(pc.is_valid(events["time"])).select(["subject_id", "time"])
    first_subjects = pc.is_in(timed["subject_id"], pa.array(np.unique(timed["subject_id"].to_numpy())[:6]))
    every = timed.filter(first_subjects).group_by(["subject_id", "time"]).aggregate([])
    parts.append(every.rename_columns(visits.column_names).cast(visits.schema))
    first = timed.group_by("subject_id").aggregate([("time", "min")])
    before = pc.subtract(pc.cast(first["time_min"], pa.int64()), US_PER_DAY)
    parts.append(
        pa.table({"subject_id": first["subject_id"], "prediction_time": before.cast(pa.timestamp("us"))}).cast(
            visits.schema
        )
    )
    rows = pa.concat_tables(parts)
    return rows["subject_id"].to_numpy(), pc.cast(rows["prediction_time"], pa.int64()).to_numpy()


@pytest.mark.parametrize(
    ("windows", "pooling", "max_queries"),
    [((256, 32), None, 32), ((6, 3), None, 32), ((256, 32), ("query", "mean"), 32), ((256, 32), None, 2)],
    ids=["model_windows", "truncated", "pooled", "two_queries"],
)
def test_shared_passes_give_every_row_its_own_embedding_and_presence(
    runtimes, setup, windows, pooling, max_queries
) -> None:
    max_events, max_patches = windows
    model = init_model(setup)
    embedder = model if pooling is None else PooledEmbedder(model, pooling)
    for name, rt in runtimes.items():
        sid, pt = _rows(rt)
        seqs = rt.sequences(setup)
        own = embed_rows(embedder, seqs, sid, pt, max_events, max_patches, batch_size=5, shared=False)
        shared = embed_rows(embedder, seqs, sid, pt, max_events, max_patches, batch_size=5, max_queries=max_queries)
        lead = shared_passes(seqs, seqs.index_of(sid), pt, max_events, max_patches, max_queries)
        assert np.bincount(lead).max() <= max_queries
        assert (pt[lead] >= pt).all() and (sid[lead] == sid).all()  # a later row of the same subject
        assert own.passes == len(sid)
        assert shared.passes < len(sid), name  # passes were shared
        np.testing.assert_allclose(shared.x, own.x, rtol=0, atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(shared.present, own.present, err_msg=name)
    assert model.training  # its mode is given back


def _refused_rows_in_the_latest_pass(rt: SiteRuntime, setup: FederationSetup, model: HealthFM) -> float:
    """Largest difference between a refused row's own embedding and the query at its time in the
    pass of its subject's latest row (the pass it would have joined)."""
    sid, pt = _rows(rt)
    seqs = rt.sequences(setup)
    index = seqs.index_of(sid)
    lead = shared_passes(seqs, index, pt, 256, 32)
    latest = {}
    for i in np.lexsort((pt, index)):
        latest[int(index[i])] = i
    refused = np.array(
        [i for i in range(len(sid)) if lead[i] == i and pt[latest[int(index[i])]] > pt[i]], dtype=np.int64
    )
    assert len(refused), rt.site.root
    own = embed_rows(model, seqs, sid[refused], pt[refused], 256, 32, shared=False).x
    hosts = np.array([latest[int(index[i])] for i in refused])
    batch: Batch = seqs.batch(index[hosts], pt[hosts], 256, 32)
    t0 = seqs.t0_us[index[refused]]
    query_days = torch.from_numpy(((pt[refused] - t0) / US_PER_DAY).astype(np.float32))[:, None]
    model.eval()
    with torch.inference_mode():
        in_host = model.embed_at(batch, query_days)[:, 0].double().numpy()
    return float(np.abs(in_host - own).max())


def test_rows_a_shared_pass_refuses_would_get_another_embedding_in_it(runtimes, setup) -> None:
    model = init_model(setup)
    # The wearable site: rows that cut a patch or a bucket, and rows before the first event.
    assert _refused_rows_in_the_latest_pass(runtimes["biobank"], setup, model) > 1e-3


def test_shared_passes_checks_its_rows(runtimes, setup) -> None:
    seqs = runtimes["hospital"].sequences(setup)
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        shared_passes(seqs, np.array([0]), np.array([0]), 256, 32, max_queries=0)
    with pytest.raises(ValueError, match="2 subject rows but 1 prediction times"):
        shared_passes(seqs, np.array([0, 1]), np.array([0]), 256, 32)
    with pytest.raises(ValueError, match="not present in the site"):
        embed_rows(init_model(setup), seqs, np.array([10**12]), np.array([0]), 256, 32)
