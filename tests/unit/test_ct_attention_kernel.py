"""The fused Triton kernel against the fp64 reference.

On a CUDA machine the kernel is compiled and run on the GPU. On CPU it runs in the Triton
interpreter, which triton selects once, when it is first imported (TRITON_INTERPRET=1 then;
triton's own library functions are built for one mode only). So this module sets the flag
before importing triton when it is the first to import it; if something in this pytest
process imported triton earlier in compiled mode, the same tests run in a fresh child process
(``test_suite_in_fresh_interpreter_process``) and are skipped here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.dispatched_ops import DispatchedOps

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from healthfm_core.kernels.ct_attention import launch, split_qkv, tiling  # noqa: E402
from healthfm_core.kernels.ct_attention.jit import interpreting  # noqa: E402
from healthfm_core.kernels.ct_attention.launch import ct_attention_triton  # noqa: E402
from healthfm_core.kernels.ct_attention.plan import tile_paths, tile_plan  # noqa: E402
from healthfm_core.model.attention import ct_attention, ct_attention_reference  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
RUNNABLE_HERE = ON_CUDA or interpreting()
here = pytest.mark.skipif(
    not RUNNABLE_HERE,
    reason="triton was imported in compiled mode without a GPU; "
    "these tests run in test_suite_in_fresh_interpreter_process",
)
REPO = Path(__file__).resolve().parents[2]

# One pinned, small tiling: several tiles per row so skip / separated / overlap paths all occur.
CFG = tiling.KernelConfig(
    block_m=16, block_n=16, num_warps=1, num_stages=1, bwd_block_m=16, bwd_block_n=16, bwd_num_warps=1, bwd_num_stages=1
)


@pytest.mark.skipif(RUNNABLE_HERE, reason="the kernel tests run in this process")
def test_suite_in_fresh_interpreter_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a safety net, not a speed limit
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-4000:]


def _run(*args, **kwargs) -> torch.Tensor:
    """The kernel on DEVICE with the pinned config; tensors come back on the CPU."""
    moved: list[Any] = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args]
    out = ct_attention_triton(*moved, **{"config": CFG, **kwargs})
    return out


def _grid_times(x: torch.Tensor) -> torch.Tensor:
    # Times on a 1/64-day grid: exact in fp32, so time shifts and differences are exact too.
    return torch.round(x * 64) / 64


def _make(
    b: int,
    h: int,
    n: int,
    d: int,
    m: int,
    seed: int,
    span_days: float,
    rate_scale: float = 1.0,
    sort: bool = True,
    ragged: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    t = _grid_times(torch.rand(b, n, generator=g) * span_days)
    if sort:
        t = torch.sort(t, dim=1).values
    t[:, 5] = t[:, 4]  # duplicate timestamps
    t[:, 6] = t[:, 4]
    valid = torch.ones(b, n, dtype=torch.bool)
    if ragged:
        for bi in range(b):
            valid[bi, n - 3 - 7 * bi :] = False  # right padding of different lengths
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = torch.exp(torch.randn(h, m, generator=g) * 1.5) * rate_scale
    return q, k, v, t, log_w, rates, valid


def _reference(q, k, v, t_q, t_k, log_w, rates, valid, causal, grad_out, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, log_w, rates)]
    out = ct_attention_reference(
        leaves[0], leaves[1], leaves[2], t_q.to(dtype), t_k.to(dtype), leaves[3], leaves[4], valid, causal
    )
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.to(dtype))


def _compare(q, k, v, t_q, t_k, log_w, rates, valid, causal, seed=0, rtol=2e-4, fp32_slack=False):
    """Forward and all five gradients: fp32 kernel vs fp64 reference.

    fp32_slack: also allow 4x the error of the fp32 reference itself (log K of order 1e5
    carries ~1e-2 nats of fp32 rounding whatever the implementation).
    """
    leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, log_w, rates)]
    out = _run(leaves[0], leaves[1], leaves[2], t_q, t_k, leaves[3], leaves[4], valid, causal)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 99))
    grads = [g.cpu() for g in torch.autograd.grad(out, leaves, grad_out.to(DEVICE))]
    out = out.detach().cpu()

    ref, ref_grads = _reference(q, k, v, t_q, t_k, log_w, rates, valid, causal, grad_out, torch.float64)
    slack = [0.0] * 6
    if fp32_slack:
        ref32, ref32_grads = _reference(q, k, v, t_q, t_k, log_w, rates, valid, causal, grad_out, torch.float32)
        slack = [4 * float((a.double() - b).abs().max()) for a, b in zip((ref32, *ref32_grads), (ref, *ref_grads))]

    names = ("output", "dq", "dk", "dv", "dlog_weights", "drates")
    for name, got, want, extra in zip(names, (out, *grads), (ref, *ref_grads), slack):
        assert torch.isfinite(got).all(), name
        scale = max(1.0, float(want.abs().max()))
        err = float((got.double() - want).abs().max())
        assert err <= rtol * scale + extra, f"{name}: max error {err:.3g} (allowed {rtol * scale + extra:.3g})"
    return out, ref


@here
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [1, 4])
def test_matches_reference_sorted_ragged(causal: bool, m: int) -> None:
    # Slow-ish rates over a month: diagonal tiles take the factorised mid-anchor path.
    inputs = _make(b=2, h=2, n=40, d=16, m=m, seed=m, span_days=30.0)
    _compare(*inputs[:4], inputs[3], *inputs[4:], causal)


@here
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_fast_rates_unsorted(causal: bool) -> None:
    # Hour-scale rates over a year and shuffled times: overlapping tiles with a large span take
    # the log-domain path, and the tile skip must be exact without any ordering.
    q, k, v, t, log_w, rates, valid = _make(
        b=1, h=2, n=48, d=32, m=4, seed=7, span_days=365.0, rate_scale=20.0, sort=False
    )
    _compare(q, k, v, t, t, log_w, rates, valid, causal)


@here
def test_fully_masked_rows_give_zero_and_finite_gradients() -> None:
    q, k, v, t, log_w, rates, valid = _make(b=2, h=2, n=36, d=16, m=4, seed=3, span_days=10.0, ragged=False)
    valid[0, :20] = False  # the 20 earliest queries of subject 0 see no key (causal)
    valid[1] = False  # subject 1: no valid key anywhere
    out, _ = _compare(q, k, v, t, t, log_w, rates, valid, True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    blind = t[0] < t[0, 20]
    assert blind.sum() >= 19
    assert torch.equal(out[0, :, blind], torch.zeros_like(out[0, :, blind]))


@here
def test_duplicate_timestamps_see_each_other() -> None:
    # Every token at one of three instants: causality by time, not index.
    q, k, v, _, log_w, rates, valid = _make(b=1, h=2, n=32, d=16, m=4, seed=5, span_days=1.0)
    t = torch.tensor([[0.0] * 10 + [2.5] * 12 + [7.0] * 10])
    _compare(q, k, v, t, t, log_w, rates, valid, True)


@here
@pytest.mark.parametrize("causal", [True, False])
def test_gaps_of_years_with_fast_rates(causal: bool) -> None:
    # Three visits years apart, each spanning hours, rates from 12 to 96 per day (timescales of
    # 15 min to 2 h). Keys of the two later visits are masked, so their queries only see keys
    # 3-6 years earlier: log K ~ -1e5, far outside fp32's exp range; the answer is still a
    # well-defined softmax that the kernel must reproduce (separated tiles normalise per row).
    b, h, n, d, m = 1, 2, 48, 16, 4
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    visit = torch.tensor([0.0] * 17 + [1100.0] * 15 + [2200.0] * 16)
    t = _grid_times(visit + torch.rand(n, generator=g) * 0.25)[None]
    t = torch.sort(t, dim=1).values
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 17:] = False
    valid[0, 40] = True  # one valid key inside the last visit
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = torch.tensor([[12.0, 24.0, 48.0, 96.0], [96.0, 50.0, 30.0, 12.0]])
    out, ref = _compare(q, k, v, t, t, log_w, rates, valid, causal, fp32_slack=True)
    assert float(ref[0, :, 17:].abs().amax()) > 0.1  # the far keys do carry the output


@here
@pytest.mark.parametrize("causal", [True, False])
def test_time_shift_invariance(causal: bool) -> None:
    q, k, v, t, log_w, rates, valid = _make(b=1, h=2, n=40, d=16, m=4, seed=9, span_days=100.0)
    args = dict(key_valid=valid.to(DEVICE), causal=causal)
    base = _run(q, k, v, t, t, log_w, rates, **args).cpu()
    shifted = _run(q, k, v, t + 20000.0, t + 20000.0, log_w, rates, **args).cpu()
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-5)


@here
def test_cross_attention_and_strided_inputs() -> None:
    # q/k/v as views of [B, N, H, D] (the model's layout), fewer queries than keys.
    g = torch.Generator().manual_seed(13)
    b, h, nq, nk, d, m = 2, 2, 20, 34, 32, 3
    q = torch.randn(b, nq, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, nk, h, d, generator=g).transpose(1, 2)
    v = torch.randn(b, nk, h, d, generator=g).transpose(1, 2)
    t_k = torch.sort(_grid_times(torch.rand(b, nk, generator=g) * 50), dim=1).values
    t_q = torch.sort(_grid_times(torch.rand(b, nq, generator=g) * 50), dim=1).values
    valid = torch.rand(b, nk, generator=g) > 0.2
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = torch.exp(torch.randn(h, m, generator=g))
    out, _ = _compare(q, k, v, t_q, t_k, log_w, rates, valid, True)
    # Laid out as [B, NQ, H, D]: the model's heads-to-features reshape is a view, not a copy.
    assert out.transpose(1, 2).is_contiguous()


@here
def test_a_packed_projection_is_read_in_place_with_the_same_gradients() -> None:
    # The model's q, k, v: three slices of one [B, N, 3, H, D] projection. The kernels read them
    # there (no copies) and write dq, dk, dv into one buffer of that layout; the same numbers.
    g = torch.Generator().manual_seed(21)
    b, h, n, d, m = 2, 2, 24, 16, 3
    qkv = torch.randn(3, b, h, n, d, generator=g)
    t = torch.sort(_grid_times(torch.rand(b, n, generator=g) * 40), dim=1).values
    valid = torch.rand(b, n, generator=g) > 0.2
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = torch.exp(torch.randn(h, m, generator=g))
    grad_out = torch.randn(b, h, n, d, generator=g)
    q0, k0, v0 = qkv
    want, want_grads = _reference(q0, k0, v0, t, t, log_w, rates, valid, True, grad_out, torch.float64)
    in_place = []
    # As the model packs them ([B, N, 3, H, D]), and interleaved otherwise ([B, N, H, 3, D]).
    for order in ((1, 3, 0, 2, 4), (1, 3, 2, 0, 4)):
        inverse = [order.index(i) for i in range(5)]
        x = qkv.permute(*order).contiguous().to(DEVICE).requires_grad_()
        q, k, v = x.permute(*inverse)
        out = _run(q, k, v, t, t, log_w.to(DEVICE), rates.to(DEVICE), valid, True)
        saved_qkv = out.grad_fn.saved_tensors[:3]  # type: ignore[union-attr]
        in_place.append(all(y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for y in saved_qkv))
        (grad,) = torch.autograd.grad(out, x, grad_out.to(DEVICE))
        torch.testing.assert_close(out.double().cpu(), want, atol=2e-4, rtol=0)
        for got, expected in zip(grad.permute(*inverse).cpu(), want_grads[:3]):
            torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=0)
    assert in_place == [True, False]  # the interleaved layout's q, k, v were copied


@here
def test_split_qkv_takes_the_kernels_gradient_buffer_as_the_projections_gradient() -> None:
    # The model's q, k, v come from split_qkv. The Triton backward writes dq, dk, dv into one buffer
    # of the projection's layout; that buffer is the projection's gradient: no stack, no copy (an
    # unbind's backward stacks the three, and the view's backward copies the stack again).
    g = torch.Generator().manual_seed(23)
    b, h, n, d, m = 2, 2, 24, 16, 3
    projected = torch.randn(b, n, 3 * h * d, generator=g)
    t = torch.sort(_grid_times(torch.rand(b, n, generator=g) * 40), dim=1).values
    valid = torch.rand(b, n, generator=g) > 0.2
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = torch.exp(torch.randn(h, m, generator=g))
    grad_out = torch.randn(b, h, n, d, generator=g)
    q0, k0, v0 = projected.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    _, want_grads = _reference(q0, k0, v0, t, t, log_w, rates, valid, True, grad_out, torch.float64)
    want = torch.stack([w.transpose(1, 2) for w in want_grads[:3]], dim=2).reshape(b, n, 3 * h * d)

    x = projected.to(DEVICE).requires_grad_()
    params = [log_w.to(DEVICE).requires_grad_(), rates.to(DEVICE).requires_grad_()]
    q, k, v = split_qkv(x, h)
    out = _run(q, k, v, t, t, *params, valid, True)
    with DispatchedOps() as ops:
        grad, d_log_w, d_rates = torch.autograd.grad(out, [x, *params], grad_out.to(DEVICE))
    torch.testing.assert_close(grad.double().cpu(), want, atol=2e-4, rtol=0)
    torch.testing.assert_close(d_log_w.double().cpu(), want_grads[3], atol=2e-4, rtol=0)
    torch.testing.assert_close(d_rates.double().cpu(), want_grads[4], atol=2e-4, rtol=0)
    # Besides the kernels: one reduction of both parameters' partials; no dO . O on the host (the
    # dQ kernel makes it), no shift-free projection (the dQ kernel stores its partials projected).
    assert ops.names.count("sum") == 1 and not {"mul", "mean", "sub"} & set(ops.names), ops.names
    # (Triton's interpreter copies each kernel's outputs back with copy_: counted on a GPU only.)
    copy_ops = ("stack", "cat", "clone", "_to_copy") + (("copy_",) if ON_CUDA else ())
    copies = [name for name in ops.names if name in copy_ops]
    assert copies == [], copies


@here
def test_dispatch_forces_the_kernel_and_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, t, log_w, rates, valid = (x.to(DEVICE) for x in _make(b=1, h=1, n=16, d=16, m=2, seed=2, span_days=5.0))
    want = ct_attention_triton(q, k, v, t, t, log_w, rates, valid, True)
    torch.testing.assert_close(ct_attention(q, k, v, t, t, log_w, rates, valid, impl="triton"), want)
    monkeypatch.setenv("HEALTHFM_CT_ATTENTION", "triton")
    torch.testing.assert_close(ct_attention(q, k, v, t, t, log_w, rates, valid), want)
    ref = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, True)
    assert torch.equal(ct_attention(q, k, v, t, t, log_w, rates, valid, impl="reference"), ref)
    torch.testing.assert_close(want, ref, rtol=1e-5, atol=1e-5)
    # Unsupported inputs are refused with the reason, not silently computed.
    with pytest.raises(ValueError, match="M=9"):
        ct_attention(q, k, v, t, t, torch.zeros(1, 9), torch.ones(1, 9), valid, impl="triton")
    with pytest.raises(ValueError, match="times"):
        ct_attention(q, k, v, t.clone().requires_grad_(), t, log_w, rates, valid, impl="triton")


@pytest.mark.skipif(ON_CUDA, reason="the CPU refusal only exists without a GPU")
def test_forcing_the_kernel_on_cpu_without_interpreter_fails_clearly() -> None:
    code = (
        "import torch\n"
        "from healthfm_core.model.attention import ct_attention\n"
        "x = torch.randn(1, 1, 4, 16)\n"
        "t = torch.zeros(1, 4)\n"
        "ct_attention(x, x, x, t, t, torch.zeros(1, 1), torch.ones(1, 1), impl='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode != 0
    assert "needs CUDA tensors" in proc.stderr, proc.stderr[-2000:]


@here
def test_half_precision_inputs_accumulate_in_fp32() -> None:
    q, k, v, t, log_w, rates, valid = _make(b=1, h=2, n=32, d=16, m=4, seed=17, span_days=20.0)
    ref = ct_attention_reference(
        q.double(), k.double(), v.double(), t.double(), t.double(), log_w.double(), rates.double(), valid, True
    )
    # triton 3.9's interpreter multiplies bf16 tiles as raw integers, so bf16 is checked on GPU only.
    for dtype in (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,):
        out = _run(q.to(dtype), k.to(dtype), v.to(dtype), t, t, log_w, rates, valid, True).cpu()
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


@here
def test_the_callers_autocast_changes_nothing() -> None:
    # The model calls the kernel inside the trainer's autocast: the path computes in its own
    # precision there, forward and backward, bit for bit as outside.
    q, k, v, t, log_w, rates, valid = _make(b=2, h=2, n=40, d=16, m=4, seed=5, span_days=200.0)
    dtype = torch.bfloat16 if ON_CUDA else torch.float16
    results = []
    for autocast in (False, True):
        leaves = [x.detach().to(DEVICE, dtype if i < 3 else torch.float32).requires_grad_()
                  for i, x in enumerate((q, k, v, log_w, rates))]  # fmt: skip
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
            out = _run(leaves[0], leaves[1], leaves[2], t, t, leaves[3], leaves[4], valid, True)
            grads = torch.autograd.grad(out.float().square().sum(), leaves)
        results.append((out, *grads))
    for plain, under in zip(*results):
        assert under.dtype == plain.dtype
        torch.testing.assert_close(under, plain, atol=0, rtol=0)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_component_gets_exactly_zero_log_weight_gradient(dtype: torch.dtype) -> None:
    # Issue 41: at M = 1 the kernel gave 7e-3 of the largest gradient (fp32) and 0.25 (bf16) where
    # the answer is 0: one component's weight is a per-head constant the softmax cancels.
    q, k, v, t, log_w, rates, valid = _make(b=2, h=2, n=40, d=16, m=1, seed=19, span_days=365.0, rate_scale=5.0)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)] + [
        x.to(DEVICE).requires_grad_() for x in (log_w, rates)
    ]
    out = _run(leaves[0], leaves[1], leaves[2], t, t, leaves[3], leaves[4], valid, True)
    d_lw, d_rate = torch.autograd.grad(out, leaves[3:], torch.randn_like(out))
    assert torch.equal(d_lw, torch.zeros_like(d_lw))
    assert float(d_rate.abs().amax()) > 0


@pytest.mark.parametrize(("rate", "overlap_path"), [(10.0, "small_span"), (20.0, "log")])
def test_tile_paths_counts_the_plan_of_each_tile_pair(rate: float, overlap_path: str) -> None:
    # Two visits of four events, 100 days apart, in tiles of four: the first visit's queries cannot
    # see the second's keys (skipped), the second sees the first's whole (separated), and each visit
    # sees itself over a span of 3 days: factorised while lambda x 3 <= SPAN_LIMIT (40), else log.
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    counts = tile_paths(t, t, valid, torch.tensor([[rate, 0.001]]), 4, 4, causal=True)
    want = {"skipped": 1, "bulk": 1, "separated": 1, "small_span": 0, "log": 0}
    want[overlap_path] = 2
    assert counts == want


@here
@pytest.mark.parametrize("m", [1, 4])
def test_bulk_tiles_match_the_planned_path(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bulk (key tiles wholly at or before a query tile, factorised at the key tile's latest
    # time, no causal mask, no branch) against the same inputs with every tile pair planned on
    # its own (what fp16 runs): same output and gradients. Ragged keys, duplicate times across a
    # tile boundary (kmax == qmin), a padded key tile in the middle of the bulk.
    q, k, v, t, log_w, rates, valid = _make(b=1, h=2, n=64, d=16, m=m, seed=23, span_days=400.0, rate_scale=3.0)
    t[:, 16] = t[:, 15]
    valid[0, 16:32] = False
    plan = tile_plan(t, t, valid, CFG.block_m, CFG.block_n, True)
    assert int((plan["k_sep"] - plan["k_lo"]).clamp(min=0).sum()) >= 4  # the bulk is exercised, forward and dQ
    assert int((plan["q_hi"] - plan["q_sep"]).clamp(min=0).sum()) >= 4  # and dK/dV

    def run(bulk: bool):
        monkeypatch.setattr(launch, "bulk_allowed", lambda dtype: bulk)
        leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, log_w, rates)]
        out = _run(leaves[0], leaves[1], leaves[2], t, t, leaves[3], leaves[4], valid, True)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) + out.detach())
        return [x.detach().cpu() for x in (out, *grads)]

    for name, a, b in zip(("output", "dq", "dk", "dv", "dlog_weights", "drates"), run(True), run(False)):
        scale = max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= 2e-4 * scale, name


def _causal_on_leaves(
    leaves: list[torch.Tensor], t: torch.Tensor, valid: torch.Tensor, config: tiling.KernelConfig | None
) -> torch.Tensor:
    """The time-causal kernel on DEVICE at ``config``; ``leaves`` are (q, k, v, log_weights, rates)."""
    q, k, v, log_w, rates = leaves
    times = t.to(DEVICE)
    return ct_attention_triton(q, k, v, times, times, log_w, rates, valid.to(DEVICE), True, config=config)


@here
def test_backward_with_tiles_of_its_own_matches_reference() -> None:
    # The backward reuses the forward's plan when their tiles agree (every test above); with its
    # own tiles it plans again, and its bulk anchors differ from the forward's.
    q, k, v, t, log_w, rates, valid = _make(b=1, h=1, n=48, d=16, m=4, seed=29, span_days=200.0)
    cfg = tiling.KernelConfig(32, 32, 1, 1, 16, 16, 1, 1)  # other key tiles: other bulk anchors
    leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, log_w, rates)]
    out = _causal_on_leaves(leaves, t, valid, cfg)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
    ref, ref_grads = _reference(q, k, v, t, t, log_w, rates, valid, True, grad_out, torch.float64)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert float((got.detach().cpu().double() - want).abs().max()) <= 2e-4 * max(1.0, float(want.abs().max()))


@here
def test_every_tiling_a_card_can_be_given_matches_reference() -> None:
    # tiling.fitted_config hands a card with less shared memory smaller tiles, fewer stages, fewer
    # warps (sm_89's 99 KiB, a T4's 64 KiB): each such tiling computes what the reference does. On
    # a GPU, the card's own tiling too (config=None: read from the device as the launcher reads it).
    from healthfm_core.kernels.ct_attention.aot import SHARED_LIMIT

    cases: list[tuple[int, tiling.KernelConfig | None]] = [(d, None) for d in (16, 128)] if ON_CUDA else []
    for head_dim in (16, 48, 128):
        for limit in (*SHARED_LIMIT.values(), 65_536):
            config = tiling.fitted_config(head_dim, torch.float32, limit)
            if config is not None and (head_dim, config) not in cases:
                cases.append((head_dim, config))
    assert {c.backward for _, c in cases if c is not None} >= {(64, 32, 4, 1), (16, 16, 2, 1)}
    for i, (head_dim, config) in enumerate(cases):
        q, k, v, t, log_w, rates, valid = _make(b=1, h=2, n=70, d=head_dim, m=4, seed=40 + i, span_days=120.0)
        leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, log_w, rates)]
        out = _causal_on_leaves(leaves, t, valid, config)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(i))
        grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
        ref, ref_grads = _reference(q, k, v, t, t, log_w, rates, valid, True, grad_out, torch.float64)
        for name, got, want in zip(
            ("output", "dq", "dk", "dv", "dlog_weights", "drates"), (out, *grads), (ref, *ref_grads)
        ):
            err = float((got.detach().cpu().double() - want).abs().max())
            assert err <= 2e-4 * max(1.0, float(want.abs().max())), (head_dim, config, name, err)


@pytest.mark.skipif(not ON_CUDA, reason="needs a GPU: 2^31 elements a tensor (benchmarks/gpu_checks.sh runs it)")
def test_an_evaluation_batch_past_the_grid_axis_and_int32_offsets_matches_reference() -> None:
    # 4,200 subjects x 16 heads = 67,200 programs a tile: past CUDA's 65,535 on a grid's second
    # axis. 4,200 x 16 x 512 x 64 = 2.2e9 elements a tensor: past int32 offsets (b * stride).
    # Forward only, as an evaluation runs it; the first and the last subject against the reference.
    b, h, n, d = 4_200, 16, 512, 64
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16, generator=g) for _ in range(3))
    assert q.numel() > 2**31
    t = torch.sort(torch.rand(b, n, device=DEVICE, generator=g) * 365.0, dim=1).values
    log_w = torch.log_softmax(torch.randn(h, 4, device=DEVICE, generator=g), -1)
    rates = torch.exp(torch.randn(h, 4, device=DEVICE, generator=g))
    with torch.no_grad():
        out = ct_attention_triton(q, k, v, t, t, log_w, rates)
        for i in (0, b - 1):
            one = slice(i, i + 1)
            want = ct_attention_reference(
                q[one].float(), k[one].float(), v[one].float(), t[one], t[one], log_w, rates, None, True
            )
            err = float((out[one].float() - want).abs().max())
            assert err <= 2e-2 * max(1.0, float(want.abs().max())), (i, err)


@here
def test_layers_sharing_a_plan_match_reference_and_a_rewritten_batch_is_planned_again() -> None:
    # Two layers on one batch's times and key mask (the second reuses the first's plan:
    # plan.py planned_inputs), forward and backward through both against the reference; then
    # the same tensors rewritten in place (as a reused batch buffer would be) and run again.
    q, k, v, t, log_w, rates, valid = _make(b=2, h=2, n=48, d=16, m=4, seed=31, span_days=300.0)
    t, valid = t.to(DEVICE), valid.to(DEVICE)

    def two_layers(attention, leaves, times, mask):
        first = attention(leaves[0], leaves[1], leaves[2], times, times, leaves[3], leaves[4], mask, True)
        return attention(first + leaves[0], leaves[1], first, times, times, leaves[3], leaves[4], mask, True)

    def triton(*args):
        return ct_attention_triton(*args, config=CFG)

    def reference(q, k, v, t_q, t_k, lw, rate, mask, causal):
        d = torch.float64
        return ct_attention_reference(q, k, v, t_q.to(d), t_k.to(d), lw, rate, mask, causal)

    for _ in range(2):
        leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, log_w, rates)]
        out = two_layers(triton, leaves, t, valid)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, log_w, rates)]
        ref = two_layers(reference, ref_leaves, t.cpu(), valid.cpu())
        ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
        for got, want in zip((out, *grads), (ref, *ref_grads)):
            got = got.detach().cpu().double()
            want = want.detach()
            assert float((got - want).abs().max()) <= 2e-4 * max(1.0, float(want.abs().max()))
        t.copy_(torch.flip(t, dims=[1]).neg() + 400.0)  # same objects, other times: a stale plan would skip tiles
        valid[0, 20:] = False
