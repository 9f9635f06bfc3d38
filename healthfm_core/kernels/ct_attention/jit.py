"""triton, imported when a kernel first runs, and the device functions jitted in its mode.

triton is a heavy optional dependency, and it fixes compiled vs interpreted mode (TRITON_INTERPRET)
when it is imported: its own library functions (tl.zeros, reductions) are built for one mode only.
So the device code (scores.py, tile_loads.py, kernels.py) is plain functions until a kernel first
runs: ``device`` records them, and ``ensure_built`` applies ``triton.jit`` to each, in the mode
triton's library was built in, and binds the jitted function wherever a device module names it
(its own module and the modules that import it). It also binds ``tl`` (triton.language) in those
modules: the device functions read it from their module's globals.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_PLAIN: list[Callable[..., Any]] = []  # the device functions as written, in definition order
_BINDINGS: list[tuple[dict[str, Any], str, Callable[..., Any]]] = []  # (module globals, name, plain function)
_built_interpreted: bool | None = None  # the mode the device functions were jitted in; None: not yet


def device(fn: Callable[..., Any]) -> Any:
    """Mark a device function: ``ensure_built`` binds ``triton.jit(fn)`` in its place.

    Typed Any because the name ends up bound to a triton JITFunction (launched as
    ``kernel[grid](...)``), whose type triton does not export to the checker."""
    _PLAIN.append(fn)
    return fn


def _triton() -> tuple[Any, Any]:
    """The modules triton and triton.language (ImportError where triton is missing)."""
    import triton
    import triton.language as tl

    return triton, tl


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (imports triton).

    triton fixes this when it is imported (TRITON_INTERPRET=1 at that moment), so the answer is
    read from its library functions rather than from the environment now."""
    _, tl = _triton()
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def unavailable_reason() -> str | None:
    """Why triton cannot be imported here (None when it can)."""
    try:
        _triton()
    except ImportError as exc:
        return str(exc)
    return None


def _bindings() -> list[tuple[dict[str, Any], str, Callable[..., Any]]]:
    """Every global name bound to a device function, in every module that defines one. Read once,
    at the first build, while every such name is still bound to the plain function."""
    if not _BINDINGS:
        plain = {id(fn): fn for fn in _PLAIN}
        modules = {fn.__module__ for fn in _PLAIN}
        for name in sorted(modules):
            namespace = vars(sys.modules[name])
            for key, value in namespace.items():
                if id(value) in plain:
                    _BINDINGS.append((namespace, key, value))
    return _BINDINGS


def ensure_built() -> None:
    """Jit the device functions, in the same mode as triton's library.

    triton.jit chooses compiled vs interpreted when a function is decorated, so they are
    (re)decorated whenever that mode differs from the library's: otherwise no launch could work."""
    global _built_interpreted
    want = interpreting()
    if want == _built_interpreted:
        return
    triton, tl = _triton()
    jitted = {id(fn): triton.jit(fn) for fn in _PLAIN}
    for namespace, name, fn in _bindings():
        namespace[name] = jitted[id(fn)]
        namespace["tl"] = tl
    _built_interpreted = want
