"""EHR events (MEDS rows) of a simulated cohort: visits, diagnoses, medications, labs, deaths.

Visits arrive as a Poisson process per grid step whose rate rises with morbidity; a diagnosis
brings its own visit. After the first diagnosis the code recurs at later visits; medications
start at or after the diagnosis and recur; labs carry values driven by the latent state, the
disease and its treatment. Everything is built as columns over all visits at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthfm_core.data.files.layout import PRS_PREFIX
from simulations.synthetic.cohort import DAYS_PER_YEAR, US_PER_DAY, Cohort, _to_minute, disease_presence
from simulations.synthetic.scenario import LATENT_DIMS, ScenarioConfig, SiteSpec

MET, FIT, REG = (LATENT_DIMS.index(d) for d in ("metabolic", "fitness", "regularity"))

# Codes that are not disease- or scenario-specific: code -> (description, parent codes).
LABS: dict[str, tuple[str, list[str]]] = {
    "LAB//4548-4//%": ("Hemoglobin A1c/Hemoglobin.total in Blood", ["LOINC/4548-4"]),
    "LAB//2345-7//mg/dL": ("Glucose [Mass/volume] in Serum or Plasma", ["LOINC/2345-7"]),
    "LAB//2089-1//mg/dL": ("Cholesterol in LDL [Mass/volume] in Serum or Plasma", ["LOINC/2089-1"]),
    "LAB//19926-5//%": ("FEV1/FVC", ["LOINC/19926-5"]),
    "VITAL//8480-6//mm[Hg]": ("Systolic blood pressure", ["LOINC/8480-6"]),
    "VITAL//8462-4//mm[Hg]": ("Diastolic blood pressure", ["LOINC/8462-4"]),
    "VITAL//39156-5//kg/m2": ("Body mass index (BMI) [Ratio]", ["LOINC/39156-5"]),
    "VITAL//8867-4//{beats}/min": ("Heart rate", ["LOINC/8867-4"]),
}
MEDICATIONS: dict[str, tuple[str, list[str]]] = {
    "ATC//A10BA02": ("metformin", ["ATC//A10BA"]),
    "ATC//C10AA05": ("atorvastatin", ["ATC//C10AA"]),
    "ATC//B01AC06": ("acetylsalicylic acid", ["ATC//B01AC"]),
    "ATC//C09AA02": ("enalapril", ["ATC//C09AA"]),
    "ATC//C08CA01": ("amlodipine", ["ATC//C08CA"]),
    "ATC//R03AC02": ("salbutamol", ["ATC//R03AC"]),
    "ATC//R03BB04": ("tiotropium bromide", ["ATC//R03BB"]),
}
# Common diagnoses unrelated to the latent state: realistic background noise.
BACKGROUND: dict[str, tuple[str, list[str]]] = {
    "ICD10//J06.9": ("Acute upper respiratory infection, unspecified", ["ICD10//J06"]),
    "ICD10//M54.5": ("Low back pain", ["ICD10//M54"]),
    "ICD10//Z00.00": ("Encounter for general adult medical examination", ["ICD10//Z00"]),
    "ICD10//K21.9": ("Gastro-oesophageal reflux disease without oesophagitis", ["ICD10//K21"]),
    "ICD10//R51": ("Headache", []),
}
OTHER: dict[str, tuple[str, list[str]]] = {
    "MEDS_BIRTH": ("Birth", []),
    "MEDS_DEATH": ("Death", []),
    "GENDER//F": ("Sex: female", []),
    "GENDER//M": ("Sex: male", []),
    "SOCIAL//SMOKING//CURRENT": ("Tobacco smoking status: current smoker", ["LOINC/72166-2"]),
    "SOCIAL//SMOKING//NEVER": ("Tobacco smoking status: never smoker", ["LOINC/72166-2"]),
    "ENCOUNTER//OUTPATIENT": ("Outpatient visit", []),
    "ENCOUNTER//INPATIENT": ("Inpatient admission", []),
}
P_REPEAT_DIAGNOSIS = 0.6  # chance a known diagnosis is coded again at a later visit
P_REPEAT_MEDICATION = 0.85
P_BACKGROUND = 0.08


def code_catalogue(scenario: ScenarioConfig) -> dict[str, tuple[str, list[str]]]:
    """Every code the generator can write, with description and parent codes."""
    out: dict[str, tuple[str, list[str]]] = {}
    out.update(OTHER)
    for key, d in scenario.diseases.items():
        out[d.code] = (d.description, [])
        for med in d.medications:
            out.setdefault(med, MEDICATIONS.get(med, (f"medication for {key}", [])))
    out.update(MEDICATIONS)
    out.update(LABS)
    out.update(BACKGROUND)
    for trait in scenario.prs_traits:
        out[f"{PRS_PREFIX}{trait}"] = (f"Polygenic risk score for {trait}, standardised z-score", [])
    return out


@dataclass
class _Rows:
    """Growing column chunks of MEDS rows, by code id."""

    subj: list[np.ndarray]
    time: list[np.ndarray]  # float days; NaN = static row
    code: list[np.ndarray]
    value: list[np.ndarray]  # float32, NaN = no value
    order: list[np.ndarray]  # tie-break inside one timestamp

    def add(
        self, subj: np.ndarray, time: np.ndarray | float, code: int | np.ndarray, value: np.ndarray | None, order: int
    ) -> None:
        m = len(subj)
        if m == 0:
            return
        self.subj.append(np.asarray(subj, dtype=np.int64))
        self.time.append(np.broadcast_to(np.asarray(time, dtype=np.float64), (m,)))
        self.code.append(np.broadcast_to(np.asarray(code, dtype=np.int32), (m,)))
        self.value.append(np.full(m, np.nan, np.float32) if value is None else np.asarray(value, dtype=np.float32))
        self.order.append(np.full(m, order, np.int8))


def _visits(cohort: Cohort, site: SiteSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All visits: (subject index, time in days, diagnosis-visit disease index or -1)."""
    n, T, step = cohort.n, cohort.n_steps, cohort.step_days
    grid = np.arange(T) * step
    # Morbidity at each step start: diagnosed diseases raise the visit rate, as does the metabolic state.
    n_diag = (cohort.diagnosis[:, None, :] <= grid[None, :, None]).sum(-1)
    rate = site.visits_per_year * np.exp(0.4 * n_diag + 0.15 * cohort.latent[:, :, MET])
    counts = rng.poisson(rate * step / DAYS_PER_YEAR)
    subj = np.repeat(np.repeat(np.arange(n), T), counts.ravel())
    k = np.repeat(np.tile(np.arange(T), n), counts.ravel())
    t = _to_minute(k * step + rng.random(len(k)) * step)
    stop = np.minimum(cohort.death, cohort.end_days)
    keep = (t > cohort.first_visit[subj]) & (t < stop[subj])
    subj, t = subj[keep], t[keep]
    dis_s, dis_d = np.nonzero(np.isfinite(cohort.diagnosis) & (cohort.diagnosis > cohort.first_visit[:, None]))
    dis_t = cohort.diagnosis[dis_s, dis_d]
    # Diagnoses on the same day as another diagnosis of the subject share that visit.
    all_subj = np.concatenate([np.arange(n), subj, dis_s])
    all_t = np.concatenate([cohort.first_visit, t, dis_t])
    all_kind = np.concatenate([np.full(n, -1), np.full(len(subj), -1), dis_d]).astype(np.int64)
    return all_subj, all_t, all_kind


def simulate_ehr(
    cohort: Cohort, scenario: ScenarioConfig, site: SiteSpec, rng: np.random.Generator
) -> tuple[pa.Table, list[str]]:
    """MEDS rows of the cohort, sorted (subject, static first, time); and the code list used."""
    codes = list(code_catalogue(scenario))
    cid = {c: i for i, c in enumerate(codes)}
    diseases = list(scenario.diseases.values())
    names = list(scenario.diseases)
    n = cohort.n
    rows = _Rows([], [], [], [], [])
    nan = np.float64("nan")

    # Static rows: sex and PRS (time null).
    idx = np.arange(n)
    rows.add(idx, nan, np.where(cohort.male, cid["GENDER//M"], cid["GENDER//F"]), None, 0)
    for j, trait in enumerate(scenario.prs_traits):
        g = idx[cohort.has_genomics]
        rows.add(g, nan, cid[f"{PRS_PREFIX}{trait}"], cohort.prs[g, j], 1)
    rows.add(idx, cohort.birth_days, cid["MEDS_BIRTH"], None, 0)
    dead = idx[np.isfinite(cohort.death)]
    rows.add(dead, cohort.death[dead], cid["MEDS_DEATH"], None, 9)

    v_subj, v_t, v_dis = _visits(cohort, site, rng)
    nv = len(v_subj)
    enrol = np.zeros(nv, bool)
    enrol[:n] = True
    rows.add(
        idx,
        cohort.first_visit,
        np.where(cohort.smoker, cid["SOCIAL//SMOKING//CURRENT"], cid["SOCIAL//SMOKING//NEVER"]),
        None,
        2,
    )
    inpatient = np.zeros(nv, bool)
    if "CAD" in names:
        inpatient = v_dis == names.index("CAD")
    rows.add(v_subj, v_t, np.where(inpatient, cid["ENCOUNTER//INPATIENT"], cid["ENCOUNTER//OUTPATIENT"]), None, 1)

    present, diagnosed = disease_presence(cohort, v_subj, v_t)
    first_dx = cohort.diagnosis[v_subj] == v_t[:, None]  # the visit that records the diagnosis
    # Diagnoses: first at the diagnosis visit (or enrolment if prevalent), then recurring.
    on_med = np.zeros((nv, len(diseases)), bool)
    for d, spec in enumerate(diseases):
        repeat = diagnosed[:, d] & ~first_dx[:, d] & (rng.random(nv) < P_REPEAT_DIAGNOSIS)
        m = first_dx[:, d] | repeat
        rows.add(v_subj[m], v_t[m], cid[spec.code], None, 3)
        # Medications: each prescribed with some chance, starting at or after the diagnosis.
        for j, med in enumerate(spec.medications):
            prescribed = rng.random(n) < (0.85 if j == 0 else 0.5)
            delay = np.where(rng.random(n) < 0.6, 0.0, _to_minute(rng.exponential(120.0, n)))
            start = np.where(prescribed, cohort.diagnosis[:, d] + delay, np.inf)
            taking = start[v_subj] <= v_t
            on_med[:, d] |= taking
            m = taking & ((start[v_subj] == v_t) | (rng.random(nv) < P_REPEAT_MEDICATION))
            rows.add(v_subj[m], v_t[m], cid[med], None, 4)

    # Labs and vitals from the latent state at the visit's grid step.
    k = cohort.step_of(v_t)
    x = cohort.latent[v_subj, k].astype(np.float64)
    met, fit = x[:, MET], x[:, FIT]
    age_dec = (cohort.age_at(v_subj, v_t) - 55.0) / 10.0
    col = {name: i for i, name in enumerate(names)}

    def flag(arr: np.ndarray, name: str) -> np.ndarray:
        return arr[:, col[name]].astype(np.float64) if name in col else np.zeros(nv)

    def lab(code: str, p: np.ndarray | float, value: np.ndarray, lo: float, hi: float, decimals: int) -> None:
        m = rng.random(nv) < p
        rows.add(v_subj[m], v_t[m], cid[code], np.round(np.clip(value[m], lo, hi), decimals), 5)

    t2d, t2d_dx, t2d_med = flag(present, "T2D"), flag(diagnosed, "T2D"), flag(on_med, "T2D")
    cad_dx, cad_med = flag(diagnosed, "CAD"), flag(on_med, "CAD")
    htn, htn_med = flag(present, "HTN"), flag(on_med, "HTN")
    copd, copd_dx = flag(present, "COPD"), flag(diagnosed, "COPD")
    noise = rng.standard_normal((nv, 8))
    bmi_offset = rng.normal(0.0, 2.0, n)[v_subj]
    lab(
        "LAB//4548-4//%",
        0.3 + 0.6 * t2d_dx,
        5.4 + 0.35 * met + 1.6 * t2d - 0.7 * t2d_med + 0.25 * noise[:, 0],
        3.8,
        15.0,
        1,
    )
    lab(
        "LAB//2345-7//mg/dL", 0.35 + 0.5 * t2d_dx, 95 + 10 * met + 45 * t2d - 20 * t2d_med + 8 * noise[:, 1], 50, 450, 0
    )
    lab(
        "LAB//2089-1//mg/dL", 0.3 + 0.5 * cad_dx, 125 + 12 * met - 8 * fit - 45 * cad_med + 22 * noise[:, 2], 25, 300, 0
    )
    sbp = 124 + 5 * met - 4 * fit + 4 * age_dec + 16 * htn - 12 * htn_med + 9 * noise[:, 3]
    bp = rng.random(nv) < 0.85
    rows.add(v_subj[bp], v_t[bp], cid["VITAL//8480-6//mm[Hg]"], np.round(np.clip(sbp[bp], 80, 240)), 5)
    dbp = 78 + 0.45 * (sbp - 124) + 5 * noise[:, 4]
    rows.add(v_subj[bp], v_t[bp], cid["VITAL//8462-4//mm[Hg]"], np.round(np.clip(dbp[bp], 40, 140)), 5)
    lab("VITAL//39156-5//kg/m2", 0.6, 27.5 + 2.8 * met - 0.8 * fit + bmi_offset + 0.4 * noise[:, 5], 15, 70, 1)
    lab("VITAL//8867-4//{beats}/min", 0.6, 70 - 4 * fit + 2 * met + 6 * noise[:, 6], 35, 180, 0)
    lab(
        "LAB//19926-5//%",
        0.05 + 0.65 * copd_dx,
        78 - 3 * cohort.smoker[v_subj] - 14 * copd + 2 * fit + 5 * noise[:, 7],
        20,
        100,
        0,
    )

    for bg_code in BACKGROUND:
        m = rng.random(nv) < P_BACKGROUND
        rows.add(v_subj[m], v_t[m], cid[bg_code], None, 3)

    subj = np.concatenate(rows.subj)
    time = np.concatenate(rows.time)
    code = np.concatenate(rows.code)
    value = np.concatenate(rows.value)
    order = np.concatenate(rows.order)
    static = np.isnan(time)
    time_key = np.where(static, -np.inf, time)
    perm = np.lexsort((code, order, time_key, subj))
    subj, time, code, value, static = subj[perm], time[perm], code[perm], value[perm], static[perm]
    # Identical rows (a repeated code at a shared visit) are dropped.
    dup = np.zeros(len(subj), bool)
    dup[1:] = (subj[1:] == subj[:-1]) & (code[1:] == code[:-1]) & ((time[1:] == time[:-1]) | (static[1:] & static[:-1]))
    keep = ~dup
    subj, time, code, value, static = subj[keep], time[keep], code[keep], value[keep], static[keep]

    time_us = cohort.start_us + np.round(np.where(static, 0.0, time) * US_PER_DAY).astype(np.int64)
    used = np.unique(code)
    remap = np.full(len(codes), -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    used_codes = [codes[i] for i in used]
    code_arr = pa.DictionaryArray.from_arrays(pa.array(remap[code]), pa.array(used_codes, pa.string())).cast(
        pa.string()
    )
    table = pa.table(
        {
            "subject_id": pa.array(cohort.subject_id[subj], pa.int64()),
            "time": pa.array(time_us, pa.timestamp("us"), mask=static),
            "code": code_arr,
            "numeric_value": pa.array(value, pa.float32(), mask=np.isnan(value)),
        }
    )
    return table, used_codes
