"""DP overhead of a site's local step: time and peak memory per step with and without DP-SGD.

    python benchmarks/privacy.py                       # small model, batch 16, CPU (or CUDA if present)
    python benchmarks/privacy.py --model tiny --steps 2 --batch-size 8
    python benchmarks/privacy.py --device cuda --json out.json

Without DP: the trainer's usual step (one loss over the batch, backward, global clipping).
With DP: healthfm_core.privacy (Poisson sampling at batch/n, per-sample gradients by batches of
one, per-sample clipping, Gaussian noise, the RDP accountant). Both train every group of a
synthetic biobank site (every modality). Peak memory: CUDA's max_memory_allocated on a GPU; on
CPU the peak resident set size sampled every 2 ms during the steps (warm-up included), minus
the RSS after setup.
Each mode runs in its own process, so neither inherits the other's allocator cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

from healthfm_core.data.sequences.code_stats import site_code_stats  # noqa: E402
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, collate, make_loader  # noqa: E402
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.data.sites.site import open_site  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.privacy.engine import DPLocalStep, DPSettings, PoissonBatches, sample_rate_for  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from healthfm_core.train.trainer import TrainConfig, train_local  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes above the level at entry: CUDA allocator on a GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() - self.base)


def run_mode(
    dp: bool, model: HealthFM, dataset: PretrainingDataset, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def steps(n: int) -> float:
        model.load_state_dict(init)
        cfg = TrainConfig(steps=n, lr=1e-4, batch_size=args.batch_size, seed=0, progress=False, log_every=n)
        if dp:
            rate = sample_rate_for(args.batch_size, len(dataset))
            settings = DPSettings(
                noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=rate, n_samples=len(dataset), delta=1e-5
            )
            data = PoissonBatches(
                dataset, collate, rate, steps=max(1, round(1 / rate)), generator=torch.Generator().manual_seed(0)
            )
            result = train_local(model, data, cfg, local_step=DPLocalStep(settings, RDPAccountant()))
        else:
            result = train_local(model, make_loader(dataset, batch_size=args.batch_size, seed=0), cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result.seconds / n, result.examples / n

    # Memory over the warm-up and the timed steps, from the level after setup (the allocator keeps
    # what the warm-up freed, so measuring after it would miss the step's working set).
    with PeakMemory(device) as mem:
        steps(1)  # warm-up (allocator, lazy init): not timed
        seconds, examples = steps(args.steps)
    return {"seconds_per_step": seconds, "peak_bytes": mem.peak, "examples_per_step": examples}


def measure(dp: bool, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_federation(Path(tmp), scenario="tiny", seed=0, n_subjects=args.subjects, progress=False)
        site = open_site(manifest.site("biobank").root)
        vocab = build_vocabulary([site_code_stats(site, min_subjects=5)], min_subjects=5)
        model = HealthFM(load_model_config(args.model), vocab.vocab_size, vocab.n_prs_traits).to(device)
        ids = site.subject_splits()["subject_id"].to_numpy()
        dataset = PretrainingDataset(
            SiteSequences.from_site(site, vocab),
            ids,
            time_mode="last",
            max_events=args.max_events,
            max_patches=args.max_patches,
        )
        row = run_mode(dp, model, dataset, args, device)
    row["n_params"] = sum(q.numel() for q in model.parameters())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--subjects", type=int, default=128)
    p.add_argument("--max-events", type=int, default=256)
    p.add_argument("--max-patches", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--mode", choices=["dp", "no_dp"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.mode is not None:  # a child: one mode, result as JSON on stdout
        print(json.dumps(measure(args.mode == "dp", args, device)))
        return
    rows = {}
    for mode in ("no_dp", "dp"):
        argv = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    n_params = rows["dp"]["n_params"]
    print(
        f"model {args.model} ({n_params / 1e6:.2f} M parameters), device {device}, batch {args.batch_size} "
        f"(DP: Poisson, expected {args.batch_size}), max_events {args.max_events}, max_patches {args.max_patches}, "
        f"{args.steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"{'mode':8s} {'s/step':>9s} {'peak MiB':>9s} {'samples/step':>13s}")
    for mode, r in rows.items():
        print(f"{mode:8s} {r['seconds_per_step']:9.3f} {r['peak_bytes'] / 2**20:9.1f} {r['examples_per_step']:13.1f}")
    time_ratio = rows["dp"]["seconds_per_step"] / rows["no_dp"]["seconds_per_step"]
    mem_ratio = rows["dp"]["peak_bytes"] / max(1, rows["no_dp"]["peak_bytes"])
    print(f"DP / no DP: time x{time_ratio:.2f}, peak memory x{mem_ratio:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "time_ratio": time_ratio,
                    "memory_ratio": mem_ratio,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
