"""Deployment: provisioning, `client.py join`, and a real federation on 127.0.0.1.

A real SuperLink (TLS + SuperNode authentication, started with `python -m server.coordinator
superlink`) and real SuperNodes (started with `python client/client.py join`) on free ports of
127.0.0.1. Every process is started in its own session and killed (SIGTERM, then SIGKILL) in the
fixtures' teardown, whatever the test did. The end-to-end test runs three tiny synthetic sites
(a biobank with every modality, a hospital without genomics, a genomics cohort without
wearables) for two rounds, ~2-3 min on 2 cores. The tests that start a SuperLink or time a
real process are marked slow (`make test-slow`); provisioning and the refusals before any
connection run in the default suite. The fixtures and process helpers live in
tests/helpers/deploy_fixtures.py (shared with tests/deploy/test_faults.py).
"""

from __future__ import annotations

import json
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers.deploy_fixtures import (
    CLIENT,
    EXPECTED_GROUPS,
    SITES,
    TINY_RUN,
    Process,
    check_rounds,
    free_port,
    join_args,
    round_events,
    run_client,
    run_coordinator,
    start_registered_superlink,
    start_superlink,
)

from client.deploy.join import EXIT_NO_CONNECTION, EXIT_NOT_REGISTERED, JoinError, probe_superlink
from server.deploy.commands import IN_MEMORY_STATE, CoordinatorError, register_known_sites, superlink_database
from server.deploy.commands import main as coordinator_main
from server.deploy.flwr_app import default_run_config
from server.deploy.provision import (
    FederationPaths,
    ProvisionConfig,
    ProvisionError,
    cert_hostnames,
    load_cert,
    provision,
    verify_chain,
)
from server.deploy.registry import read_registry, registry_path

# ---------------------------------------------------------------------------- provisioning


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    result = provision(
        ProvisionConfig(
            federation_dir=tmp_path / "fed", sites=["north", "south"], hostnames=["fl.example.org", "10.1.2.3"]
        )
    )
    return result.paths


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_private_keys_only_where_they_belong(fed: FederationPaths) -> None:
    private_keys = {
        fed.ca_key,
        fed.superlink_key,
        fed.release_signing_key,
        fed.site("north").private_key,
        fed.site("south").private_key,
    }
    for path in private_keys:
        assert _mode(path) == 0o600, path
    for d in (fed.server_dir, fed.root / "sites", fed.site("north").dir, fed.site("south").dir):
        assert _mode(d) == 0o700, d
    # Whatever holds key material is one of those five files, and nothing else anywhere is.
    holders = {p for p in fed.root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert holders == private_keys
    # A site's directory (what its admin receives) holds its own key, its public key, the CA
    # certificate and the federation's public release key: no server key, no other site's key.
    for name in ("north", "south"):
        site = fed.site(name)
        assert sorted(p.name for p in site.dir.iterdir()) == [
            "auth_key",
            "auth_key.pub",
            "ca.pem",
            "release_signing.pem",
        ]
        assert site.release_key.read_bytes() == fed.release_public_key.read_bytes()
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
    key, public = serialization.load_pem_private_key(fed.superlink_key.read_bytes(), None), cert.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == public.public_numbers()
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


def test_the_superlink_store_is_memory_unless_a_file_is_asked_for(fed: FederationPaths) -> None:
    assert superlink_database(fed, None, None) == IN_MEMORY_STATE
    assert superlink_database(fed, "memory", None) == IN_MEMORY_STATE
    assert superlink_database(fed, "file", None) == str(fed.server_dir / "superlink.db")
    assert superlink_database(fed, "file", "/srv/link.db") == "/srv/link.db"
    assert superlink_database(fed, None, "/srv/link.db") == "/srv/link.db"  # a database path means a file
    with pytest.raises(CoordinatorError, match="--database '/srv/link.db' with --state memory"):
        superlink_database(fed, "memory", "/srv/link.db")
    with pytest.raises(CoordinatorError, match="--state: value 'disk'"):
        superlink_database(fed, "disk", None)


def test_an_unreadable_registry_registers_no_site_and_says_why(
    fed: FederationPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_path(fed).write_text('{"sites": [{"name": "north"', encoding="utf-8")  # cut short
    assert register_known_sites(fed) == 1
    err = capsys.readouterr().err
    assert str(registry_path(fed)) in err and "cannot read the site registry" in err
    assert "no site registered" in err


def test_run_config_declares_every_server_setting() -> None:
    from server.config import FederationConfig

    defaults = default_run_config()
    cfg = FederationConfig.from_run_config({**defaults, "out-dir": "/tmp/x"})
    assert cfg.server_optimizer is None and cfg.stop_after_round is None and cfg.max_update_norm is None
    assert not cfg.privacy.requested and cfg.privacy == type(cfg.privacy)()
    for name in FederationConfig.model_fields:
        # Nested configs travel as prefixed keys (server-optimizer-*, privacy-*).
        assert name.replace("_", "-") in defaults or any(k.startswith(name.replace("_", "-") + "-") for k in defaults)


# ---------------------------------------------------------------------------- a real federation


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
        result = run_client(
            "join",
            str(root),
            "--superlink",
            f"127.0.0.1:{port}",
            "--root-cert",
            str(tmp_path / "x"),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-progress",
        )
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
    result = run_client(
        "join",
        str(sites["hospital"]),
        "--superlink",
        f"127.0.0.1:{free_port()}",
        "--root-cert",
        str(tmp_path / "absent.pem"),
        "--insecure",
        "--policy",
        str(policy),
        "--state-dir",
        str(tmp_path / "state"),
        "--no-progress",
    )
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(policy) in errors[0] and "epsilon_cap" in errors[0]
    assert "cannot reach" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_join_with_the_wrong_certificate_is_refused(superlink: str, sites: dict[str, Path], tmp_path: Path) -> None:
    other = provision(ProvisionConfig(federation_dir=tmp_path / "other", sites=["hospital"])).paths
    result = run_client(*join_args(other, sites["hospital"], "hospital", superlink, tmp_path / "s"))
    assert result.returncode == EXIT_NO_CONNECTION
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "does not verify against --root-cert" in err[0], result.stderr


@pytest.mark.slow
def test_a_node_with_an_unregistered_key_cannot_join(
    superlink: str, federation: FederationPaths, sites: dict[str, Path], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    result = run_client(*join_args(federation, sites["hospital"], "intruder", superlink, tmp_path / "s"), timeout=180)
    assert result.returncode == EXIT_NOT_REGISTERED, result.stdout + result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "refused this site's key" in err[0] and "not registered" in err[0], result.stderr
    assert "joined:" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert time.monotonic() - t0 < 120
    # The door refused the key before the SuperLink saw it: nginx's answer, in Flower's error shape
    # with the code Flower gives an unknown key's activation (2004), in the SuperNode's log.
    log = (tmp_path / "s" / "supernode.log").read_text()
    assert "2004" in log and "this SuperNode key is not registered with the federation" in log


@pytest.mark.slow
def test_a_restarted_superlink_registers_the_registry_again_and_admits_those_sites_only(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    fed = FederationPaths(root=tmp_path / "fed")
    assert (
        coordinator_main(["provision", str(fed.root), *[a for s in (*SITES, "intruder") for a in ("--site", s)]]) == 0
    )
    link, _ = start_registered_superlink(fed)  # the default store, memory; registers every site but intruder
    link.stop()
    before = read_registry(registry_path(fed))
    link, address = start_superlink(fed, out=tmp_path / "again.out")  # no `register` this time
    site = None
    try:
        assert f"registering the {len(SITES)} site(s)" in link.output(), link.output()[-3000:]
        after = read_registry(registry_path(fed))
        assert [s.name for s in after.sites] == sorted(SITES)
        assert {s.name: s.public_key for s in after.sites} == {s.name: s.public_key for s in before.sites}
        # A new store, new node ids: the registry records the ones this SuperLink gave.
        assert {s.node_id for s in after.sites}.isdisjoint({s.node_id for s in before.sites})
        site = Process(
            [sys.executable, str(CLIENT), *join_args(fed, sites["hospital"], "hospital", address, tmp_path / "h")],
            tmp_path / "h.out",
        )
        assert site.wait_for("joined: SuperNode", 300), site.output()[-3000:]
        hospital = after.get("hospital")
        assert hospital is not None and f"joined: SuperNode {hospital.node_id} " in site.output()
        refused = run_client(*join_args(fed, sites["hospital"], "intruder", address, tmp_path / "i"), timeout=180)
        assert refused.returncode == EXIT_NOT_REGISTERED, refused.stdout + refused.stderr
        assert "joined:" not in refused.stdout
    finally:
        if site is not None:
            site.stop()
        link.stop()


@pytest.mark.slow
def test_end_to_end_three_sites_two_rounds(
    joined: dict[str, Process], federation: FederationPaths, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run_coordinator(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "2",
        *TINY_RUN,
        "--wait",
        "--timeout",
        "1500",
        timeout=1800,
    )
    assert result.returncode == 0, (result.stdout, result.stderr, {n: p.output()[-2000:] for n, p in joined.items()})
    assert "finished:completed" in result.stdout
    events, rounds = round_events(out)
    setup = next(e for e in events if e["event"] == "setup")
    assert set(setup["sites"]["hospital"]["modalities"]) == {"ehr", "wearables"}
    assert set(setup["sites"]["genomics"]["modalities"]) == {"ehr", "genomics"}
    assert set(setup["sites"]["biobank"]["modalities"]) == {"ehr", "wearables", "genomics"}
    check_rounds(rounds, [1, 2])
    # Genomics parameters came only from the sites that have genomics, wearables likewise.
    for event in rounds.values():
        holders = {
            g: {s for s, e in event["sites"].items() if g in e["groups_received"]} for g in EXPECTED_GROUPS["biobank"]
        }
        assert holders["genomics"] <= {"biobank", "genomics"} and holders["wearables"] <= {"biobank", "hospital"}
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    assert any(e["event"] == "evaluate" for e in events)
    # The SuperNodes are still connected after the run (they wait for the next one).
    assert all(p.proc.poll() is None for p in joined.values())


# The stopped-and-resumed run (identical weights to an uninterrupted one) and the other fault
# tests with real processes are in tests/deploy/test_faults.py.
