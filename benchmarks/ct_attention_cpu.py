"""Benchmark continuous-time attention on CPU: reference vs the fused CPU paths vs plain SDPA.

    python benchmarks/ct_attention_cpu.py                  # model shapes + N 512/1024/2048, 1 thread
    python benchmarks/ct_attention_cpu.py --threads 2 --repeats 9
    python benchmarks/ct_attention_cpu.py --clock cpu      # CPU time: steadier on a loaded machine
    python benchmarks/ct_attention_cpu.py --smoke          # tiny repeats, model shapes only

Inputs: fp32, time-causal, H=4, D=32, M=4, irregular event times over ~5 years rounded to
the minute (bursts share a timestamp), ~10% padding keys, rates log-spaced from 1 hour to
5 years (the model's initialisation). For each shape it prints the median of ``--repeats``
timings (after one warm-up) of the forward and of forward+backward (gradients for q, k, v,
log_weights, rates) of
  reference  healthfm_core.model.attention.ct_attention_reference
  cpu        healthfm_core.kernels.ct_attention.cpu.ct_attention_cpu (plain PyTorch)
  native     healthfm_core.kernels.ct_attention.cpu_native.ct_attention_cpu_native (compiled
             kernel; what "auto" takes on CPU where a C compiler is present; "-" without one)
  sdpa       F.scaled_dot_product_attention(is_causal=True), no decay: the speed ceiling
with the ratios to sdpa and reference/native measured in this run. The implementations are
timed in turn, sample by sample, so that all see the same machine load.
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
from healthfm_core.kernels.ct_attention.cpu_native import ct_attention_cpu_native, native_unavailable_reason
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


IMPLS = ("reference", "cpu", "native", "sdpa")


def measure(
    impls: tuple[str, ...], b: int, n: int, repeats: int, clock: Callable[[], float]
) -> dict[str, tuple[float, float]]:
    """impl -> (forward ms, forward+backward ms), medians, the implementations interleaved."""
    q, k, v, t, valid, log_w, rates = make_inputs(b, n)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_w, rates)]

    def call(impl, lq, lk, lv, lw, lr):
        if impl == "reference":
            return ct_attention_reference(lq, lk, lv, t, t, lw, lr, valid, True)
        if impl == "cpu":
            return ct_attention_cpu(lq, lk, lv, t, t, lw, lr, valid, True)
        if impl == "native":
            return ct_attention_cpu_native(lq, lk, lv, t, t, lw, lr, valid, True)
        # sdpa: plain causal attention without decay, the ceiling
        return F.scaled_dot_product_attention(lq, lk, lv, is_causal=True)

    def fwd(impl: str) -> None:
        with torch.no_grad():
            call(impl, q, k, v, log_w, rates)

    def fwd_bwd(impl: str) -> None:
        out = call(impl, *leaves)
        grads = torch.autograd.grad(out.sum(), leaves if impl != "sdpa" else leaves[:3])
        del grads

    samples: dict[str, tuple[list[float], list[float]]] = {impl: ([], []) for impl in impls}
    for impl in impls:  # warm-up
        fwd(impl)
        fwd_bwd(impl)
    for _ in range(repeats):
        for impl in impls:
            for i, fn in enumerate((fwd, fwd_bwd)):
                start = clock()
                fn(impl)
                samples[impl][i].append((clock() - start) * 1e3)
    return {impl: (statistics.median(f), statistics.median(fb)) for impl, (f, fb) in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (median)")
    parser.add_argument("--smoke", action="store_true", help="one repeat, the model's shapes only")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock (perf_counter) or CPU time of the process (process_time)",
    )
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error(f"--threads ({args.threads}) and --repeats ({args.repeats}) must be >= 1")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    shapes = SHAPES[:2] if args.smoke else SHAPES
    why = native_unavailable_reason()
    impls = IMPLS if why is None else tuple(i for i in IMPLS if i != "native")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, H={H} D={D} M={M}, fp32, "
        f"median of {repeats}, {args.clock} clock; times in ms" + (f"; native unavailable: {why}" if why else "")
    )
    cols = "".join(f" {name[:4] + ' ' + kind:>10}" for kind in ("fwd", "f+b") for name in IMPLS)
    print(f"{'B':>3} {'N':>5} |{cols} | {'native/sdpa f+b':>15} {'cpu/sdpa f+b':>12} {'ref/native f+b':>14}")
    for b, n in shapes:
        res = measure(impls, b, n, repeats, clock)
        cells = "".join(f" {res[name][i]:10.1f}" if name in res else f" {'-':>10}" for i in (0, 1) for name in IMPLS)
        sdpa = res["sdpa"][1]
        native = res["native"][1] if "native" in res else float("nan")
        print(
            f"{b:>3} {n:>5} |{cells} | {native / sdpa:15.2f} {res['cpu'][1] / sdpa:12.2f} "
            f"{res['reference'][1] / native:14.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
