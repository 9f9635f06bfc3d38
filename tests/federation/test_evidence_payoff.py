"""The evidence job's issue-68 verdicts and recipes, by hand: q2 on each site's kept
(personalised) model, q4's DP recipe at the same samples seen and its size curve, and g against the
world's own gain. The stages themselves run in the quick job (tests/federation/test_evidence.py)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.paired_comparison import Comparison
from healthfm_core.eval.probes import fit_logistic_probe
from healthfm_core.eval.runner import MethodFeatures, evaluate_method_splits
from simulations.common import onset_eval_data
from simulations.evidence import genomics_verdict
from simulations.evidence_dp import plan, size_verdict
from simulations.evidence_personal import q2_verdict
from simulations.pretrain import agree_vocabulary
from simulations.privacy_sweep import dp_recipe_config
from simulations.synthetic import generate_federation

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("evidence", overrides=["preset=full", *overrides])


def comp(a: str, b: str, diff: float, ci: tuple[float, float]) -> Comparison:
    return Comparison(a=a, b=b, n_items=40, n_rows=4000, n_subjects=300, mean_a=0.7 + diff, mean_b=0.7,
                      difference=diff, difference_ci=ci, ratio=1 + diff / 0.7,
                      ratio_ci=(1 + ci[0] / 0.7, 1 + ci[1] / 0.7), fraction_at_or_below_zero=0.5)  # fmt: skip


def test_q2_judges_the_model_each_site_keeps_and_names_a_federated_model_below() -> None:
    comps = {
        "q2|city_hospital": comp("federated", "local-only", -0.025, (-0.044, -0.005)),
        "q2|biobank": comp("federated", "local-only", 0.01, (-0.02, 0.04)),
        "q2|city_hospital, personalised": comp("personalised", "local-only", 0.004, (-0.015, 0.022)),
        "q2|biobank, personalised": comp("personalised", "local-only", 0.012, (-0.018, 0.041)),
        "q2|city_hospital, pooled": comp("pooled", "local-only", -0.03, (-0.05, -0.01)),  # a diagnosis, not judged
    }
    v = q2_verdict(comps)
    assert v.met is True and "personalised: 2 sites, none clearly below" in v.detail
    assert "the federated model as it comes: clearly below at city_hospital" in v.detail
    comps["q2|biobank, personalised"] = comp("personalised", "local-only", -0.03, (-0.05, -0.004))
    v = q2_verdict(comps)
    assert v.met is False and "clearly below at biobank" in v.detail
    # A site that kept its local-only model in every seed scores exactly 0: met, and said so.
    comps["q2|biobank, personalised"] = comp("personalised", "local-only", 0.0, (0.0, 0.0))
    v = q2_verdict(comps)
    assert v.met is True and "kept its local-only model in every seed (gains nothing by joining): biobank" in v.detail
    # A unit without the stage: the federated model is judged, as before issue 68.
    plain = {k: c for k, c in comps.items() if ", " not in k}
    v = q2_verdict(plain)
    assert v.met is False and v.detail.startswith("federated (no personalisation run): clearly below at city_hospital")
    assert q2_verdict({}).met is None


def test_q4_by_site_size_names_the_smallest_size_within_the_gap() -> None:
    cfg = _cfg()
    comps = {
        "q4|1000 subjects a site: eps=8 - no DP": comp("eps=8", "no DP", -0.05, (-0.09, -0.01)),
        "q4|4000 subjects a site: eps=8 - no DP": comp("eps=8", "no DP", -0.015, (-0.04, 0.01)),
        "q4|16000 subjects a site: eps=8 - no DP": comp("eps=8", "no DP", -0.004, (-0.02, 0.012)),
        "q4|1000 subjects a site: eps=1 - no DP": comp("eps=1", "no DP", -0.08, (-0.12, -0.04)),
    }
    v = size_verdict(cfg, comps)
    assert v.met is True and v.detail.endswith("met from 4,000 subjects a site")
    assert "1,000: -0.050 [-0.090, -0.010]" in v.detail
    far = {k: comp("eps=8", "no DP", -0.03, (-0.05, -0.01)) for k in comps if "eps=8" in k}
    v = size_verdict(cfg, far)
    assert v.met is False and "not met at any size measured (largest 16,000)" in v.detail
    assert size_verdict(cfg, {}).met is None


def test_the_size_curve_is_planned_in_its_unit_only_and_grows_with_the_sizes() -> None:
    cfg = _cfg()
    ((name, seconds),) = plan(cfg, "default", 1, "default seed 1")
    assert name == "default seed 1: DP by site size (1,000 / 4,000 / 16,000 subjects)"
    assert plan(cfg, "default", 0, "default seed 0") == [] and plan(cfg, "trajectories", 1, "x") == []
    small = plan(_cfg("dp_size_curve.sizes=[1000]"), "default", 1, "u")[0][1]
    assert 0 < small < seconds / 10


def test_the_dp_recipe_keeps_the_samples_a_site_sees_without_dp() -> None:
    cfg = _cfg()
    base = cast(DictConfig, OmegaConf.merge(cfg, {"federation": OmegaConf.to_container(cfg.privacy_budget.federation)}))
    private = dp_recipe_config(base, cfg.privacy_budget.dp_recipe)
    f, g = base.federation, private.federation
    assert (g.local_steps, g.batch_size) == (2, 320) and g.rounds == f.rounds
    assert g.rounds * g.local_steps * g.batch_size == f.rounds * f.local_steps * f.batch_size
    assert (
        private.privacy.train == "encoders"
        and private.privacy.max_grad_norm == cfg.privacy_budget.dp_recipe.max_grad_norm
    )
    assert dp_recipe_config(base, None) is base
    with pytest.raises(ValueError, match=r"dp_recipe.local_steps is 3: it must divide the 640 samples"):
        dp_recipe_config(base, OmegaConf.create({"local_steps": 3, "lr": 0.01, "max_grad_norm": 1.0}))


def test_g_is_met_where_the_world_holds_less_than_the_target_and_the_model_reaches_it() -> None:
    cfg = _cfg()
    world = comp("oracle", "oracle without PRS", 0.005, (0.001, 0.010))
    model = comp("ehr+genomics", "ehr", -0.005, (-0.026, 0.016))
    comps = {"g|world: oracle - oracle without PRS": world, "g|federated, test time: ehr+genomics - ehr": model}
    v = genomics_verdict(cfg, comps)
    assert v.met is True and "the world holds less than +0.02, so the target is its gain" in v.detail
    assert "the world's (oracle - oracle without PRS) +0.005 [+0.001, +0.010]" in v.detail
    comps["g|federated, test time: ehr+genomics - ehr"] = comp("ehr+genomics", "ehr", -0.03, (-0.05, -0.004))
    assert genomics_verdict(cfg, comps).met is False  # the model clearly below what the world holds
    comps["g|world: oracle - oracle without PRS"] = comp("oracle", "oracle without PRS", 0.03, (0.02, 0.04))
    comps["g|federated, test time: ehr+genomics - ehr"] = comp("ehr+genomics", "ehr", 0.021, (-0.001, 0.04))
    assert genomics_verdict(cfg, comps).met is False  # a world that holds more: +0.02 with the interval above 0


def test_the_job_fits_and_tunes_its_probes_on_every_labelled_row(tmp_path: Path) -> None:
    """Issue 68 (q6's suspected cause): the job's probes are fitted on every train row and tuned
    on every tuning row of a subject, as the held-out rows they are scored on are drawn; a cap of
    2 rows a subject (issue 42's) keeps fewer train rows and the same held-out rows."""
    cfg = _cfg("seed=0")  # a unit's seed (unit_config sets it)
    assert cfg.eval.n_per_subject == "all"
    fed = generate_federation(tmp_path / "fed", scenario="tiny", seed=0, n_subjects=30, progress=False)
    sites = {s.name: open_site(s.root) for s in fed.sites}
    vocab = agree_vocabulary(sites, 3)
    seqs = {n: SiteSequences.from_site(s, vocab) for n, s in sites.items()}
    every = onset_eval_data(cfg, sites, seqs)
    capped = onset_eval_data(cast(DictConfig, OmegaConf.merge(cfg, {"eval": {"n_per_subject": 2}})), sites, seqs)
    more_than_two = 0
    for name, data in every.items():
        split, subject = data.column("split"), data.subject_keys()
        split2, subject2 = capped[name].column("split"), capped[name].subject_keys()
        for key in data.tasks:
            have, have2 = np.isfinite(data.labels(key)), np.isfinite(capped[name].labels(key))
            for s in ("train", "tuning"):
                rows = np.unique(subject[have & (split == s)], return_counts=True)[1]
                rows2 = np.unique(subject2[have2 & (split2 == s)], return_counts=True)[1]
                assert rows2.max(initial=0) <= 2 and rows.sum() >= rows2.sum()
                more_than_two += int((rows > 2).sum())
            assert (have & (split == "held_out")).sum() == (have2 & (split2 == "held_out")).sum()
    assert more_than_two > 0  # the world gives subjects more rows than the old cap kept
    # The probe reads every train row (C on every tuning row): the job's held-out scores are a
    # probe fitted on all of them, by reference.
    name, data = max(every.items(), key=lambda kv: len(kv[1]))
    x = np.random.default_rng(0).normal(size=(len(data), 6))
    feats = MethodFeatures(x, np.ones((len(data), 3), bool), np.arange(len(data)))
    res = evaluate_method_splits("m", data, feats, ("held_out",), n_boot={"held_out": 1})["held_out"]
    assert res.predictions
    split = data.column("split")
    for key, (_, p) in res.predictions.items():
        y = data.labels(key)
        tr, tu = [np.isfinite(y) & (split == s) for s in ("train", "tuning")]
        ref = fit_logistic_probe(x[tr], y[tr].astype(bool), x[tu], y[tu].astype(bool))
        np.testing.assert_allclose(p, ref.predict_proba(x[res.scored_rows[key]]), rtol=1e-10)
