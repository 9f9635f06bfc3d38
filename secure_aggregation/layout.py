"""A group's update as one flat vector and back: sorted keys, each flattened in C order.

Both sides lay a group out from its state_dict keys alone (the site from its update, the server
from the round's global arrays), so no layout travels and both agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from healthfm_core.terms.groups import parameter_group


def group_keys(
    arrays: Mapping[str, np.ndarray], group: str, group_of: Callable[[str], str] = parameter_group
) -> list[str]:
    return sorted(k for k in arrays if group_of(k) == group)


def group_vector(
    arrays: Mapping[str, np.ndarray], group: str, group_of: Callable[[str], str] = parameter_group
) -> np.ndarray:
    """The group's values as one float64 vector (empty when the group has no key here)."""
    keys = group_keys(arrays, group, group_of)
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def split_group_vector(
    vector: np.ndarray,
    reference: Mapping[str, np.ndarray],
    group: str,
    group_of: Callable[[str], str] = parameter_group,
) -> dict[str, np.ndarray]:
    """Inverse of group_vector against the shapes (and dtypes) of `reference`."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for key in group_keys(reference, group, group_of):
        like = np.asarray(reference[key])
        out[key] = vector[start : start + like.size].reshape(like.shape)
        start += like.size
    if start != vector.size:
        raise ValueError(f"group {group!r}: vector of {vector.size} values, the reference holds {start}")
    return out
