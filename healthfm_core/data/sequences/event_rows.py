"""A site's MEDS rows as the tokeniser keeps them: compact numpy arrays, built shard by shard.

`shard_rows` turns one events table (a MEDS shard, or any table) into `EventRows` right after it
is read, so that the strings and the Arrow table are dropped shard by shard: the code column is
dictionary-encoded and only the shard's small dictionary is looked up in the vocabulary (and
tested for PRS// and MEDS_BIRTH), never every row's string. What is kept per row: subject id,
time, code id, normalised value and has_value (timed rows), or the same without time (static
rows); PRS rows and birth rows, a few per subject, apart.

`RowSink` joins the shards' rows: timed rows sorted by (subject, time), ties in reading order
(shard order, then file order), static rows grouped by subject in reading order. Each shard is
checked for that order in O(n) and sorted only if it is not in it (a MEDS shard is sorted by
subject and time, a static row may sit anywhere in its subject's rows); shards are then placed by
subject in O(n) (runs of a subject moved, not rows sorted), and only a subject whose rows sit in
two shards with interleaved times costs a sort of the whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from meds import birth_code as BIRTH_CODE

from healthfm_core.data.files.layout import PRS_PREFIX
from healthfm_core.data.sequences.batch_gather import ranges, segment_searchsorted
from healthfm_core.data.sequences.vocab import Vocabulary

US_PER_DAY = 86_400_000_000  # MEDS times are microseconds
NO_TIME = np.iinfo(np.int64).max  # no time (static rows)
_STATIC_FIRST = np.iinfo(np.int64).min  # a static row's place in reading order: before any time


def code_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The narrowest dtype of a site's per-row code ids: uint16 while the vocabulary fits (every
    federation so far: 10^3-10^4 codes), 2 bytes a row and a pooled entry instead of 4; int32
    past that. Batches widen ids to int64 whatever this is."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def us_arrow(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array | pa.ChunkedArray:
    """Timestamps (any unit) as int64 microseconds, nulls kept, chunks kept (no copy for µs)."""
    if not pa.types.is_timestamp(column.type):
        raise ValueError(f"column {name!r} must be a timestamp, got {column.type}")
    if column.type.tz is not None:
        column = column.cast(pa.timestamp(column.type.unit))
    try:
        if column.type.unit != "us":
            column = column.cast(pa.timestamp("us"))
    except pa.ArrowInvalid as e:
        raise ValueError(f"column {name!r}: timestamps do not fit microseconds: {e}") from e
    return column.cast(pa.int64())


def to_us(column: pa.Array | pa.ChunkedArray, name: str = "time") -> np.ndarray:
    """Timestamps (any unit) as int64 microseconds; null -> NO_TIME."""
    us = us_arrow(column, name)
    if us.null_count:
        us = pc.fill_null(us, NO_TIME)
    return us.to_numpy().astype(np.int64, copy=False)


@dataclass
class SubjectRuns:
    """Rows grouped by subject, kept as runs: run r is subject `ids[r]`, its rows
    `starts[r]:starts[r + 1]`. A site's timed rows hold a few hundred rows a subject, so 16 bytes
    a run replace 8 bytes a row (the largest array a load held while reading)."""

    ids: np.ndarray  # [runs] int64, no two adjacent runs of one subject
    starts: np.ndarray  # [runs + 1] int64, starts[0] = 0, starts[-1] = rows

    @classmethod
    def of(cls, subject: np.ndarray) -> SubjectRuns:
        """The runs of a per-row subject column."""
        n = len(subject)
        first = np.r_[0, np.flatnonzero(subject[1:] != subject[:-1]) + 1] if n else np.zeros(0, np.int64)
        return cls(np.asarray(subject[first], np.int64), np.r_[first, n].astype(np.int64))

    @classmethod
    def join(cls, parts: list[SubjectRuns]) -> SubjectRuns:
        """Parts one after another (rows of part i follow those of part i - 1); a subject that
        ends one part and starts the next is one run."""
        ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)
        lengths = np.concatenate([np.diff(p.starts) for p in parts]) if parts else np.zeros(0, np.int64)
        if len(ids) > 1:
            first = np.r_[True, ids[1:] != ids[:-1]]
            lengths = np.add.reduceat(lengths, np.flatnonzero(first))
            ids = ids[first]
        return cls(ids, np.r_[0, np.cumsum(lengths)].astype(np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1]) if len(self.starts) else 0

    def per_row(self) -> np.ndarray:
        """The subject of every row (8 bytes a row: only where rows must be re-sorted)."""
        return np.repeat(self.ids, np.diff(self.starts))

    def offsets_in(self, sorted_unique: np.ndarray) -> np.ndarray:
        """CSR offsets [len(sorted_unique) + 1] of the rows per subject of `sorted_unique` (every
        run's subject is in it; runs sorted by subject)."""
        counts = np.zeros(len(sorted_unique), np.int64)
        np.add.at(counts, np.searchsorted(sorted_unique, self.ids), np.diff(self.starts))
        offsets = np.zeros(len(sorted_unique) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return offsets


SECOND_US = 1_000_000
_MAX_OFFSET = int(np.iinfo(np.uint32).max)


@dataclass
class RowTimes:
    """Timed rows' times, kept as uint32 whole seconds after their segment's first row (a
    segment: one subject's rows), read back as int64 microseconds exactly: 4 bytes a row where
    int64 microseconds cost 8. Only for rows whose times are all whole seconds (MEDS exports of
    EHR carry seconds or minutes) and whose segments each span under 136 years; `of` says None
    otherwise and the rows keep int64 microseconds. Indexing (an int, a slice, an index array)
    and `np.asarray` give int64 microseconds, as the array it replaces."""

    starts: np.ndarray  # [segments + 1] int64 row bounds, starts[0] = 0
    base: np.ndarray  # [segments] int64 microseconds: each segment's first (earliest) time
    offset: np.ndarray  # [rows] uint32 seconds after the row's segment's base

    @classmethod
    def of(cls, time_us: np.ndarray, starts: np.ndarray) -> RowTimes | None:
        """The rows' times (int64 microseconds, ascending within each segment) as RowTimes, or
        None when they are not all whole seconds or a segment spans too long."""
        starts = np.asarray(starts, np.int64)
        base = np.asarray(time_us[starts[:-1]], np.int64)
        # Every time a whole second exactly when every base is and every row's distance from its
        # base is: one division a row gives both the offset and that test.
        offset, part_second = np.divmod(time_us - np.repeat(base, np.diff(starts)), SECOND_US)
        if np.any(base % SECOND_US) or np.any(part_second):
            return None
        if len(offset) and (int(offset.min()) < 0 or int(offset.max()) > _MAX_OFFSET):
            return None
        return cls(starts, base, offset.astype(np.uint32))

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int64)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype, copy=False)

    @overload
    def __getitem__(self, index: int | np.integer) -> np.int64: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray: ...

    def __getitem__(self, index: int | np.integer | slice | np.ndarray | list[int]) -> np.ndarray | np.int64:
        if isinstance(index, slice):
            a, b, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(a, b, step)]
            if b <= a:
                return np.zeros(0, np.int64)
            s0 = int(np.searchsorted(self.starts, a, side="right")) - 1
            s1 = int(np.searchsorted(self.starts, b, side="left"))
            bounds = np.clip(self.starts[s0 : s1 + 1], a, b)
            out = self.offset[a:b].astype(np.int64)
            out *= SECOND_US
            out += np.repeat(self.base[s0:s1], np.diff(bounds))
            return out
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if int(index) < 0 else 0)
            segment = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.int64(int(self.base[segment]) + int(self.offset[i]) * SECOND_US)
        rows = np.asarray(index)
        if rows.size == 0:  # an empty list indexes as an array does
            return np.zeros(rows.shape, np.int64)
        at = np.searchsorted(self.starts, rows, side="right") - 1
        return self.base[at] + self.offset[rows].astype(np.int64) * SECOND_US


def search_times(time_us: np.ndarray | RowTimes, start: np.ndarray, stop: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """segment_searchsorted over the timed rows: how many of a subject's rows (each range
    time-sorted) are at or before a prediction time. On RowTimes ranges inside one segment each
    are searched in their uint32 seconds, not read back: time <= key exactly when
    offset <= floor((key - base) / 1 s)."""
    if isinstance(time_us, RowTimes) and len(start) and len(time_us.base):
        start, stop = np.asarray(start, np.int64), np.asarray(stop, np.int64)
        segment = np.searchsorted(time_us.starts, start, side="right") - 1
        segment = np.clip(segment, 0, len(time_us.base) - 1)
        if np.all((stop <= start) | (stop <= time_us.starts[segment + 1])):
            second = (np.asarray(keys, np.int64) - time_us.base[segment]) // SECOND_US
            return segment_searchsorted(time_us.offset, start, stop, np.clip(second, -1, _MAX_OFFSET))
    return segment_searchsorted(time_us, start, stop, keys)


def kept_times(time_us: np.ndarray | RowTimes, runs: SubjectRuns) -> np.ndarray | RowTimes:
    """The timed rows' times as a site keeps them: RowTimes over the subjects' runs where they
    fit, int64 microseconds otherwise (the same rule however the rows were read)."""
    if isinstance(time_us, RowTimes):
        return time_us
    return RowTimes.of(time_us, runs.starts) or time_us


@dataclass
class EventRows:
    """Rows of one shard (or a whole site, `RowSink.rows`), split by kind; ids are subject ids."""

    t_subject: SubjectRuns  # [timed] sorted by (subject, time)
    t_time_us: np.ndarray | RowTimes  # [timed] int64 microseconds (RowTimes from RowSink where they fit)
    t_codes: np.ndarray  # [timed] vocabulary ids, code_dtype
    t_values: np.ndarray  # [timed] float32 normalised (0 without a value)
    t_has_value: np.ndarray  # [timed] bool
    s_subject: np.ndarray  # [static] int64, grouped by subject (non-decreasing)
    s_codes: np.ndarray  # [static]
    s_values: np.ndarray  # [static]
    s_has_value: np.ndarray  # [static]
    prs_subject: np.ndarray  # [prs] int64, reading order (a later row of a trait wins)
    prs_trait: np.ndarray  # [prs] int64 index in vocab.prs_traits, -1 unknown
    prs_raw: np.ndarray  # [prs] float64 raw value (NaN: none)
    prs_timed: np.ndarray  # [prs] bool: the row has a time (used as static all the same)
    birth_subject: np.ndarray  # [births] int64
    birth_time_us: np.ndarray  # [births] int64
    n_rows: int  # every row read (the events table's length)


def _sorted_by(group: np.ndarray, time: np.ndarray) -> bool:
    """Rows sorted by (group, time): comparisons only (no int64 differences to allocate)."""
    g0, g1 = group[:-1], group[1:]
    if np.any(g1 < g0):
        return False
    return not np.any((g1 == g0) & (time[1:] < time[:-1]))


def _by_subject_time(subject: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Stable permutation to (subject, time) order, None when already in it (the usual case)."""
    if len(subject) < 2 or _sorted_by(subject, time):
        return None
    return np.lexsort((time, subject))


def _by_subject(subject: np.ndarray) -> np.ndarray | None:
    if len(subject) < 2 or np.all(subject[1:] >= subject[:-1]):
        return None
    return np.argsort(subject, kind="stable")


SLICE_ROWS = 1 << 16  # rows encoded at a time: every per-row temporary stays in the CPU's cache


def subject_slices(events: pa.Table, rows: int | None = None) -> Iterator[pa.Table]:
    """A shard as zero-copy slices of about `rows` rows (default SLICE_ROWS), each of whole
    subjects, in order: what
    `shard_rows` gives for the slices one after another equals what it gives for the shard,
    since it never looks across subjects. A shard not grouped by subject (ascending) is one
    slice (its rows are sorted as a whole)."""
    n, rows = events.num_rows, SLICE_ROWS if rows is None else max(int(rows), 1)
    subject = events["subject_id"]
    if n <= rows or subject.null_count:
        yield events
        return
    ids = np.asarray(subject.to_numpy(), np.int64)
    if np.any(ids[1:] < ids[:-1]):
        yield events
        return
    # Each cut at the first row of the subject found `rows` past the last cut (past that
    # subject, if it began before the last cut: a subject of more than `rows` rows).
    cuts = [0]
    while cuts[-1] + rows < n:
        subject_there = ids[cuts[-1] + rows]
        cut = int(np.searchsorted(ids, subject_there, side="left"))
        if cut <= cuts[-1]:
            cut = int(np.searchsorted(ids, subject_there, side="right"))
        if cut >= n:
            break
        cuts.append(cut)
    cuts.append(n)
    for a, b in zip(cuts[:-1], cuts[1:]):
        yield events.slice(a, b - a)


def _rows_of(entry_flag: np.ndarray, row_entry: np.ndarray) -> np.ndarray:
    """Per row, its dictionary entry's flag; no per-row pass when no entry has it (an EHR shard
    has no PRS code)."""
    return entry_flag[row_entry] if entry_flag.any() else np.zeros(len(row_entry), bool)


def shard_rows(events: pa.Table, vocab: Vocabulary, reading_order: bool = False) -> EventRows:
    """EventRows of one events table (subject_id, time, code, optional numeric_value).

    reading_order: PRS rows are put in Site.read_events's order (per subject, static first, then
    by time) so that a duplicate trait resolves as a load from read_events did; otherwise they stay
    in table order (as SiteSequences on a table always took them)."""
    n = events.num_rows
    subject = np.asarray(events["subject_id"].to_numpy(), dtype=np.int64)
    time_us = to_us(events["time"], "time")
    # As stored (MEDS: float32, nulls read as NaN): only the rows with a value are widened to
    # float64 (normalise_values), which a float32 gives back exactly.
    raw = (
        events["numeric_value"].to_numpy(zero_copy_only=False)
        if "numeric_value" in events.column_names
        else np.full(n, np.nan)
    )
    code = events["code"].combine_chunks() if n else pa.array([], pa.string())
    if pa.types.is_dictionary(code.type) and code.dictionary.null_count:
        code = code.cast(code.type.value_type)  # a null among the values: counted below, per row
    if code.null_count:
        raise ValueError(f"events column 'code' has {code.null_count} null values")
    # The shard's distinct codes are looked up once; rows carry indices into them (a dictionary
    # column as read from parquet (Site.iter_event_shards) already is that; its unused or
    # repeated values are harmless: only the entries rows point at are read).
    enc = code if pa.types.is_dictionary(code.type) else pc.dictionary_encode(code)
    dictionary = enc.dictionary
    if not pa.types.is_string(dictionary.type):
        dictionary = dictionary.cast(pa.string())  # the vocabulary's lookup is of strings
    row_entry = enc.indices.to_numpy(zero_copy_only=False)  # int32: an index needs no widening
    dtype = code_dtype(vocab.vocab_size)
    ids = vocab.encode(dictionary).astype(dtype)[row_entry] if n else np.zeros(0, dtype)
    entry_prs = pc.fill_null(pc.starts_with(dictionary, PRS_PREFIX), False).to_numpy(zero_copy_only=False)
    entry_birth = pc.fill_null(pc.equal(dictionary, BIRTH_CODE), False).to_numpy(zero_copy_only=False)
    is_prs = _rows_of(entry_prs, row_entry)
    values, has_value = vocab.normalise_values(ids, raw)

    timed = time_us != NO_TIME
    static = ~timed & ~is_prs
    # Row indices once, not a boolean mask per column (each would count its rows again).
    timed_rows = np.flatnonzero(timed)
    # Every row timed (a slice of an EHR shard, as a rule): views, copied once by the sink.
    t_rows: np.ndarray | slice = slice(None) if len(timed_rows) == n else timed_rows
    t_sub, t_time = subject[t_rows], time_us[t_rows]
    t_cols = [ids[t_rows], values[t_rows], has_value[t_rows]]
    order = _by_subject_time(t_sub, t_time)
    if order is not None:
        t_sub, t_time = t_sub[order], t_time[order]
        t_cols = [c[order] for c in t_cols]
    s_rows = np.flatnonzero(static)
    s_sub = subject[s_rows]
    s_cols = [ids[s_rows], values[s_rows], has_value[s_rows]]
    order = _by_subject(s_sub)
    if order is not None:
        s_sub = s_sub[order]
        s_cols = [c[order] for c in s_cols]

    prs_rows = np.flatnonzero(is_prs)
    if reading_order and len(prs_rows) > 1:
        key = np.where(timed[prs_rows], time_us[prs_rows], _STATIC_FIRST)
        prs_rows = prs_rows[np.lexsort((key, subject[prs_rows]))]
    if len(prs_rows) and vocab.prs_traits:
        trait = pc.utf8_slice_codeunits(dictionary, len(PRS_PREFIX))
        entry_trait = pc.fill_null(pc.index_in(trait, value_set=pa.array(vocab.prs_traits, pa.string())), -1)
        prs_trait = entry_trait.to_numpy(zero_copy_only=False).astype(np.int64)[row_entry[prs_rows]]
    else:
        prs_trait = np.full(len(prs_rows), -1, np.int64)
    is_birth = _rows_of(entry_birth, row_entry) & timed
    return EventRows(
        t_subject=SubjectRuns.of(t_sub),
        t_time_us=t_time,
        t_codes=t_cols[0],
        t_values=t_cols[1],
        t_has_value=t_cols[2],
        s_subject=s_sub,
        s_codes=s_cols[0],
        s_values=s_cols[1],
        s_has_value=s_cols[2],
        prs_subject=subject[prs_rows],
        prs_trait=prs_trait,
        prs_raw=raw[prs_rows].astype(np.float64),
        prs_timed=timed[prs_rows],
        birth_subject=subject[is_birth],
        birth_time_us=time_us[is_birth],
        n_rows=n,
    )


def _by_subject_runs(subject: np.ndarray) -> np.ndarray | None:
    """Permutation grouping rows by subject (ascending) by moving whole runs of a subject (a
    shard's rows), stable: a subject's runs keep their order. None when nothing moves."""
    if len(subject) < 2 or np.all(subject[1:] >= subject[:-1]):
        return None
    starts = np.flatnonzero(np.r_[True, subject[1:] != subject[:-1]])
    stops = np.r_[starts[1:], len(subject)]
    run_order = np.argsort(subject[starts], kind="stable")
    return ranges(starts[run_order], stops[run_order])[2]


_TIMED = ["t_subject", "t_time_us", "t_codes", "t_values", "t_has_value"]
_STATIC = ["s_subject", "s_codes", "s_values", "s_has_value"]
_REST = [f.name for f in fields(EventRows) if f.name not in ("n_rows", *_TIMED, *_STATIC)]


class RowSink:
    """The shards' EventRows, copied as they come into arrays sized once for the whole site
    (`capacity`: the shards' rows from their parquet footers), so that a site is never held twice:
    no list of parts joined at the end (whose copy doubled the load's peak), and the capacity's
    pages past the last row are never written, so never resident. An underestimate only grows
    the arrays (a copy). `rows()` gives the order the module docstring spells."""

    def __init__(self, capacity: int = 0) -> None:
        self._capacity = max(int(capacity), 0)
        self._arrays: dict[str, np.ndarray] = {}
        self._used = {"t": 0, "s": 0}
        self._runs: list[SubjectRuns] = []  # the timed rows' subjects, part by part
        # Times as RowTimes (uint32 seconds after each part's subject runs' first row) while every
        # part's fit; the first that does not turns them all into int64 microseconds.
        self._compact_times = True
        self._time_bases: list[np.ndarray] = []
        self._last: dict[str, int] = {}  # the last subject added, per kind
        self._rest: dict[str, list[np.ndarray]] = {name: [] for name in _REST}
        self._in_order = {"t": True, "s": True}  # parts so far by subject, none overlapping
        self._blocks: dict[str, list[tuple[int, int, int, int]]] = {"t": [], "s": []}  # rows, subjects
        self._n_rows = 0

    def add(self, part: EventRows) -> None:
        for kind, names in (("t", _TIMED[1:]), ("s", _STATIC)):
            at = self._used[kind]
            if kind == "t":
                runs = part.t_subject
                self._runs.append(runs)
                k, ids = len(runs), runs.ids
            else:
                ids = part.s_subject
                k = len(ids)
            if k and at and self._last[kind] >= ids[0]:
                self._in_order[kind] = False
            if k:
                self._blocks[kind].append((at, at + k, int(ids[0]), int(ids[-1])))
                self._last[kind] = int(ids[-1])
            for name in names:
                column = getattr(part, name)
                if name == "t_time_us":
                    column = self._time_column(part)
                buffer = self._arrays.get(name)
                if buffer is None or len(buffer) < at + k:
                    buffer = self._grow(buffer, at, max(self._capacity, 2 * at + k), column.dtype)
                    self._arrays[name] = buffer
                buffer[at : at + k] = column
                setattr(part, name, column[:0].copy())  # released once copied (a view would keep it)
            self._used[kind] = at + k
        for name in _REST:
            self._rest[name].append(getattr(part, name))
        self._n_rows += part.n_rows

    def _time_column(self, part: EventRows) -> np.ndarray:
        """What the sink stores of a part's times: its RowTimes offsets while they fit."""
        time_us = np.asarray(part.t_time_us, np.int64)
        if self._compact_times:
            kept = RowTimes.of(time_us, part.t_subject.starts)
            if kept is not None:
                self._time_bases.append(kept.base)
                return kept.offset
            stored = self._arrays.get("t_time_us")  # this part's do not fit: every part's in int64
            if stored is not None:
                before = np.asarray(self._stored_times(stored[: self._used["t"]], self._runs[:-1]))
                self._arrays["t_time_us"] = self._grow(before, len(before), len(stored), np.dtype(np.int64))
            self._compact_times = False
        return time_us

    def _stored_times(self, stored: np.ndarray, runs: list[SubjectRuns]) -> np.ndarray | RowTimes:
        """The stored times of the parts of `runs`, as RowTimes (segments: each part's runs) or
        int64 microseconds."""
        if not self._compact_times:
            return stored
        lengths = [np.diff(r.starts) for r in runs]
        starts = np.r_[0, np.cumsum(np.concatenate(lengths))] if lengths else np.zeros(1)
        bases = np.concatenate(self._time_bases) if self._time_bases else np.zeros(0, np.int64)
        return RowTimes(starts.astype(np.int64), bases, stored)

    @staticmethod
    def _grow(buffer: np.ndarray | None, used: int, size: int, dtype: np.dtype) -> np.ndarray:
        grown = np.empty(size, dtype)
        if buffer is not None:
            grown[:used] = buffer[:used]
        return grown

    def _placed(self, kind: str, names: list[str]) -> dict[str, np.ndarray]:
        """One kind's columns by subject, each column moved on its own (a site plus one column
        at the peak): parts whose subjects do not overlap (shards named out of subject order) as
        blocks, others (a subject in two shards) by moving the runs of a subject."""
        used = self._used[kind]
        blocks = sorted(self._blocks[kind], key=lambda blk: blk[2])
        disjoint = all(x[3] < y[2] for x, y in zip(blocks[:-1], blocks[1:]))
        perm = None if disjoint else _by_subject_runs(self._arrays[names[0]][:used])
        out = {}
        for name in names:
            column = self._arrays.pop(name)[:used]
            if disjoint:
                placed, at = np.empty_like(column), 0
                for start, stop, _, _ in blocks:
                    placed[at : at + stop - start] = column[start:stop]
                    at += stop - start
                out[name] = placed
            else:
                out[name] = column if perm is None else column[perm]
            del column
        return out

    def rows(self) -> EventRows:
        """Every row added, in the order the module docstring spells (the sink is consumed)."""
        if not self._arrays:
            raise ValueError("RowSink.rows: no part was added")
        out: dict[str, Any] = {}
        t_runs = SubjectRuns.join(self._runs)
        times = self._stored_times(self._arrays.pop("t_time_us")[: self._used["t"]], self._runs)
        if self._in_order["t"]:  # each part's runs are the site's: the times are kept as they are
            out["t_time_us"] = times
        else:  # rows to re-sort: only they need a subject and a time per row
            self._arrays["t_subject"] = t_runs.per_row()
            self._arrays["t_time_us"] = np.asarray(times)
        for kind, names in (("t", _TIMED), ("s", _STATIC)):
            if self._in_order[kind]:
                out.update({name: self._arrays.pop(name)[: self._used[kind]] for name in names if name in self._arrays})
            else:
                out.update(self._placed(kind, names))
        # A subject in two shards whose times interleave: sort, stably (reading order kept in ties).
        order = None if self._in_order["t"] else _by_subject_time(out["t_subject"], out["t_time_us"])
        for name in _TIMED if order is not None else ():
            out[name] = out[name][order]  # column by column: one copy at a time
        subjects = t_runs if self._in_order["t"] else SubjectRuns.of(out.pop("t_subject"))
        out["t_time_us"] = kept_times(out["t_time_us"], subjects)
        rest = {name: np.concatenate(parts) for name, parts in self._rest.items()}
        return EventRows(t_subject=subjects, **out, **rest, n_rows=self._n_rows)


__all__ = [
    "NO_TIME",
    "SECOND_US",
    "EventRows",
    "RowSink",
    "RowTimes",
    "SubjectRuns",
    "kept_times",
    "code_dtype",
    "shard_rows",
    "subject_slices",
    "to_us",
    "us_arrow",
]
