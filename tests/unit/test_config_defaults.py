"""One source of the federation's defaults: server/config.py's FederationConfig. The simulations'
Hydra configs (configs/federation/*.yaml over simulations/config_store.py) restate none of them
and load into the same FederationConfig, save each file's deliberate change; the deployed
ServerApp's run config declares the same defaults, the same default task list among them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir

from healthfm_core.terms.model_config import load_model_config
from server.config import DEFAULT_EVAL_TASKS, FederationConfig, PrivacyRequest, ServerOptimizerConfig
from server.deploy.flwr_app import default_run_config
from simulations.config_store import NOT_IN_GROUP
from simulations.run import federation_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Each federation config's deliberate change from FederationConfig's defaults (its file says why).
CHANGES: dict[str, dict[str, Any]] = {
    "default": {},
    "fedadam": {"server_optimizer": ServerOptimizerConfig()},
    "fp16": {"transport": "fp16"},
    "int8": {"transport": "int8"},
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_federation_configs_load_as_the_pydantic_defaults_plus_their_change(name: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("run", overrides=[f"federation={name}", "model=tiny", f"out_dir={tmp_path}"])
    loaded = federation_config(cfg, n_sites=4)
    expected = FederationConfig(
        out_dir=tmp_path,
        model=load_model_config("tiny"),
        seed=cfg.seed,
        resume=cfg.resume,
        min_nodes=4,
        privacy=PrivacyRequest(),
        **CHANGES[name],
    )
    assert loaded.model_dump(mode="json") == expected.model_dump(mode="json")
    # The group holds every FederationConfig field a job may change (federation.<field>=... works)
    # and the sites' policy, nothing else.
    assert set(cfg.federation) == (set(FederationConfig.model_fields) - NOT_IN_GROUP) | {"site"}


def test_the_yaml_files_restate_no_default() -> None:
    fields = set(FederationConfig.model_fields)
    for path in sorted((CONFIGS / "federation").glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text())) - {"defaults"}
        assert not keys & fields - {"transport"}, path  # fp16.yaml and int8.yaml change only transport
        if path.stem not in ("fp16", "int8"):
            assert "transport" not in keys, path


def test_one_default_task_list() -> None:
    assert FederationConfig.model_fields["eval_tasks"].get_default(call_default_factory=True) == [
        "onset_t2d_365d",
        "onset_cad_365d",
        "onset_hypertension_365d",
        "onset_copd_365d",
        "onset_t2d_90d",
        "onset_cad_90d",
        "onset_hypertension_90d",
        "onset_copd_90d",
        "wearable_resting_hr",
    ]
    # The deployed ServerApp declares the same list (a Flower run config is flat: comma-separated).
    assert default_run_config()["eval-tasks"] == ",".join(DEFAULT_EVAL_TASKS)
