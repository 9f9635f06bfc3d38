"""A site whose only route out is its hospital's forward proxy (issue 26, break 10), with a real
proxy (tinyproxy, Debian's package: `make setup-system`) and a site that can reach nothing else.

The site runs in a network namespace this test creates: its loopback, and one end of a veth pair
(10.231.77.2/30) whose other end (10.231.77.1/30, on this machine) is where tinyproxy listens.
The SuperLink (`coordinator superlink`, TLS, SuperNode authentication, behind its nginx) listens
on 127.0.0.2, this machine's loopback: inside the namespace that address is the site's own
loopback, so the site reaches the SuperLink only through the proxy, which connects to it from
this machine. The site's `join` runs with HTTPS_PROXY and HTTP_PROXY set (the common hospital
setup): it joins, trains and is averaged with a second site that connects directly; tinyproxy's log
holds the tunnels (CONNECT 127.0.0.2:PORT) from the site's address and nothing of its local
traffic. A proxy that refuses CONNECT to the SuperLink's port (403), a dead proxy address and no
proxy at all are each one line naming the proxy (or the unreachable SuperLink), exit 4.

Skipped, with the reason, where a namespace cannot be created (not root, no `ip`) or tinyproxy or
nginx is missing. The namespace (and so the veth pair) is deleted in a finally.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.deploy_fixtures import (
    CLIENT,
    TINY_RUN,
    Process,
    approve_federation_bundle,
    env,
    join_args,
    round_events,
    run_coordinator,
    site_policy,
)

from client.deploy.join import EXIT_NO_CONNECTION, probe_superlink
from server.deploy.commands import main as coordinator_main
from server.deploy.provision import FederationPaths

pytestmark = pytest.mark.slow

HOST_IP, SITE_IP, PREFIX = "10.231.77.1", "10.231.77.2", 30  # the veth pair's two ends
SUPERLINK_HOST = "127.0.0.2"  # this machine's loopback; the site's own inside its namespace
PROXIED, DIRECT = "hospital", "genomics"
RUN = ["min-nodes=2" if a == "min-nodes=3" else a for a in TINY_RUN]  # two sites here
assert "min-nodes=2" in RUN


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)


@dataclass(frozen=True)
class SiteNetwork:
    namespace: str

    def command(self, environ: dict[str, str], *args: str) -> list[str]:
        """`client.py ARGS` run inside the site's namespace with `environ` added."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "env",
            *(f"{k}={v}" for k, v in environ.items()),
            sys.executable,
            str(CLIENT),
            *args,
        ]


def remove_stale_networks() -> None:
    """The namespace and veth of an earlier run of this test whose process is gone (killed by a
    signal, its `finally` never ran): else their addresses would make every later run skip."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name.removeprefix("hfm-site-")
        if name.startswith("hfm-site-") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            ip("netns", "del", name)
            ip("link", "del", f"hfm{int(pid) % 100000}h")


@pytest.fixture(scope="module")
def site_network() -> Iterator[SiteNetwork]:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs Linux, root and iproute2's `ip`")
    remove_stale_networks()
    if HOST_IP.rsplit(".", 1)[0] + "." in ip("-4", "addr").stdout:
        pytest.skip(f"the test's addresses {HOST_IP}/{PREFIX} are already in use on this machine")
    namespace = f"hfm-site-{os.getpid()}"
    host_end, site_end = f"hfm{os.getpid() % 100000}h", f"hfm{os.getpid() % 100000}s"
    added = ip("netns", "add", namespace)
    if added.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {added.stderr.strip()}")
    try:
        steps = [
            ("link", "add", host_end, "type", "veth", "peer", "name", site_end, "netns", namespace),
            ("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", host_end),
            ("link", "set", host_end, "up"),
            ("-n", namespace, "addr", "add", f"{SITE_IP}/{PREFIX}", "dev", site_end),
            ("-n", namespace, "link", "set", site_end, "up"),
            ("-n", namespace, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the site's network (ip {' '.join(step)}): {done.stderr.strip()}")
        yield SiteNetwork(namespace)
    finally:
        ip("netns", "del", namespace)  # takes the veth pair with it
        ip("link", "del", host_end)  # in case it was created but never moved


def port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_tinyproxy(directory: Path, port: int, connect_port: int) -> Process:
    """tinyproxy on HOST_IP:port for the site's address only, CONNECT allowed to connect_port only."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (make setup-system)")
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        f'Port {port}\nListen {HOST_IP}\nTimeout 600\nLogFile "{directory / "tinyproxy.log"}"\nLogLevel Connect\n'
        f"MaxClients 50\nAllow {SITE_IP}\nConnectPort {connect_port}\nDisableViaHeader Yes\n"
    )
    proc = Process(["tinyproxy", "-d", "-c", str(conf)], directory / "tinyproxy.out")
    for _ in range(300):  # listening (asked of the kernel: a test connection would be in its log)
        if f"{HOST_IP}:{port}" in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout:
            return proc
        if proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.stop()
    raise AssertionError(f"tinyproxy did not start: {proc.output()[-2000:]}")


@pytest.fixture(scope="module")
def superlink_on_second_loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FederationPaths, str]]:
    """A federation whose SuperLink certificate names 127.0.0.2, its SuperLink (behind nginx) on
    127.0.0.2, both sites registered and the federation's bundle approved in their policy."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (make setup-system)")
    fed = FederationPaths(root=tmp_path_factory.mktemp("proxy") / "fed")
    provisioned = ["provision", str(fed.root), "--site", PROXIED, "--site", DIRECT, "--hostname", SUPERLINK_HOST]
    assert coordinator_main(provisioned) == 0
    port = port_on(SUPERLINK_HOST)
    link = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(fed.root), "--host", SUPERLINK_HOST]
        + ["--port", str(port), "--parent-pid", str(os.getpid())],
        fed.root / "superlink.out",
    )
    try:
        assert link.wait_for("SuperLink ready", 600), link.output()[-3000:]
        address = f"{SUPERLINK_HOST}:{port}"
        probe_superlink(address, fed.ca_cert, timeout=10)  # from this machine: direct
        registered = run_coordinator("register", str(fed.root), "--site", PROXIED, "--site", DIRECT, timeout=600)
        assert registered.returncode == 0, registered.stderr
        approve_federation_bundle(fed, site_policy(fed))
        yield fed, address
    finally:
        link.stop()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stdout + result.stderr, (result.stdout, result.stderr)
    return errors[0]


def test_a_site_behind_a_forward_proxy_joins_trains_and_is_averaged(
    site_network: SiteNetwork,
    superlink_on_second_loopback: tuple[FederationPaths, str],
    sites: dict[str, Path],
    tmp_path: Path,
) -> None:
    fed, address = superlink_on_second_loopback
    superlink_port = int(address.rsplit(":", 1)[1])
    proxy_port, refusing_port, dead_port = port_on(HOST_IP), port_on(HOST_IP), port_on(HOST_IP)
    proxy = start_tinyproxy(tmp_path / "proxy", proxy_port, connect_port=superlink_port)
    refusing = start_tinyproxy(tmp_path / "refusing", refusing_port, connect_port=443)  # not the SuperLink's
    joined: list[Process] = []
    try:

        def join_in_namespace(environ: dict[str, str], state: str) -> subprocess.CompletedProcess[str]:
            args = join_args(fed, sites[PROXIED], PROXIED, address, tmp_path / state)
            return subprocess.run(
                site_network.command(environ, *args, "--connect-timeout", "20"),
                cwd=CLIENT.parents[1],
                env=env(),
                capture_output=True,
                text=True,
                timeout=600,
            )

        # No proxy: the site cannot reach the SuperLink (127.0.0.2 is its own loopback in there).
        alone = join_in_namespace({}, "s-alone")
        assert alone.returncode == EXIT_NO_CONNECTION
        assert f"cannot reach the SuperLink at {address}: connection refused" in one_error_line(alone)
        # A dead proxy address: named at once, no retries.
        dead = join_in_namespace({"HTTPS_PROXY": f"http://{HOST_IP}:{dead_port}"}, "s-dead")
        assert dead.returncode == EXIT_NO_CONNECTION
        assert (
            f"cannot reach the proxy http://{HOST_IP}:{dead_port} (from HTTPS_PROXY): connection refused"
            in one_error_line(dead)
        )
        # A proxy that refuses CONNECT to the SuperLink's port: its 403, named.
        refused = join_in_namespace({"https_proxy": f"http://{HOST_IP}:{refusing_port}"}, "s-refused")
        assert refused.returncode == EXIT_NO_CONNECTION
        line = one_error_line(refused)
        assert f"the proxy http://{HOST_IP}:{refusing_port} (from https_proxy) refused to tunnel" in line
        assert f"(403 Access violation): it must allow CONNECT to port {superlink_port}" in line
        assert f"CONNECT {address}" in (tmp_path / "refusing" / "tinyproxy.log").read_text()

        # Through the proxy, with HTTP_PROXY set too: the site's local calls must not go there.
        proxies = {"HTTPS_PROXY": f"http://{HOST_IP}:{proxy_port}", "HTTP_PROXY": f"http://{HOST_IP}:{proxy_port}"}
        args = join_args(fed, sites[PROXIED], PROXIED, address, tmp_path / "s-proxied")
        joined.append(Process(site_network.command(proxies, *args), tmp_path / "join-proxied.out"))
        args = join_args(fed, sites[DIRECT], DIRECT, address, tmp_path / "s-direct")
        joined.append(Process([sys.executable, str(CLIENT), *args], tmp_path / "join-direct.out"))
        for site in joined:
            assert site.wait_for("joined: SuperNode", 600), site.output()[-3000:]
        assert f"through the proxy http://{HOST_IP}:{proxy_port} (from HTTPS_PROXY)" in joined[0].output()

        out = tmp_path / "run"
        result = run_coordinator(
            "launch", str(fed.root), "--out-dir", str(out), "--rounds", "2", *RUN, "--wait", "--timeout", "1500"
        )
        assert result.returncode == 0, (result.stdout, result.stderr, [p.output()[-3000:] for p in joined])
        assert "finished:completed" in result.stdout
        _, rounds = round_events(out)
        assert sorted(rounds) == [1, 2]
        for rnd, event in rounds.items():
            assert set(event["sites"]) == {PROXIED, DIRECT}, rnd
            for site_name, entry in event["sites"].items():
                assert entry["status"] == "ok", (rnd, site_name, entry)
                assert {"ehr", "shared"} <= set(entry["groups_received"]), (rnd, site_name)

        # The proxy carried the site's tunnels to the SuperLink, from the site's address only, and
        # nothing of the site's own traffic (its Runtime API on 127.0.0.1).
        log = (tmp_path / "proxy" / "tinyproxy.log").read_text()
        requests = [ln.split("): ", 1)[1] for ln in log.splitlines() if "Request (file descriptor" in ln]
        assert requests and all(r.startswith(f"CONNECT {address} ") for r in requests), requests
        clients = {ln.rsplit(": ", 1)[1] for ln in log.splitlines() if "Connect (file descriptor" in ln}
        assert clients == {SITE_IP}, clients
        assert "127.0.0.1" not in log and "localhost" not in log
    finally:
        for site in joined:
            site.stop()
        proxy.stop()
        refusing.stop()
