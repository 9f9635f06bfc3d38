"""The flat form of every secure-aggregation message, for a Flower ConfigRecord (whose values are
scalars, strings, bytes and lists of them, never nested dicts): the top-level bytes fields as
bytes, everything else as one JSON string under JSON_KEY.

Why not all JSON: the masked vector is the message's bulk (2 bytes a value) and base64 would make
it 2.67 bytes, past the 2x-of-int8 budget; the rest (keys, shares, ciphertexts) is a few kB.
Parsing goes through the pydantic model, so a peer's flat record is validated like any message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from healthfm_core.strict_files import strict_json

JSON_KEY = "secagg.json"

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")

# A secure round's Flower message types (server/secure_round.py sends them in this order,
# client/client_app.py handles them) and the ConfigRecord each message and reply carries.
KEYS_MESSAGE = "query.secagg_keys"  # SecAggConfig per key round -> PublicKeys per key round
SHARES_MESSAGE = "query.secagg_shares"  # KeyDirectory per key round -> EncryptedShares per key round
MASK_MESSAGE = "train.secagg_mask"  # the train message's records + ShareInbox + SecAggConfig -> MaskedInput
UNMASK_MESSAGE = "query.secagg_unmask"  # UnmaskRequest -> UnmaskShares
SECAGG_RECORD = "secagg"
# The mask message's own round config (SecAggConfig): the keys may have been made rounds before,
# when its clip norms were not known (secure_aggregation/config.py, MASK_TIME_FIELDS).
SECAGG_CONFIG_RECORD = "secagg.config"
# One keys message makes the keys of this round and up to MAX_KEY_ROUNDS - 1 rounds after it (the
# shares message shares them): round r's payload under SECAGG_RECORD, round r + i's under
# key_round_record(i). A site refuses more: each key round is key pairs and seeds it keeps.
MAX_KEY_ROUNDS = 16


def key_round_record(offset: int) -> str:
    """The record of a keys or shares message (and its reply) that carries round r + offset's payload."""
    return SECAGG_RECORD if offset == 0 else f"{SECAGG_RECORD}+{offset}"


def key_round_records(records: Mapping[str, R], what: str) -> list[R]:
    """A keys or shares message's records in round order; ValueError unless they are exactly
    key_round_record(0 .. k-1), 1 <= k <= MAX_KEY_ROUNDS."""
    count = len(records)
    expected = [key_round_record(i) for i in range(count)]
    if not 1 <= count <= MAX_KEY_ROUNDS or sorted(records) != sorted(expected):
        raise ValueError(
            f"{what}: records {sorted(records)[: MAX_KEY_ROUNDS + 1]}, expected {SECAGG_RECORD!r} and at most "
            f"{MAX_KEY_ROUNDS - 1} more named {SECAGG_RECORD}+1, {SECAGG_RECORD}+2, ... in sequence"
        )
    return [records[name] for name in expected]


def _bytes_fields(cls: type[BaseModel]) -> list[str]:
    return [name for name, info in cls.model_fields.items() if info.annotation is bytes]


def to_flat(message: BaseModel) -> dict[str, Any]:
    """The message's ConfigRecord values (str and bytes: Any, as a ConfigRecord takes them)."""
    raw = _bytes_fields(type(message))
    out: dict[str, Any] = {name: getattr(message, name) for name in raw}
    out[JSON_KEY] = message.model_dump_json(exclude=set(raw))
    return out


def from_flat(cls: type[M], record: Mapping[str, object], max_bytes: int | None = None) -> M:
    """The message of type `cls` from a received record; ValueError (pydantic's, or ours) when it
    does not parse, holds other keys, or is larger than `max_bytes`."""
    raw = _bytes_fields(cls)
    unknown = sorted(set(record) - {JSON_KEY, *raw})
    if unknown:
        raise ValueError(f"{cls.__name__}: unexpected key(s) {', '.join(unknown)}")
    text = record.get(JSON_KEY)
    if not isinstance(text, str):
        raise ValueError(f"{cls.__name__}: {JSON_KEY!r} is not a string")
    size = len(text) + sum(len(v) for k, v in record.items() if k != JSON_KEY and isinstance(v, bytes))
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{cls.__name__}: {size} bytes > limit {max_bytes}")
    data = strict_json(text, f"{cls.__name__} record")
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: {JSON_KEY!r} is not a JSON object")
    for name in raw:
        value = record.get(name)
        if not isinstance(value, bytes):
            raise ValueError(f"{cls.__name__}: {name!r} is missing or not bytes")
        data[name] = value
    return cls.model_validate(data)
