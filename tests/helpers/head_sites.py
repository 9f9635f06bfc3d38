"""Three sites' synthetic embeddings and labels for the federated task head's tests."""

from __future__ import annotations

import numpy as np

from healthfm_core.eval.federated_head import SiteSplits


def head_sites(seed: int = 0) -> dict[str, SiteSplits]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (n, shift) in enumerate(((300, 0.0), (120, 0.5), (60, -0.3))):
        x = rng.normal(size=(n + 40, 5)) * (1 + i) + shift
        y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=n + 40)) > shift
        out[f"site{i}"] = SiteSplits(x[:n], y[:n], x[n:], y[n:])
    return out
