"""Server checkpoints: everything a federation needs to continue as if it had never stopped.

One checkpoint per completed round, written with the training checkpoint format of
healthfm_core.train.checkpoint (so atomic, every file with its sha256, verified on load):

    model.safetensors   the global arrays (the model's state_dict after the round)
    optimizer.pt        the strategy's state (server-optimiser moments), {name: tensor}
    checkpoint.json     step = the round completed; config = the run config; extra = the
                        federation setup (vocabulary, model config, init seed), Python's and
                        torch's RNG states and the run's identity
    checkpoint.json.sha256  the sha256 of checkpoint.json (which holds the other files' hashes),
                        so that every byte of the checkpoint is covered by a hash

Loading verifies every hash before reading anything; a corrupted, truncated or incomplete
checkpoint is refused with one line naming the file (CheckpointError), never loaded, and never
silently replaced by an older one.

Directories are named step-NNNNNNNN after the round, under OUT_DIR/checkpoints/.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from healthfm_core.federation import FederationSetup
from healthfm_core.files import atomic_write_text
from healthfm_core.train.checkpoint import (
    META_FILE,
    CheckpointError,
    TrainState,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_meta,
    save_checkpoint,
    sha256_file,
)

log = logging.getLogger("healthfm.server")

KIND = "healthfm-server"
META_HASH_FILE = META_FILE + ".sha256"


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


def _random_state_to_json(state: Any) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(data: list) -> Any:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def save_server_checkpoint(root: str | Path, state: ServerState, keep: int = 2) -> Path:
    """Write ROOT/step-<round> atomically and keep the `keep` most recent checkpoints."""
    model = state.setup.init_model()
    keys = set(model.state_dict())
    if keys != set(state.arrays):
        raise CheckpointError(
            f"global arrays do not fit the model of the setup (missing {sorted(keys - set(state.arrays))[:3]}, "
            f"unexpected {sorted(set(state.arrays) - keys)[:3]})"
        )
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.arrays.items()})
    train_state = TrainState(
        step=state.round,
        optimizer={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.strategy.items()},
        rng_cpu=state.torch_random if state.torch_random is not None else torch.get_rng_state(),
    )
    extra = {
        "kind": KIND,
        "setup": state.setup.model_dump(mode="json"),
        "setup_sha256": state.setup.sha256,
        "python_random": _random_state_to_json(state.python_random or random.getstate()),
    }
    path = save_checkpoint(Path(root) / checkpoint_name(state.round), model, train_state,
                           config=state.run_config, extra=extra)
    _write_meta_hash(path)
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
        raise CheckpointError(f"{path / META_FILE}: corrupted (sha256 {digest[:16]}... does not match "
                              f"{recorded[:16]}... recorded in {META_HASH_FILE})")


def _one_line(err: Exception) -> str:
    """The error's message on one line (pydantic's validation errors: the first one, briefly)."""
    cause = err.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        first = cause.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "the file"
        head = str(err).split(":", 1)[0]
        return f"{head}: invalid checkpoint metadata ({where}: {first.get('msg', 'invalid')})"
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
        raise CheckpointError(f"refusing checkpoint {path}: {path / META_FILE}: unusable content "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err


def _load_server_checkpoint(path: Path) -> ServerState:
    _verify_meta_hash(path)
    meta = read_checkpoint_meta(path)  # verifies every other file's sha256
    if meta.extra.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a server checkpoint (extra.kind is {meta.extra.get('kind')!r})")
    try:
        setup = FederationSetup.model_validate(meta.extra["setup"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: field extra.setup is missing or invalid: {err}") from None
    if setup.sha256 != meta.extra.get("setup_sha256"):
        raise CheckpointError(f"{path}: field extra.setup does not match extra.setup_sha256")
    model = setup.init_model()
    ckpt = load_checkpoint(path, model)
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    strategy = {k: v.numpy().copy() for k, v in (ckpt.state.optimizer or {}).items()}
    return ServerState(
        round=ckpt.step,
        arrays=arrays,
        strategy=strategy,
        setup=setup,
        run_config=ckpt.config,
        python_random=_random_state_from_json(meta.extra["python_random"]),
        torch_random=ckpt.state.rng_cpu,
    )


def latest_server_checkpoint(root: str | Path) -> Path | None:
    return latest_checkpoint(root)


__all__ = ["ServerState", "latest_server_checkpoint", "load_server_checkpoint", "save_server_checkpoint"]
