"""Each subject's contribution to a figure a site releases, as a 64-bit fingerprint: what the
site's release gate (client/release_gate.py) compares between releases to know which subjects
changed.

A figure (one code's statistics, a wearable channel's, a task key's split) sums over subjects;
a subject's fingerprint for it is a hash of exactly the subject's rows that enter it: the sum,
modulo 2^64, of a splitmix64 hash of each row. The sum is order-independent (a shard rewritten
in another order keeps every fingerprint) and counts repeats (three equal rows are not one), so
two fingerprints are equal when the subject's rows are the same multiset, and differ (but for a
2^-64 chance) when a row was added, removed or changed. Vectorised: one numpy pass per shard,
grouped by (field, subject) with a sort, never a Python step per row.

What enters a figure:
- a code's statistics (subjects, events, moments, sketch): the subject's rows of that code, by
  their numeric value (null counts as one value); times do not enter them;
- a wearable channel's statistics: the subject's finite values of the channel;
- the site's totals and capabilities: the subject's numbers of event rows and wearable epochs;
- a task key's split (an evaluation's metrics, counts and histograms, the head's statistics):
  the subject's labelled rows there (prediction time, label) and the subject's whole record
  (every event: time, code, value; every epoch), since the embeddings, the probe and MEDS-Tab
  read the record (`record`), so a corrected old event marks the subject changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthfm_core.data.files.layout import WEARABLE_CHANNELS, WEARABLES_SCHEMA, SiteLike
from healthfm_core.data.files.parquet_guard import read_parquet
from healthfm_core.data.labels.tasks import _mix64  # the splitmix64 finaliser the visit times use

# One salt per kind of row: an event row and an epoch with the same numbers hash apart.
_VALUE_SALT = np.uint64(0x243F_6A88_85A3_08D3)
_EVENT_SALT = np.uint64(0x1319_8A2E_0370_7344)
_EPOCH_SALT = np.uint64(0xA409_3822_299F_31D0)
_LABEL_SALT = np.uint64(0x082E_FA98_EC4E_6C89)
_COUNT_SALT = np.uint64(0x4528_21E6_38D0_1377)
_NAN_BITS = np.uint64(0x7FF8_0000_0000_0000)  # every NaN (a null value) alike


def value_bits(values: np.ndarray) -> np.ndarray:
    """A float column's bits as uint64: nulls (NaN) as one value, -0.0 as 0.0."""
    v = np.asarray(values, dtype=np.float64) + 0.0  # a copy; -0.0 + 0.0 is 0.0
    bits = v.view(np.uint64)
    bits[np.isnan(v)] = _NAN_BITS
    return bits


def _column_hash(column: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of each value of an 8-byte integer column (or uint64 bits), salted."""
    c = np.asarray(column)
    c = c.view(np.uint64) if c.dtype.itemsize == 8 and c.dtype.kind in "iu" else c.astype(np.uint64)
    return _mix64(c ^ np.uint64(salt % 2**64))


def _rotated(h: np.ndarray, k: int) -> np.ndarray:
    return (h << np.uint64(k)) | (h >> np.uint64(64 - k))


def row_hash(salt: np.uint64, *columns: np.ndarray) -> np.ndarray:
    """A splitmix64 hash of each row of 8-byte integer columns (floats as value_bits): each
    column hashed with its own salt, rotated by its position, the xor mixed once more."""
    h = np.full(len(columns[0]) if columns else 0, salt, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, column in enumerate(columns):
            h ^= _rotated(_column_hash(column, int(salt) + (i + 1) * int(_VALUE_SALT)), 7 * i + 1)
        return _mix64(h)


def count_fingerprint(*counts: np.ndarray) -> np.ndarray:
    """A subject's fingerprint of a figure that reads only how many rows it has (totals)."""
    return row_hash(_COUNT_SALT, *(np.asarray(c, dtype=np.int64) for c in counts))


def text_hash(texts: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash of each string (a shard's few distinct codes, not every row)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts],
        dtype=np.uint64,
    )


def _runs(keys: np.ndarray) -> np.ndarray:
    """Start of each run of equal values of sorted `keys`."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))


def subject_sums(subject: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct subjects, their rows, the sum of their rows' hashes mod 2^64), by subject; O(n)
    when the rows come grouped by subject in increasing order (site files do), else a sort."""
    subject = np.asarray(subject, np.int64)
    if len(subject) > 1 and np.any(subject[1:] < subject[:-1]):
        order = np.argsort(subject, kind="stable")
        subject, hashes = subject[order], hashes[order]
    starts = _runs(subject)
    if len(starts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        sums = np.add.reduceat(hashes, starts)  # uint64 wraps: the sum modulo 2^64
    rows = np.diff(np.append(starts, len(subject)))
    return subject[starts], rows.astype(np.int64), sums.astype(np.uint64)


def group_sums(field: np.ndarray, subject: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(field, subject, sum of hashes mod 2^64) per distinct (field, subject), sorted by both."""
    if len(hashes) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.uint64)
    field, subject = np.asarray(field, np.int64), np.asarray(subject, np.int64)
    ids, dense = np.unique(subject, return_inverse=True)
    key = field * len(ids) + dense
    order = np.argsort(key, kind="stable")
    key, h = key[order], hashes[order]
    starts = _runs(key)
    with np.errstate(over="ignore"):
        sums = np.add.reduceat(h, starts)
    first = key[starts]
    return (first // len(ids)).astype(np.int32), ids[first % len(ids)], sums.astype(np.uint64)


@dataclass(frozen=True)
class FieldPairs:
    """(subject, fingerprint) pairs of many fields at once: pair i belongs to names[field[i]];
    sorted by field then subject, one pair per (field, subject)."""

    names: list[str]
    field: np.ndarray  # int32
    subject: np.ndarray  # int64
    fingerprint: np.ndarray  # uint64

    @classmethod
    def empty(cls) -> FieldPairs:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.uint64))

    @classmethod
    def merged(cls, names: Sequence[str], field: np.ndarray, subject: np.ndarray, hashes: np.ndarray) -> FieldPairs:
        """Rows' hashes summed per (field, subject)."""
        f, s, h = group_sums(np.asarray(field, np.int32), np.asarray(subject, np.int64), hashes)
        return cls(list(names), f, s, h)

    @classmethod
    def of(cls, parts: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> FieldPairs:
        """From per-field (subjects, fingerprints), one pair per subject."""
        names = list(parts)
        field = [np.full(len(parts[n][0]), i, np.int32) for i, n in enumerate(names)]
        subject = [np.asarray(parts[n][0], np.int64) for n in names]
        fingerprint = [np.asarray(parts[n][1], np.uint64) for n in names]
        if not names:
            return cls.empty()
        f, s, h = np.concatenate(field), np.concatenate(subject), np.concatenate(fingerprint)
        order = np.lexsort((s, f))
        f, s, h = f[order], s[order], h[order]
        if len(s) and np.any((f[1:] == f[:-1]) & (s[1:] == s[:-1])):
            raise ValueError("a subject given twice for one field")
        return cls(names, f, s, h)

    def subjects(self) -> np.ndarray:
        """Distinct subjects per field (pairs per field), aligned with names."""
        return np.bincount(self.field, minlength=len(self.names)).astype(np.int64)

    @classmethod
    def joined(cls, parts: Sequence[tuple[str, FieldPairs]]) -> FieldPairs:
        """Several FieldPairs as one, each one's names behind its prefix (names must not clash)."""
        names: list[str] = []
        fields, subjects, fingerprints = [], [], []
        for prefix, pairs in parts:
            fields.append(pairs.field.astype(np.int32) + len(names))
            names += [prefix + n for n in pairs.names]
            subjects.append(pairs.subject)
            fingerprints.append(pairs.fingerprint)
        if len(set(names)) != len(names):
            raise ValueError("two fields of one name")
        if not names:
            return cls.empty()
        return cls(names, np.concatenate(fields), np.concatenate(subjects), np.concatenate(fingerprints))


@dataclass(frozen=True)
class SiteContributions:
    """Every subject's fingerprints of the site's setup figures, and of its whole record."""

    codes: FieldPairs  # per code: the subject's rows of it, by numeric value
    channels: FieldPairs  # per wearable channel: the subject's finite values
    subject: np.ndarray  # every subject with event rows or epochs, sorted
    events: np.ndarray  # per subject: event rows
    epochs: np.ndarray  # per subject: wearable epochs
    record: np.ndarray  # per subject: every event (time, code, value) and epoch (time, channels)

    def of(self, subjects: np.ndarray, column: np.ndarray) -> np.ndarray:
        """`column` (one of the per-subject arrays) at `subjects`; 0 for a subject without rows."""
        subjects = np.asarray(subjects, np.int64)
        at = np.clip(np.searchsorted(self.subject, subjects), 0, max(len(self.subject) - 1, 0))
        found = self.subject[at] == subjects if len(self.subject) else np.zeros(len(subjects), bool)
        return np.where(found, column[at] if len(self.subject) else 0, 0).astype(column.dtype)


def _time_bits(table: pa.Table, column: str = "time") -> np.ndarray:
    """A timestamp column as int64 microseconds-or-whatever-unit it has; null (a static row) as
    the smallest int64."""
    times = pc.fill_null(pc.cast(table[column], pa.int64()), np.iinfo(np.int64).min)
    return np.asarray(times.to_numpy(zero_copy_only=False), dtype=np.int64)


def _per_subject(subject: np.ndarray, values: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """Sums of `values` (uint64 modulo 2^64, or counts) per subject of `universe`."""
    at = np.searchsorted(universe, subject)
    if values.dtype == np.uint64:
        out = np.zeros(len(universe), np.uint64)
        with np.errstate(over="ignore"):
            np.add.at(out, at, values)
        return out
    return np.bincount(at, weights=values, minlength=len(universe)).astype(np.int64)


def site_contributions(site: SiteLike) -> SiteContributions:
    """One pass over the site's shards and wearable files (one at a time: memory is one file's
    rows) for every fingerprint of the setup figures and each subject's record."""
    code_index: dict[str, int] = {}
    parts: list[tuple[np.ndarray, ...]] = []  # codes: (field, subject, hash sum) per shard
    people: list[tuple[np.ndarray, ...]] = []  # (subject, rows, record) per file
    for shard in site.iter_event_shards(columns=["subject_id", "time", "code", "numeric_value"]):
        if shard.num_rows == 0:
            continue
        codes = pc.dictionary_encode(shard["code"].combine_chunks())
        names = codes.dictionary.to_pylist()
        local = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        glob = np.array([code_index.setdefault(n, len(code_index)) for n in names], dtype=np.int32)
        subject = shard["subject_id"].to_numpy().astype(np.int64)
        value_hash = row_hash(_VALUE_SALT, value_bits(shard["numeric_value"].to_numpy(zero_copy_only=False)))
        parts.append(group_sums(glob[local], subject, value_hash))
        record = row_hash(_EVENT_SALT, _time_bits(shard), text_hash(names)[local], value_hash)
        people.append(subject_sums(subject, record))
    codes_pairs = FieldPairs.merged(list(code_index), *_stacked(parts)) if parts else FieldPairs.empty()
    channel_parts: list[tuple[np.ndarray, ...]] = []
    epochs: list[tuple[np.ndarray, ...]] = []
    for path in getattr(site, "wearable_files", []):
        table = read_parquet(path, getattr(site, "root", None), columns=WEARABLES_SCHEMA.names)
        table = table.cast(WEARABLES_SCHEMA)
        if table.num_rows == 0:
            continue
        subject = table["subject_id"].to_numpy().astype(np.int64)
        hashes = []
        for i, channel in enumerate(WEARABLE_CHANNELS):
            values = np.asarray(table[channel].to_numpy(zero_copy_only=False), dtype=np.float64)
            hashes.append(row_hash(_VALUE_SALT, value_bits(values)))
            finite = np.isfinite(values)
            ids, _, sums = subject_sums(subject[finite], hashes[-1][finite])
            channel_parts.append((np.full(len(ids), i, np.int32), ids, sums))
        epochs.append(subject_sums(subject, row_hash(_EPOCH_SALT, _time_bits(table), *hashes)))
    channels = (
        FieldPairs.merged(list(WEARABLE_CHANNELS), *_stacked(channel_parts)) if channel_parts else FieldPairs.empty()
    )
    universe = np.unique(np.concatenate([np.zeros(0, np.int64), *(p[0] for p in people), *(e[0] for e in epochs)]))
    n_events, n_epochs = (_totals(part, universe) for part in (people, epochs))
    with np.errstate(over="ignore"):
        record_sum = _record(people, universe) + _record(epochs, universe)
    return SiteContributions(
        codes=codes_pairs, channels=channels, subject=universe, events=n_events, epochs=n_epochs, record=record_sum
    )


def _stacked(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _totals(parts: Iterable[tuple[np.ndarray, ...]], universe: np.ndarray) -> np.ndarray:
    out = np.zeros(len(universe), np.int64)
    for ids, rows, _ in parts:
        out += _per_subject(ids, rows.astype(np.float64), universe)
    return out


def _record(parts: Iterable[tuple[np.ndarray, ...]], universe: np.ndarray) -> np.ndarray:
    out = np.zeros(len(universe), np.uint64)
    with np.errstate(over="ignore"):
        for ids, _, sums in parts:
            out += _per_subject(ids, sums, universe)
    return out


def label_fingerprints(
    table: pa.Table, split: np.ndarray, site: SiteContributions
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split of a task key's labels (subject_id, prediction_time, boolean_value or
    float_value; `split`: each row's split): its subjects and their fingerprints (their rows'
    prediction times and labels, and their record)."""
    subject = table["subject_id"].to_numpy().astype(np.int64)
    when = _time_bits(table, "prediction_time")
    name = "boolean_value" if "boolean_value" in table.column_names else "float_value"
    label = value_bits(np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64))
    hashes = row_hash(_LABEL_SALT, when, label)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in np.unique(split).tolist():
        mine = split == s
        ids, _, sums = subject_sums(subject[mine], hashes[mine])
        with np.errstate(over="ignore"):
            out[str(s)] = (ids, _mix64(sums + site.of(ids, site.record)))
    return out


def row_fingerprints(subject: np.ndarray, when: np.ndarray, site: SiteContributions) -> tuple[np.ndarray, np.ndarray]:
    """The subjects of (subject, prediction time) rows and their fingerprints (their times and
    record): what a count of embedded rows reads."""
    subject = np.asarray(subject, np.int64)
    hashes = row_hash(_LABEL_SALT, np.asarray(when, np.int64))
    ids, _, sums = subject_sums(subject, hashes)
    with np.errstate(over="ignore"):
        return ids, _mix64(sums + site.of(ids, site.record))


__all__ = [
    "FieldPairs",
    "SiteContributions",
    "count_fingerprint",
    "group_sums",
    "label_fingerprints",
    "row_fingerprints",
    "row_hash",
    "site_contributions",
    "subject_sums",
    "value_bits",
]
