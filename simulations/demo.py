"""`make demo`: generate the default synthetic federation and check every site.

Until the federation lands this is the main job: it shows what each site would bring to
a round (modalities, subjects per modality, wearable days, PRS traits), through the same
`check` a site admin runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from client.client import format_summary
from healthfm_core.data.site import check_site
from healthfm_core.data.synthetic import generate_federation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where the federation is written")
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-subjects", type=int, default=None, help="override every site's size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    manifest = generate_federation(Path(args.out), scenario=args.scenario, seed=args.seed, n_subjects=args.n_subjects)
    print(f"\nGenerated {len(manifest.sites)} sites in {time.perf_counter() - started:.1f} s "
          f"(scenario {manifest.scenario!r}, seed {manifest.seed}); ground truth in {manifest.truth_dir}\n")

    failed = 0
    for site in manifest.sites:
        report = check_site(site.root, progress=False)
        print(f"== {site.name}")
        for problem in report.problems:
            print(problem)
        if report.ok:
            print(format_summary(report))
        else:
            failed += 1
            print(f"FAILED: {report.n_errors} error(s)")
        print()
    print(f"{len(manifest.sites) - failed}/{len(manifest.sites)} sites usable. Sites: {manifest.sites_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
