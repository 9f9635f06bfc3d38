"""What the federation's public door (nginx, server/deploy/proxy.py) lets through, kept on disk and
applied to the running nginx by a graceful reload (requests in progress finish; nothing restarts).

- Which keys: a Fleet call is forwarded only when its flwr-public-key header is a registered
  site's (FED/server/registry.json). `superlink` writes the map before nginx opens; `register`
  rewrites it and reloads nginx, so a site is let in once it is registered and an unregistered
  key is answered 412 (Flower's own answer to an unknown key) before its body is read, whatever the body.
- How large a body: push-object's limit is what the launched runs need (server/deploy/body_limit.py),
  kept in FED/server/door.json. `superlink` opens the door at BASE_PUSH_BODY_BYTES (what any run
  without secure aggregation needs); `launch` and `resume` raise it to what their run needs
  (a secure run of a large model) before the run starts, never lower it while the SuperLink runs
  (another run may be in flight), and `superlink` sets it back at its next start. With
  `superlink --max-body-mib N` the limit is fixed: a launch whose run needs more is refused before
  anything starts, naming both sizes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import StrictFileError, read_json
from server.deploy.body_limit import BASE_PUSH_BODY_BYTES, MIB
from server.deploy.flwr_control import EXIT_USAGE, CoordinatorError
from server.deploy.provision import FederationPaths
from server.deploy.proxy import reload_proxy, write_door_files
from server.deploy.registry import read_registry, registry_path

DOOR_FILE = "door.json"
LOCK_FILE = ".door.lock"


class DoorState(BaseModel):
    """FED/server/door.json: push-object's body limit in force and why."""

    model_config = ConfigDict(extra="forbid")

    push_body_bytes: int = Field(gt=0)
    fixed: bool  # `superlink --max-body-mib`: launches never raise it
    sized_for: str = Field(min_length=1)  # what set it, in words


def door_path(paths: FederationPaths) -> Path:
    return paths.server_dir / DOOR_FILE


def read_door(paths: FederationPaths) -> DoorState | None:
    """The door's state (None: no `superlink` with nginx has opened it here)."""
    path = door_path(paths)
    if not path.exists():
        return None
    try:
        return DoorState.model_validate(read_json(path))
    except (StrictFileError, ValidationError) as err:
        raise CoordinatorError(f"{path}: cannot read the door's state ({' '.join(str(err).split())[:300]})") from None


@contextmanager
def _locked(paths: FederationPaths) -> Iterator[None]:
    """One door change at a time (two launches raising the limit at once both keep theirs)."""
    fd = os.open(paths.server_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(paths: FederationPaths, state: DoorState) -> None:
    atomic_write_text(door_path(paths), state.model_dump_json(indent=1) + "\n")


def _write_keys(paths: FederationPaths, push_body_bytes: int | None) -> None:
    """The map of the registry's keys (and the push limit, unless None) written for nginx."""
    path = registry_path(paths)
    try:
        write_door_files(paths, [s.public_key for s in read_registry(path).sites], push_body_bytes)
    except ValueError as err:  # RegistryError, or a key that is no OpenSSH line
        raise CoordinatorError(f"{path}: {err}; the door lets no key in until it is fixed") from None


def open_door(paths: FederationPaths, fixed_bytes: int | None) -> DoorState:
    """At `superlink`'s start, before nginx: the registry's keys and the base limit (or the fixed
    one), replacing whatever an earlier SuperLink's launches had raised it to."""
    with _locked(paths):
        state = (
            DoorState(push_body_bytes=fixed_bytes, fixed=True, sized_for="superlink --max-body-mib")
            if fixed_bytes is not None
            else DoorState(
                push_body_bytes=BASE_PUSH_BODY_BYTES, fixed=False, sized_for="a run without secure aggregation"
            )
        )
        _write_keys(paths, state.push_body_bytes)
        _write(paths, state)
    return state


def refresh_keys(paths: FederationPaths) -> bool:
    """After the registry changed: the map rewritten from it and a running nginx reloaded (False:
    none runs; the next `superlink` writes the map)."""
    with _locked(paths):
        _write_keys(paths, None)
        return reload_proxy(paths)


def fit_run(paths: FederationPaths, needed: int, what: str) -> DoorState | None:
    """Before a run starts: push-object's limit raised to `needed` bytes if it is lower (and nginx
    reloaded), the new state; None when it needs no raise or no door is open here (`superlink
    --insecure`, or none started yet). CoordinatorError when the limit is fixed below `needed`."""
    with _locked(paths):
        state = read_door(paths)
        if state is None or needed <= state.push_body_bytes:
            return None
        if state.fixed:
            raise CoordinatorError(
                f"{what} needs request bodies up to {needed // MIB} MiB, but the door forwards at most "
                f"{state.push_body_bytes // MIB} MiB (`superlink --max-body-mib {state.push_body_bytes // MIB}`): "
                f"restart `superlink` with --max-body-mib {needed // MIB} or without it",
                EXIT_USAGE,
            )
        raised = DoorState(push_body_bytes=needed, fixed=False, sized_for=what)
        write_door_files(paths, None, needed)
        try:
            reload_proxy(paths)
        except CoordinatorError:
            write_door_files(paths, None, state.push_body_bytes)  # nginx keeps the old limit: say so on disk
            raise
        _write(paths, raised)
        return raised


__all__ = [
    "DOOR_FILE",
    "DoorState",
    "door_path",
    "fit_run",
    "open_door",
    "read_door",
    "refresh_keys",
]
