"""`auto` threads: the cores free now, from /proc/stat, and the count a setup keeps across its
runs at a site (client/threads.py).

Snapshots below are real /proc/stat text (a 2-core machine's), advanced by known tick counts, so
the arithmetic is checked against the kernel's format; the last test samples the live file beside
a real busy-loop process pinned to one core.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import threads
from client.threads import (
    AUTO_MAX,
    NOISE,
    THREADS_RECORD,
    auto_threads,
    busy_cores,
    core_busy,
    free_cores,
    measure,
    parse_proc_stat,
    setup_threads,
)

BEFORE = """\
cpu  3448724 1744852 814007 976860 3902 0 7533 28405 0 0
cpu0 1688499 854619 398820 551740 985 0 3024 14226 0 0
cpu1 1760224 890233 415187 425120 2917 0 4508 14178 0 0
intr 32782821 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 13 0 0 0
ctxt 88120090
btime 1795342654
processes 214484
procs_running 4
procs_blocked 0
softirq 16710664 0 3553137 4 5048475 646215 0 9 1986436 72 5476316
"""

# 25 ticks later (0.25 s at USER_HZ=100): cpu0 busy throughout (20 user, 3 system, 2 steal),
# cpu1 22 idle + 2 iowait + 1 user (4% busy: noise). Guest ticks are already inside user.
AFTER = """\
cpu  3448745 1744852 814010 976882 3904 0 7533 28407 5 0
cpu0 1688519 854619 398823 551740 985 0 3024 14228 5 0
cpu1 1760225 890233 415187 425142 2919 0 4508 14178 0 0
intr 32782900 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 13 0 0 0
ctxt 88120190
btime 1795342654
processes 214490
procs_running 3
procs_blocked 0
softirq 16710700 0 3553137 4 5048475 646215 0 9 1986436 72 5476316
"""


def test_parse_reads_idle_iowait_total_and_the_run_queue() -> None:
    snap = parse_proc_stat(BEFORE)
    assert sorted(snap.cores) == [0, 1]
    # idle = idle + iowait; total = user..steal (guest columns excluded: already in user/nice).
    assert snap.cores[0] == (551740 + 985, 1688499 + 854619 + 398820 + 551740 + 985 + 0 + 3024 + 14226)
    assert snap.total[0] == 976860 + 3902
    assert snap.procs_running == 4


def test_busy_and_free_arithmetic() -> None:
    per_core = core_busy(BEFORE, AFTER)
    assert per_core[0] == pytest.approx(1.0)
    assert per_core[1] == pytest.approx(1 / 25)
    assert busy_cores(BEFORE, AFTER) == pytest.approx(1.0)  # cpu1's 4% is under NOISE
    assert busy_cores(BEFORE, AFTER, noise=0.0) == pytest.approx(1.04)
    assert free_cores(2, 1.0) == 1
    assert free_cores(2, 0.0) == 2
    assert free_cores(6, 2.5) == 3
    assert free_cores(16, 0.3) == AUTO_MAX
    assert free_cores(2, 7.0) == 1  # never zero threads
    # A core half busy counts half a core (above NOISE, nothing is rounded away per core).
    half = AFTER.replace("cpu1 1760225 890233 415187 425142 2919", "cpu1 1760236 890233 415187 425132 2917")
    assert core_busy(BEFORE, half)[1] == pytest.approx(0.5)
    assert busy_cores(BEFORE, half) == pytest.approx(1.5)
    assert free_cores(4, busy_cores(BEFORE, half)) == 2


def test_affinity_restricts_the_cores_counted() -> None:
    assert core_busy(BEFORE, AFTER, cpus={1}) == {1: pytest.approx(0.04)}
    assert busy_cores(BEFORE, AFTER, cpus={1}) == 0.0  # cpu0's load is not this process's concern
    assert busy_cores(BEFORE, AFTER, cpus={0}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cpu5"):
        core_busy(BEFORE, AFTER, cpus={0, 5})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("intr 1 2\nprocs_running 2\n", "no aggregate 'cpu' line"),
        ("cpu  1 2 x 4\ncpu0 1 2 3 4\n", "line 'cpu': non-integer"),
        ("cpu  1 2 3\ncpu0 1 2 3\n", "line 'cpu': 3 fields"),
        ("cpu  1 2 3 4\ncpuX 1 2 3 4\n", "line 'cpuX': not cpu or cpuN"),
        ("cpu  1 2 3 4\ncpu0 1 2 3 4\nprocs_running many\n", "procs_running: value 'many'"),
    ],
)
def test_malformed_text_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_proc_stat(text)


def test_counters_going_backwards_are_refused() -> None:
    with pytest.raises(ValueError, match="cpu0: counters went backwards"):
        core_busy(AFTER, BEFORE, cpus={0})


def test_malformed_proc_stat_falls_back_to_the_load_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    garbled = tmp_path / "stat"
    garbled.write_text("cpu  1 2 garbled\n")
    monkeypatch.setattr(threads, "PROC_STAT", garbled)
    with caplog.at_level(logging.INFO, logger="healthfm.client.threads"):
        choice = measure(cpus={0}, window=0.01)
    assert choice.source.startswith("load average")
    assert 1 <= choice.threads <= AUTO_MAX
    assert any(
        r.levelno == logging.WARNING
        and "falling back to the 1-minute load average" in r.getMessage()
        and "non-integer" in r.getMessage()
        for r in caplog.records
    )
    assert any(r.levelno == logging.INFO and "auto threads: " in r.getMessage() for r in caplog.records)


def test_a_given_load_is_deterministic_and_measuring_uses_proc_stat(caplog: pytest.LogCaptureFixture) -> None:
    assert auto_threads(cores=16, load=3.4, cap=16) == 12
    assert auto_threads(cores=2, load=1.7) == 1
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    with caplog.at_level(logging.INFO, logger="healthfm.client.threads"):
        choice = measure(window=0.05)
    assert choice.source == "/proc/stat" and 1 <= choice.threads <= AUTO_MAX
    assert 0.0 <= choice.busy <= choice.cores
    assert [r.getMessage() for r in caplog.records if "auto threads" in r.getMessage()] == [
        f"auto threads: {choice.describe()}"
    ]


def test_a_busy_neighbour_on_a_core_takes_that_core() -> None:
    if not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists():
        pytest.skip("needs Linux affinity and /proc/stat")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 cores")
    pinned, other = allowed[0], allowed[1]
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(loop.pid, {pinned})
        time.sleep(0.2)  # started and migrated to its core
        choice = measure(cpus={pinned, other})
        # The loop is runnable all window long, so its core is never idle (whoever runs on it);
        # the other core may or may not be busy on a loaded machine: nothing is asserted of it.
        assert choice.source == "/proc/stat"
        assert choice.per_core[pinned] >= 1 - NOISE, choice.describe()
        assert choice.threads == 1, choice.describe()
    finally:
        loop.kill()
        loop.wait()


SETUP_A, SETUP_B = "a" * 64, "b" * 64


def test_a_setup_keeps_the_threads_auto_chose_at_its_first_run(tmp_path: Path) -> None:
    assert setup_threads(tmp_path, SETUP_A, 1) == (1, "auto: free cores")
    # Later (a resume, a relaunch): the machine is quieter, auto measures 2; the setup keeps 1.
    n, why = setup_threads(tmp_path, SETUP_A, 2)
    assert n == 1 and "as recorded for this setup" in why and "measured now: 2" in why
    assert setup_threads(tmp_path, SETUP_B, 2) == (2, "auto: free cores")  # another setup: measured
    assert json.loads((tmp_path / THREADS_RECORD).read_text()) == {"setups": {SETUP_A: 1, SETUP_B: 2}}


def test_a_recorded_count_above_the_usable_cores_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_threads(tmp_path, SETUP_A, 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)  # the site's container now has one core
    n, why = setup_threads(tmp_path, SETUP_A, 1)
    assert n == 1 and "the 2 recorded for this setup exceed the 1 core(s) usable now" in why
    assert json.loads((tmp_path / THREADS_RECORD).read_text())["setups"] == {SETUP_A: 1}


@pytest.mark.parametrize(
    "text",
    [
        "{",
        json.dumps({"setups": {SETUP_A: 0}}),
        json.dumps({"setups": {SETUP_A: AUTO_MAX + 1}}),
        json.dumps({"setups": {"../../etc": 1}}),
        json.dumps({"setups": {SETUP_A: 1}, "extra": True}),
    ],
)
def test_an_unreadable_threads_record_is_reported_and_replaced(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / THREADS_RECORD).write_text(text)
    with caplog.at_level(logging.WARNING, logger="healthfm.client.threads"):
        assert setup_threads(tmp_path, SETUP_B, 2) == (2, "auto: free cores")
    assert any(
        str(tmp_path / THREADS_RECORD) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert json.loads((tmp_path / THREADS_RECORD).read_text()) == {"setups": {SETUP_B: 2}}


def test_the_record_keeps_the_latest_setups(tmp_path: Path) -> None:
    keys = [f"{i:064x}" for i in range(threads.RECORD_KEEP + 3)]
    for key in keys:
        setup_threads(tmp_path, key, 1)
    assert list(json.loads((tmp_path / THREADS_RECORD).read_text())["setups"]) == keys[3:]
