"""The site's side of "site-approved code": what `client.py approve` shows of a bundle, the
policy's approved_apps, and the app guard's refusal. The guard with real processes (a bundle with
an extra module refused at every site) is in tests/deploy/test_trust.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from flwr.clientapp.client_app import LoadClientAppError
from helpers.narrowing import present

import client.memory as site_memory
from client.client import main as client_main
from client.deploy.app_guard import REFUSED_PREFIX, refusal_reason
from client.deploy.approval import ApprovalError, approve, approved_apps, inspect_bundle, read_bundle
from client.deploy.approved_code import BundleCode, check_loaded_from_bundle, module_files, shipped_names
from client.policy import PolicyError, load_policy
from server.deploy.bundle import build_bundle
from server.deploy.flwr_app import write_app
from server.deploy.provision import ProvisionConfig, provision


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    paths = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["a"])).paths
    fab, _ = build_bundle(write_app(paths))
    path = tmp_path / "app.fab"
    path.write_bytes(fab)
    return path


def test_a_bundle_is_shown_with_its_files_and_components(bundle: Path, tmp_path: Path) -> None:
    info = read_bundle(bundle)
    assert info.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert info.components == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    assert [f.path for f in info.files] == [".info/CONTENT", "pyproject.toml"]
    assert info.python_files() == [] and "WARNING" not in info.describe()
    assert "code       none shipped: its components run this site's installed healthfm" in info.describe()
    # Another build of the same app is the same bundle (what the site approved is what runs).
    assert build_bundle(bundle.parent / "fed" / "server" / "app")[1] == info.sha256
    with pytest.raises(ApprovalError, match="not a Flower app bundle"):
        inspect_bundle(b"PK\x03\x04 not a zip")
    missing = tmp_path / "absent.fab"
    with pytest.raises(ApprovalError, match="absent.fab"):
        read_bundle(missing)


def test_a_bundle_that_ships_code_is_flagged(tmp_path: Path, bundle: Path) -> None:
    app = tmp_path / "evil"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        (bundle.parent / "fed" / "server" / "app" / "pyproject.toml")
        .read_text()
        .replace("client.client_app:app", "extra:app")
    )
    (app / "extra.py").write_text("app = None\n")
    info = inspect_bundle(build_bundle(app)[0])
    assert info.components["clientapp"] == "extra:app" and info.python_files() == ["extra.py"]
    assert "WARNING: the bundle ships its own code (extra.py)" in info.describe()


def test_approve_adds_the_hash_to_the_policy_once(bundle: Path, tmp_path: Path, capsys) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 20\n")
    assert client_main(["approve", str(bundle), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    digest = read_bundle(bundle).sha256
    assert "clientapp  client.client_app:app" in out and f"approved: {digest}" in out
    assert load_policy(policy).approved_apps == [digest] and load_policy(policy).min_subjects == 20
    assert approve(read_bundle(bundle), policy) is False  # already there
    assert yaml.safe_load(policy.read_text())["approved_apps"] == [digest]
    assert approved_apps(policy) == (frozenset({digest}), None)
    # --show changes nothing; a JSON policy stays JSON.
    shown = tmp_path / "shown.yaml"
    assert client_main(["approve", str(bundle), "--policy", str(shown), "--show"]) == 0 and not shown.exists()
    as_json = tmp_path / "policy.json"
    as_json.write_text("{}")
    assert approve(read_bundle(bundle), as_json) and json.loads(as_json.read_text())["approved_apps"] == [digest]


def test_a_broken_policy_is_refused_not_rewritten(bundle: Path, tmp_path: Path, capsys) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("approved_apps: [not-a-hash]\n")
    with pytest.raises(PolicyError, match="approved_apps.*not sha256 digests"):
        load_policy(policy)
    assert client_main(["approve", str(bundle), "--policy", str(policy)]) == 2
    assert "approved_apps" in capsys.readouterr().err
    assert policy.read_text() == "approved_apps: [not-a-hash]\n"
    # The guard approves nothing from a policy it cannot read, and says why.
    approved, why = approved_apps(policy)
    assert approved == frozenset() and "approved_apps" in present(why)
    assert approved_apps(None) == (frozenset(), "the site has no policy file (join --policy)")


def test_the_refusal_names_site_bundle_and_remedy(tmp_path: Path) -> None:
    reason = refusal_reason("hospital", "ab" * 32, tmp_path / "policy.yaml", None)
    assert reason.startswith(f"{REFUSED_PREFIX} hospital: app bundle sha256 {'ab' * 32}")
    assert str(tmp_path / "policy.yaml") in reason and "client.py approve" in reason


def test_a_bundle_is_unpacked_only_from_its_approved_bytes(bundle: Path) -> None:
    fab = bundle.read_bytes()
    with pytest.raises(LoadClientAppError, match=f"hashes to {hashlib.sha256(fab).hexdigest()}, not to its approved"):
        BundleCode(fab, "0" * 64)
    code = BundleCode(fab, hashlib.sha256(fab).hexdigest())
    try:
        # Unpacked (hash-checked by Flower's install) into a directory of the process's own.
        assert (code.app_dir / "pyproject.toml").is_file() and not (code.app_dir / ".info").exists()
        assert shipped_names(code.app_dir) == set() and module_files(code.app_dir) == {}
    finally:
        code.close()
    assert not code.app_dir.exists()


def test_a_bundle_file_the_process_would_not_run_is_refused_by_name(tmp_path: Path) -> None:
    """A warm ClientApp refuses rather than run anything but the bundle's file for one of its
    modules: here `flwr` (imported by every ClientApp process before the app) and `client` (this
    process's, from the site's checkout)."""
    app = tmp_path / "app"
    (app / "flwr").mkdir(parents=True)
    (app / "flwr" / "__init__.py").write_text("# not Flower\n")
    (app / "notes.txt").write_text("no code\n")
    (app / "fresh_module.py").write_text("X = 1\n")  # never imported: nothing to compare
    assert shipped_names(app) == {"flwr", "fresh_module"}
    with pytest.raises(LoadClientAppError, match=r"bundle's file flwr/__init__.py is not what this process runs"):
        check_loaded_from_bundle(app)
    (app / "flwr" / "__init__.py").unlink()
    (app / "flwr").rmdir()
    (app / "client").mkdir()
    # The site's own client/memory.py, one byte changed: still not the file this process runs.
    source = Path(site_memory.__file__).read_bytes()
    (app / "client" / "memory.py").write_bytes(source[:-1] + (b" " if source[-1:] != b" " else b"\n"))
    with pytest.raises(LoadClientAppError, match=r"client/memory.py is not what") as refused:
        check_loaded_from_bundle(app)
    assert f"module client.memory was loaded from {Path(site_memory.__file__).resolve()}" in str(refused.value)
