"""`client.py join`: connect this site to a federation's SuperLink as a Flower SuperNode.

The SuperNode (flwr 1.41 `flower-supernode`) only makes outbound HTTPS connections to the
SuperLink; it verifies the server against the federation's CA (`--root-certificates`) and signs
its requests with the site's EC key (`--auth-supernode-private-key`, OpenSSH format), which the
coordinator registered. The ClientApp finds the data through the node config (`site-root`, plus
the site's policy keys, see client.site_runtime.SiteConfig), which stays on the site.

Before starting it, `join` probes the SuperLink itself (TCP, then a TLS handshake against the
CA) so that an unreachable server or a wrong certificate is one clear line within seconds
instead of a SuperNode retrying forever; a key the SuperLink does not know is recognised in the
SuperNode's own output (Flower's error 2004, "Failed to activate SuperNode").
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field

from client.approval import approved_apps
from client.supernode_pace import POLL_INTERVAL_S, SupernodePace
from healthfm_core.files import write_flat_toml

log = logging.getLogger("healthfm.client.join")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
EXIT_NO_CONNECTION = 4  # unreachable, or TLS failed (wrong certificate)
EXIT_NOT_REGISTERED = 5  # the SuperLink refused this site's key
EXIT_SUPERNODE_FAILED = 6  # the SuperNode stopped for another reason

# How client/supernode_main.py ends a SuperNode whose pull loop stopped (it never exits by itself).
EXIT_CONNECTION_ENDED = 75
ENDED_LINE = "healthfm: the SuperNode's connection to the SuperLink ended"
# Restarting such a SuperNode: waits between restarts (the last one repeats), reset once it has run
# STABLE_SECONDS; a SuperLink that counts a killed SuperNode as online refuses its key until the
# node misses its heartbeats (flwr 1.41: 2 x 30 s), so a refused key that connected before is
# retried for REJOIN_WINDOW_SECONDS.
RESTART_BACKOFF = (5, 10, 20, 40, 60)
STABLE_SECONDS = 300.0
REJOIN_RETRY_SECONDS = 10.0
REJOIN_WINDOW_SECONDS = 150.0
NODE_RECORD = "node.json"  # STATE/node.json: the last node id this key connected as

REPO = Path(__file__).resolve().parents[1]
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
    # How approved ClientApp tasks run (client/app_guard.py): warm = one process per run.
    clientapp: Literal["warm", "cold"] = "warm"
    warm_idle: float = Field(default=600.0, gt=0)  # stop a run's warm ClientApp after this idle time
    # The SuperNode's idle pull interval (client/supernode_pace.py; Flower's own is 3 s).
    poll_interval: float = Field(default=POLL_INTERVAL_S, gt=0, le=60)


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


def probe_superlink(address: str, root_cert: Path | None, timeout: float) -> None:
    """Connect to the SuperLink as the SuperNode will (TCP, then TLS verified against the CA
    and the host name); JoinError naming what failed."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
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
    with sock:
        if root_cert is None:
            return
        try:
            ctx = ssl.create_default_context(cafile=str(root_cert))
        except (OSError, ssl.SSLError) as err:
            raise JoinError(f"--root-cert {root_cert}: not a readable PEM certificate ({err})", EXIT_USAGE) from None
        sock.settimeout(timeout)
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            reason = err.verify_message or str(err)
            if "mismatch" in reason.lower():
                raise JoinError(
                    f"the SuperLink's certificate at {address} is not valid for {host!r} ({reason}); "
                    "connect by a name the coordinator provisioned, or ask for a new certificate"
                ) from None
            raise JoinError(
                f"the SuperLink's certificate at {address} does not verify against --root-cert "
                f"{root_cert} ({reason}): wrong CA file for this federation?"
            ) from None
        except TimeoutError:
            raise JoinError(
                f"the server at {address} accepted a connection but completed no TLS handshake "
                f"within {timeout:g} s (is it a SuperLink?)"
            ) from None
        except ssl.SSLError as err:
            reason = err.reason or str(err)
            hint = " (a SuperLink started with --insecure?)" if "WRONG_VERSION" in reason.upper() else ""
            raise JoinError(f"TLS with the SuperLink at {address} failed: {reason}{hint}") from None
        except OSError as err:
            raise JoinError(f"TLS with the SuperLink at {address} failed: {err.strerror or err}") from None


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
    # Through client/supernode_main.py: a SuperNode whose connection ended exits (and is restarted)
    # instead of idling forever, and it pulls at the site's pace (client/supernode_pace.py).
    # --isolation process: the SuperNode starts no SuperExec; the site's app guard takes that place
    # and starts a ClientApp only for an approved bundle (client/app_guard.py).
    cmd = [
        sys.executable,
        "-m",
        "client.supernode_main",
        *SupernodePace(poll_interval=cfg.poll_interval).args(),
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
    this package (client.supernode_main, client.app_guard)."""
    env = flower_env(cfg.state_dir.resolve() / "flwr-home")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def start_app_guard(cfg: JoinConfig, runtime_port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """The site's app guard (client/app_guard.py) on the SuperNode's local Runtime API; it dies
    with `join`. Its log: STATE/app-guard.log."""
    policy = cfg.node_config.get("policy")
    site = str(cfg.node_config.get("site-name", cfg.site_root.name))
    cmd = [
        sys.executable,
        "-m",
        "client.app_guard",
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
    with open(log_path, "a", encoding="utf-8") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=site_process_env(cfg),
            cwd=REPO,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def explain_exit(lines: list[str], returncode: int, cfg: JoinConfig, log_path: Path) -> JoinError:
    """The one-line reason a SuperNode stopped, from its output."""
    text = "\n".join(lines)
    low = text.lower()
    if "code: 2004" in low or "failed to activate supernode" in low:
        return JoinError(
            f"the SuperLink at {cfg.superlink} refused this site's key {cfg.auth_key}: it is not "
            "registered (ask the coordinator to run `coordinator register` for this site), or another "
            "SuperNode with this key is connected",
            EXIT_NOT_REGISTERED,
        )
    if "must be registered" in low or "authentication failed" in low or "unauthenticated" in low:
        return JoinError(
            f"the SuperLink at {cfg.superlink} did not accept this site's authentication ({cfg.auth_key})",
            EXIT_NOT_REGISTERED,
        )
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        return JoinError(
            f"the SuperLink's certificate at {cfg.superlink} does not verify against --root-cert {cfg.root_cert}"
        )
    if "connection refused" in low or "giving up reconnection" in low or "could not establish a connection" in low:
        return JoinError(f"lost the SuperLink at {cfg.superlink} (connection refused or retries exhausted)")
    if "address already in use" in low:
        return JoinError("the SuperNode's local port is in use; pass --runtime-port with a free port", EXIT_USAGE)
    if "unable to parse the private key" in low:
        return JoinError(f"--auth-key {cfg.auth_key}: Flower cannot parse it", EXIT_USAGE)
    last = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() and ln.strip()), "")
    return JoinError(
        f"the SuperNode stopped (exit {returncode}){': ' + last if last else ''}; see {log_path}", EXIT_SUPERNODE_FAILED
    )


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
    log_file: TextIO,
    stop: threading.Event,
    on_connected: Callable[[str], None],
    echo: bool = False,
) -> Attempt:
    """Start one SuperNode process and stay with it until it exits or `stop` is set (then it is
    sent SIGTERM, so it says goodbye to the SuperLink); its whole process group is gone on return."""
    node_id: str | None = None
    connected_at: float | None = None
    tail: list[str] = []
    log_file.write(f"--- join {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(cmd)}\n")
    log_file.flush()
    # Its own session and process group: the SuperExec and every flwr-clientapp it starts
    # stay in that group (Flower does not detach them on the site side), so killing the
    # group on the way out leaves nothing behind (stop_group).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=site_process_env(cfg),
        cwd=REPO,
        text=True,
        bufsize=1,
        errors="replace",
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
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
                tail = [*tail[-199:], line.rstrip("\n")]
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
        tail=tail,
        connected_seconds=time.monotonic() - connected_at if connected_at is not None else 0.0,
        stop_requested=stop.is_set(),
    )


def restart_delay(restarts: int) -> float:
    """Seconds before restart number `restarts` (1-based) of a SuperNode that lost its SuperLink."""
    return float(RESTART_BACKOFF[min(restarts, len(RESTART_BACKOFF)) - 1])


def connected_before(state: Path, public_key: str | None) -> bool:
    """Whether a SuperNode of this site connected with this key before (STATE/node.json)."""
    try:
        record = json.loads((state / NODE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("public_key") == public_key


def run_supernode(cfg: JoinConfig, out: TextIO = sys.stdout, echo: bool = False) -> int:
    """Start the SuperNode and stay with it until this process is told to stop (SIGINT/SIGTERM,
    which it passes on); returns 0 then. A SuperNode whose connection ended (its pull loop
    stopped on a SuperLink error, or it crashed) is restarted with backoff; a key the SuperLink
    refuses because it still counts this site's previous SuperNode as connected (killed without
    leaving) is retried until that session expires. Anything else raises JoinError."""
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

    def pause(seconds: float) -> None:
        stop.wait(seconds)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    guard = start_app_guard(cfg, runtime_port, state / "app-guard.log")
    restarts = 0
    refused_since: float | None = None
    try:
        with open(log_path, "a", encoding="utf-8") as log_file:
            while True:
                attempt = run_supernode_once(cfg, cmd, log_file, stop, on_connected, echo=echo)
                if attempt.stop_requested:
                    print(f"left the federation (SuperNode {attempt.node_id or '-'} stopped)", file=out, flush=True)
                    return EXIT_OK
                error = explain_exit(attempt.tail, attempt.returncode, cfg, log_path)
                # Refused although this key connected before: the SuperLink still counts the previous
                # SuperNode as online (it stopped without leaving, e.g. killed) until its heartbeat
                # expires; retry until then.
                if error.status == EXIT_NOT_REGISTERED and (last_node or connected_before(state, public_key)):
                    now = time.monotonic()
                    if refused_since is None:
                        refused_since = now
                        say(
                            "the SuperLink refused this site's key although it connected before: it still counts "
                            "this site's previous SuperNode as connected (stopped without leaving, e.g. killed); "
                            f"retrying every {REJOIN_RETRY_SECONDS:g} s until that session expires "
                            f"(at most {REJOIN_WINDOW_SECONDS:g} s)"
                        )
                    if now - refused_since < REJOIN_WINDOW_SECONDS:
                        pause(REJOIN_RETRY_SECONDS)
                        if stop.is_set():
                            print("left the federation (while waiting to rejoin)", file=out, flush=True)
                            return EXIT_OK
                        continue
                    raise error
                refused_since = None
                if attempt.node_id is None or not restartable(attempt, error, cfg):
                    raise error
                if attempt.connected_seconds >= STABLE_SECONDS:
                    restarts = 0  # it ran well for a while: start the backoff over
                restarts += 1
                delay = restart_delay(restarts)
                say(
                    f"SuperNode {attempt.node_id} lost its connection to the SuperLink "
                    f"({lost_connection_cause(attempt)}); restarting it in {delay:g} s "
                    f"(restart {restarts}; log {log_path})"
                )
                pause(delay)
                if stop.is_set():
                    print(f"left the federation (SuperNode {attempt.node_id} stopped)", file=out, flush=True)
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
    last = next((ln.strip() for ln in reversed(attempt.tail) if "error" in ln.lower() and ln.strip()), "")
    forgotten = (
        f"the SuperLink no longer knows node {attempt.node_id} (e.g. it restarted with its state in memory; "
        "the restart brings a new node id)"
    )
    if "401 Unauthorized" in last:
        return f"exit {attempt.returncode}, 401 Unauthorized: {forgotten}"
    if attempt.returncode == 0 and not last and any("terminated gracefully" in ln for ln in attempt.tail):
        return f"exit 0 after a 401 to its heartbeat: {forgotten}"
    return f"exit {attempt.returncode}{': ' + last if last else ''}"


def restartable(attempt: Attempt, error: JoinError, cfg: JoinConfig) -> bool:
    """Whether a SuperNode that connected and then stopped is worth starting again: yes when its
    connection ended (client/supernode_main.py) or it crashed; no when the site admin's
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
    if cfg.auth_key is not None:
        check_auth_key(cfg.auth_key)
    validate_node_config(cfg.node_config)
    probe_superlink(cfg.superlink, None if cfg.insecure else cfg.root_cert, cfg.connect_timeout)
    policy = cfg.node_config.get("policy")
    approved, why = approved_apps(Path(str(policy)) if policy else None)
    print(
        f"approved app bundles: {len(approved)}{' (' + why + ')' if why else ''}; this site refuses to run any "
        "other (client.py approve BUNDLE.fab --policy FILE)",
        file=out,
        flush=True,
    )
    return run_supernode(cfg, out=out, echo=echo)
