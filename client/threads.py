"""How many torch threads a site's ClientApp uses: the cores it has free, or what its admin says.

Precedence (client/site_runtime.py applies it once per ClientApp process, before any training):
`join --threads N` (node config `threads`) > the policy's `threads` > `auto` (the default of a
deployed site, `join --threads auto`). A site with neither (a simulation's virtual sites) keeps
torch's default: its worker processes share one machine and Ray already sizes them.

`auto` = the cores this process may run on (sched_getaffinity: a container's or taskset's limit,
not the machine's) minus the cores its neighbours keep busy NOW, rounded down, at least 1 and at
most AUTO_MAX. Threads beyond the free cores do not add compute: they time-slice against the
neighbours and every intra-op barrier waits for the slowest (measured: 2 threads 6-9x slower than
1 beside busy neighbours on a 2-core machine, 1.55-1.69x faster on a quiet one). AUTO_MAX caps it
because the models' matrices (d_model 32-256) stop scaling well beyond ~8 threads.

A run keeps what `auto` chose for its setup: the site records it in threads.json in its state dir
(`join`: STATE_DIR/site-state), keyed by the setup's sha256, and a later run of the same setup at
this site (a resume, or the same config launched again) trains with the recorded count
(`setup_threads`). The thread count sets
the order of torch's sums (1 and 2 threads differ by about 1e-9 after a step), so without the
record a resume would not reproduce the uninterrupted run bit for bit whenever the load differed.

"Busy now" is measured, not the 1-minute load average: that average lags by about a minute (load
1.7 right after a benchmark made auto pick 1 thread on a machine that had just become quiet).
Two /proc/stat snapshots SAMPLE_S apart give each allowed core's busy fraction (everything but
idle and iowait); their sum, less this process's own CPU, is the neighbours' busy cores. Where
/proc/stat is missing or unreadable (not Linux) the load average stands in, and the log says so.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from client.policy import MAX_THREADS
from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import strict_model

log = logging.getLogger("healthfm.client.threads")

AUTO_MAX = 8
THREADS_RECORD = "threads.json"  # in the site's state dir: auto's choice per setup
RECORD_KEEP = 64  # setups remembered (the oldest dropped first)
PROC_STAT = Path("/proc/stat")
# 0.25 s: /proc/stat counts in USER_HZ=100 ticks, so 25 ticks per core (a fully busy core reads
# 1.00 +- 0.04) over many scheduler slices (3-24 ms), yet negligible beside a ClientApp's start
# (seconds) and taken once per process.
SAMPLE_S = 0.25
# A core at most 15% busy counts as free: one or two ticks of quantisation, interrupts and daemons
# waking briefly; a torch thread beside such a neighbour loses less than the core gives it.
NOISE = 0.15
RUNQ_READS = 5  # run-queue reads across the window; their median ignores a one-read spike


@dataclass(frozen=True)
class ProcStat:
    """One /proc/stat snapshot: per-core (idle, total) ticks, the aggregate line, procs_running."""

    cores: dict[int, tuple[int, int]]
    total: tuple[int, int]
    procs_running: int | None


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/stat text. Raises ValueError naming the line and field that is wrong."""
    cores: dict[int, tuple[int, int]] = {}
    total: tuple[int, int] | None = None
    running: int | None = None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu"):
            try:
                ticks = [int(v) for v in rest.split()]
            except ValueError:
                raise ValueError(f"/proc/stat: line {name!r}: non-integer tick count in {rest.strip()!r}") from None
            if len(ticks) < 4:
                raise ValueError(f"/proc/stat: line {name!r}: {len(ticks)} fields, need at least 4 (user..idle)")
            # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
            # already inside user/nice, so the total stops at steal (stolen time is busy to us).
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            pair = (idle, sum(ticks[:8]))
            if name == "cpu":
                total = pair
            else:
                try:
                    cores[int(name[3:])] = pair
                except ValueError:
                    raise ValueError(f"/proc/stat: line {name!r}: not cpu or cpuN") from None
        elif name == "procs_running":
            try:
                running = int(rest)
            except ValueError:
                raise ValueError(f"/proc/stat: field procs_running: value {rest.strip()!r} not an integer") from None
    if total is None:
        raise ValueError("/proc/stat: no aggregate 'cpu' line")
    return ProcStat(cores=cores, total=total, procs_running=running)


def core_busy(before: str, after: str, cpus: Collection[int] | None = None) -> dict[int, float]:
    """Each core's busy fraction between two /proc/stat snapshots (text), for `cpus` (default: all
    cores listed). A core with no ticks in between counts idle. Raises ValueError when a core is
    missing or its counters went backwards (a hot-plugged core, a garbled file)."""
    a, b = parse_proc_stat(before), parse_proc_stat(after)
    wanted = sorted(b.cores) if cpus is None else sorted(cpus)
    if not wanted:
        raise ValueError("/proc/stat: no per-core cpuN lines")
    out: dict[int, float] = {}
    for cpu in wanted:
        if cpu not in a.cores or cpu not in b.cores:
            raise ValueError(f"/proc/stat: cpu{cpu} (in this process's affinity) missing from a snapshot")
        d_idle, d_total = b.cores[cpu][0] - a.cores[cpu][0], b.cores[cpu][1] - a.cores[cpu][1]
        if d_idle < 0 or d_total < 0 or d_idle > d_total:
            raise ValueError(f"/proc/stat: cpu{cpu}: counters went backwards (idle {d_idle}, total {d_total})")
        out[cpu] = 0.0 if d_total == 0 else 1.0 - d_idle / d_total
    return out


def busy_cores(before: str, after: str, cpus: Collection[int] | None = None, noise: float = NOISE) -> float:
    """Busy cores between two /proc/stat snapshots: the sum of the cores' busy fractions, a core at
    most `noise` busy counting 0."""
    return sum(f for f in core_busy(before, after, cpus).values() if f > noise)


def free_cores(cores: int, busy: float, cap: int = AUTO_MAX) -> int:
    """floor(cores - busy), clamped to [1, cap]: never zero threads, never past the cap."""
    return max(1, min(cap, math.floor(cores - busy + 1e-9)))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _own_running() -> int:
    """This process's threads in state R now (the reader itself among them): procs_running counts
    them too, and they are not neighbours."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        n += stat[stat.rfind(")") + 2 :].startswith("R")
    return max(1, n)


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` measured and chose (logged; printed by benchmarks/train_step.py)."""

    threads: int
    cores: int
    busy: float  # the neighbours' cores, as used
    source: str  # "/proc/stat" or "load average" (and why)
    window: float = 0.0
    per_core: dict[int, float] = field(default_factory=dict)
    own_cpu: float = 0.0  # this process's cores during the window, subtracted
    runnable: float | None = None  # median neighbours runnable (whole-machine affinity only)

    def describe(self) -> str:
        if self.source != "/proc/stat":
            return f"{self.threads} thread(s) = {self.cores} core(s) - {self.busy:.2f} busy ({self.source})"
        cores = " ".join(f"cpu{c} {f:.2f}" for c, f in self.per_core.items())
        runq = "n/a (affinity is not the whole machine)" if self.runnable is None else f"{self.runnable:g}"
        return (
            f"{self.threads} thread(s) = {self.cores} core(s) - {self.busy:.2f} busy (/proc/stat over "
            f"{self.window:.2f} s: {cores}; own {self.own_cpu:.2f}; neighbours runnable {runq})"
        )


def measure(cpus: Collection[int] | None = None, window: float = SAMPLE_S, cap: int = AUTO_MAX) -> AutoChoice:
    """Sample /proc/stat over `window` seconds for `cpus` (default: this process's affinity) and
    choose the threads; fall back to the load average where /proc/stat cannot be used."""
    allowed = set(cpus) if cpus is not None else _affinity()
    cores = len(allowed) if allowed is not None else usable_cores()
    try:
        reads: list[tuple[str, int]] = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(RUNQ_READS):
            if i:
                time.sleep(window / (RUNQ_READS - 1))
            reads.append((PROC_STAT.read_text(), _own_running()))
        own = (time.process_time() - cpu0) / max(time.perf_counter() - t0, 1e-6)
        per_core = core_busy(reads[0][0], reads[-1][0], allowed)
        used = max(0.0, sum(f for f in per_core.values() if f > NOISE) - own)
        # The run-queue guards what ticks miss: a neighbour that woke or started inside the window
        # is runnable in most reads (the median drops a one-read burst). procs_running is
        # machine-wide, so it counts only where this process may use every core.
        snaps = [parse_proc_stat(text) for text, _ in reads]
        runnable: float | None = None
        if set(per_core) == set(snaps[-1].cores) and all(s.procs_running is not None for s in snaps):
            runnable = statistics.median(
                max(0, s.procs_running - mine)  # type: ignore[operator]
                for s, (_, mine) in zip(snaps, reads, strict=True)
            )
        busy = min(float(cores), max(used, runnable or 0.0))
        choice = AutoChoice(
            threads=free_cores(cores, busy, cap),
            cores=cores,
            busy=busy,
            source="/proc/stat",
            window=window,
            per_core=per_core,
            own_cpu=own,
            runnable=runnable,
        )
    except (OSError, ValueError) as err:
        choice = _from_load(cores, cap, f"load average: {PROC_STAT} unusable: {err}")
        log.warning("auto threads: %s unusable (%s): falling back to the 1-minute load average", PROC_STAT, err)
    log.info("auto threads: %s", choice.describe())
    return choice


def _from_load(cores: int, cap: int, why: str) -> AutoChoice:
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average either: assume the cores are free
        load, why = 0.0, why + "; no load average: cores assumed free"
    return AutoChoice(threads=free_cores(cores, load, cap), cores=cores, busy=load, source=why)


def auto_threads(
    cores: int | None = None, load: float | None = None, cap: int = AUTO_MAX, window: float = SAMPLE_S
) -> int:
    """The free cores, clamped to [1, cap]. With `load` given: floor(cores - load), no sampling
    (deterministic, for tests and callers that measured already); else measured now (`measure`)."""
    if load is not None:
        return free_cores(usable_cores() if cores is None else cores, load, cap)
    choice = measure(window=window, cap=cap)
    if cores is not None:  # an explicit core count replaces the affinity's, busy as measured
        return free_cores(cores, choice.busy, cap)
    return choice.threads


def parse_threads(value: object, name: str | None = "threads") -> int | Literal["auto"]:
    """A thread setting as a site gives it (`join --threads`, node config `threads`: a TOML int or
    string): a whole number of at least 1, or "auto". ValueError naming `name` (None: argparse
    names the option itself) and the value."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return "auto"
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS:
        return value
    prefix = f"{name}: " if name else ""
    raise ValueError(f"{prefix}value {value!r}: a whole number from 1 to {MAX_THREADS}, or auto")


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads to `n` (and inter-op, which torch only allows once per
    process, before any parallel work: later calls keep the first value). Returns n."""
    if n < 1:
        raise ValueError(f"threads: value {n}: must be at least 1")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    return n


class ThreadsRecord(BaseModel):
    """threads.json in the site's state dir: the threads `auto` chose per setup, oldest first."""

    model_config = ConfigDict(extra="forbid")

    setups: dict[str, StrictInt] = Field(default_factory=dict)  # setup sha256 -> threads

    @field_validator("setups")
    @classmethod
    def _sha256_to_a_count(cls, setups: dict[str, int]) -> dict[str, int]:
        for key, n in setups.items():
            if not (len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
                raise ValueError(f"key {key[:80]!r} is not a setup's sha256")
            if not 1 <= n <= AUTO_MAX:
                raise ValueError(f"setup {key[:12]}: value {n}: threads must be 1 to {AUTO_MAX}")
        return setups


def setup_threads(state_dir: Path, setup_sha256: str, measured: int) -> tuple[int, str]:
    """The threads setup `setup_sha256` trains with under `auto` at this site, and why: the count
    recorded for it in `state_dir`/threads.json, or `measured` (then recorded). A recorded count
    above the cores this process may use now is not reused (the site's CPUs changed). An
    unreadable record is reported and replaced: it holds only these choices."""
    path = Path(state_dir) / THREADS_RECORD
    record = ThreadsRecord()
    if path.exists():
        try:
            record = strict_model(ThreadsRecord, path.read_text(encoding="utf-8"), path)
        except (OSError, ValueError) as err:  # ValidationError, UnicodeDecodeError, StrictFileError
            reason = (
                "; ".join(
                    f"field {'.'.join(str(x)[:16] for x in e['loc']) or '-'}: {e['msg']}" for e in err.errors()[:3]
                )
                if isinstance(err, ValidationError)
                else str(err)
            )
            log.warning("%s: unreadable (%s); replaced, threads measured again", path, reason)
            record = ThreadsRecord()
    recorded = record.setups.get(setup_sha256)
    if recorded is not None and recorded <= usable_cores():
        return recorded, f"auto, as recorded for this setup in {path} (measured now: {measured})"
    why = "auto: free cores"
    if recorded is not None:
        why += f" (the {recorded} recorded for this setup exceed the {usable_cores()} core(s) usable now)"
    setups = {k: v for k, v in record.setups.items() if k != setup_sha256}
    setups[setup_sha256] = measured
    kept = dict(list(setups.items())[-RECORD_KEEP:])
    try:
        atomic_write_text(path, ThreadsRecord(setups=kept).model_dump_json(indent=1) + "\n")
    except (OSError, ValidationError) as err:  # e.g. a read-only state dir: train anyway, unrecorded
        log.warning("%s: not written (%s): a later run of this setup measures its threads again", path, err)
    return measured, why
