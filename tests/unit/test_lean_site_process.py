"""A site's process stays lean: its code imports no heavy library it may not need, and the memory
a message freed goes back to the system (client/memory.py; a warm ClientApp's once it is idle)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from client import memory
from client.deploy.warm_clientapp import collect_between_tasks
from client.memory import release_memory
from healthfm_core.memory_release import _MALLOC_TRIM

ROOT = Path(__file__).resolve().parents[2]

# Imported where they are used: Opacus under DP, meds-evaluation's scorer (scikit-learn, scipy)
# and ACES when a site evaluates.
NOT_AT_IMPORT = ["opacus", "sympy", "sklearn", "scipy", "aces", "meds_evaluation.evaluate"]


def test_the_site_code_imports_no_dp_or_evaluation_library_before_it_is_used() -> None:
    code = "import json, sys, client.client_app, simulations.run; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "client.site_runtime" in loaded
    assert [m for m in NOT_AT_IMPORT if m in loaded] == []


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _freed_heap(libc: ctypes.CDLL) -> int:
    """200 MB in small blocks (from malloc's heap, not mmap), all freed but the last one, which is
    returned (free it): free() alone cannot shrink the heap below it, so the freed pages stay
    with the process until a trim."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096) for _ in range(50_000)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    for b in blocks[:-1]:
        libc.free(b)
    return blocks[-1]


GLIBC_ON_LINUX = pytest.mark.skipif(
    _MALLOC_TRIM is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only"
)


@GLIBC_ON_LINUX
def test_memory_a_message_freed_goes_back_to_the_system() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    last = _freed_heap(libc)
    held = _rss_anon_mb()
    release_memory()
    after = _rss_anon_mb()
    libc.free(last)
    assert held - after > 100, f"RssAnon {held:.0f} MB before the release, {after:.0f} MB after"


@GLIBC_ON_LINUX
def test_a_warm_clientapp_keeps_freed_pages_between_tasks_and_gives_them_back_when_idle() -> None:
    # Between back-to-back tasks the next one would fault the same pages in again: only the full
    # collection (an idle moment, or every so many tasks) trims.
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    last = _freed_heap(libc)
    try:
        held = _rss_anon_mb()
        collect_between_tasks(full=False)
        kept = _rss_anon_mb()
        collect_between_tasks(full=True)
        after = _rss_anon_mb()
    finally:
        gc.unfreeze()
        libc.free(last)
    assert held - kept < 50, f"RssAnon {held:.0f} MB before the quick collection, {kept:.0f} MB after"
    assert kept - after > 100, f"RssAnon {kept:.0f} MB before the full collection, {after:.0f} MB after"


def test_a_handler_leaves_the_release_to_a_process_that_releases_after_each_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The warm ClientApp collects once each reply has left (client/deploy/warm_clientapp.py): a
    # handler's release, before its reply leaves, then does nothing. Elsewhere it collects.
    class Node:
        pass

    def cycle() -> weakref.ref[Node]:
        node = Node()
        node.self = node  # type: ignore[attr-defined]  # unreachable once dropped, but for a collection
        return weakref.ref(node)

    monkeypatch.setattr(memory, "_RELEASED_AFTER_REPLY", False)  # restored: the flag is per process
    gc.disable()
    try:
        garbage = cycle()
        memory.release_after_message()
        assert garbage() is None  # collected by the handler's release
        memory.release_after_reply()
        garbage = cycle()
        memory.release_after_message()
        assert garbage() is not None  # left for the loop
        memory.release_memory()
        assert garbage() is None
    finally:
        gc.enable()
