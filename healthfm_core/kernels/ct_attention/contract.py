"""The one entry contract every fused path of continuous-time attention implements.

A path (CPU in PyTorch, compiled CPU, Triton) is an ``AttentionBackend``: it says which inputs it
cannot take and why (``unsupported``), and computes (``run``). The entry, ``__call__``, is the
same for all, so they cannot drift apart: it checks shapes (``check_shapes``), refuses what the
path does not support with the reason, refuses times that need a gradient (no fused path
differentiates the times: a silent zero would be a wrong gradient), fills the default key mask and
makes the log-weights' gradient sum to zero over the components (``shift_free``: exact 0 at M = 1;
a path whose backward projects it itself says so, ``projects_log_weight_gradient``, and is not
wrapped: two launches a layer fewer on a GPU).
A path computes in its own precision: its autograd Function's forward and backward run with the
caller's autocast off (``autocast_off``).
The math itself is stated once, in docs/architecture.md and ``reference.py``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

from healthfm_core.kernels.ct_attention.reference import check_shapes, shift_free


@dataclass(frozen=True)
class AttentionCall:
    """The checked inputs of one call (``key_valid`` filled, ``log_weights`` shift-free where the
    path does not project their gradient itself)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    t_q: torch.Tensor
    t_k: torch.Tensor
    log_weights: torch.Tensor
    rates: torch.Tensor
    key_valid: torch.Tensor
    causal: bool


_Pass = TypeVar("_Pass", bound=Callable[..., Any])


def autocast_off(compute: _Pass) -> _Pass:
    """A path's ``forward(ctx, q, ...)`` or ``backward(ctx, grad, ...)`` run with autocast off on
    the first tensor's device. The paths cast their inputs to their compute dtype themselves; under
    the caller's autocast their host-side matmuls would come out in bf16 instead (on CPU a
    compiled kernel then wrote fp32 into a bf16 buffer: heap corruption), and their results would
    differ from the same call outside it."""

    @functools.wraps(compute)
    def without_autocast(ctx: Any, first: torch.Tensor, *rest: Any) -> Any:
        with torch.autocast(first.device.type, enabled=False):
            return compute(ctx, first, *rest)

    return without_autocast  # type: ignore[return-value]  # same signature as compute


def astuple_shallow(call: AttentionCall) -> tuple[Any, ...]:
    """The fields in contract order (q, ..., key_valid, causal), tensors not copied (unlike
    dataclasses.astuple): the positional arguments of a path's autograd Function."""
    return tuple(getattr(call, f.name) for f in fields(call))


class AttentionBackend(ABC):
    """A fused path: ``path(q, k, v, t_q, t_k, log_weights, rates, key_valid=None, causal=True,
    **options)`` with the contract of ``ct_attention_reference``; ``options`` are the path's own
    tuning knobs (tile sizes, blocks)."""

    name: str  # how errors name the path, e.g. "ct_attention_cpu"
    # True: the path's backward returns the log-weights' gradient already projected to zero sum over
    # the components (exactly 0 at M = 1), so the entry does not wrap log_weights in shift_free.
    projects_log_weight_gradient: bool = False

    @abstractmethod
    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
        """Why this path cannot take these inputs (None when it can): a ValueError at the entry."""

    def unavailable(self, q: torch.Tensor) -> str | None:
        """Why this path cannot run here for tensors like ``q`` (a missing compiler, no GPU):
        a RuntimeError at the entry. None when it can."""
        return None

    # The computation on checked inputs, ``run(call, **options)``: each path names its own options
    # (typed as a callable attribute so that a subclass may take keyword options of its own).
    run: Callable[..., torch.Tensor]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        t_q: torch.Tensor,
        t_k: torch.Tensor,
        log_weights: torch.Tensor,
        rates: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        causal: bool = True,
        **options: Any,
    ) -> torch.Tensor:
        check_shapes(q, k, v, t_q, t_k, log_weights, rates, key_valid)
        why = self.unsupported(q, k, v, log_weights)
        if why is not None:
            raise ValueError(f"{self.name} does not support {why}")
        if t_q.requires_grad or t_k.requires_grad:
            raise ValueError(
                f"{self.name} does not differentiate the times (t_q or t_k requires grad): "
                "use ct_attention_reference (ct_attention's 'auto' does)"
            )
        why = self.unavailable(q)
        if why is not None:
            raise RuntimeError(f"{self.name}: {why}")
        if key_valid is None:
            key_valid = torch.ones(t_k.shape, dtype=torch.bool, device=t_k.device)
        if not self.projects_log_weight_gradient:
            log_weights = shift_free(log_weights)
        call = AttentionCall(q, k, v, t_q, t_k, log_weights, rates, key_valid, bool(causal))
        return self.run(call, **options)
