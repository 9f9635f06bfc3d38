"""Run configs of the tests' federations: `fed_config`, a tiny two-round run one site may hold
(checkpoints, replies, resume); `three_site_config`, the three-site tiny federation trained for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm_core.terms.model_config import load_model_config
from server.config import FederationConfig, ServerOptimizerConfig


def fed_config(out_dir: Path, **overrides: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        out_dir=out_dir, model=load_model_config("tiny"), rounds=2, min_nodes=1, eval_tasks=["onset_hypertension_365d"]
    )
    return FederationConfig(**{**base, **overrides})


def three_site_config(out_dir: Path, **overrides: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        out_dir=out_dir,
        model=load_model_config("tiny"),
        rounds=2,
        local_steps=2,
        lr=3e-3,
        batch_size=8,
        max_events=64,
        max_patches=8,
        seed=3,
        min_nodes=3,
        vocab_min_subjects=5,
        server_optimizer=ServerOptimizerConfig(lr=0.01),  # its moments must survive a resume
        eval_tasks=["onset_hypertension_365d", "wearable_resting_hr"],
        eval_n_boot=10,
    )
    base.update(overrides)
    return FederationConfig(**base)
