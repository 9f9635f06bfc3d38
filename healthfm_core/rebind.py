"""Set names in another package's module, refusing when one is gone: the patches to Flower's
constants on each side (client/deploy/flower_patches.py, server/deploy/flower_patches.py) must fail
closed when a Flower upgrade renames what they set, since setting a name nobody reads does nothing."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType


def rebind(module: ModuleType, values: Mapping[str, object], owner: str) -> None:
    """Set each of `values` in `module`; RuntimeError naming the missing names (and `owner`, the
    code that has to be updated) before any is set when the module lacks one."""
    missing = [name for name in values if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} has no {', '.join(missing)}: {owner} was read from another version "
            "and no longer knows how to set it; refusing to start (update that file)"
        )
    for name, value in values.items():
        setattr(module, name, value)
