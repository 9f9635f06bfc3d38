"""The simulation jobs' command line: refuse a `+key=value` override the job does not read, and
take `tasks=...` for the job's `task_list`.

Hydra already refuses an unknown key without `+`, but `+` adds any key, which the job would then
silently ignore (your own site roots ignored, synthetic data used instead).

`tasks=` cannot be a plain Hydra key: configs/tasks/ (the ACES task files) makes `tasks` a config
group, so Hydra would read `tasks=[t2d,cad]` as a choice of group options (no paths, the files'
contents merged into the config). The jobs declare `task_list` instead, and `with_task_alias`
rewrites `tasks=X` on the command line to `task_list=X` before Hydra parses it."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def declared_keys(config_name: str) -> set[str]:
    """The top-level keys of configs/<config_name>.yaml and its defaults' groups."""
    raw = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text()) or {}
    keys = {k for k in raw if k != "defaults"} | {"hydra"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            keys |= {str(k).lstrip("/").split("@")[0].split("/")[0] for k in entry}
    return keys


def unknown_override(overrides: list[str], config_name: str) -> str | None:
    """The first override that adds a key the job does not read, as a one-line error; None if none.
    `+key=value` always adds a key the job's config does not declare; `++key=value` is refused
    when its top-level key is not declared."""
    declared = declared_keys(config_name)
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0].strip()
        top = key.split(".")[0]
        if override.startswith("++") and top in declared:
            continue
        if top in declared and key == top:
            return f"override {override!r}: {key} is a key of configs/{config_name}.yaml: write {key}=... (no +)"
        return (
            f"override {override!r}: this job reads no key {key!r} (configs/{config_name}.yaml declares "
            f"{', '.join(sorted(declared - {'hydra'}))})"
        )
    return None


TASKS_ALIAS = "tasks"
TASKS_KEY = "task_list"


def with_task_alias(argv: list[str]) -> list[str]:
    """argv with `tasks=X` (also `tasks=` in a sweep) written as `task_list=X`."""
    prefix = f"{TASKS_ALIAS}="
    return [f"{TASKS_KEY}={a[len(prefix) :]}" if a.startswith(prefix) else a for a in argv]


def refuse_unknown_overrides(config_name: str) -> None:
    """Exit with a one-line error when the command line adds a key the job does not read."""
    if (error := unknown_override(list(HydraConfig.get().overrides.task), config_name)) is not None:
        raise SystemExit(f"error: {error}")


__all__ = [
    "TASKS_ALIAS",
    "TASKS_KEY",
    "declared_keys",
    "refuse_unknown_overrides",
    "unknown_override",
    "with_task_alias",
]
