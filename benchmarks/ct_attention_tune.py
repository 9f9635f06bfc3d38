"""Where the fused kernel's time goes, and which tiling is fastest, on the GPU at hand (issue 41).

    python benchmarks/ct_attention_tune.py                       # N 4,096, D 64, M 4 and 1, bf16, a grid of tilings
    python benchmarks/ct_attention_tune.py --n 16384 --m 4 --grid default

For one shape (the inputs of benchmarks/ct_attention.py: time-causal, sorted times over ~5 years,
rates from 1/hour to 1/5 years) and each KernelConfig of the grid, torch.profiler records ten
forward+backward passes and reports the device time of each Triton kernel a pass launches
(``_ct_fwd``, ``_ct_bwd_dkdv``, ``_ct_bwd_dq``) and of everything else (the host plan, the
parameter-gradient reductions), with SDPA's forward+backward on the same q, k, v as the
baseline measured in the same run. Forward tilings are varied with the backward's at its
default, then backward tilings with the forward's at its default, so each kernel is compiled
once per tiling. A tiling that fails to compile or run (out of shared memory, say) prints why
and the sweep goes on. Registers and spills come from the compiled kernels' metadata.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ct_attention import make_inputs  # noqa: E402

from healthfm_core.kernels.ct_attention import (
    kernels,  # noqa: E402
    tiling,  # noqa: E402
)
from healthfm_core.kernels.ct_attention.launch import ct_attention_triton  # noqa: E402

FORWARD_GRID = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3)]
BACKWARD_GRID = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2)]
PASSES = 10


def configs(head_dim: int, grid: str) -> list[tiling.KernelConfig]:
    base = tiling.default_config(head_dim)
    if grid == "default":
        return [base]
    out = [base]
    for bm, bn, w, s in FORWARD_GRID:
        out.append(
            tiling.KernelConfig(
                bm, bn, w, s, base.bwd_block_m, base.bwd_block_n, base.bwd_num_warps, base.bwd_num_stages
            )
        )
    for bm, bn, w, s in BACKWARD_GRID:
        out.append(tiling.KernelConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, bm, bn, w, s))
    seen: list[tiling.KernelConfig] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def device_ms_by_kernel(fn, passes: int) -> dict[str, float]:
    """Device ms a pass, by kernel name (Triton kernels by name, the rest pooled as 'other')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        total_us = getattr(e, "device_time_total", None)
        if total_us is None:
            total_us = e.cuda_time_total
        if total_us <= 0:
            continue
        name = next((k for k in ("_ct_fwd", "_ct_bwd_dkdv", "_ct_bwd_dq") if k in e.key), "other")
        totals[name] += total_us / 1000 / passes
    return dict(totals)


def resources() -> dict[str, str]:
    """Registers / spills / shared memory of each compiled specialisation of the three kernels."""
    out = {}
    for name in ("_ct_fwd", "_ct_bwd_dkdv", "_ct_bwd_dq"):
        fn = getattr(kernels, name, None)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        seen = []
        for cache in caches.values():
            for compiled in cache[0].values():
                seen.append(
                    f"regs {getattr(compiled, 'n_regs', '?')} spills {getattr(compiled, 'n_spills', '?')} "
                    f"smem {getattr(compiled.metadata, 'shared', '?')}"
                )
        out[name] = "; ".join(seen[-1:])
    return out


def tune_shape(args: argparse.Namespace, m: int) -> None:
    """One shape: SDPA, then each tiling of the grid; a table of device ms by kernel."""
    b, h = max(1, args.tokens // args.n), max(1, args.model_dim // args.d)
    q, k, v, t, log_w, rates = make_inputs(b, h, args.n, args.d, m, "cuda", torch.bfloat16)
    q, k, v, log_w, rates = (x.requires_grad_() for x in (q, k, v, log_w, rates))
    dout = torch.randn_like(q)

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    def attention(cfg: tiling.KernelConfig) -> None:
        ct_attention_triton(q, k, v, t, t, log_w, rates, None, True, config=cfg).backward(dout)

    sdpa()
    base = sum(device_ms_by_kernel(sdpa, PASSES).values())
    print(f"\nN {args.n} D {args.d} M {m} B {b} H {h}: SDPA fwd+bwd {base:.3f} ms (device time a pass)")
    print("| fwd tile (m, n, warps, stages) | bwd tile | fwd ms | dK/dV ms | dQ ms | other ms | total | / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in configs(args.d, args.grid):
        try:
            attention(cfg)
            torch.cuda.synchronize()
            ms = device_ms_by_kernel(lambda cfg=cfg: attention(cfg), PASSES)
        except Exception as exc:  # a tiling that does not fit must not end the sweep
            print(f"| {cfg} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''} |")
            torch.cuda.empty_cache()
            continue
        total = sum(ms.values())
        print(
            f"| {cfg.block_m}, {cfg.block_n}, {cfg.num_warps}, {cfg.num_stages} | "
            f"{cfg.bwd_block_m}, {cfg.bwd_block_n}, {cfg.bwd_num_warps}, {cfg.bwd_num_stages} | "
            f"{ms.get('_ct_fwd', 0):.3f} | {ms.get('_ct_bwd_dkdv', 0):.3f} | {ms.get('_ct_bwd_dq', 0):.3f} | "
            f"{ms.get('other', 0):.3f} | {total:.3f} | {total / base:.2f}x |",
            flush=True,
        )
    for name, text in resources().items():
        print(f"  {name}: {text}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--m", type=int, nargs="+", default=[4, 1])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--model-dim", type=int, default=1024)
    p.add_argument("--grid", choices=["default", "sweep"], default="sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ct_attention_tune: no CUDA GPU here, nothing to measure.")
        return 2
    import triton

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    for m in args.m:
        tune_shape(args, m)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
