"""The latent health state, disease onsets and deaths of one site's subjects, vectorised.

Times here are float days from the site's follow-up start (t0, midnight of its start date).
One Python loop runs over the grid steps (monthly: ~70 steps); everything inside is numpy over
subjects. Infinite times mean "never within follow-up"; -inf subclinical time means the disease
was already present at t0 (prevalent).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

from simulations.synthetic.scenario import LATENT_DIMS, ScenarioConfig, SiteSpec

DAYS_PER_YEAR = 365.25
MINUTES_PER_DAY = 1440.0
US_PER_DAY = 86_400_000_000


def _to_minute(days: np.ndarray) -> np.ndarray:
    """Event times are recorded to the minute (keeps +-inf as is)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(days), np.round(days * MINUTES_PER_DAY) / MINUTES_PER_DAY, days)


def site_start_date(scenario: ScenarioConfig, site: SiteSpec) -> _dt.date:
    year = scenario.start_date.year + site.date_offset_years
    try:
        return scenario.start_date.replace(year=year)
    except ValueError:  # 29 February in a non-leap target year
        return scenario.start_date.replace(year=year, day=28)


@dataclass
class Cohort:
    """One site's simulated subjects (arrays over subjects, in subject_id order)."""

    subject_id: np.ndarray  # [n] int64
    start_us: int  # t0 as microseconds since the Unix epoch
    step_days: float
    n_steps: int  # the latent grid: steps k = 0..n_steps-1 start at k * step_days
    end_days: float  # end of follow-up
    age0: np.ndarray  # [n] years at t0
    birth_days: np.ndarray  # [n] days (negative)
    male: np.ndarray  # [n] bool
    smoker: np.ndarray  # [n] bool
    prs: np.ndarray  # [n, n_traits] float32, standardised over the site's subjects
    has_genomics: np.ndarray  # [n] bool
    has_wearables: np.ndarray  # [n] bool
    latent: np.ndarray  # [n, n_steps, 3] float32, value at each step start (LATENT_DIMS order)
    hazard: np.ndarray  # [n, n_steps, n_diseases] float32, onset hazard per year during each step
    subclinical: np.ndarray  # [n, n_diseases] days (-inf prevalent, inf none)
    diagnosis: np.ndarray  # [n, n_diseases] days of the first diagnosis code (inf: none observed)
    death: np.ndarray  # [n] days (inf: alive at end of follow-up)
    first_visit: np.ndarray  # [n] days of the enrolment visit

    @property
    def n(self) -> int:
        return int(self.subject_id.shape[0])

    def step_of(self, days: np.ndarray) -> np.ndarray:
        """Index of the grid step holding each time (clipped to the grid)."""
        return np.clip((np.asarray(days) // self.step_days).astype(np.int64), 0, self.n_steps - 1)

    def age_at(self, idx: np.ndarray, days: np.ndarray) -> np.ndarray:
        return self.age0[idx] + np.asarray(days) / DAYS_PER_YEAR


def simulate_cohort(scenario: ScenarioConfig, site: SiteSpec, site_index: int, rng: np.random.Generator) -> Cohort:
    n = site.n_subjects
    diseases = list(scenario.diseases.values())
    names = list(scenario.diseases)
    traits = scenario.prs_traits
    n_dis, n_lat = len(diseases), len(LATENT_DIMS)
    step = scenario.step_days
    end_days = scenario.follow_up_years * DAYS_PER_YEAR
    n_steps = int(np.ceil(end_days / step))
    dt_years = step / DAYS_PER_YEAR

    start = site_start_date(scenario, site)
    start_us = (start - _dt.date(1970, 1, 1)).days * US_PER_DAY
    id_start = site.subject_id_start if site.subject_id_start is not None else 1_000_000 * (site_index + 1)
    subject_id = np.arange(id_start, id_start + n, dtype=np.int64)

    # Baseline characteristics.
    a = site.age
    age0 = np.clip(rng.normal(a.mean, a.sd, n), a.min, a.max)
    birth_days = _to_minute(-age0 * DAYS_PER_YEAR)
    male = rng.random(n) < 0.5
    smoker = rng.random(n) < scenario.smoker_fraction
    prs_raw = rng.standard_normal((n, len(traits)))
    prs = (
        ((prs_raw - prs_raw.mean(0)) / np.maximum(prs_raw.std(0), 1e-9)).astype(np.float32)
        if n > 1
        else prs_raw.astype(np.float32)
    )
    has_genomics = rng.random(n) < site.fraction("genomics")
    has_wearables = rng.random(n) < site.fraction("wearables")

    # Latent OU: mean(t) = age slope + PRS loadings + persistent subject effect; stationary sd 1.
    lat_specs = [scenario.latent[d] for d in LATENT_DIMS]
    theta = np.array([s.theta_per_year for s in lat_specs])
    age_slope = np.array([s.age_per_decade for s in lat_specs])
    prs_load = np.array([[s.prs.get(t, 0.0) for t in traits] for s in lat_specs])  # [3, traits]
    subject_effect = rng.standard_normal((n, n_lat)) * np.array([s.between_subject_sd for s in lat_specs])
    static_mean = prs.astype(np.float64) @ prs_load.T + subject_effect  # [n, 3]
    decay = np.exp(-theta * dt_years)
    innov_sd = np.sqrt(1.0 - decay**2)

    # Hazard coefficients as arrays over diseases.
    mult = site.prevalence_multiplier
    log_base = np.log(np.array([d.base_rate_per_year * mult for d in diseases]))
    trait_idx = np.array([traits.index(d.prs_trait) for d in diseases])
    beta_prs = np.array([d.beta_prs for d in diseases])
    beta_lat = np.array([[d.beta_latent.get(dim, 0.0) for dim in LATENT_DIMS] for d in diseases])  # [D, 3]
    beta_age = np.array([d.beta_age for d in diseases])
    beta_static = (
        np.array([d.beta_male for d in diseases])[None] * male[:, None]
        + np.array([d.beta_smoker for d in diseases])[None] * smoker[:, None]
    )
    beta_comorb = np.array([[d.beta_comorbidity.get(o, 0.0) for d in diseases] for o in names])  # [from, to]
    lag_scale = np.array([d.lag_days / 2.0 for d in diseases])
    static_log_h = log_base[None] + beta_prs[None] * prs[:, trait_idx] + beta_static  # [n, D]
    # Trajectory and PRS-by-state terms (DiseaseSpec.beta_latent_change / beta_prs_latent):
    # skipped entirely when no disease has them, so other scenarios draw the same numbers.
    nonlinear = any(d.nonlinear for d in diseases)
    beta_change = np.array([[d.beta_latent_change.get(dim, 0.0) for dim in LATENT_DIMS] for d in diseases])
    beta_prs_lat = np.array([[d.beta_prs_latent.get(dim, 0.0) for dim in LATENT_DIMS] for d in diseases])
    change_steps = max(1, int(round(scenario.change_window_days / step)))
    de = scenario.death
    death_lat = np.array([de.beta_latent.get(dim, 0.0) for dim in LATENT_DIMS])

    latent = np.empty((n, n_steps, n_lat), dtype=np.float32)
    hazard = np.empty((n, n_steps, n_dis), dtype=np.float32)
    subclinical = np.full((n, n_dis), np.inf)
    death = np.full(n, np.inf)
    x = np.zeros((n, n_lat))
    for k in range(n_steps):
        g = k * step
        age_dec = (age0 + g / DAYS_PER_YEAR - 55.0)[:, None] / 10.0
        mu = static_mean + age_dec * age_slope[None]
        eps = rng.standard_normal((n, n_lat))
        x = mu + eps if k == 0 else mu + (x - mu) * decay + innov_sd * eps
        latent[:, k] = x
        present = subclinical <= g
        log_h = static_log_h + x @ beta_lat.T + age_dec * beta_age[None] + present.astype(np.float64) @ beta_comorb
        if nonlinear:
            # Before a full window of follow-up the change is measured from the first step.
            change = x - latent[:, max(k - change_steps, 0)].astype(np.float64)
            log_h = log_h + change @ beta_change.T + prs[:, trait_idx] * (x @ beta_prs_lat.T)
        h = np.exp(log_h)
        hazard[:, k] = h
        if k == 0:
            # Prevalent at t0: hazard accumulated over the years before follow-up.
            p0 = 1.0 - np.exp(-h * np.array([d.baseline_prevalence_years for d in diseases])[None])
            subclinical[rng.random((n, n_dis)) < p0] = -np.inf
            present = subclinical <= g
        alive = death > g
        # Exact sampling under a hazard constant over the step (truncated exponential offset).
        p = 1.0 - np.exp(-h * dt_years)
        u = rng.random((n, n_dis))
        new = (u < p) & ~present & alive[:, None]
        offset = -np.log1p(-rng.random((n, n_dis)) * p) / (h / DAYS_PER_YEAR)
        subclinical = np.where(new, g + np.minimum(offset, step), subclinical)
        log_d = (
            np.log(de.base_rate_per_year)
            + de.beta_age * age_dec[:, 0]
            + x @ death_lat
            + de.beta_per_diagnosis * present.sum(1)
            + de.beta_smoker * smoker
        )
        hd = np.exp(log_d)
        pd = 1.0 - np.exp(-hd * dt_years)
        dies = (rng.random(n) < pd) & alive
        d_off = -np.log1p(-rng.random(n) * pd) / (hd / DAYS_PER_YEAR)
        death = np.where(dies, g + np.minimum(d_off, step), death)
    death = _to_minute(np.where(death < end_days, death, np.inf))

    first_visit = _to_minute(rng.uniform(0.0, min(30.0, end_days / 4), n))
    first_visit = np.minimum(first_visit, np.where(np.isfinite(death), death, np.inf))
    lag = rng.gamma(2.0, lag_scale[None].repeat(n, 0))
    diagnosis = _to_minute(subclinical + lag)
    diagnosis = np.where(np.isneginf(subclinical), first_visit[:, None], diagnosis)
    diagnosis = np.maximum(diagnosis, first_visit[:, None])  # nothing is recorded before enrolment
    observed = diagnosis < np.minimum(death, end_days)[:, None]
    diagnosis = np.where(observed, diagnosis, np.inf)

    return Cohort(
        subject_id=subject_id,
        start_us=int(start_us),
        step_days=step,
        n_steps=n_steps,
        end_days=end_days,
        age0=age0,
        birth_days=birth_days,
        male=male,
        smoker=smoker,
        prs=prs,
        has_genomics=has_genomics,
        has_wearables=has_wearables,
        latent=latent,
        hazard=hazard,
        subclinical=subclinical,
        diagnosis=diagnosis,
        death=death,
        first_visit=first_visit,
    )


def disease_presence(cohort: Cohort, idx: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subclinical-or-diagnosed, diagnosed) flags [len(idx), n_diseases] at the given times."""
    t = np.asarray(days)[:, None]
    return cohort.subclinical[idx] <= t, cohort.diagnosis[idx] <= t
