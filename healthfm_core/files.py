"""Files the platform writes: atomically (a reader sees the old file or the new one, never
half of either), and flat TOML configs for Flower.

Every file the platform writes (site labels, vocabularies, ledgers, checkpoints' hashes,
keys, configs, reports) goes through here: a temporary file in the same folder, fsync,
then a rename over the target. And a file's sha256, read in blocks (no torch, no numpy: the
coordinator's dashboard imports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path to write to; on success it becomes `path` (fsynced, renamed).

    `mode` is set before the first byte is written (no window in which a private key is
    readable by others). Without `overwrite` an existing `path` is never replaced:
    FileExistsError, also when the file appears while writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(str(path))
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails if the file appeared meanwhile
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to write a whole folder into; on success every file in it is
    fsynced and the folder renamed to `path` (a previous `path` removed first): a reader sees the
    whole folder or none. On failure the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None, overwrite: bool = True) -> Path:
    with atomic_path(path, mode=mode, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_flat_toml(path: str | Path, config: Mapping[str, str | int | float | bool], header: str = "") -> Path:
    """Flat key/value config as TOML (Flower's `--node-config FILE.toml`, `--run-config`, an
    app's pyproject): no quoting problems with paths that hold spaces or quotes."""
    body = header + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in config.items())
    return atomic_write_text(path, body)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
