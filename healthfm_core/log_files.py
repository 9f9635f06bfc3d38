"""Logs that run for weeks stay bounded: each log file the platform writes is rotated by size.

A log reaching LOG_MAX_BYTES (16 MiB; $HEALTHFM_LOG_MAX_BYTES sets another bound for a process
and the processes it starts) is renamed LOG.1 (LOG.1 becomes LOG.2, ..., the oldest beyond
LOG_BACKUPS is deleted) and a new LOG started, so one log never holds more than
(1 + LOG_BACKUPS) x LOG_MAX_BYTES on disk. The same rule for every log: the ServerApp's
server.log (logging's RotatingFileHandler with these numbers), nginx's access and error logs
(renamed by `coordinator superlink`, which has nginx open them anew), a site's supernode.log
and app-guard.log (written by `join` through RotatingLog). A run's record (rounds.jsonl,
audit.jsonl, checkpoints) and a site's privacy ledger are not logs: they are never rotated
(docs/coordinator.md, "What a run keeps on disk").

At `tiny`, three sites, the busiest log (nginx's access log) grows ~21 kB a round: 16 MiB is
~800 rounds of it, and a log with its three backups holds the last ~3,000 rounds.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

LOG_MAX_BYTES_ENV = "HEALTHFM_LOG_MAX_BYTES"  # another bound for every log of this process and its children
DEFAULT_LOG_MAX_BYTES = 16 * 2**20
MIN_LOG_MAX_BYTES = 4096  # a smaller bound would rotate at nearly every line
LOG_BACKUPS = 3


def log_max_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The bound: $HEALTHFM_LOG_MAX_BYTES (bytes, at least MIN_LOG_MAX_BYTES), else 16 MiB."""
    text = environ.get(LOG_MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_LOG_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < MIN_LOG_MAX_BYTES:
        raise ValueError(f"${LOG_MAX_BYTES_ENV}: value {text!r} is not a whole number of bytes >= {MIN_LOG_MAX_BYTES}")
    return value


LOG_MAX_BYTES = log_max_bytes()


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, backups: int = LOG_BACKUPS) -> None:
    """LOG -> LOG.1 -> ... -> LOG.<backups>; the oldest is dropped. A missing file is no error."""
    oldest = backup_path(path, backups)
    if oldest.exists():
        oldest.unlink()
    for n in range(backups - 1, 0, -1):
        if backup_path(path, n).exists():
            os.replace(backup_path(path, n), backup_path(path, n + 1))
    if path.exists():
        os.replace(path, backup_path(path, 1))


def rotating_handler(path: Path) -> logging.Handler:
    """A logging handler appending to `path`, rotated by the same rule (a ServerApp's server.log)."""
    return logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")


class RotatingLog:
    """A text log appended to line by line, rotated before a write would take it past `max_bytes`
    (a line longer than that is written whole into a fresh file). `size` is the current file's
    length and `generation` counts rotations: a reader that noted both knows where its lines
    start in the current file (at 0 once the generation moved on)."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self._file: TextIO = open(self.path, "a", encoding="utf-8", errors="replace")
        self.size = self._file.tell()
        self.generation = 0

    @property
    def name(self) -> str:
        return str(self.path)

    def write(self, text: str) -> None:
        size = len(text.encode("utf-8", errors="replace"))
        if self.size and self.size + size > self.max_bytes:
            self._file.close()
            rotate(self.path, self.backups)
            self._file = open(self.path, "a", encoding="utf-8", errors="replace")
            self.size = 0
            self.generation += 1
        self._file.write(text)
        self.size += size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RotatingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEFAULT_LOG_MAX_BYTES",
    "LOG_BACKUPS",
    "LOG_MAX_BYTES",
    "LOG_MAX_BYTES_ENV",
    "log_max_bytes",
    "RotatingLog",
    "backup_path",
    "rotate",
    "rotating_handler",
]
