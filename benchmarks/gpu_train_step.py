"""One training step of HealthFM as a site's GPU runs it: ms/step, tokens/s, MFU, host syncs and
kernel launches a step, per model and attention path (issue 41).

    python benchmarks/gpu_train_step.py                                  # CUDA: tiny, small, paper; CPU: tiny, small
    python benchmarks/gpu_train_step.py --models paper --shapes native 256x32 1024x8 2048x8 4096x4
    python benchmarks/gpu_train_step.py --models tiny --attention reference --shapes 64x4 --scenario tiny --subjects 16

A synthetic federation (``--scenario``, seed 0, ``--subjects`` per site) is written to a temporary
directory; ``--batch`` subjects of ``--site`` are cut at ``--max-events`` EHR tokens and
``--max-patches`` wearable patches and collated: the "native" shape. A shape ``TxS`` is S
subjects of exactly T EHR tokens each, the longer histories a GPU is for: each subject's tokens
repeated at shifted times (copy j moved j x the subject's span later, the prediction time with
the last copy).

The step is the trainer's (healthfm_core/train/trainer.py): the batch moved to the device, the
pretraining losses under bf16 autocast on CUDA (fp32 on CPU) with the linears' weights cast once
(``forward_losses``), backward, gradient clipping at 1, an AdamW step, the step's log record. ``--attention`` sets HEALTHFM_CT_ATTENTION per row:
``reference`` (the PyTorch formula) and ``auto`` (the Triton kernel on CUDA; on CPU the fused
CPU path). Each row: ``--warmup`` untimed steps, then the median of ``--repeats`` timed steps.
``--compile`` adds a row per path with the backbone under ``torch.compile(dynamic=True)`` (its
label ``+compile``): the eager backbone's ~90 elementwise launches a layer are what issue 41's
launch target needs fused. The attention call itself stays eager (``compiled_around_attention``:
a graph break at each layer's call; dynamo tracing into the Triton path fails, as it did under the
interpreter), under plain autocast (inductor fuses the weight casts itself). Its first step compiles (give ``--warmup`` at least 1); a row whose compile fails
prints why and the run goes on. Not yet measured on a GPU. The dispatch-mode count below is the same
for a compiled row as for its eager one (1,515 ops for `tiny` on CPU): it says nothing of fusion;
on CUDA the profiler's launches do.

Counts a step:
  CUDA  torch.profiler over one step: launches = the runtime's kernel launch calls
        (cudaLaunchKernel, cuLaunchKernel (Triton), ...), syncs = cudaStreamSynchronize +
        cudaDeviceSynchronize + cudaEventSynchronize, with the DtoH copies beside them.
  any   healthfm_core/train/host_syncs.py over one step: the ops that force a host sync on CUDA
        and the aten ops dispatched (a CPU proxy for launches; the optimizer's own ops apart, as
        on CPU AdamW loops over the parameters where CUDA's foreach path batches them).
MFU = (6 x parameters x tokens + attention) / step time / the GPU's dense bf16 peak (PEAK_TFLOPS;
none on CPU or an unknown GPU). tokens: valid backbone tokens (EHR, wearable patches, queries);
attention: 12 x layers x d_model x sum over samples of L^2 / 2 (forward and backward of QK^T and
PV over the time-causal half of the L x L pairs, L the padded sequence).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import healthfm_core.model.healthfm as healthfm_model  # noqa: E402
from healthfm_core.data.sequences.batch import Batch  # noqa: E402
from healthfm_core.data.sequences.tokens import collate  # noqa: E402
from healthfm_core.model.attention import IMPL_ENV  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from healthfm_core.terms.objective_weights import ObjectiveWeights  # noqa: E402
from healthfm_core.train.device import resolve_device  # noqa: E402
from healthfm_core.train.host_syncs import count_host_syncs  # noqa: E402
from healthfm_core.train.trainer import (  # noqa: E402
    TrainConfig,
    _build_optimizer,
    _clip,
    _step_record,
    forward_losses,
    resolve_precision,
)

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)
COMPILED = "+compile"  # a row's attention label with the backbone under torch.compile (--compile)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- data


def site_batch(args: argparse.Namespace, tmp: Path) -> tuple[Batch, int, int]:
    """(the native batch, vocabulary size, PRS traits) of the chosen synthetic site."""
    # Imported here: the synthetic federation needs the data tooling (polars, flwr, hydra), which a
    # GPU machine given a saved batch (--native-batch) does not need.
    from synthetic_site import site_dataset

    dataset, vocab = site_dataset(tmp, args.scenario, args.site, args.subjects, args.max_events, args.max_patches)
    batch = collate([dataset[i % len(dataset)] for i in range(args.batch)])
    return batch, vocab.vocab_size, vocab.n_prs_traits


def save_native(path: Path, batch: Batch, vocab: int, traits: int) -> None:
    """The native batch as tensors in one file (torch.save of plain tensors and ints)."""
    tensors = {f.name: getattr(batch, f.name) for f in fields(batch)}
    torch.save({"batch": tensors, "vocab_size": vocab, "n_prs_traits": traits}, path)


def load_native(path: Path) -> tuple[Batch, int, int]:
    """A batch written by --save-native-batch (weights_only: plain tensors and ints, nothing executed)."""
    saved = torch.load(path, weights_only=True)
    return Batch(**saved["batch"]), int(saved["vocab_size"]), int(saved["n_prs_traits"])


def lengthen(batch: Batch, tokens: int, subjects: int) -> Batch:
    """`subjects` samples (the batch's, cycled) of exactly `tokens` EHR tokens each: a sample's
    valid tokens repeated, copy j at its times + j x (its span + 1 day); prediction time moved
    by as much as the last copy. A sample without EHR tokens keeps none."""
    rows = [i % batch.batch_size for i in range(subjects)]
    b = batch.rows(rows)
    k = b.codes.shape[2]
    codes = torch.zeros(subjects, tokens, k, dtype=b.codes.dtype)
    values = torch.zeros(subjects, tokens, k, dtype=b.values.dtype)
    has_value = torch.zeros(subjects, tokens, k, dtype=torch.bool)
    times = torch.zeros(subjects, tokens)
    valid = torch.zeros(subjects, tokens, dtype=torch.bool)
    pt = b.prediction_time.clone()
    for s in range(subjects):
        (own,) = b.ehr_valid[s].nonzero(as_tuple=True)
        if len(own) == 0:
            continue
        src = own[torch.arange(tokens) % len(own)]
        copy = torch.arange(tokens) // len(own)
        span = float(b.times[s, own].max() - b.times[s, own].min()) + 1.0
        codes[s], values[s], has_value[s] = b.codes[s, src], b.values[s, src], b.has_value[s, src]
        times[s] = b.times[s, src] + copy * span
        valid[s] = True
        pt[s] = b.prediction_time[s] + int(copy.max()) * span
    return replace(b, codes=codes, values=values, has_value=has_value, times=times, ehr_valid=valid, prediction_time=pt)


def step_tokens(batch: Batch) -> tuple[int, int]:
    """(valid backbone tokens, padded sequence length L): EHR, wearable patches, one query each."""
    valid = int(batch.ehr_valid.sum()) + int(batch.wear_valid.sum()) + batch.batch_size
    return valid, batch.codes.shape[1] + batch.wear_valid.shape[1] + 1


# ----------------------------------------------------------------------------- the step


@dataclass
class Row:
    model: str
    attention: str
    shape: str
    params: int
    tokens: int
    seq_len: int
    ms: float
    flops: float
    syncs: int  # host syncs a step (profiler on CUDA, the op counter on CPU)
    launches: int | None  # kernel launches a step (CUDA only)
    counted_syncs: int
    counted_ops: int
    optimizer_ops: int
    peak_mib: float | None


class Stepper:
    """The trainer's step (see train_local) on one model, batch and device. ``cast_once`` False:
    plain autocast, each linear casting its own weights (a compiled row: inductor fuses those
    casts, and the trainer's one-op cast would swap the compiled module's parameters each step)."""

    def __init__(self, model: HealthFM, batch: Batch, device: torch.device, cast_once: bool = True) -> None:
        self.model = model.to(device).train()
        self.batch = batch  # on the host, moved every step as the trainer does
        self.device = device
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.opt = _build_optimizer(named, TrainConfig(steps=1), None)
        self.autocast = resolve_precision("auto", device)
        self.generator = torch.Generator()
        self.step = 0
        self.cast_once = cast_once

    def __call__(self) -> None:
        self.generator.manual_seed(self.step)
        batch = self.batch.to(self.device)
        names, values, losses = forward_losses(
            self.model, batch, ObjectiveWeights(), self.generator, self.step, self.device, self.autocast, self.cast_once
        )
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = _clip(self.params, 1.0)
        self.opt.step()
        _step_record(self.model, self.step, names, values, 0.0, grad_norm)
        self.step += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def profiled_counts(stepper: Stepper) -> tuple[int, int]:
    """(host syncs, kernel launches) of one step from torch.profiler's CUDA runtime calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stepper()
        stepper.sync()
    names = [e.name for e in prof.events()]
    return sum(n in SYNC_CALLS for n in names), sum(n in LAUNCH_CALLS for n in names)


def measure(stepper: Stepper, warmup: int, repeats: int) -> tuple[float, dict[str, int]]:
    for _ in range(warmup):
        stepper()
    stepper.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stepper()
        stepper.sync()
        times.append(time.perf_counter() - start)
    with count_host_syncs() as count:
        stepper()
    counts = {"syncs": count.n_syncs, "ops": count.ops, "optimizer_ops": count.optimizer_ops}
    return statistics.median(times), counts


@contextlib.contextmanager
def compiled_around_attention(on: bool) -> Iterator[None]:
    """While `on`: the model's ct_attention calls are opaque to torch.compile (a graph break at
    each: the Triton launch, its tile-plan memo and the C extension stay eager, dynamo compiles the
    block around them); the model's own name for it is restored after."""
    if not on:
        yield
        return
    eager = healthfm_model.ct_attention
    healthfm_model.ct_attention = torch.compiler.disable(eager)
    try:
        yield
    finally:
        healthfm_model.ct_attention = eager


def compiled_graphs() -> str:
    """torch.compile's graphs and graph breaks so far in this process (a compiled row's line)."""
    from torch._dynamo.utils import counters  # imported by torch.compile already

    breaks = sum(counters["graph_break"].values())
    return f" (torch.compile so far: {counters['stats']['unique_graphs']} graphs, {breaks} graph breaks)"


def run_row(args, model_name, attention, shape, batch, vocab, traits, device) -> Row:  # type: ignore[no-untyped-def]
    with compiled_around_attention(attention.endswith(COMPILED)):
        return _run_row(args, model_name, attention, shape, batch, vocab, traits, device)


def _run_row(args, model_name, attention, shape, batch, vocab, traits, device) -> Row:  # type: ignore[no-untyped-def]
    os.environ[IMPL_ENV] = attention.removesuffix(COMPILED)
    cfg = load_model_config(model_name)
    torch.manual_seed(0)
    model = HealthFM(cfg, vocab, traits)
    if attention.endswith(COMPILED):
        model.backbone = torch.compile(model.backbone, dynamic=True)  # type: ignore[assignment]
    stepper = Stepper(model, batch, device, cast_once=not attention.endswith(COMPILED))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, counts = measure(stepper, args.warmup, args.repeats)
    syncs, launches = (counts["syncs"], None)
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        syncs, launches = profiled_counts(stepper)
    tokens, seq_len = step_tokens(batch)
    params = model.num_parameters()
    attention_flops = 12 * cfg.n_layers * cfg.d_model * batch.batch_size * seq_len**2 / 2
    return Row(
        model=model_name,
        attention=attention,
        shape=shape,
        params=params,
        tokens=tokens,
        seq_len=seq_len,
        ms=1000 * seconds,
        flops=6 * params * tokens + attention_flops,
        syncs=syncs,
        launches=launches,
        counted_syncs=counts["syncs"],
        counted_ops=counts["ops"],
        optimizer_ops=counts["optimizer_ops"],
        peak_mib=peak,
    )


def print_table(rows: list[Row], device: torch.device) -> None:
    peak = peak_tflops(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ndevice: {where}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (no MFU)'}")
    head = (
        "| model | params | attention | tokens/subject x subjects | tokens/step | L | ms/step | tokens/s | "
        "TFLOP/s | MFU | host syncs/step | launches/step | counted syncs / ops (optimizer) | peak MiB |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        tflops = r.flops / (r.ms / 1000) / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(
            f"| {r.model} | {r.params:,} | {r.attention} | {r.shape} | {r.tokens:,} | {r.seq_len:,} | "
            f"{r.ms:.1f} | {r.tokens / (r.ms / 1000):,.0f} | {tflops:.3g} | {mfu} | {r.syncs} | "
            f"{r.launches if r.launches is not None else 'n/a (CPU)'} | {r.counted_syncs} / {r.counted_ops:,} "
            f"({r.optimizer_ops:,}) | {f'{r.peak_mib:,.0f}' if r.peak_mib is not None else 'n/a'} |"
        )


def parse_shape(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    try:
        tokens, subjects = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected native or TOKENSxSUBJECTS, e.g. 1024x8") from None
    if tokens < 1 or subjects < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: tokens and subjects must be >= 1")
    return tokens, subjects


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--models", nargs="+", default=None, help="default: tiny small paper on CUDA, tiny small on CPU")
    p.add_argument("--attention", nargs="+", default=["reference", "auto"], choices=["reference", "auto", "triton"])
    p.add_argument("--shapes", nargs="+", default=["native"], help="native and/or TOKENSxSUBJECTS (e.g. 1024x8)")
    p.add_argument("--scenario", default="hospital")
    p.add_argument("--site", default="general_hospital")
    p.add_argument("--subjects", type=int, default=64, help="subjects per synthetic site")
    p.add_argument("--batch", type=int, default=32, help="subjects in the native batch")
    p.add_argument("--max-events", type=int, default=112)
    p.add_argument("--max-patches", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--compile", action="store_true", help="also each path with the backbone under torch.compile (docstring)"
    )
    p.add_argument("--save-native-batch", type=Path, default=None, help="write the native batch to FILE and stop")
    p.add_argument(
        "--native-batch", type=Path, default=None, help="read the native batch from FILE (no synthetic federation)"
    )
    args = p.parse_args(argv)
    shapes = [(text, parse_shape(text)) for text in args.shapes]
    device = resolve_device(args.device, "--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["tiny", "small", "paper"] if device.type == "cuda" else ["tiny", "small"])
    if args.native_batch is not None:
        native, vocab, traits = load_native(args.native_batch)
    else:
        with tempfile.TemporaryDirectory(prefix="healthfm-gpu-step-") as tmp:
            native, vocab, traits = site_batch(args, Path(tmp))
    if args.save_native_batch is not None:
        save_native(args.save_native_batch, native, vocab, traits)
        print(f"wrote the native batch ({native.codes.shape[1]} x {native.batch_size}) to {args.save_native_batch}")
        return 0
    rows: list[Row] = []
    missing: list[str] = []
    suffixes = ("", COMPILED) if args.compile else ("",)
    for text, shape in shapes:
        batch = native if shape is None else lengthen(native, *shape)
        label = f"native ({native.codes.shape[1]} x {native.batch_size})" if shape is None else text
        for model_name in models:
            for attention in [a + suffix for a in args.attention for suffix in suffixes]:
                try:
                    row = run_row(args, model_name, attention, label, batch, vocab, traits, device)
                except torch.OutOfMemoryError:  # the reference at long histories (issue 41: from 1,024 x 8)
                    print(f"{model_name} {attention} {label}: out of memory", flush=True)
                    missing.append(f"{model_name} {attention} {label}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                except Exception as exc:  # noqa: BLE001  # a compile that fails is a finding, not the end of the run
                    if not attention.endswith(COMPILED):
                        raise
                    print(f"{model_name} {attention} {label}: failed: {exc!r}"[:2000], flush=True)
                    missing.append(f"{model_name} {attention} {label}: failed ({type(exc).__name__})")
                    continue
                graphs = compiled_graphs() if attention.endswith(COMPILED) else ""
                print(f"{model_name} {attention} {label}: {row.ms:.1f} ms/step{graphs}", flush=True)
                rows.append(row)
    print_table(rows, device)
    for what in missing:
        print(what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
