"""The run files as the dashboard reads them: each parsed once per change, none held whole.

A federation that runs for weeks holds thousands of rounds in each rounds.jsonl and audit.jsonl,
and tens of runs; the page is read again whenever a file changes (every round). So a file is
parsed again only when its stat (inode, size, modification and change times) changed, and an
append-only file (rounds.jsonl, audit.jsonl) that only grew, the bytes read before unchanged
(their sha256, one pass over bytes, no parsing), is parsed from where the last read ended: the
cost of a page follows what changed, not the federation's history. Any other change (an edit, a
truncation, a replaced file) is read again from the start. rounds.jsonl's events are not kept:
each is folded, once, into what the page shows of it (view.py's folds, of bounded size), so the
dashboard's memory does not grow with the rounds recorded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from server.audit import AuditCheck, AuditLogError, ChainReader, read_anchor
from server.runlog import event_of_line

T = TypeVar("T")
S = TypeVar("S")
StatKey = tuple[int, int, int, int]


def stat_key(path: Path) -> StatKey | None:
    """What changes when the file does (None: no such file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Grown:
    """An append-only file read up to `size` bytes (whole lines), whose sha256 is `prefix`."""

    inode: int
    size: int
    prefix: str
    lines: int  # lines read
    value: Any  # _Folds of the events, or a ChainReader
    key: StatKey | None = None
    hasher: Any = field(default_factory=hashlib.sha256)  # over the `size` bytes read: the next prefix from it


def _grow(path: Path, held: _Grown | None, fresh: Callable[[], Any], feed: Callable[[Any, bytes, int], None]) -> _Grown:
    """Read `path` from where `held` ended if it only grew, else from the start (fresh())."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
    inode = path.stat().st_ino
    if (
        held is None
        or held.inode != inode
        or held.size > end
        or hashlib.sha256(data[: held.size]).hexdigest() != held.prefix
    ):
        held = _Grown(inode, 0, hashlib.sha256(b"").hexdigest(), 0, fresh())
    if end > held.size:
        feed(held.value, data[held.size : end], held.lines)
        held.lines += data.count(b"\n", held.size, end)
        held.hasher = held.hasher.copy()
        held.hasher.update(data[held.size : end])
        held.size, held.prefix = end, held.hasher.hexdigest()
    return held


@dataclass
class _Folds:
    """The folds of one rounds.jsonl: name -> (fresh, step, state), each event parsed once for all."""

    folds: dict[Any, tuple[Callable[[], Any], Callable[[Any, dict[str, Any]], None], Any]] = field(default_factory=dict)

    def again(self) -> _Folds:
        """The same folds, each from its start (the file was rewritten)."""
        return _Folds({name: (fresh, step, fresh()) for name, (fresh, step, _) in self.folds.items()})


def _feed_folds(path: Path, only: Any = None) -> Callable[[Any, bytes, int], None]:
    """Each whole line's event to every fold (or to the fold named `only`), in order."""

    def feed(value: Any, data: bytes, lines: int) -> None:
        folds = [(step, state) for name, (_, step, state) in value.folds.items() if only is None or name == only]
        for number, line in enumerate(data.decode("utf-8").split("\n")[:-1], lines + 1):
            event = event_of_line(line, path, number)
            if event is not None:
                for step, state in folds:
                    step(state, event)

    return feed


@dataclass
class RunFiles:
    """The parsed run files, by path; one per dashboard (its pages share them)."""

    _grown: dict[tuple[str, Path], _Grown] = field(default_factory=dict)
    _memo: dict[Any, tuple[Any, Any]] = field(default_factory=dict)  # name -> (version, value)
    _used: set[Any] = field(default_factory=set)  # memo names asked for since the last sweep()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self, kind: str, path: Path, fresh: Callable[[], Any], feed: Callable[[Any, bytes, int], None]) -> Any:
        key = stat_key(path)
        with self._lock:
            held = self._grown.get((kind, path))
            if key is None:
                self._grown.pop((kind, path), None)
                return None
            if held is None or held.key != key:
                again = held.value.again if held is not None and isinstance(held.value, _Folds) else fresh
                held = _grow(path, held, again, feed)
                held.key = key
                self._grown[(kind, path)] = held
            return held.value

    def fold(
        self,
        path: Path,
        name: Any,
        fresh: Callable[[], S],
        step: Callable[[S, dict[str, Any]], None],
        read: Callable[[S], T],
    ) -> T | None:
        """read(state) of rounds.jsonl's events folded by step into fresh(), in order, each event
        once as the file grows (as server.runlog.read_events reads them; None: no file). `read`
        runs under the lock: what it returns must not share the state's mutable parts."""
        for _ in range(2):
            folds: _Folds | None = self._read("events", path, _Folds, _feed_folds(path))
            if folds is None:
                return None
            with self._lock:
                held = self._grown.get(("events", path))
                if held is None or held.value is not folds:
                    continue  # read again meanwhile
                if name not in folds.folds:  # a fold first asked for: the bytes the others read, for it alone
                    data = path.read_bytes()[: held.size]
                    if hashlib.sha256(data).hexdigest() != held.prefix:
                        self._grown.pop(("events", path))  # rewritten since: every fold from the start
                        continue
                    folds.folds[name] = (fresh, step, fresh())
                    _feed_folds(path, only=name)(folds, data, 0)
                return read(folds.folds[name][2])
        return None

    def register(
        self, path: Path, name: Any, fresh: Callable[[], S], step: Callable[[S, dict[str, Any]], None]
    ) -> None:
        """A fold of `path` that a page will ask for: if the file is not read yet, folded with the
        others as it is (else from its start when first asked for)."""
        with self._lock:
            if ("events", path) not in self._grown:
                unread = _Folds({name: (fresh, step, fresh())})
                self._grown[("events", path)] = _Grown(-1, 0, hashlib.sha256(b"").hexdigest(), 0, unread)
            elif self._grown[("events", path)].inode == -1:
                self._grown[("events", path)].value.folds.setdefault(name, (fresh, step, fresh()))

    def forget(self, path: Path, name: Any) -> None:
        """Fold `name` of `path` again from the start at its next read."""
        with self._lock:
            held = self._grown.get(("events", path))
            if held is not None:
                held.value.folds.pop(name, None)

    def memo(self, name: Any, version: Any, make: Callable[[], T]) -> T:
        """make(), once per version of `name` (the version holds the stat of every file the
        value was read from): a new version replaces the old one."""
        with self._lock:
            self._used.add(name)
            held = self._memo.get(name)
            if held is not None and held[0] == version:
                return cast(T, held[1])
        value = make()
        with self._lock:
            self._memo[name] = (version, value)
        return value

    def sweep(self) -> None:
        """Forget what no page asked for since the last sweep (memos of runs no longer launched)
        and the files no longer there."""
        with self._lock:
            self._memo = {k: v for k, v in self._memo.items() if k in self._used}
            self._used = set()
            self._grown = {k: v for k, v in self._grown.items() if stat_key(k[1]) is not None}

    def audit(self, path: Path, settle: Callable[[], None] = lambda: None) -> AuditCheck | None:
        """audit.jsonl's chain against its anchor (None: no log). A log found ahead of its anchor
        (the ServerApp between its two writes) is read once more after `settle()`."""
        for attempt in range(2):
            try:
                anchor = read_anchor(path)  # before the log: a record appended between is ahead, not a cut
            except AuditLogError as err:
                return AuditCheck(records=0, problem=str(err))
            try:
                reader = self._read("audit", path, lambda: ChainReader(path), lambda r, data, _: r.feed(data))
            except OSError as err:
                return AuditCheck(records=0, problem=f"{path}: {err}")
            if reader is None:
                return None
            check: AuditCheck = reader.check(anchor)
            if not check.after_anchor or attempt:
                return check
            settle()
        return check
