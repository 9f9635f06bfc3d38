"""Local training loop (centralized baseline and each federated site) and its checkpoints."""

from healthfm_core.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from healthfm_core.train.trainer import TrainConfig, Trainer, TrainResult, train_local

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train_local",
]
