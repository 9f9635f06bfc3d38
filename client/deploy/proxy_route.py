"""How a site reaches its SuperLink when its only route out is a forward proxy (a hospital's
HTTP proxy): which proxy, if any, the SuperNode uses, and a tunnel through it for `join`'s preflight.

The SuperNode (flwr 1.41) talks to the SuperLink over HTTPS with httpx (flwr/supercore/protobuf/
client.py: `httpx.Client(verify=...)`, trust_env left on), so it follows the environment the way
httpx 0.28 reads it (httpx/_utils.py get_environment_proxies, over urllib's getproxies): the
`<scheme>_proxy` variables in either case, the lowercase spelling winning and an empty lowercase
one cancelling; `https_proxy` for an https:// SuperLink, else `all_proxy`; a proxy value without a
scheme is http://; NO_PROXY entries bypass the proxy (`*`: everything; an IP address, `localhost`
or `::1`: that host exactly; `.example.org`: its subdomains; `example.org`: it and its subdomains;
`HOST:PORT`: that port only). `route_for` applies the same rules to the environment `join` gives
the SuperNode, so the preflight goes where the SuperNode will go; tests/deploy/test_join_proxy.py checks
it against httpx's own choice.

The site's local traffic never goes to a proxy: the ClientApp and the app guard call the
SuperNode's Runtime API on 127.0.0.1 with httpx too, and with HTTP_PROXY set (common) those calls
went to the proxy. `site_proxy_env` appends 127.0.0.1, localhost and ::1 to NO_PROXY (both
spellings) for every process `join` starts, and puts `--proxy URL` in HTTPS_PROXY.

`open_tunnel` connects to the proxy and asks it with HTTP CONNECT for a tunnel to the SuperLink
(TLS to the proxy first for an https:// proxy; the SuperLink's TLS then runs inside the tunnel,
end to end, `tls_through`); every failure names the proxy and where its address came from.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # the SuperNode's Runtime API and its callers
PROXY_SCHEMES = ("http", "https")  # what httpx tunnels through without extra packages
MAX_REPLY_HEAD = 65536  # a proxy's answer to CONNECT is a status line and a few headers


class ProxyError(Exception):
    """A proxy that cannot carry the site's connection to the SuperLink, in one line naming it;
    `usage` when the setting itself is wrong (not the network)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class ProxyRoute(BaseModel):
    """A forward proxy the site's connection to the SuperLink goes through."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str  # http or https (the connection to the proxy itself)
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    source: str  # where it came from: HTTPS_PROXY, all_proxy, --proxy, ...

    @property
    def url(self) -> str:
        """The proxy's address, without its credentials (for messages and logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def describe(self) -> str:
        return f"the proxy {self.url} (from {self.source})"


def parse_proxy_url(value: str, source: str) -> ProxyRoute:
    """A proxy setting as httpx reads it (no scheme: http://); ProxyError naming `source` and
    the value (credentials hidden) when it is not one."""
    shown = re.sub(r"//[^/@]*@", "//***@", value)
    text = value.strip() if "://" in value else f"http://{value.strip()}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise ProxyError(f"{source}={shown!r} is not a proxy URL ({err})", usage=True) from None
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise ProxyError(
            f"{source}={shown!r}: SOCKS proxies are not supported (the SuperNode's HTTP client has no SOCKS "
            "support installed); use the site's HTTP proxy, which must allow CONNECT to the SuperLink's port",
            usage=True,
        )
    if scheme not in PROXY_SCHEMES or not parts.hostname:
        raise ProxyError(f"{source}={shown!r} is not a proxy URL (expected http://HOST:PORT)", usage=True)
    return ProxyRoute(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else (443 if scheme == "https" else 80),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        source=source,
    )


# ---------------------------------------------------------------------------- which proxy, from the environment


def proxy_variables(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{scheme: (value, variable name)} of the `<scheme>_proxy` variables, as urllib's
    getproxies_environment reads them: any case first, then the lowercase spellings win (an empty
    one removes the setting). `no` holds NO_PROXY."""
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            found[name.lower()[:-6]] = (value, name)
    if "REQUEST_METHOD" in environ:  # urllib ignores HTTP_PROXY in a CGI script (httpoxy)
        found.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            if value:
                found[name.lower()[:-6]] = (value, name)
            else:
                found.pop(name.lower()[:-6], None)
    return found


def _is_address(name: str) -> bool:
    for kind in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        try:
            kind(name.split("/")[0])
            return True
        except ValueError:
            continue
    return False


def _pattern_covers(pattern: str, target: httpx.URL) -> bool:
    """Whether a NO_PROXY entry covers `target`, as httpx matches it: the entry made into the
    pattern get_environment_proxies makes (an address or localhost: that host; anything else:
    `*ENTRY`, i.e. it and its subdomains, `.x` its subdomains only; a URL-form entry as is),
    then URLPattern's rules (scheme, host, and port when the entry has one)."""
    if "://" in pattern:
        scheme, rest = pattern.split("://", 1)
    elif _is_address(pattern) or pattern.lower() == "localhost":
        scheme, rest = "all", f"[{pattern}]" if ":" in pattern.split("/")[0] else pattern
    else:
        scheme, rest = "all", f"*{pattern}"
    url = httpx.URL(f"{scheme}://{rest}")  # httpx.InvalidURL where httpx itself cannot read it
    if url.scheme != "all" and url.scheme != target.scheme:
        return False
    if url.port is not None and url.port != target.port:
        return False
    host = url.host
    if not host or host == "*":
        return True
    if host.startswith("*."):
        return bool(re.fullmatch(r".+\." + re.escape(host[2:]), target.host))
    if host.startswith("*"):
        return bool(re.fullmatch(r"(.+\.)?" + re.escape(host[1:]), target.host))
    return host == target.host


def route_for(scheme: str, host: str, port: int, environ: Mapping[str, str]) -> ProxyRoute | None:
    """The proxy httpx would use for scheme://host:port under `environ`; None: direct."""
    found = proxy_variables(environ)
    target = httpx.URL(scheme=scheme, host=host, port=port)  # httpx's normal form (default port: None)
    no_proxy, variable = found.get("no", ("", "NO_PROXY"))
    entries = [e.strip() for e in no_proxy.split(",")]
    try:
        if "*" in entries or any(_pattern_covers(e, target) for e in entries if e):
            return None
    except httpx.InvalidURL as err:
        # The SuperNode's httpx fails on the same entry when it starts: say so now.
        raise ProxyError(
            f"{variable}={no_proxy!r}: an entry the SuperNode's HTTP client cannot read ({err})", usage=True
        ) from None
    for key in (scheme, "all"):  # httpx: the scheme's own proxy before all://
        if key in found and key in ("http", "https", "all"):
            value, name = found[key]
            return parse_proxy_url(value, name)
    return None


def with_local_no_proxy(environ: Mapping[str, str]) -> str:
    """The NO_PROXY the environment's processes read (the lowercase spelling wins), with
    127.0.0.1, localhost and ::1 appended where missing."""
    current = proxy_variables(environ).get("no", ("", ""))[0]
    entries = [e.strip() for e in current.split(",") if e.strip()]
    return ",".join([*entries, *(h for h in LOCAL_HOSTS if h not in entries)])


def site_proxy_env(environ: Mapping[str, str], proxy: str | None) -> dict[str, str]:
    """The environment for the processes `join` starts: `proxy` (--proxy) as HTTPS_PROXY in both
    spellings (the lowercase one is what httpx reads first), and NO_PROXY extended to the local
    hosts so that the Runtime API on 127.0.0.1 is never asked through a proxy."""
    env = dict(environ)
    if proxy is not None:
        env["https_proxy"] = env["HTTPS_PROXY"] = proxy
    env["no_proxy"] = env["NO_PROXY"] = with_local_no_proxy(environ)
    return env


# ---------------------------------------------------------------------------- a tunnel through it


def reach_proxy(route: ProxyRoute, timeout: float) -> socket.socket:
    """A connection to the proxy itself (TLS for an https:// one); ProxyError naming it otherwise."""
    try:
        sock = socket.create_connection((route.host, route.port), timeout=timeout)
    except socket.gaierror as err:
        raise ProxyError(
            f"cannot reach {route.describe()}: host name {route.host!r} does not resolve ({err.strerror})"
        ) from None
    except ConnectionRefusedError:
        raise ProxyError(
            f"cannot reach {route.describe()}: connection refused (is the proxy running at that address and port?)"
        ) from None
    except TimeoutError:
        raise ProxyError(f"cannot reach {route.describe()}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise ProxyError(f"cannot reach {route.describe()}: {err.strerror or err}") from None
    if route.scheme == "https":
        try:
            return ssl.create_default_context().wrap_socket(sock, server_hostname=route.host)
        except (ssl.SSLError, OSError) as err:
            sock.close()
            raise ProxyError(f"TLS with {route.describe()} failed: {err}") from None
    return sock


def connect_request(route: ProxyRoute, target: str) -> bytes:
    """The CONNECT request for `target` (HOST:PORT, IPv6 in brackets), with Basic proxy
    credentials when the proxy URL carries them (as httpx sends them)."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if route.username is not None:
        token = base64.b64encode(f"{route.username}:{route.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_reply_head(sock: socket.socket, route: ProxyRoute, target: str, timeout: float) -> str:
    head = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in head:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            raise ProxyError(
                f"{route.describe()} accepted the connection but did not answer the CONNECT to {target} "
                f"within {timeout:g} s (a proxy that does not allow CONNECT, or an overloaded one?)"
            ) from None
        except OSError as err:
            raise ProxyError(f"{route.describe()} dropped the CONNECT to {target}: {err.strerror or err}") from None
        if not chunk:
            raise ProxyError(f"{route.describe()} closed the connection without answering the CONNECT to {target}")
        head += chunk
        if len(head) > MAX_REPLY_HEAD:
            break
    return head.split(b"\r\n", 1)[0].decode("latin-1").strip()


def open_tunnel(route: ProxyRoute, host: str, port: int, timeout: float) -> socket.socket:
    """A connection to host:port through the proxy (HTTP CONNECT); ProxyError naming the proxy
    when it cannot be reached, refuses, or does not answer within `timeout` s."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = reach_proxy(route, timeout)
    try:
        sock.sendall(connect_request(route, target))
        status_line = _read_reply_head(sock, route, target, timeout)
        m = re.fullmatch(r"HTTP/\d(?:\.\d)?\s+(\d{3})\s*(.*)", status_line)
        if m is None:
            raise ProxyError(
                f"{route.describe()} answered the CONNECT to {target} with {status_line[:80]!r}, not HTTP "
                "(is that address an HTTP proxy?)"
            )
        code, reason = int(m.group(1)), m.group(2)
        if code == 200:
            sock.settimeout(timeout)
            return sock
        answer = f"{code} {reason}".strip()
        if code == 407:
            hint = (
                "the credentials in the proxy URL were refused"
                if route.username is not None
                else "put them in the proxy URL: http://USER:PASSWORD@HOST:PORT"
            )
            raise ProxyError(f"{route.describe()} asks for credentials ({answer}): {hint}")
        if 500 <= code < 600:  # tinyproxy: 500 Unable to connect; others 502, 503, 504
            raise ProxyError(
                f"{route.describe()} could not reach the SuperLink at {target} ({answer}): the proxy's own "
                "route to it is down or blocked"
            )
        raise ProxyError(
            f"{route.describe()} refused to tunnel to the SuperLink at {target} ({answer}): it must allow "
            f"CONNECT to port {port} of {host} (docs/site-admin.md, Forward proxies)"
        )
    except BaseException:
        sock.close()
        raise


def tls_through(sock: socket.socket, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
    """A TLS handshake with the SuperLink over `sock` (a tunnel, possibly itself TLS to an
    https:// proxy, hence memory buffers rather than wrap_socket); raises ssl's errors as
    wrap_socket does, TimeoutError when the server stays silent for `timeout` s."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    deadline = time.monotonic() + timeout
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            if data := outgoing.read():
                sock.sendall(data)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)  # TimeoutError when silent
            if not chunk:
                raise ssl.SSLEOFError("the connection closed during the TLS handshake") from None
            incoming.write(chunk)
            continue
        if data := outgoing.read():
            sock.sendall(data)
        return
