"""`client.py join`: connect this site to a federation's SuperLink as a Flower SuperNode.

The SuperNode (flwr 1.41 `flower-supernode`) only makes outbound HTTPS connections to the
SuperLink; it verifies the server against the federation's CA (`--root-certificates`) and signs
its requests with the site's EC key (`--auth-supernode-private-key`, OpenSSH format), which the
coordinator registered. The ClientApp finds the data through the node config (`site-root`, plus
the site's policy keys, see client.site_runtime.SiteConfig), which stays on the site.

Before starting it, `join` probes the SuperLink itself (TCP, then a TLS handshake against the
CA) so that an unreachable server or a wrong certificate is one clear line within seconds
instead of a SuperNode retrying forever. The probe goes the way the SuperNode will: through the
forward proxy its environment (or `--proxy`) names, with HTTP CONNECT (client/deploy/proxy_route.py).

Why a SuperNode stopped is read from that process alone: its exit status and the lines it wrote
to STATE/supernode.log since it started (`fresh_lines`), never an earlier process's. A key the
SuperLink does not know is only what the current process's activation says (Flower's error 2004,
"Failed to activate SuperNode"); a 401 to a SuperNode that had connected means the SuperLink
forgot the node (it restarted), and the SuperNode is restarted like after any lost connection.
Lines of the SuperNode's local Runtime API (a ClientApp of an earlier SuperNode presenting its
old task token: "Runtime task-token authentication failed") are about this site's own processes,
never about the SuperLink.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from client.deploy.approval import approved_apps
from client.deploy.heartbeat import HEARTBEAT_INTERVAL_S, MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S
from client.deploy.privacy_budget import check_privacy_budget
from client.deploy.proxy_route import (
    ProxyError,
    ProxyRoute,
    open_tunnel,
    parse_proxy_url,
    reach_proxy,
    route_for,
    site_proxy_env,
    tls_through,
)
from client.deploy.supernode_pace import POLL_INTERVAL_S, SupernodePace
from healthfm_core.files import write_flat_toml
from healthfm_core.log_files import LOG_MAX_BYTES, RotatingLog
from healthfm_core.strict_files import strict_json

log = logging.getLogger("healthfm.client.join")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
EXIT_NO_CONNECTION = 4  # unreachable, or TLS failed (wrong certificate)
EXIT_NOT_REGISTERED = 5  # the SuperLink refused this site's key
EXIT_SUPERNODE_FAILED = 6  # the SuperNode stopped for another reason

# How client/deploy/supernode_main.py ends a SuperNode whose pull loop stopped (it never exits by itself).
EXIT_CONNECTION_ENDED = 75
ENDED_LINE = "healthfm: the SuperNode's connection to the SuperLink ended"
# Restarting such a SuperNode: waits between restarts (the last one repeats), reset once it has run
# STABLE_SECONDS; a SuperLink that counts a killed SuperNode as online refuses its key until the
# node misses its heartbeats (2 x its heartbeat interval: 8 s at `--heartbeat-interval` 4, a minute
# at Flower's 30), so a refused key that connected before is retried for REJOIN_WINDOW_SECONDS.
RESTART_BACKOFF = (5, 10, 20, 40, 60)
STABLE_SECONDS = 300.0
REJOIN_RETRY_SECONDS = 10.0
REJOIN_WINDOW_SECONDS = 150.0
NODE_RECORD = "node.json"  # STATE/node.json: the last node id this key connected as
TAIL_LINES = 200  # how many of a SuperNode's last lines explain its exit
TAIL_BYTES = 262144  # read at most this much of them back from its log
# Lines of the SuperNode's local Runtime API (its ClientApps, the app guard): never about the SuperLink.
RUNTIME_LINE = re.compile(r"/v1/runtime/|runtime task-token|\[ApiError:1008\]", re.IGNORECASE)

REPO = Path(__file__).resolve().parents[2]
NODE_ID_LINE = re.compile(r"SuperNode ID:\s*(\d+)")
ConfigValue = str | int | float | bool


class JoinError(Exception):
    """A one-line reason why this site cannot join, with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_NO_CONNECTION) -> None:
        super().__init__(message)
        self.status = status


class JoinConfig(BaseModel):
    """One `join`, from the site admin's command line."""

    model_config = ConfigDict(extra="forbid")

    site_root: Path
    superlink: str  # HOST:PORT of the SuperLink (IPv6 as [::1]:PORT)
    root_cert: Path | None = None  # the federation CA (ca.pem); None only with insecure
    auth_key: Path | None = None  # the site's OpenSSH EC private key (auth_key)
    insecure: bool = False
    state_dir: Path
    node_config: dict[str, ConfigValue] = Field(default_factory=dict)
    connect_timeout: float = Field(default=10.0, gt=0)
    runtime_port: int | None = Field(default=None, ge=1, le=65535)  # the SuperNode's local API
    max_wait_time: float | None = Field(default=None, gt=0)  # give up reconnecting after this
    # How approved ClientApp tasks run (client/deploy/app_guard.py): warm = one process per run.
    clientapp: Literal["warm", "cold"] = "warm"
    warm_idle: float = Field(default=600.0, gt=0)  # stop a run's warm ClientApp after this idle time
    # The SuperNode's idle pull interval (client/deploy/supernode_pace.py; Flower's own is 3 s).
    poll_interval: float = Field(default=POLL_INTERVAL_S, gt=0, le=60)
    # The SuperLink counts the site dead 2 x this after its last heartbeat (client/deploy/heartbeat.py).
    heartbeat_interval: float = Field(
        default=HEARTBEAT_INTERVAL_S, ge=MIN_HEARTBEAT_INTERVAL_S, le=MAX_HEARTBEAT_INTERVAL_S
    )
    # Start a new privacy ledger where the state dir's is refused (client/deploy/privacy_budget.py).
    new_privacy_budget: bool = False
    # A forward proxy to the SuperLink (http://HOST:PORT), else the environment's (HTTPS_PROXY, ...).
    proxy: str | None = None

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_proxy_url(value, "--proxy")
            except ProxyError as err:
                raise ValueError(str(err)) from None
        return value


# ---------------------------------------------------------------------------- checks before starting


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); JoinError with the address otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:/\[\]]+):(\d+)", address.strip())
    if not m:
        raise JoinError(f"--superlink {address!r} is not HOST:PORT", EXIT_USAGE)
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) < 65536:
        raise JoinError(f"--superlink {address!r}: port {port} is out of range", EXIT_USAGE)
    return host, int(port)


def check_auth_key(path: Path) -> str:
    """The OpenSSH public key line of the site's private key (what the coordinator registered);
    JoinError if the file is not an EC key flwr can use."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as err:
        raise JoinError(f"--auth-key {path}: cannot read ({err.strerror})", EXIT_USAGE) from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise JoinError(
            f"--auth-key {path}: not an unencrypted OpenSSH private key ({err}); use the site's "
            "auth_key from the coordinator",
            EXIT_USAGE,
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(
            f"--auth-key {path}: a {type(key).__name__}, but Flower needs an EC (NIST curve) key", EXIT_USAGE
        )
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, path.stat().st_mode & 0o777)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _connect_directly(address: str, host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        raise JoinError(
            f"cannot reach the SuperLink at {address}: host name {host!r} does not resolve ({err.strerror})"
        ) from None
    except ConnectionRefusedError:
        raise JoinError(
            f"cannot reach the SuperLink at {address}: connection refused (is the SuperLink "
            "running, and is this its address and port?)"
        ) from None
    except TimeoutError:
        raise JoinError(
            f"cannot reach the SuperLink at {address}: no answer within {timeout:g} s (a firewall, or a wrong address?)"
        ) from None
    except OSError as err:
        raise JoinError(f"cannot reach the SuperLink at {address}: {err.strerror or err}") from None


def probe_superlink(address: str, root_cert: Path | None, timeout: float, route: ProxyRoute | None = None) -> None:
    """Connect to the SuperLink as the SuperNode will (TCP, or a CONNECT tunnel through `route`,
    then TLS verified against the CA and the host name, end to end); JoinError naming what
    failed, and the proxy when there is one."""
    host, port = parse_address(address)
    if route is None:
        sock = _connect_directly(address, host, port, timeout)
    else:
        try:
            # http:// (--insecure, tests only) goes through a proxy without CONNECT: the proxy answering is all
            sock = reach_proxy(route, timeout) if root_cert is None else open_tunnel(route, host, port, timeout)
        except ProxyError as err:
            raise JoinError(
                f"cannot reach the SuperLink at {address}: {err}", EXIT_USAGE if err.usage else EXIT_NO_CONNECTION
            ) from None
    via = f" (through {route.describe()})" if route is not None else ""
    with sock:
        if root_cert is None:
            return
        try:
            ctx = ssl.create_default_context(cafile=str(root_cert))
        except (OSError, ssl.SSLError) as err:
            raise JoinError(f"--root-cert {root_cert}: not a readable PEM certificate ({err})", EXIT_USAGE) from None
        sock.settimeout(timeout)
        try:
            if route is None:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            else:
                tls_through(sock, ctx, host, timeout)
        except ssl.SSLCertVerificationError as err:
            reason = err.verify_message or str(err)
            if "mismatch" in reason.lower():
                raise JoinError(
                    f"the SuperLink's certificate at {address}{via} is not valid for {host!r} ({reason}); "
                    "connect by a name the coordinator provisioned, or ask for a new certificate"
                ) from None
            inspected = (
                "; a proxy that inspects TLS (re-signs certificates) must pass the SuperLink's port through untouched"
                if route is not None
                else ""
            )
            raise JoinError(
                f"the SuperLink's certificate at {address}{via} does not verify against --root-cert "
                f"{root_cert} ({reason}): wrong CA file for this federation?{inspected}"
            ) from None
        except TimeoutError:
            raise JoinError(
                f"the server at {address}{via} accepted a connection but completed no TLS handshake "
                f"within {timeout:g} s (is it a SuperLink?)"
            ) from None
        except ssl.SSLError as err:
            reason = err.reason or str(err)
            hint = " (a SuperLink started with --insecure?)" if "WRONG_VERSION" in reason.upper() else ""
            raise JoinError(f"TLS with the SuperLink at {address}{via} failed: {reason}{hint}") from None
        except OSError as err:
            raise JoinError(f"TLS with the SuperLink at {address}{via} failed: {err.strerror or err}") from None


def superlink_route(cfg: JoinConfig) -> ProxyRoute | None:
    """The proxy the SuperNode will use for the SuperLink (its environment, which carries
    --proxy), by httpx's rules; None: it connects directly."""
    host, port = parse_address(cfg.superlink)
    try:
        route = route_for("http" if cfg.insecure else "https", host, port, site_process_env(cfg))
    except ProxyError as err:
        raise JoinError(str(err), EXIT_USAGE) from None
    if route is not None and cfg.proxy is not None and route.source.lower() == "https_proxy":
        route = route.model_copy(update={"source": "--proxy"})  # site_process_env put it there
    return route


def validate_node_config(node_config: Mapping[str, ConfigValue]) -> None:
    """The node config as the ClientApp will read it (its own SiteConfig): refuse it here
    rather than at the first round."""
    from client.policy import load_policy
    from client.site_runtime import SiteConfig

    try:
        config = SiteConfig.from_node_config(node_config)
        if config.policy is not None:  # a broken policy file stops here, not at the first round
            load_policy(config.policy)
    except ValueError as err:  # PolicyError is a ValueError too
        raise JoinError(" ".join(str(err).split()), EXIT_USAGE) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_executable(name: str) -> str:
    """A Flower entry point from this Python's environment (then PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise JoinError(f"{name} not found next to {sys.executable} nor on PATH: install flwr 1.41", EXIT_USAGE)
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: this environment's bin first (the SuperNode starts
    `flower-superexec` by name), Flower's home under the site's state, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def supernode_command(cfg: JoinConfig, node_config_file: Path, runtime_port: int) -> list[str]:
    # Through client/deploy/supernode_main.py: a SuperNode whose connection ended exits (and is restarted)
    # instead of idling forever, and it pulls at the site's pace (client/deploy/supernode_pace.py).
    # --isolation process: the SuperNode starts no SuperExec; the site's app guard takes that place
    # and starts a ClientApp only for an approved bundle (client/deploy/app_guard.py).
    cmd = [
        sys.executable,
        "-m",
        "client.deploy.supernode_main",
        *SupernodePace(poll_interval=cfg.poll_interval).args(),
        "--heartbeat-interval",
        str(cfg.heartbeat_interval),
        flower_executable("flower-supernode"),
        "--superlink",
        cfg.superlink,
        "--node-config",
        str(node_config_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--isolation",
        "process",
    ]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        assert cfg.root_cert is not None
        cmd += ["--root-certificates", str(cfg.root_cert)]
    if cfg.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(cfg.auth_key)]
    if cfg.max_wait_time is not None:
        cmd += ["--max-wait-time", str(cfg.max_wait_time)]
    return cmd


def site_process_env(cfg: JoinConfig) -> dict[str, str]:
    """flower_env, and this checkout importable: the SuperNode and the app guard run modules of
    this package (client.deploy.supernode_main, client.deploy.app_guard). --proxy as HTTPS_PROXY, and NO_PROXY
    extended to 127.0.0.1, localhost and ::1: the Runtime API's callers never go to a proxy."""
    env = site_proxy_env(flower_env(cfg.state_dir.resolve() / "flwr-home"), cfg.proxy)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def start_app_guard(cfg: JoinConfig, runtime_port: int, log_path: Path) -> subprocess.Popen[str]:
    """The site's app guard (client/deploy/app_guard.py) on the SuperNode's local Runtime API; it dies
    with `join`. Its log (and its warm ClientApps', which write to the guard's output):
    STATE/app-guard.log, copied there by a thread of `join` that rotates it (healthfm_core/log_files.py)."""
    policy = cfg.node_config.get("policy")
    site = str(cfg.node_config.get("site-name", cfg.site_root.name))
    cmd = [
        sys.executable,
        "-m",
        "client.deploy.app_guard",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--site",
        site,
        "--parent-pid",
        str(os.getpid()),
        *(["--policy", str(policy)] if policy else []),
        "--clientapp",
        cfg.clientapp,
        "--warm-idle",
        str(cfg.warm_idle),
    ]
    guard = site_popen(cfg, cmd)
    threading.Thread(target=copy_to_log, args=(guard.stdout, log_path), daemon=True, name="app-guard-log").start()
    return guard


def site_popen(cfg: JoinConfig, cmd: list[str], **options: Any) -> subprocess.Popen[str]:
    """One of the site's processes (the SuperNode, the app guard): its output a text pipe that
    `join` writes to a rotating log, this checkout importable (site_process_env), gone when `join` dies."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=site_process_env(cfg),
        cwd=REPO,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        **options,
    )


def copy_to_log(stream: Iterable[str] | None, log_path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Each line of `stream` into the rotating log at `log_path`, flushed, until the stream ends.
    A line that cannot be written (a full disk) is dropped: the guard never blocks on its log."""
    assert stream is not None
    with RotatingLog(log_path, max_bytes) as log_file:
        for line in stream:
            with contextlib.suppress(OSError):
                log_file.write(line)
                log_file.flush()


def about_the_superlink(lines: list[str]) -> list[str]:
    """The lines that can say something about the SuperLink: not those of the SuperNode's local
    Runtime API (a ClientApp or the app guard calling it, e.g. with an earlier SuperNode's task token)."""
    return [ln for ln in lines if not RUNTIME_LINE.search(ln)]


def explain_exit(
    lines: list[str], returncode: int, cfg: JoinConfig, log_path: Path, route: ProxyRoute | None = None
) -> JoinError:
    """The one-line reason a SuperNode stopped, from its exit status and the lines this process
    wrote (fresh_lines; never an earlier process's). EXIT_NOT_REGISTERED only for what the
    SuperLink answered this process's activation; a 401 to a node that had connected is not one
    (the SuperLink forgot the node: restarted), nor anything the local Runtime API logged."""
    lines = about_the_superlink(lines)
    text = "\n".join(lines)
    low = text.lower()
    via = f" through {route.describe()}" if route is not None else ""
    if "code: 2004" in low or "failed to activate supernode" in low:
        return JoinError(
            f"the SuperLink at {cfg.superlink} refused this site's key {cfg.auth_key}: it is not "
            "registered (ask the coordinator to run `coordinator register` for this site), or another "
            "SuperNode with this key is connected",
            EXIT_NOT_REGISTERED,
        )
    if "code: 2001" in low or "must be registered via the cli" in low:
        return JoinError(
            f"the SuperLink at {cfg.superlink} admits registered sites only: pass this site's --auth-key "
            "(the coordinator registered its public key)",
            EXIT_NOT_REGISTERED,
        )
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        return JoinError(
            f"the SuperLink's certificate at {cfg.superlink}{via} does not verify against --root-cert {cfg.root_cert}"
        )
    if route is not None and ("proxyerror" in low or ("proxy" in low and ("403" in low or "407" in low))):
        last_proxy = next((ln.strip() for ln in reversed(lines) if "proxy" in ln.lower()), "")
        return JoinError(f"lost the SuperLink at {cfg.superlink}: {route.describe()} failed ({last_proxy})")
    if "connection refused" in low or "giving up reconnection" in low or "could not establish a connection" in low:
        return JoinError(f"lost the SuperLink at {cfg.superlink}{via} (connection refused or retries exhausted)")
    if "address already in use" in low:
        return JoinError("the SuperNode's local port is in use; pass --runtime-port with a free port", EXIT_USAGE)
    if "unable to parse the private key" in low:
        return JoinError(f"--auth-key {cfg.auth_key}: Flower cannot parse it", EXIT_USAGE)
    last = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() and ln.strip()), "")
    return JoinError(
        f"the SuperNode stopped (exit {returncode}){': ' + last if last else ''}; see {log_path}", EXIT_SUPERNODE_FAILED
    )


def fresh_lines(log_path: Path, offset: int, limit: int = TAIL_LINES) -> list[str]:
    """The last `limit` lines written to the SuperNode's log since byte `offset` (where the current
    process's output starts): what explains its exit, nothing an earlier process left there."""
    try:
        with open(log_path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(offset, size - TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > offset and lines:
        lines = lines[1:]  # cut inside a line
    return lines[-limit:]


# ---------------------------------------------------------------------------- running the SuperNode


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when `join` dies, so no SuperNode outlives it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group: /proc on Linux (a zombie that
    init has not reaped yet still answers kill(0)), kill(0) elsewhere."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM every process left in the SuperNode's group (SuperExec, flwr-clientapp), then
    SIGKILL what is still there after `grace` seconds."""
    if not _group_alive(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _pump(stream: TextIO | None, lines: queue.Queue[str | None]) -> None:
    assert stream is not None
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


class Attempt(BaseModel):
    """How one SuperNode process ended."""

    returncode: int
    node_id: str | None  # None: it never connected
    tail: list[str]
    connected_seconds: float  # how long it was connected (0 if never)
    stop_requested: bool


def run_supernode_once(
    cfg: JoinConfig,
    cmd: list[str],
    log_file: RotatingLog,
    stop: threading.Event,
    on_connected: Callable[[str], None],
    echo: bool = False,
) -> Attempt:
    """Start one SuperNode process and stay with it until it exits or `stop` is set (then it is
    sent SIGTERM, so it says goodbye to the SuperLink); its whole process group is gone on return."""
    node_id: str | None = None
    connected_at: float | None = None
    log_file.write(f"--- join {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(cmd)}\n")
    log_file.flush()
    # This process's lines start here (fresh_lines); at 0 of a later file once the log rotated.
    offset, generation = log_file.size, log_file.generation
    # Its own session and process group: the SuperExec and every flwr-clientapp it starts
    # stay in that group (Flower does not detach them on the site side), so killing the
    # group on the way out leaves nothing behind (stop_group).
    proc = site_popen(cfg, cmd, bufsize=1, start_new_session=True)
    # A reader thread, because the pipe can outlive the SuperNode: the SuperExec it starts
    # (its own session) inherits the pipe and only exits once its parent is reaped.
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    exited_at: float | None = None
    signalled = False
    try:
        while True:
            if stop.is_set() and not signalled and proc.poll() is None:
                signalled = True
                proc.send_signal(signal.SIGTERM)  # the SuperNode first: it says goodbye to the SuperLink
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:  # EOF
                break
            if line:
                log_file.write(line)
                log_file.flush()
                if echo:
                    sys.stderr.write(line)
                if node_id is None and (m := NODE_ID_LINE.search(line)):
                    node_id = m.group(1)
                    connected_at = time.monotonic()
                    on_connected(node_id)
            if proc.poll() is not None:  # reaped: read what is left for a moment, then stop
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 1.0:
                    break
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop_group(proc.pid)
    return Attempt(
        returncode=returncode,
        node_id=node_id,
        tail=fresh_lines(log_file.path, offset if log_file.generation == generation else 0),
        connected_seconds=time.monotonic() - connected_at if connected_at is not None else 0.0,
        stop_requested=stop.is_set(),
    )


def restart_delay(restarts: int) -> float:
    """Seconds before restart number `restarts` (1-based) of a SuperNode that lost its SuperLink."""
    return float(RESTART_BACKOFF[min(restarts, len(RESTART_BACKOFF)) - 1])


def connected_before(state: Path, public_key: str | None) -> bool:
    """Whether a SuperNode of this site connected with this key before (STATE/node.json)."""
    try:
        record = strict_json((state / NODE_RECORD).read_bytes(), state / NODE_RECORD)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("public_key") == public_key


@dataclass(frozen=True)
class Step:
    """What `join` does after a SuperNode process stopped: leave (it was asked to), restart it
    after `delay` s, try again after `delay` s (the SuperLink refused a key that connected before),
    or fail with `error`. `message`: a line for the site admin, or ""."""

    action: Literal["leave", "restart", "retry", "fail"]
    delay: float = 0.0
    message: str = ""
    error: JoinError | None = None


class Rejoin:
    """`join`'s decisions between SuperNode processes, each from that process alone (its exit
    status and fresh lines, `Attempt`): a connected SuperNode that stopped is restarted with
    backoff (a lost connection, a crash, a 401 from a SuperLink that restarted and forgot the
    node); a key refused at activation (Flower's 2004) although this key connected before is
    tried again for REJOIN_WINDOW_SECONDS from the first refusal after the last connection (the
    SuperLink still counts the killed SuperNode as online until its heartbeat expires); anything
    else fails."""

    def __init__(self, cfg: JoinConfig, public_key: str | None, route: ProxyRoute | None = None) -> None:
        self.cfg = cfg
        self.state = cfg.state_dir.resolve()
        self.log_path = self.state / "supernode.log"
        self.public_key = public_key
        self.route = route
        self.restarts = 0
        self.connected = False  # a SuperNode of this `join` connected
        self.refused_since: float | None = None  # first refusal since the last connection

    def after(self, attempt: Attempt, now: float) -> Step:
        if attempt.stop_requested:
            return Step("leave", message=f"left the federation (SuperNode {attempt.node_id or '-'} stopped)")
        error = explain_exit(attempt.tail, attempt.returncode, self.cfg, self.log_path, self.route)
        if attempt.node_id is not None:
            self.connected = True
            self.refused_since = None  # it connected since: an earlier refusal is over
        elif error.status == EXIT_NOT_REGISTERED and (self.connected or connected_before(self.state, self.public_key)):
            first = self.refused_since is None
            since = self.refused_since = now if self.refused_since is None else self.refused_since
            if now - since >= REJOIN_WINDOW_SECONDS:
                return Step("fail", error=error)
            message = (
                "the SuperLink refused this site's key although it connected before: it still counts "
                "this site's previous SuperNode as connected (stopped without leaving, e.g. killed); "
                f"retrying every {REJOIN_RETRY_SECONDS:g} s until that session expires "
                f"(at most {REJOIN_WINDOW_SECONDS:g} s)"
            )
            return Step("retry", REJOIN_RETRY_SECONDS, message if first else "")
        if attempt.node_id is None or not restartable(attempt, error, self.cfg):
            return Step("fail", error=error)
        if attempt.connected_seconds >= STABLE_SECONDS:
            self.restarts = 0  # it ran well for a while: start the backoff over
        self.restarts += 1
        delay = restart_delay(self.restarts)
        via = f" through {self.route.describe()}" if self.route is not None else ""
        return Step(
            "restart",
            delay,
            f"SuperNode {attempt.node_id} lost its connection to the SuperLink{via} "
            f"({lost_connection_cause(attempt)}); restarting it in {delay:g} s "
            f"(restart {self.restarts}; log {self.log_path})",
        )


def run_supernode(
    cfg: JoinConfig, out: TextIO = sys.stdout, echo: bool = False, route: ProxyRoute | None = None
) -> int:
    """Start the SuperNode and stay with it until this process is told to stop (SIGINT/SIGTERM,
    which it passes on); returns 0 then. Between SuperNode processes `Rejoin` decides: restart,
    try again, or raise JoinError."""
    state = cfg.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    node_config_file = write_flat_toml(state / "node-config.toml", cfg.node_config)
    runtime_port = cfg.runtime_port or free_port()
    cmd = supernode_command(cfg, node_config_file, runtime_port)
    log_path = state / "supernode.log"
    public_key = check_auth_key(cfg.auth_key) if cfg.auth_key is not None else None
    log.info("starting %s", " ".join(cmd))
    stop = threading.Event()
    last_node: list[str] = []
    rejoin = Rejoin(cfg, public_key, route)

    def forward(_signum: int, _frame: Any) -> None:
        stop.set()

    def on_connected(node_id: str) -> None:
        restarted = bool(last_node)
        last_node.append(node_id)
        (state / NODE_RECORD).write_text(json.dumps({"node_id": node_id, "public_key": public_key}) + "\n")
        what = "rejoined" if restarted else "joined"
        print(
            f"{what}: SuperNode {node_id} connected to {cfg.superlink}; waiting for runs "
            f"(log {log_path}; Ctrl-C to leave)",
            file=out,
            flush=True,
        )

    def say(message: str) -> None:
        """A line for the site admin, on stdout and in the SuperNode's log."""
        print(message, file=out, flush=True)
        log_file.write(f"--- join: {message}\n")
        log_file.flush()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    guard = start_app_guard(cfg, runtime_port, state / "app-guard.log")
    try:
        with RotatingLog(log_path) as log_file:
            while True:
                attempt = run_supernode_once(cfg, cmd, log_file, stop, on_connected, echo=echo)
                step = rejoin.after(attempt, time.monotonic())
                if step.action == "leave":
                    print(step.message, file=out, flush=True)
                    return EXIT_OK
                if step.action == "fail":
                    assert step.error is not None
                    raise step.error
                if step.message:
                    say(step.message)
                stop.wait(step.delay)
                if stop.is_set():
                    print(f"left the federation (SuperNode {attempt.node_id or '-'} stopped)", file=out, flush=True)
                    return EXIT_OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if guard.poll() is None:
            guard.terminate()
            try:
                guard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                guard.kill()


def lost_connection_cause(attempt: Attempt) -> str:
    """Why a connected SuperNode stopped, for the restart line: its exit status and last error
    line, and the cause where it is known. A 401 means the SuperLink no longer knows the node id
    (it restarted with its state in memory, or the node was unregistered). Flower's SuperNode
    meets it either on a request (an HTTPStatusError, logged) or on its heartbeat, which it
    answers by interrupting itself: exit 0, no error line, "terminated gracefully" last."""
    lines = [ln for ln in about_the_superlink(attempt.tail) if not ln.startswith(ENDED_LINE)]
    last = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() and ln.strip()), "")
    forgotten = (
        f"the SuperLink no longer knows node {attempt.node_id} (e.g. it restarted with its state in memory; "
        "the restart brings a new node id)"
    )
    if any("401 Unauthorized" in ln for ln in lines):
        return f"exit {attempt.returncode}, 401 Unauthorized: {forgotten}"
    if attempt.returncode == 0 and not last and any("terminated gracefully" in ln for ln in lines):
        return f"exit 0 after a 401 to its heartbeat: {forgotten}"
    return f"exit {attempt.returncode}{': ' + last if last else ''}"


def restartable(attempt: Attempt, error: JoinError, cfg: JoinConfig) -> bool:
    """Whether a SuperNode that connected and then stopped is worth starting again: yes when its
    connection ended (client/deploy/supernode_main.py) or it crashed; no when the site admin's
    --max-wait-time ran out or the cause is in this site's own setup."""
    if attempt.returncode == EXIT_CONNECTION_ENDED:
        return True
    if error.status == EXIT_USAGE:
        return False
    if cfg.max_wait_time is not None and any("giving up reconnection" in ln.lower() for ln in attempt.tail):
        return False
    return True


def join(cfg: JoinConfig, out: TextIO = sys.stdout, echo: bool = False) -> int:
    """Checks that need no data (files, node config, the SuperLink answering with the right
    certificate), then the SuperNode. Raises JoinError with a one-line reason."""
    if not cfg.insecure:
        if cfg.root_cert is None:
            raise JoinError("--root-cert is required (the federation's ca.pem); --insecure only for tests", EXIT_USAGE)
        if not cfg.root_cert.is_file():
            raise JoinError(f"--root-cert {cfg.root_cert} does not exist", EXIT_USAGE)
    public_key = check_auth_key(cfg.auth_key) if cfg.auth_key is not None else None
    validate_node_config(cfg.node_config)
    try:  # the privacy ledger must be the site key's (client/deploy/privacy_budget.py)
        cfg.node_config.update(
            check_privacy_budget(cfg.node_config, cfg.auth_key, public_key, cfg.new_privacy_budget, out)
        )
    except ValueError as err:  # LedgerError
        raise JoinError(
            f"not joining: DP training would be refused: {' '.join(str(err).split())}", EXIT_USAGE
        ) from None
    route = superlink_route(cfg)
    if route is not None:
        print(f"connecting to the SuperLink at {cfg.superlink} through {route.describe()}", file=out, flush=True)
    probe_superlink(cfg.superlink, None if cfg.insecure else cfg.root_cert, cfg.connect_timeout, route)
    policy = cfg.node_config.get("policy")
    approved, why = approved_apps(Path(str(policy)) if policy else None)
    print(
        f"approved app bundles: {len(approved)}{' (' + why + ')' if why else ''}; this site refuses to run any "
        "other (client.py approve BUNDLE.fab --policy FILE)",
        file=out,
        flush=True,
    )
    return run_supernode(cfg, out=out, echo=echo, route=route)
