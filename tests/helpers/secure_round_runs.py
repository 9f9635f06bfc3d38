"""The secure round's four sites of different modality mixes, and how its tests run and read a round
(tests/federation/test_secure_round.py in this process, tests/federation/test_site_floors.py, and deployed:
tests/deploy/test_secure_deployment.py, tests/deploy/test_secure_dropout_deployed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from healthfm_core.model.healthfm import init_model
from healthfm_core.terms.groups import parameter_group
from helpers.in_process_grid import InProcessGrid, set_serverapp_identity
from helpers.run_configs import three_site_config as federation_config
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.config import FederationConfig
from server.runlog import read_events
from server.server_app import FederationServer
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]


# Four sites, four modality mixes: genomics is held by two of them (withheld at min_holders 3),
# wearables by three (unmasked).
MODALITIES = {
    "biobank": {"ehr": 1.0, "wearables": 1.0, "genomics": 1.0},
    "hospital": {"ehr": 1.0, "wearables": 1.0},
    "genomics": {"ehr": 1.0, "genomics": 1.0},
    "clinic": {"ehr": 1.0, "wearables": 1.0},
}


def four_site_scenario() -> dict[str, Any]:
    scenario = yaml.safe_load((REPO / "configs" / "scenario" / "tiny.yaml").read_text())
    hospital = next(s for s in scenario["sites"] if s["name"] == "hospital")
    scenario["sites"].append({**hospital, "name": "clinic", "date_offset_years": 0})
    for site in scenario["sites"]:
        site["modalities"] = MODALITIES[site["name"]]
    scenario["name"] = "tiny-four-mixes"
    return scenario


def fed_config(out: Path, **overrides: Any) -> FederationConfig:
    """test_federation's run (tiny, 2 steps x 8, seed 3), one round, no server optimiser (its first
    step is about lr x sign(average): it would magnify the quantisation error it is compared by)."""
    base: dict[str, Any] = dict(rounds=1, min_nodes=4, eval_tasks=[], timeout_s=60, server_optimizer=None)
    return federation_config(out, **{**base, **overrides})


def final_arrays(out: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The run's global arrays after its last round, and the initial ones (from its setup)."""
    path = latest_server_checkpoint(out / "checkpoints")
    assert path is not None
    state = load_server_checkpoint(path)
    initial = {k: v.numpy() for k, v in init_model(state.setup).state_dict().items()}
    return state.arrays, initial


class DroppingGrid(InProcessGrid):
    """InProcessGrid where the named sites' replies to one message type never arrive (the site
    died after receiving it)."""

    def __init__(self, node_configs: dict[int, dict], drop: dict[str, set[str]]) -> None:
        super().__init__(node_configs)
        self.drop = drop

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:  # noqa: ANN001
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        gone = {
            n
            for n, c in self.node_configs.items()
            if c["site-name"] in self.drop.get(messages[0].metadata.message_type, set())
        }
        return [r for r in replies if r.metadata.src_node_id not in gone]


def run(grid: InProcessGrid, out: Path, **overrides: Any) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        set_serverapp_identity(mp)
        FederationServer(grid, fed_config(out, **overrides), run_id=1).run()
    return out


def assert_within_bounds(secure_out: Path, plain_out: Path, groups: list[str]) -> None:
    """The secure run's arrays equal the plain run's within each group's stated bound, and moved."""
    plain, initial = final_arrays(plain_out)
    secure, _ = final_arrays(secure_out)
    bounds = the_round(secure_out)["secure_aggregation"]["error_bounds"]
    assert sorted(bounds) == sorted(groups)
    for group in groups:
        keys = [k for k in initial if parameter_group(k) == group]
        worst = max(float(np.abs(secure[k].astype(np.float64) - plain[k]).max()) for k in keys)
        moved = max(float(np.abs(plain[k].astype(np.float64) - initial[k]).max()) for k in keys)
        # float32 storage of both results adds at most a rounding of each weight (~6e-8 relative)
        assert worst <= bounds[group] + 1e-6, (group, worst, bounds[group])
        assert moved > 20 * bounds[group], (group, moved, bounds[group])  # moved well past the bound


def the_round(out: Path) -> dict[str, Any]:
    [event] = [e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"]
    return event


SITE_NAMES = ("biobank", "hospital", "genomics", "clinic")  # what deploy_fixtures provisions and joins


def four_site_node_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The four sites written to disk, as node configs of the in-process grid (node id -> config)."""
    root = tmp_path_factory.mktemp("secagg-fed")
    manifest = generate_federation(root, four_site_scenario(), seed=0, n_subjects=30, progress=False)
    return {
        100 + i: {"site-root": str(s.root), "site-name": s.name, "min-code-subjects": 5, "min-report-subjects": 2}
        for i, s in enumerate(manifest.sites)
    }


def four_site_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same four sites written to disk, by name (what deploy_fixtures joins)."""
    manifest = generate_federation(
        tmp_path_factory.mktemp("data"), four_site_scenario(), seed=0, n_subjects=30, progress=False
    )
    roots = {s.name: Path(s.root) for s in manifest.sites}
    assert set(roots) == set(SITE_NAMES)
    return roots
