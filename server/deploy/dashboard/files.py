"""The run files as the dashboard reads them: each parsed once per change.

A federation that runs for weeks holds hundreds of rounds in each rounds.jsonl and audit.jsonl,
and tens of runs; the page is read again whenever a file changes (every round). So a file is
parsed again only when its stat (inode, size, modification and change times) changed, and an
append-only file (rounds.jsonl, audit.jsonl) that only grew, the bytes read before unchanged
(their sha256, one pass over bytes, no parsing), is parsed from where the last read ended: the
cost of a page follows what changed, not the federation's history. Any other change (an edit, a
truncation, a replaced file) is read again from the start.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.audit import AuditCheck, AuditLogError, ChainReader, read_anchor
from server.runlog import event_of_line

T = TypeVar("T")
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
    value: Any  # events (list) or a ChainReader
    key: StatKey | None = None


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
        held.size = end
        held.prefix = hashlib.sha256(data[:end]).hexdigest()
    return held


def _feed_events(path: Path) -> Callable[[Any, bytes, int], None]:
    def feed(value: Any, data: bytes, lines: int) -> None:
        for number, line in enumerate(data.decode("utf-8").split("\n")[:-1], lines + 1):
            event = event_of_line(line, path, number)
            if event is not None:
                value.append(event)

    return feed


@dataclass
class RunFiles:
    """The parsed run files, by path; one per dashboard (its pages share them)."""

    _grown: dict[tuple[str, Path], _Grown] = field(default_factory=dict)
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    _mapped: dict[tuple[Callable[..., Any], Path], tuple[list[Any], list[Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self, kind: str, path: Path, fresh: Callable[[], Any], feed: Callable[[Any, bytes, int], None]) -> Any:
        key = stat_key(path)
        with self._lock:
            held = self._grown.get((kind, path))
            if key is None:
                self._grown.pop((kind, path), None)
                return None
            if held is None or held.key != key:
                held = _grow(path, held, fresh, feed)
                held.key = key
                self._grown[(kind, path)] = held
            return held.value

    def events(self, path: Path) -> list[dict[str, Any]]:
        """rounds.jsonl's events, as server.runlog.read_events reads them ([]: no file)."""
        events = self._read("events", path, list, _feed_events(path))
        return list(events) if events is not None else []

    def mapped(self, path: Path, fn: Callable[[dict[str, Any]], T]) -> list[T]:
        """fn(event) for each event of rounds.jsonl, in order: computed once per event, as the file grows."""
        events = self._read("events", path, list, _feed_events(path))
        if events is None:
            return []
        with self._lock:
            source, done = self._mapped.get((fn, path), (None, []))
            if source is not events:  # the file was read again from its start
                done = []
            done.extend(fn(event) for event in events[len(done) :])
            self._mapped[(fn, path)] = (events, done)
            return list(done)

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

    def memo(self, key: tuple[Any, ...], make: Callable[[], T]) -> T:
        """make(), once per key (keys hold the stat of every file the value was read from)."""
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        value = make()
        with self._lock:
            if len(self._memo) > 512:  # old keys of files since changed
                self._memo.clear()
            self._memo[key] = value
        return value
