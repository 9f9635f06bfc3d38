"""A task head on a release's embeddings, saved to disk and read back: the fitted probe of
`client.py probe` (healthfm_core/eval/probes.py's LogisticProbe or RidgeProbe) that
`client.py predict` applies to new rows.

    HEAD.json          format/version, the task key, kind (logistic | ridge), the release's setup
                       sha256 and its weights' sha256 (a head is refused on another model, and on
                       another run's weights of the same setup), the regularisation chosen on
                       tuning, the embedding settings (max_events, max_patches), the width, and
                       the sha256 of:
    HEAD.safetensors   mean, scale (the standardisation fitted on train), weight, bias (float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load_file, save_file

from healthfm_core.eval.probes import LogisticProbe, RidgeProbe, Standardizer
from healthfm_core.files import atomic_path, atomic_write_text
from healthfm_core.first_error import first_error
from healthfm_core.strict_files import StrictFileError, strict_model
from healthfm_core.train.checkpoint import sha256_file

FORMAT = "healthfm-task-head"
VERSION = 1
_ARRAYS = ("mean", "scale", "weight", "bias")


class HeadError(ValueError):
    """A head file that cannot be used (the message names the file and field)."""


class HeadMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    task: str
    kind: Literal["logistic", "ridge"]
    setup_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the release's weights.safetensors
    regularisation: float = Field(gt=0)  # C (logistic) or alpha (ridge), chosen on tuning
    max_events: int = Field(gt=0)
    max_patches: int = Field(gt=0)
    width: int = Field(gt=0)
    arrays_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass
class SavedHead:
    meta: HeadMeta
    probe: LogisticProbe | RidgeProbe

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (logistic) or values (ridge) of embeddings x [n, width]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.meta.width:
            raise HeadError(f"head {self.meta.task}: embeddings of shape {x.shape}, expected [n, {self.meta.width}]")
        if isinstance(self.probe, LogisticProbe):
            return self.probe.predict_proba(x)
        return self.probe.predict(x)


def arrays_path(json_path: str | Path) -> Path:
    return Path(json_path).with_suffix(".safetensors")


def save_head(
    path: str | Path,
    task: str,
    probe: LogisticProbe | RidgeProbe,
    setup_sha256: str,
    max_events: int,
    max_patches: int,
    weights_sha256: str,
) -> Path:
    """Write HEAD.json and HEAD.safetensors (`path` is the .json) of a head fitted on the
    embeddings of the release with `setup_sha256` and `weights_sha256`; returns the .json path."""
    path = Path(path)
    arrays = {
        "mean": probe.standardizer.mean,
        "scale": probe.standardizer.scale,
        "weight": probe.weight,
        "bias": np.array([probe.bias]),
    }
    with atomic_path(arrays_path(path)) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(tmp))
    logistic = isinstance(probe, LogisticProbe)
    meta = HeadMeta(
        format=FORMAT,
        version=VERSION,
        task=task,
        kind="logistic" if logistic else "ridge",
        setup_sha256=setup_sha256,
        weights_sha256=weights_sha256,
        regularisation=probe.c if isinstance(probe, LogisticProbe) else probe.alpha,
        max_events=max_events,
        max_patches=max_patches,
        width=len(probe.weight),
        arrays_sha256=sha256_file(arrays_path(path)),
    )
    atomic_write_text(path, meta.model_dump_json(indent=1))
    return path


def load_head(path: str | Path, setup_sha256: str | None = None, weights_sha256: str | None = None) -> SavedHead:
    """Read a saved head; refused (HeadError naming file and field) when damaged, of another
    format, or (with `setup_sha256`, `weights_sha256`) fitted on another model's embeddings: another
    setup, or the same setup's weights of another run or round."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: no such head file (the .json that `client.py probe` wrote)")
    try:
        meta = strict_model(HeadMeta, path.read_text(encoding="utf-8"), path)
    except StrictFileError as err:
        raise HeadError(str(err)) from None
    except ValidationError as err:
        raise HeadError(first_error(err, str(path))) from None
    if meta.format != FORMAT or meta.version != VERSION:
        raise HeadError(
            f"{path}: field format/version is {meta.format!r}/{meta.version}, expected {FORMAT!r}/{VERSION}"
        )
    if setup_sha256 is not None and meta.setup_sha256 != setup_sha256:
        raise HeadError(
            f"{path}: field setup_sha256 {meta.setup_sha256[:16]}...: the head was fitted on another model's "
            f"embeddings than this release's ({setup_sha256[:16]}...)"
        )
    if weights_sha256 is not None and meta.weights_sha256 != weights_sha256:
        raise HeadError(
            f"{path}: field weights_sha256 {meta.weights_sha256[:16]}...: the head was fitted on other weights "
            f"than this release's ({weights_sha256[:16]}...; another run or round of the federation): probe this "
            "release again"
        )
    file = arrays_path(path)
    if not file.is_file():
        raise HeadError(f"{file}: missing (it goes with {path.name})")
    if (digest := sha256_file(file)) != meta.arrays_sha256:
        raise HeadError(f"{file}: sha256 {digest[:16]}... does not match field arrays_sha256 of {path.name}")
    arrays = load_file(str(file))
    if sorted(arrays) != sorted(_ARRAYS) or any(arrays[k].shape != (meta.width,) for k in ("mean", "scale", "weight")):
        raise HeadError(f"{file}: expected arrays {list(_ARRAYS)} of width {meta.width}")
    std = Standardizer(arrays["mean"], arrays["scale"])
    bias = float(arrays["bias"][0])
    probe: LogisticProbe | RidgeProbe
    if meta.kind == "logistic":
        probe = LogisticProbe(std, arrays["weight"], bias, meta.regularisation, float("nan"), float("nan"))
    else:
        probe = RidgeProbe(std, arrays["weight"], bias, meta.regularisation, float("nan"))
    return SavedHead(meta, probe)


__all__ = ["HeadError", "HeadMeta", "SavedHead", "arrays_path", "load_head", "save_head"]
