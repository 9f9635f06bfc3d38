"""Wrist-worn device epochs (30 s): ENMO with a circadian pattern and heart rate.

A subject with wearables wears the device for `wear_periods` periods of `wear_days` days
(UK Biobank style), starting at midnight. In each period the awake activity level and the
resting heart rate follow the latent state at that time (fitness, metabolic, regularity of the
sleep rhythm) and shift while a disease is subclinical (full effect) or diagnosed (half): the
subclinical phase precedes the diagnosis by months, so wear periods before an onset differ.
Arrays are float32 over [periods, epochs]; a chunk of subjects at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from healthfm_core.data.files.layout import EPOCH_SECONDS, WEARABLES_SCHEMA
from simulations.synthetic.cohort import US_PER_DAY, Cohort
from simulations.synthetic.ehr import FIT, MET, REG
from simulations.synthetic.scenario import ScenarioConfig, SiteSpec

EPOCHS_PER_DAY = 86_400 // EPOCH_SECONDS
MAX_ENMO_MG = 2000.0
EPOCHS_PER_CHUNK = 2_000_000  # ~40 MB of float32 work arrays per chunk


def wear_periods(cohort: Cohort, site: SiteSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(subject index, start day) of every wear period, sorted by subject then time.

    Periods are stratified over the subject's observed time (enrolment to death or end of
    follow-up) so they never overlap; a subject with too little time gets fewer or none.
    """
    idx = np.nonzero(cohort.has_wearables)[0]
    first = np.ceil(cohort.first_visit[idx])
    stop = np.floor(np.minimum(cohort.death[idx], cohort.end_days)) - site.wear_days
    span = (stop - first) / site.wear_periods
    subj, start = [], []
    for j in range(site.wear_periods):
        seg0 = first + j * span
        room = span - site.wear_days
        ok = room >= 0
        s = np.floor(seg0 + rng.random(len(idx)) * np.maximum(room, 0))
        subj.append(idx[ok])
        start.append(s[ok])
    subj_a = np.concatenate(subj)
    start_a = np.concatenate(start).astype(np.int64)
    order = np.lexsort((start_a, subj_a))
    return subj_a[order], start_a[order]


def _period_parameters(
    cohort: Cohort,
    scenario: ScenarioConfig,
    subj: np.ndarray,
    start: np.ndarray,
    wear_days: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Per period: awake activity (mg), resting HR (bpm), sleep onset/duration spread."""
    mid = start + wear_days / 2.0
    x = cohort.latent[subj, cohort.step_of(mid)].astype(np.float64)
    t = mid[:, None]
    sub = (cohort.subclinical[subj] <= t) & (cohort.diagnosis[subj] > t)
    dx = cohort.diagnosis[subj] <= t
    effect = sub * 1.0 + dx * 0.5
    diseases = list(scenario.diseases.values())
    hr_shift = effect @ np.array([d.wear_hr_bpm for d in diseases])
    log_act = effect @ np.log(np.array([d.wear_activity_factor for d in diseases]))
    age_dec = (cohort.age_at(subj, mid) - 55.0) / 10.0
    # Per-subject traits (same in every period of the subject): drawn for all, indexed.
    n = cohort.n
    rhr_subject = rng.normal(0.0, 3.0, n)[subj]
    act_subject = rng.normal(0.0, 0.2, n)[subj]
    chronotype = rng.normal(0.0, 0.7, n)[subj]
    female = ~cohort.male[subj]
    return {
        "activity": 32.0
        * np.exp(0.22 * x[:, FIT] - 0.12 * x[:, MET] + 0.05 * x[:, REG] - 0.08 * age_dec + act_subject + log_act),
        "rhr": 62.0 - 3.5 * x[:, FIT] + 1.5 * x[:, MET] + 2.0 * female + rhr_subject + hr_shift,
        "onset": 23.0 + chronotype,
        "onset_sd": 0.35 * np.exp(-0.6 * x[:, REG]),
    }


def simulate_wearables(
    cohort: Cohort,
    scenario: ScenarioConfig,
    site: SiteSpec,
    subj: np.ndarray,
    start: np.ndarray,
    rng: np.random.Generator,
) -> Iterator[pa.Table]:
    """Tables of epochs (WEARABLES_SCHEMA) for the wear periods (subject index, start day) from
    `wear_periods`, one table per chunk of subjects, in subject-time order."""
    if len(subj) == 0:
        return
    days = site.wear_days
    n_ep = days * EPOCHS_PER_DAY
    params = _period_parameters(cohort, scenario, subj, start, days, rng)
    hour = (np.arange(EPOCHS_PER_DAY, dtype=np.float32) * (EPOCH_SECONDS / 3600.0))[None, None, :]
    profile = (1.0 + 0.35 * np.sin(2 * np.pi * (hour - 10.0) / 24.0)).astype(np.float32)
    epoch_us = np.arange(n_ep, dtype=np.int64) * (EPOCH_SECONDS * 1_000_000)

    # Chunks hold whole subjects (all their periods), so a subject is never split over files.
    bounds = np.nonzero(np.diff(subj))[0] + 1
    subject_starts = np.concatenate([[0], bounds])
    per_chunk = max(1, EPOCHS_PER_CHUNK // (n_ep * site.wear_periods))
    for c in range(0, len(subject_starts), per_chunk):
        lo = subject_starts[c]
        hi = subject_starts[c + per_chunk] if c + per_chunk < len(subject_starts) else len(subj)
        p = hi - lo
        sl = slice(lo, hi)
        # Sleep window per day: onset hour varies day to day more when the rhythm is irregular.
        onset = (params["onset"][sl, None] + params["onset_sd"][sl, None] * rng.standard_normal((p, days))).astype(
            np.float32
        )
        duration = (7.5 + 0.5 * rng.standard_normal((p, days))).astype(np.float32)
        asleep = np.mod(hour - onset[:, :, None], 24.0) < duration[:, :, None]  # [p, days, epochs/day]
        act = params["activity"][sl].astype(np.float32)[:, None, None]
        base = np.where(asleep, np.float32(3.0), act * profile)
        sigma = np.where(asleep, np.float32(0.6), np.float32(0.9))
        z = rng.standard_normal(base.shape, dtype=np.float32)
        enmo = base * np.exp(sigma * z - 0.5 * sigma * sigma)
        # A noise floor (ENMO is often 0 at rest) and the accelerometer's range (+-8 g).
        enmo = np.clip(enmo - np.float32(1.5), np.float32(0.0), np.float32(MAX_ENMO_MG)).reshape(p, n_ep)
        if site.ppg:
            rhr = params["rhr"][sl].astype(np.float32)[:, None]
            asleep_f = asleep.reshape(p, n_ep)
            hr = rhr + np.where(
                asleep_f, np.float32(-4.0), np.float32(6.0) + np.float32(0.12) * np.minimum(enmo, np.float32(400.0))
            )
            hr += np.float32(2.5) * rng.standard_normal(hr.shape, dtype=np.float32)
            hr_col = pa.array(np.clip(np.round(hr), 30.0, 220.0).astype(np.float32).ravel())
        else:
            hr_col = pa.nulls(p * n_ep, pa.float32())
        times = cohort.start_us + start[sl, None] * US_PER_DAY + epoch_us[None, :]
        yield pa.table(
            {
                "subject_id": pa.array(np.repeat(cohort.subject_id[subj[sl]], n_ep)),
                "time": pa.array(times.ravel(), pa.timestamp("us")),
                "enmo_mg": pa.array(np.round(enmo, 2).astype(np.float32).ravel()),
                "hr_bpm": hr_col,
            },
            schema=WEARABLES_SCHEMA,
        )


def wear_period_table(cohort: Cohort, subj: np.ndarray, start: np.ndarray, wear_days: int) -> pa.Table:
    return pa.table(
        {
            "subject_id": pa.array(cohort.subject_id[subj], pa.int64()),
            "start": pa.array(cohort.start_us + start * US_PER_DAY, pa.timestamp("us")),
            "end": pa.array(cohort.start_us + (start + wear_days) * US_PER_DAY, pa.timestamp("us")),
        }
    )
