"""A model release: one self-contained folder a site or a researcher takes home and loads with
`load_release(DIR)`, without Flower, the server or the run directory.

    release.json          format/version, the run it came from (run id, round), the federation's
                          setup hash, model seed, modalities, token settings, the model's parameter
                          groups and those some site trained (and each untrained one with why),
                          the run's evaluation settings
                          (an EvalConfig: task definitions, max_events, ...), the site minimum
    model_config.json     the ModelConfig
    vocabulary.json       the agreed Vocabulary (codes, normalisers, PRS traits)
    weights.safetensors   the global arrays (state_dict keys) after the run's last round
    MODEL_CARD.md         the model card (server/model_card.py), and the same as data:
    model_card.json
    SHA256SUMS            `sha256  name` of every file above (`sha256sum -c SHA256SUMS` checks it)
    SIGNATURE.json        the federation's Ed25519 signature over the sha256 of every file above and of
                          SHA256SUMS (healthfm_core/release_signing.py); absent from an unsigned release

release.json also records the weights' sha256 and the run id, so a saved head (eval/saved_head.py)
names the exact weights it was fitted on.

The release is written into a temporary sibling folder and renamed into place: a reader sees a
whole release or none. Loading first verifies the signature against the federation's public key the
reader holds (`trusted_keys`: release_signing.pem from a site's startup files, never a key inside
the folder); an unsigned or unverifiable release is refused unless the reader says
`trust_unsigned=True` (a local simulation's release), which is logged as a warning. Then it
verifies every hash before parsing anything, validates each JSON
file with its pydantic model, checks the weights' keys and shapes against the model the config and
vocabulary build, and that the setup rebuilt from the parts has the recorded hash; a damaged or
mismatched release is refused with one line naming the file and the field (ReleaseError). With
`expect` (the runs a site names, healthfm_core/release_binding.py), a validly signed release of
another run is refused too, naming its run and the expected one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load_file, save_file

from healthfm_core.files import atomic_folder
from healthfm_core.first_error import first_error
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import EvalConfig, FederationSetup
from healthfm_core.release_binding import ExpectedRun, describe_run
from healthfm_core.release_signing import (
    SIGNATURE_FILE,
    SignatureError,
    TrustedKey,
    load_public_key,
    sign_folder,
    verify_folder,
)
from healthfm_core.strict_files import StrictFileError, strict_model
from healthfm_core.terms.model_config import ModelConfig
from healthfm_core.terms.site_layout import MODALITIES
from healthfm_core.terms.token_settings import TokenSettings
from healthfm_core.terms.vocabulary import Vocabulary
from healthfm_core.train.checkpoint import sha256_file

FORMAT = "healthfm-model-release"
VERSION = 1
RELEASE_FILE = "release.json"
MODEL_CONFIG_FILE = "model_config.json"
VOCABULARY_FILE = "vocabulary.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_MD_FILE = "MODEL_CARD.md"
CARD_JSON_FILE = "model_card.json"
SUMS_FILE = "SHA256SUMS"
RELEASE_FILES = (RELEASE_FILE, MODEL_CONFIG_FILE, VOCABULARY_FILE, WEIGHTS_FILE, CARD_MD_FILE, CARD_JSON_FILE)
GROUPS = ("shared", *MODALITIES)
_M = TypeVar("_M", bound=BaseModel)
log = logging.getLogger("healthfm.release")


class ReleaseError(ValueError):
    """A release that cannot be used: the message names the file and, where known, the field."""


class ReleaseMeta(BaseModel):
    """release.json, validated on load (it is read from disk)."""

    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    run_id: str
    round: int = Field(ge=0)
    setup_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_seed: int
    modalities: list[str]
    tokens: TokenSettings
    groups: list[str]
    groups_trained: list[str]
    # group -> why no round of the run trained it (its weights are the initialisation)
    untrained_groups: dict[str, str] = Field(default_factory=dict)
    min_report_subjects: int = Field(ge=1)  # the card's counts below it are not shown
    evaluation: EvalConfig | None = None  # the run's own evaluation (None: the run evaluated nothing)
    # sha256 of weights.safetensors, filled by write_release ("" in a release made before it was
    # recorded: refused on load). A saved head records it and is refused on other weights.
    weights_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")


@dataclass
class ModelRelease:
    """A verified release: its metadata, the federation setup it rebuilds, and the model (eval mode)."""

    path: Path
    meta: ReleaseMeta
    setup: FederationSetup
    model: HealthFM

    @property
    def vocabulary(self) -> Vocabulary:
        return self.setup.vocabulary

    @property
    def weights_sha256(self) -> str:
        return self.meta.weights_sha256

    def describe_run(self) -> str:
        """Its run, round, setup and weights (what a site checks it expected)."""
        return describe_run(self.meta.run_id, self.meta.round, self.meta.setup_sha256, self.meta.weights_sha256)


def write_release(
    out: str | Path,
    arrays: Mapping[str, np.ndarray],
    setup: FederationSetup,
    meta: ReleaseMeta,
    card_markdown: str,
    card: Mapping[str, Any],
    overwrite: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a release folder at `out` (refused when it exists, unless `overwrite`); the weights
    are checked against the model the setup builds before anything is written. With `signing_key`
    (the federation's, server/deploy/provision.py) the release is signed; without, it is unsigned
    and loads only with trust_unsigned=True."""
    out = Path(out)
    if meta.setup_sha256 != setup.sha256:
        raise ReleaseError(f"release: field setup_sha256 {meta.setup_sha256[:16]}... is not the setup's {setup.sha256}")
    _check_weights(Path(WEIGHTS_FILE), arrays, init_model(setup), setup.vocabulary.vocab_size)
    if out.exists() and not overwrite:
        raise ReleaseError(f"{out}: already exists (choose another --out, or remove it)")
    with atomic_folder(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}, str(tmp / WEIGHTS_FILE))
        meta = meta.model_copy(update={"weights_sha256": sha256_file(tmp / WEIGHTS_FILE)})
        (tmp / RELEASE_FILE).write_text(meta.model_dump_json(indent=1), encoding="utf-8")
        (tmp / MODEL_CONFIG_FILE).write_text(setup.model.model_dump_json(indent=1), encoding="utf-8")
        (tmp / VOCABULARY_FILE).write_text(setup.vocabulary.model_dump_json(indent=1), encoding="utf-8")
        (tmp / CARD_MD_FILE).write_text(card_markdown, encoding="utf-8")
        (tmp / CARD_JSON_FILE).write_text(json.dumps(card, indent=1, sort_keys=True), encoding="utf-8")
        sums = "".join(f"{sha256_file(tmp / name)}  {name}\n" for name in RELEASE_FILES)
        (tmp / SUMS_FILE).write_text(sums, encoding="ascii")
        if signing_key is not None:
            sign_folder(tmp, (*RELEASE_FILES, SUMS_FILE), signing_key)
    return out


def _read_sums(path: Path) -> dict[str, str]:
    sums_path = path / SUMS_FILE
    if not sums_path.is_file():
        raise ReleaseError(f"{sums_path}: missing (not a release folder, or an incomplete one)")
    out: dict[str, str] = {}
    for i, line in enumerate(sums_path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or name not in RELEASE_FILES or name in out:
            raise ReleaseError(f"{sums_path}: line {i} is not `sha256  <a release file>`: {line[:100]!r}")
        out[name] = digest
    return out


def verify_release_files(path: str | Path) -> None:
    """Every release file present, listed in SHA256SUMS and matching its hash; no other file."""
    path = Path(path)
    if not path.is_dir():
        raise ReleaseError(f"{path}: not a folder (a model release is a folder)")
    sums = _read_sums(path)
    for name in RELEASE_FILES:
        file = path / name
        if name not in sums:
            raise ReleaseError(f"{path / SUMS_FILE}: has no entry for {name}")
        if not file.is_file():
            raise ReleaseError(f"{file}: missing (listed in {SUMS_FILE})")
        digest = sha256_file(file)
        if digest != sums[name]:
            raise ReleaseError(
                f"{file}: sha256 {digest[:16]}... does not match {sums[name][:16]}... in {SUMS_FILE} "
                "(damaged or edited)"
            )
    extra = sorted(p.name for p in path.iterdir() if p.name not in (*RELEASE_FILES, SUMS_FILE, SIGNATURE_FILE))
    if extra:
        raise ReleaseError(f"{path}: files not in {SUMS_FILE}: {', '.join(extra[:5])}")


def _validated(file: Path, model: type[_M]) -> _M:
    try:
        return strict_model(model, file.read_text(encoding="utf-8"), file)
    except StrictFileError as err:
        raise ReleaseError(str(err)) from None
    except ValidationError as err:
        raise ReleaseError(first_error(err, str(file))) from None
    except UnicodeDecodeError as err:
        raise ReleaseError(f"{file}: not UTF-8 text ({err})") from None


def _check_weights(file: Path, arrays: Mapping[str, np.ndarray], model: torch.nn.Module, vocab_size: int) -> None:
    """The arrays are exactly the model's state_dict: same keys and shapes (a vocabulary of another
    size than the weights' is named as such)."""
    state = model.state_dict()
    if missing := sorted(set(state) - set(arrays)):
        raise ReleaseError(f"{file}: {len(missing)} key(s) of the model missing, first {missing[0]!r}")
    if unknown := sorted(set(arrays) - set(state)):
        raise ReleaseError(f"{file}: {len(unknown)} key(s) the model does not have, first {unknown[0]!r}")
    for key, value in state.items():
        got, want = tuple(np.asarray(arrays[key]).shape), tuple(value.shape)
        if got == want:
            continue
        if len(got) == len(want) and vocab_size in want:
            dim = want.index(vocab_size)
            if got[dim] != want[dim]:
                raise ReleaseError(
                    f"{file.parent / VOCABULARY_FILE}: field codes gives vocab_size {vocab_size}, but {file.name} "
                    f"key {key!r} was trained with {got[dim]} (shape {got}): vocabulary and weights do not match"
                )
        raise ReleaseError(f"{file}: key {key!r}: shape {got}, the model built from the release expects {want}")


def trusted(keys: Sequence[str | Path | TrustedKey]) -> list[TrustedKey]:
    """Public keys from PEM files (or already loaded); ReleaseError naming a bad file."""
    try:
        return [k if isinstance(k, TrustedKey) else load_public_key(k) for k in keys]
    except SignatureError as err:
        raise ReleaseError(str(err)) from None


def verify_release_signature(
    path: str | Path, trusted_keys: Sequence[str | Path | TrustedKey] = (), trust_unsigned: bool = False
) -> bool:
    """The release's SIGNATURE.json made by one of `trusted_keys` over every file as it is on disk
    (ReleaseError naming the file otherwise); True when verified. With `trust_unsigned` the
    signature is not checked (a warning is logged) and False returned."""
    path = Path(path)
    if trust_unsigned:
        log.warning(
            "release %s loaded WITHOUT verifying its signature (trust_unsigned): nothing shows it is the "
            "federation's model",
            path,
        )
        return False
    if not path.is_dir():
        raise ReleaseError(f"{path}: not a folder (a model release is a folder)")
    try:
        verify_folder(path, (*RELEASE_FILES, SUMS_FILE), trusted(trusted_keys))
    except SignatureError as err:
        raise ReleaseError(str(err)) from None
    return True


def load_release(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    trusted_keys: Sequence[str | Path | TrustedKey] = (),
    trust_unsigned: bool = False,
    expect: Sequence[ExpectedRun] = (),
) -> ModelRelease:
    """Verify and load a release folder: the model with the released weights, in eval mode.
    `trusted_keys`: the federation's public release key(s) (PEM files); the signature must be one
    of theirs, unless `trust_unsigned` (logged as a warning; for a local simulation's release).
    `expect`: runs the release must be (each one named must hold). Raises ReleaseError (one line
    naming the file and field) for an unsigned, damaged or mismatched release, or one of another run."""
    path = Path(path)
    verify_release_signature(path, trusted_keys, trust_unsigned)
    verify_release_files(path)
    meta = _validated(path / RELEASE_FILE, ReleaseMeta)
    if meta.format != FORMAT or meta.version != VERSION:
        raise ReleaseError(
            f"{path / RELEASE_FILE}: field format/version is {meta.format!r}/{meta.version}, expected {FORMAT!r}/{VERSION}"
        )
    for expected in expect:
        if why := expected.mismatch(meta.run_id, meta.setup_sha256):
            run = describe_run(meta.run_id, meta.round, meta.setup_sha256, meta.weights_sha256)
            raise ReleaseError(
                f"{path / RELEASE_FILE}: the release is {run}, but {why}: a release of another run is refused "
                f"(signed by the federation, it is still not the model this site named)"
            )
    if (digest := sha256_file(path / WEIGHTS_FILE)) != meta.weights_sha256:
        raise ReleaseError(
            f"{path / RELEASE_FILE}: field weights_sha256 {meta.weights_sha256[:16] or '(empty)'}... is not the "
            f"sha256 of {WEIGHTS_FILE} ({digest[:16]}...)"
        )
    if unknown := sorted(set(meta.groups_trained) - set(meta.groups)):
        raise ReleaseError(f"{path / RELEASE_FILE}: field groups_trained names groups the model lacks: {unknown}")
    if wrong := sorted(
        (set(meta.untrained_groups) & set(meta.groups_trained)) | (set(meta.untrained_groups) - set(meta.groups))
    ):
        raise ReleaseError(f"{path / RELEASE_FILE}: field untrained_groups: {wrong} are trained, or not the model's")
    model_config = _validated(path / MODEL_CONFIG_FILE, ModelConfig)
    vocabulary = _validated(path / VOCABULARY_FILE, Vocabulary)
    try:
        setup = FederationSetup(
            vocabulary=vocabulary,
            model=model_config,
            model_seed=meta.model_seed,
            modalities=meta.modalities,
            token_window_days=meta.tokens.token_window_days,
            max_codes_per_token=meta.tokens.max_codes_per_token,
        )
    except ValidationError as err:
        raise ReleaseError(first_error(err, str(path / RELEASE_FILE))) from None
    if setup.groups != meta.groups:
        raise ReleaseError(f"{path / RELEASE_FILE}: field groups {meta.groups} is not the model's {setup.groups}")
    try:
        arrays = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises several types for a bad header
        raise ReleaseError(f"{path / WEIGHTS_FILE}: unreadable ({err})") from err
    model = init_model(setup)
    _check_weights(path / WEIGHTS_FILE, arrays, model, vocabulary.vocab_size)
    if setup.sha256 != meta.setup_sha256:
        raise ReleaseError(
            f"{path / RELEASE_FILE}: field setup_sha256 {meta.setup_sha256[:16]}... does not match the setup "
            f"rebuilt from {MODEL_CONFIG_FILE}, {VOCABULARY_FILE} and {RELEASE_FILE} ({setup.sha256[:16]}...)"
        )
    with torch.no_grad():
        state = model.state_dict()
        for key, value in arrays.items():
            state[key].copy_(torch.from_numpy(value).to(state[key].dtype))
    model.eval()
    return ModelRelease(path=path, meta=meta, setup=setup, model=model.to(device))


__all__ = [
    "FORMAT",
    "GROUPS",
    "VERSION",
    "RELEASE_FILES",
    "ModelRelease",
    "ReleaseError",
    "ReleaseMeta",
    "load_release",
    "trusted",
    "verify_release_files",
    "verify_release_signature",
    "write_release",
]
