"""Reference continuous-time attention and the DecayKernel module (docs/architecture.md math)."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch

from healthfm_core.kernels.ct_attention.cpu_native import native_unavailable_reason
from healthfm_core.model.attention import (
    DecayKernel,
    ct_attention,
    ct_attention_reference,
    decay_mixtures,
    decay_rate_range,
    decay_rate_summary,
    log_decay_kernel,
)
from healthfm_core.train.host_syncs import count_host_syncs


def _inputs(b=2, h=2, n=7, d=4, m=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    # Sorted times with a duplicate, in days.
    t = torch.sort(torch.rand(b, n, generator=g, dtype=dtype) * 30, dim=1).values
    t[:, 2] = t[:, 1]
    log_w = torch.log_softmax(torch.randn(h, m, generator=g, dtype=dtype), -1)
    rates = torch.exp(torch.randn(h, m, generator=g, dtype=dtype))
    valid = torch.rand(b, n, generator=g) > 0.25
    return q, k, v, t, log_w, rates, valid


def _direct(q, k, v, t_q, t_k, log_w, rates, valid, causal):
    """The formula of docs/architecture.md written out with explicit loops and exp-sums (fp64)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                scores, values = [], []
                for j in range(nk):
                    dt = float(t_q[bi, i] - t_k[bi, j])
                    if not bool(valid[bi, j]) or (causal and dt < 0):
                        continue
                    dt = dt if causal else abs(dt)
                    # log sum_m pi_m exp(-lambda_m dt), shifted by its largest term so that
                    # gaps of years with fast rates do not underflow to log(0).
                    terms = [float(log_w[hi, m]) - float(rates[hi, m]) * dt for m in range(log_w.shape[1])]
                    top_term = max(terms)
                    log_kern = top_term + math.log(sum(math.exp(x - top_term) for x in terms))
                    dot = float((q[bi, hi, i] * k[bi, hi, j]).sum()) / math.sqrt(d)
                    scores.append(dot + log_kern)
                    values.append(v[bi, hi, j])
                if not scores:
                    continue
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[bi, hi, i] = sum(w / total * val for w, val in zip(weights, values))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_matches_direct_formula(causal: bool) -> None:
    q, k, v, t, log_w, rates, valid = _inputs()
    got = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, causal)
    want = _direct(q, k, v, t, t, log_w, rates, valid, causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cross_attention_shapes_match_direct_formula() -> None:
    q, k, v, t, log_w, rates, valid = _inputs(n=6)
    q = q[:, :, :4]
    t_q = t[:, :4] + 3.0
    got = ct_attention_reference(q, k, v, t_q, t, log_w, rates, valid, True)
    torch.testing.assert_close(got, _direct(q, k, v, t_q, t, log_w, rates, valid, True))


@pytest.mark.parametrize("causal", [True, False])
def test_invariant_to_shifting_all_times(causal: bool) -> None:
    q, k, v, t, log_w, rates, valid = _inputs()
    base = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, causal)
    shifted = ct_attention_reference(q, k, v, t + 12345.5, t + 12345.5, log_w, rates, valid, causal)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)


def test_changing_invalid_keys_changes_nothing() -> None:
    q, k, v, t, log_w, rates, valid = _inputs()
    base = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, True)
    k2, v2, t2 = k.clone(), v.clone(), t.clone()
    inv = ~valid
    k2[:, :, :][inv[:, None].expand_as(k2[..., 0])] = 50.0
    v2[inv[:, None].expand_as(v2[..., 0])] = -70.0
    t_k2 = torch.where(inv, t2 - 5.0, t2)  # an invalid key moved into the past stays invisible
    got = ct_attention_reference(q, k2, v2, t, t_k2, log_w, rates, valid, True)
    torch.testing.assert_close(got, base)


def test_time_causal_mask_hides_future_keys_and_keeps_equal_times() -> None:
    q, k, v, t, log_w, rates, _ = _inputs(b=1)
    base = ct_attention_reference(q, k, v, t, t, log_w, rates, None, True)
    # Perturb the last key (latest time): only queries at that same time may change.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] -= 4.0
    got = ct_attention_reference(q, k2, v2, t, t, log_w, rates, None, True)
    later = t[0] >= t[0, -1]
    torch.testing.assert_close(got[:, :, ~later], base[:, :, ~later])
    assert not torch.allclose(got[:, :, later], base[:, :, later])
    # Two tokens at the same instant see each other (index order does not matter).
    assert torch.equal(t[0, 1], t[0, 2])
    k3 = k.clone()
    k3[:, :, 2] += 2.0
    moved = ct_attention_reference(q, k3, v, t, t, log_w, rates, None, True)
    assert not torch.allclose(moved[:, :, 1], base[:, :, 1])


def _two_key_probs(dt_far: float, log_w: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One query at time 10 with a key at dt=0 and a key at dt=dt_far; v one-hot reads p out."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 4, generator=g, dtype=torch.float64)
    v = torch.eye(2, dtype=torch.float64)[None, None]
    t_q = torch.tensor([[10.0]], dtype=torch.float64)
    t_k = torch.tensor([[10.0, 10.0 - dt_far]], dtype=torch.float64)
    probs = ct_attention_reference(q, k, v, t_q, t_k, log_w, rates, None, True)[0, 0, 0]
    dots = (q[0, 0, 0] * k[0, 0]).sum(-1) / 2.0
    return probs, float(dots[0] - dots[1])


def test_kernel_is_one_at_zero_lag() -> None:
    log_w = torch.log_softmax(torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64), -1)
    rates = torch.tensor([[0.1, 2.0, 30.0]], dtype=torch.float64)
    dt = 0.7
    probs, dot_gap = _two_key_probs(dt, log_w, rates)
    k_far = sum(math.exp(float(log_w[0, m]) - float(rates[0, m]) * dt) for m in range(3))
    # s_near = dot_near + log K(0) = dot_near; s_far = dot_far + log K(dt).
    want_log_ratio = dot_gap - math.log(k_far)
    assert math.isclose(math.log(float(probs[0] / probs[1])), want_log_ratio, rel_tol=1e-12, abs_tol=1e-12)


def test_single_component_is_exponential_decay() -> None:
    q, k, v, t, _, _, valid = _inputs(h=2, m=1)
    rates = torch.tensor([[0.3], [2.5]], dtype=torch.float64)
    log_w = torch.zeros(2, 1, dtype=torch.float64)
    got = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, True)
    dt = t[:, :, None] - t[:, None, :]
    scores = q @ k.transpose(-1, -2) / 2.0 - rates[None, :, :, None] * dt[:, None]
    mask = (dt[:, None] < 0) | ~valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(mask, -torch.inf), -1).nan_to_num(0.0)
    torch.testing.assert_close(got, probs @ v)


def test_empty_rows_give_zero_and_finite_gradients() -> None:
    q, k, v, t, log_w, rates, _ = _inputs(b=2, n=6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False  # the two earliest queries of subject 0 have no visible key
    valid[1] = False  # subject 1 has no valid key at all
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_w, rates)]
    out = ct_attention_reference(leaves[0], leaves[1], leaves[2], t, t, leaves[3], leaves[4], valid, True)
    assert torch.isfinite(out).all()
    first_visible = t[0] >= t[0, 2]
    assert torch.equal(out[0, :, ~first_visible], torch.zeros_like(out[0, :, ~first_visible]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    (out * torch.randn_like(out)).sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_all_differentiable_inputs(causal: bool) -> None:
    q, k, v, t, log_w, rates, valid = _inputs(b=1, h=2, n=5, d=3, m=2, seed=4)
    valid[0, 0] = False
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v, log_w, rates))

    def fn(q_, k_, v_, lw_, r_):
        return ct_attention_reference(q_, k_, v_, t, t, lw_, r_, valid, causal)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_large_gap_with_fast_rates_is_finite_and_exact() -> None:
    # Only keys 3 years before the query: log K ~ -26000, far below fp32's exp range.
    q, k, v, _, _, _, _ = _inputs(b=1, h=1, n=4, m=2)
    t_k = torch.tensor([[0.0, 0.25, 0.5, 1096.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    log_w = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    rates = torch.tensor([[24.0, 48.0]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = ct_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), t_k, t_k, log_w, rates, valid, True)
        want = _direct(q, k, v, t_k, t_k, log_w, rates, valid, True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_log_decay_kernel_equals_logsumexp_for_gaps_rates_and_skewed_weights() -> None:
    dt = torch.tensor([0.0, 1e-6, 0.04, 1.0, 30.0, 365.0, 3650.0, 36500.0], dtype=torch.float64)[None, None, :]
    weights = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [1e-30, 1e-10, 0.5, 0.5], [1.0 - 3e-20, 1e-20, 1e-20, 1e-20]], dtype=torch.float64
    )
    rates = torch.tensor(
        [[24.0, 1.0, 0.01, 1e-4], [1e-4, 24.0, 3.0, 0.3], [500.0, 1e-4, 2.0, 7.0]], dtype=torch.float64
    )
    want = torch.logsumexp(
        weights.log()[None, :, None, None, :] - rates[None, :, None, None, :] * dt[:, None, :, :, None], -1
    )
    got = log_decay_kernel(dt, weights.log(), rates)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    got32 = log_decay_kernel(dt.float(), weights.log().float(), rates.float())
    assert torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-3)


def test_bf16_forward_on_cpu() -> None:
    q, k, v, t, log_w, rates, valid = _inputs(d=8, dtype=torch.float32)
    out = ct_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), t, t, log_w, rates, valid, True)
    assert out.dtype == torch.bfloat16
    ref = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, True)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_dispatch_reference_and_bad_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, t, log_w, rates, valid = _inputs()
    want = ct_attention_reference(q, k, v, t, t, log_w, rates, valid, True)
    # CPU: auto -> the compiled CPU kernel (the fused PyTorch path without a compiler), equal to
    # the reference up to rounding.
    torch.testing.assert_close(ct_attention(q, k, v, t, t, log_w, rates, valid), want, rtol=1e-5, atol=1e-6)
    cpu_choice = "cpu_native" if native_unavailable_reason() is None else "cpu"
    assert torch.equal(
        ct_attention(q, k, v, t, t, log_w, rates, valid, impl=cpu_choice),
        ct_attention(q, k, v, t, t, log_w, rates, valid),
    )
    torch.testing.assert_close(ct_attention(q, k, v, t, t, log_w, rates, valid, impl="cpu"), want, rtol=1e-5, atol=1e-6)
    # Gradients with respect to the times: only the reference has them.
    t_grad = t.clone().requires_grad_(True)
    assert torch.equal(ct_attention(q, k, v, t_grad, t, log_w, rates, valid).detach(), want)
    assert torch.equal(ct_attention(q, k, v, t, t, log_w, rates, valid, impl="reference"), want)
    with pytest.raises(ValueError, match="impl='fast'"):
        ct_attention(q, k, v, t, t, log_w, rates, valid, impl="fast")
    monkeypatch.setenv("HEALTHFM_CT_ATTENTION", "cuda")
    with pytest.raises(ValueError, match="HEALTHFM_CT_ATTENTION"):
        ct_attention(q, k, v, t, t, log_w, rates, valid)
    monkeypatch.setenv("HEALTHFM_CT_ATTENTION", "reference")
    assert torch.equal(ct_attention(q, k, v, t, t, log_w, rates, valid), want)
    monkeypatch.setenv("HEALTHFM_CT_ATTENTION", "auto")
    with pytest.raises(ValueError, match="t_q"):
        ct_attention(q, k, v, t[:, :3], t, log_w, rates, valid)
    with pytest.raises(ValueError, match=r"\[H=2, M\]"):
        ct_attention(q, k, v, t, t, log_w[:1], rates[:1], valid)


def test_decay_kernel_init_bounds_and_logging() -> None:
    decay = DecayKernel(n_heads=3, n_components=4)
    log_w, rates = decay()
    assert log_w.shape == rates.shape == (3, 4)
    torch.testing.assert_close(torch.logsumexp(log_w, -1), torch.zeros(3))
    timescales = 1.0 / rates[0].double()
    # Log-spaced from one hour to five years.
    torch.testing.assert_close(timescales[0], torch.tensor(1 / 24, dtype=torch.float64), rtol=1e-3, atol=0)
    torch.testing.assert_close(timescales[-1], torch.tensor(5 * 365.25, dtype=torch.float64), rtol=1e-3, atol=0)
    steps = torch.diff(timescales.log())
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-3, atol=0)
    info = decay_rate_summary(decay)
    assert math.isclose(info["rate_max_per_day"], 24.0, rel_tol=1e-3)
    assert math.isclose(info["timescale_max_days"], 5 * 365.25, rel_tol=1e-3)
    # Extreme logits stay within the bounds (no collapse to zero, no explosion).
    with torch.no_grad():
        decay.rate_logits.copy_(torch.tensor([-1e4, 1e4, 0.0, 30.0]).expand(3, 4))
    rates = decay.rates().detach()
    assert float(rates.min()) >= decay.rate_min * (1 - 1e-5)
    assert float(rates.max()) <= decay.rate_max * (1 + 1e-5)


def test_decay_kernel_trains_through_attention() -> None:
    decay = DecayKernel(n_heads=2, n_components=3).double()
    q, k, v, t, _, _, valid = _inputs(m=3)
    log_w, rates = decay()
    ct_attention(q, k, v, t, t, log_w, rates, valid).square().sum().backward()
    for p in (decay.weight_logits, decay.rate_logits):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def _kernels(n: int, seed: int = 0) -> list[DecayKernel]:
    """n layers' kernels with random logits, two of them with other bounds and one of another width."""
    g = torch.Generator().manual_seed(seed)
    kernels = [DecayKernel(n_heads=3, n_components=4) for _ in range(n)]
    kernels[1] = DecayKernel(n_heads=3, n_components=4, rate_max=48.0)
    kernels[-1] = DecayKernel(n_heads=5, n_components=2)
    with torch.no_grad():
        for k in kernels:
            k.weight_logits.copy_(torch.randn(k.weight_logits.shape, generator=g))
            k.rate_logits.add_(torch.randn(k.rate_logits.shape, generator=g))
    return kernels


def test_the_layers_decay_mixtures_together_are_each_layers_own() -> None:
    kernels = _kernels(6)
    together = decay_mixtures(kernels)
    weights = [torch.randn(k.weight_logits.shape) for k in kernels]
    cast(torch.Tensor, sum(((lw * w).sum() + (r * w).sum()) for (lw, r), w in zip(together, weights))).backward()
    grads = []
    for k in kernels:
        assert k.weight_logits.grad is not None and k.rate_logits.grad is not None
        grads.append((k.weight_logits.grad.clone(), k.rate_logits.grad.clone()))
    for k in kernels:
        k.zero_grad(set_to_none=True)
    one_by_one = [k() for k in kernels]
    sum(((lw * w).sum() + (r * w).sum()) for (lw, r), w in zip(one_by_one, weights)).backward()
    for k, (lw, r), (lw1, r1), (g_lw, g_r) in zip(kernels, together, one_by_one, grads):
        torch.testing.assert_close(lw, lw1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r, r1, rtol=1e-6, atol=0)
        torch.testing.assert_close(g_lw, k.weight_logits.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_r, k.rate_logits.grad, rtol=1e-6, atol=1e-7)


def test_a_deeper_model_adds_no_ops_to_its_decay_mixtures_or_their_summary() -> None:
    # Computed a layer at a time they cost ops (GPU launches) a layer, forward and backward, and the
    # trainer's log reads the summary every step (issue 41's launch count).
    def ops(n_layers: int) -> tuple[int, int, int, int]:
        kernels = _kernels(n_layers)
        with count_host_syncs() as forward:
            mixtures = [t for pair in decay_mixtures(kernels) for t in pair]
        upstream = [torch.ones_like(t) for t in mixtures]
        with count_host_syncs() as backward:
            torch.autograd.backward(mixtures, upstream)
        with count_host_syncs() as summary:
            decay_rate_summary(torch.nn.ModuleList(kernels))
        return forward.ops, backward.ops, summary.ops, summary.n_syncs

    shallow, deep = ops(4), ops(24)
    assert shallow[0] == deep[0] and shallow[2] == deep[2], (shallow, deep)
    # The backward's ops are the same but where autograd hands each parameter its gradient.
    assert deep[1] - shallow[1] <= 2 * (24 - 4), (shallow, deep)
    assert shallow[3] == deep[3] == 1  # one read of the summary


def test_the_trainers_decay_rate_range_is_the_summarys_in_fewer_ops() -> None:
    # Kernels with other bounds and widths, logits pushed to both ends: the range comes from each
    # group's extreme logits, so it must match the summary over every rate.
    layers = _kernels(6, seed=3)
    with torch.no_grad():
        layers[1].rate_logits[0, 0] = 40.0  # at its group's upper bound (rate_max 48)
        layers[2].rate_logits[1, 2] = -40.0  # at the lower bound
    every = torch.cat([k.rates().detach().flatten() for k in layers])
    kernels = torch.nn.ModuleList(layers)
    with count_host_syncs() as summary_count:
        summary = decay_rate_summary(kernels)
    with count_host_syncs() as range_count:
        low, high = cast(tuple[float, float], decay_rate_range(kernels))
    assert low == pytest.approx(summary["rate_min_per_day"], rel=1e-6)
    assert high == pytest.approx(summary["rate_max_per_day"], rel=1e-6)
    assert (low, high) == (pytest.approx(every.min().item(), rel=1e-6), pytest.approx(every.max().item(), rel=1e-6))
    assert low == pytest.approx(layers[2].rate_min, rel=1e-5)
    # Three groups of alike kernels here: 25 ops against 49 (`paper`, two groups: 10 against 25).
    assert range_count.n_syncs == 1 and range_count.ops < summary_count.ops, (range_count.ops, summary_count.ops)
    assert decay_rate_range(torch.nn.Linear(2, 2)) is None


def test_decay_kernel_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="n_components"):
        DecayKernel(2, 0)
    with pytest.raises(ValueError, match="rate_min"):
        DecayKernel(2, rate_min=1.0, rate_max=0.5)
    with pytest.raises(ValueError, match="outside"):
        DecayKernel(2, rate_max=10.0)  # an hour-scale timescale needs rates up to 24/day
