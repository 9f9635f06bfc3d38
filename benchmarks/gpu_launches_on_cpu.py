"""CUDA kernel launches of one training step, estimated on a CPU (issue 41's <= 2,000 a step).

    python benchmarks/gpu_launches_on_cpu.py                           # tiny, small, paper-structure
    python benchmarks/gpu_launches_on_cpu.py --models paper --attention triton   # paper itself (minutes)
    python benchmarks/gpu_launches_on_cpu.py --models paper --d-model 64 --by-op 30 --by-site 40
    python benchmarks/gpu_launches_on_cpu.py --native-batch .whl/batches/hospital_native.pt   # gpu_checks.sh

On a GPU, ``benchmarks/gpu_train_step.py`` counts launches with torch.profiler. Without one, this
runs the same step (its ``Stepper``: the native batch of ``--batch`` subjects of the hospital
scenario, bf16 autocast, the weights cast once, clipping, AdamW, the log record) on the CPU and
counts, inside torch's dispatcher, the ops it dispatches as CUDA would launch them:

- each aten op one launch, but those that launch nothing on a GPU: views, allocations, host
  reads (``_local_scalar_dense``), wrapped Python scalars (``scalar_tensor``), and random draws
  given a generator (the step's host generator: the objectives draw on the host and copy);
- multi-tensor ops (``_foreach_*``, fused AdamW): the launches CUDA's ``multi_tensor_apply`` makes
  for their tensors' sizes (``multi_tensor_launches``);
- ops CUDA runs as several kernels (``SEVERAL``: cub- or sort-based ones, layer norm's backward)
  at a fixed count each;
- ops CUDA's autocast runs in fp32 (``CUDA_FP32``) given a bf16 tensor: a cast, and one back in the
  backward where it needs a gradient (CPU autocast leaves them in bf16);
- the branches a GPU takes: dropout as ``native_dropout`` (the model's cheap CPU mask is CPU-only),
  AdamW fused (``fused_adamw``; ``--optimizer foreach`` for trees before it);
- the Triton kernels (``--attention triton``, in triton's interpreter) replaced by launches that
  do nothing and counted apart: the host code around them is counted as above.

What it cannot see: how many kernels a cuBLAS or cuDNN call launches (one is counted), and CUDA
ops that launch more than ``SEVERAL`` says. Checked against the H100's profiler counts of
2026-11-26 (docs/performance.md, "Measured on one H100", run 1, tree 43cd3d0, with ``paper`` at
d_model 64 here): the estimate ran 4-9% under the card's count (reference attention: tiny 1,148
against 1,235, small 1,573 against 1,669, paper 5,733 against 5,955; the kernel: 1,048 / 1,373 /
4,533 against 1,147 / 1,493 / 4,899). ``--d-model`` narrows a model so a CPU runs it quickly (``paper``
by default, at 64): the ops are the same, but the multi-tensor ops launch by size (``--d-model 0``
runs each model at its own width: `paper` at 1,024 adds ~55). The batch size changes no count.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train_step as bench  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import healthfm_core.model.dropout as model_dropout  # noqa: E402
from healthfm_core.data.sequences.batch import Batch  # noqa: E402
from healthfm_core.model.attention import IMPL_ENV  # noqa: E402
from healthfm_core.model.config import ModelConfig, load_model_config  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402

# CUDA's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): 65,536-element chunks, at most
# 320 blocks and 110/64/48/36/30 tensors a launch for 1-5 tensor lists.
CHUNK = 65_536
MAX_BLOCKS = 320
MAX_TENSORS = (110, 64, 48, 36, 30)
# Ops CUDA runs as several kernels (cub scans and selects, radix sorts), at a typical count.
SEVERAL = {
    "nonzero": 4,
    "embedding_dense_backward": 8,
    "sort": 4,
    "argsort": 4,
    "topk": 3,
    "_unique2": 6,
    "unique_dim": 6,
    "native_layer_norm_backward": 2,
    "logsumexp": 5,
    "repeat_interleave": 3,
    "masked_select": 5,
    "randperm": 3,
    "select_backward": 2,
    "slice_backward": 2,
}
NO_LAUNCH = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "_local_scalar_dense",
    "lift_fresh",
    "detach",
    "alias",
    "scalar_tensor",
    "resize_",
    "set_",
    "_unsafe_view",
}
# torch.amp's CUDA fp32 list (the ops that see a bf16 input here; CPU autocast runs them in bf16).
CUDA_FP32 = {
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow",
    "softplus",
    "native_layer_norm",
    "group_norm",
    "binary_cross_entropy_with_logits",
    "logsumexp",
    "nll_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "mse_loss",
    "cdist",
}


def multi_tensor_launches(numels: Sequence[int], lists: int) -> int:
    """Launches of CUDA's multi_tensor_apply over tensors of these sizes with ``lists`` tensor lists."""
    max_tensors = MAX_TENSORS[min(lists, len(MAX_TENSORS)) - 1]
    live = [n for n in numels if n > 0]
    launches = tensors = blocks = 0
    for i, numel in enumerate(live):
        tensors += 1
        chunks = math.ceil(numel / CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == MAX_BLOCKS or (i == len(live) - 1 and last_chunk):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1  # a tensor cut mid-way starts the next launch
    return launches


def _is_view(func: Any) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class CudaLaunches(TorchDispatchMode):
    """Launches a CUDA step would make for the ops dispatched inside (module docstring): ``total``,
    ``by_op`` and, with ``sites``, ``by_site`` (the innermost line of this project, or the autograd
    node in the backward)."""

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.sites = sites
        self.total = 0
        self.by_op: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()

    def launches(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        if name.startswith(("_foreach_", "_fused_")):
            lists = [x for x in args if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor)]
            if not lists:  # every list empty: nothing to launch
                return 0
            depth = 4 if name.startswith("_fused_adam") else len(lists) + (0 if name.endswith("_") else 1)
            cleanup = 1 if name.startswith("_foreach_norm") else 0  # its per-tensor norms' final kernel
            return multi_tensor_launches([x.numel() for x in lists[0]], depth) + cleanup
        count = SEVERAL.get(name, 1)
        if torch.is_autocast_enabled("cpu") and name in CUDA_FP32:
            for x in args:
                if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
                    count += 1 + int(x.requires_grad)
        return count

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if _is_view(func) or name in NO_LAUNCH:
            return out
        if kwargs.get("generator") is not None:
            return out  # an explicit generator is the step's host one: drawn on the host, then copied
        count = self.launches(name, args, kwargs)
        self.total += count
        self.by_op[name] += count
        if self.sites:
            self.by_site[f"{_site()} {name}"] += count
        return out


def _site() -> str:
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward {node.name()}"
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "healthfm_core/" in path and "kernels/ct_attention" not in path:
            return f"{path.split('healthfm_core/')[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        if "kernels/ct_attention" in path:
            return f"kernels/ct_attention/{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "step"


@contextmanager
def gpu_branches() -> Iterator[None]:
    """Dropout as a GPU runs it (``native_dropout``: one kernel forward, one backward)."""
    cpu_dropout = model_dropout.dropout

    def native(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
        if not training or p == 0.0 or x.numel() == 0:
            return x
        return torch.native_dropout(x, p, True)[0]

    model_dropout.dropout = native
    try:
        yield
    finally:
        model_dropout.dropout = cpu_dropout


class TritonLaunches:
    """The three Triton kernels replaced, inside ``with``, by launches that count and zero their
    outputs (torch.empty before), so that the host code around them runs as on a GPU (needs
    TRITON_INTERPRET=1 to import)."""

    OUTPUTS = {"_ct_fwd": {"O", "LSE"}, "_ct_bwd_dq": {"DQ", "GLW", "GRATE", "DELTA"}, "_ct_bwd_dkdv": {"DK", "DV"}}

    def __init__(self) -> None:
        self.count = 0
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> TritonLaunches:
        from healthfm_core.kernels.ct_attention import kernels
        from healthfm_core.kernels.ct_attention.jit import ensure_built

        ensure_built()
        for name, outputs in self.OUTPUTS.items():
            self.saved[name] = getattr(kernels, name)
            params = list(self.saved[name].arg_names)
            setattr(kernels, name, _CountedKernel(self, [i for i, p in enumerate(params) if p in outputs]))
        return self

    def __exit__(self, *exc: object) -> None:
        from healthfm_core.kernels.ct_attention import kernels

        for name, original in self.saved.items():
            setattr(kernels, name, original)


class _CountedKernel:
    def __init__(self, owner: TritonLaunches, outputs: list[int]) -> None:
        self.owner = owner
        self.outputs = outputs

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.owner.count += 1
            for i in self.outputs:  # below torch's dispatcher: not an op of the step
                storage = args[i].untyped_storage()
                ctypes.memset(storage.data_ptr(), 0, storage.nbytes())

        return launch


def narrowed(cfg: ModelConfig, d_model: int | None) -> ModelConfig:
    """``cfg`` at width ``d_model``, its wearable encoder and genomics MLP narrowed in proportion
    (the layers, heads and objectives as they are; validated as a config file is)."""
    if not d_model or d_model == cfg.d_model:
        return cfg
    scale = d_model / cfg.d_model
    wearable_heads = cfg.wearable.n_heads
    wearable = max(2 * wearable_heads, round(cfg.wearable.d_model * scale / (2 * wearable_heads)) * 2 * wearable_heads)
    data = cfg.model_dump()
    data["d_model"] = d_model
    data["wearable"]["d_model"] = wearable
    data["genomics"]["d_hidden"] = max(4, round(cfg.genomics.d_hidden * scale))
    return ModelConfig.model_validate(data)


def native_batch(args: argparse.Namespace) -> tuple[Batch, int, int]:
    """(the batch, vocabulary size, PRS traits): the first ``--batch`` subjects of ``--native-batch``,
    or the GPU benchmark's native batch of the hospital scenario's synthetic site."""
    if args.native_batch is not None:  # the GPU benchmark's saved batch (a machine without polars)
        batch, vocab, traits = bench.load_native(args.native_batch)
        return batch.rows(slice(0, args.batch)), vocab, traits
    site = argparse.Namespace(
        scenario="hospital",
        site="general_hospital",
        subjects=args.subjects,
        batch=args.batch,
        max_events=args.max_events,
        max_patches=32,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        return bench.site_batch(site, Path(tmp))


def estimate(
    model_name: str, attention: str, data: tuple[Batch, int, int], args: argparse.Namespace
) -> tuple[CudaLaunches, int]:
    """(the counter after one step, the Triton launches) for one model and attention path."""
    os.environ[IMPL_ENV] = attention
    batch, vocab, traits = data
    cfg = narrowed(load_model_config(model_name), args.d_model)
    torch.manual_seed(0)
    stepper = bench.Stepper(HealthFM(cfg, vocab, traits), batch, torch.device("cpu"))
    stepper.autocast = torch.bfloat16
    for group in stepper.opt.param_groups:  # fused: what trainer.fused_adamw asks for on a GPU
        group["fused"], group["foreach"] = args.optimizer == "fused", args.optimizer == "foreach"
    triton = TritonLaunches()
    with gpu_branches(), triton if attention == "triton" else contextlib.nullcontext():
        stepper()  # the first step makes the optimizer's state and the kernels' caches
        counter = CudaLaunches(sites=args.by_site > 0)
        before = triton.count
        with counter:
            stepper()
    return counter, triton.count - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small", "paper"])
    p.add_argument("--attention", nargs="+", default=["reference", "triton"], choices=["reference", "triton"])
    p.add_argument(
        "--d-model",
        type=int,
        default=None,
        help="narrow each model to this width (default: paper at 64, the others as they are; 0: each as it is)",
    )
    p.add_argument("--subjects", type=int, default=40, help="subjects of the synthetic site")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-events", type=int, default=112)
    p.add_argument(
        "--native-batch", type=Path, default=None, help="a batch gpu_train_step.py --save-native-batch wrote"
    )
    p.add_argument(
        "--optimizer",
        choices=["fused", "foreach"],
        default="fused",
        help="AdamW as the trainer takes it on a GPU (fused), or its foreach path (trees before 0b34d35)",
    )
    p.add_argument("--by-op", type=int, default=0, help="print the N ops with the most launches")
    p.add_argument("--by-site", type=int, default=0, help="print the N (site, op) pairs with the most launches")
    args = p.parse_args()
    if "triton" in args.attention and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--attention triton needs TRITON_INTERPRET=1 (the kernels are replaced, their host code runs)")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data = native_batch(args)
    print("model | attention | d_model | launches a step | of them Triton kernels")
    for model_name in args.models:
        for attention in args.attention:
            row = argparse.Namespace(**vars(args))
            if row.d_model is None and model_name == "paper":
                row.d_model = 64  # paper-structure: paper's layers and heads, a CPU-sized width
            width = row.d_model or load_model_config(model_name).d_model
            if width > load_model_config(model_name).d_model:
                p.error(f"--d-model {width} is wider than {model_name}'s {load_model_config(model_name).d_model}")
            counter, kernels = estimate(model_name, attention, data, row)
            print(f"{model_name} | {attention} | {width} | {counter.total + kernels:,} | {kernels}")
            for name, n in counter.by_op.most_common(args.by_op):
                print(f"    {n:6d}  {name}")
            for site, n in counter.by_site.most_common(args.by_site):
                print(f"    {n:6d}  {site}")


if __name__ == "__main__":
    main()
