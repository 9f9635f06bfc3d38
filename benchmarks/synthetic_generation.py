"""Time the synthetic federation generator: wall time and rows/s per site and in total.

    .venv/bin/python benchmarks/synthetic_generation.py [--scenario default] [--seed 0] [--n-subjects N] [--out DIR]

Without --out the federation is written to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from simulations.synthetic import generate_federation, load_scenario
from simulations.synthetic.generate import generate_site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-subjects", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="healthfm-synth-") as tmp:
        out = args.out or Path(tmp)
        config = load_scenario(args.scenario).with_n_subjects(args.n_subjects)
        print(
            f"scenario {config.name}, seed {args.seed}, {len(config.sites)} sites, cores available {os.cpu_count()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        )
        # Per-site timings (the same code path generate_federation runs).
        total_rows, total_s = 0, 0.0
        for i, site in enumerate(config.sites):
            start = time.perf_counter()
            m = generate_site(config, site, args.seed, out / "sites", out / "truth", site_index=i, progress=False)
            elapsed = time.perf_counter() - start
            rows = m.n_events + m.n_wearable_epochs
            total_rows += rows
            total_s += elapsed
            print(
                f"  {m.name:<18} {m.n_subjects:>6} subjects  {m.n_events:>9,} events  {m.n_wearable_epochs:>11,} epochs  "
                f"{elapsed:6.2f} s  {rows / elapsed:>12,.0f} rows/s"
            )
        print(f"sites: {total_s:.2f} s, {total_rows:,} rows, {total_rows / total_s:,.0f} rows/s")
        # The public entry point end to end (includes manifest and scenario files).
        start = time.perf_counter()
        generate_federation(out, config, seed=args.seed, progress=False)
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"generate_federation: {elapsed:.2f} s, {total_rows / elapsed:,.0f} rows/s, peak RSS {peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
