"""The federation's public door: an nginx reverse proxy that lets sites reach the SuperLink's Fleet
API and nothing else.

Flower 1.41's SuperLink serves three HTTP APIs on one port (flwr/superlink/main.py): the Fleet API
for SuperNodes (`/v1/fleet/*`, every call signed with the node's registered key), the Control API
for the `flwr` CLI (`/v1/control/*`: start and stop runs, list runs and nodes, read logs, register
keys) and the Runtime API for the ServerApp process (`/v1/runtime/*`). The Control API has no
authentication of its own in the open-source SuperLink: whoever reaches the port and holds the CA
certificate can use it. So `coordinator superlink` binds the SuperLink to 127.0.0.1 on a private
port and puts nginx on the public host/port: TLS with the federation's server certificate, the
request's path checked against the Fleet API's routes, proxied to the SuperLink over TLS
(verified against the CA), and every other path answered 403 by nginx itself, so a Control or
Runtime request never reaches the SuperLink. A request target nginx would have to normalise
(dot segments, `//`, encoded dots and slashes) is refused with 400, and the SuperLink is sent the
matched route's canonical path, never the client's raw one.

The port is public, so nginx also bounds what a client can make the SuperLink hold (issue 40,
break 7; issue 67, break 4): a request body larger than the largest message a site of the launched
runs sends plus a margin is refused with 413 from its Content-Length, before a byte reaches the
SuperLink (server/deploy/body_limit.py, kept in force by server/deploy/door.py: push-object in
PUSH_LIMIT_CONF, every other route 1 MiB); a body without a Content-Length (chunked) is refused with
411, so the size is always known up front; a request without the SuperNode authentication headers
Flower's node auth reads (flwr-public-key, flwr-signature, flwr-timestamp) is refused with 401, and
one whose flwr-public-key is not a registered site's with 412 (a `map` of the registry's keys,
NODES_MAP, rewritten at `superlink` and `register` and reloaded without a restart). Both are
decided in nginx's rewrite phase, from the headers: the body is never buffered nor forwarded
(nginx cannot check the signature: the SuperLink does, before it reads a large body,
server/deploy/large_bodies.py). Per client address at most REQUESTS_PER_S requests a second (burst
REQUEST_BURST) and CONNECTIONS requests in progress (PUSH_CONNECTIONS for push-object; Flower
pushes 2 objects at a time per SuperNode), 503 beyond: Flower's SuperNode retries a 503 with
backoff (flwr/supercore/retry/http_retry.py) but gives up at once on a 429, so a reply caught by
the limit (several sites behind one address replying at the same moment: 4 sites' setup replies on
127.0.0.1 met it) was lost.

nginx runs as a child of the coordinator (`daemon off`), with its configuration, pid file and
logs under FED/server/ (nginx.conf, nginx-access.log, nginx-error.log). Started by root, its
workers run as an unprivileged user (www-data, else nobody; never root): they need no file of
FED/server (the master reads the certificates and opens the logs), only their temporary folder
FED/nginx-tmp, which is theirs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from base64 import b64encode
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from healthfm_core.files import atomic_write_text
from server.deploy.body_limit import SMALL_BODY_BYTES
from server.deploy.flwr_control import EXIT_USAGE, CoordinatorError
from server.deploy.provision import NGINX_CONF, FederationPaths
from server.run_claim import process_start

# The Fleet API's routes (flwr/superlink/routers/fleet/router.py, what flwr/supernode/
# fleet_http_client.py calls). Listed one by one rather than as a prefix so that a route Flower
# adds later is closed until someone decides it belongs to the sites.
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
FLEET_PREFIX = "/v1/fleet/"
# Raw request targets refused with 400 (case-insensitive): a `.` or `..` segment, an empty
# segment (`//`), an encoded dot, slash or backslash (%2e, %2f, %5c), a backslash, an encoded NUL.
REFUSED_URI = r"(/\.|//|%2e|%2f|%5c|\x5c|%00)"  # written into a quoted nginx string: no escape doubled
NGINX_ERROR_LOG = "nginx-error.log"
NGINX_ACCESS_LOG = "nginx-access.log"
NGINX_PID = "nginx.pid"
# Included by nginx.conf, rewritten while nginx runs (server/deploy/door.py) and reloaded.
NODES_MAP = "nginx-nodes.map"  # flwr-public-key header of each registered site -> 1
PUSH_LIMIT_CONF = "nginx-push-limit.conf"  # push-object's client_max_body_size
# A registered key's header is ~300 characters (P-384 public key, PEM, base64): nginx's map
# buckets must hold one (its default, a cache line, refuses the configuration).
MAP_BUCKET_BYTES = 512
RELOAD_WAIT_S = 30.0  # for the reloaded nginx's new workers
# A round can wait long for replies.
TIMEOUT = "3600s"
PUSH_ROUTE = "push-object"  # the one route with large request bodies (body_limit.py)
# Per client address (several sites may share one, behind a NAT or on 127.0.0.1 in tests): a
# SuperNode polls every 0.1-0.5 s and pushes and pulls 2 objects at a time.
REQUESTS_PER_S = 100
REQUEST_BURST = 1000
CONNECTIONS = 32
PUSH_CONNECTIONS = 8
# The headers Flower's node authentication reads (flwr/superlink/routers/fleet/node_auth.py); nginx
# sees them as $http_flwr_public_key and so on.
AUTH_HEADERS = ("flwr-public-key", "flwr-signature", "flwr-timestamp")
# nginx's workers when it is started by root, the first that exists.
WORKER_USERS = ("www-data", "nobody")
UPSTREAM_KEEPALIVE = 32  # idle connections to the SuperLink kept for reuse (a few per site)
UPSTREAM_IDLE_S = 3  # below uvicorn's timeout_keep_alive (5 s), which Flower leaves at its default
# nginx's answer to a key that is not registered: what Flower's own SuperLink answers an unknown
# key's activation with, 412 and Flower's error body with FLEET_NODE_ACTIVATION_FAILED (2004), which
# the SuperNode prints and `client.py join` reads as "not registered" (client/deploy/join.py).
# Flower's SuperNode answers a 401 by stopping itself without a word, a 403 as "run not running"
# (flwr/supercore/retry/http_retry.py): either would hide the reason from the site.
UNREGISTERED_STATUS = 412
UNREGISTERED_KEY = (
    '{"code": 2004, "detail": "this SuperNode key is not registered with the federation (refused by '
    'the coordinator proxy): ask the coordinator to run `coordinator register` for this site"}'
)


def find_nginx() -> str:
    """The nginx executable; CoordinatorError naming how to install it otherwise."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise CoordinatorError(
            "nginx not found: the SuperLink is only exposed to sites through nginx (install it: "
            "`make setup-system` or `apt-get install -y nginx`), or pass --insecure for a "
            "local test without TLS",
            EXIT_USAGE,
        )
    return found


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_user() -> str | None:
    """The unprivileged user nginx's workers run as when the coordinator is root (None: not root,
    the workers keep the coordinator's own identity); CoordinatorError when none exists."""
    if os.geteuid() != 0:
        return None
    for name in WORKER_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise CoordinatorError(
        f"none of the users {', '.join(WORKER_USERS)} exists for nginx's workers (never root): create one "
        "(`useradd --system --no-create-home www-data`) or run the coordinator as an unprivileged user",
        EXIT_USAGE,
    )


def temp_dir(paths: FederationPaths) -> Path:
    """nginx's temporary files: outside FED/server (0700), the workers' own."""
    return paths.root / "nginx-tmp"


def _proxied(route: str) -> str:
    """One location's forwarding to the SuperLink (`route`: the path after FLEET_PREFIX)."""
    return f"""            limit_except POST {{ deny all; }}
            proxy_pass https://superlink{FLEET_PREFIX}{route};
            proxy_http_version 1.1;
            proxy_set_header Connection "";  # keep the upstream connection (HTTP/1.1 keep-alive)
            proxy_ssl_trusted_certificate {{ca}};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # a DNS name of the certificate (nginx checks no IP SANs)
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {TIMEOUT};
            proxy_send_timeout {TIMEOUT};"""


def node_key_header(public_key: str) -> str:
    """The flwr-public-key header a SuperNode holding the key of `public_key` (an OpenSSH line, as
    registered) sends: base64 of its PEM SubjectPublicKeyInfo (flwr/supernode/
    node_auth_http_interceptor.py, supercore/primitives/asymmetric.py public_key_to_bytes)."""
    try:
        key = serialization.load_ssh_public_key(public_key.strip().encode("ascii"))
    except (ValueError, UnicodeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"public key {public_key.strip()[:60]!r}... is not an OpenSSH public key ({err})") from None
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64encode(pem).decode("ascii")


def nodes_map_text(public_keys: Iterable[str]) -> str:
    """NODES_MAP: one `"HEADER" 1;` line per registered key (OpenSSH lines)."""
    lines = sorted({f'"{node_key_header(k)}" 1;' for k in public_keys})
    return (
        "# Generated from registry.json (`coordinator superlink`, `register`): the registered sites' keys.\n"
        + "".join(f"{ln}\n" for ln in lines)
    )


def write_door_files(paths: FederationPaths, public_keys: Iterable[str] | None, push_body_bytes: int | None) -> None:
    """Rewrite NODES_MAP (from `public_keys`) and/or PUSH_LIMIT_CONF (None: keep that file), each
    replaced whole: a reading nginx sees the old file or the new."""
    if public_keys is not None:
        atomic_write_text(paths.server_dir / NODES_MAP, nodes_map_text(public_keys))
    if push_body_bytes is not None:
        atomic_write_text(paths.server_dir / PUSH_LIMIT_CONF, f"client_max_body_size {push_body_bytes};\n")


def nginx_config(paths: FederationPaths, host: str, port: int, upstream_port: int) -> str:
    """nginx.conf: TLS on host:port, the Fleet routes proxied to the SuperLink on
    127.0.0.1:upstream_port, everything else 403; request bodies bounded (push-object by
    PUSH_LIMIT_CONF), requests without node authentication headers or with a key NODES_MAP does
    not hold refused, per-address request and connection limits."""
    server = paths.server_dir
    tmp = temp_dir(paths)
    routes = "|".join(r for r in FLEET_ROUTES if r != PUSH_ROUTE)
    user = worker_user()
    user_line = f"user {user};\n" if user is not None else ""
    # Flower's node authentication headers, on every call of an authenticated SuperNode; without
    # them the SuperLink would read the whole body before its 401. (`if` with `return` only.)
    auth = "\n".join(
        f"""            if ($http_{h.replace("-", "_")} = "") {{
                return 401 "SuperNode authentication header {h} missing\\n";
            }}"""
        for h in AUTH_HEADERS
    )
    checks = f"""            if ($request_method != POST) {{
                return 403 "only POST is served here\\n";
            }}
{auth}
            # Only a registered site's key: decided from the header, before the body is read.
            if ($healthfm_registered_node != 1) {{
                return {UNREGISTERED_STATUS} '{UNREGISTERED_KEY}\\n';
            }}
            # Flower's SuperNode always sends a Content-Length: the size is checked before the body.
            if ($http_content_length = "") {{
                return 411 "a Content-Length is required\\n";
            }}"""
    proxied = _proxied("$1").replace("{ca}", str(paths.ca_cert))
    proxied_push = _proxied(PUSH_ROUTE).replace("{ca}", str(paths.ca_cert))
    return f"""# Generated by `python -m server.coordinator superlink`; rewritten at every start.
{user_line}daemon off;
worker_processes 1;
pid {server / NGINX_PID};
error_log {server / NGINX_ERROR_LOG} notice;
events {{ worker_connections 1024; }}
http {{
    # nginx's "combined" format, and how long each request took: in all (rt), connecting to the
    # SuperLink (uct; "-" when a kept-alive connection was reused) and waiting for it (urt).
    log_format timed '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
                     '"$http_referer" "$http_user_agent" rt=$request_time uct=$upstream_connect_time '
                     'urt=$upstream_response_time msec=$msec';
    access_log {server / NGINX_ACCESS_LOG} timed;
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    server_tokens off;
    # Bounds for what any client address can make nginx and the SuperLink hold (module docstring).
    client_max_body_size {SMALL_BODY_BYTES};
    client_header_timeout 10s;
    client_body_timeout 60s;
    limit_req_zone $binary_remote_addr zone=fleet_requests:10m rate={REQUESTS_PER_S}r/s;
    limit_conn_zone $binary_remote_addr zone=fleet_connections:10m;
    limit_req_status 503;
    limit_conn_status 503;
    # The registered sites' keys (server/deploy/door.py rewrites the file; a reload reads it).
    map_hash_bucket_size {MAP_BUCKET_BYTES};
    map $http_flwr_public_key $healthfm_registered_node {{
        default 0;
        include {server / NODES_MAP};
    }}

    # Connections to the SuperLink are kept open and reused: without this nginx opened a new TCP
    # connection and TLS session to it for every request (every poll, every object), a handshake
    # each time on both sides (benchmarks/federation_round.py). nginx drops an idle one before the
    # SuperLink would (uvicorn closes after 5 s idle): a request sent on a connection the other side
    # is closing would fail, and nginx does not retry a POST.
    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_timeout {UPSTREAM_IDLE_S}s;
    }}
    server {{
        listen {_listen(host, port)} ssl;
        ssl_certificate {paths.superlink_cert};
        ssl_certificate_key {paths.superlink_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        limit_req zone=fleet_requests burst={REQUEST_BURST} nodelay;
        limit_conn fleet_connections {CONNECTIONS};

        # A request target nginx would have to normalise is refused before any location is
        # chosen: nginx matches locations against the normalised path ($uri: `..` and `.`
        # resolved, %XX decoded, `//` merged) but forwards the raw one, so
        # /v1/control/list-runs/../../fleet/get-run matched a Fleet route and reached the
        # SuperLink as written. No SuperNode sends such a path.
        if ($request_uri ~* "{REFUSED_URI}") {{
            return 400 "request path refused: dot segments, empty segments and encoded dots, slashes and backslashes are not served\n";
        }}
        # The Fleet API, and only its routes, only POST: what a SuperNode calls. The SuperLink is
        # sent the route's canonical path, rebuilt here, never the client's request target.
        location ~ ^{FLEET_PREFIX}({routes})$ {{
{checks}
{proxied}
        }}
        # Objects (model chunks, the secure round's masked vector): the one large body.
        location = {FLEET_PREFIX}{PUSH_ROUTE} {{
            include {server / PUSH_LIMIT_CONF};
            limit_conn fleet_connections {PUSH_CONNECTIONS};
{checks}
{proxied_push}
        }}
        # The Control API (runs, nodes, logs, key registration), the Runtime API, /docs,
        # /health: refused here, never forwarded.
        location / {{
            return 403 "only the Fleet API is served here\\n";
        }}
    }}
}}
"""


def write_nginx_config(paths: FederationPaths, host: str, port: int, upstream_port: int) -> Path:
    """nginx.conf under FED/server, and the workers' temporary folders (theirs, 0700). The files it
    includes (NODES_MAP, PUSH_LIMIT_CONF) are server/deploy/door.py's."""
    text = nginx_config(paths, host, port, upstream_port)
    user = worker_user()
    owner = pwd.getpwnam(user) if user is not None else None
    tmp = temp_dir(paths)
    for folder in (tmp, *(tmp / sub for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"))):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
    path = paths.server_dir / NGINX_CONF
    path.write_text(text)
    return path


def _nginx_command(paths: FederationPaths) -> list[str]:
    server = paths.server_dir
    return [find_nginx(), "-p", str(server), "-e", str(server / NGINX_ERROR_LOG), "-c", str(server / NGINX_CONF)]


def _check_config(paths: FederationPaths) -> None:
    """`nginx -t` on FED/server/nginx.conf and what it includes; CoordinatorError naming why not."""
    check = subprocess.run([*_nginx_command(paths), "-t"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check.returncode != 0:
        raise CoordinatorError(f"nginx refused {paths.server_dir / NGINX_CONF}: {' '.join(check.stderr.split())[:500]}")


def start_proxy(paths: FederationPaths, host: str, port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    """Check the configuration (`nginx -t`), then start nginx in the foreground as a child."""
    write_nginx_config(paths, host, port, upstream_port)
    _check_config(paths)
    return subprocess.Popen(_nginx_command(paths), stdin=subprocess.DEVNULL)


def running_proxy(paths: FederationPaths) -> int | None:
    """The pid of the nginx master serving this federation's nginx.conf (its pid file, checked
    against the process table: a stale file's pid may be anyone's now), else None."""
    try:
        pid = int((paths.server_dir / NGINX_PID).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    conf = str(paths.server_dir / NGINX_CONF)
    return pid if cmdline.startswith("nginx: master process") and cmdline.rstrip().endswith(conf) else None


def _workers(master: int) -> dict[int, str]:
    """The master's children: pid -> its process title (nginx: "worker process", "... is shutting down")."""
    found: dict[int, str] = {}
    for path in Path(f"/proc/{master}/task").glob("*/children"):
        try:
            pids = [int(x) for x in path.read_text().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def reload_proxy(paths: FederationPaths, wait_s: float = RELOAD_WAIT_S) -> bool:
    """Have the running nginx read its configuration again (`nginx -t` first), gracefully: requests
    in progress finish on the old workers; returns once a new worker serves (False: no nginx runs
    for this federation, nothing to reload). CoordinatorError when nginx refuses the configuration
    or starts no new worker."""
    master = running_proxy(paths)
    if master is None:
        return False
    _check_config(paths)
    before = {pid: process_start(pid) for pid in _workers(master)}
    os.kill(master, signal.SIGHUP)  # nginx's reload: new workers with the new configuration
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = _workers(master)
        started = [pid for pid in now if before.get(pid) != process_start(pid)]
        # The old workers finish what they hold but take no new connection: in force once each
        # has left or retitled itself "shutting down".
        old_accepting = [pid for pid in before if pid in now and "shutting down" not in now[pid]]
        if started and not old_accepting:
            return True
        time.sleep(0.05)
    raise CoordinatorError(
        f"nginx (pid {master}) did not serve its new configuration within {wait_s:g} s "
        f"(see {paths.server_dir / NGINX_ERROR_LOG})"
    )


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until host:port accepts a connection; CoordinatorError if the process stops or time runs out."""
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            program = proc.args[0] if isinstance(proc.args, list | tuple) else proc.args
            raise CoordinatorError(
                f"{program!s} stopped (exit {proc.returncode}) before listening on {_listen(host, port)}"
            )
        try:
            with socket.create_connection((connect, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise CoordinatorError(f"nothing listens on {_listen(host, port)} after {timeout:g} s")


__all__ = [
    "FLEET_PREFIX",
    "FLEET_ROUTES",
    "NODES_MAP",
    "PUSH_LIMIT_CONF",
    "REFUSED_URI",
    "AUTH_HEADERS",
    "find_nginx",
    "node_key_header",
    "nodes_map_text",
    "temp_dir",
    "worker_user",
    "nginx_config",
    "reload_proxy",
    "running_proxy",
    "start_proxy",
    "wait_listening",
    "write_door_files",
    "write_nginx_config",
]
