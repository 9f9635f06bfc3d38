"""The CPU paths for continuous-time attention against the fp64 reference (forward and the five
gradients), on masked rows, duplicate times, year-long gaps, causal and not, Nq != Nk: the fused
PyTorch path ("cpu") and the compiled kernel ("cpu_native", where a C compiler is present; the
test of the fallback without one runs everywhere).

Tolerances: fp64 inputs match the fp64 reference to 1e-9 (absolute, values O(1)); fp32 inputs
match it to 1e-4 on the output and 1e-3 relative (to each gradient's largest entry) on the
gradients - fp32 rounding of the scores, not the factorisation, sets these.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from healthfm_core.kernels.ct_attention import cpu_native
from healthfm_core.kernels.ct_attention.cpu import (
    batch_chunk,
    check_supported,
    cpu_path_available,
    ct_attention_cpu,
)
from healthfm_core.kernels.ct_attention.cpu_native import (
    ct_attention_cpu_native,
    load_native,
    native_unavailable_reason,
)
from healthfm_core.kernels.ct_attention.dispatch import auto_choice
from healthfm_core.model.attention import ct_attention, ct_attention_reference

RATE_MIN = 1.0 / (30.0 * 365.25)  # the model's DecayKernel bounds, per day
RATE_MAX = 4.0 * 24.0


def _inputs(
    b=2,
    h=3,
    nq=11,
    nk=13,
    d=5,
    m=4,
    span=30.0,
    seed=0,
    dtype=torch.float64,
    rates=None,
    shared_times=False,
    invalid=0.25,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    # Unsorted times (the model concatenates sorted pieces), with duplicates across q and k.
    t_k = (torch.rand(b, nk, generator=g, dtype=torch.float64) * span).to(dtype)
    t_q = t_k.clone() if shared_times else (torch.rand(b, nq, generator=g, dtype=torch.float64) * span).to(dtype)
    n_dup = min(3, nq, nk)
    t_q[:, :n_dup] = t_k[:, :n_dup]
    t_k[:, -1] = t_k[:, 0]
    log_w = torch.log_softmax(torch.randn(h, m, generator=g, dtype=dtype), -1)
    if rates is None:
        rates = torch.exp(torch.randn(h, m, generator=g, dtype=dtype))
    valid = torch.rand(b, nk, generator=g) > invalid
    return q, k, v, t_q, t_k, log_w, rates.to(dtype), valid


def _run(fn, q, k, v, t_q, t_k, log_w, rates, valid, causal, seed=1, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, log_w, rates)]
    out = fn(leaves[0], leaves[1], leaves[2], t_q, t_k, leaves[3], leaves[4], valid, causal, **kw)
    # Drawn in fp64 then cast, so that runs in different dtypes get the same upstream gradient.
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


NATIVE_MISSING = native_unavailable_reason()
IMPLS = [
    "cpu",
    pytest.param(
        "cpu_native", marks=pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"compiled kernel: {NATIVE_MISSING}")
    ),
]


def _impl(name: str, block: int):
    """The path under test with its tiling knob: key block (cpu) or query rows per chunk (native)."""
    if name == "cpu":
        return functools.partial(ct_attention_cpu, block=block)
    return functools.partial(ct_attention_cpu_native, rows=block)


def _reference64(q, k, v, t_q, t_k, log_w, rates, valid, causal):
    q64, k64, v64, t_q64, t_k64, log_w64, rates64 = (x.double() for x in (q, k, v, t_q, t_k, log_w, rates))
    return _run(ct_attention_reference, q64, k64, v64, t_q64, t_k64, log_w64, rates64, valid, causal)


def _assert_close(got, want, atol_out, rtol_grad, atol_grad=1e-12):
    out, grads = got
    ref_out, ref_grads = want
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=atol_out, rtol=0)
    for name, g, r in zip(("q", "k", "v", "log_weights", "rates"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        scale = max(r.abs().max().item(), 1e-12)
        err = (g.double() - r).abs().max().item()
        assert err <= rtol_grad * scale + atol_grad, f"d{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [1, 3, 16, 64])
@pytest.mark.parametrize(("nq", "nk"), [(11, 13), (13, 6), (1, 9), (9, 1)])
def test_fp64_matches_reference(impl: str, causal: bool, block: int, nq: int, nk: int) -> None:
    args = _inputs(nq=nq, nk=nk, seed=nq * 7 + nk)
    got = _run(_impl(impl, block), *args, causal)
    _assert_close(got, _reference64(*args, causal), atol_out=1e-9, rtol_grad=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_fp32_matches_fp64_reference(impl: str, causal: bool) -> None:
    args = _inputs(b=3, h=4, nq=40, nk=40, d=8, span=400.0, dtype=torch.float32, shared_times=True)
    got = _run(_impl(impl, 8), *args, causal)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    _assert_close(got, _reference64(*args, causal), atol_out=1e-4, rtol_grad=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_year_long_gaps_at_the_rate_bounds(impl: str, causal: bool, dtype: torch.dtype) -> None:
    # Bursts of events separated by a year or more; rates from the model's minimum to its
    # maximum (one per hour... per 30 years), and a head whose components are all fast, where
    # K itself underflows in fp32 across a year unless the decay is anchored.
    h, m = 3, 4
    rates = torch.stack(
        [
            torch.logspace(math.log10(RATE_MIN), math.log10(RATE_MAX), m, dtype=torch.float64),
            torch.full((m,), RATE_MAX, dtype=torch.float64),
            torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64),
        ]
    )
    q, k, v, _, _, log_w, _, valid = _inputs(b=2, h=h, nq=24, nk=24, m=m, dtype=dtype)
    bursts = torch.tensor([0.0, 400.0, 800.0, 1900.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    t = bursts[torch.randint(0, 4, (2, 24), generator=g)] + torch.rand(2, 24, generator=g, dtype=torch.float64)
    t = t.to(dtype)
    args = (q, k, v, t, t, log_w, rates.to(dtype), valid)
    got = _run(_impl(impl, 4), *args, causal)
    tight = dtype == torch.float64
    _assert_close(got, _reference64(*args, causal), atol_out=1e-9 if tight else 1e-4, rtol_grad=1e-9 if tight else 2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_give_zero_and_zero_gradients(impl: str) -> None:
    q, k, v, t_q, t_k, log_w, rates, valid = _inputs(b=3, nq=8, nk=10)
    valid[0] = False  # batch 0: no valid key at all
    valid[1, ::2] = False  # batch 1: some invalid keys
    t_q[2, 0] = t_k[2].min() - 5.0  # batch 2, query 0: before every key (causal: nothing visible)
    for causal in (True, False):
        got = _run(_impl(impl, 4), q, k, v, t_q, t_k, log_w, rates, valid, causal)
        _assert_close(got, _reference64(q, k, v, t_q, t_k, log_w, rates, valid, causal), 1e-9, 1e-9)
        out, (dq, dk, dv, _, _) = got
        assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
        # Invalid keys get no gradient (nothing reads them).
        assert (dk[1, :, ::2] == 0).all() and (dv[1, :, ::2] == 0).all()
    out, _ = _run(_impl(impl, 4), q, k, v, t_q, t_k, log_w, rates, valid, True)
    assert (out[2, :, 0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_times_see_each_other(impl: str) -> None:
    # Two keys at the query's instant and one a day later: causally the query reads exactly the
    # two simultaneous keys, with the same decay K(0) = 1, so the output is their softmax mix.
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    t_q = torch.tensor([[5.0]], dtype=torch.float64)
    t_k = torch.tensor([[5.0, 6.0, 5.0]], dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(1, 2, dtype=torch.float64), -1)
    rates = torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    for block in (1, 2, 3):
        out = _impl(impl, block)(q, k, v, t_q, t_k, log_w, rates, causal=True)
        weights = torch.softmax((q[0, 0, 0] @ k[0, 0, [0, 2]].T) / 2.0, -1)
        torch.testing.assert_close(out[0, 0, 0], weights @ v[0, 0, [0, 2]], atol=1e-12, rtol=0)
    args = _inputs(nq=12, nk=12, shared_times=True, span=3.0)
    args[3][:, 4:8] = args[3][:, 4:5]  # a burst of four events at one instant
    args[4][:, 4:8] = args[4][:, 4:5]
    for causal in (True, False):
        _assert_close(_run(_impl(impl, 3), *args, causal), _reference64(*args, causal), 1e-9, 1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_dot_products_spread_far_beyond_the_decay(impl: str) -> None:
    # A key years back with a huge dot product (score 60 - 500) and recent keys with very
    # negative ones (score -60): the cheap softmax shift (row max of q.k plus the largest
    # block normaliser) overshoots by ~120 nats, so the tight per-block shift must take over.
    d = 4
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 8, d)
    k[0, 0, :4, 0] = 120.0  # qk / sqrt(d) = 60
    k[0, 0, 4:, 0] = -120.0
    v = torch.randn(1, 1, 8, d, generator=torch.Generator().manual_seed(0))
    t_k = torch.tensor([[0.0, 0.1, 0.2, 0.3, 500.0, 500.1, 500.2, 500.3]])
    t_q = torch.tensor([[501.0]])
    log_w = torch.log(torch.tensor([[0.5, 0.5]]))
    rates = torch.tensor([[1.0, 2.0]])
    args = (q, k, v, t_q, t_k, log_w, rates, None)
    got = _run(_impl(impl, 4), *args, True)
    # dq is 0 in exact arithmetic (the visible keys are identical, so sum_j dS_j k_j = k sum_j dS_j
    # = 0); computed as a sum, fp32 rounding of dS times |k| = 120 leaves ~1e-6.
    _assert_close(
        got, _reference64(*args, True), atol_out=1e-5, rtol_grad=1e-4, atol_grad=1e-12 if impl == "cpu" else 1e-5
    )


def test_chunks_and_blocks_do_not_change_the_result() -> None:
    args = _inputs(b=5, nq=20, nk=20, span=90.0)
    base = _run(ct_attention_cpu, *args, True, block=4)
    assert batch_chunk(3, 20, 20, target=3 * 20 * 20 * 2) == 2
    other = _run(ct_attention_cpu, *args, True, block=7, chunk=2)
    _assert_close(other, (base[0], base[1]), atol_out=1e-12, rtol_grad=1e-11)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequences_and_low_precision_inputs(impl: str) -> None:
    fn = _impl(impl, 4)
    q, k, v, t_q, t_k, log_w, rates, valid = _inputs(nq=4, nk=6)
    out = fn(q, k[:, :, :0], v[:, :, :0], t_q, t_k[:, :0], log_w, rates, valid[:, :0])
    assert out.shape == q.shape and (out == 0).all()
    bf = [x.to(torch.bfloat16) for x in (q, k, v)]
    out = fn(*bf, t_q.float(), t_k.float(), log_w.float(), rates.float(), valid)
    ref = ct_attention_reference(q, k, v, t_q, t_k, log_w, rates, valid)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_the_callers_autocast_changes_nothing(impl: str, causal: bool) -> None:
    # bf16 inputs, as an autocast linear makes them, then the same call inside bf16 autocast: the
    # path must compute as it does outside (a compiled kernel once wrote fp32 into the bf16
    # buffer that autocast made of its host-side matmul: heap corruption, not an error).
    q, k, v, t_q, t_k, log_w, rates, valid = _inputs(nq=70, nk=70, d=8, dtype=torch.float32)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    fn = _impl(impl, 16)
    plain = _run(fn, q, k, v, t_q, t_k, log_w, rates, valid, causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _run(fn, q, k, v, t_q, t_k, log_w, rates, valid, causal)
    for got, want in zip((under[0], *under[1]), (plain[0], *plain[1])):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"compiled kernel: {NATIVE_MISSING}")
def test_native_refuses_a_buffer_the_kernel_would_overrun() -> None:
    ok = torch.zeros(2, 3, dtype=torch.float32)
    assert cpu_native._ptr(ok, torch.float32, 2, 3) == ok.data_ptr()
    for bad in (ok.to(torch.bfloat16), ok.t(), ok[:, :2]):
        with pytest.raises(RuntimeError, match="ct_attention_cpu_native: the kernel needs a contiguous CPU"):
            cpu_native._ptr(bad, torch.float32, 2, 3)


def test_availability_and_errors() -> None:
    assert cpu_path_available()
    q, k, v, t_q, t_k, log_w, rates, valid = _inputs()
    assert check_supported(q, k, v) is None
    assert "dtypes" in str(check_supported(q.int(), k, v))
    with pytest.raises(ValueError, match="t_q"):
        ct_attention_cpu(q, k, v, t_q[:, :-1], t_k, log_w, rates, valid)
    with pytest.raises(ValueError, match="block"):
        ct_attention_cpu(q, k, v, t_q, t_k, log_w, rates, valid, block=0)


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"compiled kernel: {NATIVE_MISSING}")
def test_native_at_the_model_layout_threads_and_chunks() -> None:
    # q, k, v as the model hands them (views into one [B, N, 3, H, D] projection), times unsorted
    # (the model concatenates sorted pieces), padding; two threads and any chunking agree.
    g = torch.Generator().manual_seed(5)
    b, h, n, d = 3, 2, 37, 8
    q, k, v = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    t = torch.cat(
        [
            torch.sort(torch.rand(b, 25, generator=g, dtype=torch.float64) * 900, 1).values,
            torch.sort(torch.rand(b, 12, generator=g, dtype=torch.float64) * 900, 1).values,
        ],
        1,
    )
    valid = torch.rand(b, n, generator=g) > 0.2
    log_w = torch.log_softmax(torch.randn(h, 4, generator=g, dtype=torch.float64), -1)
    rates = torch.exp(torch.randn(h, 4, generator=g, dtype=torch.float64))
    args = (q, k, v, t, t, log_w, rates, valid)
    want = _reference64(*args, True)
    threads = torch.get_num_threads()
    try:
        for n_threads, rows in ((1, 5), (2, 16), (2, 64)):
            torch.set_num_threads(n_threads)
            _assert_close(_run(_impl("cpu_native", rows), *args, True), want, 1e-9, 1e-9)
    finally:
        torch.set_num_threads(threads)


def test_native_fallback_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No compiler, or a build that fails: a reason, never an exception; auto then takes the
    # PyTorch path. HEALTHFM_CPU_NATIVE=0 turns the kernel off the same way.
    missing = load_native(compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path)
    assert isinstance(missing, str)
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    failed = load_native(compiler=str(broken), cache_dir=tmp_path)
    assert isinstance(failed, str) and "cannot compile" in failed
    assert not list(tmp_path.glob("*.so"))
    q, k, v, t_q, t_k, log_w, rates, valid = _inputs(dtype=torch.float32)
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    assert native_unavailable_reason() is not None
    assert auto_choice(q, k, v, t_q, t_k, log_w) == "cpu"
    assert torch.equal(
        ct_attention(q, k, v, t_q, t_k, log_w, rates, valid), ct_attention_cpu(q, k, v, t_q, t_k, log_w, rates, valid)
    )
    with pytest.raises(RuntimeError, match=cpu_native.DISABLE_ENV):
        ct_attention_cpu_native(q, k, v, t_q, t_k, log_w, rates, valid)
    monkeypatch.delenv(cpu_native.DISABLE_ENV)
    expected = "cpu_native" if NATIVE_MISSING is None else "cpu"
    assert auto_choice(q, k, v, t_q, t_k, log_w) == expected


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"compiled kernel: {NATIVE_MISSING}")
def test_native_builds_into_a_fresh_cache(tmp_path: Path) -> None:
    lib = load_native(cache_dir=tmp_path)
    assert not isinstance(lib, str), lib
    assert len(list(tmp_path.glob("ct_attention_cpu_*.so"))) == 1
    assert not isinstance(load_native(cache_dir=tmp_path), str)  # cached: loads, no rebuild


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_component_gets_exactly_zero_log_weight_gradient(impl: str, dtype: torch.dtype) -> None:
    # At M = 1 the weight is a per-head constant in every score, which the softmax cancels: its
    # gradient is 0, exactly (issue 41: 7e-3 of the largest gradient in fp32 on a GPU).
    fn = ct_attention_reference if impl == "reference" else _impl(impl, 8)
    args = _inputs(b=2, h=3, nq=40, nk=40, d=8, m=1, span=400.0, dtype=dtype, shared_times=True)
    _, grads = _run(fn, *args, True)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))
    assert grads[4].abs().amax() > 0  # the rate still learns
    # With several components only the sum over them vanishes (shift invariance).
    args = _inputs(b=2, h=3, nq=40, nk=40, d=8, m=4, span=400.0, dtype=dtype, shared_times=True)
    _, grads = _run(fn, *args, False)
    tiny = 8 * torch.finfo(dtype).eps * float(grads[3].abs().amax())
    assert float(grads[3].sum(-1).abs().amax()) <= tiny
