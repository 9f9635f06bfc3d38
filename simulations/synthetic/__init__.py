"""Synthetic multi-site cohorts with EHR (MEDS), wearables and PRS, carrying known signal.

    python -m simulations.synthetic OUT_DIR [--scenario NAME] [--seed N] [--n-subjects N]
        [--sites A,B] [--batch-subjects N]
    generate_federation(out_dir, scenario="default", seed=0, n_subjects=None, sites=None,
                        batch_subjects=2000) -> FederationManifest

Subjects are simulated and written a batch at a time (generate.generate_site), so a site of any
size is generated in the memory of one batch.

The generative model (parameters in the scenario config, configs/scenario/<name>.yaml):

- Each subject has a latent health state of three Ornstein-Uhlenbeck dimensions on a monthly
  grid: metabolic (higher = worse), fitness and regularity (higher = better). Their means drift
  with age and load on the PRS; a persistent subject effect adds heterogeneity.
- Onsets of T2D (ICD10//E11), CAD (ICD10//I25), hypertension (ICD10//I10) and COPD (ICD10//J44)
  come from a log-linear hazard in the matching PRS, the latent state, age, sex, smoking and
  comorbid disease. The hazard produces a subclinical onset; the diagnosis follows after a
  Gamma(2) lag (the prodrome) and is coded at its own visit, then recurs at later visits.
  Medications start at or after the diagnosis; labs/vitals (HbA1c, glucose, LDL, blood
  pressure, BMI, heart rate, FEV1/FVC) follow the latent state, disease and treatment.
  Visits are Poisson with a rate rising with the number of diagnoses; deaths end the record.
- Wearables (30 s epochs of ENMO in mg and heart rate) for a fraction of subjects in wear periods;
  activity and resting heart rate follow the latent state and shift during the prodrome, so they
  change months before the diagnosis. hr_bpm is null at sites whose devices have no PPG.
- PRS z-scores (PRS//<trait>, static rows) for a fraction of subjects, standardised per site.

Output:

    OUT_DIR/manifest.json               FederationManifest (JSON)
    OUT_DIR/sites/<site>/               a site root as docs/architecture.md lays it out (data/, metadata/, wearables/)
    OUT_DIR/truth/scenario.json         the resolved ScenarioConfig
    OUT_DIR/truth/<site>/subjects.parquet
        subject_id int64, birth_time timestamp[us], age_at_start float32, male, smoker,
        has_genomics, has_wearables bool, death_time timestamp[us] (null: alive at end),
        prs_<trait> float32 (true score, also for subjects not genotyped at the site),
        <dim>_baseline, <dim>_mean, <dim>_slope_per_year float32 for dim in metabolic, fitness, regularity
    OUT_DIR/truth/<site>/onsets.parquet       one row per subject x disease
        subject_id int64, disease string (T2D, CAD, HTN, COPD), code string (ICD10//E11, ...),
        prevalent bool (present at the start of follow-up), subclinical_time timestamp[us]
        (null: prevalent or none), diagnosis_time timestamp[us] (time of the first diagnosis
        code in data/; null: not diagnosed within follow-up while alive)
    OUT_DIR/truth/<site>/latent.parquet       one row per subject x grid step (monthly)
        subject_id int64, time timestamp[us] (step start), metabolic, fitness, regularity float32,
        hazard_<disease> float32 (onset hazard per year, constant over the step)
    OUT_DIR/truth/<site>/risk.parquet         one row per subject x prediction time (every
        truth_every_days while alive)
        subject_id int64, prediction_time timestamp[us], at_risk_<disease> bool (not yet
        diagnosed), risk_<disease>_<H>d float32 for H in horizons_days (null when not at risk):
        P(first diagnosis code in (t, t+H]) from the hazard model along the realised latent path
        (see truth.onset_risk); compare with labels of new-onset tasks for an oracle AUROC.
        truth.oracle_risk(truth_dir, site, disease, subject_ids, prediction_times, horizon_days)
        gives the same risk at any prediction time.
    OUT_DIR/truth/<site>/wear_periods.parquet
        subject_id int64, start timestamp[us], end timestamp[us] (exclusive)
"""

from simulations.synthetic.generate import (
    FederationManifest,
    SiteManifest,
    generate_federation,
    generate_site,
    synthetic_sites,
)
from simulations.synthetic.scenario import (
    DiseaseSpec,
    LatentSpec,
    ScenarioConfig,
    SiteSpec,
    load_scenario,
)
from simulations.synthetic.truth import onset_risk, oracle_risk

__all__ = [
    "synthetic_sites",
    "DiseaseSpec",
    "FederationManifest",
    "LatentSpec",
    "ScenarioConfig",
    "SiteManifest",
    "SiteSpec",
    "generate_federation",
    "generate_site",
    "load_scenario",
    "onset_risk",
    "oracle_risk",
]
