"""One unit of the evidence job (one scenario, one seed) as it runs, and the job's progress
against its plan: the state the job's stages share (simulations/evidence.py and the stage modules
evidence_dp.py, evidence_personal.py take a UnitRun), in a module of its own so that a stage
module needs nothing of evidence.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import Site
from healthfm_core.protocol import FederationSetup
from simulations.evidence_units import Evidence
from simulations.report import Regimes

log = logging.getLogger("healthfm.simulations.evidence")


class Progress:
    """Logs each stage against the plan: done / total, elapsed, estimated time left."""

    def __init__(self, stages: Sequence[tuple[str, float]]) -> None:
        self.stages = list(stages)
        self.done = 0
        self.start = time.perf_counter()
        self.actual: dict[str, float] = {}
        self.loaded: dict[str, str] = {}  # stage -> the unit file it was loaded from (resume=true)
        self._t = self.start

    def print_plan(self) -> None:
        total = sum(s for _, s in self.stages)
        lines = [f"evidence plan: {len(self.stages)} stages, estimated {total / 60:.1f} min"]
        lines += [f"  {name:<60} ~{sec:7.0f} s" for name, sec in self.stages]
        print("\n".join(lines), flush=True)

    def unit_stages(self, scenario: str, seed: int) -> list[str]:
        return [name for name, _ in self.stages if name.startswith(f"{scenario} seed {seed}: ")]

    def finish(self, name: str, loaded_from: Path | None = None, seconds: float | None = None) -> None:
        """Stage `name` is done; loaded_from: not run but loaded from that unit file (whose
        recorded time, `seconds`, stands for it)."""
        now = time.perf_counter()
        self.actual[name] = now - self._t if seconds is None else seconds
        self._t = now
        self.done += 1
        if loaded_from is not None:
            self.loaded[name] = str(loaded_from)
            log.info("%d/%d %s: loaded from %s", self.done, len(self.stages), name, loaded_from)
            return
        left = sum(s for _, s in self.stages[self.done :])
        width = 30
        bar = "#" * int(width * self.done / max(len(self.stages), 1))
        log.info(
            "[%-*s] %d/%d %s: %.0f s (elapsed %.1f min, ~%.1f min left by the plan)",
            width,
            bar,
            self.done,
            len(self.stages),
            name,
            self.actual[name],
            (now - self.start) / 60,
            left / 60,
        )


@dataclasses.dataclass
class UnitRun:
    """A unit (one scenario, one seed) as it runs: its configs, where it writes, and what its first
    stages built (the sites and their sequences, the federation's setup and model, the baselines)."""

    cfg: DictConfig
    ucfg: DictConfig  # the unit's own config (unit_config)
    scenario: str
    seed: int
    out: Path
    ev_out: Evidence
    progress: Progress
    sites: Mapping[str, Site]
    seqs: Mapping[str, SiteSequences]
    setup: FederationSetup
    fed_model: torch.nn.Module
    regimes: Regimes

    @property
    def name(self) -> str:
        return f"{self.scenario} seed {self.seed}"

    @property
    def show(self) -> bool:
        return bool(self.cfg.progress)

    @property
    def n_boot(self) -> int:
        return int(self.cfg.eval.n_boot_per_run)

    @property
    def fed(self) -> DictConfig:
        return self.ucfg.federation


__all__ = ["Progress", "UnitRun"]
