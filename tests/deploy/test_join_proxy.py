"""A site behind a forward proxy (issue 26, break 10), without Flower processes: the proxy `join`'s
preflight picks is the one the SuperNode's httpx picks (client/deploy/proxy_route.py), local traffic never
goes to a proxy, and every way a proxy fails is one line naming it (client/deploy/join.py probe_superlink).

The proxies here are sockets on 127.0.0.1 that fail in each way (nothing listening, silent,
refusing with 403 or 407) and a small CONNECT relay for the working tunnel, verified end to end
against a provisioned federation's CA. The real proxy (tinyproxy) and a site that can reach
nothing else are in tests/deploy/test_forward_proxy.py (slow)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from client.deploy.join import (
    EXIT_NO_CONNECTION,
    EXIT_USAGE,
    JoinConfig,
    JoinError,
    probe_superlink,
    site_process_env,
    superlink_route,
)
from client.deploy.proxy_route import (
    LOCAL_HOSTS,
    ProxyError,
    ProxyRoute,
    connect_request,
    parse_proxy_url,
    route_for,
    site_proxy_env,
    with_local_no_proxy,
)
from server.deploy.provision import FederationPaths, ProvisionConfig, provision

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


def clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def httpx_choice(url: str) -> str | None:
    """The proxy httpx 0.28 (the SuperNode's HTTP client) uses for `url` under os.environ, as
    scheme://host:port; None: direct."""
    with httpx.Client() as client:  # trust_env, as flwr's ProtobufClient creates it
        transport = client._transport_for_url(httpx.URL(url))
        if transport is client._transport:
            return None
        proxy = transport._pool._proxy_url  # type: ignore[attr-defined]
        scheme = proxy.scheme.decode()
        port = proxy.port or (443 if scheme == "https" else 80)  # httpcore's default ports
        return f"{scheme}://{proxy.host.decode()}:{port}"


def our_choice(url: str, environ: dict[str, str]) -> str | None:
    u = httpx.URL(url)
    route = route_for(u.scheme, u.host, u.port or (443 if u.scheme == "https" else 80), environ)
    return None if route is None else f"{route.scheme}://{route.host}:{route.port}"


ENVIRONMENTS = [
    {},
    {"HTTPS_PROXY": "http://10.9.0.1:3128"},
    {"https_proxy": "10.9.0.2:8080"},  # no scheme: http://
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "https_proxy": "http://10.9.0.2:3128"},  # lowercase wins
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "https_proxy": ""},  # an empty lowercase one cancels
    {"ALL_PROXY": "http://10.9.0.3:3128"},
    {"ALL_PROXY": "http://10.9.0.3:3128", "HTTPS_PROXY": "http://10.9.0.1:3128"},  # the scheme's own first
    {"HTTP_PROXY": "http://10.9.0.4:3128"},  # not for https://
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "fl.consortium.org"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": ".consortium.org"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "consortium.org"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "other.org, 10.20.30.40"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "*"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "fl.consortium.org:9093"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "fl.consortium.org:443"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "no_proxy": "localhost,127.0.0.1,::1"},
    {"HTTPS_PROXY": "http://proxy.hospital.org", "NO_PROXY": "http://fl.consortium.org"},
    {"HTTPS_PROXY": "https://proxy.hospital.org:8443"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "", "no_proxy": "10.20.30.40"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "*.consortium.org"},  # httpx: matches nothing
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "all://*.consortium.org,https://consortium.org"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "::1,10.20.30.40:9093,LOCALHOST"},
    {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "10.0.0.0/8, consortium.org:9093"},
]
TARGETS = [
    "https://fl.consortium.org:9093",
    "https://fl.consortium.org:443",
    "https://FL.Consortium.org:9093",
    "https://a.fl.consortium.org:9093",
    "https://consortium.org:9093",
    "https://10.20.30.40:9093",
    "https://127.0.0.1:9093",
    "https://[::1]:9093",
    "https://localhost:9093",
    "http://127.0.0.1:41000",  # the SuperNode's Runtime API, as its ClientApps call it
]


@pytest.mark.parametrize("environ", ENVIRONMENTS, ids=[str(sorted(e.items())) for e in ENVIRONMENTS])
def test_the_preflight_picks_the_proxy_the_supernodes_httpx_picks(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_proxy_env(monkeypatch)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    for url in TARGETS:
        assert our_choice(url, dict(os.environ)) == httpx_choice(url), (environ, url)


def test_local_traffic_never_goes_to_a_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With HTTP_PROXY set (common), the ClientApp's calls to the SuperNode's Runtime API on
    127.0.0.1 went to the proxy; the environment `join` gives its processes sends them direct."""
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.0.4:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://10.9.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "intranet.hospital.org")
    assert httpx_choice("http://127.0.0.1:41000") == "http://10.9.0.4:3128"  # what went wrong
    cfg = JoinConfig(site_root=tmp_path, superlink="fl.consortium.org:9093", insecure=True, state_dir=tmp_path / "s")
    env = site_process_env(cfg)
    assert env["NO_PROXY"] == env["no_proxy"] == "intranet.hospital.org,127.0.0.1,localhost,::1"  # appended
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for url in ("http://127.0.0.1:41000", "http://localhost:41000", "http://[::1]:41000"):
        assert httpx_choice(url) is None, url
    assert httpx_choice("https://fl.consortium.org:9093") == "http://10.9.0.1:3128"  # the SuperLink still proxied
    # Nothing to append to: only the local hosts; already there: kept once.
    assert with_local_no_proxy({}) == ",".join(LOCAL_HOSTS)
    assert with_local_no_proxy({"no_proxy": "localhost, a.org"}) == "localhost,a.org,127.0.0.1,::1"


def test_proxy_option_goes_to_the_supernode_and_the_preflight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("ALL_PROXY", "http://10.9.0.3:3128")
    cfg = JoinConfig(
        site_root=tmp_path,
        superlink="fl.consortium.org:9093",
        root_cert=tmp_path / "ca.pem",
        state_dir=tmp_path / "s",
        proxy="http://proxy.hospital.org:3128",
    )
    route = superlink_route(cfg)
    assert route is not None and route.url == "http://proxy.hospital.org:3128" and route.source == "--proxy"
    assert superlink_route(cfg.model_copy(update={"proxy": None})) == parse_proxy_url(
        "http://10.9.0.3:3128", "ALL_PROXY"
    )
    assert superlink_route(cfg.model_copy(update={"superlink": "127.0.0.1:9093"})) is None  # local: direct
    env = site_proxy_env({"HTTPS_PROXY": "http://10.9.0.1:3128", "https_proxy": "http://10.9.0.2:3128"}, cfg.proxy)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == cfg.proxy  # --proxy wins over either spelling
    with pytest.raises(ValueError, match="--proxy='ftp://x:1' is not a proxy URL"):
        JoinConfig(site_root=tmp_path, superlink="a:1", insecure=True, state_dir=tmp_path, proxy="ftp://x:1")


def test_proxy_settings_that_cannot_work_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("ALL_PROXY", "socks5://10.9.0.5:1080")
    cfg = JoinConfig(site_root=tmp_path, superlink="fl.consortium.org:9093", insecure=True, state_dir=tmp_path / "s")
    with pytest.raises(JoinError, match=r"ALL_PROXY='socks5://10.9.0.5:1080': SOCKS proxies are not supported") as err:
        superlink_route(cfg)
    assert err.value.status == EXIT_USAGE
    with pytest.raises(ImportError, match="socksio"):
        httpx.Client()  # what the SuperNode would have met
    monkeypatch.delenv("ALL_PROXY")
    with pytest.raises(ProxyError, match=r"HTTPS_PROXY='http://\*\*\*@:3128' is not a proxy URL"):
        parse_proxy_url("http://user:secret@:3128", "HTTPS_PROXY")  # credentials never shown
    with pytest.raises(ProxyError, match=r"NO_PROXY='\[::1\]': an entry the SuperNode's HTTP client cannot read"):
        route_for("https", "fl.consortium.org", 9093, {"HTTPS_PROXY": "http://10.9.0.1:3128", "NO_PROXY": "[::1]"})
    monkeypatch.setenv("NO_PROXY", "[::1]")
    with pytest.raises(httpx.InvalidURL):
        httpx.Client()  # what the SuperNode would have met
    route = parse_proxy_url("http://site%40h:p%3Ass@proxy.hospital.org:3128", "--proxy")
    assert (route.username, route.password) == ("site@h", "p:ss") and "ss" not in route.describe()


def test_proxy_credentials_go_as_httpx_sends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://site:s3cret@10.9.0.1:3128")
    with httpx.Client() as client:
        transport = client._transport_for_url(httpx.URL("https://fl.consortium.org:9093"))
        sent = dict(transport._pool._proxy_headers)  # type: ignore[attr-defined]
    route = route_for("https", "fl.consortium.org", 9093, {"HTTPS_PROXY": "http://site:s3cret@10.9.0.1:3128"})
    assert route is not None
    request = connect_request(route, "fl.consortium.org:9093").decode()
    assert request.startswith("CONNECT fl.consortium.org:9093 HTTP/1.1\r\n")
    assert f"Proxy-Authorization: {sent[b'Proxy-Authorization'].decode()}\r\n" in request


# ---------------------------------------------------------------------------- proxies that fail, one line each


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return provision(ProvisionConfig(federation_dir=tmp_path_factory.mktemp("p") / "fed", sites=["hospital"])).paths


@contextlib.contextmanager
def serve(handler: Callable[[socket.socket], object]) -> Iterator[int]:
    """A listener on 127.0.0.1 whose every connection goes to handler(conn) in a thread; its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in conns:
            conn.close()


def read_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def answering(reply: bytes, seen: list[bytes]) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        seen.append(read_head(conn))
        conn.sendall(reply)

    return handle


def route(port: int, source: str = "HTTPS_PROXY") -> ProxyRoute:
    return parse_proxy_url(f"http://127.0.0.1:{port}", source)


def test_a_dead_proxy_is_named_at_once(fed: FederationPaths) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(JoinError) as err:
        probe_superlink("fl.consortium.org:9093", fed.ca_cert, 5.0, route(port))
    assert err.value.status == EXIT_NO_CONNECTION
    assert str(err.value) == (
        f"cannot reach the SuperLink at fl.consortium.org:9093: cannot reach the proxy http://127.0.0.1:{port} "
        "(from HTTPS_PROXY): connection refused (is the proxy running at that address and port?)"
    )


def test_a_proxy_refusing_connect_is_named_with_its_answer(fed: FederationPaths) -> None:
    seen: list[bytes] = []
    with serve(answering(b"HTTP/1.0 403 Access violation\r\nContent-Length: 0\r\n\r\n", seen)) as port:
        with pytest.raises(JoinError) as err:
            probe_superlink("fl.consortium.org:9093", fed.ca_cert, 5.0, route(port, "--proxy"))
    assert seen and seen[0].startswith(b"CONNECT fl.consortium.org:9093 HTTP/1.1\r\nHost: fl.consortium.org:9093\r\n")
    assert err.value.status == EXIT_NO_CONNECTION
    assert f"the proxy http://127.0.0.1:{port} (from --proxy) refused to tunnel to the SuperLink at " in str(err.value)
    assert "(403 Access violation): it must allow CONNECT to port 9093 of fl.consortium.org" in str(err.value)


def test_a_proxy_asking_for_credentials_says_where_they_go(fed: FederationPaths) -> None:
    with serve(answering(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", [])) as port:
        with pytest.raises(JoinError, match=r"asks for credentials \(407 Proxy Authentication Required\): put them"):
            probe_superlink("fl.consortium.org:9093", fed.ca_cert, 5.0, route(port))
    with serve(answering(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", [])) as port:
        with pytest.raises(JoinError, match=r"could not reach the SuperLink at fl.consortium.org:9093 \(502 Bad"):
            probe_superlink("fl.consortium.org:9093", fed.ca_cert, 5.0, route(port))
    with serve(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", [])) as port:
        with pytest.raises(JoinError, match=r"with 'SSH-2.0-OpenSSH_9.2', not HTTP \(is that address an HTTP proxy"):
            probe_superlink("fl.consortium.org:9093", fed.ca_cert, 5.0, route(port))


def test_a_silent_proxy_is_named_after_the_connect_timeout(fed: FederationPaths) -> None:
    release = threading.Event()
    with serve(lambda conn: release.wait(30)) as port:
        try:
            with pytest.raises(JoinError) as err:
                probe_superlink("fl.consortium.org:9093", fed.ca_cert, 0.5, route(port))
        finally:
            release.set()
    assert f"the proxy http://127.0.0.1:{port} (from HTTPS_PROXY) accepted the connection but did not answer " in str(
        err.value
    )
    assert "CONNECT to fl.consortium.org:9093 within 0.5 s" in str(err.value)


def relay(conn: socket.socket, upstream_port: int) -> None:
    """A CONNECT proxy for one connection: any target goes to 127.0.0.1:upstream_port."""
    head = read_head(conn)
    if not head.startswith(b"CONNECT "):
        conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
        return
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
    pump(conn, upstream)


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handle(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    with serve(handle) as port:
        yield port


def test_tls_is_verified_end_to_end_through_the_tunnel(fed: FederationPaths, tmp_path: Path) -> None:
    """Through a CONNECT relay the SuperLink's certificate is checked against --root-cert and the
    name the site connects by (the proxy sees only ciphertext); another CA's certificate, as a
    TLS-inspecting proxy would present, is refused with the proxy named."""
    other = provision(ProvisionConfig(federation_dir=tmp_path / "other", sites=["x"])).paths
    with tls_server(fed.superlink_cert, fed.superlink_key) as server_port:
        with serve(lambda conn: relay(conn, server_port)) as port:
            probe_superlink("localhost:9093", fed.ca_cert, 5.0, route(port))  # the tunnel works, TLS verified
            with pytest.raises(JoinError) as err:
                probe_superlink("localhost:9093", other.ca_cert, 5.0, route(port))
            with pytest.raises(JoinError, match="is not valid for 'fl.elsewhere.org'"):
                probe_superlink("fl.elsewhere.org:9093", fed.ca_cert, 5.0, route(port))
    message = str(err.value)
    assert f"the SuperLink's certificate at localhost:9093 (through the proxy http://127.0.0.1:{port}" in message
    assert "does not verify against --root-cert" in message and "inspects TLS" in message
