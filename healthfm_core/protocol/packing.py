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

Parts: every message we send is one part (PACKED_PART). A site packs its reply so; the server
packs the global arrays once per round per distinct *group set* (`pack_group_sets`: the arrays of
exactly those parameter groups, one blob) and sends each site the blob of its set. Sites holding
the same groups carry the same blob, one content-addressed object the SuperLink stores once.

The trade (python benchmarks/update_transport.py, "The server's train messages"). Flower moves
each object with its own request (an SQLite write in the SuperLink, TLS, nginx), so a message's
cost is mostly its object count: a `tiny` train message is 6 objects (Message, RecordDict,
ArrayRecord, one Array, its chunk, ConfigRecord) where one part per group made it 12 (4 Arrays,
4 chunks); a `small` one 8 (3 chunks of 5 MiB) where it was 13 (vocabulary 2,000). What a site downloads is the same
(its groups' arrays; one header instead of one per group: tiny 2,011,779 -> 2,010,526 B for a
site of every group). What grows is the ServerApp's push to its own SuperLink, since a group is
pushed once per distinct set holding it: the `tiny` scenario's three sites hold three sets (every
group; no genomics; no wearables), so `shared` and `ehr` go three times: a round's push is
2.01 -> 5.71 MB for tiny and 11.0 -> 30.9 MB for small (fp32; 20 -> 18 and 21 -> 22 distinct
objects). That hop is local (or a LAN); every site's pull, the hop that crosses the WAN, moves
fewer objects (6 of 12 for tiny, 8 of 13 for small). Sites with the same groups cost nothing extra.

Why safetensors: a standard format (no pickle), already a dependency; its parser checks the
header (JSON, dtypes, shapes) and that the tensors' byte ranges cover the buffer exactly with no
gap or overlap. A blob's `__metadata__` (free text) is ignored: it cannot reach an array.

Untrusted input: `unpack_record` checks each part's header (a one-dimensional uint8 array, at
most MAX_PARTS parts, their total within `max_bytes`) before decoding a byte, then parses each
blob and refuses a key packed twice. What the arrays must be (keys, shapes, dtypes, values) is
the receiver's own check afterwards, exactly as before packing (server/strategy.py parse_reply).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

PACKED_PART = "packed"  # the label of a message packed as a single part (a site's reply)
# We send one part per message; a receiver still reads up to one per parameter group (4, as the
# server once sent) and no more: more is not a message we ever sent.
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


def pack_group_sets(
    arrays: Mapping[str, np.ndarray], group_of: Callable[[str], str], group_sets: Iterable[Iterable[str]]
) -> dict[frozenset[str], dict[str, np.ndarray]]:
    """The flat form (pack_arrays) of the arrays of each distinct group set in `group_sets`: one
    part holding the arrays whose group (`group_of`) is in the set, packed once per set however
    many times it is named, so every site of a set gets the very same blob. A set holding no
    array's group has no parts."""
    out: dict[frozenset[str], dict[str, np.ndarray]] = {}
    for groups in map(frozenset, group_sets):
        if groups not in out:
            out[groups] = pack_arrays({k: v for k, v in arrays.items() if group_of(k) in groups})
    return out


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


__all__ = ["MAX_PARTS", "PACKED_PART", "WireArray", "pack_arrays", "pack_group_sets", "unpack_arrays", "unpack_record"]
