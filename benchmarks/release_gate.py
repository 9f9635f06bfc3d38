"""Benchmark: the release gate (client/release_gate.py) at a synthetic site of 1,000 and 10,000
subjects: its fingerprints' pass, each release's decision, and the record's size.

    .venv/bin/python benchmarks/release_gate.py                        # hospital's general_hospital, 1k and 10k
    .venv/bin/python benchmarks/release_gate.py --sizes 1000 --cache /data/release-gate

Sites (generated once under --cache, reused): the `hospital` scenario's general_hospital (a
MIMIC-style export, ~660 MEDS rows a subject) at each size. Stages, in this process:

  stats         site_code_stats, the setup statistics' own pass (the reference)
  fingerprints  site_contributions: every subject's fingerprints (one pass over the site)
  first launch  capabilities and code statistics through the gate, nothing recorded before
  relaunch      the same again from a new gate reading the record (every launch of a site)
  one more      a launch with one subject more than the record's last (held: a cell of one)
  evaluation    one task key's labels (onset_t2d_365d, every subject) through the gate, first
                release and again (every round of a run)

Per size: seconds per stage, the (subject, fingerprint) pairs of each record and its bytes on
disk (bytes per pair). OMP_NUM_THREADS=1 unless set.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from client.release_fields import capabilities_candidates, code_stats_candidates, task_candidates  # noqa: E402
from client.release_gate import RELEASED_DIR, ReleaseGate  # noqa: E402
from client.site_runtime import SiteConfig, SiteRuntime  # noqa: E402
from healthfm_core.data.sequences.code_stats import site_code_stats  # noqa: E402
from healthfm_core.privacy.contributions import FieldPairs, site_contributions  # noqa: E402
from healthfm_core.protocol import EvalConfig  # noqa: E402
from simulations.synthetic import load_scenario, synthetic_sites  # noqa: E402
from simulations.synthetic.generate import select_sites  # noqa: E402

TASK = "onset_t2d_365d"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def without(pairs: FieldPairs, subject: int) -> FieldPairs:
    keep = pairs.subject != subject
    return FieldPairs(pairs.names, pairs.field[keep], pairs.subject[keep], pairs.fingerprint[keep])


def measure(root: Path, state: Path) -> dict[str, Any]:
    rt = SiteRuntime(SiteConfig(site_root=root, min_code_subjects=10, min_report_subjects=20, state_dir=state))
    out: dict[str, Any] = {}
    stats, out["stats"] = timed(lambda: site_code_stats(rt.site, min_subjects=10))
    site, out["fingerprints"] = timed(lambda: site_contributions(rt.site))
    rt._contributions = site  # measured above: the runtime's own pass
    caps = rt.capabilities
    _, out["first launch"] = timed(lambda: (caps(), rt.code_stats()))
    gate = lambda kind: ReleaseGate(state, kind, 10)  # noqa: E731 - a new gate: the record read from disk
    cands = code_stats_candidates(stats, site)
    _, out["relaunch"] = timed(lambda: gate("code_stats").release(cands))
    first = int(site.subject[-1])
    with tempfile.TemporaryDirectory() as tmp:
        fresh = ReleaseGate(Path(tmp), "code_stats", 10)
        smaller = code_stats_candidates(stats, site)
        fresh.release(type(smaller)(without(smaller.pairs, first), smaller.present, smaller.values, complete=True))
        decision, out["one more"] = timed(lambda: fresh.release(cands))
        out["held fields"] = len(decision.held)
    cfg = EvalConfig(round=1, tasks=[TASK], setup_sha256="0" * 64)
    labels = rt.labels(cfg)
    evaluation = ReleaseGate(state, "evaluation", 20)
    candidates = task_candidates(labels, rt._split_lookup(), site, 20)
    _, out["evaluation"] = timed(lambda: evaluation.release(candidates))
    _, out["evaluation again"] = timed(lambda: ReleaseGate(state, "evaluation", 20).release(candidates))
    out["capabilities pairs"] = len(capabilities_candidates(caps(), rt.site.modality_subjects, site).pairs.subject)
    for kind in ("capabilities", "code_stats", "evaluation"):
        path = state / RELEASED_DIR / f"{kind}.parquet"
        out[f"{kind} bytes"] = path.stat().st_size
    out["code_stats pairs"] = len(cands.pairs.subject)
    out["evaluation pairs"] = len(candidates.pairs.subject)
    out["rows"] = int(np.sum(site.events))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="subjects per site, comma-separated")
    p.add_argument("--cache", type=Path, default=Path("runs/release-gate"), help="generated sites, reused")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    config = select_sites(load_scenario("hospital"), ["general_hospital"])
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        fed = synthetic_sites(
            args.cache / f"hospital-{n}-seed{args.seed}", config.model_dump(mode="json"), args.seed, n
        )
        print(f"general_hospital, {n:,} subjects (ready in {time.perf_counter() - t:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory() as state:
            got = measure(Path(fed.sites[0].root), Path(state))
        print(f"  {got['rows']:,} MEDS rows")
        for stage in (
            "stats",
            "fingerprints",
            "first launch",
            "relaunch",
            "one more",
            "evaluation",
            "evaluation again",
        ):
            print(f"  {stage:<18} {got[stage]:7.2f} s")
        print(f"  one more subject: {got['held fields']} fields held")
        for kind in ("capabilities", "code_stats", "evaluation"):
            pairs = got[f"{kind} pairs"]
            size = got[f"{kind} bytes"]
            print(f"  record {kind:<13} {pairs:>10,} pairs {size:>12,} bytes ({size / max(pairs, 1):.1f} a pair)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
