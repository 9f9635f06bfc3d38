"""How many torch threads a site's ClientApp uses: the cores it has free, or what its admin says.

Precedence (client/site_runtime.py applies it once per ClientApp process, before any training):
`join --threads N` (node config `threads`) > the policy's `threads` > `auto` (the default of a
deployed site, `join --threads auto`). A site with neither (a simulation's virtual sites) keeps
torch's default: its worker processes share one machine and Ray already sizes them.

`auto` = the cores this process may run on (sched_getaffinity: a container's or taskset's limit,
not the machine's) minus the 1-minute load average (what the neighbours already use), rounded
down, at least 1 and at most AUTO_MAX. Threads beyond the free cores do not add compute: they
time-slice against the neighbours and every intra-op barrier waits for the slowest (measured:
2 threads 6.2x slower than 1 on a busy 2-core machine, 1.69x faster on a quiet one). AUTO_MAX
caps it because the models' matrices (d_model 32-256) stop scaling well beyond ~8 threads.
"""

from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger("healthfm.client.threads")

AUTO_MAX = 8


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_threads(cores: int | None = None, load: float | None = None, cap: int = AUTO_MAX) -> int:
    """floor(cores - 1-minute load), clamped to [1, cap]."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cap, math.floor(cores - load)))


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads to `n` (and inter-op, which torch only allows once per
    process, before any parallel work: later calls keep the first value). Returns n."""
    if n < 1:
        raise ValueError(f"threads: value {n}: must be at least 1")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    return n
