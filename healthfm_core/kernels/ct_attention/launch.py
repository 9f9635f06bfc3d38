"""The fused kernels' launches: the autograd Function and the backend the dispatcher calls.

``ct_attention_triton`` (``TritonAttention``) takes the contract's call (contract.py), picks the
tiling that fits the card (tiling.py), plans the tiles (plan.py) and launches the forward kernel;
its backward launches dQ (which makes delta = dO . O) and then dK/dV (kernels.py). Runs on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1; triton is imported on the first launch (jit.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from healthfm_core.kernels.ct_attention import kernels
from healthfm_core.kernels.ct_attention.contract import AttentionBackend, AttentionCall, astuple_shallow, autocast_off
from healthfm_core.kernels.ct_attention.jit import ensure_built, interpreting, unavailable_reason
from healthfm_core.kernels.ct_attention.packed import packed_layout
from healthfm_core.kernels.ct_attention.plan import SPAN_LIMIT, bulk_allowed, cdiv, planned_inputs, tile_plan
from healthfm_core.kernels.ct_attention.support import check_supported, device_shared_memory
from healthfm_core.kernels.ct_attention.tiling import KernelConfig, Tiling, block_d, fitted_config, next_power_of_2


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact fp32 products for fp32 inputs (the reference's accuracy)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """A [B, H, N, D] tensor's strides as the kernels take them (batch, head, row; the last is 1)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _plan_args(plan: dict[str, torch.Tensor], loop: str) -> tuple[torch.Tensor, ...]:
    """The plan's arguments of a kernel (kernels.py): the tiles' time bounds, then the range of its
    loop and where its bulk ends: ``loop`` "k" for the kernels walking key tiles (forward, dQ), "q"
    for the one walking query tiles (dK/dV)."""
    names = ("qmin", "qmax", "kmin", "kmax", f"{loop}_lo", f"{loop}_sep", f"{loop}_hi")
    return tuple(plan[name] for name in names)


def _options(d: int, m: int, causal: bool, dtype: torch.dtype, tiling: Tiling) -> dict[str, Any]:
    """A launch's constexprs and options: the head dim, the M components, the path rule, and one
    pass's tiling (BLOCK_M, BLOCK_N, warps, stages: ``KernelConfig.forward`` or ``.backward``)."""
    block_m, block_n, num_warps, num_stages = tiling
    return dict(
        D=d, BLOCK_D=block_d(d), BLOCK_M=block_m, BLOCK_N=block_n, M=m, CAUSAL=causal, SPAN=SPAN_LIMIT,
        DOT_PREC=dot_precision(dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index a gradient with its input's strides: keep only layouts that
    # empty_like reproduces (dense, non-overlapping) with a unit last stride.
    if x.stride(-1) == 1 and torch.empty_like(x).stride() == x.stride():
        return x
    return x.contiguous()


class _CTAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, t_q, t_k, log_weights, rates, key_valid, causal, config):
        ensure_built()
        b, h, nq, d = q.shape
        nk = k.shape[2]
        m = log_weights.shape[1]
        ctx.packed = packed_layout(q, k, v)
        if not ctx.packed:
            q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        planned = planned_inputs(
            t_q, t_k, key_valid, config.block_m, config.block_n, causal, bulk=bulk_allowed(q.dtype)
        )
        tq, tk, kv, plan = planned.t_q, planned.t_k, planned.key_valid, planned.plan
        lw = log_weights.detach().to(torch.float32).contiguous()
        rate = rates.detach().to(torch.float32).contiguous()
        # [B, H, NQ, D] over a [B, NQ, H, D] buffer (as FlashAttention returns it): the model's
        # heads-to-features reshape of the output is then a view, not a copy a layer.
        o = torch.empty((b, nq, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)
        nqt = cdiv(nq, config.block_m)
        nkt = cdiv(nk, config.block_n)
        sm_scale = 1.0 / math.sqrt(d)
        kernels._ct_fwd[(nqt * b * h,)](
            q, k, v, tq, tk, kv, lw, rate, o, lse,
            *_plan_args(plan, "k"),
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, nq, nk, nqt, nkt, sm_scale,
            **_options(d, m, causal, q.dtype, config.forward),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, tq, tk, kv, lw, rate)
        ctx.causal = causal
        ctx.config = config
        # The backward walks the same plan when its tiles are the forward's (the default): one
        # plan a call instead of two (each ~47 small launches on a GPU).
        ctx.plan = plan if (config.bwd_block_m, config.bwd_block_n) == (config.block_m, config.block_n) else None
        ctx.param_dtypes = (log_weights.dtype, rates.dtype)
        return o

    @staticmethod
    @autocast_off
    def backward(ctx, do):
        ensure_built()
        q, k, v, o, lse, tq, tk, kv, lw, rate = ctx.saved_tensors
        config: KernelConfig = ctx.config
        causal: bool = ctx.causal
        b, h, nq, d = q.shape
        nk = k.shape[2]
        m = lw.shape[1]
        do = _last_dim_contiguous(do.to(q.dtype))
        delta = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)  # dO . O: the dQ kernel writes it
        plan = ctx.plan
        if plan is None:
            plan = tile_plan(
                tq, tk, kv != 0, config.bwd_block_m, config.bwd_block_n, causal, bulk=bulk_allowed(q.dtype)
            )
        nqt = cdiv(nq, config.bwd_block_m)
        nkt = cdiv(nk, config.bwd_block_n)
        sm_scale = 1.0 / math.sqrt(d)
        # The kernels index dq/dk/dv with q/k/v's strides: the same layout (empty_like keeps it).
        if ctx.packed:
            dq, dk, dv = torch.empty((b, nq, 3, h, d), device=q.device, dtype=q.dtype).permute(2, 0, 3, 1, 4)
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        param_grad = bool(ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        m_pow2 = next_power_of_2(m)
        # The per-program partials of both parameters in one buffer: one reduction, not two.
        partials = torch.empty((2, b * h, nqt, m_pow2), device=q.device, dtype=torch.float32)
        g_lw, g_rate = partials.unbind(0)
        options = _options(d, m, causal, q.dtype, config.backward)
        kernels._ct_bwd_dq[(nqt * b * h,)](
            q, k, v, tq, tk, kv, lw, rate, do, o, lse, delta, dq, g_lw, g_rate,
            *_plan_args(plan, "k"),
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(o),
            h, nq, nk, nqt, nkt, sm_scale,
            M_POW2=m_pow2, PARAM_GRAD=param_grad, **options,
        )  # fmt: skip
        kernels._ct_bwd_dkdv[(nkt * b * h,)](
            q, k, v, tq, tk, kv, lw, rate, do, lse, delta, dk, dv,
            *_plan_args(plan, "q"),
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, nq, nk, nqt, nkt, sm_scale,
            **options,
        )  # fmt: skip
        d_lw = d_rate = None
        if param_grad:
            # Fixed-order reduction of the per-program partials: deterministic run to run.
            d_lw, d_rate = partials.view(2, b, h, nqt, m_pow2).sum(dim=(1, 3))[:, :, :m].unbind(0)
            d_lw, d_rate = d_lw.to(ctx.param_dtypes[0]), d_rate.to(ctx.param_dtypes[1])
        return dq, dk, dv, None, None, d_lw, d_rate, None, None, None


class TritonAttention(AttentionBackend):
    """Fused continuous-time attention (same contract as ``ct_attention_reference``).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1. Differentiable in q, k, v,
    log_weights and rates (not in the times). Option ``config``: a ``KernelConfig`` (default: the
    one ``tiling.fitted_config`` picks for the device's shared memory).
    """

    name = "ct_attention_triton"
    projects_log_weight_gradient = True  # the dQ kernel stores each program's partial projected

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
        return check_supported(q, k, v, log_weights)

    def unavailable(self, q: torch.Tensor) -> str | None:
        why = unavailable_reason()
        if why is None and q.device.type != "cuda" and not interpreting():
            why = (
                "needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton interpreter on CPU); "
                f"got tensors on {q.device}"
            )
        return why

    def run(self, call: AttentionCall, config: KernelConfig | None = None) -> torch.Tensor:
        if config is None:
            q = call.q
            config = fitted_config(q.shape[-1], q.dtype, device_shared_memory(q.device))
            assert config is not None, "unsupported() refuses a head dim and dtype no tiling fits"
        out: torch.Tensor = _CTAttention.apply(*astuple_shallow(call), config)
        return out


ct_attention_triton = TritonAttention()
