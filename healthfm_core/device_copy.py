"""Host data onto a GPU without the host waiting for the device.

A copy from pageable host memory to a GPU waits: ``x.to("cuda")`` and ``torch.tensor(values,
device="cuda")`` return only once the device has finished everything queued before them (a host
sync; issue 41's first GPU run found 240 a `paper` step from the kernel's tile plan, and 14 a step
from the batch). A non-blocking copy from pageable memory may wait as well (CUDA's API
synchronization behaviour: the driver may synchronize while it stages the copy). From pinned host
memory the copy is queued on the stream and the host goes on; torch's caching host allocator keeps
the pinned block until the copy has run. `healthfm_core.train.host_syncs` counts
``torch.tensor(.., device=...)`` as a sync; this module's copies are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; a host tensor bound for a GPU goes through pinned memory, without a
    host sync."""
    if torch.device(device).type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def device_values(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """[len(values)] of ``like``'s dtype on ``like``'s device (``to_device``)."""
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)
