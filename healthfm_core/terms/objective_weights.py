"""The pretraining objectives' names, their weights and the curriculum that schedules them.

The weights are part of the wire protocol (a server sends them each round, protocol/round_config.py)
and a site reports one loss per name (protocol/train_reply.py), so they live apart from the losses
themselves (model/objectives.py), with no torch: the protocol reads this file, not the model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from healthfm_core.terms.model_config import CROSS_MODAL, INTRA_MODAL, LOSS_NAMES, CurriculumConfig, ModelConfig


class ObjectiveWeights(BaseModel):
    """One non-negative weight per objective (a server sends these each round)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ehr_masked_code: float = Field(default=1.0, ge=0)
    ehr_masked_value: float = Field(default=1.0, ge=0)
    wear_masked: float = Field(default=1.0, ge=0)
    prs_masked: float = Field(default=1.0, ge=0)
    next_visit: float = Field(default=1.0, ge=0)
    future_codes: float = Field(default=1.0, ge=0)
    predictive: float = Field(default=1.0, ge=0)
    align: float = Field(default=1.0, ge=0)


def curriculum_weights(step: int, total: int, cfg: ModelConfig | CurriculumConfig) -> ObjectiveWeights:
    """Weights at `step` of `total` (steps or rounds): intra-modal objectives first, cross-modal rising.

    With progress s = step/total, the cross-modal weight ramps linearly from 0 (s <= cross_start) to
    1 (s >= cross_end); the intra-modal weight falls over the same ramp from 1 to intra_floor.
    With the curriculum off (`enabled` false) every weight is 1 throughout; the objectives of
    `objectives_off` are 0 either way.
    """
    cur = cfg.curriculum if isinstance(cfg, ModelConfig) else cfg
    if total <= 0:
        raise ValueError(f"curriculum total={total} must be positive")
    if step < 0:
        raise ValueError(f"curriculum step={step} must be >= 0")
    off = dict.fromkeys(cur.objectives_off, 0.0)
    if not cur.enabled:
        return ObjectiveWeights(**{**dict.fromkeys(LOSS_NAMES, 1.0), **off})
    progress = min(step / total, 1.0)
    if cur.cross_end > cur.cross_start:
        ramp = min(max((progress - cur.cross_start) / (cur.cross_end - cur.cross_start), 0.0), 1.0)
    else:
        ramp = 1.0 if progress >= cur.cross_start else 0.0
    intra = 1.0 - (1.0 - cur.intra_floor) * ramp
    return ObjectiveWeights(**{**dict.fromkeys(INTRA_MODAL, intra), **dict.fromkeys(CROSS_MODAL, ramp), **off})
