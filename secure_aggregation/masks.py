"""The masks: a keystream expanded from a 32-byte seed into integers mod 2^bits.

Not Flower's `pseudo_rand_gen`: it folds the seed into 32 bits for numpy's Mersenne Twister, so
2^32 guesses recover any mask, and the Twister's state follows from 624 of its outputs. Here the
seed keys AES-256 in counter mode (`cryptography`), a standard PRG: without the seed the stream
is indistinguishable from uniform, which is what hides a masked value.

Each mask is bound to the round, its kind (self or pairwise) and its parameter group through
HKDF, so one seed never yields the same stream for two purposes: a site's masks of two groups
are independent, and revealing one group's self-mask seed reveals nothing of another's.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def field_dtype(bits: int) -> type[np.unsignedinteger]:
    """numpy's unsigned integers wrap mod 2^bits: the field's addition at no cost."""
    if bits == 16:
        return np.uint16
    if bits == 32:
        return np.uint32
    raise ValueError(f"field of 2^{bits}: expected 16 or 32 bits")


def mask_label(round_: int, kind: str, group: str) -> bytes:
    """What a stream is for; both ends of a pair compute the same label."""
    return f"healthfm-secagg/{round_}/{kind}/{group}".encode()


def mask_stream(seed: bytes, label: bytes, length: int, bits: int) -> np.ndarray:
    """`length` integers mod 2^bits, uniform, from `seed` (32 bytes) for the purpose `label`."""
    dtype = field_dtype(bits)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(seed)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    # A fresh key per label, so the all-zero counter block is never reused under one key.
    stream = encryptor.update(bytes(length * np.dtype(dtype).itemsize))
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)
