"""The coordinator's side of "only registered sites": the site registry (node id -> site name)
the ServerApp enforces, and the nginx configuration that exposes only the Fleet API. The real
processes (the outsider's replay, a rogue node) are in tests/test_trust.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from server.config import FederationConfig
from server.flwr_app import default_run_config
from server.provision import ProvisionConfig, provision
from server.proxy import FLEET_ROUTES, nginx_config, write_nginx_config
from server.registry import (
    RegisteredSite,
    RegistryError,
    SiteRegistry,
    admit,
    name_mismatch,
    read_registry,
    write_registry,
)


def _registry() -> SiteRegistry:
    return SiteRegistry(sites=[RegisteredSite(name="hospital", public_key="ecdsa-sha2-nistp384 AAA1", node_id=11),
                               RegisteredSite(name="biobank", public_key="ecdsa-sha2-nistp384 AAA2", node_id=22)])


def test_only_registered_nodes_are_admitted_under_their_registered_names() -> None:
    reg = _registry()
    assert admit([33, 22, 11], reg) == ([11, 22], [33])
    assert name_mismatch(11, "hospital", reg) is None
    assert "registered as site 'hospital' but calls itself 'biobank'" in name_mismatch(11, "biobank", reg)
    assert "not in the coordinator's registry" in name_mismatch(33, "rogue", reg)


def test_the_registry_file_round_trips_and_refuses_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    assert read_registry(path).sites == []  # nothing registered yet
    reg = _registry().with_site(RegisteredSite(name="hospital", public_key="ecdsa-sha2-nistp384 AAA1", node_id=12))
    write_registry(path, reg)
    assert read_registry(path).by_node() == {12: "hospital", 22: "biobank"}
    data = json.loads(path.read_text())
    data["sites"].append({"name": "rogue", "public_key": "k", "node_id": 22})
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=r"registry.json.*node_id \['22'\]"):
        read_registry(path)
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="registry.json"):
        read_registry(path)


def test_the_run_config_carries_the_registry_path() -> None:
    defaults = default_run_config()
    assert defaults["registry"] == ""
    assert FederationConfig.from_run_config({**defaults, "out-dir": "/tmp/x"}).registry is None
    cfg = FederationConfig.from_run_config({**defaults, "out-dir": "/tmp/x", "registry": "/fed/server/registry.json"})
    assert cfg.registry == Path("/fed/server/registry.json")


def test_the_proxy_forwards_only_the_fleet_routes(tmp_path: Path) -> None:
    paths = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["a"])).paths
    text = nginx_config(paths, "0.0.0.0", 9093, 41000)
    locations = re.findall(r"location (.*?) \{", text)
    assert locations == [f"~ ^/v1/fleet/({'|'.join(FLEET_ROUTES)})$", "/"]
    assert text.count("proxy_pass") == 1 and "proxy_pass https://127.0.0.1:41000;" in text
    assert "return 403" in text and "control" not in text.split("location /")[1].split("}")[0]
    assert "listen 0.0.0.0:9093 ssl;" in text and str(paths.superlink_cert) in text and "proxy_ssl_verify on;" in text
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (make setup-system)")
    conf = write_nginx_config(paths, "127.0.0.1", 9093, 41000)
    check = subprocess.run([nginx, "-p", str(paths.server_dir), "-e", str(tmp_path / "err.log"), "-c", str(conf), "-t"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
