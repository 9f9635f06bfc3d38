"""The Flower federations of an evidence unit, kept across a stopped job.

One unit of the full preset trains up to 25 federations (the main one, q4's noise draws, q1's
budget curve) and runs for longer than a machine may be held. So each federation the job trains
marks its folder when it has finished:

    <fed_dir>/evidence_federation.json   the federation's config fingerprint (unit_fingerprint of
                                         the config it ran with), its last round, its wall time

With resume=true a unit without its done-marker runs again, but its finished federations are not
trained again: `federation` loads the final global model from the folder's last server checkpoint
(simulations.run.final_model, the same read a fresh run ends with). A federation that stopped
midway has no marker and is trained anew. A marker that cannot be read, that records another
config, or whose checkpoint is not at the recorded round is refused, naming the file and the
field, as a finished unit is (evidence_units).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from healthfm_core.files import atomic_write_text
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.protocol import FederationSetup
from simulations.evidence_units import Marker, UnitFileError, read_marker, refuse_another_config, unit_fingerprint
from simulations.run import final_model, run_federation

log = logging.getLogger("healthfm.simulations.evidence")

FED_DONE = "evidence_federation.json"
FED_FORMAT = 1


class FederationFile(Marker):
    """evidence_federation.json."""

    fingerprint: dict[str, Any]
    round: int
    seconds: float


def read_federation_file(fed_dir: Path) -> FederationFile:
    return read_marker(fed_dir / FED_DONE, FederationFile, "finished-federation file", FED_FORMAT)


def federation(cfg: DictConfig, fed_dir: Path, scenario: str) -> tuple[FederationSetup, HealthFM, int]:
    """The federation of `cfg` in fed_dir: loaded if a finished one of the same config is there,
    else trained (anything a stopped run left in fed_dir removed first) and marked finished."""
    fingerprint = unit_fingerprint(cfg, scenario)
    if (fed_dir / FED_DONE).is_file():
        doc = read_federation_file(fed_dir)
        refuse_another_config(fed_dir / FED_DONE, "federation", doc.fingerprint, fingerprint)
        setup, model, last = final_model(fed_dir)
        if last != doc.round:
            raise UnitFileError(
                f"{fed_dir / FED_DONE}: field round is {doc.round} but the last checkpoint in "
                f"{fed_dir / 'checkpoints'} is of round {last}"
            )
        log.info("%s: finished federation loaded (round %d, trained in %.0f s)", fed_dir, last, doc.seconds)
        return setup, model, last
    if fed_dir.exists():
        shutil.rmtree(fed_dir)  # a federation that stopped midway: the server refuses to write over it
    t0 = time.perf_counter()
    setup, model, last = run_federation(cfg, fed_dir)
    doc = FederationFile(
        format=FED_FORMAT, fingerprint=fingerprint, round=last, seconds=round(time.perf_counter() - t0, 1)
    )
    atomic_write_text(fed_dir / FED_DONE, json.dumps(doc.model_dump(), indent=1))
    return setup, model, last


def clear_unfinished_unit(unit_dir: Path) -> None:
    """Empty a unit that stopped before its end, keeping only its finished federations' folders."""
    if not unit_dir.exists():
        return
    keep = {p.parent for p in unit_dir.rglob(FED_DONE)}

    def clear(folder: Path) -> None:
        for child in folder.iterdir():
            if child in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                if any(k.is_relative_to(child) for k in keep):
                    clear(child)
                else:
                    shutil.rmtree(child)
            else:
                child.unlink()

    clear(unit_dir)


__all__ = ["FED_DONE", "FederationFile", "clear_unfinished_unit", "federation", "read_federation_file"]
