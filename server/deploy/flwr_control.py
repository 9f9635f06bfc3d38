"""Talking to Flower 1.41 for the coordinator: the `flwr` CLI's connection to this federation's
SuperLink, and the `flwr` commands (run, ls) it runs as subprocesses.

The `flwr` CLI talks to a SuperLink through a named connection in FLWR_HOME/config.toml (here
FED/server/flwr-home, connection `healthfm`, with the federation's CA as `root-certificates`):
`flwr supernode register KEY.pub healthfm` registers a site's public key and
`flwr run APP_DIR healthfm --run-config FILE.toml` starts a run.

A one-off `--superlink HOST:PORT` (use_superlink_once) writes its connection to a temporary
FLWR_HOME for this command only: the address `coordinator superlink` saved stays as it was.
A SuperLink that does not answer (SuperLinkUnreachable) is told apart from one that answers but
knows no such run.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.deploy.provision import FederationPaths

log = logging.getLogger("healthfm.coordinator")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_SITE_LOST = 4  # the run completed, but without a site (missing at the end, or it never trained)
EXIT_UNREACHABLE = 5  # the SuperLink did not answer: the run's state is unknown
UNAVAILABLE = "connection to the superlink is unavailable"  # the `flwr` CLI's words, lower case
INTERNAL_ERROR = "internal server error"  # the `flwr` CLI's words for a 500 answer, lower case
CONNECTION = "healthfm"
FLWR_TIMEOUT_S = 120  # `flwr run` uploads the bundle, `supernode register` writes: given time
# `flwr ls` only reads: a SuperLink that accepted the connection and says nothing (its process
# stopped, its machine swapping) is not answering after this, like one that is down, and a wait
# retries it as such. Flower's CLI itself gives up on such a SuperLink only after its client's
# 30 s (ProtobufClient's timeout) plus its own start (~1.2 CPU-s, several seconds on a loaded
# 2-core machine); a healthy SuperLink answers in milliseconds.
FLWR_READ_TIMEOUT_S = 20.0


class CoordinatorError(Exception):
    """One line for the coordinator, with the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class SuperLinkUnreachable(CoordinatorError):
    """The SuperLink did not answer (down, restarting, wrong address): not "no such run"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_UNREACHABLE)


class SuperLinkBusy(SuperLinkUnreachable):
    """The SuperLink answered with an internal error (e.g. its database busy on a loaded machine):
    the run's state is unknown for now, so it is retried like an unreachable SuperLink."""


class RunUnknown(CoordinatorError):
    """The SuperLink answers but knows no such run (e.g. a SuperLink restarted with its state in
    memory forgot it): what happened to the run is for its out-dir to say."""


# A one-off --superlink: FED root -> the temporary FLWR_HOME holding its connection.
_ONE_OFF_HOMES: dict[Path, Path] = {}


def flwr_home(paths: FederationPaths) -> Path:
    """The `flwr` CLI's home: the saved connection, or this command's one-off --superlink."""
    return _ONE_OFF_HOMES.get(paths.root.resolve(), paths.server_dir / "flwr-home")


def saved_flwr_home(paths: FederationPaths) -> Path:
    return paths.server_dir / "flwr-home"


def use_superlink_once(paths: FederationPaths, address: str, insecure: bool = False) -> Path:
    """Talk to `address` for the rest of this process without touching the saved connection."""
    paths.server_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=".flwr-home-once-", dir=paths.server_dir))
    atexit.register(shutil.rmtree, home, True)
    write_connection(paths, address, insecure, home=home)
    _ONE_OFF_HOMES[paths.root.resolve()] = home
    return home


def flower_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def flower_env(paths: FederationPaths) -> dict[str, str]:
    env = dict(os.environ)
    # The SuperLink starts `flower-superexec` (and that `flwr-serverapp`) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home(paths))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def write_connection(paths: FederationPaths, address: str, insecure: bool, home: Path | None = None) -> Path:
    """The `flwr` CLI's connection `healthfm` to this federation's SuperLink (saved under
    FED/server/flwr-home unless `home` is given)."""
    home = home or saved_flwr_home(paths)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {json.dumps(address)}",
    ]
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(paths.ca_cert))}")
    path = home / "config.toml"
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_connection(paths: FederationPaths) -> dict[str, Any]:
    path = flwr_home(paths) / "config.toml"
    if not path.is_file():
        raise CoordinatorError(
            f"{path} not found: start the SuperLink first (coordinator superlink {paths.root}) "
            "or pass --superlink HOST:PORT",
            EXIT_USAGE,
        )
    return tomllib.loads(path.read_text())["superlink"][CONNECTION]


def run_flwr(
    paths: FederationPaths, args: Sequence[str], timeout: float = FLWR_TIMEOUT_S
) -> subprocess.CompletedProcess:
    cmd = [flower_bin("flwr"), *args]
    log.info("running %s", " ".join(cmd))
    try:
        return subprocess.run(
            cmd, env=flower_env(paths), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise CoordinatorError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s") from None


def read_flwr(paths: FederationPaths, args: Sequence[str]) -> subprocess.CompletedProcess:
    """A `flwr` command that only reads (ls), within FLWR_READ_TIMEOUT_S; SuperLinkUnreachable
    past it (a timed-out write might have happened, a read never matters)."""
    try:
        return run_flwr(paths, args, FLWR_READ_TIMEOUT_S)
    except CoordinatorError:
        address = read_connection(paths).get("address", "?")
        raise SuperLinkUnreachable(
            f"the SuperLink at {address} did not answer `flwr {' '.join(args[:1])}` within "
            f"{FLWR_READ_TIMEOUT_S:g} s (frozen or overloaded?)"
        ) from None


def flwr_error(proc: subprocess.CompletedProcess) -> str:
    """The message inside Flower's boxed error output, on one line."""
    text = proc.stderr + proc.stdout
    lines = [ln.strip(" │╭╮╰╯─\t") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Using SuperLink") and ln != "Error"]
    return " ".join(lines)[:500] or f"exit {proc.returncode}"


def start_run(paths: FederationPaths, app_dir: Path, config_file: Path) -> int:
    """`flwr run` the app in app_dir with the run config in config_file; the run id."""
    proc = run_flwr(paths, ["run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--format", "json"])
    check_reachable(paths, proc)  # the CLI exits 0 with an error in its JSON then
    if proc.returncode != 0:
        raise CoordinatorError(f"the SuperLink did not start the run: {flwr_error(proc)}")
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{") :])
        return int(payload["run-id"])
    except (ValueError, KeyError) as err:
        raise CoordinatorError(f"cannot read the run id from `flwr run` ({err}): {proc.stdout[-300:]}") from None


def check_reachable(paths: FederationPaths, proc: subprocess.CompletedProcess) -> None:
    """SuperLinkUnreachable when the `flwr` CLI says it could not connect (it exits 0 then)."""
    text = (proc.stdout + proc.stderr).lower()
    if UNAVAILABLE in text:
        address = read_connection(paths).get("address", "?")
        raise SuperLinkUnreachable(f"the SuperLink at {address} is unreachable (down or restarting?)")
    if INTERNAL_ERROR in text:
        address = read_connection(paths).get("address", "?")
        raise SuperLinkBusy(f"the SuperLink at {address} answered with an internal server error (busy?)")


def run_status(paths: FederationPaths, run_id: int) -> str:
    proc = read_flwr(paths, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
    check_reachable(paths, proc)
    if proc.returncode != 0:
        raise CoordinatorError(f"cannot read the status of run {run_id}: {flwr_error(proc)}")
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        raise CoordinatorError(f"cannot read the status of run {run_id}: {proc.stdout[-300:]!r}") from None
    if payload.get("success") is False:
        message = " ".join(str(payload.get("error-message", "")).split())[:400]
        if "not found" in message.lower():  # flwr: "Run ID not found"
            raise RunUnknown(f"the SuperLink answers but knows no run {run_id} ({message})")
        raise CoordinatorError(f"cannot read the status of run {run_id}: {message}")
    runs = payload.get("runs", [])
    if not runs:
        raise RunUnknown(f"the SuperLink answers but knows no run {run_id}")
    return str(runs[0]["status"])


# Each `flwr ls` is a new Python process costing ~1.2 CPU-seconds (measured: `/usr/bin/time flwr ls`),
# taken from the machine the SuperLink, and in tests and benchmarks the sites, run on: polled every
# 2 s it held ~30% of a 2-core machine for the whole run. With a cheap local sign that the run is
# ending (its outcome.json), the CLI is asked every SLOW_POLL_S only, and every `poll` s once the sign
# is there.
SLOW_POLL_S = 15.0
HINT_POLL_S = 0.25  # a stat of one file: costs nothing


def wait_for_run(
    paths: FederationPaths,
    run_id: int,
    timeout: float,
    poll: float = 2.0,
    unreachable_grace: float = 120.0,
    ending: Callable[[], bool] | None = None,
    slow_poll: float = SLOW_POLL_S,
) -> str:
    """Poll until the run is finished; its final status (e.g. finished:completed). A SuperLink
    that stops answering, or answers with an internal error, is retried for `unreachable_grace`
    seconds, then SuperLinkUnreachable. With `ending` (a cheap local check, e.g. that the run's
    outcome.json exists) the SuperLink is asked every `slow_poll` s until `ending()` is true and
    every `poll` s after; Flower's status stays the one that decides."""
    deadline = time.monotonic() + timeout
    last = ""
    lost_since: float | None = None

    def pause() -> None:
        """Until the next `flwr ls`: `poll` s, or up to `slow_poll` s while `ending` says not yet."""
        if ending is None:
            time.sleep(poll)
            return
        until = time.monotonic() + max(poll, slow_poll)
        first = time.monotonic() + poll
        while time.monotonic() < min(until, deadline):
            if time.monotonic() >= first and ending():
                return
            time.sleep(HINT_POLL_S)

    while time.monotonic() < deadline:
        try:
            status = run_status(paths, run_id)
        except SuperLinkUnreachable as err:
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                print(f"run {run_id}: {err}; retrying for up to {unreachable_grace:g} s", flush=True)
            if now - lost_since >= unreachable_grace:
                raise SuperLinkUnreachable(
                    f"{err}: no usable answer for {now - lost_since:.0f} s while waiting for run "
                    f"{run_id} (last status {last or 'unknown'})"
                ) from None
            time.sleep(poll)
            continue
        lost_since = None
        if status != last:
            print(f"run {run_id}: {status}", flush=True)
            last = status
        if status.startswith("finished"):
            return status
        pause()
    raise CoordinatorError(f"run {run_id} not finished after {timeout:g} s (last status {last})")
