"""The host's tile plan of the fused kernels (kernels.py): which tile pairs each program visits,
where its bulk ends, and the memo that lets a model's layers share one plan.

The plan depends on the times, the key mask and the tiling only: the layers of a model share it
(``planned_inputs``), and the backward reuses the forward's when their tiles agree. It is torch
alone: no triton, no GPU (``tile_paths`` counts the paths it leads to for the benchmarks).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

# lambda_max * (tile time span) above which an overlapping tile takes the log-domain path.
# Mid-span anchoring keeps each factor within exp(+-SPAN_LIMIT / 2) = exp(+-20): safe in fp32.
SPAN_LIMIT = 40.0


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: the tiles of a length."""
    return -(-a // b)


def _tile_bounds(t: torch.Tensor, valid: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (min, max) of the times of valid positions; (+inf, -inf) for a tile with none."""
    b, n = t.shape
    n_tiles = cdiv(n, block)
    pad = n_tiles * block - n
    t = torch.nn.functional.pad(t, (0, pad)).view(b, n_tiles, block)
    valid = torch.nn.functional.pad(valid, (0, pad), value=False).view(b, n_tiles, block)
    # Python scalars, not device tensors: torch.tensor(x, device="cuda") is a host sync.
    tmin = torch.where(valid, t, float("inf")).amin(-1)
    tmax = torch.where(valid, t, float("-inf")).amax(-1)
    return tmin.contiguous(), tmax.contiguous()


def tile_plan(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    kv: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool,
    bulk: bool = True,
) -> dict[str, torch.Tensor]:
    """Tile bounds plus, per query tile, the [lo, hi) range of key tiles that can be visible
    (and per key tile the range of query tiles): exact, from the bounds alone. And where the
    bulk ends: per query tile k_sep, the end of the run of key tiles from k_lo whose valid keys
    are all at or before the tile's earliest query (kmax <= qmin; a tile without valid keys
    too); per key tile q_sep, the start of the run of query tiles up to q_hi for which that
    holds. ``bulk=False``: no bulk (k_sep = k_lo, q_sep = q_hi). No host sync."""
    q_ok = torch.ones_like(t_q, dtype=torch.bool)
    qmin, qmax = _tile_bounds(t_q, q_ok, block_m)
    kmin, kmax = _tile_bounds(t_k, kv, block_n)
    vis = (kmin <= kmax)[:, None, :].expand(-1, qmin.shape[1], -1)  # [B, NQT, NKT]
    if causal:
        vis = vis & (kmin[:, None, :] <= qmax[:, :, None])
    nqt, nkt = vis.shape[1], vis.shape[2]
    kidx = torch.arange(nkt, device=vis.device, dtype=torch.int32)
    qidx = torch.arange(nqt, device=vis.device, dtype=torch.int32)[:, None]
    k_lo = torch.where(vis, kidx, nkt).amin(-1).int()
    k_hi = torch.where(vis, kidx + 1, 0).amax(-1).int()
    q_lo = torch.where(vis, qidx, nqt).amin(1).int()
    q_hi = torch.where(vis, qidx + 1, 0).amax(1).int()
    if bulk:
        before = kmax[:, None, :] <= qmin[:, :, None]  # [B, NQT, NKT]
        k_in = (kidx >= k_lo[:, :, None]) & (kidx < k_hi[:, :, None])
        k_sep = torch.minimum(torch.where(k_in & ~before, kidx, nkt).amin(-1).int(), k_hi)
        q_in = (qidx >= q_lo[:, None, :]) & (qidx < q_hi[:, None, :])
        q_sep = torch.maximum(torch.where(q_in & ~before, qidx + 1, 0).amax(1).int(), q_lo)
    else:
        k_sep, q_sep = k_lo, q_hi
    return {
        "qmin": qmin,
        "qmax": qmax,
        "kmin": kmin,
        "kmax": kmax,
        "k_lo": k_lo.contiguous(),
        "k_sep": k_sep.contiguous(),
        "k_hi": k_hi.contiguous(),
        "q_lo": q_lo.contiguous(),
        "q_sep": q_sep.contiguous(),
        "q_hi": q_hi.contiguous(),
    }


@dataclass(frozen=True)
class PlannedInputs:
    """What the kernels read besides q, k, v and the mixture: the times as fp32, the key mask as
    int8 (both contiguous), and the tile plan (``tile_plan``)."""

    t_q: torch.Tensor
    t_k: torch.Tensor
    key_valid: torch.Tensor
    plan: dict[str, torch.Tensor]


class _PlanMemo(threading.local):
    """The last call's planned inputs, reused by the next call on the same times and key mask.

    A model's layers attend over one batch's tokens: every layer passes the same ``times`` and
    ``key_valid`` tensors, so the plan (57 small ops, ~47 of them launches on a GPU) and the dtype
    conversions are made once a forward instead of once a layer. A hit needs the very same
    tensor objects at the same version (an in-place write bumps it) and the same tiling; the
    memo holds those tensors, so their identity cannot pass to another tensor while it is kept.
    One entry per thread: a new batch replaces it."""

    key: tuple[Any, ...] | None = None
    sources: tuple[torch.Tensor, ...] = ()
    planned: PlannedInputs | None = None


_plan_memo = _PlanMemo()


def planned_inputs(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    key_valid: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool,
    bulk: bool,
) -> PlannedInputs:
    """The kernels' time and mask inputs and their tile plan, from the memo when the previous call
    had the same ones (``_PlanMemo``)."""
    sources = (t_q, t_k, key_valid)
    # Inference tensors keep no version counter: without one a write could not be seen, so no memo.
    memoised = not any(x.is_inference() for x in sources)
    key = (
        (*(id(x) for x in sources), *(x._version for x in sources), *(tuple(x.shape) for x in sources))
        + (block_m, block_n, causal, bulk)
        if memoised
        else None
    )
    memo = _plan_memo
    if key is not None and memo.planned is not None and memo.key == key:
        return memo.planned
    tq = t_q.to(torch.float32).contiguous()
    tk = t_k.to(torch.float32).contiguous()
    kv_bool = key_valid.to(torch.bool)
    planned = PlannedInputs(
        tq, tk, kv_bool.to(torch.int8).contiguous(), tile_plan(tq, tk, kv_bool, block_m, block_n, causal, bulk=bulk)
    )
    if key is not None:
        memo.key, memo.sources, memo.planned = key, sources, planned
    return planned


def bulk_allowed(dtype: torch.dtype) -> bool:
    """The bulk's running max is a bound, not the exact max, so its probabilities may sit well
    below 1 before the cast for P @ V: fine in bf16 and fp32 (fp32's exponent range), not in
    fp16, whose tile pairs all take the planned path (exact max)."""
    return dtype != torch.float16


def tile_paths(
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    key_valid: torch.Tensor,
    rates: torch.Tensor,
    block_m: int,
    block_n: int,
    causal: bool = True,
) -> dict[str, int]:
    """How many (head, query tile, key tile) pairs the forward kernel scores on each path, from the
    host's tile plan and the rule of ``_pair_path`` (scores.py): no GPU needed (benchmarks/ct_attention.py --paths).

    skipped: outside the trimmed loop range or not visible; separated: every valid key at or
    before (after) every query, factorised; small_span: overlapping, lambda_max * span <= SPAN_LIMIT,
    factorised around the middle; log: overlapping otherwise, M exponentials and a log per score.
    bulk: of the separated, those in the query tile's bulk (scored without a mask or a branch).
    """
    plan = tile_plan(t_q.float(), t_k.float(), key_valid.bool(), block_m, block_n, causal)
    qmin, qmax = plan["qmin"][:, :, None], plan["qmax"][:, :, None]  # [B, NQT, 1]
    kmin, kmax = plan["kmin"][:, None, :], plan["kmax"][:, None, :]  # [B, 1, NKT]
    kt = torch.arange(kmin.shape[-1])
    in_range = (kt >= plan["k_lo"][:, :, None]) & (kt < plan["k_hi"][:, :, None])
    visible = in_range & (kmin <= kmax)
    if causal:
        visible = visible & (kmin <= qmax)
    separated = (kmax <= qmin) | (kmin >= qmax)
    span = torch.maximum(qmax, kmax) - torch.minimum(qmin, kmin)
    lam_max = rates.float().amax(-1)  # [H]
    small = (
        (lam_max[:, None, None, None] * span[None] <= SPAN_LIMIT)
        if causal
        else torch.zeros_like(span[None], dtype=torch.bool)
    )
    vis, sep = visible[None], separated[None]
    heads = rates.shape[0]
    bulk = (kt < plan["k_sep"][:, :, None]) & in_range
    counts = {
        "skipped": int((~vis).sum()) * heads,
        "bulk": int((visible & bulk).sum()) * heads,
        "separated": int((vis & sep).sum()) * heads,
        "small_span": int((vis & ~sep & small).sum()),
        "log": int((vis & ~sep & ~small).sum()),
    }
    return counts
