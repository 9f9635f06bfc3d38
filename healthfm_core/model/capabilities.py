"""The methods the training loop, the DP step and the probes call on a model beyond nn.Module.

They accept any torch.nn.Module (HealthFM, the test models, the eval pooling wrapper), so they
check for the one method they need with isinstance against these runtime-checkable protocols:
a model without it fails with its type named, and the type checker sees the method's signature
(nn.Module.__getattr__ otherwise types every attribute as Tensor | Module).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from healthfm_core.data.sequences.batch import Batch


@runtime_checkable
class Pretrainable(Protocol):
    """A model with pretraining_losses (e.g. HealthFM): every loss by name plus "total"."""

    def pretraining_losses(
        self, batch: Batch, weights: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Embedder(Protocol):
    """A model with embed: the [B, d] representation of each sample at its prediction_time."""

    def embed(self, batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class QueryEmbedder(Protocol):
    """A model with embed_at: [B, Q, d] representations at Q query times [B, Q] per sample in one
    pass (a time-causal model: each reads only what happened by its time)."""

    def embed_at(self, batch: Batch, query_time: torch.Tensor) -> torch.Tensor: ...
