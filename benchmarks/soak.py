"""A soak: a deployed federation run for many rounds through a site restart, a SuperLink restart and
`resume`, every process's memory, descriptors and threads and every file's size watched round by
round, the coordinator's page timed, and each criterion of issue 69 judged.

    nice -n 10 python benchmarks/soak.py --rounds 10 --runs 3 --site-restart 4 --superlink-restart 7  # an estimate
    nice -n 10 python benchmarks/soak.py                          # 200 rounds, 20 runs (issue 69's soak)
    python benchmarks/soak.py --rounds 200 --out soak.json --plot soak.png --keep DIR
    python benchmarks/soak.py --judge-disk-again soak.json         # its disk judged again from its sizes

A real deployment on 127.0.0.1, started as the slow tests start one (tests/helpers/deploy_fixtures.py):
`coordinator provision`, `coordinator superlink` (TLS, SuperNode authentication, nginx in front
of the Fleet API, its state in memory), `coordinator register`, the federation's bundle approved
in the sites' policy, three synthetic `tiny`-scenario sites joined with `client.py join` (warm
ClientApps, one torch thread), one of them (--dp-site, default genomics) under DP by its own
policy, and `coordinator dashboard`. One run of --rounds rounds of the `tiny` model with
evaluation every --eval-every rounds is launched. As round --site-restart is logged the DP
site's `join` and everything below it are killed (SIGKILL, no goodbye) and started again with the
same key and state; as round --superlink-restart is logged the SuperLink is killed (SIGKILL:
`superlink` stops everything and says how to resume), `superlink` is started again on the same
port, the sites rejoin by themselves, and the run is resumed (`coordinator resume --wait`). Then
one-round runs into out-dirs of their own until FED holds --runs launches (the resume is one).

Every --interval seconds: each process's VmRSS, open descriptors and threads (benchmarks/soak_watch.py:
every process below `superlink`, each `join` and the dashboard, named by role). The samples are
grouped by tick: the rounds the main run has logged (0 during setup), then one tick per later run.
At each new tick: the size of every file under FED, the run directories and the sites' state
directories; the dashboard's page (`/`, `/panels`) and `/metrics`, each asked twice (the first
after the files changed, the second from the dashboard's cache).

Criteria (issue 69), each printed with pass/fail and written to --out (JSON):
- rss: each process's peak RssAnon (its own memory; the mapped libraries' pages come and go with
  the machine's page cache) in every tick after its reference tick within --rss-margin (10%) of
  its peak in the reference tick (the first evaluation round at least --settle rounds after the
  process appeared: round 20 for one there from the start; soak_watch.py);
- fds, threads: no growth: the line fitted through a process's most per tick, from its reference
  tick on, rises by less than two (soak_watch.py);
- disk: every file that still grows after --settle is one that grows by design (docs/coordinator.md
  "What a run keeps on disk"); each such file's bytes per round printed; everything else stays
  within its retention (checkpoints, rotated logs);
- page: the page and /metrics under --page-ms (100 ms) at the end (--rounds rounds and --runs runs),
  the first answer after the last run (the dashboard reads the files afresh) and from its cache;
  printed beside them, the page's first answer after each of the main run's last 20 rounds;
- epsilon: the DP site's ledger's epsilon equals the page's (/metrics exactly, the page's 3 decimals).
Also written: --plot (each process's peak RssAnon per tick, PNG) and the timeline of the faults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repository before benchmarks/ (the script's own folder, where soak_watch.py is found): a
# benchmark named like a package (secure_aggregation.py) must not hide it.
sys.path[0:0] = [str(REPO), str(REPO / "tests")]

from helpers.deploy_fixtures import (  # noqa: E402
    CLIENT,
    SITES,
    TINY_RUN,
    Process,
    descendants,
    free_port,
    join_args,
    site_policy,
    start_registered_superlink,
)
from helpers.process_faults import Background, kill_hard  # noqa: E402
from soak_watch import (  # noqa: E402
    Peak,
    Series,
    as_dict,
    file_sizes,
    judge_disk,
    judge_series,
    read_process,
    role_of,
    sample_processes,
)

from healthfm_core.log_files import LOG_BACKUPS, LOG_MAX_BYTES_ENV  # noqa: E402
from server.config import FederationConfig  # noqa: E402
from server.deploy.commands import main as coordinator_main  # noqa: E402
from server.deploy.provision import FederationPaths  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402

DP_POLICY = "dp:\n  mandatory: true\n  epsilon_cap: 100.0\n  delta: 1.0e-3\n  noise_multiplier: 2.0\n"
PAGES = ("/", "/panels", "/metrics")
JUDGED_PAGES = ("/", "/metrics")
RUN_TIMEOUT_S = 24 * 3600


def run_config(args: argparse.Namespace, evaluate: bool = True) -> list[str]:
    """The slow tests' tiny run (TINY_RUN), with the soak's steps, evaluation and a longer wait."""
    evaluation = ["-c", f"evaluate-every={args.eval_every}", "-c", f"eval-tasks={args.eval_task}"]
    return [
        *TINY_RUN,
        "-c",
        f"local-steps={args.local_steps}",
        "-c",
        "timeout-s=600",
        *(evaluation if evaluate else ["-c", "eval-tasks="]),
    ]


class RoundLog:
    """The rounds a run directory's rounds.jsonl has logged so far (read as it grows)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "rounds.jsonl"
        self.offset = 0
        self.rest = ""
        self.rounds: dict[int, dict] = {}

    def poll(self) -> int:
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
            lines = (self.rest + chunk).split("\n")
            self.rest = lines.pop()
            for line in lines:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("event") == "round":
                    self.rounds[int(event["round"])] = event
        return max(self.rounds, default=0)


def get(url: str, timeout: float = 60.0) -> tuple[int, float, bytes]:
    """(status, milliseconds, body) of one GET."""
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = answer.read()
            status = answer.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    except (urllib.error.URLError, OSError):
        body, status = b"", 0
    return status, (time.perf_counter() - t0) * 1000, body


class Watch:
    """The sampling thread: processes every `interval` s, files and the page at every new tick."""

    def __init__(
        self, roots: dict[str, Process], dirs: dict[str, Path], dashboard: str, main_log: RoundLog, interval: float
    ) -> None:
        self.roots, self.dirs, self.dashboard, self.main_log, self.interval = roots, dirs, dashboard, main_log, interval
        self.series = Series()
        self.sizes: dict[int, dict[str, int]] = {}
        self.pages: dict[int, dict[str, list[float]]] = {}
        self.load: dict[int, float] = {}  # the 1-minute load average at each new tick: the machine's other work
        self.tick_override: int | None = None
        self.tick = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="soak-watch")
        self.lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def current_tick(self) -> int:
        logged = self.main_log.poll()
        return self.tick_override if self.tick_override is not None else logged

    def _loop(self) -> None:
        last = -1
        while not self._stop.is_set():
            with self.lock:
                tick = self.current_tick()
                self.tick = tick
                roots = {g: p.proc.pid for g, p in self.roots.items()}
            self.series.add(tick, sample_processes(roots))
            if tick != last:
                self.sizes[tick] = file_sizes(self.dirs)
                self.pages[tick] = time_pages(self.dashboard)
                self.load[tick] = os.getloadavg()[0]
                last = tick
            self._stop.wait(self.interval)


def time_pages(base: str, repeats: int = 2) -> dict[str, list[float]]:
    """Milliseconds of each of PAGES, asked `repeats` times in turn (a failed answer: -status)."""
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for page in PAGES:
            status, ms, _ = get(base + page)
            out.setdefault(page, []).append(ms if status == 200 else -float(status))
    return out


def start_join(fed: FederationPaths, root: Path, name: str, address: str, work: Path, policy: Path, n: int) -> Process:
    proc = Process(
        [sys.executable, str(CLIENT), *join_args(fed, root, name, address, work / f"state-{name}", policy)],
        work / f"join-{name}-{n}.out",
    )
    if not proc.wait_for("joined: SuperNode", 900):
        proc.stop()
        raise SystemExit(f"{name} did not join:\n{proc.output()[-3000:]}")
    return proc


def pid_of_role(root: int, role: str) -> int:
    for pid in descendants(root):
        got = read_process(pid)
        if got is not None and role_of(got[0]) == role:
            return pid
    raise SystemExit(f"no {role} process below pid {root}")


def wait_tick(watch: Watch, tick: int, run: Background, what: str) -> None:
    while watch.tick < tick:
        if not run.thread.is_alive():
            result = run.result
            raise SystemExit(
                f"the run ended before {what} (round {watch.tick} logged): "
                + ((result.stdout + result.stderr)[-2000:] if result else "")
            )
        time.sleep(0.5)


def ledger_epsilon(state: Path) -> float | None:
    found = sorted(state.rglob("privacy_ledger.json"))
    if not found:
        return None
    rounds = json.loads(found[0].read_text())["rounds"]
    return float(rounds[-1]["epsilon_after"]) if rounds else 0.0


def page_epsilons(base: str, site: str) -> tuple[float | None, str | None]:
    """The DP site's epsilon on /metrics and as the page prints it (its privacy table's cell)."""
    from prometheus_client.parser import text_string_to_metric_families

    metric = None
    status, _, body = get(base + "/metrics")
    if status == 200:
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == "healthfm_site_epsilon" and s.labels.get("site") == site:
                    metric = float(s.value)
    shown = None
    for page in ("/panels", "/"):
        status, _, body = get(base + page)
        match = re.search(rf'data-site="{site}"[^>]*>.*?class="num epsilon">\s*([0-9.]+)', body.decode(), re.DOTALL)
        if status == 200 and match:
            shown = match.group(1)
            break
    return metric, shown


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-task", default="onset_hypertension_365d")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--subjects", type=int, default=30, help="subjects per synthetic site")
    p.add_argument("--site-restart", type=int, default=60, help="kill and restart the DP site as this round is logged")
    p.add_argument(
        "--superlink-restart", type=int, default=120, help="kill the SuperLink as this round is logged, then resume"
    )
    p.add_argument("--runs", type=int, default=20, help="launches FED holds at the end (one-round runs fill up)")
    p.add_argument("--dp-site", default="genomics", choices=SITES)
    p.add_argument("--settle", type=int, default=20, help="rounds a process runs before its reference tick")
    p.add_argument("--rss-margin", type=float, default=0.10)
    p.add_argument("--page-ms", type=float, default=100.0)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between process samples")
    p.add_argument(
        "--log-max-bytes",
        type=int,
        default=256 * 1024,
        help=f"${LOG_MAX_BYTES_ENV} of every process started: each log rotates within the soak (default 256 KiB)",
    )
    p.add_argument("--out", default="soak.json")
    p.add_argument("--plot", default="soak.png")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory, removed)")
    args = p.parse_args()
    if not 0 < args.site_restart < args.rounds or not 0 < args.superlink_restart < args.rounds:
        p.error("--site-restart and --superlink-restart must be rounds of the run")
    return args


class Soak:
    """The deployment under watch and what is done to it."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        manifest = generate_federation(work / "data", scenario="tiny", seed=0, n_subjects=args.subjects, progress=False)
        self.roots = {s.name: Path(s.root) for s in manifest.sites}
        self.fed = FederationPaths(root=work / "fed")
        if coordinator_main(["provision", str(self.fed.root), *[a for s in SITES for a in ("--site", s)]]) != 0:
            raise SystemExit("provision failed")
        self.procs: dict[
            str, Process
        ] = {}  # the watched roots: "coordinator" (`superlink`), each site's join, "dashboard"
        self.timeline: list[dict[str, Any]] = []
        self.out = work / "run-main"
        self.main_log = RoundLog(self.out)
        self.watch: Watch | None = None
        self.address = self.dashboard = ""
        self.policies: dict[str, Path] = {}

    def note(self, what: str) -> None:
        tick = self.watch.tick if self.watch is not None else 0
        self.timeline.append({"tick": tick, "what": what})
        print(f"tick {tick}: {what}", flush=True)

    def start(self) -> None:
        """SuperLink (registered, bundle approved), the sites joined, the dashboard, the watch."""
        args, work, fed = self.args, self.work, self.fed
        self.procs["coordinator"], self.address = start_registered_superlink(fed, out=work / "superlink-1.out")
        self.policies = {name: site_policy(fed) for name in SITES}
        dp_policy = work / f"policy-{args.dp_site}.yaml"
        dp_policy.write_text(site_policy(fed).read_text() + DP_POLICY)
        self.policies[args.dp_site] = dp_policy
        for name in SITES:
            self.procs[name] = self.join(name, 1)
        port = free_port()
        self.procs["dashboard"] = Process(
            [sys.executable, "-m", "server.coordinator", "dashboard", str(fed.root), "--port", str(port)],
            work / "dashboard.out",
        )
        self.dashboard = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while get(self.dashboard + "/metrics", 10)[0] != 200:
            if time.monotonic() > deadline or self.procs["dashboard"].proc.poll() is not None:
                raise SystemExit(f"the dashboard did not start:\n{self.procs['dashboard'].output()[-3000:]}")
            time.sleep(1)
        dirs = {"fed": fed.root, "run-main": self.out, "runs": work / "runs"}
        dirs |= {f"state-{n}": work / f"state-{n}" for n in SITES}
        self.watch = Watch(self.procs, dirs, self.dashboard, self.main_log, args.interval)
        self.watch.start()

    def join(self, name: str, n: int) -> Process:
        return start_join(self.fed, self.roots[name], name, self.address, self.work, self.policies[name], n)

    def coordinator(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> Background:
        """`coordinator ARGS --wait` in the background."""
        return Background(*args, "--wait", "--timeout", str(int(timeout)), timeout=timeout + 600)

    def restart_site(self) -> None:
        """The DP site's join and everything below it killed (no goodbye), then joined again."""
        assert self.watch is not None
        site = self.args.dp_site
        kill_hard(self.procs[site])
        self.note(f"{site} killed (SIGKILL of its join and below)")
        with self.watch.lock:
            self.procs[site] = self.join(site, 2)
        self.note(f"{site} joined again")

    def restart_superlink(self, launch: Background) -> Background:
        """The SuperLink killed (`superlink` stops everything), `superlink` started again on the same
        port, the sites rejoined by themselves, the run resumed: the resume's `--wait`."""
        assert self.watch is not None
        rejoined = {n: self.procs[n].output().count("rejoined: SuperNode") for n in SITES}
        link = pid_of_role(self.procs["coordinator"].proc.pid, "superlink")
        os.kill(link, signal.SIGKILL)
        self.note(f"SuperLink (pid {link}) killed")
        self.procs["coordinator"].proc.wait(timeout=600)
        port = self.address.rsplit(":", 1)[1]
        with self.watch.lock:
            self.procs["coordinator"] = Process(
                [sys.executable, "-m", "server.coordinator", "superlink", str(self.fed.root), "--port", port]
                + ["--parent-pid", str(os.getpid())],
                self.work / "superlink-2.out",
            )
        if not self.procs["coordinator"].wait_for("SuperLink ready", 900):
            raise SystemExit(f"the SuperLink did not start again:\n{self.procs['coordinator'].output()[-3000:]}")
        launch.join(RUN_TIMEOUT_S)  # `launch --wait`: the restarted SuperLink knows no such run (exit 1)
        deadline = time.monotonic() + 900
        while any(self.procs[n].output().count("rejoined: SuperNode") <= rejoined[n] for n in SITES):
            if time.monotonic() > deadline:
                raise SystemExit("the sites did not rejoin the restarted SuperLink")
            time.sleep(1)
        self.note("SuperLink started again, every site rejoined; resume")
        return self.coordinator("resume", str(self.fed.root), "--out-dir", str(self.out))

    def main_run(self) -> int:
        """The run of --rounds rounds through both faults; its `--wait`'s exit status."""
        args = self.args
        assert self.watch is not None
        launch = self.coordinator(
            "launch", str(self.fed.root), "--out-dir", str(self.out), "--rounds", str(args.rounds), *run_config(args)
        )
        for at, fault in sorted([(args.site_restart, "site"), (args.superlink_restart, "superlink")]):
            wait_tick(self.watch, at, launch, f"the {fault} restart")
            if fault == "site":
                self.restart_site()
            else:
                launch = self.restart_superlink(launch)
        launch.join(RUN_TIMEOUT_S + 600)
        assert launch.result is not None
        self.note(f"main run ended (exit {launch.result.returncode})")
        return launch.result.returncode

    def fill_runs(self) -> list[int]:
        """One-round runs, each into its own out-dir, until FED holds --runs launches; their exits."""
        assert self.watch is not None
        launched = len((self.fed.server_dir / "launches.jsonl").read_text().splitlines())
        exits = []
        for i in range(max(0, self.args.runs - launched)):
            with self.watch.lock:
                self.watch.tick_override = self.args.rounds + 1 + i
            run_dir = self.work / "runs" / f"run-{i + 1:02d}"
            one = self.coordinator(
                "launch",
                str(self.fed.root),
                "--out-dir",
                str(run_dir),
                "--rounds",
                "1",
                *run_config(self.args, evaluate=False),
                timeout=3600,
            )
            one.join(4300)
            assert one.result is not None
            exits.append(one.result.returncode)
        if exits:
            self.note(f"{len(exits)} one-round runs, exits {sorted(set(exits))}")
        return exits

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        for proc in self.procs.values():
            proc.stop()


def main() -> int:
    if sys.argv[1:2] == ["--judge-disk-again"]:  # JSON: rewrite its disk verdict, print the summary
        path = Path(sys.argv[2])
        result = judge_disk_again(path)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print_summary(result)
        return 0 if all(c["pass"] for c in result["criteria"].values()) else 1
    args = parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ[LOG_MAX_BYTES_ENV] = str(args.log_max_bytes)  # every process started below rotates its logs at it
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="healthfm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(
        f"soak: {args.rounds} rounds (evaluation every {args.eval_every}), {len(SITES)} warm sites ({args.dp_site} "
        f"under DP), site restart at {args.site_restart}, SuperLink restart at {args.superlink_restart}, "
        f"{args.runs} runs; cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}; work {work}",
        flush=True,
    )
    soak = Soak(args, work)
    try:
        soak.start()
        assert soak.watch is not None
        main_rc = soak.main_run()
        extra = soak.fill_runs()
        time.sleep(3 * args.interval)
        soak.watch.stop()
        final_pages = time_pages(soak.dashboard, repeats=10)
        ledger = ledger_epsilon(work / f"state-{args.dp_site}")
        metric, shown = page_epsilons(soak.dashboard, args.dp_site)
        result = analyse(
            args, soak.watch, soak.main_log, soak.timeline, final_pages, ledger, metric, shown, main_rc, extra
        )
        result["wall_s"] = time.time() - started
    finally:
        soak.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.plot))
    print_summary(result)
    print(f"written: {args.out}, {args.plot}")
    return 0 if all(c["pass"] for c in result["criteria"].values()) else 1


def page_times(final: dict[str, list[float]], by_tick: dict[int, dict[str, list[float]]], rounds: int) -> dict:
    """Per page (ms): the first answer after the end and the median of the later ones (the
    dashboard's cache), and its first answer after each of the main run's last 20 rounds (the
    run writing meanwhile): their median and most. A failed answer counts as never (inf)."""

    def ms(values: list[float]) -> list[float]:
        return [v if v >= 0 else float("inf") for v in values]

    out = {}
    for page, values in final.items():
        done = ms(values)
        flight = [ms(t[page])[0] for tick, t in by_tick.items() if rounds - 20 < tick <= rounds and page in t]
        out[page] = {
            "first": done[0],
            "cached": statistics.median(done[1:]) if len(done) > 1 else done[0],
            "in_flight_median": statistics.median(flight) if flight else float("nan"),
            "in_flight_max": max(flight, default=float("nan")),
        }
    return out


def analyse(
    args: argparse.Namespace,
    watch: Watch,
    main_log: RoundLog,
    timeline: list[dict[str, Any]],
    final_pages: dict[str, list[float]],
    ledger: float | None,
    metric: float | None,
    shown: str | None,
    main_rc: int,
    extra: list[int],
) -> dict[str, Any]:
    verdicts = judge_series(watch.series, args.settle, args.eval_every, args.rss_margin, args.rounds)
    judged = [v for v in verdicts if v.judged]
    last_sizes = watch.sizes[max(watch.sizes)] if watch.sizes else {}
    pages = page_times(final_pages, watch.pages, args.rounds)
    # The page and /metrics are judged, as first asked after the end (the dashboard reads the runs'
    # files afresh) and then from its cache; /panels (what the page's script polls) is timed where served.
    page_ok = all(
        pages.get(p, {}).get(when, float("inf")) <= args.page_ms for p in JUDGED_PAGES for when in ("first", "cached")
    )
    eps_ok = ledger is not None and metric is not None and abs(metric - ledger) <= 1e-9 * max(1.0, ledger)
    if shown is not None and ledger is not None:
        eps_ok = eps_ok and shown == f"{ledger:.3f}"
    round_s = {r: e.get("timings", {}).get("round_seconds") for r, e in sorted(main_log.rounds.items())}
    criteria = {
        "run": {"pass": main_rc == 0 and all(rc == 0 for rc in extra), "detail": f"main {main_rc}, runs {extra}"},
        "rss": {
            "pass": bool(judged) and all(v.rss_ok for v in judged),
            "detail": f"{sum(not v.rss_ok for v in judged)} of {len(judged)} judged processes' RssAnon over "
            f"{args.rss_margin:.0%}; worst x{max((v.anon_ratio for v in judged), default=0):.3f}",
        },
        "fds": {
            "pass": bool(judged) and all(v.fds_ok for v in judged),
            "detail": ", ".join(f"{v.key} {v.fds_ref} +{v.fds_growth:.1f}" for v in judged if not v.fds_ok)
            or "no growth",
        },
        "threads": {
            "pass": bool(judged) and all(v.threads_ok for v in judged),
            "detail": ", ".join(f"{v.key} {v.threads_ref} +{v.threads_growth:.1f}" for v in judged if not v.threads_ok)
            or "no growth",
        },
        "page": {
            "pass": page_ok,
            "detail": "; ".join(
                f"{p} {t['first']:.0f} ms first, {t['cached']:.1f} ms cached, in flight {t['in_flight_median']:.0f} "
                f"(at most {t['in_flight_max']:.0f}) ms"
                for p, t in pages.items()
            )
            + f" (bound {args.page_ms:g} ms)",
        },
        "epsilon": {
            "pass": eps_ok,
            "detail": f"ledger {ledger}, /metrics {metric}, page {shown if shown is not None else '(no cell found)'}",
        },
    }
    criteria["disk"], disk_figures = disk_part(watch.sizes, args.settle, args.rounds, args.log_max_bytes)
    return {
        "config": vars(args),
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "date": time.strftime("%Y-%m-%d"),
            "load_end": os.getloadavg()[0],
        },
        "timeline": timeline,
        "criteria": criteria,
        "processes": [as_dict(v) for v in verdicts],
        "series": watch.series.to_json(),
        "pages": {str(t): v for t, v in sorted(watch.pages.items())},
        "load_by_tick": {str(t): v for t, v in sorted(watch.load.items())},
        "final_pages": final_pages,
        "page_times": pages,
        "disk": {**disk_figures, "last": last_sizes},
        "sizes_by_tick": {str(t): v for t, v in sorted(watch.sizes.items())},
        "round_seconds": round_s,
    }


def disk_part(
    sizes: dict[int, dict[str, int]], settle: int, rounds: int, log_max_bytes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The disk criterion and its figures (bytes a round of each growing file, checkpoints kept)."""
    keep = FederationConfig.model_fields["keep_checkpoints"].default
    disk = judge_disk(sizes, settle, rounds, log_max_bytes, LOG_BACKUPS, keep)
    figures = {
        "records_bytes_per_round": disk.records,
        "logs_bytes_per_round": disk.logs,
        "unexpected_bytes_per_round": disk.unexpected,
        "checkpoints": disk.checkpoints,
    }
    return {"pass": disk.ok, "detail": disk.detail()}, figures


def judge_disk_again(path: Path) -> dict[str, Any]:
    """A soak's JSON with its disk criterion judged again from the sizes it recorded (after a
    change to the judging, not to what was measured): the rest is as the run wrote it."""
    result = json.loads(path.read_text())
    c = result["config"]
    sizes = {int(t): v for t, v in result["sizes_by_tick"].items()}
    result["criteria"]["disk"], figures = disk_part(sizes, c["settle"], c["rounds"], c["log_max_bytes"])
    result["disk"] = {**figures, "last": result["disk"]["last"]}
    result["judged_again"] = {"disk": time.strftime("%Y-%m-%d %H:%M:%S")}
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Each process's peak RssAnon per tick, one panel per group (the coordinator's processes, each
    site's, the dashboard), one colour per role; the faults as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = Series.from_json(result.get("series", {}))
    groups: dict[str, dict[str, list[dict[int, Peak]]]] = {}
    for key, ticks in sorted(series.peaks.items()):
        group, role, _pid = key.split("/")
        if len(ticks) > 1 and max(p.anon_kib for p in ticks.values()) >= 20 * 1024:  # not the small helpers
            groups.setdefault(group, {}).setdefault(role, []).append(ticks)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.6 * len(groups)), sharex=True, squeeze=False)
    for ax, (group, roles) in zip(axes[:, 0], sorted(groups.items())):
        for i, (role, instances) in enumerate(sorted(roles.items())):
            for n, ticks in enumerate(instances):
                order = sorted(ticks)
                ax.plot(
                    order,
                    [ticks[t].anon_kib / 1024 for t in order],
                    color=f"C{i}",
                    linewidth=1,
                    label=f"{role} ({len(instances)} processes)" if n == 0 else None,
                )
        for event in result.get("timeline", []):
            ax.axvline(event["tick"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(group, fontsize=9, loc="left")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel(f"round logged (after {result['config']['rounds']}: one tick per later run)")
    fig.suptitle("soak: each process's peak RssAnon per round (dotted: the faults and the runs' end)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    print("\nprocesses (judged from their reference tick; RssAnon in MiB, VmRSS at the reference beside it):")
    print(
        f"{'process':<44}{'ticks':>10}{'ref':>5}{'anon ref':>9}{'max after':>10}{'ratio':>7}{'/100 rnd':>9}"
        f"{'rss ref':>9}{'fds':>9}{'threads':>9}"
    )
    for v in result["processes"]:
        if not v["judged"]:
            print(f"{v['key']:<44}{v['first']:>4}-{v['last']:<5} not judged (too short-lived)")
            continue
        print(
            f"{v['key']:<44}{v['first']:>4}-{v['last']:<5}{v['reference']:>5}{v['anon_ref_mib']:9.1f}"
            f"{v['anon_max_after_mib']:10.1f}{v['anon_ratio']:7.3f}{v['anon_slope_mib_per_100']:9.1f}"
            f"{v['rss_ref_mib']:9.1f}"
            f"{v['fds_ref']:>4}{v['fds_growth']:+5.1f}{v['threads_ref']:>4}{v['threads_growth']:+5.1f}"
        )
    for what in ("records", "logs", "unexpected"):
        growth = result["disk"][f"{what}_bytes_per_round"]
        print(f"\n{what} growing after the settle rounds (bytes per round of the main run):")
        for name, g in sorted(growth.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<70}{g:12.0f}")
    print("\ntimeline:")
    for event in result["timeline"]:
        print(f"  tick {event['tick']:>4}: {event['what']}")
    print("\ncriteria:")
    for name, c in result["criteria"].items():
        print(f"  {name:<8} {'pass' if c['pass'] else 'FAIL'}  {c['detail']}")


if __name__ == "__main__":
    sys.exit(main())
