"""python -m simulations.synthetic OUT_DIR [--scenario NAME] [--seed N] [--n-subjects N] [--sites A,B]
[--batch-subjects N]"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from simulations.synthetic.generate import BATCH_SUBJECTS, generate_federation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.synthetic", description=__doc__)
    parser.add_argument("out_dir", help="output directory: sites/<site>/ and truth/ are written here")
    parser.add_argument(
        "--scenario", default="default", help="scenario name (configs/scenario/<name>.yaml) or a YAML path"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-subjects", type=int, default=None, help="override every site's number of subjects")
    parser.add_argument(
        "--sites", default=None, help="comma-separated site names: generate only these (each as in the whole scenario)"
    )
    parser.add_argument(
        "--batch-subjects",
        type=int,
        default=BATCH_SUBJECTS,
        help=f"subjects simulated and written at a time, rounded to whole shards (default {BATCH_SUBJECTS}): "
        "bounds memory whatever the site's size",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    start = time.perf_counter()
    try:
        manifest = generate_federation(
            args.out_dir,
            args.scenario,
            seed=args.seed,
            n_subjects=args.n_subjects,
            progress=not args.quiet,
            sites=None if args.sites is None else [s.strip() for s in args.sites.split(",") if s.strip()],
            batch_subjects=args.batch_subjects,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    for s in manifest.sites:
        counts = ", ".join(f"{m} {s.subjects_per_modality[m]}" for m in s.modalities)
        print(
            f"{s.name:<20} {s.kind:<16} subjects {s.n_subjects:>6}  events {s.n_events:>9}  "
            f"wearable epochs {s.n_wearable_epochs:>10}  ({counts})  {s.root}"
        )
    print(f"truth: {manifest.truth_dir}   scenario {manifest.scenario}, seed {manifest.seed}, {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
