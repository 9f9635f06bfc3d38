"""The coordinator's registry of sites: which Flower node id belongs to which site.

`coordinator register` writes FED/server/registry.json: for every site it registered, the site's
name, its public key (OpenSSH line) and the node id the SuperLink assigned to that key (`flwr
supernode register --format json` answers it). The ServerApp reads it (run config `registry`,
which `coordinator launch` sets) and

- sends nothing to a connected node whose id is not in it: such a node gets neither the setup
  nor the global model, and no reply of it can be matched to a message, so it is never averaged
  in (the strategy drops unsolicited replies);
- names every node by its registered site: the `site` a node claims in its capabilities must
  be that name, or the node is refused for the run.

The SuperLink itself only admits keys registered through its Control API, which only the
coordinator's machine reaches (server/deploy/proxy.py); the registry is the second lock, held by the
ServerApp, and binds a key to a name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from healthfm_core.strict_files import StrictFileError, read_json
from server.deploy.provision import FederationPaths

REGISTRY_FILE = "registry.json"


class RegistryError(ValueError):
    """A registry file that cannot be read; the message names the file and the field."""


class RegisteredSite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    public_key: str = Field(min_length=1)  # OpenSSH line, as registered with the SuperLink
    node_id: int = Field(gt=0)


class SiteRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[RegisteredSite] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> SiteRegistry:
        for field in ("name", "node_id", "public_key"):
            values = [getattr(s, field) for s in self.sites]
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"sites: {field} {dupes} appear more than once")
        return self

    def by_node(self) -> dict[int, str]:
        return {s.node_id: s.name for s in self.sites}

    def get(self, name: str) -> RegisteredSite | None:
        return next((s for s in self.sites if s.name == name), None)

    def with_site(self, site: RegisteredSite) -> SiteRegistry:
        """This registry with `site` recorded (replacing an entry of the same name)."""
        return SiteRegistry(sites=sorted([*(s for s in self.sites if s.name != site.name), site], key=lambda s: s.name))


def registry_path(paths: FederationPaths) -> Path:
    return paths.server_dir / REGISTRY_FILE


def read_registry(path: Path) -> SiteRegistry:
    """The registry at `path` (an empty one if the file does not exist yet)."""
    if not path.exists():
        return SiteRegistry()
    try:
        return SiteRegistry.model_validate(read_json(path))
    except StrictFileError as err:
        raise RegistryError(f"{path}: cannot read the site registry ({err})") from None
    except ValidationError as err:
        problems = "; ".join(f"field {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise RegistryError(f"{path}: invalid site registry: {problems}") from None


def write_registry(path: Path, registry: SiteRegistry) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(registry.model_dump_json(indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def admit(nodes: Iterable[int], registry: SiteRegistry) -> tuple[list[int], list[int]]:
    """(the connected nodes the registry knows, the others), each sorted."""
    known = registry.by_node()
    ordered = sorted(nodes)
    return [n for n in ordered if n in known], [n for n in ordered if n not in known]


def name_mismatch(node: int, claimed: str, registry: SiteRegistry) -> str | None:
    """Why a node's claimed site name is refused (None when it is its registered name)."""
    registered = registry.by_node().get(node)
    if registered is None:
        return f"node {node} is not in the coordinator's registry"
    if claimed != registered:
        return f"node {node} is registered as site {registered!r} but calls itself {claimed!r}"
    return None


__all__ = [
    "REGISTRY_FILE",
    "RegisteredSite",
    "RegistryError",
    "SiteRegistry",
    "admit",
    "name_mismatch",
    "read_registry",
    "registry_path",
    "write_registry",
]
