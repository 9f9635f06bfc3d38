"""Coordinator commands: provision a federation, start its SuperLink, register sites, launch and
resume runs. All of them take the federation directory FED that `provision` creates.

    python -m server.coordinator provision FED --site NAME ... [--hostname fl.example.org ...] [--force]
    python -m server.coordinator superlink FED [--host 127.0.0.1] [--port 9093] [--insecure]
    python -m server.coordinator register  FED [--site NAME ...]
    python -m server.coordinator launch    FED --out-dir RUN_DIR [--model tiny] [--rounds 3] [-c KEY=VALUE ...] [--wait]
    python -m server.coordinator resume    FED --out-dir RUN_DIR [--rounds N] [--wait]
    python -m server.coordinator status    FED [--run-id ID]

How this maps onto flwr 1.41 (read from its source): `flower-superlink` serves the Fleet, Control
and Runtime APIs on one HTTPS port (`--host/--port`), with TLS from `--ssl-ca-certfile/
--ssl-certfile/--ssl-keyfile` and node authentication from `--enable-supernode-auth`. The `flwr`
CLI's connection and commands: server.flwr_control; the generated app and its run config:
server.flwr_app. Resume: the ServerApp continues from the latest checkpoint under the run's
out-dir when the run config says `resume=true`; `resume` relaunches with the config `launch`
recorded.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.files import write_flat_toml
from server.flwr_app import check_run_config, parse_overrides, write_app
from server.flwr_control import (
    CONNECTION,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    CoordinatorError,
    flower_bin,
    flower_env,
    flwr_error,
    read_connection,
    run_flwr,
    start_run,
    wait_for_run,
    write_connection,
)
from server.provision import (
    FederationPaths,
    ProvisionConfig,
    ProvisionError,
    describe,
    provision,
    read_manifest,
)

log = logging.getLogger("healthfm.coordinator")

DEFAULT_PORT = 9093


class LaunchRecord(BaseModel):
    """One line of FED/server/launches.jsonl: what `resume` relaunches."""

    model_config = ConfigDict(extra="forbid")

    run_id: int
    out_dir: str
    run_config: dict[str, str | int | float | bool]
    launched_at: str
    resumed: bool = False


# ---------------------------------------------------------------------------- commands


def cmd_provision(args: argparse.Namespace) -> int:
    try:
        cfg = ProvisionConfig(federation_dir=Path(args.federation_dir), sites=args.site, hostnames=args.hostname,
                              ca_days=args.ca_days, cert_days=args.cert_days, force=args.force)
    except ValidationError as err:
        raise CoordinatorError("; ".join(e["msg"] for e in err.errors()), EXIT_USAGE) from None
    result = provision(cfg)
    print(describe(result))
    return EXIT_OK


def _paths(args: argparse.Namespace) -> FederationPaths:
    paths = FederationPaths(root=Path(args.federation_dir).resolve())
    read_manifest(paths.root)  # a clear error if FED is not a provisioned federation
    return paths


def cmd_superlink(args: argparse.Namespace) -> int:
    """Run the SuperLink in the foreground until stopped (Ctrl-C / SIGTERM)."""
    paths = _paths(args)
    host, port = args.host, args.port
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"[{connect_host}]:{port}" if ":" in connect_host else f"{connect_host}:{port}"
    database = args.database or str(paths.server_dir / "superlink.db")  # registrations survive restarts
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--database", database,
           "--disable-runtime-dependency-installation"]  # never pip/uv-install what a run names
    if args.insecure:
        print("WARNING: --insecure: the SuperLink runs without TLS and without SuperNode authentication; "
              "anyone who reaches it can join or read traffic. Use only for local tests.", file=sys.stderr)
        cmd.append("--insecure")
    else:
        for needed in (paths.ca_cert, paths.superlink_cert, paths.superlink_key):
            if not needed.is_file():
                raise CoordinatorError(f"{needed} not found: provision the federation first", EXIT_USAGE)
        cmd += ["--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.superlink_cert),
                "--ssl-keyfile", str(paths.superlink_key), "--enable-supernode-auth"]
    if args.log_file:
        cmd += ["--log-file", args.log_file]
    write_connection(paths, address, args.insecure)
    mode = "without TLS" if args.insecure else "TLS + SuperNode authentication"
    print(f"SuperLink on {host}:{port} ({mode}); sites join with --superlink <this host>:{port}", flush=True)
    proc = subprocess.Popen(cmd, env=flower_env(paths), stdin=subprocess.DEVNULL)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    rc = proc.wait()
    return EXIT_OK if rc in (0, -signal.SIGTERM, -signal.SIGINT, 130) else EXIT_FAILED


def _apply_superlink_option(paths: FederationPaths, args: argparse.Namespace) -> None:
    if getattr(args, "superlink", None):
        write_connection(paths, args.superlink, insecure=getattr(args, "insecure", False))
    read_connection(paths)


def cmd_register(args: argparse.Namespace) -> int:
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    manifest = read_manifest(paths.root)
    sites = args.site or manifest.site_names()
    unknown = [s for s in sites if s not in manifest.site_names()]
    if unknown:
        raise CoordinatorError(f"site(s) {unknown} are not in {paths.manifest}; provision them first", EXIT_USAGE)
    failed = 0
    for site in sites:
        key = paths.registered_public_key(site)
        proc = run_flwr(paths, ["supernode", "register", str(key), CONNECTION, "--name", site])
        if proc.returncode == 0:
            print(f"registered {site}")
        elif "already in use" in (proc.stdout + proc.stderr).lower():
            print(f"registered {site} (already)")
        else:
            failed += 1
            print(f"error: registering {site} failed: {flwr_error(proc)}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _launches_path(paths: FederationPaths) -> Path:
    return paths.server_dir / "launches.jsonl"


def _record_launch(paths: FederationPaths, record: LaunchRecord) -> None:
    with open(_launches_path(paths), "a", encoding="utf-8") as f:
        f.write(record.model_dump_json() + "\n")


def read_launches(paths: FederationPaths) -> list[LaunchRecord]:
    path = _launches_path(paths)
    if not path.is_file():
        return []
    return [LaunchRecord.model_validate_json(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _launch(paths: FederationPaths, run_config: dict[str, str | int | float | bool], args: argparse.Namespace,
            resumed: bool) -> int:
    check_run_config(run_config)
    app_dir = write_app(paths)
    config_file = write_flat_toml(paths.server_dir / "run-config.toml", run_config)
    run_id = start_run(paths, app_dir, config_file)
    _record_launch(paths, LaunchRecord(run_id=run_id, out_dir=str(run_config["out-dir"]), run_config=run_config,
                                       launched_at=time.strftime("%Y-%m-%dT%H:%M:%S"), resumed=resumed))
    print(f"{'resumed' if resumed else 'launched'} run {run_id}: out-dir {run_config['out-dir']}", flush=True)
    if not args.wait:
        return EXIT_OK
    status = wait_for_run(paths, run_id, args.timeout)
    return EXIT_OK if status == "finished:completed" else EXIT_FAILED


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
        raise CoordinatorError(f"no launch of out-dir {out_dir} is recorded in {_launches_path(paths)}; "
                               "launch it with `launch` (or pass the same -c options to launch with -c resume=true)",
                               EXIT_USAGE)
    if not (Path(out_dir) / "checkpoints").is_dir():
        raise CoordinatorError(f"{out_dir}/checkpoints does not exist: run {previous[-1].run_id} checkpointed nothing "
                               "to resume from", EXIT_USAGE)
    config = dict(previous[-1].run_config)
    config["resume"] = True
    config.pop("stop-after-round", None)  # a resumed run goes to the end unless asked otherwise
    config.update(parse_overrides(args.config))
    if args.rounds is not None:
        config["rounds"] = args.rounds
    return _launch(paths, config, args, resumed=True)


def cmd_status(args: argparse.Namespace) -> int:
    paths = _paths(args)
    _apply_superlink_option(paths, args)
    cmd = ["ls", CONNECTION] + (["--run-id", str(args.run_id)] if args.run_id else [])
    proc = run_flwr(paths, cmd)
    if proc.returncode != 0:
        raise CoordinatorError(flwr_error(proc))
    print(proc.stdout, end="")
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
    p.add_argument("--hostname", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name sites use to reach the SuperLink (besides 127.0.0.1, localhost; repeatable)")
    p.add_argument("--ca-days", type=int, default=3650)
    p.add_argument("--cert-days", type=int, default=825)
    p.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("superlink", help="run the SuperLink (TLS, SuperNode authentication) in the foreground")
    p.add_argument("federation_dir", metavar="FED")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--database", help="SuperLink state (default FED/server/superlink.db)")
    p.add_argument("--log-file")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (local tests only)")
    p.set_defaults(func=cmd_superlink)

    def connection_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("federation_dir", metavar="FED")
        q.add_argument("--superlink", metavar="HOST:PORT",
                       help="the SuperLink's address (default: the one `superlink` recorded)")

    p = sub.add_parser("register", help="register sites' public keys with the SuperLink")
    connection_options(p)
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="default: every provisioned site")
    p.set_defaults(func=cmd_register)

    def run_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out-dir", required=True, help="where the ServerApp writes logs and checkpoints")
        q.add_argument("--rounds", type=int)
        q.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                       help="run config (FederationConfig keys, kebab-case), e.g. local-steps=5")
        q.add_argument("--wait", action="store_true", help="wait until the run finishes; exit 1 unless it completed")
        q.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")

    p = sub.add_parser("launch", help="start a run")
    connection_options(p)
    run_options(p)
    p.add_argument("--model", help="model config name (tiny, small, paper) or a YAML path")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    connection_options(p)
    run_options(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="list runs (or one run) on the SuperLink")
    connection_options(p)
    p.add_argument("--run-id", type=int)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
