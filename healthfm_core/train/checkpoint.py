"""Training checkpoints: model weights (safetensors), optimizer state (torch), and a small JSON.

Layout of one checkpoint directory:

    model.safetensors   every parameter and buffer of the model
    optimizer.pt        AdamW state, keyed by parameter position (names are in the JSON)
    checkpoint.json     step, config, data position, RNG states (base64), extra metadata and
                        the sha256 of each file above

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
never leaves a half-written checkpoint under the final name. Loading verifies every hash first
and refuses a file that does not match.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_model, save_model

from healthfm_core.files import sha256_file as sha256_file  # re-exported: its importers' old home
from healthfm_core.strict_files import strict_model
from healthfm_core.train.checkpoint_dirs import META_FILE
from healthfm_core.train.checkpoint_dirs import STEP_DIR as _STEP_DIR
from healthfm_core.train.checkpoint_dirs import checkpoint_name as checkpoint_name  # re-exported
from healthfm_core.train.checkpoint_dirs import latest_checkpoint as latest_checkpoint  # re-exported

log = logging.getLogger(__name__)

FORMAT = "healthfm-train-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or does not fit the model."""


@dataclass
class TrainState:
    """Everything besides the weights that a run needs to continue exactly where it stopped."""

    step: int  # optimizer steps completed so far (the next step to run)
    param_names: list[str] = field(default_factory=list)  # order of the optimizer's parameters
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    epoch: int = 0  # data position: passes over the loader completed ...
    batch_in_epoch: int = 0  # ... and batches consumed in the current pass
    rng_cpu: torch.Tensor | None = None  # torch.get_rng_state()
    rng_cuda: list[torch.Tensor] | None = None  # torch.cuda.get_rng_state_all()


class _FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    bytes: int


class CheckpointMeta(BaseModel):
    """checkpoint.json, validated on load (it is read from disk)."""

    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    step: int
    config: dict[str, Any]
    param_names: list[str]
    epoch: int
    batch_in_epoch: int
    rng_cpu: str | None
    rng_cuda: list[str] | None
    extra: dict[str, Any]
    files: dict[str, _FileRecord]


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: dict[str, Any]
    state: TrainState
    extra: dict[str, Any]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    state: TrainState,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at `path` atomically (replacing one that exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        # save_model (not save_file) copes with tied weights that share storage.
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(state.optimizer or {}, tmp / OPTIMIZER_FILE)
        files = {
            name: _FileRecord(sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size)
            for name in (MODEL_FILE, OPTIMIZER_FILE)
        }
        meta = CheckpointMeta(
            format=FORMAT,
            version=VERSION,
            step=state.step,
            config=config or {},
            param_names=list(state.param_names),
            epoch=state.epoch,
            batch_in_epoch=state.batch_in_epoch,
            rng_cpu=_b64(state.rng_cpu) if state.rng_cpu is not None else None,
            rng_cuda=[_b64(t) for t in state.rng_cuda] if state.rng_cuda else None,
            extra=extra or {},
            files=files,
        )
        with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
            fh.write(meta.model_dump_json(indent=1))
        for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("checkpoint at step %d written to %s", state.step, path)
    return path


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    """Parse and validate checkpoint.json, and verify the sha256 of every file it lists."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: no checkpoint metadata (is {path} a checkpoint directory?)")
    try:
        meta = strict_model(CheckpointMeta, meta_path.read_text(encoding="utf-8"), meta_path)
    except ValueError as exc:  # ValidationError, UnicodeDecodeError, StrictFileError (a duplicated key)
        raise CheckpointError(f"{meta_path}: invalid checkpoint metadata: {exc}") from exc
    if meta.format != FORMAT or meta.version != VERSION:
        raise CheckpointError(
            f"{meta_path}: field format/version is {meta.format!r}/{meta.version}, expected {FORMAT!r}/{VERSION}"
        )
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if name not in meta.files:
            raise CheckpointError(f"{meta_path}: field files has no entry for {name}")
    for name, rec in meta.files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {META_FILE} but missing")
        digest = sha256_file(f)
        if digest != rec.sha256:
            raise CheckpointError(
                f"{f}: corrupted (sha256 {digest[:16]}... does not match {rec.sha256[:16]}... recorded in {META_FILE})"
            )
    return meta


def load_checkpoint(
    path: str | Path, model: torch.nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Verify and read a checkpoint; if a model is given, load the weights into it (strictly:
    a missing or unexpected key is an error naming it)."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    if model is not None:
        try:
            missing, unexpected = load_model(
                model,
                str(path / MODEL_FILE),
                strict=False,
                device=str(next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"),
            )
        except Exception as exc:  # safetensors raises several types for a bad header or shape
            raise CheckpointError(f"{path / MODEL_FILE}: cannot load into the model: {exc}") from exc
        if missing or unexpected:
            raise CheckpointError(
                f"{path / MODEL_FILE}: does not fit the model (missing keys {sorted(missing)[:5]}, "
                f"unexpected keys {sorted(unexpected)[:5]})"
            )
    try:
        optimizer = torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot read optimizer state: {exc}") from exc
    state = TrainState(
        step=meta.step,
        param_names=meta.param_names,
        optimizer=optimizer or None,
        epoch=meta.epoch,
        batch_in_epoch=meta.batch_in_epoch,
        rng_cpu=_unb64(meta.rng_cpu) if meta.rng_cpu else None,
        rng_cuda=[_unb64(s) for s in meta.rng_cuda] if meta.rng_cuda else None,
    )
    return Checkpoint(path=path, step=meta.step, config=meta.config, state=state, extra=meta.extra)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent step-NNNNNNNN checkpoints under root."""
    root = Path(root)
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
