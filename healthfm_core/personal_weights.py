"""A site's personalised weights: the release's model after local steps on the site's own train
split (healthfm_core/train/adapt.py), the step count chosen on its tuning split
(healthfm_core/eval/personal_choice.py). Written by `client.py personalise`, read back by
`client.py embed | probe | predict --personal DIR` on top of the release it came from.

    personal.json          format/version, the site, the base release's setup sha256 and weights
                           sha256 (refused on any other release), the groups adapted, the steps
                           kept and every candidate's mean tuning AUROC (the choice, reported),
                           the training settings, the sha256 of:
    weights.safetensors    the adapted groups' arrays (only those: the other groups are the
                           release's)

It never leaves the site and needs no signature: the base release is verified as always, and the
folder is the site's own output, like a saved head. Its identity (`weights_sha256`, what a head
fitted on it records) is the sha256 of the base weights' sha256 and this weights file's, so a
head fitted on personalised embeddings is refused on the release alone and the other way round.
The folder is written into a temporary sibling and renamed into place (all or nothing).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load_file, save_file

from healthfm_core.files import atomic_folder
from healthfm_core.first_error import first_error
from healthfm_core.release import ModelRelease, ReleaseError
from healthfm_core.strict_files import StrictFileError, strict_model
from healthfm_core.terms.groups import GROUPS, parameter_group
from healthfm_core.train.checkpoint import sha256_file

FORMAT = "healthfm-personal-weights"
VERSION = 1
META_FILE = "personal.json"
WEIGHTS_FILE = "weights.safetensors"
_SHA = r"^[0-9a-f]{64}$"


class PersonalError(ReleaseError):
    """Personalised weights that cannot be used (the message names the file and the field)."""


class PersonalMeta(BaseModel):
    """personal.json (validated when read)."""

    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    site: str = Field(min_length=1)
    base_setup_sha256: str = Field(pattern=_SHA)
    base_weights_sha256: str = Field(pattern=_SHA)
    groups: list[str]
    steps: int = Field(ge=0)  # the local steps kept (0: the release unchanged)
    tuning_auroc: dict[str, float | None]  # steps -> mean tuning AUROC over `tasks` (None: not scored)
    tasks: list[str]
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    seed: int
    arrays_sha256: str = Field(pattern=_SHA)


def personal_sha256(base_weights_sha256: str, arrays_sha256: str) -> str:
    """The personalised model's identity: the base weights and the adapted arrays together."""
    return hashlib.sha256(f"{base_weights_sha256}:{arrays_sha256}".encode()).hexdigest()


def write_personal(
    out: str | Path,
    arrays: Mapping[str, np.ndarray],
    release: ModelRelease,
    meta: Mapping[str, object],
    overwrite: bool = False,
) -> Path:
    """Write the folder `out` (refused when it exists, unless `overwrite`): `arrays` (the adapted
    groups' state_dict entries) checked against the release's model, `meta` the PersonalMeta
    fields other than format, version, base hashes and arrays_sha256."""
    out = Path(out)
    _check_arrays(out / WEIGHTS_FILE, arrays, release)
    if out.exists() and not overwrite:
        raise PersonalError(f"{out}: already exists (choose another --out, or remove it)")
    with atomic_folder(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}, str(tmp / WEIGHTS_FILE))
        doc = PersonalMeta.model_validate(
            {
                **meta,
                "format": FORMAT,
                "version": VERSION,
                "base_setup_sha256": release.setup.sha256,
                "base_weights_sha256": release.weights_sha256,
                "arrays_sha256": sha256_file(tmp / WEIGHTS_FILE),
            }
        )
        (tmp / META_FILE).write_text(doc.model_dump_json(indent=1), encoding="utf-8")
    return out


def read_personal_meta(path: str | Path) -> PersonalMeta:
    file = Path(path) / META_FILE
    if not file.is_file():
        raise PersonalError(f"{file}: missing (not a folder `client.py personalise` wrote)")
    try:
        meta = strict_model(PersonalMeta, file.read_text(encoding="utf-8"), file)
    except StrictFileError as err:
        raise PersonalError(str(err)) from None
    except ValidationError as err:
        raise PersonalError(first_error(err, str(file))) from None
    except UnicodeDecodeError as err:
        raise PersonalError(f"{file}: not UTF-8 text ({err})") from None
    if meta.format != FORMAT or meta.version != VERSION:
        raise PersonalError(
            f"{file}: field format/version is {meta.format!r}/{meta.version}, expected {FORMAT!r}/{VERSION}"
        )
    return meta


def load_personal(path: str | Path, release: ModelRelease) -> ModelRelease:
    """The release with its model's adapted groups replaced by the site's personalised weights
    (the release itself is not changed): refused, naming the file and field, when the folder was
    made from another release, or its weights are damaged or do not fit the model."""
    path = Path(path)
    meta = read_personal_meta(path)
    file = path / META_FILE
    if meta.base_setup_sha256 != release.setup.sha256:
        raise PersonalError(
            f"{file}: field base_setup_sha256 {meta.base_setup_sha256[:16]}... is not release {release.path}'s "
            f"setup ({release.setup.sha256[:16]}...): personalised from another federation's model"
        )
    if meta.base_weights_sha256 != release.weights_sha256:
        raise PersonalError(
            f"{file}: field base_weights_sha256 {meta.base_weights_sha256[:16]}... is not release {release.path}'s "
            f"weights ({release.weights_sha256[:16]}...): personalised from another release"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise PersonalError(f"{weights}: missing")
    if (digest := sha256_file(weights)) != meta.arrays_sha256:
        raise PersonalError(
            f"{file}: field arrays_sha256 {meta.arrays_sha256[:16]}... is not the sha256 of {WEIGHTS_FILE} "
            f"({digest[:16]}...): damaged or edited"
        )
    try:
        arrays = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for a bad header
        raise PersonalError(f"{weights}: unreadable ({err})") from err
    _check_arrays(weights, arrays, release, meta.groups)
    model = copy.deepcopy(release.model)
    with torch.no_grad():
        state = model.state_dict()
        for key, value in arrays.items():
            state[key].copy_(torch.from_numpy(value).to(state[key].dtype))
    model.eval()
    update = {"weights_sha256": personal_sha256(meta.base_weights_sha256, meta.arrays_sha256)}
    return ModelRelease(path=path, meta=release.meta.model_copy(update=update), setup=release.setup, model=model)


def _check_arrays(
    file: Path, arrays: Mapping[str, np.ndarray], release: ModelRelease, groups: list[str] | None = None
) -> None:
    """Every array a key of the release's model in an adapted group, with its shape; every key of
    those groups present."""
    state = release.model.state_dict()
    if unknown := sorted(set(arrays) - set(state)):
        raise PersonalError(f"{file}: key {unknown[0]!r} is not a key of the release's model")
    held = {parameter_group(k) for k in arrays}
    if groups is not None and (bad := sorted(held ^ set(groups))):
        raise PersonalError(f"{file}: groups {sorted(held)} do not match personal.json's field groups {groups} ({bad})")
    if unknown_groups := sorted(held - set(GROUPS)):
        raise PersonalError(f"{file}: unknown group(s) {unknown_groups}")
    if missing := sorted(k for k in state if parameter_group(k) in held and k not in arrays):
        raise PersonalError(f"{file}: key {missing[0]!r} of an adapted group is missing")
    for key, value in arrays.items():
        if tuple(np.asarray(value).shape) != tuple(state[key].shape):
            raise PersonalError(
                f"{file}: key {key!r}: shape {tuple(np.asarray(value).shape)}, the release's model has {tuple(state[key].shape)}"
            )


__all__ = [
    "PersonalError",
    "PersonalMeta",
    "load_personal",
    "personal_sha256",
    "read_personal_meta",
    "write_personal",
]
