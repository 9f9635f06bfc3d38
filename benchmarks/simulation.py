"""Benchmark: a federated simulation's start-up, rounds, evaluation, site loads and memory.

    .venv/bin/python benchmarks/simulation.py                          # this tree only
    .venv/bin/python benchmarks/simulation.py --baseline HEAD~3        # and a baseline, same run
    .venv/bin/python benchmarks/simulation.py --baseline REV --lean ray.client_num_cpus=2 --repeats 2
    .venv/bin/python benchmarks/simulation.py --n-subjects 300 --rounds 4 --local-steps 20

Each variant runs `python -m simulations.run` as its own process (scenario `tiny`: three sites,
every modality mix; `--n-subjects` per site) on the same synthetic sites, generated once before
anything is timed. The baseline is the code of a git revision (`git archive REV`, unpacked into
a temporary directory; the repository is not touched), run with the same arguments.

Figures per variant:
  first round   seconds from the process's launch to the end of round 0 (the server's "setup"
                event in rounds.jsonl: Ray started, sites connected, vocabulary agreed, setup sent)
  rounds        each training round's wall time (rounds.jsonl), and their sum
  evaluation    the final federated evaluation's wall time, and as a multiple of the mean round
  site loads    how many times a site's data was read and turned into sequences: the run's
                site_loads.json where it writes one; before that, one per site runtime (each
                actor that served a site opened it and prepared its sequences)
  peak RSS      the largest sum of RSS over the run's whole process tree (driver, Ray's own
                processes, the actors), sampled every 0.25 s with psutil; peak PSS likewise
                (shared pages counted once: the fairer figure when actors memory-map a file)

`--lean OVERRIDE...` runs this tree a second time with those overrides (a third column).
`--repeats N` runs every variant N times in alternating order and prints medians. Ratios
(second column / first) are printed when a baseline ran. Figures depend on the machine's
load: compare the ratios of one run, not figures of different runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import psutil
except ImportError:  # Ray ships its own copy
    import ray

    sys.path.append(str(Path(ray.__file__).parent / "thirdparty_files"))
    import psutil

from simulations.synthetic import synthetic_sites  # noqa: E402

# Site-side INFO lines reach the driver's output only when the actors log at INFO: a
# sitecustomize on the variants' PYTHONPATH turns it on in the actors, old code too.
SITECUSTOMIZE = """
import logging, os, sys
if "RAY_RAYLET_PID" in os.environ:  # Ray's worker processes only; the driver logs through Hydra
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    _l = logging.getLogger("healthfm")
    _l.setLevel(logging.INFO)
    _l.addHandler(_h)
    _l.propagate = False  # once, not again through a root handler
"""
OPENED = re.compile(r"site (\S+) opened: modalities")
STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]")


@dataclass
class Figures:
    name: str
    first_round_s: float = float("nan")
    imports_s: float = float("nan")
    ray_start_s: float = float("nan")
    rounds_s: list[float] = field(default_factory=list)
    eval_s: float = float("nan")
    total_s: float = float("nan")
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    peak_processes: int = 0
    runtimes_opened: int = 0
    site_loads: int = 0
    rc: int = 0
    peak_breakdown: list[tuple[str, float]] = field(default_factory=list)  # (process, RSS MB) at the peak


def median_figures(runs: list[Figures]) -> Figures:
    """Each figure's median over repeated runs of one variant (the peak breakdown of the first)."""
    out = Figures(runs[0].name, peak_breakdown=runs[0].peak_breakdown)
    for name in ("first_round_s", "imports_s", "ray_start_s", "eval_s", "total_s", "peak_rss_mb", "peak_pss_mb"):
        setattr(out, name, statistics.median(getattr(r, name) for r in runs))
    for name in ("peak_processes", "runtimes_opened", "site_loads", "rc"):
        setattr(out, name, max(getattr(r, name) for r in runs))
    n_rounds = min(len(r.rounds_s) for r in runs)
    out.rounds_s = [statistics.median(r.rounds_s[i] for r in runs) for i in range(n_rounds)]
    return out


def tree_memory(root: psutil.Process) -> tuple[float, float, int, list[tuple[str, float]]]:
    """(RSS MB, PSS MB, processes, [(name, RSS MB)] largest first) over `root` and its descendants."""
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    rss = pss = 0.0
    n = 0
    each: list[tuple[str, float]] = []
    for p in procs:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            try:
                rss += p.memory_info().rss
                n += 1
            except psutil.Error:
                pass
            continue
        rss += full.rss
        pss += getattr(full, "pss", full.rss)
        n += 1
        try:
            label = " ".join(p.cmdline()[:3])[-40:] if p.name().startswith("python") else p.name()
        except psutil.Error:
            label = "?"
        each.append((label, full.rss / 2**20))
    return rss / 2**20, pss / 2**20, n, sorted(each, key=lambda x: -x[1])


def unpack_revision(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def _stamp(line: str) -> float:
    """Epoch seconds of a Hydra log line "[2026-01-01 12:00:00,123][logger][LEVEL] - ..." (local time)."""
    return time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + int(line[21:24]) / 1000


def run_variant(
    name: str, code: Path, args: argparse.Namespace, data_dir: Path, work: Path, extra: Sequence[str] = ()
) -> Figures:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"out-{name}"
    custom = work / "sitecustomize"
    custom.mkdir(exist_ok=True)
    (custom / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), str(custom), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RAY_DEDUP_LOGS"] = "0"  # Ray folds identical lines of several actors into one: count them all
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        f"scenario={args.scenario}",
        f"model={args.model}",
        f"n_subjects={args.n_subjects}",
        f"data_dir={data_dir}",
        f"out_dir={out}",
        f"hydra.run.dir={out}",
        f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}",
        *args.override,
        *extra,
    ]
    log_path = work / f"{name}.log"
    figures = Figures(name)
    t0 = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss, pss, n, each = tree_memory(root)
                if rss > figures.peak_rss_mb:
                    figures.peak_breakdown = each
                figures.peak_rss_mb = max(figures.peak_rss_mb, rss)
                figures.peak_pss_mb = max(figures.peak_pss_mb, pss)
                figures.peak_processes = max(figures.peak_processes, n)
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            figures.rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            figures.rc = -9
        stop.set()
        sampler.join()
    figures.total_s = time.time() - t0
    text = log_path.read_text(errors="replace")
    if figures.rc != 0:
        print(f"[{name}] exited {figures.rc}; its output: {log_path}\n{text[-3000:]}")
    events_path = out / "rounds.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.is_file() else []
    for e in events:
        if e["event"] == "setup":
            figures.first_round_s = e["time"] - t0
        elif e["event"] == "round":
            figures.rounds_s.append(float(e["timings"]["round_seconds"]))
        elif e["event"] == "evaluate":
            figures.eval_s = float(e["seconds"])
    stamped = [line for line in text.splitlines() if STAMP.match(line)]
    if stamped:  # the first log line comes once the driver's imports are done
        figures.imports_s = _stamp(stamped[0]) - t0
        ray_up = [line for line in stamped if "Ray: " in line or "healthfm.server" in line]
        if ray_up:  # this tree logs when Ray is up; before, the server's first line came just after
            figures.ray_start_s = _stamp(ray_up[0]) - t0 - figures.imports_s
    figures.runtimes_opened = len(OPENED.findall(text))
    loads_path = out / "site_loads.json"
    if loads_path.is_file():  # the run's own count of site opens + sequence preparations
        loads = json.loads(loads_path.read_text())
        figures.site_loads = sum(int(c.get("sequences", 0)) for c in loads.values())
    else:  # before the run's cache: every site runtime (one per actor and site) loaded its site
        figures.site_loads = figures.runtimes_opened
    return figures


def show(rows: list[Figures], n_sites: int) -> None:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    cols = [
        ("first round (s)", lambda f: f.first_round_s),
        ("  of which driver imports (s)", lambda f: f.imports_s),
        ("  of which Ray start (s)", lambda f: f.ray_start_s),
        ("  of which round 0 (s)", lambda f: f.first_round_s - f.imports_s - f.ray_start_s),
        ("rounds, sum (s)", lambda f: sum(f.rounds_s)),
        ("round, mean (s)", lambda f: mean(f.rounds_s)),
        ("evaluation (s)", lambda f: f.eval_s),
        ("evaluation / mean round", lambda f: f.eval_s / mean(f.rounds_s)),
        ("evaluation / sum of rounds", lambda f: f.eval_s / sum(f.rounds_s) if f.rounds_s else float("nan")),
        ("whole run (s)", lambda f: f.total_s),
        ("peak RSS, all processes (MB)", lambda f: f.peak_rss_mb),
        ("peak PSS, all processes (MB)", lambda f: f.peak_pss_mb),
        ("processes at peak", lambda f: float(f.peak_processes)),
        (f"site runtimes, actor x site ({n_sites} sites)", lambda f: float(f.runtimes_opened)),
        (f"site data loads ({n_sites} sites)", lambda f: float(f.site_loads)),
    ]
    head = f"{'':34s}" + "".join(f"{f.name:>14s}" for f in rows) + ("   ratio 2/1" if len(rows) >= 2 else "")
    print(head)
    for label, get in cols:
        vals = [get(f) for f in rows]
        line = f"{label:34s}" + "".join(f"{v:14.2f}" for v in vals)
        if len(rows) >= 2 and vals[0] and vals[0] == vals[0]:
            line += f"  x{vals[1] / vals[0]:.2f}"
        print(line)
    for f in rows:
        print(f"{f.name}: rounds {[round(x, 1) for x in f.rounds_s]}, exit {f.rc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to run first as the baseline (e.g. HEAD~3)")
    parser.add_argument("--scenario", default="tiny")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n-subjects", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, in alternating order; medians shown")
    parser.add_argument("--out", type=Path, help="keep the runs and logs here (default: a temporary directory)")
    parser.add_argument(
        "--lean",
        nargs="*",
        metavar="OVERRIDE",
        help="run this tree once more with these overrides (e.g. ray.client_num_cpus=2: one actor)",
    )
    parser.add_argument("override", nargs="*", help="more Hydra overrides for every variant")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="healthfm-bench-sim-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_dir = work / "data"
        t = time.perf_counter()
        manifest = synthetic_sites(data_dir, args.scenario, args.seed, args.n_subjects)
        print(
            f"sites: {[s.name for s in manifest.sites]}, {args.n_subjects} subjects each "
            f"({time.perf_counter() - t:.1f} s to generate or reuse)"
        )
        print(
            f"model {args.model}, {args.rounds} rounds x {args.local_steps} local steps; cpu count {os.cpu_count()}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        variants: list[tuple[str, Path, Sequence[str]]] = []
        if args.baseline:
            variants.append(("baseline", unpack_revision(args.baseline, work / "baseline-code"), ()))
        variants.append(("this-tree", ROOT, ()))
        if args.lean:
            variants.append(("lean", ROOT, args.lean))
        runs: dict[str, list[Figures]] = {name: [] for name, _, _ in variants}
        for rep in range(args.repeats):
            # Alternate the order (A B C, C B A, ...): a machine whose load drifts favours no variant.
            for name, code, extra in variants if rep % 2 == 0 else variants[::-1]:
                runs[name].append(run_variant(name, code, args, data_dir, work / f"rep{rep}", extra))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        show([median_figures(r) for r in runs.values()], len(manifest.sites))
        for name, figs in runs.items():
            for f in figs:
                top = ", ".join(f"{n} {mb:.0f}" for n, mb in f.peak_breakdown[:8])
                print(f"{name}: peak RSS by process (MB): {top}")


if __name__ == "__main__":
    main()
