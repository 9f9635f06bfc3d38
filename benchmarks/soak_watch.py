"""What benchmarks/soak.py watches in a running federation, and how it judges it.

Sampling (from /proc, Linux): every process below the watched roots (the coordinator's `superlink`,
each site's `join`, the dashboard), named by its role (`superlink`, `nginx-worker`, `serverapp`,
`genomics/clientapp`, ...), with its resident set (VmRSS) and the anonymous part of it (RssAnon),
open file descriptors and threads; and the size of every file under the watched directories.

Memory is judged on RssAnon: what the process itself allocated, where a leak or a heap that keeps
growing shows. The rest of VmRSS is pages of files it maps (torch's libraries, hundreds of MB),
which the kernel drops and reads back as the machine's other work needs its page cache: on a
shared machine a process's VmRSS moved by that much with nothing of its own changing.

Judging (pure functions of the recorded series, so tests/unit/test_soak_watch.py checks them on
series made up for it): each process is judged from its reference tick, the first evaluation round
at least `settle` rounds after it was first seen (round 20 for a process there from the start, with
evaluation every 10 rounds: a reference round includes the evaluation a process does every 10
rounds). Its peak RssAnon in every later tick must stay within `rss_margin` of the reference tick's peak;
its descriptors and threads must not grow: the least-squares line through each tick's most, from
the reference tick on, must rise by less than GROWTH_LIMIT (2) over the ticks judged. A leak keeps
rising; a busy process's counts go up and down with what it is doing (a SuperNode's 10 or 12
threads as a task comes and goes, a descriptor open at one sample), which moved that line by at
most 0.93 in the 200-round soak.
The rounds of the main run and the later runs (one tick a run: minutes, a setup, more at once
than in any round) are fitted apart, each on its own. A process seen for fewer than `settle` + one evaluation interval is listed, not judged.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.deploy_fixtures import descendants  # noqa: E402

# (pattern in the command line, role); the first that matches names the process.
ROLES: tuple[tuple[str, str], ...] = (
    ("server.deploy.superlink_main", "superlink"),
    ("server.coordinator superlink", "coordinator-superlink"),
    ("server.coordinator dashboard", "dashboard"),
    ("nginx: master", "nginx-master"),
    ("nginx: worker", "nginx-worker"),
    ("flwr-serverapp", "serverapp"),
    ("client.deploy.warm_clientapp", "clientapp"),
    ("flwr-clientapp", "clientapp-cold"),
    ("client.deploy.app_guard", "app-guard"),
    ("client.deploy.supernode_main", "supernode"),
    ("flower-superexec", "superexec"),
    ("client.py join", "join"),
)


def role_of(command: str) -> str:
    for needle, role in ROLES:
        if needle in command:
            return role
    first = command.split(" ", 1)[0]
    return "other:" + (Path(first).name or "?")


@dataclass(frozen=True)
class ProcSample:
    key: str  # "<group>/<role>/<pid>": one process instance
    group: str  # the root it was found under: "coordinator", "dashboard", a site's name
    role: str
    pid: int
    rss_kib: int
    anon_kib: int
    fds: int
    threads: int


def read_process(pid: int) -> tuple[str, int, int, int, int] | None:
    """(command line, VmRSS KiB, RssAnon KiB, open fds, threads) of a live process, None if it is gone."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)
    anon = re.search(r"^RssAnon:\s+(\d+)", status, re.MULTILINE)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    if rss is None or anon is None or threads is None:  # a zombie has no memory left
        return None
    return command, int(rss.group(1)), int(anon.group(1)), fds, int(threads.group(1))


def sample_processes(roots: Mapping[str, int]) -> list[ProcSample]:
    """Every live process below each root (group name -> pid), the roots included."""
    out = []
    for group, root in roots.items():
        for pid in [root, *descendants(root)]:
            got = read_process(pid)
            if got is None:
                continue
            command, rss, anon, fds, threads = got
            role = role_of(command)
            out.append(ProcSample(f"{group}/{role}/{pid}", group, role, pid, rss, anon, fds, threads))
    return out


def file_sizes(roots: Mapping[str, Path]) -> dict[str, int]:
    """Bytes of every regular file under each root, keyed "<name>/<path relative to the root>"."""
    sizes: dict[str, int] = {}
    for name, root in roots.items():
        for dirpath, _dirs, files in os.walk(root):
            for file in files:
                path = Path(dirpath) / file
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if path.is_symlink():
                    continue
                sizes[f"{name}/{path.relative_to(root)}"] = st.st_size
    return sizes


# ---------------------------------------------------------------------------- per tick


@dataclass
class Peak:
    """One process's largest values within one tick (a round of the soak)."""

    rss_kib: int = 0
    anon_kib: int = 0
    fds: int = 0
    threads: int = 0

    def add(self, s: ProcSample) -> None:
        self.rss_kib = max(self.rss_kib, s.rss_kib)
        self.anon_kib = max(self.anon_kib, s.anon_kib)
        self.fds = max(self.fds, s.fds)
        self.threads = max(self.threads, s.threads)


@dataclass
class Series:
    """Per process instance: its peaks by tick."""

    peaks: dict[str, dict[int, Peak]] = field(default_factory=dict)

    def add(self, tick: int, samples: Iterable[ProcSample]) -> None:
        for s in samples:
            self.peaks.setdefault(s.key, {}).setdefault(tick, Peak()).add(s)

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            key: {str(t): [p.rss_kib, p.anon_kib, p.fds, p.threads] for t, p in sorted(ticks.items())}
            for key, ticks in self.peaks.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, list[int]]]) -> Series:
        return cls({key: {int(t): Peak(*v) for t, v in ticks.items()} for key, ticks in data.items()})


# ---------------------------------------------------------------------------- judging


def reference_tick(first: int, settle: int, every: int) -> int:
    """The first evaluation round (a multiple of `every`) at least `settle` ticks after `first`."""
    at = first + settle
    return -(-at // every) * every if every > 0 else at


@dataclass(frozen=True)
class ProcessVerdict:
    key: str
    first: int
    last: int
    reference: int | None  # None: not judged (lived too short)
    anon_ref_mib: float = 0.0  # peak RssAnon in the reference tick
    anon_max_after_mib: float = 0.0
    anon_max_tick: int = 0
    anon_ratio: float = 0.0
    anon_slope_mib_per_100: float = 0.0  # least squares of the peak over the ticks from the reference
    rss_ref_mib: float = 0.0  # VmRSS, shown beside it
    rss_max_after_mib: float = 0.0
    fds_ref: int = 0  # the most in the reference tick
    fds_growth: float = 0.0  # the fitted line's rise over the ticks judged
    threads_ref: int = 0
    threads_growth: float = 0.0
    rss_ok: bool = True
    fds_ok: bool = True
    threads_ok: bool = True

    @property
    def judged(self) -> bool:
        return self.reference is not None


def _slope(points: list[tuple[int, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return sum((t - mx) * (v - my) for t, v in points) / den if den else 0.0


GROWTH_LIMIT = 2.0  # descriptors or threads the fitted line may rise by over the ticks judged


def _growth(points: list[tuple[int, float]]) -> float:
    """The rise of the least-squares line over the points' span."""
    return (points[-1][0] - points[0][0]) * _slope(points) if len(points) > 1 else 0.0


def judge_process(
    key: str, ticks: Mapping[int, Peak], settle: int, every: int, rss_margin: float, rounds: int | None = None
) -> ProcessVerdict:
    """`rounds`: the main run's last tick (the later ticks are one run each), None: every tick a round."""
    order = sorted(ticks)
    first, last = order[0], order[-1]
    ref = reference_tick(first, settle, every)
    if ref not in ticks or last < ref + max(every, 1):
        return ProcessVerdict(key, first, last, None)
    after = [t for t in order if t > ref]
    base = ticks[ref].anon_kib
    top = max(after, key=lambda t: ticks[t].anon_kib)
    judged = [t for t in order if t >= ref]
    parts = [judged] if rounds is None else [[t for t in judged if t <= rounds], [t for t in judged if t > rounds]]
    # A part shorter than an evaluation period is not fitted: over a tick or two, a launch's
    # ServerApp whose pipes the superexec holds looks like growth (the short soak's restarted
    # superexec: 4 descriptors, 6 while a one-round run ran).
    parts = [part for part in parts if len(part) >= max(every, 2)]
    fds_growth = max((_growth([(t, float(ticks[t].fds)) for t in part]) for part in parts), default=0.0)
    threads_growth = max((_growth([(t, float(ticks[t].threads)) for t in part]) for part in parts), default=0.0)
    ratio = ticks[top].anon_kib / base if base else float("inf")
    return ProcessVerdict(
        key=key,
        first=first,
        last=last,
        reference=ref,
        anon_ref_mib=base / 1024,
        anon_max_after_mib=ticks[top].anon_kib / 1024,
        anon_max_tick=top,
        anon_ratio=ratio,
        anon_slope_mib_per_100=100 * _slope([(t, ticks[t].anon_kib / 1024) for t in judged]),
        rss_ref_mib=ticks[ref].rss_kib / 1024,
        rss_max_after_mib=max(ticks[t].rss_kib for t in after) / 1024,
        fds_ref=ticks[ref].fds,
        fds_growth=fds_growth,
        threads_ref=ticks[ref].threads,
        threads_growth=threads_growth,
        rss_ok=ratio <= 1 + rss_margin,
        fds_ok=fds_growth < GROWTH_LIMIT,
        threads_ok=threads_growth < GROWTH_LIMIT,
    )


def judge_series(
    series: Series, settle: int, every: int, rss_margin: float, rounds: int | None = None
) -> list[ProcessVerdict]:
    return [judge_process(k, v, settle, every, rss_margin, rounds) for k, v in sorted(series.peaks.items())]


def growth_per_tick(sizes_by_tick: Mapping[int, Mapping[str, int]], since: int) -> dict[str, float]:
    """Bytes a tick each file grew by, from tick `since` (or its first tick after) to the last."""
    ticks = sorted(t for t in sizes_by_tick if t >= since)
    if len(ticks) < 2:
        return {}
    a, b = sizes_by_tick[ticks[0]], sizes_by_tick[ticks[-1]]
    span = ticks[-1] - ticks[0]
    return {name: (b.get(name, 0) - a.get(name, 0)) / span for name in sorted(set(a) | set(b))}


# ---------------------------------------------------------------------------- disk

# What grows on disk, by file name (docs/coordinator.md "What a run keeps on disk", docs/site-admin.md):
# logs are rotated (healthfm_core/log_files.py), checkpoints pruned to the run's keep-checkpoints,
# records kept whole (the run's and the site's account of what happened; their bytes per round are
# the documented figure). Anything else must stop growing once a run is under way.
LOG_NAME = re.compile(r"(^|/)(server|head|nginx-access|nginx-error|supernode|app-guard)\.log(\.\d+)?$")
RECORD_NAME = re.compile(
    r"(^|/)(rounds\.jsonl|audit\.jsonl|summary\.md|evaluation\.json|launches\.jsonl|privacy_ledger\.json"
    r"|privacy_ledger\.mark\.json|auth_key\.privacy\.json|released_eval_samples\.json|run-configs/run-\d+\.toml"
    r"|released/(capabilities|code_stats|evaluation)\.parquet)$"  # the release gate's record (site-admin.md)
)
CHECKPOINT = re.compile(r"^(?P<run>.+)/checkpoints/(?P<step>step-\d+)/")
# A file rewritten whole (outcome.json, audit.anchor.json, a site's node.json) changes size by a
# digit or two when a count or an id does: anything else grows only past this over the ticks judged.
REWRITTEN_SLACK_BYTES = 64


@dataclass
class DiskVerdict:
    ok: bool
    logs_over: dict[str, int]  # a log (or its backups) past its bound
    backups_over: dict[str, int]  # a log with more backups than its retention
    checkpoints: dict[str, int]  # run directory -> checkpoints kept at the end
    checkpoints_over: dict[str, int]
    records: dict[str, float]  # bytes a round
    logs: dict[str, float]  # bytes a round, before rotation
    unexpected: dict[str, float]  # bytes a round of anything else still growing
    total_bytes: int

    def detail(self) -> str:
        problems = [
            *(f"log {k} {v} B over its bound" for k, v in self.logs_over.items()),
            *(f"{k}: {v} backups" for k, v in self.backups_over.items()),
            *(f"{k}: {v} checkpoints" for k, v in self.checkpoints_over.items()),
            *(f"{k} grows {v:.0f} B a round" for k, v in self.unexpected.items()),
        ]
        return "; ".join(problems) or (
            f"logs within their bound, checkpoints kept {sorted(set(self.checkpoints.values()))}, records "
            f"{sum(self.records.values()) / 1024:.1f} kB a round; {self.total_bytes / 2**20:.1f} MiB in all"
        )


def judge_disk(
    sizes_by_tick: Mapping[int, Mapping[str, int]],
    since: int,
    until: int,
    log_max_bytes: int,
    log_backups: int,
    keep_checkpoints: int,
    line_slack: int = 65536,
) -> DiskVerdict:
    """Each file's growth from tick `since` to tick `until` (the main run's last) and each log's and
    run directory's size at the last tick, against the retention."""
    last_tick = max(sizes_by_tick)
    last = sizes_by_tick[last_tick]
    growth = growth_per_tick({t: v for t, v in sizes_by_tick.items() if t <= until}, since)
    window = sorted(t for t in sizes_by_tick if since <= t <= until)
    span = window[-1] - window[0] if window else 0
    logs_over = {k: v for k, v in last.items() if LOG_NAME.search(k) and v > log_max_bytes + line_slack}
    backups: dict[str, int] = {}
    for name in last:
        match = LOG_NAME.search(name)
        if match and match.group(3):
            base = name[: -len(match.group(3))]
            backups[base] = max(backups.get(base, 0), int(match.group(3)[1:]))
    steps: dict[str, set[str]] = {}
    for name in last:
        if m := CHECKPOINT.match(name):
            steps.setdefault(m.group("run"), set()).add(m.group("step"))
    checkpoints = {run: len(s) for run, s in steps.items()}
    records = {k: g for k, g in growth.items() if RECORD_NAME.search(k) and g > 0}
    log_growth = {k: g for k, g in growth.items() if LOG_NAME.search(k) and g > 0}
    unexpected = {
        k: g
        for k, g in growth.items()
        if g * span > REWRITTEN_SLACK_BYTES
        and not LOG_NAME.search(k)
        and not RECORD_NAME.search(k)
        and not CHECKPOINT.match(k)
    }
    backups_over = {k: n for k, n in backups.items() if n > log_backups}
    checkpoints_over = {k: n for k, n in checkpoints.items() if n > keep_checkpoints}
    return DiskVerdict(
        ok=not (logs_over or backups_over or checkpoints_over or unexpected),
        logs_over=logs_over,
        backups_over=backups_over,
        checkpoints=checkpoints,
        checkpoints_over=checkpoints_over,
        records=records,
        logs=log_growth,
        unexpected=unexpected,
        total_bytes=sum(last.values()),
    )


def as_dict(verdict: ProcessVerdict) -> dict[str, Any]:
    return {**verdict.__dict__, "judged": verdict.judged}
