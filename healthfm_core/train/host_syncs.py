"""Count, on any device (a CPU is enough), the operations of a piece of code that force a host
synchronisation on CUDA, and the operations it dispatches (a proxy for kernel launches).

A GPU runs ahead of the Python host only while the host never needs a value the GPU computes.
Operations that do need one stall the host until the device has finished everything queued:

- reading a value: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t.any():``
  (all are ``aten._local_scalar_dense``), ``.tolist()``, ``.numpy()``, ``.cpu()``;
- a result whose shape depends on the data: ``aten.nonzero``, boolean-mask indexing
  (``x[mask]``, ``x[mask] = y``: ``aten.index`` / ``aten.index_put`` with a bool index),
  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ``randperm`` of
  a length read from a tensor (counted where that length was read);
- a tensor made from Python data on a device: ``torch.tensor(x, device=...)``,
  ``torch.as_tensor(x, device=...)`` (x not a tensor), ``t.new_tensor(x)``: a blocking copy from
  pageable host memory, after everything queued (healthfm_core/device_copy.py copies
  without waiting). On a CPU nothing dispatched shows it, so the calls themselves are counted;
  a tensor meant for the host is made without ``device``.

They are the same operations whatever the device, so counting them on CPU tells what a CUDA step
would do (the GPU benchmark, benchmarks/gpu_train_step.py, cross-checks with torch.profiler).
Counted from inside torch's dispatcher (a TorchDispatchMode), plus the Tensor methods that copy
to the host (tolist, numpy, cpu, which bypass the dispatcher); forward and backward alike.

On CPU every tensor is host memory, so a read of a tensor that a CUDA step keeps on the host
would count too. One such read is known and left out (counted as `host_reads`): torch.optim's
step counters (``state["step"]``), which live on the host on CUDA unless the optimizer is
capturable or fused, read with ``.item()`` once per parameter by Adam(W). Any other is counted
(conservative). ``ops`` counts every non-view aten op: a proxy for kernel launches, as CUDA may
fuse some ops or split a foreach op into several launches; ``optimizer_ops`` says how many of
them torch.optim dispatched (on CPU AdamW loops over the parameters, ~10 ops each; on CUDA its
foreach path launches a few kernels per group of tensors).
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ops = torch.ops.aten
_THIS = Path(__file__).resolve()
_ROOT = _THIS.parents[2]
_OPTIM = str(Path(torch.optim.__file__).parent) + "/"

# Always a sync: the result's size or value is read on the host.
_SYNC_OPS = {
    _ops._local_scalar_dense.default,
    _ops.nonzero.default,
    _ops.nonzero.out,
    _ops.masked_select.default,
    _ops._unique.default,
    _ops._unique2.default,
    _ops.unique_dim.default,
    _ops.unique_consecutive.default,
    _ops.unique_dim_consecutive.default,
}
# A sync only when an index is boolean (its count of True decides the shape).
_BOOL_INDEX_OPS = {_ops.index.Tensor, _ops.index_put.default, _ops.index_put_.default, _ops._index_put_impl_.default}
_REPEAT_INTERLEAVE = {_ops.repeat_interleave.Tensor, _ops.repeat_interleave.self_Tensor}
# Host copies that bypass the dispatcher on a CPU tensor.
_HOST_METHODS = ("tolist", "numpy", "cpu")
# Tensors made from Python data, and copied to the device when given one (see the docstring).
_DATA_FACTORIES = ("tensor", "as_tensor")


@dataclass
class StepCount:
    """What one counted region did: `syncs` by operation name, `ops` (non-view aten ops), and
    `sites`: syncs by the innermost line of this project's code that caused them (where asked)."""

    syncs: Counter[str] = field(default_factory=Counter)
    ops: int = 0
    sites: Counter[str] = field(default_factory=Counter)
    host_reads: int = 0  # torch.optim step counters read (host tensors on CUDA: no sync there)
    optimizer_ops: int = 0  # of `ops`, those inside torch.optim (a for-loop per parameter on CPU)

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


def _is_view(func: torch._ops.OpOverload) -> bool:
    """An op whose result aliases its input without writing it: no kernel runs."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _sync_name(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if func in _SYNC_OPS:
        return func.overloadpacket.__name__
    if func in _BOOL_INDEX_OPS and _has_bool_index(args):
        return f"{func.overloadpacket.__name__}(bool mask)"
    if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
        return "repeat_interleave"
    return None


def _project_line() -> str:
    """file:line of the innermost frame in this project's code (outside this module)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_ROOT) and path != _THIS and ".venv" not in path.parts:
            return f"{path.relative_to(_ROOT)}:{frame.lineno}"
    return "<outside the project>"


def _in_optimizer() -> bool:
    """Called from inside torch.optim."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.startswith(_OPTIM):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _optimizer_step_counter(func: torch._ops.OpOverload, args: tuple[Any, ...], in_optimizer: bool) -> bool:
    """A 0-dim tensor read inside torch.optim: an optimizer's step counter."""
    return in_optimizer and func is _ops._local_scalar_dense.default and args[0].dim() == 0


def _record(count: StepCount, name: str, where: bool) -> None:
    count.syncs[name] += 1
    if where:
        count.sites[f"{_project_line()} {name}"] += 1


class _CountingMode(TorchDispatchMode):
    def __init__(self, count: StepCount, where: bool) -> None:
        super().__init__()
        self.count = count
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        in_optimizer = _in_optimizer()
        if name is not None and _optimizer_step_counter(func, args, in_optimizer):
            self.count.host_reads += 1
        elif name is not None:
            _record(self.count, name, self.where)
        if not _is_view(func):
            self.count.ops += 1
            self.count.optimizer_ops += in_optimizer
        return func(*args, **kwargs)


def _counted(name: str, method: Callable[..., Any], count: StepCount, where: bool) -> Callable[..., Any]:
    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _record(count, name, where)
        return method(self, *args, **kwargs)

    return wrapper


def _counted_factory(name: str, factory: Callable[..., Any], count: StepCount, where: bool) -> Callable[..., Any]:
    """``factory`` (torch.tensor, torch.as_tensor) counting a call that copies Python data to a
    device. torch.optim's own are left out: its state's step counters, made with device="cpu"
    when a parameter's state is built (host tensors on CUDA too, as `host_reads` says)."""

    def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is not None and not isinstance(data, torch.Tensor) and not _in_optimizer():
            _record(count, f"{name}(device=)", where)
        return factory(data, *args, **kwargs)

    return wrapper


@contextmanager
def count_host_syncs(where: bool = False) -> Iterator[StepCount]:
    """Count the host syncs and ops of the code in the block (forward and backward). `where`:
    also attribute each sync to a line of the project (slower: a stack walk per sync)."""
    count = StepCount()
    saved = {name: getattr(torch.Tensor, name) for name in (*_HOST_METHODS, "new_tensor")}
    factories = {name: getattr(torch, name) for name in _DATA_FACTORIES}
    for name, method in saved.items():
        setattr(torch.Tensor, name, _counted(name, method, count, where))
    for name, factory in factories.items():
        setattr(torch, name, _counted_factory(name, factory, count, where))
    try:
        with _CountingMode(count, where):
            yield count
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, factory in factories.items():
            setattr(torch, name, factory)


__all__ = ["StepCount", "count_host_syncs"]
