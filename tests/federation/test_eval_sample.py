"""The federated evaluation's subject budget (eval_max_subjects -> EvalConfig.max_subjects): each
site scores, per task and split, every row of a fixed keyed-hash sample of at most that many
subjects (healthfm_core/eval/subject_sample.py). Checked on real synthetic sites: the sample is
subject-level, stable and of size min(cap, n); 0 is the full evaluation exactly; a capped
evaluation scores exactly the sampled subjects' rows; bad budgets are refused by name."""

from __future__ import annotations

import contextlib
import tracemalloc
from dataclasses import astuple
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.hydra_configs import compose_cfg
from omegaconf import OmegaConf

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.labels.tasks import rows_per_subject
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.eval import site_eval
from healthfm_core.eval.embedding_file import embeddings_file
from healthfm_core.eval.meds_eval import prediction_path
from healthfm_core.eval.outcomes import outcome, scored_of_available
from healthfm_core.eval.row_embeddings import embed_rows, in_memory
from healthfm_core.eval.subject_sample import draw_sample, sample_subjects
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, EvalReply, FederationSetup, TaskMetrics
from healthfm_core.protocol.task_reason import TaskReason
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.site_layout import HELD_OUT_SPLIT, SPLITS
from server.config import DEFAULT_EVAL_MAX_SUBJECTS, RESUMABLE_CHANGES, FederationConfig
from simulations.common import site_eval_rows_per_subject
from simulations.evidence_units import unit_fingerprint
from simulations.run import federation_config
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
# Task names: EvalConfig resolves them to their definitions (its `tasks` holds TaskSpecs).
TASKS: list[Any] = ["onset_hypertension_365d", "onset_t2d_365d", "wearable_mean_enmo"]
CAP = 5  # below the held-out split's 6 subjects; the wearable regression still reports


@pytest.fixture(scope="module")
def biobank(tmp_path_factory: pytest.TempPathFactory) -> SiteRuntime:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=60, progress=False)
    site = next(s for s in fed.sites if s.name == "biobank")  # EHR and wearables
    return SiteRuntime(SiteConfig(site_root=site.root, site_name=site.name, min_report_subjects=2))


@pytest.fixture(scope="module")
def setup(biobank: SiteRuntime) -> FederationSetup:
    vocab = build_vocabulary([biobank.code_stats()], min_subjects=2)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=3)


def _arrays(rt: SiteRuntime, setup: FederationSetup, seed: int) -> dict[str, np.ndarray]:
    model = init_model(setup.model_copy(update={"model_seed": seed}))
    return {k: v.numpy() for k, v in model.state_dict().items() if parameter_group(k) in rt.groups}


def _evaluate(rt: SiteRuntime, setup: FederationSetup, out: Path, max_subjects: int | None, model_seed: int = 3):
    """The site runtime's evaluation (None: without a subject sample, as before budgets)."""
    cfg = EvalConfig(
        round=1, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256, n_boot=10, max_subjects=max_subjects or 0
    )
    model = rt.model(setup, _arrays(rt, setup, model_seed))
    return rt.evaluate_tasks(setup, model, cfg, out_dir=out, sampled=max_subjects is not None)


@pytest.fixture(scope="module")
def full_evaluation(biobank, setup, tmp_path_factory: pytest.TempPathFactory):
    """The evaluation with budget 0 (every subject): the reference of two tests, computed once."""
    return _evaluate(biobank, setup, tmp_path_factory.mktemp("full"), 0)


def _scored(out: Path, site: str, key: str) -> set[tuple[int, int]]:
    table = pq.read_table(prediction_path(out, site, key))
    times = pc.cast(table["prediction_time"], "int64").to_pylist()
    return set(zip(table["subject_id"].to_pylist(), times))


# ------------------------------------------------------------------------------- the sample


def test_the_sample_is_min_cap_n_distinct_subjects_stable_nested_and_keyed(biobank: SiteRuntime) -> None:
    ids = biobank.split_ids()["train"]
    rows = np.repeat(ids, 3)  # a subject's several rows count once
    for cap in (1, 5, len(ids) - 1, len(ids), len(ids) + 10):
        chosen = sample_subjects(rows, cap, key=0)
        assert len(chosen) == min(cap, len(ids)) == len(np.unique(chosen))
        assert set(chosen) <= set(ids)
        # Stable: the same ids in another order, or again, give the same sample.
        np.testing.assert_array_equal(sample_subjects(np.random.default_rng(cap).permutation(rows), cap, 0), chosen)
        # Nested: a larger budget keeps the smaller one's subjects.
        assert set(sample_subjects(rows, max(cap - 1, 1), 0)) <= set(chosen)
    np.testing.assert_array_equal(sample_subjects(rows, 0, 0), ids)  # 0: every subject
    # The key (the run's seed) draws another sample; a subject's rank depends on itself only.
    assert set(sample_subjects(ids, 5, 0)) != set(sample_subjects(ids, 5, 1))
    first = sample_subjects(ids, 5, 0)
    assert set(first) <= set(sample_subjects(np.concatenate([ids, ids.max() + 1 + np.arange(50)]), 80, 0))
    with pytest.raises(ValueError, match="max_subjects: value -1"):
        sample_subjects(ids, -1, 0)


def test_the_sample_draws_whole_subjects_per_split(biobank: SiteRuntime) -> None:
    splits = biobank.split_ids()
    sample = draw_sample(splits, CAP, key=0)
    for s in SPLITS:
        assert len(sample.chosen[s]) == min(CAP, len(splits[s])) and set(sample.chosen[s]) <= set(splits[s])
        assert sample.available[s] == len(splits[s])
    cfg = EvalConfig(round=1, tasks=resolve_tasks(TASKS), setup_sha256="x", max_subjects=CAP)
    table = biobank.labels(cfg.model_copy(update={"max_subjects": 0}))["onset_hypertension_365d"]
    assert not isinstance(table, TaskReason)
    kept = sample.keep(table)["subject_id"].to_numpy()
    all_ids = table["subject_id"].to_numpy()
    # Every row of a chosen subject, none of the others.
    assert len(kept) == int(np.isin(all_ids, sample.subjects()).sum()) and set(kept) <= set(sample.subjects())
    assert draw_sample(splits, 0, 0).keep(table) is table  # no budget: the table itself


# ----------------------------------------------------------------------- the site's evaluation


def test_budget_zero_is_the_full_evaluation_exactly(biobank, setup, full_evaluation, tmp_path: Path) -> None:
    default = _evaluate(biobank, setup, tmp_path / "default", None)
    zero = full_evaluation
    above = _evaluate(biobank, setup, tmp_path / "above", 10_000)  # a budget above every split's size
    strip = {"available_subjects": None}  # what only a sampled evaluation says
    for other in (zero, above):
        assert {k: m.model_copy(update=strip) for k, m in other.metrics.items()} == default.metrics
        assert other.reasons == default.reasons
    assert default.metrics and default.num_examples == zero.num_examples >= above.num_examples  # "none" rows only
    assert zero.metrics == above.metrics


def test_a_capped_evaluation_scores_exactly_the_sampled_subjects_rows(
    biobank, setup, full_evaluation, tmp_path: Path
) -> None:
    cfg = EvalConfig(round=1, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256)
    labels = biobank.labels(cfg)  # every subject's
    split_of = biobank._split_lookup()
    n_held = len(biobank.split_ids()[HELD_OUT_SPLIT])
    full = full_evaluation
    capped = _evaluate(biobank, setup, tmp_path / "capped", CAP)
    assert capped.metrics and set(capped.metrics) <= set(full.metrics)
    # The sample's labels, extracted for its subjects only, are every subject's labels of those subjects.
    sample = biobank.eval_sample(cfg.model_copy(update={"max_subjects": CAP}))
    own = biobank.labels(cfg.model_copy(update={"max_subjects": CAP}))
    assert list(own) == list(labels)
    for key, table in labels.items():
        assert own[key].equals(sample.keep(table)), key
        assert set(own[key]["subject_id"].to_pylist()) <= set(sample.subjects().tolist())
    # Embedded: exactly the sampled subjects' rows of the reported tasks (all splits).
    pairs = set()
    for key in capped.metrics:
        table = sample.keep(labels[key])
        pairs |= set(zip(table["subject_id"].to_pylist(), pc.cast(table["prediction_time"], "int64").to_pylist()))
    assert capped.num_examples == len(pairs) < full.num_examples
    for key, m in capped.metrics.items():
        table = labels[key]
        subjects = table["subject_id"].to_numpy()
        held = split_of(subjects) == HELD_OUT_SPLIT
        chosen = np.intersect1d(sample_subjects(biobank.split_ids()[HELD_OUT_SPLIT], CAP, cfg.seed), subjects[held])
        times = pc.cast(table["prediction_time"], "int64").to_numpy()
        keep = set(chosen.tolist())
        expected = {(int(s), int(t)) for s, t, h in zip(subjects, times, held) if h and s in keep}
        if key in capped.predictions:  # binary tasks write their held-out predictions
            assert _scored(tmp_path / "capped", biobank.name, key) == expected, key
        assert (m.n, m.subjects, m.available_subjects) == (len(expected), len(chosen), n_held) and m.subjects <= CAP
    # The reply says what was scored of what the site had.
    reply = EvalReply(tasks=capped.metrics, max_subjects=CAP)
    back = EvalReply.from_records(reply.to_records())
    assert back == reply and back.max_subjects == CAP
    assert n_held > CAP and set(scored_of_available({"biobank": back})) == set(capped.metrics)
    assert "a subject sample:" in outcome(back, sorted(capped.metrics)[0])[1]
    assert "sample" not in outcome(EvalReply(tasks=full.metrics), sorted(full.metrics)[0])[1]


def test_the_sample_is_the_same_every_round_and_for_any_model(biobank, setup, tmp_path: Path) -> None:
    arrays_a, arrays_b = _arrays(biobank, setup, 3), _arrays(biobank, setup, 11)
    scored = []
    for rnd, arrays in ((1, arrays_a), (2, arrays_b), (3, arrays_a)):
        cfg = EvalConfig(round=rnd, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256, n_boot=10, max_subjects=CAP)
        biobank.config = biobank.config.model_copy(update={"eval_dir": tmp_path / f"r{rnd}"})
        biobank._eval_dir = None
        reply = biobank.evaluate(setup, arrays, cfg)
        assert reply.max_subjects == CAP and reply.tasks
        sample = biobank.eval_sample(cfg)
        scored.append(
            (
                {s: ids.tolist() for s, ids in sample.chosen.items()},
                {k: (m.n, m.subjects, m.available_subjects) for k, m in reply.tasks.items()},
                reply.num_examples,
            )
        )
    assert scored[0] == scored[1] == scored[2]


# ------------------------------------------------------------------------- the setting


def test_n_per_subject_all_is_possible_in_every_config_and_a_bad_value_is_refused() -> None:
    """Every labelled row (held_out always; train and tuning with `all`): the run config, the
    evaluate message (round trip through its flat record), the simulations' configs."""
    base = {"out-dir": "/tmp/x", "model": "tiny"}
    for value, expect in (("all", "all"), (3, 3), (None, 4)):
        run = {**base, "eval-n-per-subject": value} if value is not None else base
        cfg = FederationConfig.from_run_config(run).eval_config(1, "x")
        assert cfg.n_per_subject == expect
        assert EvalConfig.from_flat(cfg.to_flat()).n_per_subject == expect
    assert "eval_n_per_subject" in RESUMABLE_CHANGES  # a final evaluation may ask for every row
    for bad in ("some", 0, 65):
        with pytest.raises(ValueError, match="eval_n_per_subject"):
            FederationConfig.from_run_config({**base, "eval-n-per-subject": bad})
    flat = {**EvalConfig(round=1, tasks=[], setup_sha256="x").to_flat(), "n-per-subject": "every"}
    with pytest.raises(ValueError, match=r"field n_per_subject"):
        EvalConfig.from_flat(flat)
    assert site_eval_rows_per_subject(OmegaConf.create({"eval": {"n_per_subject": "all"}})) is None
    assert site_eval_rows_per_subject(OmegaConf.create({"eval": {"n_per_subject": None}})) == 4
    assert rows_per_subject("all") is None and rows_per_subject(2) == 2
    with pytest.raises(ValueError, match="n_per_subject"):
        rows_per_subject("most")


@pytest.mark.parametrize("value", [-1, 2.5, "20", True, None])
def test_a_bad_budget_is_refused_naming_the_field_and_value(value) -> None:
    with pytest.raises(ValueError, match=rf"field eval_max_subjects: value {value!r}".replace(".", r"\.")):
        FederationConfig.from_run_config({"out-dir": "/tmp/x", "model": "tiny", "eval-max-subjects": value})
    with pytest.raises(ValueError, match=r"field max_subjects: value -1"):
        EvalConfig.from_flat({**EvalConfig(round=1, tasks=[], setup_sha256="x").to_flat(), "max-subjects": -1})
    with pytest.raises(ValueError, match=r"subjects 9 is more than available_subjects 4"):
        TaskMetrics(n=2, auroc=0.5, subjects=9, available_subjects=4)


def test_the_budget_flows_from_run_config_and_hydra_to_the_sites(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "eval-max-subjects": 0})
    assert cfg.eval_max_subjects == 0
    assert FederationConfig(out_dir=tmp_path, model=load_model_config("tiny")).eval_max_subjects == (
        DEFAULT_EVAL_MAX_SUBJECTS
    )
    # Simulations read configs/federation/*.yaml: the default there, and an override.
    assert federation_config(compose_cfg("run", [f"out_dir={tmp_path}"]), 1).eval_max_subjects == (
        DEFAULT_EVAL_MAX_SUBJECTS
    )
    hcfg = compose_cfg("run", [f"out_dir={tmp_path}", "federation.eval_max_subjects=0"])
    assert federation_config(hcfg, 1).eval_max_subjects == 0
    # A resumed run may change it (a final evaluation of every subject).
    assert "eval_max_subjects" in RESUMABLE_CHANGES


def test_the_evidence_job_runs_no_federated_evaluation() -> None:
    """The evidence job probes every model itself (simulations/evidence.py); its federations ask
    for no federated evaluation, so the budget never reaches its numbers."""
    cfg = yaml.safe_load((REPO / "configs/evidence.yaml").read_text())
    assert cfg["federation"]["eval_tasks"] == []
    assert "eval_tasks" not in cfg["privacy_budget"]["federation"]  # its DP federations inherit []
    # ... and a unit written before the setting existed still resumes: it is not fingerprinted.
    unit = OmegaConf.create({"federation": {"rounds": 1, "eval_max_subjects": 7}, "seed": 0})
    assert unit_fingerprint(unit, "default")["federation"] == {"rounds": 1}


# ------------------------------------------------------------- the embeddings streamed to disk


def test_a_full_evaluation_streamed_to_disk_equals_the_in_memory_one_bit_for_bit(
    biobank, setup, tmp_path: Path, monkeypatch
) -> None:
    site = SiteRuntime(biobank.config.model_copy(update={"min_report_positives": 1}))  # binary tasks report too
    cfg = EvalConfig(round=1, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256, n_boot=10, meds_tab=False)
    model = site.model(setup, _arrays(site, setup, 3))
    files: list[np.ndarray] = []

    @contextlib.contextmanager
    def watched(directory):  # the real file, its array recorded
        with embeddings_file(directory) as rows_to:

            def recorded(n: int, d: int, exact: type[np.floating]) -> np.ndarray:
                files.append(rows_to(n, d, exact))
                return files[-1]

            yield recorded

    monkeypatch.setattr(site_eval, "embeddings_file", watched)
    streamed = site.evaluate_tasks(setup, model, cfg, out_dir=tmp_path / "disk")
    monkeypatch.setattr(site_eval, "embeddings_file", lambda directory: contextlib.nullcontext(in_memory))
    in_memory_run = site.evaluate_tasks(setup, model, cfg, out_dir=tmp_path / "memory")
    # The rows went to a float32 memory-mapped file beside the predictions, removed afterwards.
    (array,) = files
    assert isinstance(array, np.memmap) and array.dtype == np.float32
    assert array.filename is not None
    assert array.shape[0] == streamed.num_examples and Path(array.filename).parent == tmp_path / "disk" / "biobank"
    assert not Path(array.filename).exists() and not list((tmp_path / "disk").rglob("*.npy"))
    assert streamed.metrics and streamed.metrics == in_memory_run.metrics and streamed.reasons == in_memory_run.reasons
    assert streamed.probes.keys() == in_memory_run.probes.keys()
    for key, probe in streamed.probes.items():
        other = in_memory_run.probes[key]
        for a, b in zip(astuple(probe), astuple(other), strict=True):
            np.testing.assert_array_equal(a, b)
    assert streamed.predictions and streamed.predictions.keys() == in_memory_run.predictions.keys()
    for key, path in streamed.predictions.items():
        assert pq.read_table(path).equals(pq.read_table(in_memory_run.predictions[key])), key


def test_embeddings_streamed_to_disk_hold_no_memory_that_grows_with_the_rows(biobank, setup, tmp_path: Path) -> None:
    """Peak traced memory (numpy reports its allocations to tracemalloc) while N and 4N rows are
    embedded, from the first pass on: the in-memory rows grow it by their bytes, the file's do not."""
    cfg = EvalConfig(round=1, tasks=resolve_tasks(TASKS), setup_sha256=setup.sha256)
    table = biobank.labels(cfg)["onset_hypertension_365d"]
    seqs, model = biobank.sequences(setup), init_model(setup)
    n = 48  # rows; one pass per row and the same passes repeated, so every batch is alike
    sid, pt = table["subject_id"].to_numpy()[:n], pc.cast(table["prediction_time"], "int64").to_numpy()[:n]

    def peak(times: int, rows_to) -> tuple[int, np.ndarray]:
        def landed(*shape) -> np.ndarray:  # the peak from here on: the passes, not their index arrays
            x = rows_to(*shape)
            tracemalloc.reset_peak()
            return x

        tracemalloc.start()
        try:
            x = embed_rows(
                model,
                seqs,
                np.tile(sid, times),
                np.tile(pt, times),
                256,
                32,
                batch_size=16,
                shared=False,
                rows_to=landed,
            ).x
            return tracemalloc.get_traced_memory()[1], x
        finally:
            tracemalloc.stop()

    peak(1, in_memory)  # warm: what the first pass ever allocates (torch's, numpy's caches) is not the rows'
    peaks: dict[str, list[int]] = {}
    for where in ("memory", "disk"):
        for times in (1, 4):
            with embeddings_file(tmp_path) if where == "disk" else contextlib.nullcontext(in_memory) as rows_to:
                bytes_, x = peak(times, rows_to)
            peaks.setdefault(where, []).append(bytes_)
            assert x.shape == (times * n, model.embedding_width) and isinstance(x, np.memmap) == (where == "disk")
    grown = {where: p[1] - p[0] for where, p in peaks.items()}
    embeddings = 3 * n * model.embedding_width * 8  # the in-memory rows added from N to 4N (float64)
    # The in-memory peak grows by the rows' bytes more than the streamed one (measured 1.1-1.2x
    # them: the allocator's own bytes), ...
    assert grown["memory"] - grown["disk"] >= 0.75 * embeddings, (grown, embeddings)
    # ... whose peak is the batch's: 4x the rows, not 4x the peak (the row indices still grow).
    assert peaks["disk"][1] < 1.2 * peaks["disk"][0], peaks


def test_the_embeddings_file_is_named_apart_and_removed_when_the_evaluation_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a probe failed"), embeddings_file(tmp_path / "site") as rows_to:
        with embeddings_file(tmp_path / "site") as other:  # a second evaluation of the same directory
            a, b = rows_to(10, 4, np.float32), other(10, 4, np.float64)
            assert isinstance(a, np.memmap) and isinstance(b, np.memmap)
            assert a.filename is not None and b.filename is not None
            assert a.filename != b.filename and (a.dtype, b.dtype) == (np.float32, np.float64)
            a[:] = 1.5
            np.testing.assert_array_equal(np.load(a.filename), a)  # a .npy any reader opens
        assert Path(a.filename).exists() and not Path(b.filename).exists()
        raise RuntimeError("a probe failed")
    assert not list((tmp_path / "site").iterdir())
