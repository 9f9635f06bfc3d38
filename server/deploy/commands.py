"""Coordinator commands: provision a federation, start its SuperLink, register sites, launch and
resume runs. All of them take the federation directory FED that `provision` creates.

    python -m server.coordinator provision FED --site NAME ... [--hostname fl.example.org ...] [--force]
    python -m server.coordinator superlink FED [--host 127.0.0.1] [--port 9093] [--internal-port N]
        [--state memory|file] [--insecure]
    python -m server.coordinator register  FED [--site NAME ...]
    python -m server.coordinator bundle    FED [--head]
    python -m server.coordinator launch    FED --out-dir RUN_DIR [--model tiny] [--rounds 3] [-c KEY=VALUE ...] [--wait]
    python -m server.coordinator resume    FED --out-dir RUN_DIR [--from CHECKPOINT] [--rounds N] [--wait]
    python -m server.coordinator status    FED [--run-id ID]
    python -m server.coordinator dashboard FED [--port 8765] [--host 127.0.0.1 --token-file FILE] [--release MODEL_DIR ...]
    python -m server.coordinator release   FED --run RUN_DIR --out MODEL_DIR [--force] [--unsigned]
    python -m server.coordinator head      FED --model MODEL_DIR --out HEADS_DIR [--tasks T ...] [--keys K ...]
        [--rounds 200] [--c-grid C ...] [--local-steps 5] [--min-sites N] [--dp-target-epsilon E |
        --dp-noise-multiplier Z] [--dp-max-grad-norm 1] [--dp-delta 1e-5] [--dp-batch-size 64]

`head` trains a release's federated task head across the joined sites (server/head_app.py,
client/head_app.py) as its own run with its own app bundle (`bundle --head`, which sites approve
apart from the pretraining's), waits for it, and prints each head and the sites that took no part:
exit 0 when every key got a head with every site that answered, 4 when a site answered with an
error (e.g. it did not approve the head's bundle), 1 when the run failed or no head was fitted.

`launch --wait`, `resume --wait` and `status --run-id` read how the run ended from RUN_DIR/
outcome.json (server/outcome.py) and print it: exit 0 only when the run completed without losing a
site, 1 when it failed (with the ServerApp's reason), 4 when it completed but lost a site, 5 when
the SuperLink does not answer (its state unknown: not "no such run"). `--superlink` on any
command is for that command only; the saved address (`superlink`) is not rewritten.

How this maps onto flwr 1.41 (read from its source): `flower-superlink` serves the Fleet, Control
and Runtime APIs on one HTTPS port (`--host/--port`), with TLS from `--ssl-ca-certfile/
--ssl-certfile/--ssl-keyfile` and node authentication from `--enable-supernode-auth`. `superlink`
binds it to 127.0.0.1 (a private port) and exposes only the Fleet API on the public host/port
through nginx (server.deploy.proxy), its state in Flower's in-memory store unless `--state file`, so at
each start it registers the registry's sites again before nginx opens; `register` records each
site's node id in FED/server/registry.json (server.deploy.registry), which the ServerApp reads; `bundle`
builds the app bundle sites approve (server.deploy.bundle). The `flwr` CLI's connection and commands:
server.deploy.flwr_control; the generated app and its run config:
server.deploy.flwr_app. Resume: the ServerApp continues from the latest checkpoint under the run's
out-dir when the run config says `resume=true` (or from `--from CHECKPOINT`: run config
`resume-from`); `resume` relaunches with the config of the latest launch of that out-dir that got
through round 0 (rounds.jsonl has its setup/resume event): a later launch that failed before
that (its config or checkpoint refused) is skipped, with its reason printed, because nothing it
ran produced the checkpoints being resumed.

Faults: `superlink` supervises its processes. nginx (stateless) and the SuperExec are restarted
when they stop; the SuperLink is not (its state and the run in flight die with it): everything is
stopped with one line naming the process and why, and each run whose ServerApp is gone is recorded
`interrupted` with the command that resumes it (server.outcome.settle_outcome). A run owns its
out-dir (server.run_claim): `launch` claims it before starting anything and writes its run config
to a file of its own (FED/server/run-configs/), so concurrent launches never share either.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from pydantic import ValidationError

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.files import write_flat_toml
from healthfm_core.release import ReleaseError, load_release
from healthfm_core.release_signing import SignatureError, load_signing_key
from healthfm_core.strict_files import DuplicateKeyError, StrictFileError, read_json, strict_json
from healthfm_core.train.checkpoint import CheckpointError
from server.config import FederationConfig
from server.deploy.body_limit import MIB, run_push_body_bytes
from server.deploy.bundle import build_bundle, write_bundle
from server.deploy.dashboard.serve import add_dashboard_arguments, cmd_dashboard
from server.deploy.door import fit_run, open_door, refresh_keys
from server.deploy.flwr_app import check_run_config, parse_overrides, write_app, write_head_app
from server.deploy.flwr_control import (
    CONNECTION,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SITE_LOST,
    EXIT_USAGE,
    CoordinatorError,
    RunUnknown,
    SuperLinkUnreachable,
    check_reachable,
    flower_bin,
    flower_env,
    flwr_error,
    read_connection,
    run_flwr,
    run_status,
    start_run,
    use_superlink_once,
    wait_for_run,
    write_connection,
)
from server.deploy.launches import LaunchRecord as LaunchRecord  # re-exported: the tests' import
from server.deploy.launches import launches_path as _launches_path
from server.deploy.launches import read_launches as read_launches
from server.deploy.launches import record_launch as _record_launch
from server.deploy.launches import resume_command as resume_command
from server.deploy.provision import (
    FederationPaths,
    ProvisionConfig,
    ProvisionError,
    describe,
    provision,
    read_manifest,
)
from server.deploy.proxy import start_proxy, wait_listening
from server.deploy.registry import RegisteredSite, RegistryError, read_registry, registry_path, write_registry
from server.deploy.superlink_main import MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S
from server.head_app import SUMMARY_FILE, HeadRunConfig, head_keys
from server.head_options import add_head_dp_args, head_dp_config
from server.outcome import RunOutcome, read_outcome, settle_outcome
from server.release import RunNotReleasable, release_run
from server.run_claim import Holder, OutDirInUse, claim_for_launch, process_start, release, set_run_id

log = logging.getLogger("healthfm.coordinator")

DEFAULT_PORT = 9093
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- commands


def cmd_provision(args: argparse.Namespace) -> int:
    try:
        cfg = ProvisionConfig(
            federation_dir=Path(args.federation_dir),
            sites=args.site,
            hostnames=args.hostname,
            ca_days=args.ca_days,
            cert_days=args.cert_days,
            force=args.force,
            new_release_key=args.new_release_key,
        )
    except ValidationError as err:
        raise CoordinatorError("; ".join(e["msg"] for e in err.errors()), EXIT_USAGE) from None
    result = provision(cfg)
    print(describe(result))
    return EXIT_OK


def _paths(args: argparse.Namespace) -> FederationPaths:
    paths = FederationPaths(root=Path(args.federation_dir).resolve())
    read_manifest(paths.root)  # a clear error if FED is not a provisioned federation
    return paths


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether process `pid` still exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


# Flower's own store: Python objects, no SQL (the name flower-superlink --database knows it by).
IN_MEMORY_STATE = FLWR_IN_MEMORY_DB_NAME


def superlink_database(paths: FederationPaths, state: str | None, database: str | None) -> str:
    """What `flower-superlink --database` gets. `memory` (the default, Flower's own): its
    in-memory store, which answers each Fleet and ServerApp call without Flower's SQL layer (a warm
    tiny round's time outside training x0.73 against the file, benchmarks/federation_round.py
    --states file memory); it forgets registrations and runs when the SuperLink stops, so
    `superlink` registers the registry's sites again at every start (register_known_sites).
    `file` (or a --database path): FED/server/superlink.db, where both outlive a restart."""
    if state is None:
        state = "file" if database is not None else "memory"
    if state not in ("file", "memory"):
        raise CoordinatorError(f"--state: value {state!r} is not one of file, memory", EXIT_USAGE)
    if state == "memory":
        if database is not None:
            raise CoordinatorError(
                f"--database {database!r} with --state memory: an in-memory SuperLink has no database file",
                EXIT_USAGE,
            )
        return IN_MEMORY_STATE
    return database or str(paths.server_dir / "superlink.db")


def register_known_sites(paths: FederationPaths) -> int:
    """Register every site the registry records with a SuperLink that has just started with its
    state in memory (it knows no key yet); each gets a new node id, written to the registry, which
    every later run reads. Returns how many failed (each named on stderr; such a site is refused
    until `coordinator register` succeeds for it)."""
    path = registry_path(paths)
    try:
        names = [s.name for s in read_registry(path).sites]
    except RegistryError as err:
        print(f"error: {err}; no site registered with this SuperLink", file=sys.stderr, flush=True)
        return 1
    print(f"state in memory: registering the {len(names)} site(s) {path} records", flush=True)
    failed = 0
    for site in names:
        try:
            ok = _register_one(paths, site)
        except (OSError, RegistryError) as err:  # a key file gone, a registry rewritten meanwhile
            print(f"error: registering {site}: {err}", file=sys.stderr, flush=True)
            ok = False
        failed += not ok
    if failed:
        print(f"warning: {failed} of {len(names)} site(s) not registered; see above", file=sys.stderr, flush=True)
    return failed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_superlink(args: argparse.Namespace) -> int:
    """Run the SuperLink (and, with TLS, its nginx proxy) in the foreground until stopped."""
    paths = _paths(args)
    host, port = args.host, args.port
    database = superlink_database(paths, args.state, args.database)
    if not 0 < args.min_heartbeat_interval <= MAX_HEARTBEAT_INTERVAL_S:
        raise CoordinatorError(
            f"--min-heartbeat-interval {args.min_heartbeat_interval:g}: must be above 0 and at most "
            f"{MAX_HEARTBEAT_INTERVAL_S:g} s",
            EXIT_USAGE,
        )
    # The SuperLink only on loopback behind the proxy; with --insecure (local tests) on host:port itself.
    link_host, link_port = (host, port) if args.insecure else ("127.0.0.1", args.internal_port or _free_loopback_port())
    # --isolation process: the SuperLink starts no SuperExec; `superlink` runs it and restarts it if it
    # stops (Flower's own exits on one failed Runtime API call, e.g. a busy database, and no run
    # would start again). Through server.deploy.superlink_main: SQLite waits longer for its lock than
    # Flower's 5 s, so a loaded machine delays calls instead of failing them.
    cmd = [
        sys.executable,
        "-m",
        "server.deploy.superlink_main",
        "--min-heartbeat-interval",
        str(args.min_heartbeat_interval),
        flower_bin("flower-superlink"),
        "--host",
        link_host,
        "--port",
        str(link_port),
        "--database",
        database,
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
    ]  # never pip/uv-install what a run names
    if args.insecure:
        print(
            "WARNING: --insecure: the SuperLink runs without TLS and without SuperNode authentication, and "
            "without the proxy: anyone who reaches it can join, read traffic and use its Control API. Use only for "
            "local tests.",
            file=sys.stderr,
        )
        cmd.append("--insecure")
    else:
        for needed in (paths.ca_cert, paths.superlink_cert, paths.superlink_key):
            if not needed.is_file():
                raise CoordinatorError(f"{needed} not found: provision the federation first", EXIT_USAGE)
        cmd += [
            "--ssl-ca-certfile",
            str(paths.ca_cert),
            "--ssl-certfile",
            str(paths.superlink_cert),
            "--ssl-keyfile",
            str(paths.superlink_key),
            "--enable-supernode-auth",
        ]
    if args.log_file:
        cmd += ["--log-file", args.log_file]
    connect_host = "127.0.0.1" if link_host in ("0.0.0.0", "::") else link_host
    write_connection(
        paths, f"[{connect_host}]:{link_port}" if ":" in connect_host else f"{connect_host}:{link_port}", args.insecure
    )
    env = flower_env(paths)
    for legacy in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        env.pop(legacy, None)  # Flower's legacy gRPC servers bind 0.0.0.0, past the proxy
    # This checkout importable for `-m server.deploy.superlink_main`, wherever the coordinator runs from.
    link_env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])}
    link = subprocess.Popen(cmd, env=link_env, stdin=subprocess.DEVNULL)
    connect = f"[{connect_host}]:{link_port}" if ":" in connect_host else f"{connect_host}:{link_port}"
    superexec_cmd = [
        flower_bin("flower-superexec"),
        "--runtime-api-address",
        connect,
        "--parent-pid",
        str(link.pid),
        *(["--insecure"] if args.insecure else ["--root-certificates", str(paths.ca_cert)]),
    ]
    sup = _Supervised(link=link)
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in sup.running():
            proc.send_signal(signal.SIGTERM if proc is not link else signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    failure = ""  # which process stopped everything, and why
    try:
        if args.insecure:
            print(
                f"SuperLink on {host}:{port} (without TLS); sites join with --superlink <this host>:{port}", flush=True
            )
        else:
            wait_listening("127.0.0.1", link_port, link, timeout=600)
            if database == IN_MEMORY_STATE:
                # Before the proxy opens the Fleet API: a site reconnecting after a restart finds its
                # key registered again, never a SuperLink that refuses it.
                register_known_sites(paths)  # names each failure; the SuperLink serves the others
            # Which keys the door lets in and how large a body (server/deploy/door.py), then nginx.
            door = open_door(paths, args.max_body_mib * MIB if args.max_body_mib else None)
            sup.nginx = start_proxy(paths, host, port, link_port)
            wait_listening(host, port, sup.nginx)
            print(
                f"SuperLink on 127.0.0.1:{link_port} (TLS + SuperNode authentication; Control API only from this "
                f"machine); nginx on {host}:{port} forwards the Fleet API only, to registered sites' keys, "
                f"push-object bodies up to {door.push_body_bytes // MIB} MiB ({door.sized_for}; logs "
                f"{paths.server_dir}/nginx-*.log)",
                flush=True,
            )
            print(f"SuperLink ready: sites join with --superlink <this host>:{port}", flush=True)
        while not stopping:
            if args.parent_pid is not None and not _alive(args.parent_pid):
                print(f"parent process {args.parent_pid} is gone: stopping", file=sys.stderr, flush=True)
                stopping = True
                break
            if link.poll() is not None:
                failure = f"the SuperLink (flower-superlink, pid {link.pid}) stopped ({_how(link)})"
                break
            if sup.nginx is not None:
                if sup.nginx.poll() is None:
                    sup.note_nginx_workers()
                else:
                    failure = sup.restart_nginx(paths, host, port, link_port)
                    if failure:
                        break
            if not sup.superexec or sup.superexec.poll() is not None:
                if sup.superexec:
                    print(
                        f"SuperExec (pid {sup.superexec.pid}) stopped ({_how(sup.superexec)}); restarting it (a run "
                        "whose ServerApp stopped with it is interrupted: `resume` it)",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(2.0)
                sup.superexec = subprocess.Popen(superexec_cmd, env=env, stdin=subprocess.DEVNULL)
            time.sleep(0.5)
    finally:
        sup.stop_all()  # one stopped (or we were told to stop): the others, and the runs' ServerApps, too
    interrupted = _settle_runs(paths)
    if failure:
        # One line: which process stopped everything and why, and what became of the runs in flight.
        print(
            f"error: {failure}; stopped {'nginx, ' if sup.nginx is not None else ''}the SuperLink's SuperExec and "
            f"every run's ServerApp with it{'; ' + '; '.join(interrupted) if interrupted else ''}"
            f"{'; start `superlink` again before resuming' if interrupted else ''}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILED
    if interrupted:
        print(f"stopped: {'; '.join(interrupted)}", file=sys.stderr, flush=True)
    rc = link.returncode
    return EXIT_OK if stopping or rc in (0, -signal.SIGTERM, -signal.SIGINT, 130) else EXIT_FAILED


# nginx restarted more often than this within NGINX_RESTART_WINDOW_S: something keeps killing it
# (or it cannot start); `superlink` stops rather than loop.
NGINX_MAX_RESTARTS = 5
NGINX_RESTART_WINDOW_S = 600.0


def _how(proc: subprocess.Popen[bytes]) -> str:
    """How a stopped process ended, in words: its exit status or the signal that killed it."""
    rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


def _children(pid: int) -> list[int]:
    """The direct children of pid (Linux /proc; [] elsewhere)."""
    found: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(x) for x in path.read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


class _Supervised:
    """The processes `superlink` runs: the SuperLink, its nginx (restarted when it stops) and the
    SuperExec (restarted when it stops)."""

    def __init__(self, link: subprocess.Popen[bytes]) -> None:
        self.link = link
        self.nginx: subprocess.Popen[bytes] | None = None
        self.superexec: subprocess.Popen[bytes] | None = None
        self.nginx_workers: dict[int, str] = {}  # pid -> its start (a reload replaces the workers)
        self.nginx_restarts: list[float] = []

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.superexec, self.nginx, self.link) if p is not None and p.poll() is None]

    def note_nginx_workers(self) -> None:
        """Remember nginx's workers: a master killed outright leaves them holding the port."""
        if self.nginx is not None:
            self.nginx_workers.update({pid: process_start(pid) for pid in _children(self.nginx.pid)})

    def _kill_orphaned_workers(self) -> None:
        left = [
            pid
            for pid, started in self.nginx_workers.items()
            if started and process_start(pid) == started and _cmdline(pid).startswith("nginx:")
        ]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(process_start(pid) == self.nginx_workers[pid] for pid in left):
            time.sleep(0.1)
        self.nginx_workers.clear()

    def restart_nginx(self, paths: FederationPaths, host: str, port: int, link_port: int) -> str:
        """nginx stopped: start it again (it holds no state; sites' SuperNodes reconnect by
        themselves); "" or why `superlink` must stop instead."""
        assert self.nginx is not None
        dead = self.nginx
        what = f"nginx (pid {dead.pid}) stopped ({_how(dead)})"
        self._kill_orphaned_workers()
        now = time.monotonic()
        self.nginx_restarts = [t for t in self.nginx_restarts if now - t < NGINX_RESTART_WINDOW_S]
        if len(self.nginx_restarts) >= NGINX_MAX_RESTARTS:
            return (
                f"{what}, its {len(self.nginx_restarts) + 1}th stop within {NGINX_RESTART_WINDOW_S:g} s "
                f"(see {paths.server_dir}/nginx-error.log)"
            )
        self.nginx_restarts.append(now)
        print(f"{what}; restarting it (sites reconnect by themselves)", file=sys.stderr, flush=True)
        try:
            self.nginx = start_proxy(paths, host, port, link_port)  # the door's files as they are now
            wait_listening(host, port, self.nginx)
        except CoordinatorError as err:
            return f"{what} and did not start again: {err} (see {paths.server_dir}/nginx-error.log)"
        print(f"nginx restarted (pid {self.nginx.pid}) on {host}:{port}", flush=True)
        return ""

    def stop_all(self) -> None:
        """SIGTERM to every process below `superlink` (the runs' ServerApps, children of the SuperExec,
        included: they stop with it anyway, and so record how far they got), SIGKILL after 30 s."""
        self.note_nginx_workers()
        below = [pid for pid in _descendants(os.getpid()) if pid not in {p.pid for p in self.running()}]
        for proc in self.running():
            proc.terminate()
        starts = {pid: process_start(pid) for pid in below}
        for pid in below:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for child in (self.superexec, self.nginx, self.link):
            if child is None:
                continue
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        while time.monotonic() < deadline and any(starts[pid] and process_start(pid) == starts[pid] for pid in below):
            time.sleep(0.2)
        for pid in below:
            if starts[pid] and process_start(pid) == starts[pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._kill_orphaned_workers()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _settle_runs(paths: FederationPaths) -> list[str]:
    """After the SuperLink stopped: each run launched from here whose outcome said "running" and
    whose ServerApp is gone is recorded as interrupted (server.outcome.settle_outcome); one
    phrase per such run, with the command that resumes it."""
    try:
        launches = read_launches(paths)
    except (OSError, ValueError) as err:
        print(f"warning: {_launches_path(paths)}: {err}", file=sys.stderr)
        return []
    latest = {r.out_dir: r for r in launches[-100:]}  # the latest launch of each out-dir
    said = []
    for out_dir, record in latest.items():
        try:
            before = read_outcome(out_dir)
        except ValueError:
            continue
        if before is None or before.run_id != record.run_id:
            continue
        if before.status != "running" and not (before.status == "interrupted" and not before.resume):
            continue
        outcome = _outcome_of(Path(out_dir), record.run_id, paths)
        if outcome is not None and outcome.status == "interrupted":
            said.append(f"run {record.run_id} ({out_dir}) {outcome.describe()}")
    return said


def _apply_superlink_option(paths: FederationPaths, args: argparse.Namespace) -> None:
    """A --superlink given here is for this command only (the saved connection stays)."""
    if getattr(args, "superlink", None):
        use_superlink_once(paths, args.superlink, insecure=getattr(args, "insecure", False))
    read_connection(paths)


def _register_one(paths: FederationPaths, site: str) -> bool:
    """Register one site's key with the SuperLink and record its node id in the registry."""
    key_path = paths.registered_public_key(site)
    public_key = key_path.read_text().strip()
    path = registry_path(paths)
    registry = read_registry(path)
    proc = run_flwr(paths, ["supernode", "register", str(key_path), CONNECTION, "--name", site, "--format", "json"])
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        try:
            node_id = int(json.loads(proc.stdout[proc.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError) as err:
            print(
                f"error: registering {site}: cannot read the node id from `flwr supernode register` ({err})",
                file=sys.stderr,
            )
            return False
        write_registry(path, registry.with_site(RegisteredSite(name=site, public_key=public_key, node_id=node_id)))
        print(f"registered {site}")
        print(f"  node {node_id}, recorded in {path}")
        return True
    known = registry.get(site)
    if "already in use" in text.lower() and known is not None and known.public_key == public_key:
        print(f"registered {site} (already)")
        print(f"  node {known.node_id}, in {path}")
        return True
    if "already in use" in text.lower():
        print(
            f"error: the key of {site} is registered with the SuperLink but {path} does not record its node id; "
            f"unregister it (flwr supernode unregister NODE_ID {CONNECTION}) and register again",
            file=sys.stderr,
        )
    else:
        print(f"error: registering {site} failed: {flwr_error(proc)}", file=sys.stderr)
    return False


def cmd_register(args: argparse.Namespace) -> int:
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    manifest = read_manifest(paths.root)
    sites = args.site or manifest.site_names()
    unknown = [s for s in sites if s not in manifest.site_names()]
    if unknown:
        raise CoordinatorError(f"site(s) {unknown} are not in {paths.manifest}; provision them first", EXIT_USAGE)
    try:
        failed = sum(not _register_one(paths, site) for site in sites)
    except RegistryError as err:
        raise CoordinatorError(str(err)) from None
    # The door lets the registered keys in from now on (nginx reloaded, nothing restarted).
    if refresh_keys(paths):
        print(
            f"nginx reloaded: it forwards the calls of the {len(read_registry(registry_path(paths)).sites)} registered site(s)"
        )
    return EXIT_FAILED if failed else EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    """Build the app bundle a launch (with --head: `head`) ships, for the sites to inspect and approve."""
    paths = _paths(args)
    path, digest = write_bundle(paths, head=args.head)
    print(f"app bundle {path}")
    print(f"sha256 {digest}")
    print(
        "send it to each site's admin: `python client/client.py approve BUNDLE.fab --policy POLICY` shows what "
        "it holds and approves it; a site runs no other bundle"
    )
    return EXIT_OK


def cmd_head(args: argparse.Namespace) -> int:
    """Train the release's federated task head across the joined sites (server/head_app.py): its
    own run and app bundle; the ServerApp writes OUT/heads/, heads.json, head_rounds.jsonl and
    head.log. Waits for the run, then prints each head and the sites that took no part."""
    try:  # an unknown task name is a usage error, named with the known ones, before anything runs
        resolve_tasks(args.tasks)
    except ValueError as err:
        raise CoordinatorError(f"--tasks: {err}", EXIT_USAGE) from None
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    model = Path(args.model).resolve()
    try:
        model_release = load_release(model, trusted_keys=[paths.release_public_key])
    except (ReleaseError, OSError) as err:
        raise CoordinatorError(f"--model {args.model}: {err}", EXIT_USAGE) from None
    registry = registry_path(paths)
    try:
        registered = read_registry(registry).sites
        cfg = HeadRunConfig(
            model=model,
            out_dir=Path(args.out).resolve(),
            tasks=args.tasks,
            keys=args.keys,
            rounds=args.rounds,
            local_steps=args.local_steps,
            min_sites=args.min_sites if args.min_sites is not None else max(1, len(registered)),
            timeout_s=args.stage_timeout,
            setup_sha256=model_release.setup.sha256,
            weights_sha256=model_release.weights_sha256,
            release_key=paths.release_public_key,
            registry=registry if registered else None,  # only the registered sites take part, by name
            **({"c_grid": args.c_grid} if args.c_grid else {}),
            **head_dp_config(args),
        )
        evaluation = model_release.meta.evaluation
        keys = head_keys(cfg, evaluation.tasks if evaluation is not None else [])
    except (ValidationError, ValueError) as err:  # RegistryError and an unknown task name are ValueErrors
        text = str(err).split("For further information")[0]
        raise CoordinatorError(" ".join(text.split())[:600], EXIT_USAGE) from None
    if not keys:
        raise CoordinatorError(f"no label key to fit: give --tasks or --keys (the release {model} names no task)", EXIT_USAGE)  # fmt: skip
    out_dir = cfg.out_dir
    if cfg.privacy.requested:  # the plan before anything starts; each site's own once it sent its stats
        limit = f"at most {cfg.dp_run_epsilon:g} per site (each site refuses a round past it)" if cfg.dp_run_epsilon else "none (each site's lifetime cap only)"  # fmt: skip
        print(
            f"DP plan: {cfg.privacy.describe()}; {cfg.planned_dp_steps()} DP steps per key and site "
            f"({len(keys)} key(s)); the run's epsilon limit: {limit}; each site's planned epsilon goes to "
            f"{out_dir / 'head.log'} before its first round and to heads.json (dp_plan)",
            flush=True,
        )
    claim = _claim_out_dir(paths, out_dir)
    try:
        app_dir = write_head_app(paths)
        print(
            f"head app bundle sha256 {build_bundle(app_dir)[1]} (each site runs it only if its policy approved it: "
            f"`coordinator bundle {paths.root} --head`)",
            flush=True,
        )
        config_file = _run_config_file(paths, cfg.to_run_config())
        run_id = start_run(paths, app_dir, config_file)
        config_file.rename(config_file.with_name(f"head-run-{run_id}.toml"))
        claim = set_run_id(out_dir, claim, run_id)
        print(f"launched head run {run_id}: release {model} (setup {model_release.setup.sha256[:12]}...), keys {keys}, out {out_dir}", flush=True)  # fmt: skip
        status = wait_for_run(
            paths,
            run_id,
            args.timeout,
            unreachable_grace=args.unreachable_grace,
            ending=lambda: heads_summary(out_dir, run_id) is not None,
        )
    finally:
        release(out_dir, claim)
    return report_heads(run_id, status, out_dir, keys)


def heads_summary(out_dir: Path, run_id: int) -> dict[str, Any] | None:
    """OUT/heads.json when the head run `run_id` wrote it (its last act), else None."""
    try:
        summary = read_json(out_dir / SUMMARY_FILE)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("run_id") == run_id else None


def report_heads(run_id: int, status: str, out_dir: Path, keys: Sequence[str]) -> int:
    """Print each key's head (or why none) and the sites that took no part; the exit status:
    0 every key has a head and no site erred, EXIT_SITE_LOST a site answered with an error (or a
    key got no head), EXIT_FAILED the run failed or fitted no head."""
    summary = heads_summary(out_dir, run_id)
    if summary is None:
        print(
            f"error: head run {run_id} {status}, and {out_dir / SUMMARY_FILE} records nothing for it; "
            f"see {out_dir}/head.log and `flwr log {run_id}`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    heads = summary.get("heads", {})
    erred = False
    for key in keys:
        got = heads.get(key, {"reason": "not in heads.json"})
        if "head" in got:
            rows = ", ".join(f"{site} {n}" for site, n in sorted(got["train_rows"].items()))
            print(f"{key}: head {got['head']} (C={got['c']:g}; train rows per site: {rows})", flush=True)
        else:
            print(f"{key}: no head: {got['reason']}", file=sys.stderr)
        for site, plan in sorted(got.get("dp_plan", {}).items()):
            print(f"  {site}: DP plan epsilon {plan['epsilon']:.3f} over {plan['steps']} steps", flush=True)
        for site, why in sorted(got.get("refused", {}).items()):
            print(f"  {site} took no part: refused at {why.get('stage')}: {why.get('refused')}", flush=True)
        for site, rejected in sorted(got.get("rejected", {}).items()):
            print(
                f"  {site}: {len(rejected)} repl(ies) rejected by a bound, first: {rejected[0]['reason']}", flush=True
            )
        for site, why in sorted(got.get("errors", {}).items()):
            erred = True
            print(f"  {site} took no part: error at {why.get('stage')}: {why.get('error')}", file=sys.stderr)
    print(f"summary {out_dir / SUMMARY_FILE}; rounds {out_dir / 'head_rounds.jsonl'}; log {out_dir / 'head.log'}")
    fitted = [k for k in keys if "head" in heads.get(k, {})]
    if status != "finished:completed" or not fitted:
        print(f"error: head run {run_id} {status}: {len(fitted)} of {len(keys)} head(s) fitted", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_SITE_LOST if erred or len(fitted) < len(keys) else EXIT_OK


def _run_live(paths: FederationPaths) -> Callable[[int], bool | None]:
    """For claim_for_launch: whether Flower still runs a run (None: the SuperLink does not answer)."""

    def live(run_id: int) -> bool | None:
        try:
            return not run_status(paths, run_id).startswith("finished")
        except RunUnknown:
            return False
        except CoordinatorError:
            return None

    return live


def _run_config_file(paths: FederationPaths, run_config: dict[str, str | int | float | bool]) -> Path:
    """This launch's own run config file (FED/server/run-configs/): two launches at once once
    both wrote FED/server/run-config.toml and one ran with the other's config."""
    folder = paths.server_dir / "run-configs"
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"launch-{os.getpid()}-", suffix=".toml", dir=folder)
    os.close(fd)
    return write_flat_toml(name, run_config)


def _claim_out_dir(paths: FederationPaths, out_dir: Path) -> Holder:
    """Claim out_dir for a run before anything starts (server/run_claim.py): it is the run's alone."""
    try:
        claim, stale = claim_for_launch(out_dir, _run_live(paths))
    except OutDirInUse as err:
        raise CoordinatorError(str(err), EXIT_USAGE) from None
    if stale is not None:
        print(f"note: out-dir {out_dir} was claimed by {stale.describe()}, which is gone: taking it over", flush=True)
    return claim


def _launch(
    paths: FederationPaths, run_config: dict[str, str | int | float | bool], args: argparse.Namespace, resumed: bool
) -> int:
    config = check_run_config(run_config)
    out_dir = Path(str(run_config["out-dir"]))
    claim = _claim_out_dir(paths, out_dir)
    try:
        _fit_door(paths, config)
        app_dir = write_app(paths)
        if not run_config.get("registry"):  # only the registered sites take part (server.deploy.registry)
            run_config = {**run_config, "registry": str(registry_path(paths))}
        print(
            f"app bundle sha256 {build_bundle(app_dir)[1]} (each site runs it only if its policy approved it)",
            flush=True,
        )
        config_file = _run_config_file(paths, run_config)
        run_id = start_run(paths, app_dir, config_file)
    except BaseException:
        release(out_dir, claim)
        raise
    config_file.rename(config_file.with_name(f"run-{run_id}.toml"))
    claim = set_run_id(out_dir, claim, run_id)
    _record_launch(
        paths,
        LaunchRecord(
            run_id=run_id,
            out_dir=str(run_config["out-dir"]),
            run_config=run_config,
            launched_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            resumed=resumed,
        ),
    )
    print(f"{'resumed' if resumed else 'launched'} run {run_id}: out-dir {run_config['out-dir']}", flush=True)
    if not args.wait:
        return EXIT_OK
    try:
        status = wait_for_run(
            paths,
            run_id,
            args.timeout,
            unreachable_grace=args.unreachable_grace,
            ending=lambda: _ending(out_dir, run_id),
        )
    except SuperLinkUnreachable as err:
        outcome = _outcome_of(out_dir, run_id, paths)
        raise SuperLinkUnreachable(
            f"{err}; {out_dir}/outcome.json: {outcome.describe() if outcome else 'nothing recorded for this run'}"
        ) from None
    except RunUnknown as err:
        # A restarted SuperLink (state in memory) forgot the run: its out-dir says what happened.
        outcome = _outcome_of(out_dir, run_id, paths, flower_status="finished:unknown to the SuperLink")
        print(
            f"error: run {run_id}: {err}; {out_dir}/outcome.json: "
            f"{outcome.describe() if outcome else 'nothing recorded for this run'}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        release(out_dir, claim)  # only if its ServerApp never took it over
    return report_outcome(run_id, status, out_dir, paths)


def _fit_door(paths: FederationPaths, config: FederationConfig) -> None:
    """The door's push-object limit raised to what this run's sites send (server/deploy/door.py),
    before the run starts; a fixed limit below it refuses the launch."""
    secure = (
        f"secure aggregation, {config.secagg_field_bits}-bit field"
        if config.secure_aggregation
        else "no secure aggregation"
    )
    raised = fit_run(paths, run_push_body_bytes(config), f"a run of model {config.model.name} ({secure})")
    if raised is not None:
        print(f"door: push-object bodies up to {raised.push_body_bytes // MIB} MiB ({raised.sized_for})", flush=True)


def _ending(out_dir: Path, run_id: int) -> bool:
    """Whether the ServerApp has recorded this run's end in outcome.json (its last act; the file
    says "running" from round 0 on), quietly: asked four times a second while the launch waits
    (a bad file is reported once, by report_outcome)."""
    try:
        outcome = read_outcome(out_dir)
    except ValueError:
        return False
    return outcome is not None and outcome.run_id == run_id and outcome.status != "running"


def _outcome_of(
    out_dir: Path, run_id: int, paths: FederationPaths | None = None, flower_status: str | None = None
) -> RunOutcome | None:
    """The outcome out_dir records for this run (None: none, or another run's), settled first: a
    run whose ServerApp is gone (or that Flower reports finished) is never "running"."""
    try:
        outcome = settle_outcome(
            out_dir, run_id, resume_command(paths, out_dir) if paths is not None else "", flower_status
        )
    except ValueError as err:
        print(f"warning: {err}", file=sys.stderr)
        return None
    return outcome if outcome is not None and outcome.run_id == run_id else None


def report_outcome(run_id: int, status: str, out_dir: Path, paths: FederationPaths | None = None) -> int:
    """Print how a finished run ended (Flower's status and the ServerApp's outcome.json); the exit
    status: 0 completed with every site, EXIT_SITE_LOST, or EXIT_FAILED. With paths, an
    interrupted run's outcome names the `resume` command."""
    outcome = _outcome_of(out_dir, run_id, paths, flower_status=status)
    if outcome is None:
        print(
            f"error: run {run_id} {status}, and {out_dir}/outcome.json records nothing for it "
            "(a ServerApp that never started, or another out-dir?); see `flwr log`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if outcome.ok and status == "finished:completed":
        print(f"run {run_id}: {outcome.describe()}", flush=True)
        for group, why in sorted(outcome.untrained_groups.items()):
            # Completed, but its release would carry this group's initial weights.
            print(f"warning: run {run_id}: group {group} was never trained: {why}", file=sys.stderr)
        return EXIT_OK
    print(f"error: run {run_id} {status}: {outcome.describe()}", file=sys.stderr)
    if outcome.status == "completed" and outcome.sites_lost:
        return EXIT_SITE_LOST
    return EXIT_FAILED


def cmd_release(args: argparse.Namespace) -> int:
    """The run's final model as a release folder a site loads (server/release.py). RUN is the
    run's out-dir, or a run id of FED's launches (server/launches.jsonl); a simulation's run
    directory needs no federation (FED is then not read)."""
    run = Path(args.run)
    if not run.is_dir() and args.run.isdigit():
        launches = [
            r
            for r in read_launches(FederationPaths(root=Path(args.federation_dir).resolve()))
            if r.run_id == int(args.run)
        ]
        if not launches:
            raise CoordinatorError(
                f"--run {args.run}: no such run directory, and no launch of run {args.run} in {args.federation_dir}",
                EXIT_USAGE,
            )
        run = Path(launches[-1].out_dir)
    if not run.is_dir():
        raise CoordinatorError(f"--run {args.run}: no such run directory", EXIT_USAGE)
    key = _release_signing_key(args)
    try:
        path = release_run(run, args.out, overwrite=args.force, signing_key=key)
    except (RunNotReleasable, CheckpointError, ReleaseError) as err:
        raise CoordinatorError(str(err), EXIT_FAILED) from None
    signed = (
        f"signed with {FederationPaths(root=Path(args.federation_dir).resolve()).release_public_key} (sites verify "
        "it with the release_signing.pem of their startup files)"
        if key is not None
        else "UNSIGNED: it loads only with --trust-unsigned"
    )
    print(f"release of {run} written to {path}, {signed}", flush=True)
    return EXIT_OK


def _release_signing_key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    """FED's release signing key; None with --unsigned (a local simulation's run, no federation)."""
    paths = FederationPaths(root=Path(args.federation_dir).resolve())
    if args.unsigned:
        print(
            "WARNING: --unsigned: the release carries no signature; a site loads it only with --trust-unsigned",
            file=sys.stderr,
        )
        return None
    if not paths.release_signing_key.is_file():
        raise CoordinatorError(
            f"{paths.release_signing_key}: no release signing key: `provision {args.federation_dir}` makes one "
            "(sites verify releases with its public key), or pass --unsigned for a local simulation's run",
            EXIT_USAGE,
        )
    try:
        return load_signing_key(paths.release_signing_key)
    except SignatureError as err:
        raise CoordinatorError(str(err), EXIT_USAGE) from None


def cmd_launch(args: argparse.Namespace) -> int:
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    config = parse_overrides(args.config)
    config["out-dir"] = str(Path(args.out_dir).resolve())
    if args.model:
        model = Path(args.model)
        config["model"] = str(model.resolve()) if model.suffix in (".yaml", ".yml") else args.model
    if args.rounds is not None:
        config["rounds"] = args.rounds
    return _launch(paths, config, args, resumed=False)


def cmd_resume(args: argparse.Namespace) -> int:
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    out_dir = str(Path(args.out_dir).resolve())
    previous = [r for r in read_launches(paths) if r.out_dir == out_dir]
    if not previous:
        raise CoordinatorError(
            f"no launch of out-dir {out_dir} is recorded in {_launches_path(paths)}; "
            "launch it with `launch` (or pass the same -c options to launch with -c resume=true)",
            EXIT_USAGE,
        )
    if args.from_checkpoint:
        source = Path(args.from_checkpoint).resolve()
        if not source.is_dir():
            raise CoordinatorError(f"--from {args.from_checkpoint}: not a checkpoint directory", EXIT_USAGE)
    elif not (Path(out_dir) / "checkpoints").is_dir():
        raise CoordinatorError(
            f"{out_dir}/checkpoints does not exist: run {previous[-1].run_id} checkpointed nothing to resume from",
            EXIT_USAGE,
        )
    base = launch_to_resume(previous, Path(out_dir))
    config = dict(base.run_config)
    config["resume"] = True
    config["resume-from"] = str(Path(args.from_checkpoint).resolve()) if args.from_checkpoint else ""
    config.pop("stop-after-round", None)  # a resumed run goes to the end unless asked otherwise
    config.update(parse_overrides(args.config))
    if args.rounds is not None:
        config["rounds"] = args.rounds
    return _launch(paths, config, args, resumed=True)


def started_run_ids(out_dir: Path) -> set[int]:
    """Runs that got through round 0 in out_dir (their setup/resume event in rounds.jsonl)."""
    path = out_dir / "rounds.jsonl"
    if not path.is_file():
        return set()
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = strict_json(line, path)
        except DuplicateKeyError:  # not a line cut short by a crash: one written so
            raise
        except StrictFileError:
            continue  # a line cut short by a crash
        if isinstance(event, dict) and event.get("event") in ("setup", "resume") and event.get("run_id") is not None:
            found.add(int(event["run_id"]))
    return found


def launch_to_resume(launches: list[LaunchRecord], out_dir: Path) -> LaunchRecord:
    """The launch whose config `resume` reuses: the latest that got through round 0 (it made the
    checkpoints); later launches that did not are named with their reason and skipped."""
    started = started_run_ids(out_dir)
    outcome = read_outcome(out_dir) if (out_dir / "outcome.json").is_file() else None
    for record in reversed(launches):
        if record.run_id in started:
            return record
        why = (
            outcome.describe()
            if outcome is not None and outcome.run_id == record.run_id
            else "it never got through round 0"
        )
        print(f"note: not reusing the config of run {record.run_id} ({record.launched_at}): {why}", file=sys.stderr)
    raise CoordinatorError(
        f"no launch of {out_dir} got through round 0, so none made its checkpoints; fix the "
        "cause above and `launch` again with the config you mean",
        EXIT_USAGE,
    )


def cmd_status(args: argparse.Namespace) -> int:
    """flwr's list of runs (or one run), then how each run launched from here ended."""
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    launches = read_launches(paths)
    if args.run_id:
        record = next((r for r in reversed(launches) if r.run_id == args.run_id), None)
        try:
            status = run_status(paths, args.run_id)
        except RunUnknown as err:
            if record is None:
                raise
            # A restarted SuperLink forgot it: the out-dir says how far it got and how to resume it.
            outcome = _outcome_of(Path(record.out_dir), args.run_id, paths, flower_status="finished:unknown")
            print(
                f"error: run {args.run_id}: {err}; out-dir {record.out_dir}: "
                f"{outcome.describe() if outcome else 'nothing recorded for this run'}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if record is None:
            print(f"run {args.run_id}: {status} (not launched from {paths.root}: no out-dir to read)")
            return EXIT_OK
        print(f"run {args.run_id}: {status}, out-dir {record.out_dir}", flush=True)
        if not status.startswith("finished"):
            outcome = _outcome_of(Path(record.out_dir), args.run_id, paths)
            print(f"run {args.run_id}: {outcome.describe() if outcome else 'no outcome recorded yet'}")
            return EXIT_OK
        return report_outcome(args.run_id, status, Path(record.out_dir), paths)
    proc = run_flwr(paths, ["ls", CONNECTION])
    check_reachable(paths, proc)
    if proc.returncode != 0:
        raise CoordinatorError(flwr_error(proc))
    print(proc.stdout, end="")
    for record in launches[-20:]:
        outcome = _outcome_of(Path(record.out_dir), record.run_id, paths)
        print(
            f"run {record.run_id} ({record.out_dir}): "
            f"{outcome.describe() if outcome else 'no outcome recorded (or a later run of this out-dir)'}"
        )
    return EXIT_OK


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.coordinator", description="healthfm coordinator")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("provision", help="create the CA, the SuperLink's certificate and site key pairs")
    p.add_argument("federation_dir", metavar="FED")
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="a site (repeatable)")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name sites use to reach the SuperLink (besides 127.0.0.1, localhost; repeatable)",
    )
    p.add_argument("--ca-days", type=int, default=3650)
    p.add_argument("--cert-days", type=int, default=825)
    p.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    p.add_argument(
        "--new-release-key",
        action="store_true",
        help="rotate the release signing key: a new key pair, its public key in every site's folder, the old "
        "public key kept in server/release-keys-retired/",
    )
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser(
        "superlink", help="run the SuperLink (TLS, SuperNode authentication) behind nginx in the foreground"
    )
    p.add_argument("federation_dir", metavar="FED")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--internal-port",
        type=int,
        default=0,
        help="the SuperLink's own port on 127.0.0.1, behind nginx (default: a free one)",
    )
    p.add_argument(
        "--max-body-mib",
        type=_positive_int,
        default=None,
        metavar="MIB",
        help="the largest push-object body nginx forwards, in MiB, fixed (default: what the launched runs need, "
        "server/deploy/body_limit.py: 81 MiB, raised by a launch with secure aggregation on a large model); "
        "a launch needing more is refused",
    )
    p.add_argument(
        "--state",
        choices=("file", "memory"),
        default=None,
        help="memory (default; file when --database is given): Flower's in-memory store, faster rounds; the "
        "registry's sites are registered again at every start, runs end with the process. file: "
        "FED/server/superlink.db, registrations and runs outlive a restart",
    )
    p.add_argument("--database", help="SuperLink state file (implies --state file; default FED/server/superlink.db)")
    p.add_argument(
        "--min-heartbeat-interval",
        type=float,
        default=MIN_HEARTBEAT_INTERVAL_S,
        metavar="S",
        help=f"the shortest heartbeat interval a site's SuperNode may send (`join --heartbeat-interval`, default "
        f"4): a dead site is noticed 2 x its interval after its last heartbeat (default {MIN_HEARTBEAT_INTERVAL_S:g}; "
        "Flower's own: 10)",
    )
    p.add_argument("--log-file")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (local tests only)")
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop (SuperLink, SuperExec and nginx with it) when this process exits, e.g. a test run or supervisor",
    )
    p.set_defaults(func=cmd_superlink)

    def connection_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("federation_dir", metavar="FED")
        q.add_argument(
            "--superlink", metavar="HOST:PORT", help="the SuperLink's address (default: the one `superlink` recorded)"
        )

    p = sub.add_parser("register", help="register sites' public keys with the SuperLink")
    connection_options(p)
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="default: every provisioned site")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("bundle", help="build the app bundle (.fab) sites approve before it runs there")
    p.add_argument("federation_dir", metavar="FED")
    p.add_argument("--head", action="store_true", help="the federated task head's bundle (what `head` ships)")
    p.set_defaults(func=cmd_bundle)

    def wait_limits(q: argparse.ArgumentParser) -> None:
        q.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the run")
        q.add_argument(
            "--unreachable-grace",
            type=float,
            default=120.0,
            help="seconds to keep retrying a SuperLink that does not answer while waiting (then exit 5)",
        )

    def run_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out-dir", required=True, help="where the ServerApp writes logs and checkpoints")
        q.add_argument("--rounds", type=int)
        q.add_argument(
            "-c",
            "--config",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="run config (FederationConfig keys, kebab-case), e.g. local-steps=5",
        )
        q.add_argument(
            "--wait",
            action="store_true",
            help="wait until the run finishes; exit 0 only if it completed with every site "
            "(1 failed, 4 a site was lost, 5 the SuperLink stopped answering)",
        )
        wait_limits(q)

    p = sub.add_parser("launch", help="start a run")
    connection_options(p)
    run_options(p)
    p.add_argument("--model", help="model config name (tiny, small, paper) or a YAML path")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("resume", help="continue a run from its latest checkpoint (or --from one)")
    connection_options(p)
    run_options(p)
    p.add_argument(
        "--from",
        dest="from_checkpoint",
        metavar="CHECKPOINT",
        help="resume from this checkpoint directory (e.g. RUN_DIR/checkpoints/step-00000001) instead "
        "of the latest; later checkpoints move to RUN_DIR/checkpoints-abandoned",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="list runs (or one run) on the SuperLink")
    connection_options(p)
    p.add_argument("--run-id", type=int)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("dashboard", help="a read-only live web page of the sites, runs, privacy, results, audit")
    add_dashboard_arguments(p)  # `python -m server.coordinator dashboard` itself goes to serve.main (no torch)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("release", help="write a run's final model as a release folder sites load")
    p.add_argument("federation_dir", metavar="FED")
    p.add_argument("--run", required=True, metavar="RUN", help="the run's out-dir (or its run id in FED)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="the release folder to write")
    p.add_argument("--force", action="store_true", help="replace MODEL_DIR if it exists")
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="write the release without a signature (FED need not be provisioned; sites load it only with "
        "--trust-unsigned): for a local simulation's run",
    )
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("head", help="train a release's federated task head across the joined sites")
    connection_options(p)
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="the release (each site holds the same)")
    p.add_argument("--out", required=True, metavar="HEADS_DIR", help="where heads/, heads.json and the logs go")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        help="task names, or file:PATH for an ACES file (a bare path is refused; default: the release's evaluation tasks)",
    )
    p.add_argument("--keys", nargs="+", help="label keys to fit (default: every key of the tasks)")
    p.add_argument("--rounds", type=int, default=200, help="FedAvg rounds per C (default 200)")
    p.add_argument("--c-grid", nargs="+", type=float, help="the head's C values (default: the probe's grid)")
    p.add_argument("--local-steps", type=int, default=5, help="each site's steps per round (default 5)")
    p.add_argument(
        "--min-sites", type=int, default=None, help="sites connected before the first stage (default: the registry's)"
    )
    p.add_argument("--stage-timeout", type=float, default=600.0, help="seconds each stage waits for the sites' replies")
    wait_limits(p)
    add_head_dp_args(p)
    p.set_defaults(func=cmd_head)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (CoordinatorError, ProvisionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "status", EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI boundary: one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
