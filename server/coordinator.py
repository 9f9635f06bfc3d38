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
--ssl-certfile/--ssl-keyfile` and node authentication from `--enable-supernode-auth`; the
`flwr` CLI talks to it through a named connection in FLWR_HOME/config.toml (here
FED/server/flwr-home, connection `healthfm`, with the CA as `root-certificates`):
`flwr supernode register KEY.pub healthfm` registers a site's public key and
`flwr run APP_DIR healthfm --run-config FILE.toml` starts a run. APP_DIR is generated
(FED/server/app/pyproject.toml) and names `server.server_app:app` / `client.client_app:app`
from the healthfm package installed on the server and at every site; its config defaults
are FederationConfig's, so every key of the run config can be set with `-c`.
Resume: the ServerApp continues from the latest checkpoint under the run's out-dir when the
run config says `resume=true`; `resume` relaunches with the config `launch` recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.files import write_flat_toml
from server.config import FederationConfig, PrivacyRequest, ServerOptimizerConfig
from server.provision import (
    FederationPaths,
    ProvisionConfig,
    ProvisionError,
    describe,
    provision,
    read_manifest,
)

log = logging.getLogger("healthfm.coordinator")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
CONNECTION = "healthfm"
DEFAULT_PORT = 9093
APP_NAME = "healthfm-federation"
FLWR_TIMEOUT_S = 120


class CoordinatorError(Exception):
    """One line for the coordinator, with the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class LaunchRecord(BaseModel):
    """One line of FED/server/launches.jsonl: what `resume` relaunches."""

    model_config = ConfigDict(extra="forbid")

    run_id: int
    out_dir: str
    run_config: dict[str, str | int | float | bool]
    launched_at: str
    resumed: bool = False


# ---------------------------------------------------------------------------- Flower plumbing


def flwr_home(paths: FederationPaths) -> Path:
    return paths.server_dir / "flwr-home"


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


def write_connection(paths: FederationPaths, address: str, insecure: bool) -> Path:
    """The `flwr` CLI's connection `healthfm` to this federation's SuperLink."""
    home = flwr_home(paths)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f"address = {json.dumps(address)}"]
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(paths.ca_cert))}")
    path = home / "config.toml"
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_connection(paths: FederationPaths) -> dict[str, Any]:
    path = flwr_home(paths) / "config.toml"
    if not path.is_file():
        raise CoordinatorError(f"{path} not found: start the SuperLink first (coordinator superlink {paths.root}) "
                               "or pass --superlink HOST:PORT", EXIT_USAGE)
    return tomllib.loads(path.read_text())["superlink"][CONNECTION]


def run_flwr(paths: FederationPaths, args: Sequence[str], timeout: float = FLWR_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [flower_bin("flwr"), *args]
    log.info("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, env=flower_env(paths), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CoordinatorError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s") from None


def flwr_error(proc: subprocess.CompletedProcess) -> str:
    """The message inside Flower's boxed error output, on one line."""
    text = proc.stderr + proc.stdout
    lines = [ln.strip(" │╭╮╰╯─\t") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Using SuperLink") and ln != "Error"]
    return " ".join(lines)[:500] or f"exit {proc.returncode}"


# ---------------------------------------------------------------------------- the Flower app


def default_run_config() -> dict[str, str | int | float | bool]:
    """Every key the ServerApp reads from the run config (FederationConfig.from_run_config),
    kebab-case, with FederationConfig's defaults; a Flower run config can only override keys
    its app declares."""
    flat: dict[str, str | int | float | bool] = {}
    for name, field in FederationConfig.model_fields.items():
        key = name.replace("_", "-")
        if name == "server_optimizer":  # off unless server-optimizer-lr > 0
            for opt_name, opt_field in ServerOptimizerConfig.model_fields.items():
                flat[f"server-optimizer-{opt_name.replace('_', '-')}"] = opt_field.get_default()
            flat["server-optimizer-lr"] = 0.0
            continue
        if name == "privacy":  # privacy-<field>; 0 leaves a field unset (from_run_config)
            for priv_name, priv_field in PrivacyRequest.model_fields.items():
                default = priv_field.get_default()
                flat[f"privacy-{priv_name.replace('_', '-')}"] = 0.0 if default is None else default
            continue
        if name == "model":
            flat[key] = "tiny"
            continue
        if name == "out_dir":
            flat[key] = ""
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:  # "off": from_run_config reads 0 as None for these
            flat[key] = 0.0 if "float" in str(field.annotation) else 0
        elif isinstance(default, (list, tuple)):
            flat[key] = ",".join(str(v) for v in default)
        elif isinstance(default, (str, int, float, bool)):
            flat[key] = default
        elif isinstance(default, Path):
            flat[key] = str(default)
        else:
            raise CoordinatorError(f"FederationConfig.{name}: cannot express its default {default!r} in a run config",
                                   EXIT_INTERNAL)
    return flat


def write_app(paths: FederationPaths) -> Path:
    """FED/server/app: the Flower app `flwr run` packages. It holds only the manifest: the
    code is the healthfm package installed on the server and at each site (a site runs the
    code it installed, not code the server ships)."""
    app_dir = paths.server_dir / "app"
    header = (
        "# Generated by `python -m server.coordinator`; regenerated at every launch.\n"
        "[project]\n"
        f'name = "{APP_NAME}"\n'
        'version = "1.0.0"\n'
        'description = "healthfm federated pretraining (ServerApp + ClientApp from the installed healthfm package)"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "healthfm"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "server.server_app:app"\n'
        'clientapp = "client.client_app:app"\n\n'
        "[tool.flwr.app.config]\n"
    )
    write_flat_toml(app_dir / "pyproject.toml", default_run_config(), header=header)
    return app_dir


def parse_overrides(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    """`-c KEY=VALUE`: values read as TOML scalars (2, 0.5, true, 'text'), else text."""
    out: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CoordinatorError(f"-c {item!r} is not KEY=VALUE", EXIT_USAGE)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if not isinstance(value, (str, int, float, bool)):
            raise CoordinatorError(f"-c {item!r}: the value must be text, a number or true/false", EXIT_USAGE)
        out[key.strip()] = value
    return out


def check_run_config(config: Mapping[str, str | int | float | bool]) -> None:
    """Refuse a run config the ServerApp would refuse, before anything reaches the SuperLink."""
    known = default_run_config()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise CoordinatorError(f"unknown run config key(s) {unknown}; known: {', '.join(sorted(known))}", EXIT_USAGE)
    try:
        FederationConfig.from_run_config({**known, **config})
    except (ValueError, ValidationError, OSError) as err:
        text = str(err).split("For further information")[0]  # pydantic's trailing URL
        raise CoordinatorError(" ".join(text.split())[:600], EXIT_USAGE) from None


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


def start_run(paths: FederationPaths, run_config: dict[str, str | int | float | bool]) -> int:
    """`flwr run` the generated app with this run config; the run id."""
    check_run_config(run_config)
    app_dir = write_app(paths)
    config_file = write_flat_toml(paths.server_dir / "run-config.toml", run_config)
    proc = run_flwr(paths, ["run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--format", "json"])
    if proc.returncode != 0:
        raise CoordinatorError(f"the SuperLink did not start the run: {flwr_error(proc)}")
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        return int(payload["run-id"])
    except (ValueError, KeyError) as err:
        raise CoordinatorError(f"cannot read the run id from `flwr run` ({err}): {proc.stdout[-300:]}") from None


def run_status(paths: FederationPaths, run_id: int) -> str:
    proc = run_flwr(paths, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
    if proc.returncode != 0:
        raise CoordinatorError(f"cannot read the status of run {run_id}: {flwr_error(proc)}")
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    runs = payload.get("runs", [])
    if not runs:
        raise CoordinatorError(f"the SuperLink knows no run {run_id}")
    return str(runs[0]["status"])


def wait_for_run(paths: FederationPaths, run_id: int, timeout: float, poll: float = 2.0) -> str:
    """Poll until the run is finished; its final status (e.g. finished:completed)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        status = run_status(paths, run_id)
        if status != last:
            print(f"run {run_id}: {status}", flush=True)
            last = status
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise CoordinatorError(f"run {run_id} not finished after {timeout:g} s (last status {last})")


def _launch(paths: FederationPaths, run_config: dict[str, str | int | float | bool], args: argparse.Namespace,
            resumed: bool) -> int:
    run_id = start_run(paths, run_config)
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
