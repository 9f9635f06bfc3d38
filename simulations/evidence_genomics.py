"""The genomics diagnosis of the evidence job (issue 31): where is the PRS signal lost?

The full evidence report found `ehr+genomics - ehr` ~ 0 although the generator puts PRS
straight into every hazard (T2D: beta_prs = 0.5, a hazard ratio of 1.65 per SD). This stage asks,
in one unit and on the same rows (the visits of the sites with genomics, the subjects there with
a PRS, one disease's onset tasks, every horizon), each link of the chain in turn:

1. the world:      the oracle (true risk) against the oracle with the PRS terms of the hazard
                   taken out (synthetic.oracle_risk(with_prs=False));
2. a linear read:  the tabular baseline with and without its PRS columns;
3. the model at test time: the federated model's probe on EHR + genomics against EHR alone, and
                   on EHR alone with the raw PRS appended to the probe's features (the probe
                   given what the model may have dropped);
4. the model at train time: pooled training at the pooled budget with genomics hidden from every
                   batch, against the pooled model (trained with it), both read with genomics;
5. the encoder:    R^2 of the PRS itself from the genomics encoder's output (its conditioning
                   vector) and from the model's embedding with and without genomics.

Every probe is cross-fitted over the cohort (folds by subject; runner.evaluate_cross_fitted): the
cohort is too small for one train / tuning / held_out split, and every row then has a score, the
oracle's included. The comparisons enter the job's evidence under `g|...` (paired subject
bootstrap, like every question); the R^2 and counts under Evidence.diagnostics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from healthfm_core.data.labels.tasks import OnsetTask, Task
from healthfm_core.data.sequences.pooled import PooledPretrainingDataset
from healthfm_core.eval.probes import fit_ridge, subject_folds
from healthfm_core.eval.runner import (
    EvalSet,
    MethodFeatures,
    MethodResult,
    evaluate_cross_fitted,
    method_features,
    paired_items,
)
from healthfm_core.eval.tabular import TabularFeaturizer
from healthfm_core.model.healthfm import HealthFM
from simulations.evidence_units import Evidence
from simulations.report import Regimes, train_baseline
from simulations.synthetic import ScenarioConfig, oracle_risk

log = logging.getLogger("healthfm.simulations.evidence")

KEY = "g"  # the comparisons' prefix in the job's evidence and report
WITH = ("ehr", "genomics")  # the q5 ablation's conditions: wearables out of both
WITHOUT = ("ehr",)


@dataclass
class Cohort:
    data: EvalSet  # the sites with genomics, the disease's onset tasks only
    rows: np.ndarray  # positions of the rows whose subject has a PRS
    tasks: list[str]


def genomics_cohort(
    per_site_data: Mapping[str, EvalSet], sites: Mapping[str, Any], code_to_disease: Mapping[str, str], disease: str
) -> Cohort | None:
    """The rows of the sites with genomics whose subject has a PRS, with `disease`'s onset tasks."""
    names = [n for n in per_site_data if len(sites[n].modality_subjects("genomics"))]
    if not names:
        return None
    tasks: dict[str, Task] = {
        k: t
        for k, t in next(iter(per_site_data.values())).tasks.items()
        if isinstance(t, OnsetTask) and code_to_disease.get(t.outcome_code_prefix) == disease
    }
    if not tasks:
        return None
    parts = [p for n in names for p in per_site_data[n].sites]
    data = EvalSet(sites=parts, tasks=tasks)
    keep = np.concatenate([np.isin(p.subject_id, sites[p.name].modality_subjects("genomics")) for p in parts])
    return Cohort(data=data, rows=np.flatnonzero(keep), tasks=list(tasks))


def train_without_genomics(setup: Any, datasets: Mapping[str, Any], steps: int, fed: DictConfig, seed: int) -> HealthFM:
    """simulations.report.train_baseline's pooled training (same init, loader seed, optimiser,
    curriculum and steps) with the PRS hidden from every batch: the train-time ablation."""
    dataset = PooledPretrainingDataset(list(datasets.values()))
    model, _ = train_baseline(setup, dataset, steps, fed, seed, None, False, keep=("ehr", "wearables"))
    return model


def oracle_result(
    cohort: Cohort, truth_dir: Path, disease: str, with_prs: bool, n_boot: int, seed: int
) -> MethodResult:
    """The true risk (with or without the hazard's PRS terms) on every cohort row: no fitting."""
    out = MethodResult()
    data, rows = cohort.data, cohort.rows
    site = data.site[rows]
    sid = data.column("subject_id")[rows]
    pt = data.column("prediction_time_us")[rows].astype("datetime64[us]")
    risk_of = functools.partial(oracle_risk, truth_dir, with_prs=with_prs)
    for key in cohort.tasks:
        task = data.tasks[key]
        assert isinstance(task, OnsetTask)
        y_all = data.labels(key)[rows]
        risk = np.full(len(rows), np.nan)
        for name in np.unique(site):
            at = site == name
            risk[at] = risk_of(str(name), disease, sid[at], pt[at], task.horizon_days)
        have = np.isfinite(y_all) & np.isfinite(risk)
        out.predictions[key] = (y_all[have].astype(bool), risk[have])
        out.scored_rows[key] = rows[have]
    return out


def cross_fitted_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> float:
    """Out-of-fold R^2 of a ridge (alpha 1 on standardised features) predicting y; folds by subject."""
    folds = subject_folds(groups, np.zeros(len(y), dtype=bool), n_folds, seed)
    pred = np.empty(len(y))
    for f in range(n_folds):
        test, train = folds == f, folds != f
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        w, b = fit_ridge((x[train] - mu) / sd, y[train], alpha=1.0)
        pred[test] = ((x[test] - mu) / sd) @ w + b
    return float(1.0 - np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))


@torch.no_grad()
def encoder_output(model: HealthFM, prs: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """The genomics encoder's conditioning vector for each row's PRS vector (None: no encoder)."""
    enc = model.genomics_encoder
    if enc is None:
        return None
    was = model.training
    model.eval()
    p = torch.as_tensor(prs, dtype=torch.float32)
    v = torch.as_tensor(valid, dtype=torch.bool)
    cond, _ = enc(p, v, v.any(dim=1))
    model.train(was)
    return cond.numpy().astype(np.float64)


@dataclass
class UnitModels:
    """What a unit of the evidence job has trained and evaluates, as the diagnosis reads it."""

    per_site_data: Mapping[str, EvalSet]
    sites: Mapping[str, Any]
    sc: ScenarioConfig
    truth_dir: Path
    setup: Any
    fed_model: HealthFM
    regimes: Regimes  # the pooled model and its budget


def run_diagnosis(
    cfg: DictConfig,
    scenario: str,
    seed: int,
    unit: UnitModels,
    ev_out: Evidence,
    view: Callable[[HealthFM], Any] = lambda m: m,
) -> None:
    """The diagnosis's comparisons and R^2 into ev_out (module docstring); `view`: what the
    probes read of a model (the job's probe_view)."""
    per_site_data, sites, sc, truth_dir = unit.per_site_data, unit.sites, unit.sc, unit.truth_dir
    setup, fed_model, regimes = unit.setup, unit.fed_model, unit.regimes
    g = cfg.genomics_diagnosis
    disease = str(g.disease)
    code_to_disease = {d.code: name for name, d in sc.diseases.items()}
    cohort = genomics_cohort(per_site_data, sites, code_to_disease, disease)
    if cohort is None or len(cohort.rows) == 0:
        ev_out.notes[scenario].append(f"seed {seed}: genomics diagnosis: no site has genomics and {disease} onset")
        return
    fed = cfg.federation
    kw = {"max_events": fed.max_events, "max_patches": fed.max_patches, "batch_size": cfg.eval.batch_size}
    data, rows = cohort.data, cohort.rows
    vocab_size = setup.vocabulary.vocab_size
    n_traits = setup.vocabulary.n_prs_traits
    feats: dict[str, MethodFeatures] = {}
    tab = method_features(data, TabularFeaturizer(vocab_size), rows=rows, keep=WITH, **kw)
    feats["tabular"] = tab
    feats["tabular without PRS"] = MethodFeatures(tab.x[:, : tab.x.shape[1] - 2 * n_traits], tab.present, tab.rows)
    prs_cols = tab.x[:, tab.x.shape[1] - 2 * n_traits :]
    feats["federated[ehr+genomics]"] = method_features(data, view(fed_model), rows=rows, keep=WITH, **kw)
    feats["federated[ehr]"] = method_features(data, view(fed_model), rows=rows, keep=WITHOUT, **kw)
    fe = feats["federated[ehr]"]
    feats["federated[ehr] + PRS in probe"] = MethodFeatures(np.hstack([fe.x, prs_cols]), fe.present, fe.rows)
    feats["pooled[ehr+genomics]"] = method_features(data, view(regimes.central_model), rows=rows, keep=WITH, **kw)
    if bool(g.train_without):
        blind = train_without_genomics(setup, regimes.datasets, regimes.central_steps, fed, seed)
        feats["pooled trained without genomics[ehr+genomics]"] = method_features(
            data, view(blind), rows=rows, keep=WITH, **kw
        )
    n_boot = int(cfg.eval.n_boot_per_run)
    results: dict[str, MethodResult] = {
        m: evaluate_cross_fitted(
            m,
            data,
            f,
            tasks=cohort.tasks,
            n_folds=int(g.n_folds),
            n_boot=n_boot,
            seed=seed,
            min_positives=int(g.min_positives),
        )
        for m, f in feats.items()
    }
    results["oracle"] = oracle_result(cohort, truth_dir, disease, True, n_boot, seed)
    results["oracle without PRS"] = oracle_result(cohort, truth_dir, disease, False, n_boot, seed)
    pairs = [
        ("world: oracle - oracle without PRS", "oracle", "oracle without PRS"),
        ("tabular: with - without PRS", "tabular", "tabular without PRS"),
        ("federated, test time: ehr+genomics - ehr", "federated[ehr+genomics]", "federated[ehr]"),
        ("federated: ehr + raw PRS in probe - ehr", "federated[ehr] + PRS in probe", "federated[ehr]"),
        (
            "pooled, train time: with - without genomics",
            "pooled[ehr+genomics]",
            "pooled trained without genomics[ehr+genomics]",
        ),
        ("federated ehr+genomics - tabular", "federated[ehr+genomics]", "tabular"),
    ]
    for name, a, b in pairs:
        if a in results and b in results:
            # Only tasks both scored and the oracle scored: every comparison on the same rows.
            tasks = [k for k in cohort.tasks if k in results[a].scored_rows and k in results[b].scored_rows]
            ev_out.add(scenario, f"{KEY}|{name}", a, b, seed, paired_items(data, results[a], results[b], tasks))
    # The encoder: is the PRS itself still readable where the probe reads?
    subjects = data.subject_keys()[rows]
    try:
        t = setup.vocabulary.prs_traits.index(sc.diseases[disease].prs_trait)
    except ValueError:
        t = -1
    r2: dict[str, float] = {}
    if t >= 0:
        valid = prs_cols[:, n_traits:] > 0.5
        target = prs_cols[:, t]
        has = valid[:, t]
        d = int(fed_model.cfg.d_model)
        sources = {
            "genomics encoder output (federated)": encoder_output(fed_model, prs_cols[:, :n_traits], valid),
            # The probes' features lead with the query state (probe_poolings [query, ...]).
            "federated query state [ehr+genomics]": feats["federated[ehr+genomics]"].x[:, :d],
            "federated query state [ehr]": feats["federated[ehr]"].x[:, :d],
            "federated probe features [ehr+genomics]": feats["federated[ehr+genomics]"].x,
        }
        for name, x in sources.items():
            if x is not None and int(has.sum()) >= 3 * int(g.n_folds):
                r2[name] = cross_fitted_r2(x[has], target[has], subjects[has], int(g.n_folds), seed)
    counts = {
        k: {"rows": int(len(y)), "positives": int(np.sum(y))} for k, (y, _) in results["oracle"].predictions.items()
    }
    ev_out.diagnostics[scenario].setdefault(seed, {}).update(
        {
            "disease": disease,
            "sites": sorted({p.name for p in data.sites}),
            "rows": int(len(rows)),
            "subjects": int(len(np.unique(subjects))),
            "per_task": counts,
            "r2_prs": r2,
            "skipped": {m: dict(r.skipped) for m, r in results.items() if r.skipped},
        }
    )
    log.info("genomics diagnosis %s seed %d: %d rows, R^2 of PRS %s", scenario, seed, len(rows), r2)
