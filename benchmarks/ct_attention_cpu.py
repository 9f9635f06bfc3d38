"""Benchmark continuous-time attention on CPU: reference vs the fused CPU path vs plain SDPA.

    python benchmarks/ct_attention_cpu.py                  # model shapes + N 512/1024/2048, 1 thread
    python benchmarks/ct_attention_cpu.py --threads 2 --repeats 9
    python benchmarks/ct_attention_cpu.py --smoke          # tiny repeats, model shapes only

Inputs: fp32, time-causal, H=4, D=32, M=4, irregular event times over ~5 years rounded to
the minute (bursts share a timestamp), ~10% padding keys, rates log-spaced from 1 hour to
5 years (the model's initialisation). For each shape it prints the median of ``--repeats``
timings (after one warm-up) of the forward and of forward+backward (gradients for q, k, v,
log_weights, rates) of
  reference  healthfm_core.model.attention.ct_attention_reference
  cpu        healthfm_core.kernels.ct_attention.cpu.ct_attention_cpu
  sdpa       F.scaled_dot_product_attention(is_causal=True), no decay: the speed ceiling
with the ratios cpu/sdpa and reference/cpu measured in this run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from healthfm_core.kernels.ct_attention.cpu import ct_attention_cpu
from healthfm_core.model.attention import ct_attention_reference

H, D, M = 4, 32, 4
# (B, N): the model's shapes (B=16, N 128 and 235), then longer sequences at smaller B.
SHAPES = ((16, 128), (16, 235), (4, 512), (2, 1024), (1, 2048))


def make_inputs(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, H, n, D, generator=g) for _ in range(3))
    gaps = -torch.log(torch.rand(b, n, generator=g)) * (5 * 365.25 / n)
    t = torch.round(torch.cumsum(gaps, dim=1) * 1440) / 1440
    valid = torch.rand(b, n, generator=g) > 0.1
    log_w = torch.log_softmax(torch.randn(H, M, generator=g), -1)
    rates = (1.0 / torch.logspace(math.log10(1 / 24), math.log10(5 * 365.25), M)).expand(H, M).contiguous()
    return q, k, v, t, valid, log_w, rates


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(impl: str, b: int, n: int, repeats: int) -> tuple[float, float]:
    q, k, v, t, valid, log_w, rates = make_inputs(b, n)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_w, rates)]

    def call(lq, lk, lv, lw, lr):
        if impl == "reference":
            return ct_attention_reference(lq, lk, lv, t, t, lw, lr, valid, True)
        if impl == "cpu":
            return ct_attention_cpu(lq, lk, lv, t, t, lw, lr, valid, True)
        # sdpa: plain causal attention without decay, the ceiling
        return F.scaled_dot_product_attention(lq, lk, lv, is_causal=True)

    def fwd() -> None:
        with torch.no_grad():
            call(q, k, v, log_w, rates)

    def fwd_bwd() -> None:
        out = call(*leaves)
        grads = torch.autograd.grad(out.sum(), leaves if impl != "sdpa" else leaves[:3])
        del grads

    return timed(fwd, repeats), timed(fwd_bwd, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (median)")
    parser.add_argument("--smoke", action="store_true", help="one repeat, the model's shapes only")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error(f"--threads ({args.threads}) and --repeats ({args.repeats}) must be >= 1")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    shapes = SHAPES[:2] if args.smoke else SHAPES
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, H={H} D={D} M={M}, fp32, "
          f"median of {repeats}; times in ms")
    print(f"{'B':>3} {'N':>5} | {'ref fwd':>8} {'cpu fwd':>8} {'sdpa fwd':>8} | {'ref f+b':>8} {'cpu f+b':>8} "
          f"{'sdpa f+b':>8} | {'cpu/sdpa fwd':>12} {'cpu/sdpa f+b':>12} {'ref/cpu fwd':>11} {'ref/cpu f+b':>11}")
    for b, n in shapes:
        res = {impl: measure(impl, b, n, repeats) for impl in ("reference", "cpu", "sdpa")}
        (rf, rfb), (cf, cfb), (sf, sfb) = res["reference"], res["cpu"], res["sdpa"]
        print(f"{b:>3} {n:>5} | {rf:8.1f} {cf:8.1f} {sf:8.1f} | {rfb:8.1f} {cfb:8.1f} {sfb:8.1f} | "
              f"{cf / sf:12.2f} {cfb / sfb:12.2f} {rf / cf:11.2f} {rfb / cfb:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
