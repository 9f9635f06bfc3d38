"""Dropout whose random numbers cost what they should on CPU.

``nn.Dropout`` draws its mask with ``bernoulli_``, one 32-bit Mersenne Twister draw and a float
comparison per element, not vectorised: on CPU it cost ~18x an elementwise multiply and 7% of a
``small`` training step (most of it in the wearable encoder's [patches, epochs, hidden] MLP).
Here one 64-bit draw gives four 16-bit uniforms (``random_`` over int64, viewed as int16), and
an element is kept when its uniform is at least a threshold. The keep probability is thereby
rounded to a multiple of 2^-16 (|error| <= 7.7e-6), and the kept elements are scaled by the
inverse of that rounded probability, so the output equals the input in expectation exactly, as
with ``nn.Dropout``. Draws come from the default generator (``torch.manual_seed`` governs them,
as it does nn.Dropout's); the masks themselves differ from ``nn.Dropout``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16


def keep_threshold(p: float) -> tuple[int, float]:
    """(int16 threshold, scale) for drop probability p: keep where uniform int16 >= threshold,
    i.e. with probability 1 - round(p * 2^16) / 2^16; scale is the inverse of that."""
    dropped = min(LEVELS - 1, max(0, round(p * LEVELS)))
    return dropped - LEVELS // 2, LEVELS / (LEVELS - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``p`` (identity when not training or p = 0).
    CPU tensors take the cheap mask; other devices, and p = 1, keep ``F.dropout``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, training=True)
    threshold, scale = keep_threshold(p)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    uniform = bits.view(torch.int16)[: x.numel()].view(x.shape)
    mask = torch.where(uniform >= threshold, torch.tensor(scale, dtype=x.dtype), torch.tensor(0.0, dtype=x.dtype))
    return x * mask


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same place in state dicts and reprs) with the cheap mask of
    ``dropout`` on CPU. ``inplace`` is accepted and ignored on CPU (the output is a new tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
