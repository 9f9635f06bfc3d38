"""Time one local training step of HealthFM on CPU: today's step against the fused attention path.

    python benchmarks/train_step.py                          # small model, biobank site, 1 and 2 threads
    python benchmarks/train_step.py --threads 1 --repeats 9
    python benchmarks/train_step.py --threads 1 2 all auto     # the thread sweep (all: every usable core;
                                                               # auto: a site's default, client/threads.py;
                                                               # its row is labelled auto=N and the line
                                                               # above the table says what it measured)
    python benchmarks/train_step.py --profile                # plus a torch.profiler table of one step

A synthetic federation (default scenario, seed 0; --subjects overrides the site sizes) is
written to a temporary directory; a fixed batch of ``--batch-size`` subjects of the site is
cut at ``--max-events`` EHR events and ``--max-patches`` wearable patches (the federation's
defaults: 16, 256, 32). One step is what ``train_local`` does: pretraining losses, backward,
global gradient clipping, an AdamW step. Each timed sample runs ``--steps`` steps from the
same initial weights. Three setups alternate sample by sample, so that all see the same machine
load, and the medians and their ratios come from this one run:

  before     HEALTHFM_CT_ATTENTION=reference and torch's nn.Dropout (the step before issue 13)
  reference  HEALTHFM_CT_ATTENTION=reference and the model's dropout
  auto       HEALTHFM_CT_ATTENTION=auto (on CPU the compiled kernel, else the PyTorch fused path)

Wall-clock and CPU-time (process_time: all threads) medians are both printed: on a loaded
machine wall time swings with the neighbours, CPU time much less. Compare ratios, not times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from synthetic_site import site_dataset  # noqa: E402
from torch import nn  # noqa: E402

from client.threads import measure as measure_auto  # noqa: E402
from client.threads import usable_cores  # noqa: E402
from healthfm_core.data.sequences.tokens import collate  # noqa: E402
from healthfm_core.model.attention import IMPL_ENV  # noqa: E402
from healthfm_core.model.dropout import Dropout  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from healthfm_core.terms.objective_weights import ObjectiveWeights  # noqa: E402

SETUPS = ("before", "reference", "auto")


def torch_dropout(model: HealthFM, on: bool) -> None:
    """Swap the model's Dropout modules to nn.Dropout (on) or back (same attributes, no state)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.__class__ = nn.Dropout if on else Dropout


def build(args: argparse.Namespace, tmp: Path):
    dataset, vocab = site_dataset(tmp, args.scenario, args.site, args.subjects, args.max_events, args.max_patches)
    batch = collate([dataset[i] for i in range(min(args.batch_size, len(dataset)))])
    torch.manual_seed(0)
    model = HealthFM(load_model_config(args.model), vocab.vocab_size, vocab.n_prs_traits)
    return model, batch


def step_time(model: HealthFM, batch, init: dict[str, torch.Tensor], steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step over ``steps`` steps from ``init`` (the trainer's default step)."""
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator()
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        gen.manual_seed(step)
        losses = model.pretraining_losses(batch, ObjectiveWeights(), generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def setup(model: HealthFM, name: str) -> None:
    os.environ[IMPL_ENV] = "auto" if name == "auto" else "reference"
    torch_dropout(model, name == "before")


def run(model: HealthFM, batch, threads: int, repeats: int, steps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per step of each setup."""
    torch.set_num_threads(threads)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
    for name in SETUPS:  # warm-up (and the compiled kernel's first build), not timed
        setup(model, name)
        step_time(model, batch, init, 1)
    for _ in range(repeats):
        for name in SETUPS:
            setup(model, name)
            samples[name].append(step_time(model, batch, init, steps))
    torch_dropout(model, False)
    model.load_state_dict(init)
    return {
        name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for name, s in samples.items()
    }


def profile(model: HealthFM, batch, rows: int) -> None:
    init = {k: v.clone() for k, v in model.state_dict().items()}
    setup(model, "auto")
    step_time(model, batch, init, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_time(model, batch, init, 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    model.load_state_dict(init)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--scenario", default="default")
    p.add_argument("--site", default="biobank")
    p.add_argument("--subjects", type=int, default=64, help="subjects per site (default 64: a quick setup)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-events", type=int, default=256)
    p.add_argument("--max-patches", type=int, default=32)
    p.add_argument(
        "--threads",
        nargs="+",
        default=["1", "2"],
        help="torch threads, one run each: N, all (every usable core) or auto (free cores, a site's default)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed samples per path (median)")
    p.add_argument("--steps", type=int, default=1, help="steps per sample")
    p.add_argument("--profile", action="store_true", help="also print a profiler table of one auto step")
    args = p.parse_args()
    # (label, threads): `auto` is measured once, here, before the setup loads the machine.
    choice = measure_auto() if "auto" in args.threads else None
    try:
        runs = [
            (t, usable_cores() if t == "all" else choice.threads if choice is not None and t == "auto" else int(t))
            for t in args.threads
        ]
    except ValueError:
        p.error(f"--threads {args.threads}: whole numbers, all or auto")
    if min(n for _, n in runs) < 1 or args.repeats < 1 or args.steps < 1:
        p.error(f"--threads {args.threads}, --repeats {args.repeats}, --steps {args.steps} must be >= 1")
    previous = os.environ.get(IMPL_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = build(args, Path(tmp))
    n_ehr = int(batch.ehr_valid.sum(1).max())
    print(
        f"torch {torch.__version__}, model {args.model}, site {args.site}, batch {batch.batch_size}, "
        f"longest EHR sequence {n_ehr}, median of {args.repeats} samples x {args.steps} step(s); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if choice is not None:
        print(f"threads auto (measured before the setup): {choice.describe()}")
    print(
        f"{'threads':>7} {'clock':>5} | {'before s/step':>13} {'reference':>9} {'auto':>7} | "
        f"{'before/auto':>11} {'reference/auto':>14}"
    )
    walls: dict[str, float] = {}
    try:
        for label, threads in runs:
            name = str(threads) if label == str(threads) else f"{label}={threads}"
            res = run(model, batch, threads, args.repeats, args.steps)
            walls[name] = res["auto"][0]
            for i, clock in enumerate(("wall", "cpu")):
                before, ref, auto = (res[setup_name][i] for setup_name in SETUPS)
                print(
                    f"{name:>7} {clock:>5} | {before:13.3f} {ref:9.3f} {auto:7.3f} | {before / auto:11.2f} "
                    f"{ref / auto:14.2f}",
                    flush=True,
                )
        if len(walls) > 1:
            base = next(iter(walls))
            print(
                f"auto step wall time vs {base} thread(s) (usable cores {usable_cores()}): "
                + ", ".join(f"{t}: x{walls[base] / w:.2f}" for t, w in walls.items())
            )
        if args.profile:
            torch.set_num_threads(runs[0][1])
            profile(model, batch, 30)
    finally:
        if previous is None:
            os.environ.pop(IMPL_ENV, None)
        else:
            os.environ[IMPL_ENV] = previous
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
