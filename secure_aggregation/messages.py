"""Every message of a secure-aggregation round, as pydantic models: each side parses what a peer
sent before using it (the server relays the sites' messages, so a site parses the server's too).

Bytes travel as bytes (in Flower's records: a ConfigRecord's bytes values); `wire_bytes` counts
what a message carries (bytes fields in full, 8 per integer, the group names), for the benchmark.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from secure_aggregation.keys import KEY_BYTES

_FROZEN = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


def _key(value: bytes) -> bytes:
    if len(value) != KEY_BYTES:
        raise ValueError(f"a public key is {KEY_BYTES} bytes, got {len(value)}")
    return value


class PublicKeys(BaseModel):
    """Stage 1, site -> server: the site's two public keys and a commitment to each self-mask
    seed (sha256; lets the server tell a wrong reconstruction from a right one)."""

    model_config = _FROZEN

    node_id: int
    round: int
    enc_key: bytes
    mask_key: bytes
    seed_commitments: dict[str, bytes]  # group -> sha256 of its self-mask seed

    _check_enc = field_validator("enc_key", "mask_key")(_key)

    def wire_bytes(self) -> int:
        return (
            16 + len(self.enc_key) + len(self.mask_key) + sum(len(g) + len(c) for g, c in self.seed_commitments.items())
        )


class KeyDirectory(BaseModel):
    """Stage 1, server -> sites: the public keys of every site that advertised (U1)."""

    model_config = _FROZEN

    round: int
    keys: dict[int, PublicKeys]

    def wire_bytes(self) -> int:
        return 8 + sum(8 + k.wire_bytes() for k in self.keys.values())


class SharePlaintext(BaseModel):
    """What one site sends another inside a ciphertext: its shares of its secrets."""

    model_config = _FROZEN

    src: int
    dst: int
    round: int
    seed_shares: dict[str, bytes]  # group -> the share of the source's self-mask seed of it
    key_share: bytes  # the share of the source's mask private key


class EncryptedShares(BaseModel):
    """Stage 2, site -> server: one ciphertext per other site of the directory."""

    model_config = _FROZEN

    node_id: int
    round: int
    ciphertexts: dict[int, bytes]  # destination node -> Fernet token

    def wire_bytes(self) -> int:
        return 16 + sum(8 + len(c) for c in self.ciphertexts.values())


class ShareInbox(BaseModel):
    """Stage 2, server -> one site: the ciphertexts addressed to it, by sender (the senders are U2)."""

    model_config = _FROZEN

    round: int
    ciphertexts: dict[int, bytes]

    def wire_bytes(self) -> int:
        return 8 + sum(8 + len(c) for c in self.ciphertexts.values())


class MaskedInput(BaseModel):
    """Stage 3, site -> server: the masked vector (little-endian field integers, one segment per
    group it holds in GROUPS order: the group's values then its count's digits)."""

    model_config = _FROZEN

    node_id: int
    round: int
    groups: list[str]
    vector: bytes

    def wire_bytes(self) -> int:
        return 16 + sum(len(g) for g in self.groups) + len(self.vector)


class UnmaskRequest(BaseModel):
    """Stage 4, server -> sites: who sent a masked vector (U3), which groups to unmask, and which
    are withheld this round and why (so the sites are told, and log it)."""

    model_config = _FROZEN

    round: int
    survivors: list[int]
    groups: list[str]
    withheld: dict[str, str] = Field(default_factory=dict)

    def wire_bytes(self) -> int:
        withheld = sum(len(g) + len(r) for g, r in self.withheld.items())
        return 8 + 8 * len(self.survivors) + sum(len(g) for g in self.groups) + withheld


class UnmaskShares(BaseModel):
    """Stage 4, site -> server: shares of the survivors' self-mask seeds of the unmasked groups,
    and of the dropped sites' mask keys; never both for one site."""

    model_config = _FROZEN

    node_id: int
    round: int
    seed_shares: dict[int, dict[str, bytes]] = Field(default_factory=dict)  # survivor -> group -> share
    key_shares: dict[int, bytes] = Field(default_factory=dict)  # dropped site -> share

    def wire_bytes(self) -> int:
        seeds = sum(8 + sum(len(g) + len(s) for g, s in shares.items()) for shares in self.seed_shares.values())
        return 16 + seeds + sum(8 + len(s) for s in self.key_shares.values())
