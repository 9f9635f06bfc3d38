"""Benchmark continuous-time attention on a CUDA GPU.

    python benchmarks/ct_attention.py                      # full sweep (N 512..16384, D 64/128, M 1/4)
    python benchmarks/ct_attention.py --n 4096 --d 64 --m 4
    TRITON_INTERPRET=1 python benchmarks/ct_attention.py --smoke   # CPU: tiny correctness check only

For each shape (bf16, time-causal, sorted times over ~5 years with duplicates) it times the
forward and forward+backward of
  kernel     the fused Triton kernel (healthfm_core.kernels.ct_attention.launch)
  reference  the PyTorch reference (materialises [B,H,N,N,M]; skipped when it runs out of memory)
  flex       torch FlexAttention, compiled, with the same math as a score_mod over learnable
             log_weights / rates tensors (gradients flow to them) and a time-causal block mask;
             tests/unit/test_ct_attention_flex.py checks its gradients against the reference on CPU
  sdpa       F.scaled_dot_product_attention(is_causal=True), no decay: the speed ceiling
and reports the peak memory of one forward+backward, achieved TFLOP/s (FlashAttention's count:
causal forward 2*B*H*N^2*D, forward+backward 3.5x that), and the ratios measured in this run.
Every row is guarded: a failure or OOM prints a note and the sweep goes on.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from healthfm_core.kernels.ct_attention import tiling  # noqa: E402
from healthfm_core.kernels.ct_attention.jit import interpreting  # noqa: E402
from healthfm_core.kernels.ct_attention.launch import ct_attention_triton  # noqa: E402
from healthfm_core.kernels.ct_attention.plan import tile_paths  # noqa: E402
from healthfm_core.kernels.ct_attention.reference import ct_attention_reference  # noqa: E402
from healthfm_core.kernels.ct_attention.support import device_shared_memory  # noqa: E402

IMPLS = ("kernel", "reference", "flex", "sdpa")


def make_inputs(b: int, h: int, n: int, d: int, m: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))
    # Irregular event times: exponential gaps, total about 5 years, rounded to the minute so
    # that bursts share timestamps (as EHR events of one visit do).
    gaps = torch.distributions.Exponential(torch.tensor(n / (5 * 365.25))).sample((b, n))
    t = torch.round(torch.cumsum(gaps, dim=1) * 1440) / 1440
    log_w = torch.log_softmax(torch.randn(h, m, generator=g), -1)
    rates = 1.0 / torch.logspace(math.log10(1 / 24), math.log10(5 * 365.25), m).expand(h, m).clone()
    if m == 1:
        rates = torch.full((h, 1), 0.1)
    return (
        q,
        k,
        v,
        t.to(device, torch.float32),
        log_w.to(device, torch.float32),
        rates.to(device, torch.float32).contiguous(),
    )


def flex_mods(t: torch.Tensor, log_w: torch.Tensor, rates: torch.Tensor) -> tuple[Callable, Callable]:
    """FlexAttention's score_mod and mask_mod with the math of docs/architecture.md:
    score + log sum_m pi_m exp(-lambda_m dt), time-causal; gradients reach log_w and rates.

    Written for what FlexAttention's compiled backward accepts: each captured tensor that
    requires grad is indexed once (indexing log_w[h, c] for every c failed on torch 2.11 with
    "Using multiple indexing operations on the same tensor that requires gradients"), so the
    parameters are split into one [H] view per component (``unbind``: autograd sums the views'
    gradients back into log_w and rates). At M = 1 the score is the single term, with no
    logsumexp around it (log K = log pi - lambda dt)."""
    m = log_w.shape[1]
    lw_c = log_w.unbind(1)
    rate_c = rates.unbind(1)

    def score_mod(score, bi, hi, qi, ki):
        dt = torch.clamp(t[bi, qi] - t[bi, ki], min=0.0)
        terms = [lw_c[c][hi] - rate_c[c][hi] * dt for c in range(m)]
        if m == 1:
            return score + terms[0]
        top = terms[0]
        for x in terms[1:]:
            top = torch.maximum(top, x)
        acc = torch.exp(terms[0] - top)
        for x in terms[1:]:
            acc = acc + torch.exp(x - top)
        return score + top + torch.log(acc)

    def mask_mod(bi, hi, qi, ki):
        return t[bi, ki] <= t[bi, qi]

    return score_mod, mask_mod


def flex_fn(
    t: torch.Tensor, log_w: torch.Tensor, rates: torch.Tensor, b: int, n: int, compiled: bool = True
) -> Callable:
    """FlexAttention over ``flex_mods`` with a time-causal block mask (compiled: the GPU baseline;
    eager: the form the CPU test checks, as torch's CPU FlexAttention has no backward for q, k, v)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    score_mod, mask_mod = flex_mods(t, log_w, rates)
    block_mask = create_block_mask(mask_mod, b, None, n, n, device=t.device)
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def run(q, k, v):
        return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return run


def build(impl: str, t, log_w, rates, b: int, n: int, config) -> Callable:
    if impl == "kernel":
        return lambda q, k, v: ct_attention_triton(q, k, v, t, t, log_w, rates, None, True, config=config)
    if impl == "reference":
        return lambda q, k, v: ct_attention_reference(q, k, v, t, t, log_w, rates, None, True)
    if impl == "flex":
        return flex_fn(t, log_w, rates, b, n)
    if impl == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(impl)


def measure(fn: Callable, q, k, v, params: list[torch.Tensor]) -> dict[str, float]:
    import triton.testing

    leaves = [q, k, v, *params]
    dout = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        fn(q, k, v).backward(dout)

    fwd_bwd()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    missing = [i for i, x in enumerate(params) if x.grad is None or not bool(torch.isfinite(x.grad).all())]
    if missing:
        print(
            "        warning: no finite gradient reached the mixture parameters "
            f"{['log_weights', 'rates'][missing[0]]}: its f+b time is not like for like",
            flush=True,
        )
    fwd_ms = triton.testing.do_bench(fwd, warmup=10, rep=50)
    bwd_ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=leaves)
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in leaves:
        x.grad = None
    return {"fwd_ms": float(fwd_ms), "fwdbwd_ms": float(bwd_ms), "peak_mib": peak / 2**20}


def run_sweep(args: argparse.Namespace) -> int:
    dev = torch.cuda.get_device_name()
    import triton

    print(f"device: {dev} | torch {torch.__version__} | triton {triton.__version__} | bf16, time-causal", flush=True)
    print(
        f"{'N':>6} {'D':>4} {'M':>2} {'B':>3} {'H':>3} {'impl':>9} {'fwd ms':>9} {'f+b ms':>9} "
        f"{'fwd TF/s':>9} {'f+b TF/s':>9} {'peak MiB':>9} {'max|o-o_k|':>11}",
        flush=True,
    )
    summary = []
    for d in args.d:
        h = max(1, args.model_dim // d)
        for m in args.m:
            for n in args.n:
                b = max(1, args.tokens // n)
                # The tiling a training step launches on this card (the H100's own: default_config).
                config = tiling.fitted_config(d, torch.bfloat16, device_shared_memory(torch.device("cuda")))
                if config is None:
                    print(f"{n:>6} {d:>4} {m:>2}  no tiling fits this card's shared memory", flush=True)
                    continue
                if args.block_m or args.block_n:
                    config = tiling.KernelConfig(
                        args.block_m or config.block_m,
                        args.block_n or config.block_n,
                        config.num_warps,
                        config.num_stages,
                        config.bwd_block_m,
                        config.bwd_block_n,
                        config.bwd_num_warps,
                        config.bwd_num_stages,
                    )
                try:
                    q, k, v, t, log_w, rates = make_inputs(b, h, n, d, m, "cuda", torch.bfloat16)
                except torch.OutOfMemoryError:
                    print(f"{n:>6} {d:>4} {m:>2}  inputs do not fit", flush=True)
                    continue
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                log_w.requires_grad_()
                rates.requires_grad_()
                fwd_flops = 2.0 * b * h * n * n * d  # causal: half of 4*B*H*N^2*D
                row = {"n": n, "d": d, "m": m}
                out_kernel = None
                for impl in args.impl:
                    try:
                        fn = build(impl, t, log_w, rates, b, n, config)
                        with torch.no_grad():
                            out = fn(q, k, v).float()
                        if impl == "kernel":
                            out_kernel = out
                        diff = (
                            float((out - out_kernel).abs().max())
                            if out_kernel is not None and impl != "sdpa"
                            else float("nan")
                        )
                        del out
                        params = [] if impl == "sdpa" else [log_w, rates]
                        res = measure(fn, q, k, v, params)
                    except torch.OutOfMemoryError:
                        print(f"{n:>6} {d:>4} {m:>2} {b:>3} {h:>3} {impl:>9}  out of memory: skipped", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    except Exception as exc:  # one broken row must not end the sweep
                        print(
                            f"{n:>6} {d:>4} {m:>2} {b:>3} {h:>3} {impl:>9}  failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}",
                            flush=True,
                        )
                        if args.verbose:
                            traceback.print_exc()
                        torch.cuda.empty_cache()
                        continue
                    row[impl] = res
                    print(
                        f"{n:>6} {d:>4} {m:>2} {b:>3} {h:>3} {impl:>9} {res['fwd_ms']:>9.3f} "
                        f"{res['fwdbwd_ms']:>9.3f} {fwd_flops / res['fwd_ms'] / 1e9:>9.1f} "
                        f"{3.5 * fwd_flops / res['fwdbwd_ms'] / 1e9:>9.1f} {res['peak_mib']:>9.1f} "
                        f"{diff:>11.2e}",
                        flush=True,
                    )
                summary.append(row)
                del q, k, v
                torch.cuda.empty_cache()

    print("\nratios measured in this run (>1 = the kernel is faster):", flush=True)
    print(
        f"{'N':>6} {'D':>4} {'M':>2} {'flex/kernel fwd':>16} {'flex/kernel f+b':>16} "
        f"{'kernel/sdpa fwd':>16} {'kernel/sdpa f+b':>16} {'kernel MiB':>11}"
    )
    for row in summary:
        kern = row.get("kernel")

        def ratio(a: dict | None, bb: dict | None, key: str) -> str:
            return f"{a[key] / bb[key]:>16.2f}" if a and bb else f"{'-':>16}"

        print(
            f"{row['n']:>6} {row['d']:>4} {row['m']:>2} {ratio(row.get('flex'), kern, 'fwd_ms')} "
            f"{ratio(row.get('flex'), kern, 'fwdbwd_ms')} {ratio(kern, row.get('sdpa'), 'fwd_ms')} "
            f"{ratio(kern, row.get('sdpa'), 'fwdbwd_ms')} "
            f"{kern['peak_mib'] if kern else float('nan'):>11.1f}"
        )
    print(
        "targets (issue 4): flex/kernel f+b >= 1.5 and kernel/sdpa f+b <= 1.5 at N=4096 D=64 M=4; "
        "kernel MiB linear in N"
    )
    return 0


def smoke() -> int:
    """CPU check through the Triton interpreter: kernel vs reference on a tiny problem."""
    if not interpreting():
        print("--smoke on CPU needs TRITON_INTERPRET=1 set before start (the Triton interpreter).")
        return 2
    cfg = tiling.KernelConfig(16, 16, 1, 1, 16, 16, 1, 1)
    q, k, v, t, log_w, rates = make_inputs(1, 2, 48, 32, 4, "cpu", torch.float32)
    start = time.time()
    got = ct_attention_triton(q, k, v, t, t, log_w, rates, None, True, config=cfg)
    want = ct_attention_reference(
        q.double(), k.double(), v.double(), t.double(), t.double(), log_w.double(), rates.double(), None, True
    )
    err = float((got.double() - want).abs().max())
    print(f"smoke (interpreter, N=48, D=32, M=4): max |kernel - reference| = {err:.2e} in {time.time() - start:.1f}s")
    return 0 if err < 1e-4 else 1


def visit_times(b: int, n: int, seed: int = 0) -> torch.Tensor:
    """Hospital-like times [B, N] in days: visits ~ every 30 days (exponential gaps), each a burst
    of 1-64 events within a few hours, rounded to the minute, over as many visits as N needs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        times: list[torch.Tensor] = []
        start, total = 0.0, 0
        while total < n:
            size = int(torch.randint(1, 65, (1,), generator=g))
            times.append(start + torch.rand(size, generator=g).sort().values * 0.2)
            total += size
            start += float(-30.0 * torch.log(torch.rand(1, generator=g)))
        rows.append(torch.cat(times)[:n])
    return torch.round(torch.stack(rows) * 1440) / 1440


def paths(args: argparse.Namespace) -> int:
    """CPU only: how often the forward kernel takes each path, per (head, query tile, key tile)."""
    print(
        "tile pairs the forward kernel scores, by path (time-causal, forward tiles "
        f"{tiling.default_config(64).block_m} x {tiling.default_config(64).block_n}, rates 1/hour .. 1/5 years)"
    )
    print(
        f"{'times':>12} {'N':>6} {'M':>2} {'visible':>9} {'separated':>10} {'of them bulk':>13} {'small span':>11} "
        f"{'log':>9} {'log %':>6}"
    )
    for name in ("exponential", "visits"):
        for n in args.n:
            for m in args.m:
                b, h = 4, 2
                q, k, v, t, log_w, rates = make_inputs(b, h, n, 64, m, "cpu", torch.float32)
                if name == "visits":
                    t = visit_times(b, n)
                cfg = tiling.default_config(64)
                valid = torch.ones(b, n, dtype=torch.bool)
                c = tile_paths(t, t, valid, rates, cfg.block_m, cfg.block_n, causal=True)
                vis = c["separated"] + c["small_span"] + c["log"]
                print(
                    f"{name:>12} {n:>6} {m:>2} {vis:>9} {c['separated']:>10} {c['bulk']:>13} {c['small_span']:>11} "
                    f"{c['log']:>9} "
                    f"{100 * c['log'] / max(vis, 1):>6.1f}"
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--tokens", type=int, default=16384, help="batch size = max(1, tokens // N)")
    p.add_argument("--model-dim", type=int, default=1024, help="heads = model_dim // D")
    p.add_argument("--block-m", type=int, default=0, help="override the kernel's forward BLOCK_M")
    p.add_argument("--block-n", type=int, default=0, help="override the kernel's forward BLOCK_N")
    p.add_argument("--smoke", action="store_true", help="tiny correctness check (works on CPU)")
    p.add_argument("--paths", action="store_true", help="count the kernel's tile paths (CPU, no kernel run)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if "kernel" in args.impl:
        args.impl = ["kernel"] + [i for i in args.impl if i != "kernel"]  # kernel first: the others diff against it
    if args.smoke:
        return smoke()
    if args.paths:
        return paths(args)
    if not torch.cuda.is_available():
        print(
            "ct_attention benchmark: no CUDA GPU here, nothing to measure. Run it on a GPU machine; "
            "on CPU, `TRITON_INTERPRET=1 python benchmarks/ct_attention.py --smoke` checks correctness."
        )
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("ct_attention benchmark: unset TRITON_INTERPRET to time the compiled kernel.")
        return 2
    return run_sweep(args)


if __name__ == "__main__":
    raise SystemExit(main())
