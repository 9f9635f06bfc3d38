"""`coordinator head` without a SuperLink: the head's run config and its own app bundle, the
registry that decides which nodes take part and under which name, and a launch refused before
anything reaches the SuperLink. The command over real SuperNodes: tests/deploy/test_head_deployed.py."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from helpers.head_grid import KEY, SHA, WEIGHTS, head_config, in_process_grid, site_nodes

from server.config import PrivacyRequest
from server.deploy.bundle import build_bundle
from server.deploy.commands import main as coordinator_main
from server.deploy.flwr_app import write_app, write_head_app
from server.deploy.provision import FederationPaths
from server.deploy.registry import RegisteredSite, SiteRegistry, write_registry
from server.head_app import SUMMARY_FILE, HeadRunConfig, fit_keys


def test_the_head_run_config_round_trips_through_its_own_bundle(tmp_path: Path) -> None:
    """Every key to_run_config writes is declared by the head's app (Flower overrides only
    declared keys) and from_run_config reads the config back; the head's bundle names the head's
    apps and is not the pretraining's (a site approves each apart)."""
    paths = FederationPaths(root=tmp_path)
    paths.server_dir.mkdir(parents=True)
    cfg = HeadRunConfig(
        model=tmp_path / "model", out_dir=tmp_path / "out", tasks=["onset_t2d"], keys=[KEY, "b"], c_grid=[0.1, 1.0],
        rounds=7, privacy=PrivacyRequest(target_epsilon=3.0, delta=1e-6), dp_batch_size=32, setup_sha256=SHA,
        registry=tmp_path / "registry.json",
    )  # fmt: skip
    app = tomllib.loads((write_head_app(paths) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.head_app:app", "clientapp": "client.head_app:app"}
    assert set(app["config"]) == set(cfg.to_run_config())
    assert HeadRunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert HeadRunConfig.from_run_config(app["config"]).setup_sha256 is None  # the defaults: nothing checked
    head_digest = build_bundle(write_head_app(paths))[1]
    assert head_digest == build_bundle(write_head_app(paths))[1]  # the same bytes each time: one approval
    assert head_digest != build_bundle(write_app(paths))[1]
    with pytest.raises(ValueError, match="rounds"):
        HeadRunConfig.from_run_config({**cfg.to_run_config(), "rounds": 0})
    with pytest.raises(ValueError, match="target_epsilon"):
        HeadRunConfig.from_run_config({**cfg.to_run_config(), "privacy-noise-multiplier": 1.0})


@pytest.mark.usefixtures("serverapp_identity")
def test_only_registered_nodes_take_part_under_their_registered_names(tmp_path: Path) -> None:
    """Deployed, the head's ServerApp reads the coordinator's registry: a connected node it does
    not record gets no message; a node calling itself another site than its key's is left out and
    named in heads.json; the others' head is the registry-less head of the same sites."""
    nodes = site_nodes(tmp_path, [None, None, None, None])  # node ids 100..103: site0..site3
    registry = tmp_path / "registry.json"
    write_registry(
        registry,
        SiteRegistry(
            sites=[
                RegisteredSite(name="site0", public_key="k0", node_id=100),
                RegisteredSite(name="site1", public_key="k1", node_id=101),
                RegisteredSite(name="elsewhere", public_key="k2", node_id=102),  # 102 calls itself site2
            ]
        ),
    )  # node 103 (site3) is not registered
    out = tmp_path / "out"
    cfg = head_config(out).model_copy(update={"registry": registry, "run_id": 7})
    fit_keys(in_process_grid(nodes), cfg, SHA, 5, [KEY], WEIGHTS)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["run_id"] == 7
    fitted = summary["heads"][KEY]
    assert set(fitted["train_rows"]) == {"site0", "site1"}
    assert fitted["errors"] == {
        "elsewhere": {
            "stage": "query.head_stats",
            "error": "node 102 is registered as site 'elsewhere' but calls itself 'site2'",
        }
    }
    plain = tmp_path / "plain"
    fit_keys(in_process_grid(nodes[:2]), head_config(plain), SHA, 5, [KEY], WEIGHTS)
    assert (out / "heads" / f"{KEY}.safetensors").read_bytes() == (plain / "heads" / f"{KEY}.safetensors").read_bytes()


def test_head_refuses_a_folder_that_is_not_a_release_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    assert coordinator_main(["provision", str(fed), "--site", "a"]) == 0
    (tmp_path / "model").mkdir()
    argv = ["head", str(fed), "--superlink", "127.0.0.1:1", "--model", str(tmp_path / "model")]
    assert coordinator_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and str(tmp_path / "model") in err
    assert not (tmp_path / "out").exists()
