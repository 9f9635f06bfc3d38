"""Ray for a simulation: a private local instance by default, an existing cluster only when named.

Flower's simulation engine starts Ray itself with `ray.init(**init_args)` in a background thread
while the ServerApp waits for sites in another. Two things went wrong with that:

- `ray.init()` without an address attaches to any cluster it can discover on the machine (the
  RAY_ADDRESS variable, /tmp/ray/ray_current_cluster after a `ray start`), and then refuses the
  num_cpus we pass ("When connecting to an existing cluster, num_cpus and num_gpus must not be
  provided");
- that error was raised in the engine's thread, so the ServerApp thread kept waiting for sites
  that never came and the process hung until killed.

So the simulation starts Ray here, in the calling thread, before Flower runs (Flower skips its
own `ray.init` when Ray is already initialised). `address=None` starts a private local instance
with `address="local"` (Ray's way to never attach to a discovered one); an explicit address
("auto", "host:6379", "ray://host:10001") attaches to that cluster and passes no resources. Any
failure raises RayStartError with one line saying what to do, before the ServerApp exists.

The local instance is kept lean (a 3-site simulation fits in well under 1.5 GB): no dashboard,
no prestarted idle workers (Flower runs its ClientApps as actors, each in its own process; the
idle task workers Ray starts for the first driver only cost memory), and a small object store
(`object_store_mb`; the messages between ServerApp and sites hold one model's weights, and Ray
spills to disk beyond it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("healthfm.simulations")

LOCAL_START_TRIES = 3
CONNECT_TIMEOUT_S = 5.0  # a cluster's GCS port that does not accept within this is down


class RayStartError(RuntimeError):
    """Ray could not be started or attached to; the message is one line for the user."""


class RaySettings(BaseModel):
    """The `ray` group of the simulation configs (configs/run.yaml)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: int = Field(default=2, ge=1)  # CPUs the local instance may use (ignored on a cluster)
    client_num_cpus: float = Field(default=1, gt=0)  # per simulated site: num_cpus / this actors run at once
    client_num_gpus: float = Field(default=0.0, ge=0)
    address: str | None = None  # an existing cluster ("auto", host:port, ray://host:10001); None: a local one
    object_store_mb: int = Field(default=128, ge=75)  # the local instance's object store (Ray's minimum is 75)

    def backend_config(self) -> dict[str, Any]:
        """Flower's backend_config for these settings (its init_args are unused once Ray runs)."""
        return {"client_resources": {"num_cpus": self.client_num_cpus, "num_gpus": self.client_num_gpus}}


def start_ray(settings: RaySettings) -> bool:
    """Start (address None) or attach to (address set) Ray for a simulation; False when Ray was
    already initialised in this process (reused as it is). Raises RayStartError."""
    if ray.is_initialized():
        log.info("Ray already running in this process: reused")
        _check_resources(settings)
        return False
    # Ray's worker processes inherit the environment, not this process's sys.path (as Flower does).
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    common: dict[str, Any] = {
        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if settings.address is None:
        where = "a local Ray instance"
        args: dict[str, Any] = {
            "address": "local",  # never attach to a cluster discovered on the machine
            "num_cpus": settings.num_cpus,
            "num_gpus": 0 if settings.client_num_gpus == 0 else None,
            "object_store_memory": settings.object_store_mb * 2**20,
            "include_dashboard": False,
            "_system_config": {"prestart_worker_first_driver": False},
        }
    else:
        where = f"the Ray cluster at ray.address={settings.address!r}"
        args = {"address": settings.address}
        # Ray retries a silent address for minutes: refuse one nothing listens on, at once.
        if (down := _unreachable(settings.address)) is not None:
            raise RayStartError(f"could not start {where}: {down}{_hint(settings)}")
    # A busy machine can miss Ray's fixed 30 s wait for its raylet: a local start is tried again.
    tries = LOCAL_START_TRIES if settings.address is None else 1
    for attempt in range(1, tries + 1):
        try:
            ray.init(**args, **common)
            break
        except Exception as err:  # Ray raises ConnectionError, ValueError, RuntimeError, Exception
            _shutdown_quietly()
            if attempt == tries or "timed out during startup" not in str(err):
                raise RayStartError(f"could not start {where}: {_one_line(err)}{_hint(settings)}") from None
            log.warning("Ray did not start in time (attempt %d of %d): trying again", attempt, tries)
    log.info("Ray: %s, %s CPUs", where, ray.cluster_resources().get("CPU", 0))
    _check_resources(settings)
    return True


def stop_ray() -> None:
    """Shut down this process's Ray (the local instance stops; a cluster stays up)."""
    _shutdown_quietly()


def _check_resources(settings: RaySettings) -> None:
    """Flower would build an empty actor pool and the ServerApp would wait for sites forever."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus < settings.client_num_cpus or gpus < settings.client_num_gpus:
        _shutdown_quietly()
        raise RayStartError(
            f"ray.client_num_cpus={settings.client_num_cpus:g} / client_num_gpus={settings.client_num_gpus:g} "
            f"exceed what Ray has ({cpus:g} CPUs, {gpus:g} GPUs): no site could run; lower them "
            f"or raise ray.num_cpus"
        )


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a host:port (or ray://host:port) address; None: it answers, or the
    address names no port ("auto": Ray looks for a cluster itself and says when there is none)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} ({err.strerror or type(err).__name__})"
    return None


def _hint(settings: RaySettings) -> str:
    if settings.address is None:
        return " (check /tmp space and `ray status`; ray.address names an existing cluster instead)"
    return " (is the cluster up? `ray status`; ray.address=null starts a local instance instead)"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:400]}"


def _shutdown_quietly() -> None:
    try:
        ray.shutdown()
    except Exception as err:  # nothing more to do: the error that brought us here is the news
        log.debug("ray.shutdown failed: %s", err)
