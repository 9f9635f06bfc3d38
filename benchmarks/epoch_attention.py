"""Time the wearable encoder's epoch attention (EpochBlock) on CPU: today's masked SDPA against the
candidate rewrites, forward+backward and forward only, in one run.

    python benchmarks/epoch_attention.py                 # tiny and small shapes, 1 thread
    python benchmarks/epoch_attention.py --repeats 15 --compile

Shapes are a training batch's patches: tiny 16 x 24 patches, 2 heads, head_dim 8; small 16 x 32
patches, 4 heads, head_dim 16; E = 120 epochs. Two presence patterns: every epoch present (all
patches of the synthetic sites) and mixed (every 8th patch partial, some with a single present
epoch). The setups alternate sample by sample in rotated order, so all see the same machine load; medians and
ratios against "bool" come from this one run. Wall-clock and CPU-time (process_time) are both
printed: on a loaded machine compare ratios, not times.

  bool      F.scaled_dot_product_attention with the boolean key mask (the model's EpochBlock)
  nomask    no mask when every epoch of the batch is present (same as bool otherwise)
  float     an additive float mask (0 / -inf) instead of the boolean one
  split     full patches without a mask, partial ones with it, scattered back
  contig    q, k, v made contiguous before SDPA (the SDPA kernel reads strided inputs otherwise)
  compiled  torch.compile of the whole block (--compile; its compile time is printed)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from healthfm_core.model.healthfm import EpochBlock  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402

N_EPOCHS = 120
PATCHES = {"tiny": 16 * 24, "small": 16 * 32}
Attend = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def attend_bool(q: Tensor, k: Tensor, v: Tensor, present: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=present[:, None, None, :])


def attend_nomask(q: Tensor, k: Tensor, v: Tensor, present: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bool(present.all()) else present[:, None, None, :])


def attend_float(q: Tensor, k: Tensor, v: Tensor, present: Tensor) -> Tensor:
    bias = torch.zeros(present.shape, dtype=q.dtype).masked_fill(~present, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])


def attend_split(q: Tensor, k: Tensor, v: Tensor, present: Tensor) -> Tensor:
    full = present.all(dim=-1)
    f, p = full.nonzero(as_tuple=True)[0], (~full).nonzero(as_tuple=True)[0]
    out_f = F.scaled_dot_product_attention(q[f], k[f], v[f])
    out_p = F.scaled_dot_product_attention(q[p], k[p], v[p], attn_mask=present[p][:, None, None, :])
    return torch.cat([out_f, out_p]).index_select(0, torch.argsort(torch.cat([f, p])))


def attend_contig(q: Tensor, k: Tensor, v: Tensor, present: Tensor) -> Tensor:
    return attend_nomask(q.contiguous(), k.contiguous(), v.contiguous(), present)


def block_forward(block: EpochBlock, attend: Attend, x: Tensor, *, present: Tensor) -> Tensor:
    """EpochBlock.forward with its attention call swapped for ``attend``."""
    n, e, d = x.shape
    q, k, v = block.qkv(block.norm1(x)).view(n, e, 3, block.n_heads, d // block.n_heads).permute(2, 0, 3, 1, 4)
    x = x + block.proj(attend(q, k, v, present).transpose(1, 2).reshape(n, e, d))
    return x + block.mlp(block.norm2(x))


def presence(n: int, pattern: str) -> Tensor:
    present = torch.ones(n, N_EPOCHS, dtype=torch.bool)
    if pattern == "mixed":
        for j, i in enumerate(range(0, n, 8)):  # every 8th patch partial; every 4th of those one epoch
            present[i] = torch.arange(N_EPOCHS) == j % N_EPOCHS if j % 4 == 0 else torch.rand(N_EPOCHS) < 0.6
            present[i, j % N_EPOCHS] = True
    return present


def sample(fn: Callable[[Tensor], Tensor], x: Tensor, backward: bool) -> tuple[float, float]:
    x = x.detach().requires_grad_(backward)
    wall, cpu = time.perf_counter(), time.process_time()
    if backward:
        fn(x).sum().backward()
    else:
        with torch.inference_mode():
            fn(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=9, help="timed samples per setup (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), E={N_EPOCHS}, median of {args.repeats}")
    for name in args.models:
        w = load_model_config(name).wearable
        torch.manual_seed(0)
        block = EpochBlock(w.d_model, w.n_heads, w.mlp_ratio, 0.0)
        n = PATCHES.get(name, 16 * 32)
        x = torch.randn(n, N_EPOCHS, w.d_model)
        attends = {"bool": attend_bool, "nomask": attend_nomask, "float": attend_float, "split": attend_split}
        attends["contig"] = attend_contig
        for pattern in ("all", "mixed"):
            present = presence(n, pattern)
            setups: dict[str, Callable[[Tensor], Tensor]] = {
                key: functools.partial(block_forward, block, a, present=present) for key, a in attends.items()
            }
            if args.compile:
                setups["compiled"] = functools.partial(torch.compile(block, dynamic=False), epoch_present=present)
                wall, _ = sample(setups["compiled"], x, True)
                print(f"{name} {pattern}: torch.compile of the block and one fwd+bwd took {wall:.1f} s")
            for backward in (True, False):
                times: dict[str, list[tuple[float, float]]] = {key: [] for key in setups}
                for r in range(args.repeats + 1):  # the first round warms up
                    keys = list(setups)
                    for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotated: no setup always first
                        t = sample(setups[key], x, backward)
                        if r:
                            times[key].append(t)
                med = {
                    k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
                    for k, v in times.items()
                }
                for i, clock in enumerate(("wall", "cpu")):
                    base = med["bool"][i]
                    cells = " ".join(f"{k}={m[i] * 1e3:.1f}ms x{base / m[i]:.2f}" for k, m in med.items())
                    print(
                        f"{name:>5} n={n} {pattern:>5} {'fwd+bwd' if backward else 'fwd':>7} {clock:>4} | {cells}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
