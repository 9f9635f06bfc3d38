"""`make demo`: the default synthetic federation, federated vs centralized vs local-only vs oracle.

    python -m simulations.demo --out runs/demo [--rounds 3] [--local-steps 50] [OVERRIDE ...]

Generates (or reuses) the default scenario's sites, runs the federation with the `tiny` model
on Flower's simulation engine, trains the centralized and local-only baselines with the same
number of optimisation steps, evaluates all of them and the oracle on every site's held-out
split, and prints where the report is. The settings are configs/demo.yaml (simulations.report);
extra arguments are Hydra overrides of it (e.g. `eval.n_boot=50`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from simulations.logs import setup_job_logging
from simulations.report import run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="where the report (and the federated run) is written")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: configs/demo.yaml)")
    parser.add_argument("--local-steps", type=int, default=None, help="local steps per site and round")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_job_logging()

    overrides = [f"out_dir={args.out}", *args.overrides]
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    if args.local_steps is not None:
        overrides.append(f"federation.local_steps={args.local_steps}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="demo", overrides=overrides)
    started = time.perf_counter()
    report = run(cfg)
    print(
        f"\nDemo finished in {(time.perf_counter() - started) / 60:.1f} min.\n  report:     {report}\n"
        f"  federation: {Path(cfg.out_dir) / 'federation'} (rounds.jsonl, summary.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
