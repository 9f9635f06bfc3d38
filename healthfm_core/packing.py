"""How a message's arrays travel: packed into a few safetensors blobs, not one Flower Array each.

Flower 1.41 moves every Array of a message (and each of its chunks) as its own content-addressed
object, one request each (two at a time by default), through the SuperLink. With one Array per
state_dict key a model message was ~150 arrays and ~300 objects: under load a round spent
11-34 s per hop moving them one by one, and on a hospital WAN every object costs a round trip.
Packed, a message carries one Array per *part* (a uint8 array holding a safetensors blob of
that part's arrays) plus one chunk per 5 MiB: a handful of objects.

Layers (this module is the one place the format is spelled, for both sides):
  healthfm_core/transport.py  what each array is on the wire (fp32, fp16, int8 + scales);
  this module                 how the arrays of one message are packed into parts;
  client/ and server/         wrap the flat form {part label: uint8 array} into a Flower
                              ArrayRecord ({label: Array(blob)}) and read one back with
                              `unpack_record` (this module does not import flwr).

Parts: a site packs its reply as one part (PACKED_PART). The server packs the global arrays once
per round as one part per parameter group (labels "shared", "ehr", ...) and sends each site the
parts of its groups: the SuperLink stores content-addressed objects once, so a group sent to
three sites is pushed once, and nothing is re-packed per site.

Why safetensors: a standard format (no pickle), already a dependency; its parser checks the
header (JSON, dtypes, shapes) and that the tensors' byte ranges cover the buffer exactly with no
gap or overlap. A blob's `__metadata__` (free text) is ignored: it cannot reach an array.

Untrusted input: `unpack_record` checks each part's header (a one-dimensional uint8 array, at
most MAX_PARTS parts, their total within `max_bytes`) before decoding a byte, then parses each
blob and refuses a key packed twice. What the arrays must be (keys, shapes, dtypes, values) is
the receiver's own check afterwards, exactly as before packing (server/strategy.py parse_reply).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

PACKED_PART = "packed"  # the label of a message packed as a single part (a site's reply)
# A message has at most one part per parameter group (4); more is not a message we send.
MAX_PARTS = 8
_BLOB_DTYPE = "uint8"


class WireArray(Protocol):
    """What unpack_record reads of a record's item: Flower's `Array` (flwr.app) has these."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...

    def numpy(self) -> np.ndarray: ...


def pack_arrays(arrays: Mapping[str, np.ndarray], part_of: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """The flat form of a message's arrays: part label -> uint8 blob (safetensors). `part_of`
    names each key's part (e.g. its parameter group); None: one part, PACKED_PART. No arrays,
    no parts."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        label = part_of(key) if part_of is not None else PACKED_PART
        parts.setdefault(label, {})[key] = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
    return {label: np.frombuffer(_st_save(tensors), dtype=np.uint8) for label, tensors in parts.items()}


def unpack_arrays(blob: np.ndarray | bytes, *, where: str) -> dict[str, np.ndarray]:
    """The arrays of one packed blob. Raises ValueError naming `where` for anything that is not
    a well-formed safetensors blob (truncated, bad header, offsets with gaps or overlaps, a
    dtype numpy does not hold, trailing bytes)."""
    data = blob if isinstance(blob, bytes) else np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    try:
        return dict(_st_load(data))
    except Exception as err:  # noqa: BLE001 - a peer's bytes: the parser's own reason is the message
        raise ValueError(f"{where}: not a valid packed (safetensors) blob of {len(data):,} B: {err}") from None


def unpack_record(
    record: Mapping[str, WireArray], *, where: str, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Every array of a packed record (part label -> WireArray), keys as packed.

    Each part must announce itself as a one-dimensional uint8 array and the parts' total must be
    within `max_bytes` (None: no limit), both read from the headers before any payload is
    decoded; then each blob is parsed (unpack_arrays) and a key may appear in one part only.
    Raises ValueError naming `where`, the part and the problem."""
    if len(record) > MAX_PARTS:
        raise ValueError(f"{where}: {len(record)} parts (at most {MAX_PARTS}); e.g. {sorted(record)[:3]}")
    total = 0
    for label, item in record.items():
        shape = tuple(item.shape)
        if item.dtype != _BLOB_DTYPE or len(shape) != 1:
            raise ValueError(
                f"{where}: part {label!r} is {item.dtype}{list(shape)}, not a packed blob (uint8, one "
                "dimension); a peer sending one Array per key predates the packed wire format"
            )
        total += int(shape[0])
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{where}: packed parts of {total:,} B exceed the limit of {max_bytes:,} B")
    out: dict[str, np.ndarray] = {}
    for label, item in record.items():
        try:
            blob = item.numpy()
        except Exception as err:  # noqa: BLE001 - a peer's bytes: anything can be wrong with them
            raise ValueError(f"{where}: part {label!r}: undecodable array ({err})") from None
        if blob.dtype != np.uint8 or blob.shape != tuple(item.shape):
            raise ValueError(
                f"{where}: part {label!r}: payload {blob.dtype}{list(blob.shape)} does not match its "
                f"header {item.dtype}{list(item.shape)}"
            )
        for key, value in unpack_arrays(blob, where=f"{where}: part {label!r}").items():
            if key in out:
                raise ValueError(f"{where}: key {key!r} is packed twice (again in part {label!r})")
            out[key] = value
    return out


__all__ = ["MAX_PARTS", "PACKED_PART", "WireArray", "pack_arrays", "unpack_arrays", "unpack_record"]
