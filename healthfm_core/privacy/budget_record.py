"""The site key's budget record: what the site has spent, kept outside the state directory.

The privacy ledger and its mark live in the site's state directory, so losing (or replacing)
that directory loses both, and a site that rejoined with another `--state-dir` used to train
again from epsilon 0. The record binds the budget to the site's node-auth key instead: a small
file beside the key (`<auth_key>.privacy.json`), rewritten after every ledger write, holding the
key's fingerprint, the ledger's id and path and its step, round and epsilon counts. A ledger that
is not the one the key's record names (missing, fresh, another id, older) is refused until the
admin restores it or starts a new budget explicitly (`join --new-privacy-budget`), which the
record keeps in `replaced`.

The fingerprint is the sha256 (hex) of the public key's OpenSSH wire blob, the bytes
`ssh-keygen -l -E sha256` hashes: the record is tied to the key, not to the key file's path.
Sites without a key (simulations, `--insecure` tests) have no record: their budget is bound to
the state directory alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.files import atomic_write_text
from healthfm_core.first_error import first_error
from healthfm_core.strict_files import StrictFileError, strict_model

RECORD_SUFFIX = ".privacy.json"
RECORD_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SpentLedger(_Strict):
    """What one ledger of the key had spent (its last round's epsilon, at that round's delta)."""

    ledger_id: str
    ledger: str  # the ledger file's path when last written
    steps: int = Field(ge=0)
    rounds: int = Field(ge=0)
    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float | None = Field(gt=0, lt=1, allow_inf_nan=False)


class ReplacedLedger(SpentLedger):
    """A ledger the admin gave up with `--new-privacy-budget`, and when."""

    replaced_at: float


class BudgetRecord(_Strict):
    version: int
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    current: SpentLedger  # the key's ledger now
    replaced: list[ReplacedLedger]  # earlier ledgers of this key, oldest first
    updated_at: float


class KeyBinding(_Strict):
    """Which key a ledger belongs to, and where that key's budget record is."""

    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    record: Path = Field(strict=False)


def record_path(auth_key: str | Path) -> Path:
    """The budget record of a key file: beside it, `<auth_key>.privacy.json`."""
    path = Path(auth_key)
    return path.with_name(path.name + RECORD_SUFFIX)


def key_sha256(public_key: str) -> str:
    """sha256 (hex) of an OpenSSH public key line's key blob ("ecdsa-sha2-nistp256 AAAA... comment")."""
    parts = public_key.split()
    if len(parts) < 2:
        raise ValueError(f"not an OpenSSH public key line: {public_key[:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error as err:
        raise ValueError(f"not an OpenSSH public key line ({err}): {public_key[:40]!r}") from None
    return hashlib.sha256(blob).hexdigest()


def read_record(path: Path) -> BudgetRecord | None:
    """The record at `path`, None when there is none; ValueError naming the file otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the key's privacy budget record ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: the key's privacy budget record is not UTF-8 text ({err})") from None
    try:
        record = strict_model(BudgetRecord, text, path)
    except StrictFileError as err:
        raise ValueError(f"{err} (the key's privacy budget record)") from None
    except ValidationError as err:
        raise ValueError(
            f"{first_error(err, str(path))} (the key's privacy budget record; {err.error_count()} problem(s))"
        ) from None
    if record.version != RECORD_VERSION:
        raise ValueError(f"{path}: field version: value {record.version}: expected {RECORD_VERSION}")
    return record


def write_record(path: Path, record: BudgetRecord) -> None:
    """Atomically, readable by the key's owner only (it names the site's ledger and spend)."""
    atomic_write_text(path, record.model_dump_json(indent=1), mode=0o600)


__all__ = [
    "RECORD_SUFFIX",
    "RECORD_VERSION",
    "BudgetRecord",
    "KeyBinding",
    "ReplacedLedger",
    "SpentLedger",
    "key_sha256",
    "read_record",
    "record_path",
    "write_record",
]
