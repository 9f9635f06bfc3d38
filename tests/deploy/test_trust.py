"""Trust, with real processes on 127.0.0.1 (fixtures in tests/helpers/deploy_fixtures.py): only registered
sites take part, and a site runs only app bundles it approved.

- The rogue-site replay (issue 12, finding 1): an outsider holding only the public ca.pem, at the
  public port (nginx, server/deploy/proxy.py), tries the Control API the way the `flwr` CLI does and by
  hand: list runs and nodes, read a run's log, stop a run, register its own key; every request is
  answered 403 by the proxy and never reaches the SuperLink, and a Fleet API call without a
  registered key is answered 401 by the proxy. Then the outsider's best case: its key registered
  with Flower behind the coordinator's back (as the open Control API used to allow). At the public
  port nginx still refuses it (its key is not in the registry the door's map is made from:
  `join` exits "not registered"); a node joined as "rogue" past the door (at the SuperLink's loopback
  port, from the coordinator's machine) is not in the coordinator's registry either, so the
  ServerApp sends it nothing and it is never among the contributors.
- The unapproved bundle (finding 2): a run whose bundle ships its own module (which would leave
  a marker file if it were ever imported) is refused by every site before any process unpacks it;
  the refusals reach the ServerApp as the sites' replies (server.log names each site and the
  bundle's sha256) and the run fails; the sites then run the approved bundle as before.

Each test takes minutes on 2 cores: slow.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from helpers.deploy_fixtures import (
    CLIENT,
    SITES,
    TINY_RUN,
    Process,
    join_args,
    round_events,
    run_client,
    run_coordinator,
)

from client.deploy.join import EXIT_NOT_REGISTERED
from healthfm_core.files import write_flat_toml
from server.deploy.bundle import build_bundle
from server.deploy.flwr_app import parse_overrides
from server.deploy.flwr_control import CONNECTION, flwr_home, run_flwr, start_run, wait_for_run
from server.deploy.provision import FederationPaths
from server.deploy.registry import read_registry, registry_path

pytestmark = pytest.mark.slow

CONTROL_REFUSED = "only the Fleet API is served here"


@pytest.fixture(scope="module")
def members(
    superlink: str, federation: FederationPaths, sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    """The three registered sites joined once for the module (no test here stops one; a site
    stopped and joined again at once can find its key still counted as connected)."""
    tmp = tmp_path_factory.mktemp("members")
    procs: dict[str, Process] = {}
    try:
        for name in SITES:
            procs[name] = Process(
                [
                    sys.executable,
                    str(CLIENT),
                    *join_args(federation, sites[name], name, superlink, tmp / f"state-{name}"),
                ],
                tmp / f"join-{name}.out",
            )
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def outsider_home(tmp_path: Path, address: str, ca: Path) -> dict[str, str]:
    """A `flwr` CLI configuration pointing at the public port with the public CA, nothing else."""
    home = tmp_path / "outsider-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "pub"\n\n[superlink.pub]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return {"FLWR_HOME": str(home)}


def outsider_flwr(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **env},
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


def raw_post(address: str, ca: Path, path: str, method: str = "POST") -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.request(
            method, path, body=b"" if method == "POST" else None, headers={"Content-Type": "application/protobuf"}
        )
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def test_an_outsider_with_the_ca_reaches_only_the_fleet_api(
    superlink: str, federation: FederationPaths, tmp_path: Path
) -> None:
    ca = federation.site("intruder").ca_cert  # what every site (and anyone they share it with) holds
    env = outsider_home(tmp_path, superlink, ca)
    # A run exists (its id is what an outsider would try to read or stop).
    launched = (
        [ln for ln in (federation.server_dir / "launches.jsonl").read_text().splitlines()]
        if (federation.server_dir / "launches.jsonl").exists()
        else []
    )
    run_id = json.loads(launched[-1])["run_id"] if launched else 1
    attempts = {
        "list runs": ["ls", "pub"],
        "list nodes": ["supernode", "list", "pub"],
        "read a run's log": ["log", str(run_id), "pub"],
        "stop a run": ["stop", str(run_id), "pub"],
        "register its own key": [
            "supernode",
            "register",
            str(federation.site("intruder").public_key),
            "pub",
            "--name",
            "rogue",
        ],
    }
    for what, args in attempts.items():
        rc, out = outsider_flwr(env, *args)
        print(f"outsider: flwr {' '.join(args)} -> {out[:160]}")
        assert "403" in out and "Forbidden" in out, (what, out)
        assert not any(site in out for site in SITES), (what, out)  # no site name leaks
    # By hand: every Control and Runtime route, the API docs, a Fleet route with another method.
    for path in (
        "/v1/control/list-runs",
        "/v1/control/list-nodes",
        "/v1/control/stream-logs",
        "/v1/control/stop-run",
        "/v1/control/register-node",
        "/v1/runtime/get-nodes",
        "/v1/runtime/pull-messages",
        "/docs",
        "/openapi.json",
        "/health",
        "/v1/fleetx/get-run",
    ):
        status, body = raw_post(superlink, ca, path)
        print(f"outsider: POST {path} -> {status}")
        assert status == 403 and CONTROL_REFUSED.encode() in body, (path, status, body[:200])
    # Paths with dot segments are refused by nginx itself before any location matches (400).
    for path in ("/v1/fleet/../control/list-runs", "/v1/fleet/get-run/../../control/list-runs"):
        status, body = raw_post(superlink, ca, path)
        print(f"outsider: POST {path} -> {status}")
        assert status == 400 and b"request path refused" in body, (path, status, body[:200])
    status, _ = raw_post(superlink, ca, "/v1/fleet/get-run", method="GET")
    assert status == 403
    # A Fleet call without node authentication headers: nginx refuses it (401) before the SuperLink reads it.
    status, body = raw_post(superlink, ca, "/v1/fleet/get-run")
    print(f"outsider: POST /v1/fleet/get-run (unsigned) -> {status}")
    assert status == 401 and b"authentication header" in body, (status, body[:200])
    # The proxy refused them itself: the SuperLink never saw a Control request from outside.
    access = (federation.server_dir / "nginx-access.log").read_text()
    assert '"POST /v1/control/list-runs HTTP/1.1" 403' in access

    # The SuperLink listens on loopback only; from there, the coordinator's own CLI works.
    address = tomllib.loads((flwr_home(federation) / "config.toml").read_text())["superlink"][CONNECTION]["address"]
    assert address.startswith("127.0.0.1:") and address != superlink
    shown = run_coordinator("status", str(federation.root), timeout=300)
    assert shown.returncode == 0, shown.stderr
    nodes = run_flwr(federation, ["supernode", "list", CONNECTION, "--format", "json"])
    assert nodes.returncode == 0, nodes.stderr
    listed = json.loads(nodes.stdout[nodes.stdout.index("{") :])["nodes"]
    registry = read_registry(registry_path(federation))
    assert sorted(s.name for s in registry.sites) == sorted(SITES)
    # The outsider's key was not registered: only the coordinator's three nodes exist.
    assert {int(n["node-id"]) for n in listed} == {s.node_id for s in registry.sites}


def _evil_app(federation: FederationPaths, app_dir: Path, marker: Path) -> Path:
    """The federation's app with one more module, named as its clientapp: imported at a site (whose
    Flower home is under a `state-*` directory here), it leaves `marker`. (`flwr run` imports the
    components on the coordinator's machine to validate them; there it leaves nothing.)"""
    app_dir.mkdir()
    pyproject = (federation.server_dir / "app" / "pyproject.toml").read_text()
    assert 'clientapp = "client.client_app:app"' in pyproject
    (app_dir / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client.client_app:app"', 'clientapp = "healthfm_extra:app"')
    )
    (app_dir / "healthfm_extra.py").write_text(
        "import os\nfrom pathlib import Path\n\nfrom flwr.clientapp import ClientApp\n\n"
        "if 'state-' in os.environ.get('FLWR_HOME', ''):\n"
        f"    Path({str(marker)!r}).write_text('the unapproved bundle ran at ' + os.environ['FLWR_HOME'])\n"
        "app = ClientApp()\n"
    )
    return app_dir


def test_an_unapproved_bundle_never_runs_at_a_site(
    members: dict[str, Process], federation: FederationPaths, tmp_path: Path
) -> None:
    marker = tmp_path / "EXTRA-MODULE-RAN"
    app = _evil_app(federation, tmp_path / "healthfm-federation", marker)
    fab, evil_hash = build_bundle(app)
    assert b"healthfm_extra.py" in fab
    out = tmp_path / "evil-run"
    config = {
        **parse_overrides([a for a in TINY_RUN[2:] if a != "-c"]),
        "rounds": 1,
        "out-dir": str(out),
        "registry": str(registry_path(federation)),
        "timeout-s": 120,
    }
    run_id = start_run(federation, app, write_flat_toml(tmp_path / "evil-config.toml", config))
    status = wait_for_run(federation, run_id, 600)
    assert status == "finished:failed", status
    assert not marker.exists()
    assert not (out / "rounds.jsonl").exists() or "setup" not in (out / "rounds.jsonl").read_text()
    server_log = (out / "server.log").read_text()
    for site, proc in members.items():
        reason = f"refused by site {site}: app bundle sha256 {evil_hash} is not in the approved_apps"
        assert reason in server_log, (site, server_log[-3000:])
        args = cast(list[str], proc.proc.args)  # a Process starts from an argument list
        guard_log = (Path(args[args.index("--state-dir") + 1]) / "app-guard.log").read_text()
        assert reason in guard_log and "starting flwr-clientapp" not in guard_log, guard_log[-2000:]
        # Never unpacked either: Flower installs a bundle under FLWR_HOME/apps/<...>.<sha256[:8]>.
        home = Path(args[args.index("--state-dir") + 1]) / "flwr-home"
        assert not any(evil_hash[:8] in p.name for p in home.rglob("*"))
    # The run's failure names every site's refusal (the ServerApp's error, in the run's log).
    logs = run_flwr(federation, ["log", str(run_id), CONNECTION, "--show"])
    failure = " ".join((logs.stdout + logs.stderr).split())
    assert "no site answered the capabilities query (" in failure, failure[-3000:]
    for site in SITES:
        assert f"{site}: refused by site {site}: app bundle sha256 {evil_hash}" in failure
    print(f"unapproved bundle {evil_hash[:12]}: {status}; {failure[failure.index('no site answered') :][:300]}")

    # The sites go on running the bundle they approved.
    ok = tmp_path / "approved-run"
    result = run_coordinator(
        "launch",
        str(federation.root),
        "--out-dir",
        str(ok),
        "--rounds",
        "1",
        *TINY_RUN,
        "--wait",
        "--timeout",
        "900",
        timeout=1000,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    _, rounds = round_events(ok)
    assert {s: e["status"] for s, e in rounds[1]["sites"].items()} == {s: "ok" for s in SITES}
    assert not marker.exists()


def test_a_node_outside_the_registry_is_never_averaged_in(
    members: dict[str, Process], federation: FederationPaths, sites: dict[str, Path], tmp_path: Path, superlink: str
) -> None:
    # The outsider's best case: its key registered with Flower behind the coordinator's back (what
    # the open Control API allowed), not in the coordinator's registry.
    reg = run_flwr(
        federation,
        [
            "supernode",
            "register",
            str(federation.registered_public_key("intruder")),
            CONNECTION,
            "--name",
            "rogue",
            "--format",
            "json",
        ],
    )
    assert reg.returncode == 0, reg.stdout + reg.stderr
    rogue_id = int(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"])
    assert rogue_id not in read_registry(registry_path(federation)).by_node()
    # At the public port: nginx refuses the key (not in registry.json), whatever Flower knows.
    refused = run_client(
        *join_args(federation, sites["hospital"], "intruder", superlink, tmp_path / "state-door"), timeout=600
    )
    assert refused.returncode == EXIT_NOT_REGISTERED, (refused.stdout, refused.stderr)
    assert "not registered" in refused.stderr
    supernode_log = (tmp_path / "state-door" / "supernode.log").read_text()
    assert "this SuperNode key is not registered with the federation" in supernode_log
    # Past the door, at the SuperLink's own port (on the coordinator's machine): the registry still decides.
    loopback = tomllib.loads((flwr_home(federation) / "config.toml").read_text())["superlink"][CONNECTION]["address"]
    state = tmp_path / "state-rogue"
    rogue = Process(
        [
            sys.executable,
            str(CLIENT),
            *join_args(federation, sites["hospital"], "intruder", loopback, state),
            "--site-name",
            "rogue",
        ],
        tmp_path / "join-rogue.out",
    )
    try:
        assert rogue.wait_for("joined: SuperNode", 600), rogue.output()[-3000:]
        out = tmp_path / "run"
        result = run_coordinator(
            "launch",
            str(federation.root),
            "--out-dir",
            str(out),
            "--rounds",
            "1",
            *TINY_RUN,
            "--wait",
            "--timeout",
            "900",
            timeout=1000,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        events, rounds = round_events(out)
        setup = next(e for e in events if e["event"] == "setup")
        assert set(setup["sites"]) == set(SITES)
        assert rogue_id not in {e["node_id"] for e in setup["sites"].values()}
        for event in rounds.values():
            assert set(event["sites"]) == set(SITES)
            assert all("rogue" not in names for names in event["contributors"].values())
            assert sorted(event["contributors"]["shared"]) == sorted(SITES)
        server_log = (out / "server.log").read_text()
        assert f"node {rogue_id} is connected but not in the coordinator's registry" in server_log
        # The rogue node was sent nothing at all: no message, no model.
        time.sleep(2)
        assert "Receiving:" not in (state / "supernode.log").read_text()
        print(f"rogue node {rogue_id}: connected, sent nothing, contributors {rounds[1]['contributors']['shared']}")
    finally:
        rogue.stop()
        run_flwr(federation, ["supernode", "unregister", str(rogue_id), CONNECTION])
