"""The coordinator's side of "only registered sites": the site registry (node id -> site name)
the ServerApp enforces, and the nginx configuration that exposes only the Fleet API. The real
processes (the outsider's replay, a rogue node) are in tests/deploy/test_trust.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import uvicorn
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers.narrowing import present

from healthfm_core.model.config import load_model_config
from healthfm_core.protocol import SiteCapabilities
from server.config import FederationConfig
from server.deploy.door import open_door
from server.deploy.flwr_app import default_run_config
from server.deploy.provision import ProvisionConfig, provision
from server.deploy.proxy import FLEET_ROUTES, UPSTREAM_IDLE_S, nginx_config, write_nginx_config
from server.deploy.registry import (
    RegisteredSite,
    RegistryError,
    SiteRegistry,
    admit,
    name_mismatch,
    read_registry,
    write_registry,
)
from server.roster import Roster


def _registry() -> SiteRegistry:
    return SiteRegistry(
        sites=[
            RegisteredSite(name="hospital", public_key="ecdsa-sha2-nistp384 AAA1", node_id=11),
            RegisteredSite(name="biobank", public_key="ecdsa-sha2-nistp384 AAA2", node_id=22),
        ]
    )


def test_only_registered_nodes_are_admitted_under_their_registered_names() -> None:
    reg = _registry()
    assert admit([33, 22, 11], reg) == ([11, 22], [33])
    assert name_mismatch(11, "hospital", reg) is None
    assert "registered as site 'hospital' but calls itself 'biobank'" in present(name_mismatch(11, "biobank", reg))
    assert "not in the coordinator's registry" in present(name_mismatch(33, "rogue", reg))


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
    # issue 40: a second "sites" would replace the first without a word (the last key wins)
    write_registry(path, reg)
    path.write_text(path.read_text().rstrip().removesuffix("}") + ', "sites": []}')
    with pytest.raises(RegistryError, match=r"registry.json: field sites: duplicated key"):
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
    small = [r for r in FLEET_ROUTES if r != "push-object"]
    assert locations == [f"~ ^/v1/fleet/({'|'.join(small)})$", "= /v1/fleet/push-object", "/"]
    # the route's canonical path, rebuilt by nginx: never the client's raw request target
    assert text.count("proxy_pass") == 2 and "proxy_pass https://superlink/v1/fleet/$1;" in text
    assert "proxy_pass https://superlink/v1/fleet/push-object;" in text
    # ... the one upstream, the loopback SuperLink, with connections kept open for reuse.
    upstream = re.findall(r"upstream superlink \{\s*server (\S+);\s*keepalive \d+;\s*keepalive_timeout (\d+)s;", text)
    assert upstream == [("127.0.0.1:41000", str(UPSTREAM_IDLE_S))]
    assert UPSTREAM_IDLE_S < uvicorn.Config(app=None).timeout_keep_alive  # type: ignore[arg-type]  # no app: its default read only; nginx lets go first
    assert 'proxy_set_header Connection "";' in text
    assert "return 403" in text and "control" not in text.split("location /")[1].split("}")[0]
    assert "listen 0.0.0.0:9093 ssl;" in text and str(paths.superlink_cert) in text and "proxy_ssl_verify on;" in text
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (make setup-system)")
    open_door(paths, None)  # the files nginx.conf includes: the registered keys, push-object's limit
    conf = write_nginx_config(paths, "127.0.0.1", 9093, 41000)
    check = subprocess.run(
        [nginx, "-p", str(paths.server_dir), "-e", str(tmp_path / "err.log"), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


class _Grid:
    """Nodes 11 and 22 (registered) and 33 (not): each answers the capabilities query with `names`."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.sent_to: list[int] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.names)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.sent_to.append(node)
            m.metadata.__dict__["_message_id"] = m.object_id
            caps = SiteCapabilities(site=self.names[node], modalities=["ehr"], subjects={"ehr": 30})
            replies.append(Message(RecordDict({"capabilities": ConfigRecord(caps.to_flat())}), reply_to=m))
        return replies


def test_the_server_asks_only_registered_nodes_and_binds_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as inside a ServerApp run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    write_registry(tmp_path / "registry.json", _registry())
    cfg = FederationConfig(
        out_dir=tmp_path / "run",
        model=load_model_config("tiny"),
        min_nodes=2,
        registry=tmp_path / "registry.json",
        timeout_s=5,
    )
    # Node 22 is registered as biobank but claims to be the hospital; 33 is not registered.
    grid = _Grid({11: "hospital", 22: "hospital", 33: "rogue"})
    roster = Roster(grid, cfg)  # type: ignore[arg-type]  # a stand-in Grid
    nodes = roster.wait_for_nodes()
    assert nodes == [11, 22] and roster.refused_nodes == {33}
    roster.query_capabilities(nodes)
    assert 33 not in grid.sent_to  # the unregistered node was asked nothing
    assert {n: c.site for n, c in roster.sites.items()} == {11: "hospital"}  # 22's false name refused
    assert roster.site(22) == "biobank" and roster.site(33) == "node-33"
    # Without a registry (simulation) every node takes part.
    assert Roster(grid, cfg.model_copy(update={"registry": None})).wait_for_nodes() == [11, 22, 33]  # type: ignore[arg-type]  # a stand-in Grid
