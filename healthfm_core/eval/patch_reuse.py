"""Reuse of wearable patch encodings while a frozen model embeds many samples.

Why: the wearable encoder (full attention over a patch's epochs) is most of an embedding's
cost at a wearable site, and the samples of one subject see largely the same patches: every
visit after a wear period sees that period's last `max_patches` patches, and a wear period's
midpoint row sees most of the previous one's. A patch's encoding depends only on its epochs and
their visibility mask (the encoder has no cross-patch context), so each distinct (epochs, mask)
is encoded once per evaluation and looked up afterwards.

What is reused is the encoder's `pool` (a patch's pooled epoch states); the output projection
still runs on every patch of the call, as without reuse: a matrix product's rounding on CPU can
depend on its number of rows when they are few (here, a call's patch count), while `pool`'s
products have E rows per patch. Measured bit for bit against the straightforward path
(tests/unit/test_eval_reuse.py); patches shorter than MIN_EPOCHS are not reused (cheap to encode,
and their products are few rows).

The lookup key is a 128-bit BLAKE2b digest of the patch's epoch values and mask bytes, so a
patch truncated at a prediction time (fewer visible epochs) is a different key from the whole
patch. The cache lives for one `reused_patch_encodings` block: one set of weights, eval mode, no
gradients; it is dropped when the block ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MIN_EPOCHS = 16  # patches of fewer epochs are encoded as they come (see the module docstring)


@dataclass
class PatchReuse:
    """What a block encoded: patches asked for, and those actually run through the encoder."""

    asked: int = 0
    encoded: int = 0


def _digests(epochs: Tensor, mask: Tensor) -> list[bytes]:
    values = np.ascontiguousarray(epochs.detach().cpu().numpy()).reshape(epochs.shape[0], -1)
    masks = np.ascontiguousarray(mask.detach().cpu().numpy()).reshape(mask.shape[0], -1)
    out = []
    for v, m in zip(values, masks, strict=True):  # the digest of the two rows' bytes, without joining them
        h = hashlib.blake2b(v.data, digest_size=16)
        h.update(m.data)
        out.append(h.digest())
    return out


@contextmanager
def reused_patch_encodings(model: torch.nn.Module) -> Iterator[PatchReuse]:
    """Within the block, `model.wearable_encoder` pools each distinct patch once (see the
    module docstring). A model without a wearable encoder is left as it is. The model must be in
    eval mode with gradients off for the whole block (dropout would make a patch's encoding
    differ between calls); both are checked at each call."""
    stats = PatchReuse()
    encoder = getattr(model, "wearable_encoder", None)
    if encoder is None:
        yield stats
        return
    inner = encoder.pool  # the bound method of the class
    row_of: dict[bytes, int] = {}  # digest -> its row in `pooled`
    pooled: Tensor | None = None  # [capacity, wearable d_model]; rows [0, len(row_of)) filled

    def pool(epochs: Tensor, epoch_mask: Tensor) -> Tensor:
        nonlocal pooled
        if encoder.training or torch.is_grad_enabled():
            raise RuntimeError("reused_patch_encodings: the model must be in eval mode under torch.no_grad()")
        stats.asked += epochs.shape[0]
        if epochs.shape[0] == 0 or epochs.shape[1] < MIN_EPOCHS:
            stats.encoded += epochs.shape[0]
            return inner(epochs, epoch_mask)
        keys = _digests(epochs, epoch_mask)
        new: dict[bytes, int] = {}  # digest -> its first patch in this call
        for i, key in enumerate(keys):
            if key not in row_of and key not in new:
                new[key] = i
        if new:
            rows = torch.tensor(list(new.values()), dtype=torch.long, device=epochs.device)
            out = inner(epochs[rows], epoch_mask[rows])
            stats.encoded += len(new)
            start = len(row_of)
            if pooled is None or start + len(new) > pooled.shape[0]:  # grow by doubling: amortised copies
                grown = out.new_empty((max(2 * (start + len(new)), 1024), out.shape[1]))
                if pooled is not None:
                    grown[:start] = pooled[:start]
                pooled = grown
            pooled[start : start + len(new)] = out
            row_of.update((key, start + j) for j, key in enumerate(new))
        assert pooled is not None
        # One gather for the call: the same values as the encoder's rows, copied.
        return pooled.index_select(
            0, torch.tensor([row_of[key] for key in keys], dtype=torch.long, device=epochs.device)
        )

    encoder.pool = pool  # an instance attribute: the encoder's forward calls self.pool
    try:
        yield stats
    finally:
        del encoder.pool  # the class's pool again
        row_of.clear()
        pooled = None


__all__ = ["PatchReuse", "reused_patch_encodings"]
