"""Which files belong to a site: those under its root, symbolic links included only while they
stay there.

A site admin points `check` and `join` at one root; a link inside it to another site's data
(`data/x.parquet -> /sites/other/data/0.parquet`, or `data/more -> /sites/other/data`) would
train on data the admin did not point at, and was followed silently. Every listing and every
metadata path of a site goes through here: a link whose target leaves the root (after resolving
every link on the way, the root's own path resolved too) is an `OutsideRoot`, named with its
target, never read. Links that stay inside the root are followed (directories too, each real
directory and file once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutsideRoot:
    """A path under the site root whose target leaves it: `link` is the symbolic link (the first
    one on the way that leads out), `target` where it resolves to."""

    link: Path
    target: Path

    def message(self, root: Path) -> str:
        return (
            f"a symbolic link to {self.target}, out of the site root {root.resolve()}: a site reads only "
            "files under its root (copy the data in, or make the root a folder that holds it)"
        )


class OutsideRootError(ValueError):
    """A reader was asked for a path whose target leaves the site root."""

    def __init__(self, root: Path, escape: OutsideRoot):
        self.root, self.escape = root, escape
        super().__init__(f"{escape.link}: {escape.message(root)}")


def _inside(path: Path, root_real: Path) -> bool:
    return path == root_real or path.is_relative_to(root_real)


def outside_root(root: Path, path: Path) -> OutsideRoot | None:
    """None when `path` (under `root`) resolves inside the root; else the first link on the way
    from the root down to `path` that leads out, and its target."""
    root_real = root.resolve()
    if _inside(path.resolve(), root_real):
        return None
    try:
        parts = path.relative_to(root).parts
    except ValueError:  # not even spelled under the root
        return OutsideRoot(path, path.resolve())
    step = root
    for part in parts:
        step = step / part
        target = step.resolve()
        if not _inside(target, root_real):
            return OutsideRoot(step, target)
    return OutsideRoot(path, path.resolve())


def require_inside(root: Path, path: Path) -> Path:
    """`path`, or OutsideRootError when it leads out of the root."""
    escape = outside_root(root, path)
    if escape is not None:
        raise OutsideRootError(root, escape)
    return path


def list_files(root: Path, subdirectory: str, suffix: str) -> tuple[list[Path], list[OutsideRoot]]:
    """Files `root/subdirectory/**/*suffix` (sorted by path; a real file reached by two paths:
    the first), and the links under it that lead out of the root (not followed)."""
    root_real = root.resolve()
    start = root / subdirectory
    if not (start.is_dir() or start.is_symlink()):
        return [], []
    escape = outside_root(root, start)
    if escape is not None:
        return [], [escape]
    if not start.is_dir():
        return [], []
    found: list[Path] = []
    escapes: list[OutsideRoot] = []
    seen_dirs: set[Path] = set()
    stack = [start]
    while stack:
        directory = stack.pop()
        real = directory.resolve()
        if real in seen_dirs:  # a link back up: each real directory once
            continue
        seen_dirs.add(real)
        with os.scandir(directory) as entries:
            names = sorted((e.name, e.is_symlink()) for e in entries)
        for name, is_link in names:
            path = directory / name
            if is_link and not _inside(path.resolve(), root_real):
                if path.name.endswith(suffix) or path.resolve().is_dir():  # what the listing would have read
                    escapes.append(OutsideRoot(path, path.resolve()))
                continue
            if path.is_dir():
                stack.append(path)
            elif name.endswith(suffix) and path.is_file():
                found.append(path)
    found.sort(key=lambda p: p.as_posix())
    once: dict[Path, Path] = {}
    for path in found:
        once.setdefault(path.resolve(), path)
    kept = set(once.values())
    return [p for p in found if p in kept], sorted(escapes, key=lambda e: e.link.as_posix())


__all__ = ["OutsideRoot", "OutsideRootError", "list_files", "outside_root", "require_inside"]
