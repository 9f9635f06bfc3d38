"""Deployment: provisioning, `client.py join`, and a real federation on 127.0.0.1.

A real SuperLink (TLS + SuperNode authentication, started with `python -m server.coordinator
superlink`) and real SuperNodes (started with `python client/client.py join`) on free ports of
127.0.0.1. Every process is started in its own session and killed (SIGTERM, then SIGKILL) in the
fixtures' teardown, whatever the test did. The end-to-end test runs three tiny synthetic sites
(a biobank with every modality, a hospital without genomics, a genomics cohort without
wearables) for two rounds, ~2-3 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.join import EXIT_NO_CONNECTION, EXIT_NOT_REGISTERED, probe_superlink, JoinError
from server.coordinator import default_run_config, main as coordinator_main
from server.provision import (
    ProvisionConfig,
    ProvisionError,
    FederationPaths,
    cert_hostnames,
    load_cert,
    provision,
    verify_chain,
)

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "client" / "client.py"
SITES = ("biobank", "hospital", "genomics")
EXPECTED_GROUPS = {
    "biobank": ["ehr", "genomics", "shared", "wearables"],
    "hospital": ["ehr", "shared", "wearables"],  # no genomics
    "genomics": ["ehr", "genomics", "shared"],  # no wearables
}
POLICY = ["--node-config", "min-code-subjects=5", "--node-config", "min-report-subjects=2"]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    e.pop("PYTHONPATH", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A background process in its own session, output to a file, killed with its group."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                return text in self.output()
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLIENT), *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def run_coordinator(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.coordinator", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- provisioning


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    result = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north", "south"],
                                       hostnames=["fl.example.org", "10.1.2.3"]))
    return result.paths


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_private_keys_only_where_they_belong(fed: FederationPaths) -> None:
    private_keys = {fed.ca_key, fed.superlink_key, fed.site("north").private_key, fed.site("south").private_key}
    for path in private_keys:
        assert _mode(path) == 0o600, path
    for d in (fed.server_dir, fed.root / "sites", fed.site("north").dir, fed.site("south").dir):
        assert _mode(d) == 0o700, d
    # Whatever holds key material is one of those four files, and nothing else anywhere is.
    holders = {p for p in fed.root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert holders == private_keys
    # A site's directory (what its admin receives) holds its own key, its public key and the CA
    # certificate: no server key, no other site's key.
    for name in ("north", "south"):
        site = fed.site(name)
        assert sorted(p.name for p in site.dir.iterdir()) == ["auth_key", "auth_key.pub", "ca.pem"]
    assert fed.site("north").private_key.read_bytes() != fed.site("south").private_key.read_bytes()
    manifest = json.loads(fed.manifest.read_text())
    assert [s["name"] for s in manifest["sites"]] == ["north", "south"]
    assert "PRIVATE" not in fed.manifest.read_text()


def test_superlink_certificate_chains_to_the_ca_with_the_right_names(fed: FederationPaths) -> None:
    ca, cert = load_cert(fed.ca_cert), load_cert(fed.superlink_cert)
    verify_chain(cert, ca)  # raises on a bad signature or validity
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(cert_hostnames(cert)) == {"127.0.0.1", "localhost", "fl.example.org", "10.1.2.3"}
    # The sites received this very CA, and the SuperLink key belongs to the certificate.
    assert fed.site("north").ca_cert.read_bytes() == fed.ca_cert.read_bytes()
    key = serialization.load_pem_private_key(fed.superlink_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    # A certificate from another CA does not verify against this one.
    other = provision(ProvisionConfig(federation_dir=fed.root.parent / "other")).paths
    with pytest.raises(ProvisionError, match="not issued by the CA"):
        verify_chain(load_cert(other.superlink_cert), ca)


def test_site_keys_are_what_flower_node_authentication_reads(fed: FederationPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    site = fed.site("north")
    private = serialization.load_ssh_private_key(site.private_key.read_bytes(), None)  # flower-supernode's loader
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    public_line = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert site.public_key.read_bytes().strip() == public_line
    assert fed.registered_public_key("north").read_bytes() == site.public_key.read_bytes()
    assert try_load_public_key(fed.registered_public_key("north"))


def test_provision_is_idempotent_and_refuses_to_overwrite_keys(fed: FederationPaths) -> None:
    before = {p: p.read_bytes() for p in fed.root.rglob("*") if p.is_file() and "key" in p.name}
    again = provision(ProvisionConfig(federation_dir=fed.root, sites=["north", "east"]))
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was rewritten"
    assert fed.site("east").private_key.exists() and fed.site("east").ca_cert.read_bytes() == fed.ca_cert.read_bytes()
    assert [s.name for s in again.manifest.sites] == ["north", "south", "east"]

    # A site whose registered public key vanished: its private key is not silently replaced.
    fed.registered_public_key("south").unlink()
    with pytest.raises(ProvisionError, match="--force"):
        provision(ProvisionConfig(federation_dir=fed.root))
    assert fed.site("south").private_key.read_bytes() == before[fed.site("south").private_key]
    # A hostname the SuperLink certificate lacks is refused, not ignored.
    fed.registered_public_key("south").write_bytes(fed.site("south").public_key.read_bytes())
    with pytest.raises(ProvisionError, match="does not cover"):
        provision(ProvisionConfig(federation_dir=fed.root, hostnames=["new.example.org"]))
    # The command line says it in one line, exit 1.
    rc = coordinator_main(["provision", str(fed.root), "--hostname", "new.example.org"])
    assert rc == 1
    # --force replaces keys (new CA, new SuperLink key, new site keys), modes kept.
    provision(ProvisionConfig(federation_dir=fed.root, hostnames=["new.example.org"], force=True))
    assert fed.ca_key.read_bytes() != before[fed.ca_key]
    assert fed.site("north").private_key.read_bytes() != before[fed.site("north").private_key]
    assert _mode(fed.site("north").private_key) == 0o600
    assert "new.example.org" in cert_hostnames(load_cert(fed.superlink_cert))


def test_provision_rejects_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="site name"):
        ProvisionConfig(federation_dir=tmp_path, sites=["../evil"])
    assert coordinator_main(["provision", str(tmp_path / "f"), "--site", "a/b"]) == 2
    assert not (tmp_path / "f").exists()


def test_run_config_declares_every_server_setting() -> None:
    from server.server_app import FederationConfig

    defaults = default_run_config()
    cfg = FederationConfig.from_run_config({**defaults, "out-dir": "/tmp/x"})
    assert cfg.server_optimizer is None and cfg.stop_after_round is None and cfg.max_update_norm is None
    for name in FederationConfig.model_fields:
        assert name.replace("_", "-") in defaults or name == "server_optimizer"


# ---------------------------------------------------------------------------- a real federation


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from healthfm_core.data.synthetic import generate_federation

    manifest = generate_federation(tmp_path_factory.mktemp("data"), scenario="tiny", seed=0, n_subjects=30,
                                   progress=False)
    roots = {s.name: Path(s.root) for s in manifest.sites}
    assert set(roots) == set(SITES)
    return roots


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    root = tmp_path_factory.mktemp("deploy") / "fed"
    rc = coordinator_main(["provision", str(root), *[a for s in (*SITES, "intruder") for a in ("--site", s)]])
    assert rc == 0
    return FederationPaths(root=root)


@pytest.fixture(scope="module")
def superlink(federation: FederationPaths) -> Iterator[str]:
    """A SuperLink with TLS and SuperNode authentication on 127.0.0.1; every site but
    `intruder` registered."""
    port = free_port()
    proc = Process([sys.executable, "-m", "server.coordinator", "superlink", str(federation.root), "--port", str(port)],
                   federation.root / "superlink.out")
    try:
        assert proc.wait_for("Uvicorn running on https://127.0.0.1", 90), proc.output()[-3000:]
        address = f"127.0.0.1:{port}"
        probe_superlink(address, federation.ca_cert, timeout=10)
        result = run_coordinator("register", str(federation.root), *[a for s in SITES for a in ("--site", s)],
                                 timeout=180)
        assert result.returncode == 0, result.stderr
        assert [ln for ln in result.stdout.splitlines() if ln.startswith("registered")] == \
            [f"registered {s}" for s in SITES]
        yield address
    finally:
        proc.stop()


def join_args(federation: FederationPaths, site_root: Path, key_site: str, address: str, state: Path) -> list[str]:
    return ["join", str(site_root), "--superlink", address, "--root-cert", str(federation.site(key_site).ca_cert),
            "--auth-key", str(federation.site(key_site).private_key), "--state-dir", str(state), "--no-progress",
            *POLICY]


def test_join_refuses_an_invalid_site_before_connecting(site_tables, write_site, tmp_path: Path) -> None:
    t = site_tables.shards["train/0.parquet"]
    values = t.column("numeric_value").to_pylist()
    values[4] = float("nan")
    site_tables.shards["train/0.parquet"] = t.set_column(3, "numeric_value", pa.array(values, pa.float32()))
    root = write_site(site_tables)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    try:
        result = run_client("join", str(root), "--superlink", f"127.0.0.1:{port}", "--root-cert", str(tmp_path / "x"),
                            "--state-dir", str(tmp_path / "state"), "--no-progress")
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody knocked
    finally:
        listener.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert any("data/train/0.parquet, column numeric_value, row 4" in ln for ln in result.stdout.splitlines())
    assert "not joining" in result.stderr
    assert not (tmp_path / "state").exists()


def test_join_refuses_a_broken_site_policy_before_connecting(sites: dict[str, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("dp:\n  mandatory: true\n")  # no epsilon cap, no delta
    result = run_client("join", str(sites["hospital"]), "--superlink", f"127.0.0.1:{free_port()}", "--root-cert",
                        str(tmp_path / "absent.pem"), "--insecure", "--policy", str(policy),
                        "--state-dir", str(tmp_path / "state"), "--no-progress")
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(policy) in errors[0] and "epsilon_cap" in errors[0]
    assert "cannot reach" not in result.stderr and "Traceback" not in result.stderr


def test_join_to_an_unreachable_server_fails_fast_in_one_line(sites: dict[str, Path], tmp_path: Path) -> None:
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["hospital"])).paths
    t0 = time.monotonic()
    result = run_client(*join_args(fed, sites["hospital"], "hospital", f"127.0.0.1:{free_port()}", tmp_path / "s"))
    assert result.returncode == EXIT_NO_CONNECTION
    assert time.monotonic() - t0 < 60
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach the SuperLink" in err[0] and "connection refused" in err[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    # A server that accepts TCP but never answers TLS: the probe gives up after --connect-timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(JoinError, match="no TLS handshake within 1 s"):
            probe_superlink(f"127.0.0.1:{silent.getsockname()[1]}", fed.ca_cert, timeout=1.0)
        assert time.monotonic() - t0 < 5
    finally:
        for s in [silent, *accepted]:
            s.close()


def test_join_with_the_wrong_certificate_is_refused(superlink: str, sites: dict[str, Path], tmp_path: Path) -> None:
    other = provision(ProvisionConfig(federation_dir=tmp_path / "other", sites=["hospital"])).paths
    result = run_client(*join_args(other, sites["hospital"], "hospital", superlink, tmp_path / "s"))
    assert result.returncode == EXIT_NO_CONNECTION
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "does not verify against --root-cert" in err[0], result.stderr


def test_a_node_with_an_unregistered_key_cannot_join(superlink: str, federation: FederationPaths,
                                                     sites: dict[str, Path], tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = run_client(*join_args(federation, sites["hospital"], "intruder", superlink, tmp_path / "s"), timeout=180)
    assert result.returncode == EXIT_NOT_REGISTERED, result.stdout + result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "refused this site's key" in err[0] and "not registered" in err[0], result.stderr
    assert "joined:" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert time.monotonic() - t0 < 120
    # The SuperLink itself saw the refusal (Flower's error 2004 in the SuperNode's log).
    assert "2004" in (tmp_path / "s" / "supernode.log").read_text()


@pytest.fixture
def joined(superlink: str, federation: FederationPaths, sites: dict[str, Path],
           tmp_path: Path) -> Iterator[dict[str, Process]]:
    """The three sites joined through `client.py join`, each with its own key."""
    procs: dict[str, Process] = {}
    try:
        for name in SITES:
            procs[name] = Process([sys.executable, str(CLIENT), *join_args(federation, sites[name], name, superlink,
                                                                          tmp_path / f"state-{name}")],
                                  tmp_path / f"join-{name}.out")
        for name, proc in procs.items():
            assert proc.wait_for("joined: SuperNode", 120), proc.output()[-3000:]
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def round_events(out: Path) -> tuple[list[dict], dict[int, dict]]:
    events = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines() if ln.strip()]
    return events, {e["round"]: e for e in events if e["event"] == "round"}


TINY_RUN = ["--model", "tiny", "-c", "local-steps=2", "-c", "batch-size=8", "-c", "max-events=64",
            "-c", "max-patches=8", "-c", "min-nodes=3", "-c", "vocab-min-subjects=5",
            "-c", "eval-tasks=onset_hypertension_365d", "-c", "eval-n-boot=10", "-c", "timeout-s=300"]


def check_rounds(rounds: dict[int, dict], expected: list[int]) -> None:
    assert sorted(rounds) == expected
    for rnd, event in rounds.items():
        assert set(event["sites"]) == set(SITES), rnd
        for site, entry in event["sites"].items():
            assert entry["status"] == "ok", (rnd, site, entry)
            assert entry["groups_sent"] == EXPECTED_GROUPS[site], (rnd, site)
            assert set(entry["groups_received"]) <= set(EXPECTED_GROUPS[site]), (rnd, site)
            assert {"ehr", "shared"} <= set(entry["groups_received"]), (rnd, site)
            assert set(entry["num_examples"]) == set(entry["groups_received"])


def test_end_to_end_three_sites_two_rounds(joined: dict[str, Process], federation: FederationPaths,
                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_coordinator("launch", str(federation.root), "--out-dir", str(out), "--rounds", "2", *TINY_RUN,
                             "--wait", "--timeout", "420", timeout=480)
    assert result.returncode == 0, (result.stdout, result.stderr,
                                    {n: p.output()[-2000:] for n, p in joined.items()})
    assert "finished:completed" in result.stdout
    events, rounds = round_events(out)
    setup = next(e for e in events if e["event"] == "setup")
    assert set(setup["sites"]["hospital"]["modalities"]) == {"ehr", "wearables"}
    assert set(setup["sites"]["genomics"]["modalities"]) == {"ehr", "genomics"}
    assert set(setup["sites"]["biobank"]["modalities"]) == {"ehr", "wearables", "genomics"}
    check_rounds(rounds, [1, 2])
    # Genomics parameters came only from the sites that have genomics, wearables likewise.
    for event in rounds.values():
        holders = {g: {s for s, e in event["sites"].items() if g in e["groups_received"]} for g in EXPECTED_GROUPS["biobank"]}
        assert holders["genomics"] <= {"biobank", "genomics"} and holders["wearables"] <= {"biobank", "hospital"}
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    assert any(e["event"] == "evaluate" for e in events)
    # The SuperNodes are still connected after the run (they wait for the next one).
    assert all(p.proc.poll() is None for p in joined.values())


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_checkpoint(joined: dict[str, Process], federation: FederationPaths,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_coordinator("launch", str(federation.root), "--out-dir", str(out), "--rounds", "2", *TINY_RUN,
                            "-c", "stop-after-round=1", "--wait", "--timeout", "420", timeout=480)
    assert first.returncode == 0, first.stderr
    assert sorted(round_events(out)[1]) == [1]
    resumed = run_coordinator("resume", str(federation.root), "--out-dir", str(out), "--wait", "--timeout", "420",
                              timeout=480)
    assert resumed.returncode == 0, resumed.stderr
    events, rounds = round_events(out)
    assert any(e["event"] == "resume" and e["round"] == 1 for e in events)
    check_rounds(rounds, [1, 2])
