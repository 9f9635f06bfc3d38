"""One mapping from the federation's settings to a local training run (healthfm_core/train/
local_run.py): a site's round (SiteRuntime.train) and the matched-budget baselines
(simulations/report.py) train with the same optimiser settings and cut the same samples, from the
same federation config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import client.site_runtime as site_runtime
import healthfm_core.train.local_run as local_run
import simulations.report as report
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import TrainConfig
from server.config import FederationConfig
from server.round import round_config
from simulations.run import federation_config
from simulations.synthetic import generate_federation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The federation's settings a local run takes, away from their defaults (the expectation below).
LR, WEIGHT_DECAY, BATCH_SIZE, MAX_EVENTS, MAX_PATCHES = 3e-3, 0.05, 4, 48, 6


def test_a_local_run_takes_the_federation_settings(tmp_path: Path) -> None:
    fed = FederationConfig(
        out_dir=tmp_path,
        model=load_model_config("tiny"),
        local_steps=4,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        batch_size=BATCH_SIZE,
        max_events=MAX_EVENTS,
        max_patches=MAX_PATCHES,
    )
    run = LocalRun.of(fed)
    assert (run.lr, run.weight_decay, run.batch_size, run.max_events, run.max_patches) == (
        LR,
        WEIGHT_DECAY,
        BATCH_SIZE,
        MAX_EVENTS,
        MAX_PATCHES,
    )
    assert run.train_config(4, 7, log_every=4, proximal_mu=0.1) == TrainConfig(
        steps=4,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        batch_size=BATCH_SIZE,
        seed=7,
        progress=False,
        log_every=4,
        proximal_mu=0.1,
    )


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Every TrainConfig the site's and the baselines' training received, and every sample cut
    (PretrainingDataset's arguments), each passed on to the real one."""
    seen: dict[str, list[Any]] = {"train": [], "dataset": []}
    real_dataset = local_run.PretrainingDataset

    def dataset(*args: Any, **kwargs: Any) -> Any:
        seen["dataset"].append(kwargs)
        return real_dataset(*args, **kwargs)

    monkeypatch.setattr(local_run, "PretrainingDataset", dataset)
    for module in (site_runtime, report):
        real_train = module.train_local

        def train(model: Any, loader: Any, cfg: TrainConfig, *args: Any, _real: Any = real_train, **kw: Any) -> Any:
            seen["train"].append(cfg)
            return _real(model, loader, cfg, *args, **kw)

        monkeypatch.setattr(module, "train_local", train)
    return seen


def test_a_site_and_the_baselines_train_with_the_same_settings(tmp_path: Path, recorded) -> None:
    federation = generate_federation(tmp_path / "fed", scenario="tiny", seed=0, n_subjects=30, progress=False)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "run",
            overrides=[
                "model=tiny",
                f"out_dir={tmp_path / 'out'}",
                "federation.local_steps=2",
                f"federation.lr={LR}",
                f"federation.weight_decay={WEIGHT_DECAY}",
                f"federation.batch_size={BATCH_SIZE}",
                f"federation.max_events={MAX_EVENTS}",
                f"federation.max_patches={MAX_PATCHES}",
            ],
        )
    fed = federation_config(cfg, n_sites=len(federation.sites))
    site = federation.sites[0]
    runtime = SiteRuntime(
        SiteConfig.from_node_config({"site-root": str(site.root), "site-name": site.name, "min-code-subjects": 5})
    )
    setup = FederationSetup(
        vocabulary=build_vocabulary([runtime.code_stats()], min_subjects=5), model=fed.model, model_seed=1
    )
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in runtime.groups}

    # A site's round, as the server asks it (server/round.py round_config).
    runtime.train(setup, arrays, round_config(fed, 1, setup))
    # The baselines, from the job's federation group.
    opened = {site.name: open_site(site.root)}
    seqs = {site.name: SiteSequences.from_site(opened[site.name], setup.vocabulary, tokens=setup.tokens)}
    datasets = report.train_datasets(opened, seqs, cfg.federation, 0)
    report.train_baseline(setup, datasets[site.name], 2, cfg.federation, 0, None, False)

    assert len(recorded["train"]) == 2 and len(recorded["dataset"]) == 2  # the site's, the baseline's
    for train in recorded["train"]:
        assert (train.lr, train.weight_decay, train.batch_size) == (LR, WEIGHT_DECAY, BATCH_SIZE)
    for cut in recorded["dataset"]:
        assert (cut["time_mode"], cut["max_events"], cut["max_patches"]) == ("random", MAX_EVENTS, MAX_PATCHES)
    # Both drew their samples from the site's train split.
    site_ids, baseline_ids = (np.sort(np.asarray(cut["subject_ids"])) for cut in recorded["dataset"])
    np.testing.assert_array_equal(site_ids, baseline_ids)
