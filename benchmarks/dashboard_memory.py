"""What the coordinator's dashboard holds after reading long runs, and how fast its page is then:
this tree's dashboard against a baseline tree's (another checkout, e.g. main before the fold).

    nice -n 10 python benchmarks/dashboard_memory.py --baseline /work/wt/dash_before
    python benchmarks/dashboard_memory.py --rounds 200 5000 --runs 20 --baseline DIR --out fig.json

A federation folder (provisioned by the coordinator's own code) with --runs launches, each out-dir
holding the run tests/dashboard_record.py recorded (tests/data/dashboard_run) with its round 2
repeated as rounds 1..N (a DP site, a site lost every 5th round, rejected every 11th, the DP site
refusing every 7th), for each N of --rounds. For each tree (PYTHONPATH) and N, in a fresh process:
- held: tracemalloc's traced bytes after the page was built, with the dashboard's RunFiles kept
  (what stays in the process between pages), less those before; peak: tracemalloc's peak while
  building it; maxrss: the process's peak resident set (ru_maxrss).
- page: in another fresh process without tracemalloc, server.deploy.dashboard.view.federation_view
  as the dashboard calls it: the first page (every file read), again with nothing changed
  (cached), and after one round appended to the newest run (median of --repeats each).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, not benchmarks/ first on the path (its secure_aggregation.py would hide the
# package): the tree measured is the one PYTHONPATH names. Loaded as a module (the benchmarks'
# load test) the importer's path stays as it is.
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
RECORDED = REPO / "tests" / "data" / "dashboard_run"


def make_federation(root: Path, runs: int, rounds: int) -> None:
    """FED under `root` with `runs` launches of `rounds` rounds each (see the module's docstring)."""
    from server.deploy.commands import LaunchRecord, _record_launch
    from server.deploy.provision import ProvisionConfig, provision

    paths = provision(ProvisionConfig(federation_dir=root / "fed", sites=["biobank", "genomics", "hospital"])).paths
    events = [json.loads(x) for x in (RECORDED / "rounds.jsonl").read_text().splitlines() if x.strip()]
    setup = next(e for e in events if e["event"] == "setup")
    template = next(e for e in events if e["event"] == "round" and e["round"] == 2)
    for run in range(runs):
        run_id, out = 1000 + run, root / "runs" / f"run-{run:02d}"
        out.mkdir(parents=True)
        for f in RECORDED.iterdir():
            shutil.copyfile(f, out / f.name)
        lines = [json.dumps({**setup, "run_id": run_id, "time": 1.8e9 + run * 1e5})]
        epsilon = 0.0
        for rnd in range(1, rounds + 1):
            event = copy.deepcopy(template)
            event.update(round=rnd, rounds=rounds, time=1.8e9 + run * 1e5 + rnd, bytes_sent=1000 + rnd)
            hospital = event["sites"]["hospital"]
            hospital.update(
                status="rejected" if rnd % 11 == 0 else "no reply" if rnd % 5 == 0 else "ok",
                reason=f"norm {rnd} above the bound" if rnd % 11 == 0 else "no reply" if rnd % 5 == 0 else None,
            )
            dp = event["sites"]["genomics"]
            epsilon += 0.0 if rnd % 7 == 0 else 0.01
            dp.update(status="refused" if rnd % 7 == 0 else "ok", dp={**dp["dp"], "epsilon": round(epsilon, 6)})
            lines.append(json.dumps(event))
        (out / "rounds.jsonl").write_text("\n".join(lines) + "\n")
        outcome = json.loads((out / "outcome.json").read_text())
        (out / "outcome.json").write_text(json.dumps({**outcome, "run_id": run_id, "rounds_done": rounds}))
        at = f"2026-11-{1 + run:02d}T00:00:00+00:00"
        _record_launch(
            paths, LaunchRecord(run_id=run_id, out_dir=str(out), run_config={"rounds": rounds}, launched_at=at)
        )


def measure(root: Path, mode: str, repeats: int) -> dict[str, Any]:
    """In this process (PYTHONPATH: the tree measured): `mode` memory or page."""
    import resource
    import time
    import tracemalloc

    from server.deploy.commands import read_launches
    from server.deploy.dashboard.files import RunFiles
    from server.deploy.dashboard.view import Launch, federation_view
    from server.deploy.provision import FederationPaths

    paths = FederationPaths(root=root / "fed")

    def page(files: RunFiles) -> Any:
        launches = [Launch(r.run_id, Path(r.out_dir), r.launched_at, r.resumed) for r in read_launches(paths)]
        return federation_view(paths.root, launches, lambda _: "", files=files)

    if mode == "memory":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        files = RunFiles()
        view = page(files)
        del view
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {
            "held_mib": (held - before) / 2**20,
            "peak_mib": (peak - before) / 2**20,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    files = RunFiles()
    timed: dict[str, list[float]] = {"first": [], "cached": [], "after a round": []}
    newest = sorted((root / "runs").iterdir())[-1] / "rounds.jsonl"
    line = newest.read_bytes().splitlines(keepends=True)[-1]
    for _ in range(repeats):
        files = RunFiles()
        start = time.perf_counter()
        page(files)
        timed["first"].append(time.perf_counter() - start)
        start = time.perf_counter()
        page(files)
        timed["cached"].append(time.perf_counter() - start)
        with open(newest, "ab") as fh:  # the next round recorded (the same line, a round again)
            fh.write(line)
        start = time.perf_counter()
        page(files)
        timed["after a round"].append(time.perf_counter() - start)
    return {f"{k}_ms": statistics.median(v) * 1000 for k, v in timed.items()}


def run_in(tree: Path, root: Path, mode: str, repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, __file__, "--measure", str(root), "--mode", mode, "--repeats", str(repeats)]
    done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{tree}: {mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, nargs="+", default=[200, 5000])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--baseline", type=Path, help="another checkout's root (e.g. git worktree add DIR 27348cb)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.mode, args.repeats)))
        return
    sys.path.insert(0, str(REPO))  # the federation folder written by this tree's code
    trees = {"this tree": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    figures: dict[str, Any] = {}
    for rounds in args.rounds:
        with tempfile.TemporaryDirectory(prefix="dashboard-memory-") as tmp:
            make_federation(Path(tmp), args.runs, rounds)
            size = sum(p.stat().st_size for p in Path(tmp, "runs").glob("*/rounds.jsonl"))
            for name, tree in trees.items():
                row = {
                    **run_in(tree, Path(tmp), "memory", 1), **run_in(tree, Path(tmp), "page", args.repeats),
                }  # fmt: skip
                figures[f"{name}, {args.runs} runs of {rounds} rounds"] = {**row, "rounds_jsonl_mib": size / 2**20}
                print(
                    f"{name:9} {args.runs} runs x {rounds:5} rounds (rounds.jsonl {size / 2**20:7.1f} MiB): "
                    f"held {row['held_mib']:8.2f} MiB, peak {row['peak_mib']:8.2f} MiB, maxrss {row['maxrss_mib']:7.0f} MiB; "
                    f"page first {row['first_ms']:7.1f} ms, cached {row['cached_ms']:5.2f} ms, "
                    f"after a round {row['after a round_ms']:6.1f} ms",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
