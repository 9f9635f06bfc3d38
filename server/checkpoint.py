"""Server checkpoints: everything a federation needs to continue as if it had never stopped.

One checkpoint per completed round, plain arrays and JSON (no model is built to write or read one):

    arrays.safetensors      the global arrays (state_dict keys), bit for bit
    strategy.safetensors    the strategy's state (server-optimiser moments; may be empty)
    checkpoint.json         format/version, the round completed, the run config, the federation
                            setup (vocabulary, model config, init seed), Python's and torch's RNG
                            states, the round's rounds.jsonl event, and the sha256 and size of
                            each file above
    checkpoint.json.sha256  the sha256 of checkpoint.json, so that every byte of the checkpoint is
                            covered by a hash

A checkpoint is written into a temporary sibling directory and renamed into place. Loading
verifies every hash before reading anything; a corrupted, truncated or incomplete checkpoint is
refused with one line naming the file (CheckpointError), never loaded, and never silently
replaced by an older one.

Directories are named step-NNNNNNNN after the round, under OUT_DIR/checkpoints/.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load_file, save_file

from healthfm_core.files import atomic_write_text
from healthfm_core.first_error import first_error
from healthfm_core.protocol import FederationSetup
from healthfm_core.strict_files import strict_model
from healthfm_core.train.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    sha256_file,
)

log = logging.getLogger("healthfm.server")

FORMAT = "healthfm-server-checkpoint"
VERSION = 2  # 1: the training checkpoint format (model.safetensors, optimizer.pt)
ARRAYS_FILE = "arrays.safetensors"
STRATEGY_FILE = "strategy.safetensors"
META_FILE = "checkpoint.json"
META_HASH_FILE = META_FILE + ".sha256"
_DATA_FILES = (ARRAYS_FILE, STRATEGY_FILE)


@dataclass
class ServerState:
    """The server's state after `round` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]  # global arrays, state_dict keys
    strategy: dict[str, np.ndarray]  # ModalityAwareFedAvg.state_dict()
    setup: FederationSetup
    run_config: dict[str, Any]
    python_random: Any = None  # random.getstate(): Flower samples nodes with `random`
    torch_random: torch.Tensor | None = None
    # The round's rounds.jsonl event (JSON values), saved with the arrays: a server killed between
    # its checkpoint and its log line writes the line on resume (server/server_app.py).
    round_event: dict[str, Any] | None = None


class _FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    bytes: int = Field(ge=0)


class ServerCheckpointMeta(BaseModel):
    """checkpoint.json, validated on load (it is read from disk)."""

    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    round: int = Field(ge=0)
    run_config: dict[str, Any]
    setup: FederationSetup
    setup_sha256: str
    python_random: list[Any]
    torch_random: str | None  # base64 of torch.get_rng_state()
    files: dict[str, _FileRecord]
    round_event: dict[str, Any] | None = None


def _random_state_to_json(state: Any) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(data: list) -> Any:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def save_server_checkpoint(root: str | Path, state: ServerState, keep: int = 2) -> Path:
    """Write ROOT/step-<round> atomically and keep the `keep` most recent checkpoints."""
    root = Path(root)
    path = root / checkpoint_name(state.round)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=root))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in state.arrays.items()}, str(tmp / ARRAYS_FILE))
        save_file({k: np.ascontiguousarray(v) for k, v in state.strategy.items()}, str(tmp / STRATEGY_FILE))
        rng = state.torch_random if state.torch_random is not None else torch.get_rng_state()
        meta = ServerCheckpointMeta(
            format=FORMAT,
            version=VERSION,
            round=state.round,
            run_config=state.run_config,
            setup=state.setup,
            setup_sha256=state.setup.sha256,
            python_random=_random_state_to_json(state.python_random or random.getstate()),
            torch_random=base64.b64encode(rng.numpy().tobytes()).decode("ascii"),
            round_event=state.round_event,
            files={
                name: _FileRecord(sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size)
                for name in _DATA_FILES
            },
        )
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=1), encoding="utf-8")
        for name in (*_DATA_FILES, META_FILE):
            _fsync(tmp / name)
        _write_meta_hash(tmp)
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("server checkpoint after round %d written to %s", state.round, path)
    prune_checkpoints(root, keep)
    return path


def _write_meta_hash(path: Path) -> None:
    """checkpoint.json's sha256 beside it, written atomically."""
    atomic_write_text(path / META_HASH_FILE, sha256_file(path / META_FILE) + "\n")


def _verify_meta_hash(path: Path) -> None:
    recorded_path = path / META_HASH_FILE
    if not recorded_path.is_file():
        raise CheckpointError(f"{recorded_path}: missing (the checkpoint is incomplete or was tampered with)")
    recorded = recorded_path.read_text(encoding="ascii", errors="replace").strip()
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path / META_FILE}: missing")
    digest = sha256_file(path / META_FILE)
    if digest != recorded:
        raise CheckpointError(
            f"{path / META_FILE}: corrupted (sha256 {digest[:16]}... does not match "
            f"{recorded[:16]}... recorded in {META_HASH_FILE})"
        )


def _one_line(err: Exception) -> str:
    """The error's message on one line (pydantic's validation errors: the first one, briefly)."""
    cause = err.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        head = str(err).split(":", 1)[0]
        return first_error(cause, f"{head}: invalid checkpoint metadata")
    return " ".join(str(err).split())


def load_server_checkpoint(path: str | Path) -> ServerState:
    """Read and verify a server checkpoint (a step-NNNNNNNN directory). Raises CheckpointError
    with one line naming the offending file when any hash does not match or any part is
    unreadable; nothing is loaded then."""
    path = Path(path)
    try:
        return _load_server_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"refusing checkpoint {path}: {_one_line(err)}") from err
    except (KeyError, TypeError, ValueError) as err:  # valid hashes but content this code cannot use
        raise CheckpointError(
            f"refusing checkpoint {path}: {path / META_FILE}: unusable content "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from err


def _load_server_checkpoint(path: Path) -> ServerState:
    _verify_meta_hash(path)
    meta_path = path / META_FILE
    try:
        meta = strict_model(ServerCheckpointMeta, meta_path.read_text(encoding="utf-8"), meta_path)
    except ValueError as exc:  # ValidationError, UnicodeDecodeError, StrictFileError (a duplicated key)
        raise CheckpointError(f"{meta_path}: invalid checkpoint metadata: {exc}") from exc
    if meta.format != FORMAT or meta.version != VERSION:
        raise CheckpointError(
            f"{meta_path}: field format/version is {meta.format!r}/{meta.version}, expected {FORMAT!r}/{VERSION}"
        )
    if meta.setup.sha256 != meta.setup_sha256:
        raise CheckpointError(f"{meta_path}: field setup does not match field setup_sha256")
    for name in _DATA_FILES:
        record = meta.files.get(name)
        if record is None:
            raise CheckpointError(f"{meta_path}: field files has no entry for {name}")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {META_FILE} but missing")
        digest = sha256_file(file)
        if digest != record.sha256:
            raise CheckpointError(
                f"{file}: corrupted (sha256 {digest[:16]}... does not match "
                f"{record.sha256[:16]}... recorded in {META_FILE})"
            )
    arrays, strategy = (_read_arrays(path / name) for name in _DATA_FILES)
    torch_random = None
    if meta.torch_random is not None:
        torch_random = torch.frombuffer(bytearray(base64.b64decode(meta.torch_random)), dtype=torch.uint8).clone()
    return ServerState(
        round=meta.round,
        arrays=arrays,
        strategy=strategy,
        setup=meta.setup,
        run_config=meta.run_config,
        python_random=_random_state_from_json(meta.python_random),
        torch_random=torch_random,
        round_event=meta.round_event,
    )


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{file}: unreadable arrays ({exc})") from exc


def latest_server_checkpoint(root: str | Path) -> Path | None:
    return latest_checkpoint(root)


__all__ = ["ServerState", "latest_server_checkpoint", "load_server_checkpoint", "save_server_checkpoint"]
