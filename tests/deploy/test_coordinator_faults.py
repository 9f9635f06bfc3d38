"""The coordinator's own processes and runs under faults (issue 26, breaks 4, 7 and 9).

- nginx refuses request targets it would have to normalise (`..`, `//`, encoded dots and
  slashes) with 400 itself and sends the SuperLink only canonical Fleet paths (real nginx, in
  front of a TLS server that records what reaches it).
- An out-dir belongs to one run at a time (OUT/run.lock): a second launch into it is refused
  naming the run that holds it; a stale claim of a dead run is taken over; the ServerApp refuses
  an out-dir another live run holds and writes nothing there.
- outcome.json never says "running" for a run whose ServerApp is gone: it says "interrupted",
  the rounds checkpointed and the `resume` command.
- Slow (real SuperLink, SuperExec, nginx and sites): nginx killed is restarted and the run goes
  on; the SuperLink killed stops everything with one line, and `launch --wait` says the run was
  interrupted and how to resume it (also when a restarted SuperLink no longer knows the run);
  two concurrent launches into two out-dirs both complete, each with its own outcome and audit
  chain.
"""

from __future__ import annotations

import http.server
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.deploy_fixtures import (
    CLIENT,
    SITES,
    TINY_RUN,
    Process,
    alive,
    command,
    descendants,
    env,
    free_port,
    join_args,
    round_events,
    run_coordinator,
    start_registered_superlink,
)
from helpers.narrowing import present

from healthfm_core.model.config import load_model_config
from server.audit import AUDIT_FILE, read_audit_log, verify_audit_log
from server.config import FederationConfig
from server.deploy.body_limit import BASE_PUSH_BODY_BYTES, MIB, run_push_body_bytes
from server.deploy.commands import main as coordinator_main
from server.deploy.commands import read_launches, report_outcome, resume_command
from server.deploy.door import DoorState, fit_run, open_door, read_door, refresh_keys
from server.deploy.flwr_control import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, write_connection
from server.deploy.provision import FederationPaths, ProvisionConfig, provision
from server.deploy.proxy import (
    FLEET_ROUTES,
    PUSH_CONNECTIONS,
    PUSH_LIMIT_CONF,
    WORKER_USERS,
    find_nginx,
    node_key_header,
    reload_proxy,
    start_proxy,
    wait_listening,
    worker_user,
)
from server.deploy.registry import RegisteredSite, read_registry, registry_path, write_registry
from server.outcome import RunOutcome, checkpointed_round, read_outcome, settle_outcome, write_outcome
from server.run_claim import (
    CLAIM_FILE,
    OutDirInUse,
    adopt_for_serverapp,
    claim_for_launch,
    read_claim,
    release,
    set_run_id,
)
from server.server_app import FederationServer

# ---------------------------------------------------------------------------- nginx (break 9)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The upstream behind nginx: records the raw path of every request that reaches it."""

    seen: list[tuple[str, str]] = []
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        type(self).seen.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


class _Upstream(http.server.ThreadingHTTPServer):
    """Quiet when nginx hangs up mid-answer (it does, for the requests it refuses early); any other
    error in a handler is printed as the standard library does."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[FederationPaths, int, list[tuple[str, str]]]]:
    """The real nginx (server.deploy.proxy's config) on a free port, in front of a TLS server with the
    SuperLink's certificate that records every request reaching it."""
    try:
        find_nginx()
    except Exception as err:  # `make setup-system` installs it; CI runs that first
        pytest.skip(str(err))
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north", "south"])).paths
    register(fed, "north", 1)  # south is provisioned, not registered
    open_door(fed, None)  # the door's files, as `superlink` writes them before nginx starts
    upstream_port, port = free_port(), free_port()
    _Recorder.seen = []
    server = _Upstream(("127.0.0.1", upstream_port), _Recorder)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(fed.superlink_cert, fed.superlink_key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    nginx = start_proxy(fed, "127.0.0.1", port, upstream_port)
    try:
        wait_listening("127.0.0.1", port, nginx)
        yield fed, port, _Recorder.seen
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        server.shutdown()


def register(fed: FederationPaths, site: str, node_id: int) -> None:
    """`site` recorded in registry.json, as `coordinator register` records it."""
    path = registry_path(fed)
    key = fed.registered_public_key(site).read_text().strip()
    write_registry(path, read_registry(path).with_site(RegisteredSite(name=site, public_key=key, node_id=node_id)))


def auth(fed: FederationPaths, site: str = "north") -> dict[str, str]:
    """What Flower's node authentication sends on every Fleet call (nginx checks they are there and
    that the key is a registered site's; the SuperLink checks the signature): `site`'s key."""
    key = node_key_header(fed.registered_public_key(site).read_text())
    return {"flwr-public-key": key, "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}


def raw_request(
    fed: FederationPaths,
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    length: str | None = None,
) -> tuple[int, str]:
    """Send exactly `METHOD TARGET` (no client-side normalisation) over TLS with the node
    authentication headers (or `headers`) and `body` (Content-Length: `length`, default the
    body's; "" sends none); status and body."""
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    sent = {**(auth(fed) if headers is None else headers), "Host": "localhost", "Connection": "close"}
    length = str(len(body)) if length is None else length
    if length:
        sent["Content-Length"] = length
    head_text = "".join(f"{k}: {v}\r\n" for k, v in sent.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(f"{method} {target} HTTP/1.1\r\n{head_text}\r\n".encode("latin-1") + body)
            # The answer as soon as it is whole (its Content-Length), not the close: after a refusal
            # nginx lingers a few seconds for the body it will discard.
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            head, _, answer = data.partition(b"\r\n\r\n")
            declared = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            while (declared is None or len(answer) < int(declared[1])) and (chunk := conn.recv(65536)):
                answer += chunk
    return int(head.split()[1]), answer.decode(errors="replace")


TRAVERSALS = [
    "/v1/control/list-runs/../../fleet/get-run",  # the request
    "/v1/fleet/get-run/../get-fab",
    "/v1/fleet/./get-run",
    "/v1/fleet/..",
    "/v1//fleet/get-run",
    "//v1/fleet/get-run",
    "/v1/control/list-runs/%2e%2e/%2e%2e/fleet/get-run",
    "/v1/control/list-runs/%2E%2E/%2E%2E/fleet/get-run",
    "/v1/fleet%2fget-run",
    "/v1/fleet/get-run%2F..%2F..%2Fcontrol%2Flist-runs",
    "/v1/fleet/get-run%5c..%5ccontrol",
    "/v1/fleet/get-run\\..\\control",
    "/v1/fleet/get-run?next=/../control/list-runs",
]


def test_nginx_refuses_dot_segments_and_encoded_slashes_and_forwards_only_canonical_fleet_paths(
    proxied: tuple[FederationPaths, int, list[tuple[str, str]]],
) -> None:
    fed, port, seen = proxied
    for target in TRAVERSALS:
        status, body = raw_request(fed, port, "POST", target)
        assert status == 400, (target, status, body)
    assert seen == []  # none of them reached the upstream
    # Outside the Fleet routes: 403 from nginx itself, as before.
    assert raw_request(fed, port, "POST", "/v1/control/list-runs")[0] == 403
    assert raw_request(fed, port, "GET", "/v1/fleet/get-run")[0] == 403
    assert seen == []
    # A Fleet call still passes, and the upstream is sent the canonical path only.
    assert raw_request(fed, port, "POST", "/v1/fleet/get-run") == (200, "upstream\n")
    assert raw_request(fed, port, "POST", "/v1/fleet/push-messages?a=b") == (200, "upstream\n")
    assert seen == [("POST", "/v1/fleet/get-run"), ("POST", "/v1/fleet/push-messages")]
    log = (fed.server_dir / "nginx-access.log").read_text()
    assert '"POST /v1/control/list-runs/../../fleet/get-run HTTP/1.1" 400' in log


def test_nginx_refuses_a_body_too_large_unauthenticated_or_unsized_before_the_superlink(
    proxied: tuple[FederationPaths, int, list[tuple[str, str]]],
) -> None:
    """Issue 40, break 7: an unauthenticated 300 MB POST to push-object streamed through nginx
    (client_max_body_size 2g) into the SuperLink. Now a body over the limit is refused with 413 from
    its Content-Length, a call without Flower's node authentication headers with 401, a chunked body
    with 411: none reaches the SuperLink, and nginx answers before the body is sent."""
    fed, port, seen = proxied
    limit = BASE_PUSH_BODY_BYTES  # what `superlink` opens the door at: a run without secure aggregation
    assert (fed.server_dir / PUSH_LIMIT_CONF).read_text() == f"client_max_body_size {limit};\n"
    too_big = str(limit + 1)
    # The headers alone: nginx decides from Content-Length and never waits for the body.
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", length=too_big)[0] == 413
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", length=str(limit), headers={})[0] == 401
    for header in auth(fed):  # each of the three is required
        partial = {k: v for k, v in auth(fed).items() if k != header}
        status, body = raw_request(fed, port, "POST", "/v1/fleet/pull-messages", headers=partial, body=b"x")
        assert status == 401 and header in body
    # Every other route: small bodies only (1 MiB).
    assert raw_request(fed, port, "POST", "/v1/fleet/push-messages", length=str(2 * 1024**2))[0] == 413
    chunked = {**auth(fed), "Transfer-Encoding": "chunked"}
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", headers=chunked, body=b"5\r\nhello\r\n0\r\n\r\n", length="")[0] == 411  # fmt: skip
    assert raw_request(fed, port, "GET", "/v1/fleet/push-object")[0] == 403
    assert seen == []
    # A legitimate object (authenticated, sized) goes through: the refusals above were nginx's.
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", body=b"\0" * 70_000) == (200, "upstream\n")
    assert seen == [("POST", "/v1/fleet/push-object")]
    log = (fed.server_dir / "nginx-access.log").read_text()
    assert '"POST /v1/fleet/push-object HTTP/1.1" 413' in log


def test_nginx_forwards_only_a_registered_sites_key_and_register_lets_one_in_without_a_restart(
    proxied: tuple[FederationPaths, int, list[tuple[str, str]]],
) -> None:
    """Issue 67, break 4: with three made-up authentication headers a 300 MB body reached the
    SuperLink (its memory 466 -> 965 MB). Now nginx forwards a Fleet call only when its
    flwr-public-key is a registered site's: any other key is answered 412 from the headers, before
    the body (none is sent here: nginx answers without waiting for it), with the error Flower's
    SuperNode prints and `join` reads as "not registered". `register` rewrites the map and reloads
    nginx: the new site passes, and a push in progress across the reload completes."""
    fed, port, seen = proxied
    open_door(fed, 400 * MIB)  # a door larger than the forged body: the key refuses it, not the size
    assert reload_proxy(fed)
    forged = {"flwr-public-key": "bWFkZS11cA==", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00"}
    status, body = raw_request(fed, port, "POST", "/v1/fleet/push-object", headers=forged, length=str(300 * 10**6))
    assert status == 412 and '"code": 2004' in body and "not registered" in body, (status, body)
    # A real key, provisioned but not registered: refused on every Fleet route.
    for route in FLEET_ROUTES:
        assert raw_request(fed, port, "POST", f"/v1/fleet/{route}", headers=auth(fed, "south"))[0] == 412, route
    assert seen == []
    assert raw_request(fed, port, "POST", "/v1/fleet/get-run") == (200, "upstream\n")  # north, registered
    # A push of north's in progress while south is registered (map rewritten, nginx reloaded).
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    head = "".join(f"{k}: {v}\r\n" for k, v in auth(fed).items())
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
    ) as conn:
        conn.sendall(
            f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\n{head}Content-Length: 1000\r\n\r\n".encode()
        )
        conn.sendall(b"x" * 10)
        register(fed, "south", 2)
        assert refresh_keys(fed)  # nginx reloaded: it said so once a worker with the new map serves
        assert raw_request(fed, port, "POST", "/v1/fleet/get-run", headers=auth(fed, "south")) == (200, "upstream\n")
        conn.sendall(b"x" * 990)
        assert conn.recv(65536).split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"
    # The push reached the upstream as it began (nginx streams bodies), before south's call.
    assert seen == [("POST", "/v1/fleet/get-run"), ("POST", "/v1/fleet/push-object"), ("POST", "/v1/fleet/get-run")]
    assert '"POST /v1/fleet/push-object HTTP/1.1" 412' in (fed.server_dir / "nginx-access.log").read_text()


def test_a_launch_raises_the_door_to_what_its_run_sends_and_a_fixed_door_refuses_it(
    proxied: tuple[FederationPaths, int, list[tuple[str, str]]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """push-object's limit is the launched runs' largest message, not the largest preset's (a
    secure `paper` run's, 1,328 MiB, was every federation's door): a run without secure aggregation
    needs BASE_PUSH_BODY_BYTES whatever its model (tests/deploy/test_door_deployed.py checks a
    secure `paper` run's size). A launch raises the door (nginx reloaded) before its run starts and
    never lowers it; `superlink --max-body-mib` fixes it, and a launch needing more is refused
    before anything starts, naming both sizes."""
    fed, port, seen = proxied
    assert (
        run_push_body_bytes(FederationConfig(out_dir=tmp_path, model=load_model_config("tiny"))) == BASE_PUSH_BODY_BYTES
    )
    # Fixed below what the run needs: `launch` refuses it before claiming or starting anything.
    open_door(fed, 8 * MIB)
    write_connection(fed, "127.0.0.1:1", insecure=False)  # never reached
    out = tmp_path / "run"
    rc = coordinator_main(["launch", str(fed.root), "--out-dir", str(out), "--model", "tiny", "-c", "eval-tasks="])
    err = capsys.readouterr().err
    assert rc == 2 and f"{BASE_PUSH_BODY_BYTES // MIB} MiB" in err and "at most 8 MiB" in err, err
    assert "--max-body-mib" in err
    assert read_door(fed) == DoorState(push_body_bytes=8 * MIB, fixed=True, sized_for="superlink --max-body-mib")
    assert read_launches(fed) == [] and not (out / CLAIM_FILE).exists()
    # Not fixed: raised to the run's need and in force at once (nginx reloaded); never lowered.
    open_door(fed, None)
    assert reload_proxy(fed)
    body = b"\0" * (BASE_PUSH_BODY_BYTES + 1)
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", body=body)[0] == 413
    raised = fit_run(fed, BASE_PUSH_BODY_BYTES + MIB, "a test run")
    assert raised is not None and raised.push_body_bytes == BASE_PUSH_BODY_BYTES + MIB
    assert raw_request(fed, port, "POST", "/v1/fleet/push-object", body=body) == (200, "upstream\n")
    assert fit_run(fed, BASE_PUSH_BODY_BYTES, "a smaller run") is None
    assert read_door(fed) == raised
    assert seen == [("POST", "/v1/fleet/push-object")]


def test_nginx_limits_each_address_and_never_runs_its_workers_as_root(
    proxied: tuple[FederationPaths, int, list[tuple[str, str]]],
) -> None:
    """nginx.conf never says `user root;` (break 7): started by root, its workers run as an
    unprivileged user, seen in the process table. One address holds at most PUSH_CONNECTIONS
    object pushes in progress at once: the next is refused with 503 (what Flower's SuperNode retries),
    never forwarded."""
    fed, port, seen = proxied
    text = (fed.server_dir / "nginx.conf").read_text()
    assert not re.search(r"^\s*user\s+root\s*;", text, re.M)
    if os.geteuid() == 0:
        user = worker_user()
        assert user in WORKER_USERS and user != "root" and f"user {user};" in text
        master = int((fed.server_dir / "nginx.pid").read_text())
        workers = descendants(master)
        assert workers and all(Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam(user).pw_uid for pid in workers)
    assert re.search(r"limit_req zone=fleet_requests burst=\d+ nodelay;", text)
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    held = []
    head = "".join(f"{k}: {v}\r\n" for k, v in auth(fed).items())
    try:
        for _ in range(PUSH_CONNECTIONS):  # bodies announced but not sent: each push stays in progress
            conn = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
            )
            conn.sendall(
                f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\n{head}Content-Length: 1000\r\n\r\nxx".encode()
            )
            held.append(conn)
        while len(seen) < PUSH_CONNECTIONS:  # each reached the upstream
            time.sleep(0.05)
        assert raw_request(fed, port, "POST", "/v1/fleet/push-object", body=b"x")[0] == 503
        assert len(seen) == PUSH_CONNECTIONS
    finally:
        for conn in held:
            conn.close()


# ---------------------------------------------------------------------------- one run per out-dir (break 7)


def _holder_process(out: Path, run_id: int, release_it: bool = False) -> subprocess.Popen[str]:
    """Another process whose ServerApp-side claim holds out (it stays alive until killed, or exits
    without giving the claim back, as a killed ServerApp does)."""
    code = (
        "import os, sys, time; from pathlib import Path; from server.run_claim import adopt_for_serverapp\n"
        f"adopt_for_serverapp(Path({str(out)!r}), {run_id}); print('held', flush=True)\n"
        + ("time.sleep(3600)\n" if not release_it else "os._exit(0)\n")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_an_out_dir_is_one_runs_at_a_time_and_a_stale_claim_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    mine, stale = claim_for_launch(out, lambda run_id: None)
    assert stale is None and present(read_claim(out)).role == "launch"
    with pytest.raises(OutDirInUse, match="in use by a run being launched"):  # a second launch, meanwhile
        claim_for_launch(out, lambda run_id: None)
    mine = set_run_id(out, mine, 12)
    with pytest.raises(OutDirInUse, match=r"in use by run 12 \(`launch`, pid"):
        claim_for_launch(out, lambda run_id: None)
    # Its ServerApp takes the claim over; another run's ServerApp is refused.
    served, _ = adopt_for_serverapp(out, 12)
    assert present(read_claim(out)).role == "serverapp" and present(read_claim(out)).run_id == 12
    with pytest.raises(OutDirInUse, match=r"in use by run 12 \(its ServerApp"):
        adopt_for_serverapp(out, 13, wait_s=0)
    assert not release(out, mine)  # the launch no longer holds it: it gives nothing back
    assert release(out, served) and read_claim(out) is None

    # A claim whose process is gone (a killed ServerApp) is stale: the next launch takes it over.
    dead = _holder_process(out, 21, release_it=True)
    dead.wait()
    again, stale = claim_for_launch(out, lambda run_id: pytest.fail("a ServerApp's own claim needs no question"))
    assert stale is not None and stale.run_id == 21 and again.role == "launch"
    release(out, again)
    # A `launch` that exited before its ServerApp took over: Flower says whether the run lives.
    left = set_run_id(out, claim_for_launch(out, lambda run_id: None)[0], 30)
    gone = left.model_copy(update={"pid": dead.pid, "started": "1"})  # as if written by a launch since gone
    (out / CLAIM_FILE).write_text(gone.model_dump_json())
    with pytest.raises(OutDirInUse, match="run 30"):
        claim_for_launch(out, lambda run_id: True)  # still running
    with pytest.raises(OutDirInUse, match="run 30"):
        claim_for_launch(out, lambda run_id: None)  # the SuperLink does not answer: not taken
    assert present(claim_for_launch(out, lambda run_id: False)[1]).run_id == 30  # finished: taken over
    # A claim file that does not parse is refused, naming it.
    (out / CLAIM_FILE).write_text("{not json")
    with pytest.raises(OutDirInUse, match=f"{out / CLAIM_FILE}: not a run claim"):
        claim_for_launch(out, lambda run_id: None)


def test_launch_into_an_out_dir_a_live_run_holds_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    write_connection(paths, f"127.0.0.1:{free_port()}", insecure=False)  # nothing listens there
    out = tmp_path / "run"
    holder = _holder_process(out, 41)
    try:
        rc = coordinator_main(["launch", str(paths.root), "--out-dir", str(out), "--model", "tiny"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"out-dir {out} is in use by run 41 (its ServerApp, pid {holder.pid}" in err[0]
        assert not (paths.server_dir / "run-configs").exists()  # nothing was started
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale claim is taken over (and given back when the launch fails).
    rc = coordinator_main(["launch", str(paths.root), "--out-dir", str(out), "--model", "tiny"])
    captured = capsys.readouterr()
    assert rc == EXIT_UNREACHABLE and "is unreachable" in captured.err
    assert (
        f"was claimed by run 41 (its ServerApp, pid {holder.pid}" in captured.out and "taking it over" in captured.out
    )
    assert read_claim(out) is None


def test_a_serverapp_refuses_an_out_dir_another_live_run_holds_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    theirs = RunOutcome(run_id=41, status="running", rounds=3, rounds_done=1, started_at=1.0)
    write_outcome(out, theirs)
    holder = _holder_process(out, 41)
    try:
        cfg = FederationConfig(out_dir=out, model=load_model_config("tiny"), rounds=2, min_nodes=1)
        with pytest.raises(OutDirInUse, match="in use by run 41"):
            FederationServer(grid=None, cfg=cfg, run_id=42).run()  # type: ignore[arg-type]  # deliberately no grid
        assert read_outcome(out) == theirs  # the other run's outcome stands
        assert not (out / "server.log").exists() and not (out / AUDIT_FILE).exists()
        assert present(read_claim(out)).run_id == 41
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- outcome.json tells the truth (break 4)


def _checkpoints(out: Path, *rounds: int) -> None:
    for rnd in rounds:  # what latest_checkpoint looks for (settle reads the name only)
        step = out / "checkpoints" / f"step-{rnd:08d}"
        step.mkdir(parents=True)
        (step / "checkpoint.json").write_text("{}")


def test_a_running_outcome_whose_serverapp_is_gone_is_settled_as_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    out = tmp_path / "run"
    write_outcome(out, RunOutcome(run_id=5, status="running", rounds=6, rounds_done=0, started_at=1.0))
    _checkpoints(out, 1, 2, 3)
    living = _holder_process(out, 5)
    try:  # its ServerApp still runs: "running" is the truth
        assert present(settle_outcome(out, 5, "x")).status == "running"
    finally:
        living.kill()
        living.wait()
    # Killed outright (no end recorded): interrupted, with the rounds checkpointed and the command.
    assert report_outcome(5, "finished:failed", out, paths) == EXIT_FAILED
    err = capsys.readouterr().err
    command_line = resume_command(paths, out)
    assert command_line == f"python -m server.coordinator resume {paths.root} --out-dir {out}"
    assert "interrupted after 3 of 6 rounds" in err and f"pid {living.pid}, is gone" in err
    assert f"3 round(s) checkpointed: resume with `{command_line}`" in err
    settled = present(read_outcome(out))
    assert (settled.status, settled.rounds_done, settled.resume) == ("interrupted", 3, command_line)
    # Flower saying the run finished is enough when the ServerApp left no claim to judge by.
    other = tmp_path / "old"
    write_outcome(other, RunOutcome(run_id=6, status="running", rounds=2, started_at=1.0))
    assert present(settle_outcome(other, 6)).status == "running"
    assert (
        present(settle_outcome(other, 6, flower_status="finished:stopped"))
        .describe()
        .startswith("interrupted after 0 of 2 rounds (Flower reports it finished:stopped")
    )
    assert "no round was checkpointed: launch it again" in present(read_outcome(other)).describe()
    # Another run's outcome is never rewritten.
    assert present(settle_outcome(out, 99, flower_status="finished:failed")).run_id == 5


def test_a_serverapp_stopped_by_a_signal_records_interrupted_and_gives_the_out_dir_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = FederationConfig(out_dir=out, model=load_model_config("tiny"), rounds=2, min_nodes=1, timeout_s=3600)

    class Stopped:  # a Grid whose first call is where Flower's signal handler raises SystemExit
        def get_node_ids(self) -> list[int]:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        FederationServer(grid=Stopped(), cfg=cfg, run_id=9).run()  # type: ignore[arg-type]
    outcome = present(read_outcome(out))
    assert outcome.status == "interrupted" and "stopped by a signal" in outcome.reason
    assert read_claim(out) is None


# ---------------------------------------------------------------------------- with real processes (slow)

RUN_TIMEOUT = "2400"  # the coordinator's own `--wait --timeout`: only catches a hang
HANG_S = 2500


class Background:
    """A coordinator command (e.g. `launch --wait`) running in a thread."""

    def __init__(self, *args: str, timeout: float = HANG_S) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
        self.thread = threading.Thread(target=self._run, args=(args, timeout), daemon=True)
        self.thread.start()

    def _run(self, args: tuple[str, ...], timeout: float) -> None:
        self.result = run_coordinator(*args, timeout=timeout)

    def join(self, timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive() and self.result is not None, "the coordinator command did not finish"
        return self.result


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(
    federation: FederationPaths, sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """A registered SuperLink behind nginx and the three sites joined to it; the last test here
    replaces the SuperLink (state["superlink"])."""
    tmp = tmp_path_factory.mktemp("served")
    proc, address = start_registered_superlink(federation, out=tmp / "superlink.out")
    state: dict = {"superlink": proc, "address": address, "sites": {}, "tmp": tmp}
    try:
        for name in SITES:
            state["sites"][name] = Process(
                [
                    sys.executable,
                    str(CLIENT),
                    *join_args(federation, sites[name], name, address, tmp / f"state-{name}"),
                ],
                tmp / f"join-{name}.out",
            )
        for site in state["sites"].values():
            assert site.wait_for("joined: SuperNode", 600), site.output()[-3000:]
        yield state
    finally:
        for site in state["sites"].values():
            site.stop()
        state["superlink"].stop()


def launch_args(fed: FederationPaths, out: Path, rounds: int, *extra: str) -> list[str]:
    return [
        "launch",
        str(fed.root),
        "--out-dir",
        str(out),
        "--rounds",
        str(rounds),
        *TINY_RUN,
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        *extra,
    ]


@pytest.mark.slow
def test_two_concurrent_launches_each_get_their_own_out_dir_config_and_audit_chain(
    served: dict, federation: FederationPaths, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    runs = {out: Background(*launch_args(federation, out, 2)) for out in (first, second)}
    # While both run: a third launch into the first out-dir is refused, naming the run there.
    wait_until(
        lambda: (first / "outcome.json").is_file() and (second / "outcome.json").is_file(), HANG_S, "both ServerApps"
    )
    third = run_coordinator(*launch_args(federation, first, 2), timeout=600)
    holder = read_claim(first)
    assert holder is not None and holder.role == "serverapp"
    assert third.returncode == 2, (third.stdout, third.stderr)
    assert (
        f"out-dir {first.resolve()} is in use by run {holder.run_id} (its ServerApp, pid {holder.pid}" in third.stderr
    )
    # nginx in front of the real SuperLink: a traversal is refused by nginx itself (400).
    port = int(served["address"].rsplit(":", 1)[1])
    assert raw_request(federation, port, "POST", "/v1/control/list-runs/../../fleet/get-run")[0] == 400
    assert raw_request(federation, port, "POST", "/v1/control/list-runs")[0] == 403
    assert "list-runs/.." not in served["superlink"].output()  # the SuperLink's access log: it never saw it

    launched = {Path(r.out_dir): r.run_id for r in read_launches(federation)}
    for out, run in runs.items():
        result = run.join()
        assert result.returncode == EXIT_OK, (out, result.stdout, result.stderr)
        run_id = launched[out.resolve()]
        outcome = present(read_outcome(out))
        assert outcome.run_id == run_id and outcome.status == "completed" and outcome.rounds_done == 2
        events, rounds = round_events(out)
        assert [e["run_id"] for e in events if e["event"] == "setup"] == [run_id]
        assert sorted(rounds) == [1, 2] and all(
            s["status"] == "ok" for r in rounds.values() for s in r["sites"].values()
        )
        records = list(read_audit_log(out / AUDIT_FILE))  # one unbroken chain per run
        assert [r["record"] for r in records].count("run") == 1
        assert verify_audit_log(out / AUDIT_FILE) == len(records)
        config = (federation.server_dir / "run-configs" / f"run-{run_id}.toml").read_text()
        assert f'"out-dir" = "{out.resolve()}"' in config
        assert read_claim(out) is None  # given back at the end
    assert len(set(launched[o.resolve()] for o in runs)) == 2


def _pid_of(root: int, needle: str) -> int:
    found = [pid for pid in descendants(root) if needle in command(pid)]
    assert len(found) == 1, (needle, [command(p) for p in descendants(root)])
    return found[0]


# Last here: it replaces the module's SuperLink.
@pytest.mark.slow
def test_nginx_killed_is_restarted_and_the_superlink_killed_stops_all_in_one_line_and_the_run_says_how_to_resume(
    served: dict, federation: FederationPaths, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    rounds = 8
    launch = Background(*launch_args(federation, out, rounds, "--unreachable-grace", "1200"))
    wait_until(lambda: checkpointed_round(out) >= 1, HANG_S, "round 1's checkpoint")
    wrapper = served["superlink"]
    master = _pid_of(wrapper.proc.pid, "nginx: master")
    os.kill(master, signal.SIGTERM)  # the break 4: this stopped everything, silently
    assert wrapper.wait_for("nginx restarted", 600), wrapper.output()[-3000:]
    assert f"nginx (pid {master}) stopped (exit 0); restarting it" in wrapper.output()
    done = checkpointed_round(out)
    wait_until(lambda: checkpointed_round(out) >= done + 1, HANG_S, "a round after nginx came back")
    assert present(read_outcome(out)).status == "running" and wrapper.proc.poll() is None

    link = _pid_of(wrapper.proc.pid, "server.deploy.superlink_main")
    tree = descendants(wrapper.proc.pid)
    assert any("flwr-serverapp" in command(p) for p in tree)
    os.kill(link, signal.SIGKILL)
    assert wrapper.proc.wait(timeout=600) == EXIT_FAILED
    lines = wrapper.output().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, errors
    resume = f"python -m server.coordinator resume {federation.root} --out-dir {out.resolve()}"
    assert errors[0].startswith(f"error: the SuperLink (flower-superlink, pid {link}) stopped (killed by SIGKILL)")
    assert f"interrupted after {checkpointed_round(out)} of {rounds} rounds" in errors[0] and resume in errors[0]
    assert not [p for p in tree if alive(p)], [command(p) for p in tree if alive(p)]
    outcome = present(read_outcome(out))
    assert outcome.status == "interrupted" and outcome.rounds_done == checkpointed_round(out) >= 2
    assert outcome.resume == resume

    # The SuperLink started again (state in memory): it no longer knows the run. `launch --wait`
    # says what the out-dir says, not just "Run ID not found".
    port = served["address"].rsplit(":", 1)[1]
    served["superlink"] = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(federation.root), "--port", port]
        + ["--parent-pid", str(os.getpid())],
        tmp_path / "superlink-again.out",
    )
    assert served["superlink"].wait_for("SuperLink ready", 900), served["superlink"].output()[-3000:]
    result = launch.join()
    assert result.returncode == EXIT_FAILED, (result.stdout, result.stderr)
    assert "knows no run" in result.stderr and f"interrupted after {outcome.rounds_done} of {rounds}" in result.stderr
    assert resume in result.stderr
    # The command it names resumes the run to its end.
    resumed = subprocess.run(
        [*resume.replace("python", sys.executable, 1).split(), "--wait", "--timeout", RUN_TIMEOUT],
        cwd=Path(__file__).parents[1],
        env=env(),
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert resumed.returncode == EXIT_OK, (resumed.stdout, resumed.stderr)
    _, done_rounds = round_events(out)
    assert sorted(done_rounds) == list(range(1, rounds + 1))
