"""The project's Hydra configs composed as the jobs compose them."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
