"""What the evidence job's stages share (simulations/evidence.py and the modules of its later
questions): a unit as a stage reads it, the paired items of two methods over the unit's per-site
results (what every question hands to Evidence.add), and pooled training of a model variant at
the unit's budget (q5's kernels, o's objective ablations, r's repeat term)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.sequences.pooled import PooledPretrainingDataset
from healthfm_core.data.sites.site import Site
from healthfm_core.eval import compare
from healthfm_core.eval.paired_comparison import Item
from healthfm_core.eval.runner import EvalSet, paired_items
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.model_config import model_config_from_dict
from simulations.evidence_units import Evidence
from simulations.report import Regimes, train_baseline


class StageLog(Protocol):
    def finish(self, name: str) -> None: ...


class Unit(Protocol):
    """What a stage reads of a running unit (evidence.UnitRun), read-only."""

    @property
    def cfg(self) -> DictConfig: ...
    @property
    def ucfg(self) -> DictConfig: ...
    @property
    def scenario(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def ev_out(self) -> Evidence: ...
    @property
    def progress(self) -> StageLog: ...
    @property
    def sites(self) -> Mapping[str, Site]: ...
    @property
    def setup(self) -> FederationSetup: ...
    @property
    def fed_model(self) -> torch.nn.Module: ...
    @property
    def regimes(self) -> Regimes: ...
    @property
    def name(self) -> str: ...
    @property
    def show(self) -> bool: ...
    @property
    def n_boot(self) -> int: ...
    @property
    def fed(self) -> DictConfig: ...


def site_items(
    per_site_data: Mapping[str, EvalSet],
    per_site: compare.PerSite,
    a: str,
    b: str,
    keep: Callable[[str], bool] = lambda key: True,
    sites: Sequence[str] | None = None,
) -> list[Item]:
    """Paired items of methods a and b over the sites' held-out rows (subject keys "site/id")."""
    out: list[Item] = []
    for name in sites or per_site_data:
        res = per_site.get(name, {})
        if a in res and b in res:
            data = per_site_data[name]
            out += paired_items(data, res[a], res[b], [k for k in data.tasks if keep(k)])
    return out


def pooled_variant(
    setup: FederationSetup, regimes: Regimes, fed: DictConfig, seed: int, show: bool, change: Any, source: str
) -> torch.nn.Module:
    """Pooled training at the pooled model's budget (same initial weights, loader seed, optimiser
    and steps) with `change` merged into the model config (`source` names it in errors)."""
    changes = cast(dict[str, Any], OmegaConf.to_container(change, resolve=True))
    vcfg = model_config_from_dict(_merged(setup.model.model_dump(), changes), source=source)
    model, _ = train_baseline(
        setup.model_copy(update={"model": vcfg}),
        PooledPretrainingDataset(list(regimes.datasets.values())),
        regimes.central_steps,
        fed,
        seed,
        None,
        show,
    )
    return model


def _merged(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """base with change merged in, nested mappings key by key (a change of one curriculum field
    keeps the others)."""
    out = dict(base)
    for k, v in change.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = ["StageLog", "Unit", "pooled_variant", "site_items"]
