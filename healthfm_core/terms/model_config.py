"""Model configuration: sizes, time encoding, decay-rate bounds, pretraining and curriculum knobs.

The YAML files live in configs/model/<name>.yaml at the repository root (the parent of the
healthfm_core package); Hydra composes the same files under the `model` group.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from healthfm_core.strict_files import read_yaml
from healthfm_core.terms.site_layout import MODALITIES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"

# The pretraining objectives by name (objectives.py computes them; objective_weights.py weighs
# and schedules them): the curriculum raises the cross-modal ones later than the intra-modal ones.
INTRA_MODAL = ("ehr_masked_code", "ehr_masked_value", "wear_masked", "prs_masked", "next_visit", "future_codes")
CROSS_MODAL = ("predictive", "align")
LOSS_NAMES = INTRA_MODAL + CROSS_MODAL


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WearableEncoderConfig(_Strict):
    """Transformer over the 30-second epochs of one patch, pooled to one token per patch."""

    d_model: int = Field(gt=0)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> WearableEncoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"wearable.d_model={self.d_model} is not divisible by wearable.n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"wearable.d_model={self.d_model} must be even (sin/cos epoch positions)")
        return self


class GenomicsEncoderConfig(_Strict):
    """MLP over the PRS vector (value*mask, mask) to a static conditioning vector."""

    d_hidden: int = Field(gt=0)
    n_layers: int = Field(default=2, ge=1)


class PretrainingConfig(_Strict):
    """How the pretraining objectives build their targets (the weights come per step/round)."""

    ehr_mask_prob: float = Field(default=0.15, ge=0, le=1)
    wear_mask_prob: float = Field(default=0.15, ge=0, le=1)
    prs_mask_prob: float = Field(default=0.25, ge=0, le=1)
    # prs_masked also scores the traits left visible (an autoencoder's term beside the masked
    # one). Why: PRS traits are nearly independent, so a hidden trait cannot be predicted from the
    # others; the masked term alone is minimised by a constant and drives the encoder to discard
    # the scores (issue 31: the cross-fitted R^2 of the T2D PRS from the encoder's output fell
    # from 0.95 at init to ~0.5). False: the masked term only, as before.
    prs_reconstruct_shown: StrictBool = False
    # Predictive coding: codes occurring in (anchor, anchor + horizon] after a wearable patch.
    predictive_horizon_days: float = Field(default=180.0, gt=0)
    max_anchors_per_sample: int = Field(default=8, ge=1)
    # Alignment: EHR events within this many days of the wear period form the EHR summary.
    align_window_days: float = Field(default=90.0, gt=0)
    align_temperature: float = Field(default=0.1, gt=0)
    # Next-visit: a visit is the set of events in one day window (floor(time) in days).
    max_visits_per_sample: int = Field(default=8, ge=1)
    # Weight of the repeat-code term against the new-onset term (the repeat-domination guard).
    next_visit_repeat_weight: float = Field(default=0.1, ge=0)
    # next_visit and future_codes score codes already in the history (repeats) apart from new
    # onsets, each term balanced on its own, the repeat term scaled by its weight. False: one
    # balanced term over every code, repeats and new onsets alike (the naive objective, where
    # copying the history is most of the signal; the evidence job's pitfall comparison).
    separate_repeats: StrictBool = True
    # Future codes: the query token, placed at a random anchor event time, predicts the codes in
    # (anchor, anchor + horizon] for each horizon (one head each). This is the objective that
    # trains the state `embed` returns; the horizons match the new-onset tasks.
    future_horizons_days: tuple[float, ...] = Field(default=(30.0, 90.0, 180.0, 365.0), min_length=1)
    future_codes_repeat_weight: float = Field(default=0.1, ge=0)
    # Query tokens per sample for future_codes, each at its own random anchor: Q times the
    # supervision of the state `embed` returns for almost no extra compute (queries are never read).
    future_anchors_per_sample: int = Field(default=8, ge=1)
    # "log": total = sum_i w_i log(eps + L_i), i.e. each loss's gradient divided by its own
    # magnitude (uncertainty weighting at its closed-form optimum); "none": total = sum_i w_i L_i.
    loss_balance: Literal["log", "none"] = "log"
    balance_eps: float = Field(default=0.01, gt=0)

    @model_validator(mode="after")
    def _horizons_positive(self) -> PretrainingConfig:
        bad = [h for h in self.future_horizons_days if not h > 0]
        if bad:
            raise ValueError(f"future_horizons_days={list(self.future_horizons_days)} holds non-positive {bad}")
        return self


class CurriculumConfig(_Strict):
    """Intra-modal weights first, cross-modal weights rising later (fractions of training)."""

    cross_start: float = Field(default=0.1, ge=0, le=1)
    cross_end: float = Field(default=0.5, ge=0, le=1)
    # Intra-modal weights decay linearly from 1 to this floor over the same ramp.
    intra_floor: float = Field(default=0.5, ge=0, le=1)
    # False: every objective at weight 1 from the first step to the last (no schedule).
    enabled: StrictBool = True
    # Objectives held at weight 0 throughout (LOSS_NAMES): an objective ablation; a federation's
    # server sends the zero weights each round like any other.
    objectives_off: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _ordered(self) -> CurriculumConfig:
        if self.cross_end < self.cross_start:
            raise ValueError(f"curriculum.cross_end={self.cross_end} < curriculum.cross_start={self.cross_start}")
        if unknown := [n for n in self.objectives_off if n not in LOSS_NAMES]:
            raise ValueError(f"curriculum.objectives_off holds {unknown}, not objectives (known: {list(LOSS_NAMES)})")
        if len(set(self.objectives_off)) != len(self.objectives_off):
            raise ValueError(f"curriculum.objectives_off={list(self.objectives_off)} repeats a name")
        return self


class ModelConfig(_Strict):
    name: str
    d_model: int = Field(gt=0)  # the shared space every modality maps into
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    time_encoding: Literal["ct_kernel", "sinusoidal"] = "ct_kernel"
    # Continuous-time kernel: M components per head, rates bounded in [min, max] per day.
    n_decay_components: int = Field(default=4, ge=1)
    min_rate_per_day: float = Field(default=1.0 / (20 * 365.25), gt=0)
    max_rate_per_day: float = Field(default=96.0, gt=0)
    init_timescale_min_days: float = Field(default=1.0 / 24, gt=0)  # one hour
    init_timescale_max_days: float = Field(default=5 * 365.25, gt=0)  # five years
    modality_dropout: float = Field(default=0.1, ge=0, lt=1)
    wearable: WearableEncoderConfig
    genomics: GenomicsEncoderConfig
    pretraining: PretrainingConfig = PretrainingConfig()
    curriculum: CurriculumConfig = CurriculumConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.min_rate_per_day >= self.max_rate_per_day:
            raise ValueError(
                f"min_rate_per_day={self.min_rate_per_day} must be below max_rate_per_day={self.max_rate_per_day}"
            )
        lo, hi = 1.0 / self.max_rate_per_day, 1.0 / self.min_rate_per_day
        for field in ("init_timescale_min_days", "init_timescale_max_days"):
            value = getattr(self, field)
            if not lo <= value <= hi:
                raise ValueError(f"{field}={value} lies outside the rate bounds' timescales [{lo:.4g}, {hi:.4g}] days")
        if self.init_timescale_min_days > self.init_timescale_max_days:
            raise ValueError("init_timescale_min_days must not exceed init_timescale_max_days")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def log_rate_bounds(self) -> tuple[float, float]:
        return math.log(self.min_rate_per_day), math.log(self.max_rate_per_day)


def available_model_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def model_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """Validate a mapping (e.g. a Hydra node turned into a dict); errors name the source."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(part) for part in e["loc"]) or "<top level>"
            shown = "" if isinstance(e.get("input"), dict) else f" (value: {e.get('input')!r})"
            lines.append(f"  {where}: {e['msg']}{shown}")
        raise ValueError(f"invalid model config {source}:\n" + "\n".join(lines)) from None


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """`tiny` / `small` / `paper` (configs/model/<name>.yaml) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        path = candidate
    else:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"model config {str(name_or_path)!r} not found at {path} (known: {', '.join(available_model_configs())})"
        )
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"invalid model config {path}: expected a mapping at top level, got {type(data).__name__}")
    return model_config_from_dict(data, source=str(path))


def model_modalities(n_prs_traits: int, modalities: Collection[str] | None = None) -> tuple[str, ...]:
    """The modalities a model is built with, in MODALITIES order, checked against the vocabulary.

    None: EHR and wearables, plus genomics when the vocabulary has PRS traits (n_prs_traits >= 1).
    EHR is required: the event stream is what every MEDS site has, what the vocabulary, the
    ages and the EHR objectives come from (an EHR-free model is not supported). Genomics needs
    at least one PRS trait.
    """
    if n_prs_traits < 0:
        raise ValueError(f"n_prs_traits={n_prs_traits} must be >= 0")
    if modalities is None:
        wanted = {"ehr", "wearables"} | ({"genomics"} if n_prs_traits >= 1 else set())
    else:
        wanted = set(modalities)
        if isinstance(modalities, str) or wanted - set(MODALITIES):
            raise ValueError(f"modalities={modalities!r}: expected a subset of {list(MODALITIES)}")
        if "ehr" not in wanted:
            raise ValueError(
                f"modalities={sorted(wanted)} lack 'ehr': a model without the EHR stream is not "
                "supported (the vocabulary, ages and EHR objectives come from it)"
            )
        if "genomics" in wanted and n_prs_traits < 1:
            raise ValueError(
                f"modalities include 'genomics' but n_prs_traits={n_prs_traits}: the vocabulary "
                "agreed no PRS trait (leave 'genomics' out)"
            )
    return tuple(m for m in MODALITIES if m in wanted)


def embedding_width(cfg: ModelConfig, modalities: Collection[str]) -> int:
    """Width of HealthFM.embed for a model of these modalities: the query state (d_model), then
    the genomics conditioning (genomics.d_hidden) on a model with genomics."""
    return cfg.d_model + (cfg.genomics.d_hidden if "genomics" in modalities else 0)
