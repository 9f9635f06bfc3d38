"""The secure rounds' message types and records: which Flower message carries which secure-aggregation
message, in which ConfigRecord (each in the one flat form, healthfm_core/protocol/flat.py; the
messages' models: secure_aggregation/messages.py and config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

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
