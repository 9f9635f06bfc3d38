"""One gate for every number a site releases: it remembers what the site released before and
holds back a figure whose release would describe fewer than the site's minimum of subjects.

A released figure is a *field*: one code's statistics, a wearable channel's, the site's totals,
a capability count, one task key's split (its metrics, counts, histogram, reason counts, the
head's statistics), a count of embedded rows. Each field's value is a function of per-subject
contributions, and each contribution has a fingerprint (healthfm_core/privacy/contributions.py):
a 64-bit hash of exactly the subject's rows that enter the figure. A subject is changed for a
field when its (subject, fingerprint) pair differs.

The rule (cells). Over all the versions of a field the site ever released fresh with numbers
(present), every cell of their Venn diagram over (subject, fingerprint) pairs (the pairs that
are in exactly a given set of versions) holds 0 or at least the minimum of distinct subjects. A
candidate that would break it is held. Why that suffices for every figure made of sums (counts,
sums, sums of squares, hence means and variances, sketch buckets, histogram cells, positives):
such a figure is F(V) = sum of f(p) over the pairs p of version V, so for any coefficients a_i,

    sum_i a_i F(V_i) = sum over cells C of (sum of a_i over the versions C is in) x F(C),

a combination of cell totals F(C), each over 0 or at least the minimum of subjects: no
combination of any number of releases (two launches around one added subject, a budget of K
and of K + 1, four evaluations A - B - C + D) describes fewer than the minimum. A subject's
changed rows leave its old pair in the old versions' cells and put a new pair in the new one's,
so "one new lab value" is a cell of one subject, held like an added subject.

Presence. A field below its floor is absent (a code seen in fewer than min_code_subjects
subjects is not named, a split below min_report_subjects gives only a reason): absence releases
one bit, "fewer than the minimum". An absent candidate is released only if its pairs differ
from every present version's by 0 or at least the minimum of subjects, and a present one only
if they differ so from every absent version's (pairwise, recorded like present versions): a
presence flip then says at most that one of at least the minimum of changed subjects has it.

What a held field sends: the field's last released value (identical to what an unchanged field
sends, so holding reveals nothing), or nothing when it was never released; a caller that cannot
send a stale value (an evaluation's metrics, the head's statistics) withholds the figure with a
reason that carries no count. Fields a caller groups (a task key's splits) are released or held
together.

What it does not cover: figures that are not sums of contributions, a model's scores above all.
A crafted model (the server sends the weights evaluated; the head's requests carry its weights)
can make a score depend on one subject's rows; a probe fitted on the train split moves the
held-out metric (AUROC, a non-linear function of every row); MEDS-Tab keeps the features seen
in enough train subjects of every task asked. The gate bounds what differencing releases of
data versions reveals, not what one crafted query does: DP (healthfm_core/privacy/) is the
guard there.

Cost: a field's figure lags its data until at least the minimum of subjects changed in every
cell touched (the vocabulary's statistics by up to minimum - 1 changed subjects per code; an
evaluation's task key is withheld while fewer than the minimum of its subjects changed); cells
only get smaller, so a field released fresh many times needs changes spread over its cells.

Storage: STATE_DIR/released/<kind>.parquet, one per kind (capabilities, code_stats,
evaluation): a row per (field, subject, fingerprint) the site ever released, with the cell it
is in; the fields' versions (present or absent), cells and last released values in the file's
metadata beside a sha256 of everything, so a truncated, edited or foreign file fails closed
naming the file. Written atomically (healthfm_core/files.py) under a file lock shared by every
process of the site, before the reply leaves. Subject ids never leave the site. Without a state
dir the record is in memory, for the process. Size: linear in subjects x fields
(docs/performance.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from healthfm_core.files import atomic_write_bytes
from healthfm_core.privacy.contributions import FieldPairs
from healthfm_core.strict_files import StrictFileError, strict_model

RELEASED_DIR = "released"
GATE_KINDS = ("capabilities", "code_stats", "evaluation")
_META_KEY = b"healthfm.released"
_SHA_KEY = b"healthfm.released.sha256"
_SCHEMA = pa.schema(
    [
        pa.field("field", pa.int32(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("fingerprint", pa.uint64(), nullable=False),
        pa.field("cell", pa.int32(), nullable=False),
    ]
)


class ReleaseGateError(RuntimeError):
    """The record of released figures could not be read or written: nothing is released until
    the site admin restores it (docs/site-admin.md)."""


class _Field(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    states: list[bool]  # per version released fresh: present (numbers) or absent (below the floor)
    cells: list[list[int]]  # per cell: the versions its pairs are in, increasing
    last: int | None  # the version released last (None: an absent release without pairs, or none)
    released: JsonValue = None  # what was sent last (None: nothing)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["healthfm-released"]
    version: Literal[1]
    kind: str
    fields: list[_Field]


@dataclass
class _State:
    fields: list[_Field]
    field: np.ndarray  # int32 per row, sorted by (field, subject, fingerprint)
    subject: np.ndarray  # int64
    fingerprint: np.ndarray  # uint64
    cell: np.ndarray  # int32: index into its field's cells

    @classmethod
    def empty(cls) -> _State:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int32))


@dataclass(frozen=True)
class Candidates:
    """What a site would release now: per field its pairs (FieldPairs), whether it is present
    (its numbers leave) or absent (below its floor), the value it would send, and its group
    (fields of one group are released or held together; default: each field its own).
    `complete`: these are all the fields of the kind, so a field released before and missing
    here is absent, without pairs (a code no subject has any more)."""

    pairs: FieldPairs
    present: Sequence[bool]
    values: Sequence[Any]
    groups: Sequence[str] | None = None
    complete: bool = False

    def __post_init__(self) -> None:
        n = len(self.pairs.names)
        if len(self.present) != n or len(self.values) != n or (self.groups is not None and len(self.groups) != n):
            raise ValueError(f"{n} fields but {len(self.present)} presences, {len(self.values)} values")
        if len(set(self.pairs.names)) != n:
            raise ValueError("a field named twice")


@dataclass
class Decision:
    """Per candidate field: what leaves (`values`: the candidate's value when released, else
    the field's last released value; None: nothing), and the fields held."""

    values: dict[str, Any] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)


class ReleaseGate:
    """The record of one kind of release at one site and the rule (module docstring)."""

    def __init__(self, state_dir: Path | None, kind: str, minimum: int) -> None:
        if kind not in GATE_KINDS:
            raise ValueError(f"release gate kind {kind!r}: expected one of {GATE_KINDS}")
        if minimum < 1:
            raise ValueError(f"release gate minimum {minimum}: must be >= 1")
        self.kind, self.minimum = kind, minimum
        self.path = Path(state_dir) / RELEASED_DIR / f"{kind}.parquet" if state_dir is not None else None
        self._lock = threading.Lock()
        self._state = _State.empty()
        self._seen: tuple[int, int, int] | None = None  # the file's (inode, size, mtime) last read
        self._changes = 0  # records written by this gate
        # Candidates decided before, by digest, with the record they were decided against: the
        # same candidates against the same record are the same decision (the head asks per stage).
        self._decided: dict[str, tuple[Any, Decision]] = {}
        if self.path is not None:
            with self._locked():
                self._state = self._read()  # a damaged record fails at once

    def release(self, candidates: Candidates) -> Decision:
        """Decide every candidate field, record what is released fresh (written before this
        returns, i.e. before the reply leaves) and say what to send."""
        digest = _digest(candidates)
        with self._lock, self._locked():
            state = self._read() if self.path is not None else self._state
            stamp = (self._seen, self._changes)
            if (memo := self._decided.get(digest)) is not None and memo[0] == stamp:
                return memo[1]
            decision, new, dirty = _decide(state, candidates, self.minimum)
            if dirty:
                if self.path is not None:
                    self._write(new)
                self._changes += 1
            self._state = new
            if dirty or len(self._decided) > 64:
                self._decided = {}
            self._decided[digest] = ((self._seen, self._changes), decision)
            return decision

    def released(self) -> dict[str, Any]:
        """Every field's last released value (None: absent or never released), as recorded."""
        with self._lock, self._locked():
            state = self._read() if self.path is not None else self._state
            self._state = state
            return {f.name: f.released for f in state.fields}

    # ------------------------------------------------------------------ storage

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_suffix(".lock"), "a")
        except OSError as err:
            raise ReleaseGateError(f"{self.path}: cannot lock the record ({err}); nothing is released") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> _State:
        assert self.path is not None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen = None
            return _State.empty()
        except OSError as err:
            raise ReleaseGateError(f"{self.path}: unreadable ({err})") from None
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen == self._seen:
            return self._state
        state = read_record(self.path, self.kind)
        self._seen = seen
        return state

    def _write(self, state: _State) -> None:
        assert self.path is not None
        try:
            atomic_write_bytes(self.path, record_bytes(state, self.kind))
            stat = self.path.stat()
        except OSError as err:
            raise ReleaseGateError(f"{self.path}: not written ({err}); nothing is released") from None
        self._seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _digest(candidates: Candidates) -> str:
    pairs = candidates.pairs
    digest = hashlib.sha256(json.dumps([pairs.names, list(map(bool, candidates.present))]).encode())
    digest.update(json.dumps([list(candidates.values), candidates.groups, candidates.complete]).encode())
    for array in (pairs.field, pairs.subject, pairs.fingerprint):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _content_sha256(manifest: bytes, state: _State) -> str:
    digest = hashlib.sha256(manifest)
    for array in (state.field, state.subject, state.fingerprint, state.cell):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def record_bytes(state: _State, kind: str) -> bytes:
    """The record as parquet bytes: the rows, the manifest and their sha256 in its metadata."""
    manifest = _Manifest(format="healthfm-released", version=1, kind=kind, fields=state.fields)
    manifest_bytes = manifest.model_dump_json().encode()
    table = pa.table(
        [
            pa.array(state.field, pa.int32()),
            pa.array(state.subject, pa.int64()),
            pa.array(state.fingerprint, pa.uint64()),
            pa.array(state.cell, pa.int32()),
        ],
        schema=_SCHEMA.with_metadata(
            {_META_KEY: manifest_bytes, _SHA_KEY: _content_sha256(manifest_bytes, state).encode()}
        ),
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_record(path: Path, kind: str) -> _State:
    """A record written by record_bytes, checked whole; ReleaseGateError naming the file and
    what is wrong otherwise."""

    def bad(what: str) -> ReleaseGateError:
        return ReleaseGateError(
            f"{path}: {what}: the record of what this site released is damaged; nothing is released until "
            "it is restored (docs/site-admin.md, 'The release gate')"
        )

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise bad(f"not a readable parquet file ({err})") from None
    meta = table.schema.metadata or {}
    if _META_KEY not in meta or _SHA_KEY not in meta:
        raise bad("no manifest in its metadata")
    if not table.schema.remove_metadata().equals(_SCHEMA.remove_metadata()):
        raise bad(f"columns {table.schema.remove_metadata()}, expected {_SCHEMA.remove_metadata()}")
    try:
        manifest = strict_model(_Manifest, meta[_META_KEY], path)
    except StrictFileError as err:
        raise bad(str(err)) from None
    except ValidationError as err:
        first = err.errors()[0]
        raise bad(f"manifest field {'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg')}") from None
    if manifest.kind != kind:
        raise bad(f"a record of {manifest.kind!r}, not {kind!r}")
    state = _State(
        fields=manifest.fields,
        field=table["field"].to_numpy().astype(np.int32),
        subject=table["subject_id"].to_numpy().astype(np.int64),
        fingerprint=table["fingerprint"].to_numpy().astype(np.uint64),
        cell=table["cell"].to_numpy().astype(np.int32),
    )
    if _content_sha256(meta[_META_KEY], state).encode() != meta[_SHA_KEY]:
        raise bad("its content does not match its sha256 (edited or truncated)")
    if problem := _state_problem(state):
        raise bad(problem)
    return state


def _state_problem(state: _State) -> str | None:
    """What is inconsistent in a record (None: nothing)."""
    names = [f.name for f in state.fields]
    if len(set(names)) != len(names):
        return "a field named twice"
    for info in state.fields:
        n = len(info.states)
        if info.last is not None and not 0 <= info.last < n:
            return f"field {info.name!r}: last version {info.last} of {n}"
        if any(not cell or cell != sorted(set(cell)) or cell[0] < 0 or cell[-1] >= n for cell in info.cells):
            return f"field {info.name!r}: a cell outside its {n} versions"
    if len(state.field) and (state.field.min() < 0 or state.field.max() >= len(state.fields)):
        return "a row of an unknown field"
    cells = np.array([len(info.cells) for info in state.fields], np.int64)
    if len(state.cell) and (np.any(state.cell < 0) or np.any(state.cell >= cells[state.field])):
        return "a row in an unknown cell"
    if not _increasing(state.field, state.subject, state.fingerprint):
        return "rows out of order or repeated"
    return None


def _increasing(f: np.ndarray, s: np.ndarray, p: np.ndarray) -> bool:
    """Whether the rows are strictly increasing by (field, subject, fingerprint)."""
    if len(f) < 2:
        return True
    same_f, same_s = f[1:] == f[:-1], s[1:] == s[:-1]
    return bool(np.all((f[1:] > f[:-1]) | (same_f & ((s[1:] > s[:-1]) | (same_s & (p[1:] > p[:-1]))))))


# ---------------------------------------------------------------------- the rule


def _distinct(subjects: np.ndarray) -> int:
    return len(np.unique(subjects))


def _small(n: int, minimum: int) -> bool:
    return 0 < n < minimum


def _decide(state: _State, cands: Candidates, minimum: int) -> tuple[Decision, _State, bool]:
    """Every candidate field decided against the record; the record after it; whether it changed."""
    fields = list(state.fields)  # copied before a field is changed: the record read stays as read
    index = {f.name: i for i, f in enumerate(fields)}
    names = cands.pairs.names
    for name in names:
        if name not in index:
            index[name] = len(fields)
            fields.append(_Field(name=name, states=[], cells=[], last=None, released=None))
    cand_id = np.array([index[n] for n in names], dtype=np.int32)
    present = {int(cand_id[i]): bool(cands.present[i]) for i in range(len(names))}
    value = {int(cand_id[i]): _json(cands.values[i]) for i in range(len(names))}
    group = {int(cand_id[i]): (cands.groups[i] if cands.groups is not None else names[i]) for i in range(len(names))}
    if cands.complete:  # a field of the record not named now: absent, no pairs
        for i, f in enumerate(fields):
            if i not in present:
                present[i], value[i], group[i] = False, None, f.name
    scope = np.array(sorted(present), dtype=np.int32)
    if _as_last_released(state, fields, cand_id, cands.pairs, present, value):
        decision = Decision(values={fields[f].name: fields[f].released for f in scope.tolist()})
        return decision, state, False

    # Every pair of the fields in scope, stored or candidate, once: its cell (-1: new), whether
    # the candidate has it.
    stored = np.isin(state.field, scope)
    f_all = np.concatenate([state.field[stored], cand_id[cands.pairs.field]]).astype(np.int32)
    s_all = np.concatenate([state.subject[stored], cands.pairs.subject]).astype(np.int64)
    p_all = np.concatenate([state.fingerprint[stored], cands.pairs.fingerprint]).astype(np.uint64)
    c_all = np.concatenate([state.cell[stored], np.full(len(cands.pairs.subject), -1, np.int32)])
    in_all = np.concatenate([np.zeros(int(stored.sum()), bool), np.ones(len(cands.pairs.subject), bool)])
    order = np.lexsort((p_all, s_all, f_all))  # stable: a stored pair before its candidate twin
    f_all, s_all, p_all, c_all, in_all = f_all[order], s_all[order], p_all[order], c_all[order], in_all[order]
    twin = np.zeros(len(f_all), bool)
    if len(f_all) > 1:
        twin[1:] = (f_all[1:] == f_all[:-1]) & (s_all[1:] == s_all[:-1]) & (p_all[1:] == p_all[:-1])
    in_all[np.flatnonzero(twin) - 1] = True  # the stored pair the candidate has again
    first = ~twin
    uf, us, up, ucell, uin = f_all[first], s_all[first], p_all[first], c_all[first], in_all[first]
    bounds = np.searchsorted(uf, np.append(scope, np.iinfo(np.int32).max))
    span = {int(f): (int(bounds[i]), int(bounds[i + 1])) for i, f in enumerate(scope)}

    passed: dict[int, bool] = {}
    for f in scope.tolist():
        a, b = span[f]
        info = fields[f]
        if info.last is not None and info.states[info.last] == present[f]:
            if np.array_equal(uin[a:b], _in_version(info, info.last, ucell[a:b])):
                continue  # exactly the pairs released last: what was sent then is sent again
        elif info.last is None and not uin[a:b].any() and not present[f] and info.released == value[f]:
            continue
        passed[f] = _passes(info, present[f], ucell[a:b], uin[a:b], us[a:b], minimum)
    held_groups = {group[f] for f, ok in passed.items() if not ok}

    keep = ~stored
    rows: list[tuple[np.ndarray, ...]] = [
        (state.field[keep], state.subject[keep], state.fingerprint[keep], state.cell[keep])
    ]
    touched = []
    for f in scope.tolist():
        a, b = span[f]
        cells = ucell[a:b]
        if f in passed and group[f] not in held_groups:
            fields[f] = fields[f].model_copy(deep=True)
            cells = _record(fields[f], present[f], value[f], cells, uin[a:b])
            touched.append(f)
        old = cells >= 0  # a held field keeps its record; a pair never released is dropped
        rows.append((uf[a:b][old], us[a:b][old], up[a:b][old], cells[old]))
    decision = Decision()
    for f in scope.tolist():
        name = fields[f].name
        if group[f] in held_groups:
            decision.held.add(name)
        decision.values[name] = fields[f].released
    new = _compact(fields, rows, touched)
    return decision, new, bool(touched) or len(new.fields) != len(state.fields)


def _as_last_released(
    state: _State,
    fields: list[_Field],
    cand_id: np.ndarray,
    pairs: FieldPairs,
    present: Mapping[int, bool],
    value: Mapping[int, Any],
) -> bool:
    """Whether every field in scope is exactly as released last (every launch of an unchanged
    site, every round of a run): checked in one pass, without the sort a change needs."""
    if len(fields) != len(state.fields):
        return False  # a field never released
    for f, here in present.items():
        info = fields[f]
        if info.last is None:
            if here or info.released != value[f]:
                return False
        elif info.states[info.last] != here:
            return False
    # Each stored pair in its field's last version, and each field's last versions' pairs only.
    member = [
        [info.last is not None and f in present and info.last in c for c in info.cells] for f, info in enumerate(fields)
    ]
    offsets = np.cumsum([0] + [len(m) for m in member])
    flat = np.array([x for m in member for x in m], bool)
    last = flat[offsets[state.field] + state.cell] if len(state.cell) else np.zeros(0, bool)
    mapped = cand_id[pairs.field]
    order = np.argsort(mapped, kind="stable")  # a field's pairs stay sorted by subject
    return (
        int(last.sum()) == len(mapped)
        and np.array_equal(state.field[last], mapped[order])
        and np.array_equal(state.subject[last], pairs.subject[order])
        and np.array_equal(state.fingerprint[last], pairs.fingerprint[order])
    )


def _json(value: Any) -> Any:
    """A value as it is sent and stored: JSON (int keys become strings, as on disk)."""
    return json.loads(json.dumps(value))


def _in_version(info: _Field, version: int | None, cells: np.ndarray) -> np.ndarray:
    """Per pair (its cell, -1: none): whether it is in `version`."""
    if version is None or not info.cells:
        return np.zeros(len(cells), bool)
    member = np.array([version in c for c in info.cells] + [False])
    return member[np.where(cells >= 0, cells, len(info.cells))]


def _passes(info: _Field, present: bool, cells: np.ndarray, inc: np.ndarray, subject: np.ndarray, minimum: int) -> bool:
    """The rule for one changed field (module docstring)."""
    for v, state in enumerate(info.states):  # presence flips: pairwise, the minimum of subjects apart
        if state != present and _small(_distinct(subject[_in_version(info, v, cells) != inc]), minimum):
            return False
    if not present:
        return True
    # Cells over the present versions, each split by the candidate: 0 or the minimum of subjects.
    patterns: dict[tuple[int, ...], int] = {(): 0}
    code = [patterns.setdefault(tuple(v for v in c if info.states[v]), len(patterns)) for c in info.cells]
    pattern = np.array([*code, 0], np.int64)[np.where(cells >= 0, cells, len(info.cells))]
    counted = (pattern > 0) | inc
    if not counted.any():
        return True
    key = pattern[counted] * 2 + inc[counted]
    pairs = np.unique(np.stack([key, subject[counted]]), axis=1)
    sizes = np.unique(pairs[0], return_counts=True)[1]
    return not any(_small(int(n), minimum) for n in sizes)


def _record(info: _Field, present: bool, value: Any, cells: np.ndarray, inc: np.ndarray) -> np.ndarray:
    """Record a field released fresh; its pairs' new cells (-1: not recorded)."""
    info.released = value
    for v, state in enumerate(info.states):  # the same pairs as an earlier version: no new version
        if state == present and (inc.any() or present) and np.array_equal(inc, _in_version(info, v, cells)):
            info.last = v
            return cells
    if not inc.any() and not present:  # absent with no pairs: nothing to remember but the value
        info.last = None
        return cells
    k = len(info.states)
    info.states.append(present)
    info.last = k
    out = cells.copy()
    grown: dict[int, int] = {}
    for old in np.unique(cells[inc]).tolist():
        grown[old] = len(info.cells)
        info.cells.append([*(info.cells[old] if old >= 0 else []), k])
    out[inc] = np.array([grown[c] for c in cells[inc].tolist()], np.int32)
    return out


def _compact(fields: list[_Field], rows: list[tuple[np.ndarray, ...]], touched: Sequence[int]) -> _State:
    """The record sorted, the touched fields' unused cells dropped, and fields that hold
    nothing (never released) dropped, renumbered."""
    f = np.concatenate([r[0] for r in rows]).astype(np.int32)
    s = np.concatenate([r[1] for r in rows]).astype(np.int64)
    p = np.concatenate([r[2] for r in rows]).astype(np.uint64)
    c = np.concatenate([r[3] for r in rows]).astype(np.int32)
    if not _increasing(f, s, p):  # a kind decided whole comes out in order already
        order = np.lexsort((p, s, f))
        f, s, p, c = f[order], s[order], p[order], c[order]
    for i in touched:
        a, b = np.searchsorted(f, [i, i + 1])
        used = np.unique(c[a:b])
        remap = np.full(len(fields[i].cells), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        c[a:b] = remap[c[a:b]]
        fields[i].cells = [fields[i].cells[u] for u in used.tolist()]
    kept = [i for i, info in enumerate(fields) if info.states or info.released is not None]
    new_id = np.full(len(fields), -1, np.int32)
    new_id[kept] = np.arange(len(kept), dtype=np.int32)
    return _State([fields[i] for i in kept], new_id[f] if len(f) else f, s, p, c)


def candidates_of(parts: Mapping[str, tuple[np.ndarray, np.ndarray, bool, Any]], **kwargs: Any) -> Candidates:
    """Candidates from per-field (subjects, fingerprints, present, value)."""
    pairs = FieldPairs.of({name: (p[0], p[1]) for name, p in parts.items()})
    return Candidates(pairs, [parts[n][2] for n in pairs.names], [parts[n][3] for n in pairs.names], **kwargs)


__all__ = [
    "GATE_KINDS",
    "RELEASED_DIR",
    "Candidates",
    "Decision",
    "ReleaseGate",
    "ReleaseGateError",
    "candidates_of",
    "read_record",
    "record_bytes",
]
