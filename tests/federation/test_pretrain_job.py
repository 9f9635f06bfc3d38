"""The centralized pretraining job end to end (model=tiny, a tiny federation, a few steps), and
the evaluation runner's pieces it is built from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.data.labels.tasks import (
    TASKS,
    OnsetTask,
    onset_labels_from_events,
    visit_prediction_times,
    wear_period_end_times,
)
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.runner import (
    MethodFeatures,
    PooledEmbedder,
    build_eval_set,
    build_site_rows,
    evaluate_cross_fitted,
    paired_auroc_difference,
    restrict_modalities,
    subsample_train,
)
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.model_config import load_model_config
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
ONSET = [k for k, t in TASKS.items() if isinstance(t, OnsetTask)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A tiny synthetic federation, in the layout the job reuses (manifest + truth/scenario.json)."""
    out = tmp_path_factory.mktemp("federation")
    generate_federation(out, scenario="tiny", seed=0, n_subjects=60, progress=False)
    return out


@pytest.mark.slow  # the whole pretraining job (19 s): in CI's slow stage (Makefile SLOW_CI)
def test_pretrain_job_writes_report_plots_and_the_full_table(federation, tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.pretrain",
        "model=tiny",
        "scenario=tiny",
        "data.n_subjects=60",
        # One torch thread: the job's default of 2 stalls for minutes on a loaded 2-core machine.
        f"data.dir={federation}",
        f"out_dir={out}",
        "threads=1",
        "train.steps=3",
        "train.batch_size=8",
        "train.checkpoint_every=2",
        "data.max_events=32",
        "data.max_patches=6",
        "eval.n_boot=20",
        "eval.batch_size=256",
        "eval.n_per_subject=2",
        "~eval.modality_ablation.cohorts.all_three",
        "eval.modality_ablation.n_folds=3",
        "progress=false",
        "eval.summary_min_positives=2",
        "eval.label_efficiency.fractions=[0.5,1.0]",
        "eval.label_efficiency.repeats=2",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The timeout is a safety net against a hung job, not a speed limit (~40 s on an idle machine).
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = Path(proc.stdout.strip().splitlines()[-1])
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()

    # The federation in data.dir was reused, not regenerated (the manifest still matches).
    assert "generating synthetic sites" not in proc.stderr

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "training_curves.png" in pngs
    assert {f"auroc_onset_{d}.png" for d in ("t2d", "cad", "hypertension", "copd")} <= set(pngs)
    assert any(p.startswith("reliability_") for p in pngs)
    for p in pngs:
        assert (out / p).read_bytes()[:8] == PNG_MAGIC
        assert f"]({p})" in text  # linked from the report, relative to its folder

    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {
        "counts",
        "pretrained",
        "pretrained_meanpool",
        "random_init",
        "random_init_meanpool",
        "oracle",
    }
    pairs = {m: {(r["task"], r["horizon"]) for r in v["rows"]} for m, v in methods.items()}
    # Every probed method has a row for the same task/horizon pairs, and each of the 16 onset
    # tasks is either evaluated or skipped with a reason.
    probed = [m for m in methods if m != "oracle"]
    assert all(pairs[m] == pairs["pretrained"] for m in probed)
    assert len(pairs["pretrained"]) >= 4
    assert pairs["pretrained"] <= pairs["oracle"]
    onset_skipped = {k for k in methods["pretrained"]["skipped"] if k in ONSET}
    assert len(pairs["pretrained"]) + len(onset_skipped) == len(ONSET)
    for m in methods:
        for r in methods[m]["rows"]:
            assert f"| {r['task']} | {r['horizon']} | {m} | {r['n']} | {r['n_pos']} |" in text
            assert 0 <= r["n_pos"] <= r["n"]  # held_out may lack positives: AUROC n/a then
    # The oracle (true risk) of the generator is a real ceiling even on a tiny cohort.
    oracle = [r["auroc"] for r in methods["oracle"]["rows"] if r["auroc"] is not None and np.isfinite(r["auroc"])]
    assert oracle and np.mean(oracle) > 0.6
    # The physiological regression task (mean ENMO: both wearable sites) has rows per method.
    assert {r["task"] for r in methods["pretrained"]["regression_rows"]} >= {"wearable_mean_enmo"}
    assert "## Regression tasks" in text
    # The modality ablation: EHR-only vs EHR+wearables within the rows that have wearables.
    ablation = results["modality_ablation"]
    assert {"with_wearables: pretrained[ehr]", "with_wearables: pretrained[ehr+wearables]"} <= set(ablation)
    assert "Test-time modality ablation" in text
    # Paired differences against each baseline are in the results (None: no pair had enough positives).
    assert {"pretrained - random_init", "pretrained - counts"} <= set(results["differences"])
    # The label-efficiency curve: a table row per method and its plot.
    assert "Label efficiency" in text and "| pretrained | " in text and "label_efficiency.png" in pngs
    # Training: history of every step, checkpoints kept, the vocabulary saved.
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2]
    assert all(np.isfinite(h["total"]) for h in history)
    assert (out / "checkpoints" / "step-00000003").is_dir()
    assert json.loads((out / "vocabulary.json").read_text())["codes"]


def test_site_rows_hold_exactly_the_task_labels(federation) -> None:
    """One row set for all tasks: each task's labels are exactly onset_labels_from_events' on the
    shared visit prediction times, NaN elsewhere; splits come from the site's split file."""
    site = open_site(federation / "sites" / "biobank")
    vocab = build_vocabulary([site_code_stats(site, min_subjects=2)], min_subjects=2)
    seqs = SiteSequences.from_site(site, vocab)
    tasks = {k: TASKS[k] for k in ("onset_t2d_365d", "onset_cad_90d", "wearable_mean_enmo")}
    rows = build_site_rows("biobank", site, seqs, tasks, n_per_subject=3, seed=1)
    events = site.read_events(columns=["subject_id", "time", "code"])
    times = visit_prediction_times(events, n_per_subject=3, seed=1)
    key = list(zip(rows.subject_id.tolist(), rows.prediction_time_us.tolist()))
    assert len(set(key)) == len(key)  # distinct rows
    for name in ("onset_t2d_365d", "onset_cad_90d"):
        task = TASKS[name]
        assert isinstance(task, OnsetTask)
        lab = onset_labels_from_events(events, task.outcome_code_prefix, task.horizon_days, times)
        expected = dict(
            zip(
                zip(lab["subject_id"].to_pylist(), lab["prediction_time"].cast("int64").to_pylist()),
                lab["boolean_value"].to_pylist(),
            )
        )
        got = {k: bool(v) for k, v in zip(key, rows.labels[name]) if np.isfinite(v)}
        assert got == expected
    assert np.isfinite(rows.labels["wearable_mean_enmo"]).sum() > 0
    splits = dict(zip(site.subject_splits()["subject_id"].to_pylist(), site.subject_splits()["split"].to_pylist()))
    assert [splits[s] for s in rows.subject_id.tolist()] == rows.split.tolist()


def test_wear_period_end_rows_and_cross_fitted_probes(federation) -> None:
    """The ablation's rows: the onset tasks asked at the end of every wear period, only for
    subjects with wearables, scored out of fold; the paired difference of two conditions."""
    site = open_site(federation / "sites" / "biobank")
    vocab = build_vocabulary([site_code_stats(site, min_subjects=2)], min_subjects=2)
    seqs = SiteSequences.from_site(site, vocab)
    tasks = {k: TASKS[k] for k in ONSET}
    data = build_eval_set({"biobank": (site, seqs)}, tasks, onset_times="wear_period_ends")
    ends = wear_period_end_times(site.read_wearables())
    assert len(data) == ends.num_rows > 0
    assert data.sites[0].prediction_time_us.tolist() == ends["prediction_time"].cast("int64").to_pylist()
    assert data.subject_keys()[0] == f"biobank/{data.sites[0].subject_id[0]}"
    # A site without wearables gives no rows (not an error).
    cohort = open_site(federation / "sites" / "genomics")
    gseqs = SiteSequences.from_site(cohort, vocab)
    assert len(build_eval_set({"genomics": (cohort, gseqs)}, tasks, onset_times="wear_period_ends")) == 0
    with pytest.raises(ValueError, match="onset_times"):
        build_site_rows("biobank", site, seqs, tasks, onset_times="weekly")  # type: ignore[arg-type]

    # Features that carry the label of the 365-day T2D task (plus noise) against pure noise.
    key = max(ONSET, key=lambda k: np.nansum(data.labels(k)))
    y = data.labels(key)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((len(data), 3))
    signal = noise + np.where(np.isfinite(y), 3.0 * np.nan_to_num(y), 0.0)[:, None]
    rows = np.arange(len(data))
    present = np.ones((len(data), 3), dtype=bool)
    good = evaluate_cross_fitted(
        "good", data, MethodFeatures(signal, present, rows), tasks=[key], n_folds=3, n_boot=50, min_positives=2
    )
    bad = evaluate_cross_fitted(
        "bad", data, MethodFeatures(noise, present, rows), tasks=[key], n_folds=3, n_boot=50, min_positives=2
    )
    if key in good.skipped:  # too few positives per fold in this tiny cohort
        pytest.skip(good.skipped[key])
    assert good.rows[0].auroc > 0.9 and good.rows[0].n == int(np.isfinite(y).sum())
    assert set(good.scored_rows[key].tolist()) == set(np.flatnonzero(np.isfinite(y)).tolist())
    diff = paired_auroc_difference(data, good, bad, [key], n_boot=50)
    assert diff is not None and diff.mean == pytest.approx(good.rows[0].auroc - bad.rows[0].auroc)
    assert diff.ci[0] > 0
    skipped = evaluate_cross_fitted(
        "good", data, MethodFeatures(signal, present, rows), tasks=[key], min_positives=10**6
    )
    assert key in skipped.skipped and not skipped.rows


def test_subsample_train_keeps_the_test_rows_and_nests(federation) -> None:
    site = open_site(federation / "sites" / "biobank")
    vocab = build_vocabulary([site_code_stats(site, min_subjects=2)], min_subjects=2)
    data = build_eval_set(
        {"biobank": (site, SiteSequences.from_site(site, vocab))}, {k: TASKS[k] for k in ONSET}, n_per_subject=3
    )
    rows = np.arange(len(data))
    split, subject = data.column("split"), data.subject_keys()
    half, fifth = subsample_train(data, rows, 0.5, seed=3), subsample_train(data, rows, 0.2, seed=3)
    n_train = len(np.unique(subject[split == "train"]))
    assert len(np.unique(subject[half][split[half] == "train"])) == round(0.5 * n_train)
    assert set(fifth.tolist()) <= set(half.tolist())  # nested at one seed
    assert set(rows[split != "train"].tolist()) <= set(fifth.tolist())  # the test rows stay
    kept = set(subject[half][split[half] == "train"].tolist())  # whole subjects, all their rows
    assert all(i in set(half.tolist()) for i in rows[(split == "train") & np.isin(subject, list(kept))])
    assert np.array_equal(subsample_train(data, rows, 1.0), rows)
    with pytest.raises(ValueError, match="fraction"):
        subsample_train(data, rows, 0.0)


def test_restrict_modalities_removes_exactly_the_dropped_modalities() -> None:
    mods = [("ehr",), ("ehr", "wearables"), ("ehr", "genomics"), ("ehr", "wearables", "genomics")]
    batch = random_batch(batch_size=4, modalities=mods, seed=3)
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = HealthFM(cfg, vocab_size=40, n_prs_traits=4).eval()
    assert model.genomics_encoder is not None
    with torch.no_grad():  # genomics FiLM starts at identity: give it an effect to remove
        for p in model.genomics_encoder.parameters():
            p.normal_(0.0, 0.1)
    ehr_only = restrict_modalities(batch, ["ehr"])
    has = ehr_only.has_modality()
    assert torch.equal(has["ehr"], batch.has_modality()["ehr"])
    assert not has["wearables"].any() and not has["genomics"].any()
    assert restrict_modalities(batch, ["ehr", "wearables", "genomics"]) is batch
    with torch.no_grad():
        full, reduced = model.embed(batch), model.embed(ehr_only)
    # A sample that had only EHR is untouched; the others lose information and change.
    assert torch.allclose(full[0], reduced[0], atol=1e-6)
    for i in (1, 2, 3):
        assert not torch.allclose(full[i], reduced[i], atol=1e-4)
    with pytest.raises(ValueError, match="unknown modalities"):
        restrict_modalities(batch, ["ehr", "images"])
    # Without the EHR there is no MEDS_BIRTH row, so no age either.
    assert torch.isnan(restrict_modalities(batch, ["wearables"]).birth_time).all()
    assert torch.equal(ehr_only.birth_time, batch.birth_time)


def test_pooled_embedder_query_block_is_the_models_embedding() -> None:
    batch = random_batch(batch_size=3, seed=5)
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), vocab_size=40, n_prs_traits=4).eval()
    with torch.no_grad():
        both = PooledEmbedder(model, ["query", "mean"]).embed(batch)
        out = model(batch)
    d = model.cfg.d_model
    assert both.shape == (3, 2 * d)
    assert torch.allclose(both[:, :d], out.embedding)
    w = out.key_valid.float()[..., None]
    assert torch.allclose(both[:, d:], (out.states * w).sum(1) / w.sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="poolings"):
        PooledEmbedder(model, ["max"])


def test_pooled_embedder_genomics_block_is_the_encoders_output_and_zero_without_it() -> None:
    # Issue 31: the probes read the genomics encoder's output beside the query state.
    batch = random_batch(batch_size=3, seed=5)
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), vocab_size=40, n_prs_traits=4).eval()
    d, h = model.cfg.d_model, model.cfg.genomics.d_hidden
    view = PooledEmbedder(model, ["query", "genomics"])
    with torch.no_grad():
        x = view.embed(batch)
        out = model(batch)
        blind = view.embed(restrict_modalities(batch, ["ehr", "wearables"]))
    assert x.shape == (3, d + h)
    assert torch.allclose(x[:, :d], out.embedding)
    assert torch.allclose(x, model.embed(batch))  # [query, genomics] is the model's own embedding
    has = out.present["genomics"]
    assert has.any()
    assert out.genomics_cond is not None
    assert torch.allclose(x[has, d:], out.genomics_cond[has])
    assert torch.equal(x[~has, d:], torch.zeros_like(x[~has, d:]))
    assert blind.shape == (3, d + h) and torch.equal(blind[:, d:], torch.zeros(3, h))
    # A model without genomics gives the block no columns (every batch the same width).
    plain = HealthFM(load_model_config("tiny"), vocab_size=40, n_prs_traits=0).eval()
    with torch.no_grad():
        got = PooledEmbedder(plain, ["query", "genomics"]).embed(restrict_modalities(batch, ["ehr", "wearables"]))
    assert got.shape == (3, d)
