"""`python -m server.coordinator dashboard FED`: check where it may listen, then serve the app.

server/coordinator.py sends `dashboard` here before importing the other commands (`main`): the
dashboard runs beside a SuperLink for weeks and imports none of their machinery (no torch). The
address is bound before the page's URL is printed: a port another process holds is an error
naming it, never a URL that opens someone else's page.

On 127.0.0.1 by default. Another address only with an access token (--token-file, or the
HEALTHFM_DASHBOARD_TOKEN environment variable; at least MIN_TOKEN_CHARS characters): the page
shows who trains and how much privacy each site has spent, which is the consortium's business
only. Never on the sites' port (the public port nginx listens on for the Fleet API, the
SuperLink's own, or the default 9093): the dashboard is the coordinator's, not the sites'.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn

from server.deploy.dashboard.app import create_app, state_for
from server.deploy.dashboard.nodes import NodesCache
from server.deploy.dashboard.view import Launch
from server.deploy.flwr_control import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CoordinatorError, read_connection
from server.deploy.launches import read_launches, resume_command
from server.deploy.provision import NGINX_CONF, FederationPaths, ProvisionError, read_manifest

DEFAULT_DASHBOARD_PORT = 8765
SITES_DEFAULT_PORT = 9093
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "HEALTHFM_DASHBOARD_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def sites_ports(paths: FederationPaths) -> set[int]:
    """The ports sites or the SuperLink use: nginx's listen ports (FED/server/nginx.conf), the
    SuperLink's own (the saved connection) and the default 9093."""
    ports = {SITES_DEFAULT_PORT}
    conf = paths.server_dir / NGINX_CONF
    if conf.is_file():
        for match in re.finditer(r"^\s*listen\s+(?:\S*:)?(\d+)[\s;]", conf.read_text(errors="replace"), re.MULTILINE):
            ports.add(int(match.group(1)))
    try:
        address = str(read_connection(paths).get("address", ""))
        if address.rsplit(":", 1)[-1].isdigit():
            ports.add(int(address.rsplit(":", 1)[-1]))
    except CoordinatorError:
        pass
    return ports


def read_token(token_file: str | None) -> str | None:
    """The access token: --token-file's first line, else $HEALTHFM_DASHBOARD_TOKEN; None if neither."""
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise CoordinatorError(f"--token-file {token_file}: cannot read it ({err.strerror})", EXIT_USAGE) from None
        token, where = (text.splitlines()[0].strip() if text else ""), f"--token-file {token_file}"
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise CoordinatorError(
            f"{where}: the token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS} "
            "(make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            EXIT_USAGE,
        )
    return token


def check_address(paths: FederationPaths, host: str, port: int, token: str | None) -> None:
    if not is_loopback(host) and token is None:
        raise CoordinatorError(
            f"--host {host}: beyond this machine the dashboard needs an access token "
            f"(--token-file FILE, or ${TOKEN_ENV}); without one it listens on 127.0.0.1 only",
            EXIT_USAGE,
        )
    if port in sites_ports(paths):
        raise CoordinatorError(
            f"--port {port}: that is the sites' (or the SuperLink's) port; the dashboard takes another "
            f"(default {DEFAULT_DASHBOARD_PORT})",
            EXIT_USAGE,
        )
    if not 0 < port < 65536:
        raise CoordinatorError(f"--port {port}: not a port number", EXIT_USAGE)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (CoordinatorError when the address is taken or
    cannot be bound): connections wait there until the app serves them."""
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as err:
        why = err.strerror or str(err)
        taken = " (another process listens there: choose another --port)" if err.errno == errno.EADDRINUSE else ""
        raise CoordinatorError(f"--host {host} --port {port}: cannot listen there: {why}{taken}", EXIT_USAGE) from None


def serve_dashboard(
    paths: FederationPaths,
    host: str,
    port: int,
    token_file: str | None,
    launches: Callable[[], Sequence[Launch]],
    resume: Callable[[Path], str],
    releases: Sequence[str] = (),
) -> int:
    token = read_token(token_file)
    check_address(paths, host, port, token)
    for release in releases:
        if not Path(release).is_dir():
            raise CoordinatorError(f"--release {release}: no such folder", EXIT_USAGE)
    state = state_for(paths.root, launches, resume, NodesCache(paths), [Path(r).resolve() for r in releases])
    sock = listening_socket(host, port)  # before the URL is said: the URL is this process's page
    # The files read once before the first page asks (weeks of runs take seconds to parse; after
    # that each page reads only what changed).
    threading.Thread(target=state.snapshot, name="first-read", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    print(
        f"dashboard of {paths.root} on http://{shown}:{port}/ (read-only; metrics at /metrics"
        f"{'; requests need the access token' if token else ''}); Ctrl-C stops it",
        flush=True,
    )
    config = uvicorn.Config(
        create_app(state, token),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return EXIT_OK


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dashboard` command's arguments (commands.py's parser and `main` below share them)."""
    parser.add_argument("federation_dir", metavar="FED")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; another needs a token)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_DASHBOARD_PORT, help=f"port (default {DEFAULT_DASHBOARD_PORT})"
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the access token every request must carry (or $HEALTHFM_DASHBOARD_TOKEN); required beyond 127.0.0.1",
    )
    parser.add_argument(
        "--release", action="append", default=[], metavar="MODEL_DIR", help="a release to show (repeatable)"
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The read-only live page and /metrics of FED (a provisioned federation)."""
    paths = FederationPaths(root=Path(args.federation_dir).resolve())
    read_manifest(paths.root)  # a clear error if FED is not a provisioned federation

    def launches() -> list[Launch]:
        return [
            Launch(run_id=r.run_id, out_dir=Path(r.out_dir), launched_at=r.launched_at, resumed=r.resumed)
            for r in read_launches(paths)
        ]

    return serve_dashboard(
        paths, args.host, args.port, args.token_file, launches, lambda out: resume_command(paths, out), args.release
    )


def main(argv: Sequence[str]) -> int:
    """`python -m server.coordinator dashboard ARGS` (argv: ARGS): the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m server.coordinator dashboard", description="a read-only live web page of the federation"
    )
    add_dashboard_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return cmd_dashboard(args)
    except (CoordinatorError, ProvisionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "status", EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
