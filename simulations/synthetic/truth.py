"""Ground truth of a simulated site: what the generator knows and no pipeline may read.

The true risk of a new diagnosis of disease d within a horizon H after a prediction time t is
computed from the hazard model along the subject's realised latent path (piecewise constant
per grid step, stored in latent.parquet), and the prodrome lag L ~ Gamma(2, lag_days / 2):

  diagnosed at or before t          -> not at risk (NaN; new-onset tasks exclude the subject)
  subclinical onset S <= t < D      -> P(L <= t+H-S | L > t-S)
  otherwise                         -> integral_t^{t+H} h(s) exp(-int_t^s h) G(t+H-s) ds

with G the lag's CDF. Death is not treated as a competing risk (the risk is that of the
diagnosis had the subject lived; deaths are rare within a horizon).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthfm_core.strict_files import read_json
from simulations.synthetic.cohort import DAYS_PER_YEAR, US_PER_DAY, Cohort
from simulations.synthetic.scenario import LATENT_DIMS, ScenarioConfig

SUBSTEP_DAYS = 2.5  # quadrature resolution of the hazard integral (midpoint rule)


def lag_cdf(x: np.ndarray, lag_days: float) -> np.ndarray:
    """CDF of Gamma(shape 2, scale lag_days / 2) at x days (0 for x <= 0)."""
    z = np.maximum(np.asarray(x, dtype=np.float64), 0.0) / (lag_days / 2.0)
    return 1.0 - np.exp(-z) * (1.0 + z)


def onset_risk(
    hazard_per_year: np.ndarray,
    step_days: float,
    subclinical: np.ndarray,
    diagnosis: np.ndarray,
    lag_days: float,
    prediction_days: np.ndarray,
    horizon_days: float | Sequence[float],
) -> np.ndarray:
    """True risk of a first diagnosis within (t, t + horizon] for each query row.

    hazard_per_year [q, n_steps] is each query subject's hazard on the grid (step k covers
    [k, k+1) * step_days; beyond the grid the last step's hazard holds); subclinical, diagnosis
    [q] are days (-inf / inf allowed); prediction_days [q]. NaN where diagnosed at or before t.
    Returns [q] for one horizon, [q, len(horizons)] for a sequence of horizons.
    """
    horizons = np.atleast_1d(np.asarray(horizon_days, dtype=np.float64))
    hz = np.asarray(hazard_per_year, dtype=np.float64) / DAYS_PER_YEAR
    t = np.asarray(prediction_days, dtype=np.float64)
    s_on = np.asarray(subclinical, dtype=np.float64)
    d = np.asarray(diagnosis, dtype=np.float64)
    n_steps = hz.shape[1]
    healthy = np.zeros((len(t), len(horizons)))
    # Horizons whose midpoint grids coincide (same substep) share one hazard path: the longest.
    n_subs = np.maximum(4, np.ceil(horizons / SUBSTEP_DAYS)).astype(np.int64)
    substeps = np.round(horizons / n_subs, 9)
    for ds in np.unique(substeps):
        group = np.flatnonzero(substeps == ds)
        n_max = int(n_subs[group].max())
        mid = (np.arange(n_max) + 0.5) * ds
        k = np.clip(((t[:, None] + mid[None]) // step_days).astype(np.int64), 0, n_steps - 1)
        h = np.take_along_axis(hz, k, axis=1)
        cum = np.cumsum(h, axis=1) * ds - 0.5 * h * ds  # cumulative hazard from t to each midpoint
        density = h * np.exp(-cum) * ds  # P(subclinical onset in each substep)
        for j in group:
            n = int(n_subs[j])
            # t + H - s = H - mid does not depend on t: one lag-CDF vector for all queries.
            healthy[:, j] = density[:, :n] @ lag_cdf(horizons[j] - mid[:n], lag_days)
    with np.errstate(invalid="ignore"):
        since = (t - s_on)[:, None]
        g_now = lag_cdf(since, lag_days)
        prodrome = (lag_cdf(since + horizons[None], lag_days) - g_now) / np.maximum(1.0 - g_now, 1e-12)
    risk = np.where((s_on <= t)[:, None], prodrome, healthy)
    # Prevalent at t0 but not yet recorded (before the enrolment visit): recorded at enrolment.
    risk = np.where(np.isneginf(s_on)[:, None], (d[:, None] <= t[:, None] + horizons[None]).astype(np.float64), risk)
    risk = np.where((d <= t)[:, None], np.nan, risk)
    return risk[:, 0] if np.ndim(horizon_days) == 0 else risk


def _ts(cohort: Cohort, days: np.ndarray) -> pa.Array:
    """Days to timestamp[us], null where not finite."""
    days = np.asarray(days, dtype=np.float64)
    finite = np.isfinite(days)
    us = cohort.start_us + np.round(np.where(finite, days, 0.0) * US_PER_DAY).astype(np.int64)
    return pa.array(us, pa.timestamp("us"), mask=~finite)


def subjects_table(cohort: Cohort, scenario: ScenarioConfig) -> pa.Table:
    cols: dict[str, pa.Array | np.ndarray] = {
        "subject_id": cohort.subject_id,
        "birth_time": _ts(cohort, cohort.birth_days),
        "age_at_start": cohort.age0.astype(np.float32),
        "male": cohort.male,
        "smoker": cohort.smoker,
        "has_genomics": cohort.has_genomics,
        "has_wearables": cohort.has_wearables,
        "death_time": _ts(cohort, cohort.death),
    }
    for j, trait in enumerate(scenario.prs_traits):
        cols[f"prs_{trait}"] = cohort.prs[:, j]
    alive_steps = np.arange(cohort.n_steps)[None, :] * cohort.step_days < cohort.death[:, None]
    for j, dim in enumerate(LATENT_DIMS):
        x = cohort.latent[:, :, j]
        cols[f"{dim}_baseline"] = x[:, 0]
        cols[f"{dim}_mean"] = (np.where(alive_steps, x, 0).sum(1) / np.maximum(alive_steps.sum(1), 1)).astype(
            np.float32
        )
        cols[f"{dim}_slope_per_year"] = _slope(x, alive_steps, cohort.step_days).astype(np.float32)
    return pa.table(cols)


def _slope(x: np.ndarray, valid: np.ndarray, step_days: float) -> np.ndarray:
    """Least-squares slope per year of each row over its valid steps."""
    t = np.arange(x.shape[1]) * step_days / DAYS_PER_YEAR
    w = valid.astype(np.float64)
    nw = np.maximum(w.sum(1), 1)
    tm = (w * t).sum(1) / nw
    xm = (w * x).sum(1) / nw
    cov = (w * (t - tm[:, None]) * (x - xm[:, None])).sum(1)
    var = (w * (t - tm[:, None]) ** 2).sum(1)
    return np.where(var > 0, cov / np.maximum(var, 1e-12), 0.0)


def onsets_table(cohort: Cohort, scenario: ScenarioConfig) -> pa.Table:
    n, names = cohort.n, list(scenario.diseases)
    return pa.table(
        {
            "subject_id": np.repeat(cohort.subject_id, len(names)),
            "disease": pa.array(np.tile(np.array(names, dtype=object), n), pa.string()),
            "code": pa.array(
                np.tile(np.array([d.code for d in scenario.diseases.values()], dtype=object), n), pa.string()
            ),
            "prevalent": np.isneginf(cohort.subclinical).ravel(),
            "subclinical_time": _ts(cohort, cohort.subclinical.ravel()),
            "diagnosis_time": _ts(cohort, cohort.diagnosis.ravel()),
        }
    )


def latent_table(cohort: Cohort, scenario: ScenarioConfig) -> pa.Table:
    n, T = cohort.n, cohort.n_steps
    cols: dict[str, pa.Array | np.ndarray] = {
        "subject_id": np.repeat(cohort.subject_id, T),
        "time": _ts(cohort, np.tile(np.arange(T) * cohort.step_days, n)),
    }
    for j, dim in enumerate(LATENT_DIMS):
        cols[dim] = cohort.latent[:, :, j].ravel()
    for d, name in enumerate(scenario.diseases):
        cols[f"hazard_{name}"] = cohort.hazard[:, :, d].ravel()
    return pa.table(cols)


def risk_table(cohort: Cohort, scenario: ScenarioConfig) -> pa.Table:
    """True risk per (subject, prediction time) every truth_every_days while alive."""
    times = np.arange(scenario.truth_every_days, cohort.end_days, scenario.truth_every_days)
    subj = np.repeat(np.arange(cohort.n), len(times))
    t = np.tile(times, cohort.n)
    keep = t < cohort.death[subj]
    subj, t = subj[keep], t[keep]
    cols: dict[str, pa.Array | np.ndarray] = {"subject_id": cohort.subject_id[subj], "prediction_time": _ts(cohort, t)}
    for d, (name, spec) in enumerate(scenario.diseases.items()):
        cols[f"at_risk_{name}"] = ~(cohort.diagnosis[subj, d] <= t)
        risk = onset_risk(
            cohort.hazard[subj, :, d],
            cohort.step_days,
            cohort.subclinical[subj, d],
            cohort.diagnosis[subj, d],
            spec.lag_days,
            t,
            scenario.horizons_days,
        )
        for j, horizon in enumerate(scenario.horizons_days):
            r = risk[:, j]
            cols[f"risk_{name}_{horizon}d"] = pa.array(r.astype(np.float32), mask=np.isnan(r))
    return pa.table(cols)


def _prs_log_hazard(
    truth_dir: Path, site: str, scenario: ScenarioConfig, disease: str, subject_ids: np.ndarray, n_steps: int
) -> np.ndarray:
    """[n, n_steps] the PRS terms of the disease's log-hazard (cohort.simulate_cohort's
    beta_prs * PRS + PRS * beta_prs_latent . x(t)) for the sorted subject_ids of latent.parquet."""
    spec = scenario.diseases[disease]
    subj = pq.read_table(truth_dir / site / "subjects.parquet", columns=["subject_id", f"prs_{spec.prs_trait}"])
    sid = subj.column("subject_id").to_numpy()
    order = np.argsort(sid)
    at = order[np.searchsorted(sid[order], subject_ids)]
    prs = subj.column(f"prs_{spec.prs_trait}").to_numpy().astype(np.float64)[at]
    out = np.repeat((spec.beta_prs * prs)[:, None], n_steps, axis=1)
    dims = [d for d in LATENT_DIMS if spec.beta_prs_latent.get(d, 0.0) != 0.0]
    if dims:
        lat = pq.read_table(truth_dir / site / "latent.parquet", columns=dims)
        x = sum(spec.beta_prs_latent[d] * lat.column(d).to_numpy().astype(np.float64) for d in dims)
        out = out + prs[:, None] * np.asarray(x).reshape(len(subject_ids), n_steps)
    return out


def oracle_risk(
    truth_dir: str | Path,
    site: str,
    disease: str,
    subject_ids: np.ndarray,
    prediction_times: np.ndarray,
    horizon_days: float,
    with_prs: bool = True,
) -> np.ndarray:
    """True risk at arbitrary prediction times (timestamps, e.g. a LabelSchema's prediction_time).

    Reads truth/<site>/{latent,onsets}.parquet and truth/scenario.json; NaN where the subject
    was already diagnosed, and for unknown subjects. with_prs=False: the risk under the hazard
    with the disease's PRS terms taken out (beta_prs * PRS and PRS * beta_prs_latent . x(t)),
    everything else (the latent path, which PRS also shifts, and the onsets) unchanged: the
    genomics diagnosis's "oracle without PRS", whose gap to the oracle is what the direct PRS
    terms of the world can add to a model that already sees the state perfectly.
    """
    truth_dir = Path(truth_dir)
    scenario = ScenarioConfig.model_validate(read_json(truth_dir / "scenario.json"))
    if disease not in scenario.diseases:
        raise ValueError(f"disease {disease!r} is not in the scenario (known: {sorted(scenario.diseases)})")
    lat = pq.read_table(truth_dir / site / "latent.parquet", columns=["subject_id", "time", f"hazard_{disease}"])
    ons = pq.read_table(truth_dir / site / "onsets.parquet").filter(pc.field("disease") == disease)
    sid_all = lat.column("subject_id").to_numpy()
    uniq, first = np.unique(sid_all, return_index=True)
    n_steps = len(sid_all) // len(uniq)
    hazard = lat.column(f"hazard_{disease}").to_numpy().reshape(len(uniq), n_steps)
    if not with_prs:
        hazard = hazard * np.exp(-_prs_log_hazard(truth_dir, site, scenario, disease, uniq, n_steps))
    t0_us = lat.column("time").cast(pa.int64()).to_numpy()[first]  # each subject's grid start
    ons_sid = ons.column("subject_id").to_numpy()
    pos = np.searchsorted(uniq, ons_sid)

    def days(col: str) -> np.ndarray:
        us = ons.column(col).cast(pa.int64()).to_numpy(zero_copy_only=False)
        valid = ons.column(col).is_valid().to_numpy(zero_copy_only=False)
        out = np.where(valid, (np.nan_to_num(us.astype(np.float64)) - t0_us[pos]) / US_PER_DAY, np.inf)
        return out

    sub = np.full(len(uniq), np.inf)
    dia = np.full(len(uniq), np.inf)
    sub[pos] = np.where(ons.column("prevalent").to_numpy(zero_copy_only=False), -np.inf, days("subclinical_time"))
    dia[pos] = days("diagnosis_time")
    sids = np.asarray(subject_ids, dtype=np.int64)
    idx = np.clip(np.searchsorted(uniq, sids), 0, len(uniq) - 1)
    known = uniq[idx] == sids
    pt_us = np.asarray(prediction_times).astype("datetime64[us]").astype(np.int64)
    t = (pt_us - t0_us[idx]) / US_PER_DAY
    spec = scenario.diseases[disease]
    risk = onset_risk(hazard[idx], scenario.step_days, sub[idx], dia[idx], spec.lag_days, t, horizon_days)
    return np.where(known, risk, np.nan)
