"""The FlexAttention baseline of benchmarks/ct_attention.py computes continuous-time attention.

On CPU, torch (2.13) runs FlexAttention's forward and the backward to captured tensors (the
mixture's log-weights and rates), but refuses a backward to q, k, v ("FlexAttention does not
support backward on CPU"), and its compiled CPU backward fails to lower captured tensors that need
a gradient. So this checks, in eager mode: the output, and the gradients of log_weights and rates
(the part issue 41 saw fail on torch 2.11's GPU build), against the fp64 reference, at M = 1 and 4.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from healthfm_core.kernels.ct_attention.reference import ct_attention_reference

# The benchmark script loaded by its path (benchmarks/ is not a package on sys.path).
_SPEC = importlib.util.spec_from_file_location(
    "ct_attention_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "ct_attention.py"
)
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["ct_attention_bench"] = bench
_SPEC.loader.exec_module(bench)


@pytest.mark.slow  # FlexAttention traces its score_mod with dynamo even in eager mode: ~35-60 s a case
@pytest.mark.parametrize("m", [1, 4])
def test_flex_baseline_matches_the_reference_with_mixture_gradients(m: int) -> None:
    b, h, n, d = 1, 2, 32, 16
    torch.manual_seed(m)  # make_inputs draws the times from the global generator
    q, k, v, t, log_w, rates = bench.make_inputs(b, h, n, d, m, "cpu", torch.float32, seed=m)
    log_w.requires_grad_()
    rates.requires_grad_()
    run = bench.flex_fn(t, log_w, rates, b, n, compiled=False)
    grad_out = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(5))
    leaves = [x.detach().double().requires_grad_() for x in (log_w, rates)]
    ref = ct_attention_reference(q.double(), k.double(), v.double(), t.double(), t.double(), *leaves)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    for attempt in range(2):  # twice: the benchmark runs forward and backward repeatedly on one graph
        out = run(q, k, v)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
        grads = torch.autograd.grad(out, (log_w, rates), grad_out)
        for name, got, want in zip(("log_weights", "rates"), grads, ref_grads):
            scale = float(want.abs().amax())
            # At M = 1 the log-weight's true gradient is 0 (the softmax cancels it): FlexAttention
            # leaves rounding there, the reference exactly 0 (healthfm's paths project it).
            allowed = 1e-5 * max(scale, float(grads[1].abs().amax()))
            err = float((got.double() - want).abs().amax())
            assert err <= allowed, f"attempt {attempt}: d{name} off by {err:.3g} (allowed {allowed:.3g})"
    assert float(ref_grads[1].abs().amax()) > 0
