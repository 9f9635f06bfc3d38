"""Rewriting a parquet file's footer (thrift compact protocol) to craft lying files in tests:
`set_row_counts(path, n)` makes a file's footer claim `n` rows in each row group, as a damaged or
hostile export would, while the data pages stay as they were.

A small generic codec: the footer decodes into (field id, type, value) triples and encodes back
byte for byte, so only the fields changed differ.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

_MAGIC = b"PAR1"
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)

Field = tuple[int, int, Any]  # (field id, compact type, value)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int) -> Any:
        if kind in (_TRUE, _FALSE):  # a list element: one byte
            return self.byte() == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8 : self.pos]
        if kind == _BINARY:
            n = self.varint()
            self.pos += n
            return self.data[self.pos - n : self.pos]
        if kind in (_LIST, _SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return (elem, [self.value(elem) for _ in range(size)])
        if kind == _STRUCT:
            return self.struct()
        raise ValueError(f"thrift compact type {kind} not supported")

    def struct(self) -> list[Field]:
        fields: list[Field] = []
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == _STOP:
                return fields
            delta = head >> 4
            fid = last + delta if delta else self.zigzag()
            value = kind == _TRUE if kind in (_TRUE, _FALSE) else self.value(kind)
            fields.append((fid, kind, value))
            last = fid


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def _value(kind: int, value: Any) -> bytes:
    if kind in (_TRUE, _FALSE):
        return bytes([_TRUE if value else _FALSE])
    if kind == _BYTE:
        return bytes([value])
    if kind in (_I16, _I32, _I64):
        return _zigzag(value)
    if kind == _DOUBLE:
        return bytes(value)
    if kind == _BINARY:
        return _varint(len(value)) + bytes(value)
    if kind in (_LIST, _SET):
        elem, items = value
        head = bytes([(len(items) << 4) | elem]) if len(items) < 15 else bytes([0xF0 | elem]) + _varint(len(items))
        return head + b"".join(_value(elem, v) for v in items)
    if kind == _STRUCT:
        return _struct(value)
    raise ValueError(f"thrift compact type {kind} not supported")


def _struct(fields: list[Field]) -> bytes:
    out = bytearray()
    last = 0
    for fid, kind, value in fields:
        if kind in (_TRUE, _FALSE):
            kind = _TRUE if value else _FALSE
        delta = fid - last
        out += bytes([(delta << 4) | kind]) if 0 < delta <= 15 else bytes([kind]) + _zigzag(fid)
        if kind not in (_TRUE, _FALSE):
            out += _value(kind, value)
        last = fid
    out.append(_STOP)
    return bytes(out)


def _set(fields: list[Field], fid: int, value: Any) -> None:
    for i, (f, kind, _) in enumerate(fields):
        if f == fid:
            fields[i] = (f, kind, value)
            return
    raise KeyError(f"thrift field {fid} not present")


def _get(fields: list[Field], fid: int) -> Any:
    return next(v for f, _, v in fields if f == fid)


def read_footer(path: Path) -> tuple[bytes, list[Field]]:
    """(the bytes before the footer, the decoded FileMetaData)."""
    data = path.read_bytes()
    if data[-4:] != _MAGIC:
        raise ValueError(f"{path}: not a parquet file")
    (length,) = struct.unpack("<I", data[-8:-4])
    body, footer = data[: -8 - length], data[-8 - length : -8]
    reader = _Reader(footer)
    meta = reader.struct()
    if reader.pos != len(footer):
        raise ValueError(f"{path}: footer decoded {reader.pos} of {len(footer)} bytes")
    return body, meta


def write_footer(path: Path, body: bytes, meta: list[Field]) -> None:
    footer = _struct(meta)
    path.write_bytes(body + footer + struct.pack("<I", len(footer)) + _MAGIC)


def set_row_counts(path: Path, rows_per_group: int) -> None:
    """Make the footer claim `rows_per_group` rows in every row group (and their sum in the file);
    the column chunks' value counts and sizes stay true."""
    body, meta = read_footer(path)
    _, groups = _get(meta, 4)  # FileMetaData.row_groups: list<RowGroup>
    for group in groups:
        _set(group, 3, rows_per_group)  # RowGroup.num_rows
    _set(meta, 3, rows_per_group * len(groups))  # FileMetaData.num_rows
    write_footer(path, body, meta)


def set_column_sizes(path: Path, uncompressed: int) -> None:
    """Make the footer claim `uncompressed` bytes for every column chunk (and its row group)."""
    body, meta = read_footer(path)
    _, groups = _get(meta, 4)
    for group in groups:
        _, chunks = _get(group, 1)  # RowGroup.columns: list<ColumnChunk>
        for chunk in chunks:
            _set(_get(chunk, 3), 6, uncompressed)  # ColumnChunk.meta_data.total_uncompressed_size
        _set(group, 2, uncompressed * len(chunks))  # RowGroup.total_byte_size
    write_footer(path, body, meta)


def set_value_counts(path: Path, values: int) -> None:
    body, meta = read_footer(path)
    _, groups = _get(meta, 4)
    for group in groups:
        _, chunks = _get(group, 1)
        for chunk in chunks:
            _set(_get(chunk, 3), 5, values)  # ColumnMetaData.num_values
    write_footer(path, body, meta)


def set_compressed_sizes(path: Path, compressed: int) -> None:
    body, meta = read_footer(path)
    _, groups = _get(meta, 4)
    for group in groups:
        _, chunks = _get(group, 1)
        for chunk in chunks:
            _set(_get(chunk, 3), 7, compressed)  # ColumnMetaData.total_compressed_size
    write_footer(path, body, meta)
