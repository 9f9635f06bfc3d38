"""The fused kernel's host plan (healthfm_core/kernels/ct_attention/plan.py ``tile_plan``):
which key tiles each query tile visits, and where its bulk (key tiles wholly at or before the
query tile, scored without a mask or a branch) ends. Torch only: no triton, no GPU."""

from __future__ import annotations

import pytest
import torch
from helpers.dispatched_ops import DispatchedOps

from healthfm_core.kernels.ct_attention.plan import PlannedInputs, bulk_allowed, planned_inputs, tile_plan


def _bounds(t: torch.Tensor, valid: torch.Tensor, block: int) -> tuple[list[float], list[float]]:
    lo, hi = [], []
    for start in range(0, t.shape[0], block):
        own = t[start : start + block][valid[start : start + block]]
        lo.append(float(own.min()) if len(own) else float("inf"))
        hi.append(float(own.max()) if len(own) else float("-inf"))
    return lo, hi


def _ops_in(fn) -> list[str]:
    """The aten ops ``fn()`` dispatches."""
    with DispatchedOps() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_bulk_is_the_longest_run_of_key_tiles_at_or_before_the_query_tile(sort: bool, causal: bool) -> None:
    g = torch.Generator().manual_seed(5)
    b, n, bm, bn = 3, 200, 32, 16
    t = torch.round(torch.rand(b, n, generator=g) * 300)  # whole days: many duplicate times
    if sort:
        t = t.sort(dim=1).values
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[1, 40:90] = False  # whole key tiles without a valid key
    plan = tile_plan(t, t, valid, bm, bn, causal)
    for s in range(b):
        qmin, _ = _bounds(t[s], torch.ones(n, dtype=torch.bool), bm)
        kmin, kmax = _bounds(t[s], valid[s], bn)
        for qt in range(len(qmin)):
            lo, sep, hi = (int(plan[x][s, qt]) for x in ("k_lo", "k_sep", "k_hi"))
            if lo >= hi:
                continue
            assert lo <= sep <= hi
            assert all(kmax[kt] <= qmin[qt] for kt in range(lo, sep))
            assert sep == hi or kmax[sep] > qmin[qt]  # the run is as long as it can be
        for kt in range(len(kmin)):
            lo, sep, hi = (int(plan[x][s, kt]) for x in ("q_lo", "q_sep", "q_hi"))
            if lo >= hi:
                continue
            assert lo <= sep <= hi
            assert all(kmax[kt] <= qmin[qt] for qt in range(sep, hi))
            assert sep == lo or kmax[kt] > qmin[sep - 1]


def test_sorted_histories_are_nearly_all_bulk_and_no_bulk_means_none() -> None:
    # A time-sorted history of 1,024 events over 5 years in tiles of 128 x 64: every key tile
    # before the diagonal is bulk; only the two key tiles a query tile overlaps are not.
    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(2, 1024, generator=g) * 1826, dim=1).values
    valid = torch.ones(2, 1024, dtype=torch.bool)
    plan = tile_plan(t, t, valid, 128, 64, True)
    visited = int((plan["k_hi"] - plan["k_lo"]).sum())
    planned = int((plan["k_hi"] - plan["k_sep"]).sum())
    assert planned == 2 * plan["k_lo"].numel() and visited == 144
    off = tile_plan(t, t, valid, 128, 64, True, bulk=False)
    assert torch.equal(off["k_sep"], off["k_lo"]) and torch.equal(off["q_sep"], off["q_hi"])
    assert not bulk_allowed(torch.float16) and bulk_allowed(torch.bfloat16)


def test_the_plan_never_waits_for_the_device() -> None:
    # Issue 41's GPU run: the plan built 5 tensors from Python numbers (torch.tensor(x, device=...):
    # a copy from host memory after which the host waits), forward and backward, in every layer:
    # 240 of a paper step's 273 host syncs. No op of the plan may read a value or build from host data.
    t = torch.sort(torch.rand(2, 300) * 100, dim=1).values
    valid = torch.rand(2, 300) > 0.1
    names = _ops_in(lambda: tile_plan(t, t, valid, 64, 64, True))
    waits = {"lift_fresh", "_local_scalar_dense", "nonzero", "_to_copy", "item", "masked_select"}
    assert names and not waits & set(names), sorted(waits & set(names))


def test_layers_on_one_batch_share_one_plan_and_a_changed_batch_gets_its_own() -> None:
    # A model's layers pass the same times and key mask: the second layer dispatches no op for
    # its plan. Anything that could change the plan (a write to the times or the mask, another
    # tensor, other tiles) gets a fresh one, equal to the plan made from scratch.
    g = torch.Generator().manual_seed(3)
    t = torch.sort(torch.rand(2, 300, generator=g) * 100, dim=1).values.double()  # converted to fp32 once
    valid = torch.rand(2, 300, generator=g) > 0.1
    first = planned_inputs(t, t, valid, 64, 64, True, True)
    again: list[PlannedInputs] = []
    assert _ops_in(lambda: again.append(planned_inputs(t, t, valid, 64, 64, True, True))) == []
    assert again[0] is first

    def fresh(times: torch.Tensor, mask: torch.Tensor, bm: int = 64, bn: int = 64) -> dict[str, torch.Tensor]:
        return tile_plan(times.float(), times.float(), mask, bm, bn, True)

    def same(planned: PlannedInputs, want: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(planned.plan[name], want[name]) for name in want)

    t.mul_(3.0)  # in place: same object, new version
    after_write = planned_inputs(t, t, valid, 64, 64, True, True)
    assert after_write is not first and same(after_write, fresh(t, valid))
    assert torch.equal(after_write.t_q, t.float())
    valid[:, :64] = False
    after_mask = planned_inputs(t, t, valid, 64, 64, True, True)
    assert after_mask is not after_write and same(after_mask, fresh(t, valid))
    assert torch.equal(after_mask.key_valid, valid.to(torch.int8))
    other_tiles = planned_inputs(t, t, valid, 32, 64, True, True)
    assert same(other_tiles, fresh(t, valid, 32, 64))
    copy = t.clone()
    assert planned_inputs(copy, copy, valid, 32, 64, True, True) is not other_tiles
    with torch.inference_mode():  # no version counter: never memoised
        u, mask = t.clone(), valid.clone()
        one = planned_inputs(u, u, mask, 64, 64, True, True)
        u.add_(1.0)
        two = planned_inputs(u, u, mask, 64, 64, True, True)
        assert one is not two and same(two, fresh(u, mask))
