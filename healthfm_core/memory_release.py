"""Give the memory a process freed back to the system: collect garbage (objects kept alive only by
reference cycles, e.g. an exception's traceback holding the frame that held a large buffer), then,
on glibc, return the heaps' free pages (malloc_trim), which glibc otherwise keeps for reuse. Used by
a site's long-lived processes after each message (client/memory.py) and by the SuperLink after a
large request it refused (server/deploy/large_bodies.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_memory() -> None:
    """Collect garbage, then give free heap pages back to the system (glibc only)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


__all__ = ["release_memory"]
