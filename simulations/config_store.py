"""FederationConfig's defaults as the Hydra config `federation/fields` (and the server optimiser's
as `federation/server_optimizer/adam`), so that the jobs' federation configs
(configs/federation/*.yaml) restate none of them.

configs/federation/default.yaml composes `fields` first: every key below at FederationConfig's
default (server/config.py, the one place defaults are written), then only what a job changes.
Registered when `simulations` is imported (simulations/__init__.py), before any job composes its
config.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from server.config import FederationConfig, ServerOptimizerConfig

# FederationConfig fields a job's `federation` group does not hold: the job sets them itself
# (out_dir, seed, resume; min_nodes from its sites; privacy from the `privacy` group; model from
# the `model` group), or the simulations never change them (a deployed run's registry, resume_from
# and reply limits). A job's resolved config, which evidence units fingerprint, keeps its keys.
NOT_IN_GROUP = frozenset(
    {
        "out_dir",
        "model",
        "seed",
        "resume",
        "min_nodes",
        "privacy",
        "registry",
        "resume_from",
        "max_reply_bytes",
        "reply_size_margin",
    }
)


def federation_fields() -> dict[str, Any]:
    """The `federation` group's keys at FederationConfig's defaults, as model_dump(mode="json")
    writes them."""
    out = {}
    for name, field in FederationConfig.model_fields.items():
        if name in NOT_IN_GROUP:
            continue
        value = field.get_default(call_default_factory=True)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="federation", name="fields", node=federation_fields())
    # The server optimiser at its defaults (configs/federation/fedadam.yaml turns it on).
    store.store(group="federation/server_optimizer", name="adam", node=ServerOptimizerConfig().model_dump())


register()

__all__ = ["NOT_IN_GROUP", "federation_fields", "register"]
