"""X25519 key pairs and the pairwise secrets both ends of a pair derive from them.

Each site makes two pairs a round (Bell et al. 2020): one whose agreement encrypts the Shamir
shares it sends through the server (`enc`), one whose agreement seeds the pairwise masks (`mask`).
Two pairs, because the mask key's secret half is Shamir-shared for dropout recovery: were it also
the encryption key, reconstructing a dropped site's key would open every share sent to it.

Flower's `generate_shared_key` takes NIST-curve keys; the issue asks for X25519, whose exchange
has no ECDH argument, so the agreement is spelled here with the same HKDF-SHA256 derivation.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes a site advertises."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes that are Shamir-shared (the mask key only)."""
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte secret both ends of a pair derive (X25519, then HKDF-SHA256: the raw shared
    point is not uniformly random, a KDF's output is)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"healthfm-secagg/agree").derive(shared)


def fernet_key(secret: bytes) -> bytes:
    """A pairwise secret as the url-safe base64 key Flower's `encrypt` / `decrypt` (Fernet) take."""
    return base64.urlsafe_b64encode(secret)
