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
from client.deploy.warm_clientapp import WarmWorker, collect_between_tasks
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


def test_the_app_guard_loads_no_torch() -> None:
    """The guard lives as long as `join` and only routes tasks: torch (~180 MB, 3 s) is the
    ClientApp's to load (it was loaded for a type hint of healthfm_core/model/groups.py)."""
    code = "import sys, client.deploy.app_guard; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


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


# GELU forward and backward over histories of 300 new lengths, as a warm ClientApp's steps bring
# them; what malloc holds in use afterwards, against before (mallinfo2, glibc).
NEW_SHAPES = """
import ctypes, hashlib, sys, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
torch.manual_seed(0)
digest = hashlib.sha256()
def steps(lengths):
    for n in lengths:
        x = torch.randn(4, n, 32, requires_grad=True)
        y = torch.nn.functional.gelu(x)
        y.sum().backward()
        digest.update(y.detach().numpy().tobytes() + x.grad.numpy().tobytes())
steps(range(1, 20))
before = libc.mallinfo2().uordblks
steps(range(20, 320))
print((libc.mallinfo2().uordblks - before) / 2**20, digest.hexdigest())
"""


@GLIBC_ON_LINUX
def test_a_warm_clientapp_keeps_no_kernel_per_tensor_shape() -> None:
    """Issue 69's creep: oneDNN kept a compiled GELU kernel per new shape (up to 1,024), 20 MiB
    for 300 shapes here, and the heap grew around them task after task. The warm process starts
    without that cache (client/memory.py), with the same results; a site's own setting of it is kept."""
    base = {k: v for k, v in os.environ.items() if k not in (memory.ONEDNN_CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY")}

    def run(env: dict[str, str]) -> tuple[float, str]:
        done = subprocess.run([sys.executable, "-c", NEW_SHAPES], env=env, capture_output=True, text=True, check=True)
        grew, digest = done.stdout.strip().splitlines()[-1].split()
        return float(grew), digest

    (cached, as_shipped), (uncached, warm) = run(base), run(memory.warm_process_env(base))
    assert cached > 5  # the cause, as torch ships it
    assert uncached < 0.5
    assert warm == as_shipped  # the same kernels: every output and gradient bit for bit
    assert memory.warm_process_env({**base, memory.ONEDNN_CACHE_ENV: "64"})[memory.ONEDNN_CACHE_ENV] == "64"
    # The process the guard starts has it from its first instruction on (its environment at exec).
    worker = WarmWorker("127.0.0.1:9", 7, "a" * 64)  # nothing listens there: it is never sent a task
    try:
        environ = Path(f"/proc/{worker.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"{memory.ONEDNN_CACHE_ENV}=0".encode() in environ
    finally:
        worker.stop(grace=5)
