"""The site's side of "site-approved code": what `client.py approve` shows of a bundle, the
policy's approved_apps, and the app guard's refusal. The guard with real processes (a bundle with
an extra module refused at every site) is in tests/test_trust.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from client.app_guard import REFUSED_PREFIX, refusal_reason
from client.approval import ApprovalError, approve, approved_apps, inspect_bundle, read_bundle
from client.client import main as client_main
from client.policy import PolicyError, load_policy
from server.bundle import build_bundle
from server.flwr_app import write_app
from server.provision import ProvisionConfig, provision


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
    assert approved == frozenset() and "approved_apps" in why
    assert approved_apps(None) == (frozenset(), "the site has no policy file (join --policy)")


def test_the_refusal_names_site_bundle_and_remedy(tmp_path: Path) -> None:
    reason = refusal_reason("hospital", "ab" * 32, tmp_path / "policy.yaml", None)
    assert reason.startswith(f"{REFUSED_PREFIX} hospital: app bundle sha256 {'ab' * 32}")
    assert str(tmp_path / "policy.yaml") in reason and "client.py approve" in reason
