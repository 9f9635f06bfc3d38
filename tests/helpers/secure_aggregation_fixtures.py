"""Shared by the secure-aggregation tests: sites of different modality mixes, their updates and
counts, a seeded source of keys, and the plain ModalityAwareFedAvg rule on the same updates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import cast

import numpy as np

from secure_aggregation.config import SecAggConfig
from secure_aggregation.field import clip_update
from secure_aggregation.layout import group_vector, split_group_vector
from secure_aggregation.simulate import SimulatedRound, run_secure_round
from server.influence import Accepted
from server.strategy import ModalityAwareFedAvg

# One key or two per group, named as HealthFM's state_dict names them (parameter_group reads them).
SHAPES = {
    "backbone.blocks.0.w": (40, 50),
    "backbone.norm.b": (50,),
    "ehr_encoder.embed.w": (60, 30),
    "wearable_encoder.proj.w": (30, 20),
    "genomics_encoder.film.w": (16, 8),
}
GROUP_OF_KEY = {
    "backbone": "shared",
    "ehr_encoder": "ehr",
    "wearable_encoder": "wearables",
    "genomics_encoder": "genomics",
}
# shared+ehr everywhere, wearables at two sites, genomics at one.
MIXES = {
    1: ["shared", "ehr", "wearables"],
    2: ["shared", "ehr", "wearables"],
    3: ["shared", "ehr", "genomics"],
    4: ["shared", "ehr"],
}
# Six sites: wearables at four, genomics at one (the dropout tests).
SIX = {
    1: ["shared", "ehr", "wearables"],
    2: ["shared", "ehr"],
    3: ["shared", "ehr", "wearables"],
    4: ["shared", "ehr", "wearables"],
    5: ["shared", "ehr", "genomics"],
    6: ["shared", "ehr", "wearables"],
}
WEIGHT_MAX = 320  # local steps x batch size
VALUE_RANGE = 0.05


def group_of(key: str) -> str:
    return GROUP_OF_KEY[key.split(".")[0]]


def group_sizes() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for key, shape in SHAPES.items():
        sizes[group_of(key)] = sizes.get(group_of(key), 0) + int(np.prod(shape))
    return sizes


def make_config(mixes: dict[int, list[str]], threshold: int, min_holders: int = 3, round_: int = 7) -> SecAggConfig:
    sizes = group_sizes()
    return SecAggConfig(
        round=round_,
        sample=sorted(mixes),
        groups=mixes,
        group_sizes=sizes,
        threshold=threshold,
        min_holders=min_holders,
        clip_norm={g: 5.0 for g in sizes},
        value_range={g: VALUE_RANGE for g in sizes},
        weight_max=WEIGHT_MAX,
    )


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def global_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def site_updates(
    mixes: dict[int, list[str]], seed: int = 1, scale: float = 0.01
) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, dict[str, int]]]:
    """Each site's update of its groups (values well inside the clip) and its counts per group."""
    rng = np.random.default_rng(seed)
    updates = {
        node: {k: rng.normal(0, scale, s) for k, s in SHAPES.items() if group_of(k) in held}
        for node, held in mixes.items()
    }
    counts = {
        node: {g: int(rng.integers(WEIGHT_MAX // 4, WEIGHT_MAX + 1)) for g in held} for node, held in mixes.items()
    }
    return updates, counts


def clipped(update: dict[str, np.ndarray], config: SecAggConfig) -> dict[str, np.ndarray]:
    """The update as the site masks it (clip_update per group), back in its keys' shapes."""
    out: dict[str, np.ndarray] = {}
    for group in {group_of(k) for k in update}:
        vector = clip_update(group_vector(update, group, group_of), config.clip_norm[group], config.value_range[group])
        out.update(split_group_vector(vector, update, group, group_of))
    return out


def plain_average(
    reference: dict[str, np.ndarray],
    updates: dict[int, dict[str, np.ndarray]],
    counts: dict[int, dict[str, int]],
    nodes: list[int],
    min_sites: int,
) -> dict[str, np.ndarray]:
    """ModalityAwareFedAvg's own averaging (server/strategy.py) of the trained arrays
    reference + update, over `nodes`."""
    strategy = ModalityAwareFedAvg(min_sites_per_group=min_sites, group_of=group_of)
    accepted = [
        (
            node,
            SimpleNamespace(arrays={k: (reference[k] + v).astype(np.float32) for k, v in updates[node].items()}),
            counts[node],
        )
        for node in nodes
    ]
    # Stand-ins for parsed replies: average reads only their arrays and the counts.
    arrays, _ = strategy.average(cast("list[Accepted]", accepted), reference)
    return arrays


def play(
    config: SecAggConfig, seed: int, before: Sequence[int] = (), after: Sequence[int] = ()
) -> tuple[SimulatedRound, dict[int, dict[str, np.ndarray]], dict[int, dict[str, int]]]:
    """One secure round at fixed seeds (keys, updates, rounding), sites dropping where asked:
    the round, the sites' updates and their counts."""
    np.random.seed(seed)  # Flower's quantiser rounds with numpy's global generator
    updates, counts = site_updates(config.groups, seed=seed)
    played = run_secure_round(
        config,
        updates,
        counts,
        drop_before_masking=before,
        drop_after_masking=after,
        group_of=group_of,
        randbytes=seeded_bytes(seed),
    )
    return played, updates, counts
