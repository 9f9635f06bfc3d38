"""The fixture `released_run`: the tiny scenario's two-round run in this process and its signed
release (the release tests and the deployed task head's start from it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from helpers.in_process_grid import InProcessGrid, tiny_nodes
from helpers.run_configs import fed_config
from server.deploy.commands import main as coordinator_main
from server.server_app import FederationServer


@pytest.fixture(scope="module")
def released_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    tmp = tmp_path_factory.mktemp("released")
    _, nodes = tiny_nodes(tmp)
    for node in nodes.values():  # 30-subject sites: a held-out positive is enough (mechanics, not a floor)
        node["min-report-positives"] = 1
    cfg = fed_config(
        tmp / "run",
        local_steps=1,
        batch_size=8,
        max_events=64,
        max_patches=8,
        min_nodes=3,
        vocab_min_subjects=5,
        eval_n_boot=10,
        timeout_s=60,
    )
    mp = pytest.MonkeyPatch()  # what Flower sets in a ServerApp process (module scope: no fixture)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        mp.setattr(TaskIdentity, name, value)
    try:
        FederationServer(InProcessGrid(nodes), cfg, run_id=1).run()
    finally:
        mp.undo()
    model = tmp / "model"
    assert coordinator_main(["provision", str(tmp / "fed")]) == 0  # the federation's release signing key
    assert coordinator_main(["release", str(tmp / "fed"), "--run", str(tmp / "run"), "--out", str(model)]) == 0
    return tmp / "run", nodes, model
