"""A MIMIC-IV-shaped MEDS export (hospital and ICU stays, labs, deaths), for MEDS-DEV's tasks.

`ehr_format: mimic` (configs/scenario/mimic.yaml). From a simulated cohort (birth, sex, chronic
diagnoses, death: cohort.simulate_cohort) it writes what MEDS-DEV's MIMIC-IV predicates look for:

- `MEDS_BIRTH` at birth, static `GENDER//F|M`; `MEDS_DEATH` at the cohort's death time;
- hospital stays `HOSPITAL_ADMISSION//<admission_type>//<admission_location>` ...
  `HOSPITAL_DISCHARGE//<discharge_location>` (`HOSPITAL_DISCHARGE//DIED` for deaths in hospital),
  some followed by a readmission within 30 days; a share of the cohort's deaths happen in a
  terminal stay, most of those in its ICU stay;
- ICU stays inside some hospital stays, `ICU_ADMISSION//<careunit>` ... `ICU_DISCHARGE//<careunit>`;
- labs as `LAB//<itemid>//<unit>` with the itemids of MEDS-DEV's MIMIC-IV predicates: a chemistry
  panel (creatinine 50912 mg/dL, sodium 50983 mEq/L, bicarbonate 50882 mEq/L, potassium, chloride,
  urea nitrogen, glucose) and a blood count (hemoglobin 50811 g/dL, WBC 51300 K/uL, platelets
  51265 K/uL, hematocrit) soon after admission, then every morning (twice a day in the ICU); in
  the ICU the charted copies (sodium 220645, bicarbonate 227443, hemoglobin 220228 g/dl, WBC
  220546, platelets 227457) and mean arterial pressure (non-invasive 220181 every 3 h, arterial
  220052 hourly with an arterial line). Each stay has a severity; acute kidney injury,
  hyponatraemia, acidosis, bleeding, infection, thrombocytopenia and shock develop over the stay
  with it, so values cross the abnormal thresholds at different times, some in the first day,
  some in the second;
- diagnoses timed at the stay's discharge, as MIMIC-IV writes them (ICD-9 before the date-shifted
  1 October 2015, ICD-10 after: `DIAGNOSIS//ICD//10//E119`): the cohort's chronic diseases
  diagnosed by then, the stay's main reason, and the acute conditions its labs showed;
- outpatient OMR vitals a few times a year, so that follow-up exists between stays.

The cohort's truth (truth/<site>/) holds for the latent state, onsets and deaths; in this format
a chronic disease is coded only at discharges after its diagnosis (truth's diagnosis_time is the
cohort's, not the first code in data/).
"""

from __future__ import annotations

import meds
import numpy as np

from simulations.synthetic.cohort import DAYS_PER_YEAR, Cohort, _to_minute
from simulations.synthetic.hospital import (
    DIAGNOSES,
    VITALS,
    HospitalEHR,
    _Rows,
    events_frame,
    icd9,
    icd10,
    lab,
    switch_days,
)
from simulations.synthetic.scenario import ScenarioConfig, SiteSpec

HOUR = 1.0 / 24.0
ADMISSION_TYPES = [  # (admission_type//admission_location, share)
    ("EW EMER.//EMERGENCY ROOM", 0.45),
    ("URGENT//TRANSFER FROM HOSPITAL", 0.15),
    ("ELECTIVE//PHYSICIAN REFERRAL", 0.15),
    ("OBSERVATION ADMIT//EMERGENCY ROOM", 0.15),
    ("DIRECT EMER.//PHYSICIAN REFERRAL", 0.10),
]
DISCHARGE_LOCATIONS = [("HOME", 0.55), ("HOME HEALTH CARE", 0.25), ("SKILLED NURSING FACILITY", 0.2)]
CAREUNITS = [
    "Medical Intensive Care Unit (MICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Medical/Surgical Intensive Care Unit (MICU/SICU)",
]
# Main reasons for a stay: (ICD-9, ICD-10, description).
REASONS = [
    ("486", "J189", "Pneumonia, unspecified organism"),
    ("42833", "I5033", "Acute on chronic diastolic heart failure"),
    ("78650", "R079", "Chest pain, unspecified"),
    ("5990", "N390", "Urinary tract infection"),
    ("5789", "K922", "Gastrointestinal haemorrhage"),
    ("49121", "J441", "COPD with acute exacerbation"),
    ("0389", "A419", "Sepsis, unspecified organism"),
]
# Acute conditions coded when the stay's labs showed them: (ICD-9, ICD-10, description).
ACUTE = {
    "aki": ("5849", "N179", "Acute kidney failure"),
    "hyponatremia": ("2761", "E871", "Hyposmolality and hyponatraemia"),
    "acidosis": ("2762", "E872", "Acidosis"),
    "anemia": ("2859", "D649", "Anaemia, unspecified"),
    "leukocytosis": ("2888", "D72829", "Elevated white blood cell count"),
    "thrombocytopenia": ("2875", "D696", "Thrombocytopenia, unspecified"),
    "hypotension": ("4589", "I959", "Hypotension, unspecified"),
}
# (name, itemid, unit, decimals, lower limit, upper limit); MEDS-DEV's MIMIC-IV predicates name the itemids.
CHEM = [
    ("creatinine", "50912", "mg/dL", 1, 0.2, 12.0),
    ("sodium", "50983", "mEq/L", 0, 110.0, 160.0),
    ("bicarbonate", "50882", "mEq/L", 0, 5.0, 40.0),
    ("potassium", "50971", "mEq/L", 1, 2.5, 7.0),
    ("chloride", "50902", "mEq/L", 0, 80.0, 125.0),
    ("bun", "51006", "mg/dL", 0, 3.0, 150.0),
    ("glucose", "50931", "mg/dL", 0, 40.0, 600.0),
]
CBC = [
    ("hemoglobin", "50811", "g/dL", 1, 4.0, 19.0),
    ("wbc", "51300", "K/uL", 1, 0.5, 60.0),
    ("platelets", "51265", "K/uL", 0, 5.0, 900.0),
    ("hematocrit", "51221", "%", 1, 12.0, 58.0),
]
ICU_CHARTED = {  # lab -> the ICU's charted copy (chartevents itemid, unit as MIMIC writes it)
    "sodium": ("220645", "mEq/L"),
    "bicarbonate": ("227443", "mEq/L"),
    "hemoglobin": ("220228", "g/dl"),
    "wbc": ("220546", "K/uL"),
    "platelets": ("227457", "K/uL"),
}
MAP_NBP, MAP_ART = ("220181", "mmHg"), ("220052", "mmHg")
P_READMIT, P_DEATH_IN_HOSPITAL, P_DEATH_IN_ICU = 0.12, 0.4, 0.6
_ADMIT, _ICU_IN, _LAB, _ICU_OUT, _DX, _DISCHARGE, _DEATH = range(7)


def _pick(rng: np.random.Generator, options: list[tuple[str, float]]) -> str:
    names, p = zip(*options)
    return str(names[rng.choice(len(names), p=np.asarray(p) / sum(p))])


def _minute(days: float) -> float:
    """A time in days, to the minute (as every event time)."""
    return float(_to_minute(np.asarray(days, np.float64)))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


class _Stay:
    """One hospital stay, in days from the site's t0."""

    def __init__(self, admit: float, discharge: float, severity: float, terminal: bool) -> None:
        self.admit, self.discharge, self.severity, self.terminal = admit, discharge, severity, terminal
        self.icu: tuple[float, float] | None = None


def _stays(cohort: Cohort, i: int, site: SiteSpec, rng: np.random.Generator) -> list[_Stay]:
    """A subject's stays: Poisson index stays, readmissions within 30 days, a terminal stay around
    a death in hospital. None overlaps another; none starts after death."""
    stop = min(float(cohort.death[i]), cohort.end_days)
    frailty = rng.normal(0.0, 0.7)
    n = rng.poisson(site.visits_per_year * np.exp(frailty) * cohort.end_days / DAYS_PER_YEAR)
    starts = sorted(rng.uniform(0.0, cohort.end_days, n))
    dies_in_hospital = np.isfinite(cohort.death[i]) and rng.random() < P_DEATH_IN_HOSPITAL
    out: list[_Stay] = []
    t_free = float(cohort.first_visit[i])
    queue = list(starts)
    while queue:
        admit = _minute(max(queue.pop(0), t_free + 0.5))
        severity = rng.normal(0.3 * frailty, 1.0)
        los = float(np.clip(rng.lognormal(np.log(3.5) + 0.35 * severity, 0.7), 0.25, 40.0))
        discharge = _minute(admit + los)
        if discharge >= stop - (10.0 if dies_in_hospital else 0.5):
            break  # the terminal stay (if any) comes last
        out.append(_Stay(admit, discharge, severity, terminal=False))
        t_free = discharge
        if rng.random() < P_READMIT + 0.08 * max(severity, 0.0):
            queue.insert(0, discharge + rng.uniform(1.0, 30.0))
    if dies_in_hospital and stop < cohort.end_days:
        los = float(np.clip(rng.lognormal(np.log(6.0), 0.6), 0.3, 40.0))
        admit = _minute(max(stop - los, t_free + 0.5))
        if admit < stop:
            out.append(_Stay(admit, stop, rng.normal(1.5, 0.8), terminal=True))
    for s in out:  # ICU stays: more likely the sicker the stay; a death in hospital mostly in its ICU
        los = s.discharge - s.admit
        wants = rng.random() < (P_DEATH_IN_ICU if s.terminal else _sigmoid(-1.0 + 1.1 * s.severity))
        if not wants or los < 0.3:
            continue
        icu_in = _minute(s.admit + rng.uniform(1.0 * HOUR, min(1.0, 0.3 * los)))
        if s.terminal:
            icu_out = s.discharge  # dies in the ICU
        else:
            icu_out = _minute(min(icu_in + rng.lognormal(np.log(2.5), 0.6), s.discharge - 2.0 * HOUR))
        if icu_out > icu_in:
            s.icu = (icu_in, icu_out)
    return out


def _course(
    rng: np.random.Generator, times: np.ndarray, start: float, base: float, shift: float, p: float, noise: float
) -> np.ndarray:
    """A lab's values over one stay: its baseline, plus (with probability p) a shift reached
    linearly from a random onset over a random ramp, plus measurement noise."""
    values = np.full(times.shape, base, np.float64)
    if rng.random() < p:
        onset, ramp = rng.uniform(0.0, 2.5), rng.uniform(0.3, 2.0)
        values += shift * np.clip((times - start - onset) / ramp, 0.0, 1.0)
    return values + rng.normal(0.0, noise, times.shape)


def simulate_mimic_ehr(
    cohort: Cohort, scenario: ScenarioConfig, site: SiteSpec, rng: np.random.Generator
) -> HospitalEHR:
    """The site's MEDS rows (sorted by subject and time, static rows first) and its code catalogue."""
    names = list(scenario.diseases)
    unknown = [d for d in names if d not in DIAGNOSES]
    if unknown:
        raise ValueError(
            f"scenario {scenario.name!r}, site {site.name!r}: ehr_format 'mimic' has no ICD codes "
            f"for disease(s) {unknown}; known: {sorted(DIAGNOSES)}"
        )
    switch = switch_days(scenario, site)
    rows = _Rows()
    catalogue: dict[str, str] = {meds.birth_code: "Birth", meds.death_code: "Death", "GENDER//F": "F", "GENDER//M": "M"}
    catalogue.update(VITALS)

    def dx(i: int, t: float, pair: tuple[str, str, str]) -> None:
        code = icd10(pair[1]) if t >= switch else icd9(pair[0])
        catalogue[code] = pair[2]
        rows.add(np.array([i]), t, code, None, _DX)

    def put(i: int, t: np.ndarray | float, code: str, desc: str, value: np.ndarray | None, order: int) -> None:
        catalogue[code] = desc
        times = np.atleast_1d(np.asarray(t, np.float64))
        rows.add(np.full(times.shape, i), times, code, value, order)

    idx = np.arange(cohort.n)
    rows.add(idx, np.nan, np.where(cohort.male, "GENDER//M", "GENDER//F"), None, _ADMIT)
    rows.add(idx, cohort.birth_days, meds.birth_code, None, _ADMIT)
    dead = idx[np.isfinite(cohort.death)]
    rows.add(dead, cohort.death[dead], meds.death_code, None, _DEATH)
    # Outpatient vitals (OMR) a few times a year while alive: follow-up between stays.
    stop = np.minimum(cohort.death, cohort.end_days)
    n_omr = rng.poisson(2.0 * stop / DAYS_PER_YEAR)
    o_subj = np.repeat(idx, n_omr)
    o_t = _to_minute(rng.uniform(0.0, 1.0, len(o_subj)) * stop[o_subj])
    sbp = np.round(rng.normal(128, 14, len(o_subj)))
    for code, value in zip(VITALS, (sbp, np.round(0.55 * sbp + rng.normal(8, 6, len(o_subj))), None)):
        if value is None:
            value = np.round(rng.normal(28.0, 5.0, len(o_subj)), 1)
        rows.add(o_subj, o_t, code, value, _LAB)

    for i in range(cohort.n):
        male = bool(cohort.male[i])
        base = {  # the subject's own normal values
            "creatinine": rng.lognormal(np.log(0.95 if male else 0.8), 0.2),
            "sodium": rng.normal(139.5, 2.0),
            "bicarbonate": rng.normal(25.5, 1.8),
            "potassium": rng.normal(4.1, 0.3),
            "chloride": rng.normal(102.0, 2.5),
            "bun": rng.lognormal(np.log(16.0), 0.3),
            "glucose": rng.lognormal(np.log(110.0), 0.2),
            "hemoglobin": rng.normal(14.3 if male else 13.4, 1.0),
            "wbc": rng.lognormal(np.log(7.2), 0.22),
            "platelets": rng.normal(255.0, 55.0),
            "hematocrit": 0.0,
            "map": rng.normal(84.0, 7.0),
        }
        for stay in _stays(cohort, i, site, rng):
            sev, a, d = stay.severity, stay.admit, stay.discharge
            admit_code = f"HOSPITAL_ADMISSION//{_pick(rng, ADMISSION_TYPES)}"
            put(i, a, admit_code, "Hospital admission", None, _ADMIT)
            where = "DIED" if stay.terminal else _pick(rng, DISCHARGE_LOCATIONS)
            put(i, d, f"HOSPITAL_DISCHARGE//{where}", "Hospital discharge", None, _DISCHARGE)
            draws = [a + rng.uniform(0.5, 3.0) * HOUR]
            while True:  # the next morning's draw, around 05:00, and every morning after
                nxt = np.floor(draws[-1]) + 1.0 + (5.0 + rng.normal(0.0, 1.5)) * HOUR
                if nxt >= d:
                    break
                draws.append(nxt)
            t = np.asarray(draws)
            if stay.icu is not None:
                lo, hi = stay.icu
                unit = CAREUNITS[int(rng.integers(len(CAREUNITS)))]
                put(i, lo, f"ICU_ADMISSION//{unit}", "ICU admission", None, _ICU_IN)
                put(i, hi, f"ICU_DISCHARGE//{unit}", "ICU discharge", None, _ICU_OUT)
                evening = np.floor(t[(t >= lo) & (t < hi)]) + 17.0 * HOUR
                t = np.sort(np.concatenate([t, evening[(evening >= lo) & (evening < hi)]]))
            t = _to_minute(t)
            shocked = rng.random() < _sigmoid(-1.8 + 1.0 * sev)
            course = {
                "creatinine": _course(
                    rng, t, a, base["creatinine"], rng.uniform(0.4, 2.5), _sigmoid(-1.4 + 0.8 * sev), 0.06
                ),
                "sodium": _course(rng, t, a, base["sodium"], -rng.uniform(3.0, 12.0), _sigmoid(-1.6 + 0.5 * sev), 1.2),
                "bicarbonate": _course(
                    rng, t, a, base["bicarbonate"], -rng.uniform(3.0, 10.0), _sigmoid(-1.6 + 0.8 * sev), 1.0
                ),
                "potassium": _course(
                    rng, t, a, base["potassium"], rng.uniform(0.3, 1.5), _sigmoid(-2.0 + 0.6 * sev), 0.2
                ),
                "chloride": _course(rng, t, a, base["chloride"], rng.uniform(-5.0, 5.0), 0.3, 1.5),
                "bun": _course(rng, t, a, base["bun"], rng.uniform(5.0, 40.0), _sigmoid(-1.4 + 0.8 * sev), 2.0),
                "glucose": _course(rng, t, a, base["glucose"], rng.uniform(20.0, 120.0), 0.3, 15.0),
                "hemoglobin": _course(
                    rng, t, a, base["hemoglobin"], -rng.uniform(0.8, 3.5), _sigmoid(-1.2 + 0.6 * sev), 0.25
                ),
                "wbc": _course(rng, t, a, base["wbc"], rng.uniform(3.0, 14.0), _sigmoid(-1.4 + 0.8 * sev), 0.5),
                "platelets": _course(
                    rng, t, a, base["platelets"], -rng.uniform(60.0, 180.0), _sigmoid(-2.0 + 0.7 * sev), 12.0
                ),
            }
            course["hematocrit"] = 3.0 * course["hemoglobin"] + rng.normal(0.0, 0.8, t.shape)
            flags = {
                "aki": course["creatinine"].max() > max(1.3, 1.5 * base["creatinine"]),
                "hyponatremia": course["sodium"].min() < 135,
                "acidosis": course["bicarbonate"].min() < 22,
                "anemia": course["hemoglobin"].min() < 12,
                "leukocytosis": course["wbc"].max() > 11,
                "thrombocytopenia": course["platelets"].min() < 150,
            }
            in_icu = np.zeros(t.shape, bool) if stay.icu is None else (t >= stay.icu[0]) & (t < stay.icu[1])
            for panel in (CHEM, CBC):
                for name, itemid, unit, dec, low, high in panel:
                    value = np.round(np.clip(course[name], low, high), dec)
                    put(i, t, lab(itemid, unit), f"{name} ({unit})", value, _LAB)
                    if name in ICU_CHARTED and in_icu.any():
                        c_item, c_unit = ICU_CHARTED[name]
                        put(i, t[in_icu], lab(c_item, c_unit), f"{name}, charted ({c_unit})", value[in_icu], _LAB)
            if stay.icu is not None:
                lo, hi = stay.icu
                nbp = _to_minute(np.arange(lo + 0.5 * HOUR, hi, 3.0 * HOUR))
                drop = rng.uniform(10.0, 30.0) if shocked else 0.0
                for (itemid, unit), every, keep in ((MAP_NBP, 3.0, True), (MAP_ART, 1.0, rng.random() < 0.4)):
                    if not keep:
                        continue
                    tm = nbp if every == 3.0 else _to_minute(np.arange(lo + 0.25 * HOUR, hi, HOUR))
                    value = _course(rng, tm, lo, base["map"], -drop, 1.0 if shocked else 0.0, 6.0)
                    put(
                        i,
                        tm,
                        lab(itemid, unit),
                        f"mean arterial pressure ({unit})",
                        np.round(np.clip(value, 30, 150)),
                        _LAB,
                    )
                flags["hypotension"] = bool(shocked)
            dx(i, d, REASONS[int(rng.integers(len(REASONS)))] if sev < 1.0 else REASONS[6])
            for d_i, disease in enumerate(names):
                if cohort.diagnosis[i, d_i] <= a:  # chronic diseases known by this stay
                    c9, c10, desc = DIAGNOSES[disease]
                    dx(i, d, (c9[0], c10[0], desc))
            for key, shown in flags.items():
                if shown:
                    dx(i, d, ACUTE[key])

    events = events_frame(rows, cohort, static_last=False)  # static rows first, then by time
    no_codes = np.full((cohort.n, len(names)), None, dtype=object)  # onsets keep the cohort's truth
    return HospitalEHR(events=events, catalogue=catalogue, diagnosis_code=no_codes)
