"""`python -m server.coordinator dashboard FED`: check where it may listen, then serve the app.

On 127.0.0.1 by default. Another address only with an access token (--token-file, or the
HEALTHFM_DASHBOARD_TOKEN environment variable; at least MIN_TOKEN_CHARS characters): the page
shows who trains and how much privacy each site has spent, which is the consortium's business
only. Never on the sites' port (the public port nginx listens on for the Fleet API, the
SuperLink's own, or the default 9093): the dashboard is the coordinator's, not the sites'.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn

from server.deploy.dashboard.app import create_app, state_for
from server.deploy.dashboard.nodes import NodesCache
from server.deploy.dashboard.view import Launch
from server.deploy.flwr_control import EXIT_OK, EXIT_USAGE, CoordinatorError, read_connection
from server.deploy.provision import FederationPaths
from server.deploy.proxy import NGINX_CONF

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
    shown = f"[{host}]" if ":" in host else host
    print(
        f"dashboard of {paths.root} on http://{shown}:{port}/ (read-only; metrics at /metrics"
        f"{'; requests need the access token' if token else ''}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(
        create_app(state, token),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )
    return EXIT_OK
