"""Scenario configs for the synthetic federation (configs/scenario/<name>.yaml), validated by pydantic.

A scenario names the sites (size, age mix, prevalence, modalities and the fraction of subjects
having each, devices with or without PPG, date offset) and the generative model shared by all
sites (latent health state, disease hazards). The disease model has defaults here so that a
scenario file only needs to list its sites; any field can be overridden in the YAML.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from healthfm_core.strict_files import StrictFileError, read_yaml
from healthfm_core.terms.site_layout import MODALITIES

LATENT_DIMS: tuple[str, ...] = ("metabolic", "fitness", "regularity")

# The repository's configs/scenario, where scenario names resolve to files.
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "configs" / "scenario"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgeMix(_Strict):
    """Age in years at the start of follow-up: a normal distribution clipped to [min, max]."""

    mean: float = 57.0
    sd: float = Field(default=8.0, gt=0)
    min: float = Field(default=40.0, ge=18)
    max: float = Field(default=75.0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> AgeMix:
        if not self.min < self.max:
            raise ValueError(f"age.min ({self.min}) must be below age.max ({self.max})")
        return self


class SiteSpec(_Strict):
    """One site of the federation."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: Literal["biobank", "hospital", "genomics_cohort", "cohort"] = "hospital"
    n_subjects: int = Field(default=2000, ge=1)
    age: AgeMix = AgeMix()
    prevalence_multiplier: float = Field(default=1.0, gt=0)
    visits_per_year: float = Field(default=2.0, gt=0)
    # Fraction of subjects having each modality. Every subject has an EHR record (MEDS needs
    # events), so ehr must be 1.0; wearables and genomics may be any fraction, 0 = absent.
    modalities: dict[str, float] = Field(default_factory=lambda: {"ehr": 1.0})
    ppg: StrictBool = True  # devices with a PPG sensor record heart rate; without it hr_bpm is null
    wear_days: int = Field(default=7, ge=1, le=28)
    wear_periods: int = Field(default=1, ge=1, le=8)  # wear periods per subject with wearables
    date_offset_years: int = Field(default=0, ge=-200, le=200)  # MIMIC-style shift of every date
    subjects_per_shard: int = Field(default=1000, ge=1)
    subject_id_start: int | None = Field(default=None, ge=0)
    # "hospital": MIMIC-style MEDS export (ICD-9 then ICD-10 codes, lab panels, polars-written); see hospital.py
    # "mimic": MIMIC-IV-shaped hospital and ICU stays for MEDS-DEV's tasks; see mimic.py
    ehr_format: Literal["synthetic", "hospital", "mimic"] = "synthetic"

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: dict[str, float]) -> dict[str, float]:
        for name, fraction in value.items():
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"modalities.{name} = {fraction} is not a fraction in [0, 1]")
        if value.get("ehr", 1.0) != 1.0:
            raise ValueError(f"modalities.ehr = {value['ehr']}: every synthetic subject has an EHR record (1.0)")
        return {"ehr": 1.0, **{k: v for k, v in value.items() if k != "ehr"}}

    def fraction(self, modality: str) -> float:
        return float(self.modalities.get(modality, 0.0))


class LatentSpec(_Strict):
    """One Ornstein-Uhlenbeck dimension of the latent health state (standardised units).

    mean(t) = age_per_decade * (age(t) - 55) / 10 + sum_trait prs[trait] * PRS_trait + u_subject,
    u_subject ~ N(0, between_subject_sd); the OU fluctuates around it with stationary sd 1 and
    mean reversion `theta_per_year`. Age rises along follow-up, so the mean drifts.
    """

    theta_per_year: float = Field(gt=0)
    age_per_decade: float = 0.0
    prs: dict[str, float] = Field(default_factory=dict)
    between_subject_sd: float = Field(default=0.5, ge=0)


def _default_latent() -> dict[str, LatentSpec]:
    return {
        # Higher metabolic = worse (insulin resistance, adiposity).
        "metabolic": LatentSpec(
            theta_per_year=0.4, age_per_decade=0.2, prs={"T2D": 0.35, "CAD": 0.1}, between_subject_sd=0.6
        ),
        # Higher fitness = better cardiorespiratory fitness.
        "fitness": LatentSpec(
            theta_per_year=0.4, age_per_decade=-0.3, prs={"CAD": -0.15, "COPD": -0.1}, between_subject_sd=0.6
        ),
        # Higher regularity = more regular sleep/activity rhythm.
        "regularity": LatentSpec(theta_per_year=0.8, age_per_decade=0.05, prs={}, between_subject_sd=0.5),
    }


class DiseaseSpec(_Strict):
    """Hazard of (subclinical) onset, per year, evaluated each grid step:

    h = base_rate_per_year * prevalence_multiplier * exp(beta_prs * PRS + sum_j beta_latent[j] * x_j(t)
        + beta_age * (age(t) - 55) / 10 + beta_male * male + beta_smoker * smoker
        + sum_d' beta_comorbidity[d'] * diagnosed_d'(t)).
    The diagnosis (the code in the EHR) follows the subclinical onset after a Gamma(2, lag_days / 2)
    lag (mean lag_days): the prodrome during which wearables already shift.
    """

    code: str
    description: str
    prs_trait: str
    base_rate_per_year: float = Field(gt=0)
    beta_prs: float = 0.0
    beta_latent: dict[str, float] = Field(default_factory=dict)
    beta_age: float = 0.0
    beta_male: float = 0.0
    beta_smoker: float = 0.0
    beta_comorbidity: dict[str, float] = Field(default_factory=dict)
    # Fraction of the baseline hazard accumulated before follow-up: P(prevalent) = 1 - exp(-h0 * years).
    baseline_prevalence_years: float = Field(default=4.0, ge=0)
    lag_days: float = Field(default=120.0, gt=0)
    medications: list[str] = Field(default_factory=list)
    # Effect on wearables while subclinical (full) and after diagnosis (half).
    wear_hr_bpm: float = 0.0
    wear_activity_factor: float = Field(default=1.0, gt=0)
    # Structure a linear read-out of recent values cannot capture (all 0 by default, so existing
    # scenarios are unchanged; see docs/evidence.md for the `trajectories` scenario that uses them):
    # + sum_j beta_latent_change[j] * (x_j(t) - x_j(t - ScenarioConfig.change_window_days)), the
    #   trajectory over the past window (rising metabolic state, falling fitness, a rhythm that
    #   becomes irregular), and
    # + sum_j beta_prs_latent[j] * PRS * x_j(t), genetic susceptibility amplifying the state.
    beta_latent_change: dict[str, float] = Field(default_factory=dict)
    beta_prs_latent: dict[str, float] = Field(default_factory=dict)

    @field_validator("beta_latent", "beta_latent_change", "beta_prs_latent")
    @classmethod
    def _latent_names(cls, value: dict[str, float], info) -> dict[str, float]:
        for name in value:
            if name not in LATENT_DIMS:
                raise ValueError(f"{info.field_name}: unknown latent dimension {name!r}; expected one of {LATENT_DIMS}")
        return value

    @property
    def nonlinear(self) -> bool:
        """Whether the hazard has a trajectory or a PRS-by-state term."""
        return any(v != 0.0 for v in (*self.beta_latent_change.values(), *self.beta_prs_latent.values()))


def _default_diseases() -> dict[str, DiseaseSpec]:
    return {
        "T2D": DiseaseSpec(
            code="ICD10//E11",
            description="Type 2 diabetes mellitus",
            prs_trait="T2D",
            base_rate_per_year=0.010,
            beta_prs=0.5,
            beta_latent={"metabolic": 0.8, "fitness": -0.2, "regularity": -0.15},
            beta_age=0.25,
            beta_male=0.2,
            beta_smoker=0.1,
            lag_days=150.0,
            medications=["ATC//A10BA02"],
            wear_hr_bpm=3.0,
            wear_activity_factor=0.85,
        ),
        "CAD": DiseaseSpec(
            code="ICD10//I25",
            description="Chronic ischaemic heart disease",
            prs_trait="CAD",
            base_rate_per_year=0.006,
            beta_prs=0.45,
            beta_latent={"metabolic": 0.35, "fitness": -0.6},
            beta_age=0.5,
            beta_male=0.5,
            beta_smoker=0.5,
            beta_comorbidity={"T2D": 0.4, "HTN": 0.3},
            lag_days=120.0,
            medications=["ATC//C10AA05", "ATC//B01AC06"],
            wear_hr_bpm=6.0,
            wear_activity_factor=0.75,
        ),
        "HTN": DiseaseSpec(
            code="ICD10//I10",
            description="Essential (primary) hypertension",
            prs_trait="HTN",
            base_rate_per_year=0.022,
            beta_prs=0.4,
            beta_latent={"metabolic": 0.45, "fitness": -0.3},
            beta_age=0.35,
            beta_male=0.1,
            lag_days=90.0,
            medications=["ATC//C09AA02", "ATC//C08CA01"],
            wear_hr_bpm=2.0,
            wear_activity_factor=0.95,
        ),
        "COPD": DiseaseSpec(
            code="ICD10//J44",
            description="Other chronic obstructive pulmonary disease",
            prs_trait="COPD",
            base_rate_per_year=0.004,
            beta_prs=0.35,
            beta_latent={"fitness": -0.45, "regularity": -0.2},
            beta_age=0.45,
            beta_smoker=1.2,
            lag_days=150.0,
            medications=["ATC//R03AC02", "ATC//R03BB04"],
            wear_hr_bpm=5.0,
            wear_activity_factor=0.7,
        ),
    }


class DeathSpec(_Strict):
    """Death hazard per year: base * exp(beta_age * (age - 55)/10 + latent terms + per diagnosis)."""

    base_rate_per_year: float = Field(default=0.004, gt=0)
    beta_age: float = 0.9
    beta_latent: dict[str, float] = Field(default_factory=lambda: {"metabolic": 0.25, "fitness": -0.3})
    beta_per_diagnosis: float = 0.35
    beta_smoker: float = 0.5


class ScenarioConfig(_Strict):
    name: str
    description: str = ""
    start_date: _dt.date = _dt.date(2012, 1, 1)
    follow_up_years: float = Field(default=6.0, gt=0.5, le=30)
    step_days: float = Field(default=30.4375, gt=0, le=92)  # the latent grid: monthly by default
    smoker_fraction: float = Field(default=0.18, ge=0, le=1)
    truth_every_days: float = Field(default=90.0, gt=0)  # spacing of prediction times in truth/risk
    horizons_days: list[int] = Field(default_factory=lambda: [30, 90, 180, 365])
    # The window of the diseases' beta_latent_change terms (the change of the state over it).
    change_window_days: float = Field(default=365.25, gt=0)
    latent: dict[str, LatentSpec] = Field(default_factory=_default_latent)
    diseases: dict[str, DiseaseSpec] = Field(default_factory=_default_diseases)
    death: DeathSpec = DeathSpec()
    sites: list[SiteSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioConfig:
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sites: duplicate site name(s) {dup}")
        if set(self.latent) != set(LATENT_DIMS):
            raise ValueError(f"latent: expected exactly the dimensions {LATENT_DIMS}, got {sorted(self.latent)}")
        for key, disease in self.diseases.items():
            for other in disease.beta_comorbidity:
                if other not in self.diseases:
                    raise ValueError(f"diseases.{key}.beta_comorbidity: unknown disease {other!r}")
        traits = {d.prs_trait for d in self.diseases.values()}
        for dim, spec in self.latent.items():
            for trait in spec.prs:
                if trait not in traits:
                    raise ValueError(f"latent.{dim}.prs: unknown PRS trait {trait!r}; traits are {sorted(traits)}")
        return self

    @property
    def prs_traits(self) -> list[str]:
        """PRS traits in a fixed order (the order of the diseases)."""
        out: list[str] = []
        for d in self.diseases.values():
            if d.prs_trait not in out:
                out.append(d.prs_trait)
        return out

    def with_n_subjects(self, n_subjects: int | None) -> ScenarioConfig:
        if n_subjects is None:
            return self
        if n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
        return self.model_copy(update={"sites": [s.model_copy(update={"n_subjects": n_subjects}) for s in self.sites]})


def load_scenario(scenario: str | Path | ScenarioConfig | dict) -> ScenarioConfig:
    """A scenario by name (configs/scenario/<name>.yaml), by path, as a mapping, or as is."""
    if isinstance(scenario, ScenarioConfig):
        return scenario
    if isinstance(scenario, dict):
        return ScenarioConfig.model_validate(scenario)
    path = Path(scenario)
    if not (path.suffix in {".yaml", ".yml"} or path.exists()):
        path = SCENARIO_DIR / f"{scenario}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")) if SCENARIO_DIR.is_dir() else []
        raise FileNotFoundError(f"scenario {str(scenario)!r}: no file {path} (known scenarios: {known})")
    try:
        raw = read_yaml(path)
    except StrictFileError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        return ScenarioConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid scenario:\n{exc}") from exc
