"""A release's signature: the federation's Ed25519 key over the sha256 of every release file.

A checksum file only tells a damaged file from an intact one: whoever swaps the weights rewrites
their line of SHA256SUMS too. So `coordinator release` also writes SIGNATURE.json:

    {"signed": {"format": "healthfm-release-signature", "version": 1,
                "files": {"release.json": SHA256, ..., "SHA256SUMS": SHA256}},
     "key_sha256": SHA256 of the signing key's raw public bytes,
     "signature": hex Ed25519 signature of DOMAIN + the canonical JSON of "signed"}

signed with the key `provision` made for the federation (FED/server/release_signing.key, kept by the
coordinator). A site verifies it against the federation's public key from its own startup files
(release_signing.pem, next to ca.pem), never against a key that came with the release: a key
shipped in the folder would authenticate nothing. Since release.json and SHA256SUMS are among the
signed files, both are signed, and a file that differs from what was signed is named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.files import atomic_write_text, sha256_file
from healthfm_core.strict_files import StrictFileError, strict_model

SIGNATURE_FILE = "SIGNATURE.json"
SIGNATURE_FORMAT = "healthfm-release-signature"
SIGNATURE_VERSION = 1
# Domain separation: a signature made for a release is not a signature of anything else the key
# might ever sign.
DOMAIN = b"healthfm model release signature v1\n"
_SHA256 = r"^[0-9a-f]{64}$"


class SignatureError(ValueError):
    """A signature or key that cannot be used; the message names the file."""


class SignedFiles(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    files: dict[str, str]


class ReleaseSignature(BaseModel):
    """SIGNATURE.json, validated on load (it is read from disk)."""

    model_config = ConfigDict(extra="forbid")
    signed: SignedFiles
    key_sha256: str = Field(pattern=_SHA256)
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


@dataclass(frozen=True)
class TrustedKey:
    """A public key a reader trusts, and the file it came from (named in errors)."""

    key: Ed25519PublicKey
    source: str

    @property
    def sha256(self) -> str:
        return public_key_sha256(self.key)


def public_key_sha256(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def make_signing_key() -> tuple[bytes, bytes]:
    """A new key pair: (private key PEM, PKCS8 unencrypted; public key PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path) -> TrustedKey:
    """The federation's public key from a PEM file (release_signing.pem of the startup files)."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise SignatureError(
            f"{path}: not a readable PEM public key ({err}); the federation's release key is "
            "release_signing.pem in the startup files the coordinator handed over"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return TrustedKey(key, str(path))


def _message(signed: SignedFiles) -> bytes:
    return DOMAIN + json.dumps(signed.model_dump(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_folder(folder: Path, names: Sequence[str], key: Ed25519PrivateKey) -> Path:
    """Write folder/SIGNATURE.json over the sha256 of each of `names` (files in `folder`)."""
    signed = SignedFiles(
        format=SIGNATURE_FORMAT,
        version=SIGNATURE_VERSION,
        files={name: sha256_file(folder / name) for name in names},
    )
    blob = ReleaseSignature(
        signed=signed, key_sha256=public_key_sha256(key.public_key()), signature=key.sign(_message(signed)).hex()
    )
    return atomic_write_text(folder / SIGNATURE_FILE, blob.model_dump_json(indent=1))


def _read_signature(file: Path) -> ReleaseSignature:
    if not file.is_file():
        raise SignatureError(
            f"{file}: missing: the release is unsigned (`coordinator release` of a provisioned federation signs "
            "it); load an unsigned release only if you trust where it came from (--trust-unsigned, "
            "load_release(..., trust_unsigned=True))"
        )
    try:
        return strict_model(ReleaseSignature, file.read_bytes(), file)
    except StrictFileError as err:
        raise SignatureError(str(err)) from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "<top level>"
        raise SignatureError(f"{file}: field {where}: {first.get('msg')}") from None
    except UnicodeDecodeError as err:
        raise SignatureError(f"{file}: not UTF-8 text ({err})") from None


def verify_folder(folder: Path, names: Sequence[str], trusted: Sequence[TrustedKey]) -> Mapping[str, str]:
    """Check folder/SIGNATURE.json: made by one of the `trusted` keys, over exactly `names`, each file
    on disk the one signed. Returns the signed sha256 per file; SignatureError naming the file."""
    file = folder / SIGNATURE_FILE
    if not trusted:
        raise SignatureError(
            f"{folder}: no public key to verify the release against: give the federation's release key "
            "(--release-key release_signing.pem from your startup files; load_release(..., trusted_keys=[...])), "
            "or --trust-unsigned to load it unverified"
        )
    sig = _read_signature(file)
    if sig.signed.format != SIGNATURE_FORMAT or sig.signed.version != SIGNATURE_VERSION:
        raise SignatureError(
            f"{file}: field signed.format/version is {sig.signed.format!r}/{sig.signed.version}, "
            f"expected {SIGNATURE_FORMAT!r}/{SIGNATURE_VERSION}"
        )
    by_id = {k.sha256: k for k in trusted}
    key = by_id.get(sig.key_sha256)
    if key is None:
        raise SignatureError(
            f"{file}: field key_sha256: signed by key {sig.key_sha256[:16]}..., not by the federation's key "
            f"({', '.join(f'{k.source}: {k.sha256[:16]}...' for k in trusted)}): a release of another federation, "
            "or one signed before a key rotation (ask the coordinator)"
        )
    try:
        key.key.verify(bytes.fromhex(sig.signature), _message(sig.signed))
    except InvalidSignature:
        raise SignatureError(
            f"{file}: field signature does not verify with {key.source}: the list of signed files was edited"
        ) from None
    if sorted(sig.signed.files) != sorted(names):
        raise SignatureError(f"{file}: field signed.files lists {sorted(sig.signed.files)}, expected {sorted(names)}")
    differ = []  # every file that is not as signed, named (a swap rewrites several)
    for name in names:
        path = folder / name
        if not path.is_file():
            raise SignatureError(f"{path}: missing (signed in {SIGNATURE_FILE})")
        digest = sha256_file(path)
        if digest != sig.signed.files[name]:
            differ.append(
                f"{path}: sha256 {digest[:16]}... is not the file the federation signed "
                f"({sig.signed.files[name][:16]}... in {SIGNATURE_FILE})"
            )
    if differ:
        raise SignatureError("; ".join(differ) + ": replaced or edited after the release")
    return dict(sig.signed.files)


__all__ = [
    "SIGNATURE_FILE",
    "ReleaseSignature",
    "SignatureError",
    "TrustedKey",
    "load_public_key",
    "load_signing_key",
    "make_signing_key",
    "public_key_sha256",
    "sign_folder",
    "verify_folder",
]
