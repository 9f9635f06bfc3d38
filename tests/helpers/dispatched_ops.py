"""The aten ops a piece of code dispatches, by name (views included), recorded inside torch's
dispatcher: what a test reads to say that a path copies nothing, or how often it does."""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """``with DispatchedOps() as ops: ...``, then ``ops.names``: each op's name (``stack``,
    ``copy_``), in dispatch order, forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
