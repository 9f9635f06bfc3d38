"""A hospital's MEDS export, as a real site would hand it over (MIMIC-IV MEDS style), from a simulated cohort.

What makes it realistic, and what a pipeline must therefore tolerate:

- codes as hospitals write them: `DIAGNOSIS//ICD//9//25000` before the ICD-10 switch (1 October 2015,
  shifted by the site's date offset like every date) and `DIAGNOSIS//ICD//10//E119` after it, so one
  disease has two coding systems within one subject's history; labs as `LAB//<itemid>//<unit>`
  (`LAB//50931//mg/dL`, and the odd `LAB//51087//UNK`); `MEDICATION//START//<drug>` then
  `MEDICATION//<drug>//Administered`; `HOSPITAL_ADMISSION//...` / `HOSPITAL_DISCHARGE//...`;
- dense panels: a chemistry panel writes 11 rows at one timestamp, a blood count 4;
- multi-year histories with dates in the 2100s; MEDS_BIRTH has a time, `GENDER//F|M` is static (null
  time) and comes LAST within each subject, where polars' sort (nulls last) puts it;
- written with polars: `code` is large_string, not the string of meds.DataSchema.

The latent state, onsets, diagnoses and deaths are those of cohort.simulate_cohort, so the ground
truth (truth/<site>/) is the same as for the other sites; onsets.parquet gains `diagnosis_code`, the
code written at the first diagnosis (ICD-9 or ICD-10 depending on its date).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from simulations.synthetic.cohort import (
    Cohort,
    _to_minute,
    disease_presence,
    site_start_date,
)
from simulations.synthetic.ehr import _visits
from simulations.synthetic.scenario import LATENT_DIMS, ScenarioConfig, SiteSpec

ICD10_SWITCH = _dt.date(2015, 10, 1)  # US hospitals moved from ICD-9-CM to ICD-10-CM on this day
MET, FIT = LATENT_DIMS.index("metabolic"), LATENT_DIMS.index("fitness")
MINUTE = 1.0 / 1440.0

# Disease -> (ICD-9-CM codes, ICD-10-CM codes, description); a subject keeps one variant per era.
DIAGNOSES: dict[str, tuple[list[str], list[str], str]] = {
    "T2D": (["25000", "25002", "25040"], ["E119", "E1165", "E1122"], "Type 2 diabetes mellitus"),
    "CAD": (["41401", "4148"], ["I2510", "I259"], "Chronic ischaemic heart disease"),
    "HTN": (["4019", "4011"], ["I10"], "Essential hypertension"),
    "COPD": (["496", "49120"], ["J449", "J441"], "Chronic obstructive pulmonary disease"),
}
BACKGROUND: list[tuple[str, str, str]] = [  # (ICD-9, ICD-10, description): noise unrelated to the state
    ("V700", "Z0000", "General adult medical examination"),
    ("4659", "J069", "Acute upper respiratory infection"),
    ("7242", "M545", "Low back pain"),
    ("53081", "K219", "Gastro-oesophageal reflux disease"),
    ("7840", "R51", "Headache"),
]
MEDICATIONS: dict[str, list[str]] = {
    "T2D": ["MetFORMIN (Glucophage)", "GlipiZIDE"],
    "CAD": ["Atorvastatin", "Aspirin"],
    "HTN": ["Lisinopril", "amLODIPine"],
    "COPD": ["Albuterol Inhaler", "Tiotropium Bromide"],
}
# MIMIC-IV itemids: the chemistry panel (11 rows at one charttime), blood count, HbA1c, lipids.
CHEM = [
    ("50868", "mEq/L", "Anion Gap"),
    ("50882", "mEq/L", "Bicarbonate"),
    ("50893", "mg/dL", "Calcium, Total"),
    ("50902", "mEq/L", "Chloride"),
    ("50912", "mg/dL", "Creatinine"),
    ("50931", "mg/dL", "Glucose"),
    ("50960", "mg/dL", "Magnesium"),
    ("50970", "mg/dL", "Phosphate"),
    ("50971", "mEq/L", "Potassium"),
    ("50983", "mEq/L", "Sodium"),
    ("51006", "mg/dL", "Urea Nitrogen"),
]
CBC = [
    ("51301", "K/uL", "White Blood Cells"),
    ("51222", "g/dL", "Hemoglobin"),
    ("51221", "%", "Hematocrit"),
    ("51265", "K/uL", "Platelet Count"),
]
OTHER_LABS = [
    ("50852", "%", "% Hemoglobin A1c"),
    ("50907", "mg/dL", "Cholesterol, Total"),
    ("50905", "mg/dL", "Cholesterol, LDL, Calculated"),
    ("50904", "mg/dL", "Cholesterol, HDL"),
    ("51000", "mg/dL", "Triglycerides"),
    ("51087", "UNK", "Length of Urine Collection"),
]
VITALS = {
    "OMR//BLOOD_PRESSURE_SYSTOLIC//mmHg": "Systolic blood pressure",
    "OMR//BLOOD_PRESSURE_DIASTOLIC//mmHg": "Diastolic blood pressure",
    "OMR//BMI (kg/m2)//kg/m2": "Body mass index",
}
ADMISSIONS = {
    "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM": "Emergency admission",
    "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL": "Elective admission",
    "HOSPITAL_DISCHARGE//HOME": "Discharged home",
    "HOSPITAL_DISCHARGE//SKILLED NURSING FACILITY": "Discharged to a skilled nursing facility",
}
P_INPATIENT, P_REPEAT_DIAGNOSIS, P_REPEAT_MEDICATION, P_BACKGROUND = 0.12, 0.6, 0.85, 0.08
# Order of rows within one timestamp (MIMIC writes admission, then codes, then discharge).
_ADMIT, _DX, _MED, _LAB, _DISCHARGE, _DEATH, _STATIC = range(7)


def icd9(code: str) -> str:
    return f"DIAGNOSIS//ICD//9//{code}"


def icd10(code: str) -> str:
    return f"DIAGNOSIS//ICD//10//{code}"


def lab(itemid: str, unit: str) -> str:
    return f"LAB//{itemid}//{unit}"


def switch_days(scenario: ScenarioConfig, site: SiteSpec) -> float:
    """Days from the site's follow-up start to its (date-shifted) ICD-10 switch."""
    shifted = ICD10_SWITCH.replace(year=ICD10_SWITCH.year + site.date_offset_years)
    return float((shifted - site_start_date(scenario, site)).days)


@dataclass
class HospitalEHR:
    events: pl.DataFrame  # MEDS rows in the export's order (static rows last within a subject)
    catalogue: dict[str, str]  # code -> description, for metadata/codes.parquet
    diagnosis_code: np.ndarray  # [n, n_diseases] object: code written at the first diagnosis, None if none


class _Rows:
    """Column chunks of MEDS rows: subject index, time in days (NaN = static), code, value, order."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(
        self, subj: np.ndarray, time: np.ndarray | float, code: np.ndarray | str, value: np.ndarray | None, order: int
    ) -> None:
        m = len(subj)
        if m == 0:
            return
        self.parts.append(
            (
                np.asarray(subj, np.int64),
                np.broadcast_to(np.asarray(time, np.float64), (m,)).copy(),
                np.broadcast_to(np.asarray(code, dtype=object), (m,)).copy(),
                np.full(m, np.nan, np.float32) if value is None else np.asarray(value, np.float32),
                np.full(m, order, np.int8),
            )
        )

    def columns(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(5))


def simulate_hospital_ehr(
    cohort: Cohort, scenario: ScenarioConfig, site: SiteSpec, rng: np.random.Generator
) -> HospitalEHR:
    names = list(scenario.diseases)
    unknown = [d for d in names if d not in DIAGNOSES]
    if unknown:
        raise ValueError(
            f"scenario {scenario.name!r}, site {site.name!r}: ehr_format 'hospital' has no ICD codes "
            f"for disease(s) {unknown}; known: {sorted(DIAGNOSES)}"
        )
    n = cohort.n
    idx = np.arange(n)
    switch = switch_days(scenario, site)
    stop = np.minimum(cohort.death, cohort.end_days)
    rows = _Rows()
    catalogue: dict[str, str] = {
        meds.birth_code: "Birth",
        meds.death_code: "Death",
        "GENDER//F": "Sex: female",
        "GENDER//M": "Sex: male",
        **ADMISSIONS,
        **VITALS,
    }

    rows.add(idx, np.nan, np.where(cohort.male, "GENDER//M", "GENDER//F"), None, _STATIC)
    rows.add(idx, cohort.birth_days, meds.birth_code, None, _ADMIT)
    dead = idx[np.isfinite(cohort.death)]
    rows.add(dead, cohort.death[dead], meds.death_code, None, _DEATH)

    v_subj, v_t, v_dis = _visits(cohort, site, rng)
    nv = len(v_subj)
    era10 = v_t >= switch

    # Admissions: a share of visits, and every CAD diagnosis, is an inpatient stay with a discharge.
    inpatient = rng.random(nv) < P_INPATIENT
    if "CAD" in names:
        inpatient |= v_dis == names.index("CAD")
    emergency = rng.random(nv) < 0.7
    rows.add(
        v_subj[inpatient],
        v_t[inpatient],
        np.where(
            emergency[inpatient],
            "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM",
            "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL",
        ),
        None,
        _ADMIT,
    )
    discharge = _to_minute(v_t + rng.gamma(2.0, 2.0, nv) + MINUTE)
    ok = inpatient & (discharge < stop[v_subj])
    rows.add(
        v_subj[ok],
        discharge[ok],
        np.where(rng.random(nv)[ok] < 0.8, "HOSPITAL_DISCHARGE//HOME", "HOSPITAL_DISCHARGE//SKILLED NURSING FACILITY"),
        None,
        _DISCHARGE,
    )

    # Diagnoses: coded at the diagnosis visit (or enrolment if prevalent), then recurring; the code
    # system is that of the visit's date, the variant is the subject's own.
    present, diagnosed = disease_presence(cohort, v_subj, v_t)
    first_dx = cohort.diagnosis[v_subj] == v_t[:, None]
    on_med = np.zeros((nv, len(names)), bool)
    diagnosis_code = np.full((n, len(names)), None, dtype=object)
    for d, name in enumerate(names):
        codes9, codes10, desc = DIAGNOSES[name]
        c9 = np.array([icd9(c) for c in codes9], dtype=object)[rng.integers(len(codes9), size=n)]
        c10 = np.array([icd10(c) for c in codes10], dtype=object)[rng.integers(len(codes10), size=n)]
        catalogue.update({icd9(c): f"{desc} (ICD-9-CM {c})" for c in codes9})
        catalogue.update({icd10(c): f"{desc} (ICD-10-CM {c})" for c in codes10})
        repeat = diagnosed[:, d] & ~first_dx[:, d] & (rng.random(nv) < P_REPEAT_DIAGNOSIS)
        m = first_dx[:, d] | repeat
        code = np.where(era10, c10[v_subj], c9[v_subj])
        rows.add(v_subj[m], v_t[m], code[m], None, _DX)
        f = first_dx[:, d]
        diagnosis_code[v_subj[f], d] = code[f]
        for j, drug in enumerate(MEDICATIONS[name]):
            start_code, given_code = f"MEDICATION//START//{drug}", f"MEDICATION//{drug}//Administered"
            catalogue[start_code], catalogue[given_code] = f"{drug}: prescription start", f"{drug}: administered"
            prescribed = rng.random(n) < (0.85 if j == 0 else 0.5)
            delay = np.where(rng.random(n) < 0.6, 0.0, _to_minute(rng.exponential(120.0, n)))
            start = np.where(prescribed, cohort.diagnosis[:, d] + delay, np.inf)
            taking = start[v_subj] <= v_t
            on_med[:, d] |= taking
            first = start[v_subj] == v_t
            rows.add(v_subj[first], v_t[first], start_code, None, _MED)
            again = taking & ~first & (rng.random(nv) < P_REPEAT_MEDICATION)
            rows.add(v_subj[again], v_t[again], given_code, None, _MED)
    for bg9, bg10, desc in BACKGROUND:
        catalogue[icd9(bg9)], catalogue[icd10(bg10)] = f"{desc} (ICD-9-CM)", f"{desc} (ICD-10-CM)"
        m = rng.random(nv) < P_BACKGROUND
        rows.add(v_subj[m], v_t[m], np.where(era10[m], icd10(bg10), icd9(bg9)), None, _DX)

    # Labs from the latent state, drawn minutes to hours after the visit; each panel its own charttime.
    k = cohort.step_of(v_t)
    x = cohort.latent[v_subj, k].astype(np.float64)
    met, fit = x[:, MET], x[:, FIT]
    col = {name: i for i, name in enumerate(names)}

    def flag(arr: np.ndarray, name: str) -> np.ndarray:
        return arr[:, col[name]].astype(np.float64) if name in col else np.zeros(nv)

    t2d, t2d_dx, t2d_med = flag(present, "T2D"), flag(diagnosed, "T2D"), flag(on_med, "T2D")
    cad_dx, cad_med = flag(diagnosed, "CAD"), flag(on_med, "CAD")
    htn, htn_med = flag(present, "HTN"), flag(on_med, "HTN")
    copd = flag(present, "COPD")

    def panel(
        p: np.ndarray | float, items: list[tuple[str, str, str]], values: list[np.ndarray], decimals: list[int]
    ) -> None:
        draw = _to_minute(v_t + rng.uniform(10, 240, nv) * MINUTE)
        m = (rng.random(nv) < p) & (draw < stop[v_subj])
        for (itemid, unit, desc), val, dec in zip(items, values, decimals):
            catalogue[lab(itemid, unit)] = desc
            rows.add(v_subj[m], draw[m], lab(itemid, unit), np.round(val[m], dec), _LAB)

    def z() -> np.ndarray:
        return rng.standard_normal(nv)

    glucose = np.clip(95 + 10 * met + 45 * t2d - 20 * t2d_med + 12 * z(), 45, 600)
    bicarb = np.clip(25 + 3.5 * copd + 2 * z(), 12, 40)
    sodium, chloride = 139 + 2.5 * z(), 102 + 3 * z()
    panel(
        0.55 + 0.3 * t2d_dx,
        CHEM,
        [
            sodium - chloride - bicarb,
            bicarb,
            9.3 + 0.4 * z(),
            chloride,
            np.clip(0.9 + 0.1 * met + 0.25 * htn + 0.2 * z(), 0.3, 8),
            glucose,
            2.0 + 0.2 * z(),
            3.4 + 0.5 * z(),
            4.2 + 0.4 * z(),
            sodium,
            np.clip(16 + 3 * htn + 5 * z(), 4, 120),
        ],
        [0, 0, 1, 0, 1, 0, 1, 1, 1, 0, 0],
    )
    panel(
        0.4,
        CBC,
        [np.clip(7.5 + 1.5 * copd + 2 * z(), 1, 30), 13.5 + 1.4 * z(), 40 + 4 * z(), np.clip(250 + 60 * z(), 20, 900)],
        [1, 1, 1, 0],
    )
    ldl = np.clip(120 + 12 * met - 8 * fit - 45 * cad_med + 25 * z(), 20, 300)
    hdl = np.clip(50 - 4 * met + 3 * fit + 10 * z(), 15, 120)
    tg = np.clip(140 + 35 * met + 30 * t2d + 40 * z(), 30, 1500)
    panel(
        0.15 + 0.5 * t2d_dx,
        OTHER_LABS[:1],
        [np.clip(5.4 + 0.35 * met + 1.6 * t2d - 0.7 * t2d_med + 0.3 * z(), 3.8, 16)],
        [1],
    )
    panel(0.12 + 0.5 * cad_dx, OTHER_LABS[1:5], [ldl + hdl + tg / 5, ldl, hdl, tg], [0, 0, 0, 0])
    panel(0.01, OTHER_LABS[5:], [np.full(nv, 24.0)], [0])
    sbp = np.clip(124 + 5 * met - 4 * fit + 16 * htn - 12 * htn_med + 10 * z(), 80, 240)
    dbp = np.clip(78 + 0.45 * (sbp - 124) + 5 * z(), 40, 140)
    bmi = np.clip(27.5 + 2.8 * met - 0.8 * fit + rng.normal(0, 2.0, n)[v_subj] + 0.4 * z(), 15, 70)
    bp = rng.random(nv) < 0.7
    for code, val, dec in zip(VITALS, (sbp, dbp, bmi), (0, 0, 1)):
        rows.add(v_subj[bp], v_t[bp], code, np.round(val[bp], dec), _LAB)

    events = events_frame(rows, cohort, static_last=True)  # static rows last, as polars puts them
    return HospitalEHR(events=events, catalogue=catalogue, diagnosis_code=diagnosis_code)


def events_frame(rows: _Rows, cohort: Cohort, static_last: bool) -> pl.DataFrame:
    """The MEDS events of collected rows: times (days on the cohort's clock, NaN = static) as
    timestamps, sorted by subject, time and each row's order, exact duplicates dropped; static
    rows last (`static_last`, as polars writes them) or first (as MEDS-ETL writes them)."""
    subj, time, code, value, order = rows.columns()
    time_us = cohort.start_us + np.round(np.nan_to_num(time) * 86_400_000_000).astype(np.int64)
    return (
        pl.DataFrame(
            {
                "subject_id": cohort.subject_id[subj],
                "time": pl.Series(time_us, dtype=pl.Int64).cast(pl.Datetime("us")),
                "code": pl.Series(code.astype(str), dtype=pl.String),
                "numeric_value": pl.Series(value, dtype=pl.Float32, nan_to_null=True),
                "_order": order,
            }
        )
        .with_columns(pl.when(pl.Series(np.isnan(time))).then(None).otherwise(pl.col("time")).alias("time"))
        .sort(["subject_id", "time", "_order", "code"], nulls_last=static_last)
        .unique(subset=["subject_id", "time", "code", "numeric_value"], keep="first", maintain_order=True)
        .drop("_order")
    )


def write_hospital_shards(
    ehr: HospitalEHR, cohort: Cohort, site: SiteSpec, root: Path, parquet_options: dict, first_shard: int = 0
) -> int:
    """data/<first_shard + i>.parquet written by polars, whole subjects per shard; returns the row count.

    `cohort` is one batch of the site's subjects, starting at a shard boundary (generate.py)."""
    (root / meds.data_subdirectory).mkdir(parents=True, exist_ok=True)
    for i, lo in enumerate(range(0, cohort.n, site.subjects_per_shard)):
        ids = cohort.subject_id[lo : lo + site.subjects_per_shard]
        shard = ehr.events.filter(pl.col("subject_id").is_between(int(ids[0]), int(ids[-1])))
        meds.DataSchema.align(shard.to_arrow())  # raises on a mismatch other than string widths
        shard.write_parquet(
            root / meds.data_subdirectory / f"{first_shard + i}.parquet",
            compression="zstd",
            compression_level=parquet_options.get("compression_level", 1),
        )
    return ehr.events.height


def used_codes(ehr: HospitalEHR) -> set[str]:
    return set(ehr.events.get_column("code").unique().to_list())


def write_hospital_codes(used: set[str], catalogue: dict[str, str], root: Path, parquet_options: dict) -> None:
    """metadata/codes.parquet: the codes written in data/ (sorted), with their descriptions."""
    codes = sorted(used)
    table = pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([catalogue[c] for c in codes], pa.string()),
            "parent_codes": pa.array([[] for _ in codes], pa.list_(pa.string())),
        }
    )
    meds.CodeMetadataSchema.validate(table)
    (root / meds.code_metadata_filepath).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / meds.code_metadata_filepath, **parquet_options)


def hospital_onsets_table(onsets: pa.Table, ehr: HospitalEHR) -> pa.Table:
    """truth onsets (one row per subject x disease, subject-major) plus the code written at diagnosis."""
    return onsets.append_column("diagnosis_code", pa.array(ehr.diagnosis_code.ravel().tolist(), pa.string()))
