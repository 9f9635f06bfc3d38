"""Federated simulation on Flower's simulation engine (Ray), composed from core, client and server.

    python -m simulations.run scenario=tiny model=tiny federation.rounds=3
    python -m simulations.run scenario=default model=small federation=fedadam
    python -m simulations.run -m federation.lr=1e-3,3e-3            # a Hydra sweep
    python -m simulations.run ... federation.stop_after_round=2      # stop early ...
    python -m simulations.run ... resume=true                        # ... and continue
    python -m simulations.run site_roots='[/data/a,/data/b]'         # your own MEDS sites
    python -m simulations.run privacy=eps3                           # the server asks for DP
    python -m simulations.run -m privacy=none,eps1,eps3,eps8         # one run per epsilon

Synthetic sites are generated into `data_dir` once and reused while the scenario, seed and
size match. Each site becomes one simulated SuperNode running the same ClientApp a deployed
site runs; the ServerApp is the deployed one too. Outputs (in the Hydra run directory):
rounds.jsonl, server.log, checkpoints/, vocabulary.json, evaluation.json, summary.md,
evaluation_auroc.png, site_loads.json.

Flower 1.41 path used: `flwr.simulation.run_simulation` (the Python API; deprecated in favour of
`flwr run` but the only way to pass per-site node configs and Python-side configs without a FAB).
Virtual nodes get only `partition-id`; the ClientApp maps it to the site's node config.
Ray (simulations/ray_start.py): by default a private local instance, never a cluster discovered
on the machine; to use an existing Ray cluster set `ray.address` (e.g. "auto"): Flower's engine
then runs the sites' ClientApps as actors on that cluster. Ray that cannot start is one line and
exit status 1. Each site's sequences are prepared once per run and shared by the actors through
a temporary cache (healthfm_core/data/sites/site_cache.py).

Privacy (configs/privacy/*.yaml): the server's DP request goes into every round's config. A site
trains under DP only with a DP budget in its own policy, so when DP is asked each simulated site
gets one (out_dir/sites/<site>/policy.yaml: epsilon cap `privacy.site.epsilon_cap`, the asked
delta and clipping norm; its minimum subject count 1, so the node config's minimums stay as they
are) and its own durable ledger (out_dir/sites/<site>/state/), unless `federation.site.policy`
names a policy file of your own. Each run directory is one deployment: its ledgers start empty.
Utility against epsilon, evaluated per site: `python -m simulations.privacy_sweep`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from client.client_app import make_client_app
from healthfm_core.data.sites.site_cache import log_sequence_loads
from healthfm_core.files import atomic_write_text
from healthfm_core.first_error import first_error
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.model_config import model_config_from_dict
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.config import FederationConfig, PrivacyRequest
from server.server_app import make_server_app
from simulations.common import site_root_list, task_entries
from simulations.logs import setup_job_logging
from simulations.overrides import refuse_unknown_overrides, with_task_alias
from simulations.ray_start import RaySettings, RayStartError, start_ray
from simulations.synthetic import synthetic_sites

log = logging.getLogger("healthfm.simulations")

SITE_LOADS_FILE = "site_loads.json"  # per site: times opened and sequences prepared in the run


def run_federation_simulation(
    config: FederationConfig,
    node_configs: Sequence[Mapping[str, Any]],
    num_cpus: int = 2,
    client_num_cpus: float = 1,
    client_num_gpus: float = 0.0,
    ray_address: str | None = None,
    object_store_mb: int = 128,
) -> Path:
    """Run the ServerApp and one simulated SuperNode per node config; returns out_dir.

    Ray is started here first (simulations.ray_start: a private local instance unless
    `ray_address` names a cluster; a failure raises RayStartError before any thread waits).
    Each site's prepared sequences are cached for the run in a temporary directory the sites'
    actors share (healthfm_core.data.sites.site_cache), removed when the run ends."""
    from flwr.simulation import run_simulation

    settings = RaySettings(
        num_cpus=num_cpus,
        client_num_cpus=client_num_cpus,
        client_num_gpus=client_num_gpus,
        address=ray_address,
        object_store_mb=object_store_mb,
    )
    start_ray(settings)
    with tempfile.TemporaryDirectory(prefix="healthfm-sequences-") as cache:
        nodes = [{"sequence-cache": cache, **c} for c in node_configs]
        run_simulation(
            server_app=make_server_app(config),
            client_app=make_client_app(nodes),
            num_supernodes=len(nodes),
            backend_config=settings.backend_config(),
        )
        loads = log_sequence_loads(Path(cache))
    # The evidence that each site was opened and prepared once in this run (by any of the actors).
    atomic_write_text(
        Path(config.out_dir) / SITE_LOADS_FILE,
        json.dumps({site: dict(counts) for site, counts in sorted(loads.items())}, indent=1),
    )
    return Path(config.out_dir)


def privacy_request(cfg: DictConfig) -> PrivacyRequest:
    """The server's DP request from the `privacy` group (absent: no DP asked)."""
    if cfg.get("privacy") is None:
        return PrivacyRequest()
    priv = OmegaConf.to_container(cfg.privacy, resolve=True)
    assert isinstance(priv, dict)
    priv.pop("site", None)  # the simulated sites' side, not the server's
    try:
        return PrivacyRequest.model_validate(priv)
    except ValueError as err:
        raise ValueError(f"invalid privacy config: {err}") from None


def federation_config(cfg: DictConfig, n_sites: int) -> FederationConfig:
    fed = cast(dict[str, Any], OmegaConf.to_container(cfg.federation, resolve=True))
    assert isinstance(fed, dict)
    fed.pop("site", None)
    if (tasks := task_entries(cfg)) is not None:
        fed["eval_tasks"] = tasks  # `tasks=` names the evaluation's tasks (ACES files, site:<name>)
    model = model_config_from_dict(
        cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True)), source="model config"
    )
    try:
        return FederationConfig(
            out_dir=Path(cfg.out_dir),
            model=model,
            seed=cfg.seed,
            resume=cfg.resume,
            min_nodes=n_sites,
            privacy=privacy_request(cfg),
            **fed,
        )
    except ValidationError as err:  # e.g. federation.token_window_days -1.0
        raise ValueError(first_error(err, "invalid federation config")) from None


def simulated_site_policy(cfg: DictConfig, request: PrivacyRequest) -> dict[str, Any] | None:
    """The policy a simulated site gets when the server asks for DP (None: DP not asked).

    Only the DP budget: its epsilon cap (`privacy.site.epsilon_cap`, default the asked target),
    the asked delta and clipping norm, DP not mandatory; its minimum subject count is 1 so the
    node config's own minimums hold unchanged (a policy's minimum only raises them)."""
    if not request.requested:
        return None
    site = cfg.privacy.get("site") or {}
    cap = site.get("epsilon_cap") or request.target_epsilon
    if cap is None:
        raise ValueError(
            "privacy.noise_multiplier without privacy.site.epsilon_cap: the simulated sites need "
            "an epsilon cap for their policy"
        )
    if request.target_epsilon is not None and cap < request.target_epsilon:
        log.warning(
            "simulated sites' epsilon cap %g is below the asked target %g: they will refuse rounds",
            cap,
            request.target_epsilon,
        )
    return {
        "min_subjects": 1,
        "dp": {
            "mandatory": False,
            "epsilon_cap": float(cap),
            "delta": request.delta,
            "max_grad_norm": request.max_grad_norm,
        },
    }


def site_node_configs(cfg: DictConfig) -> list[dict[str, Any]]:
    """One node config per site: its root, name and the site policy of the config; when the
    server asks for DP, each site's DP policy file and its own ledger directory."""
    if cfg.site_roots:
        roots = [(Path(r).resolve().name, Path(r)) for r in site_root_list(cfg.site_roots)]
    else:
        scenario = cast(dict[str, Any], OmegaConf.to_container(cfg.scenario, resolve=True))
        manifest = synthetic_sites(cfg.data_dir, scenario, cfg.seed, cfg.n_subjects)
        roots = [(s.name, Path(s.root)) for s in manifest.sites]
    policy = cast(dict[str, Any], OmegaConf.to_container(cfg.federation.site, resolve=True))
    assert isinstance(policy, dict)
    configs = [
        {"site-root": str(root), "site-name": name, **{k.replace("_", "-"): v for k, v in policy.items()}}
        for name, root in roots
    ]
    configs = _with_eval_dirs(cfg, configs)
    dp_policy = simulated_site_policy(cfg, privacy_request(cfg))
    if dp_policy is None:
        return configs
    for node in configs:
        site_dir = Path(cfg.out_dir) / "sites" / node["site-name"]
        if node.get("policy") is None:
            node["policy"] = str(site_dir / "policy.yaml")
            atomic_write_text(Path(node["policy"]), yaml.safe_dump(dp_policy, sort_keys=False))
        # One ledger per site: a shared state_dir gets a subdirectory per site.
        base = node.get("state-dir")
        node["state-dir"] = str(Path(base) / node["site-name"] if base else site_dir / "state")
    return configs


def _with_eval_dirs(cfg: DictConfig, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each simulated site writes its predictions (meds-evaluation format) under
    out_dir/sites/<site>/evaluation unless its node config says where."""
    for node in configs:
        node.setdefault("eval-dir", str(Path(cfg.out_dir) / "sites" / node["site-name"] / "evaluation"))
    return configs


def ray_arguments(cfg: DictConfig) -> dict[str, Any]:
    """run_federation_simulation's Ray arguments from a job's `ray` group (checked)."""
    raw = OmegaConf.to_container(cfg.ray, resolve=True)
    assert isinstance(raw, dict)
    try:
        settings = RaySettings.model_validate(raw)
    except ValueError as err:
        raise ValueError(f"invalid ray config: {err}") from None
    return {
        "num_cpus": settings.num_cpus,
        "client_num_cpus": settings.client_num_cpus,
        "client_num_gpus": settings.client_num_gpus,
        "ray_address": settings.address,
        "object_store_mb": settings.object_store_mb,
    }


def run_from_config(cfg: DictConfig) -> Path:
    node_configs = site_node_configs(cfg)
    config = federation_config(cfg, len(node_configs))
    out = run_federation_simulation(
        config,
        node_configs,
        **ray_arguments(cfg),
    )
    print(f"\nFederated run written to {out}\n  summary {out / 'summary.md'}\n  log     {out / 'rounds.jsonl'}")
    return out


def run_federation(cfg: DictConfig, fed_dir: Path) -> tuple[FederationSetup, HealthFM, int]:
    """A fresh federation of `cfg` into fed_dir (the comparison report's and the privacy sweep's
    runs); returns its setup, the final global model and its round."""
    run_cfg = cast(DictConfig, OmegaConf.merge(cfg, {"out_dir": str(fed_dir), "resume": False}))
    node_configs = site_node_configs(run_cfg)
    run_federation_simulation(
        federation_config(run_cfg, len(node_configs)),
        node_configs,
        **ray_arguments(cfg),
    )
    return final_model(fed_dir)


def final_model(fed_dir: Path) -> tuple[FederationSetup, HealthFM, int]:
    """The setup, the global model and the round of the last server checkpoint in fed_dir."""
    ckpt = latest_server_checkpoint(fed_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(
            f"the federation wrote no checkpoint in {fed_dir / 'checkpoints'}; see {fed_dir / 'server.log'}"
        )
    state = load_server_checkpoint(ckpt)
    model = init_model(state.setup)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.arrays.items()})
    return state.setup, model, state.round


@hydra.main(config_path="../configs", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> None:
    refuse_unknown_overrides("run")
    setup_job_logging(flower_level=logging.INFO)  # keep Flower's per-round log
    try:
        run_from_config(cfg)
    except RayStartError as err:
        sys.exit(f"simulations.run: {err}")  # one line, exit status 1, nothing left waiting


if __name__ == "__main__":
    sys.argv = with_task_alias(sys.argv)
    sys.exit(main())
