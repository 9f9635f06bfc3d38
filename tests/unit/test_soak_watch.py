"""How benchmarks/soak.py judges a soak (benchmarks/soak_watch.py), on series made up for it: a
process whose memory (RssAnon) creeps, or that leaks descriptors or threads, fails; one that is flat, or whose
evaluation rounds peak as its reference round did, passes; a process seen too briefly is not
judged; a log past its bound, too many backups, too many checkpoints or a file that grows and is
neither a log nor a record fails the disk; records grow and are reported. The real processes and
files are read from /proc and the disk as well (this process, a directory)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# After the repository: benchmarks/secure_aggregation.py must not hide the package.
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak_watch  # noqa: E402

Peak = soak_watch.Peak
MIB = 1024  # KiB


def _ticks(rss_mib: list[float], fds: list[int] | None = None, threads: list[int] | None = None, first: int = 0):
    n = len(rss_mib)
    fds = fds or [10] * n
    threads = threads or [4] * n
    # VmRSS: the anonymous part plus 300 MiB of mapped files, which come and go with the page cache.
    return {
        first + i: Peak(int((rss_mib[i] + 300 * (i % 2)) * MIB), int(rss_mib[i] * MIB), fds[i], threads[i])
        for i in range(n)
    }


def judge(ticks, settle: int = 20, every: int = 10, margin: float = 0.10):
    return soak_watch.judge_process("site/clientapp/1", ticks, settle, every, margin)


def test_a_flat_process_passes_and_its_evaluation_peaks_are_its_level() -> None:
    # 100 MiB, 130 MiB at each evaluation round (every 10): the reference (round 20) is one of them.
    rss = [130.0 if t % 10 == 0 and t else 100.0 for t in range(201)]
    v = judge(_ticks(rss))
    assert v.judged and v.reference == 20 and v.rss_ok and v.fds_ok and v.threads_ok
    assert v.anon_ratio == 1.0 and abs(v.anon_slope_mib_per_100) < 5


def test_a_creeping_process_fails_and_its_worst_round_is_named() -> None:
    rss = [100.0 + 0.2 * t for t in range(201)]  # +20% over the rounds after 20
    v = judge(_ticks(rss))
    assert v.judged and not v.rss_ok and v.anon_max_tick == 200
    assert v.anon_ratio > 1.1 and 19 < v.anon_slope_mib_per_100 < 21


def test_a_descriptor_or_thread_leak_fails_and_a_passing_spike_does_not() -> None:
    flat = [100.0] * 201
    leak = judge(_ticks(flat, fds=[10 + t // 10 for t in range(201)]))
    assert not leak.fds_ok and leak.threads_ok and leak.rss_ok
    threads = judge(_ticks(flat, threads=[4 + t // 20 for t in range(201)]))
    assert not threads.threads_ok and threads.fds_ok
    spikes = [10] * 201
    spikes[150] = spikes[190] = 14  # descriptors open at one sample: no leak
    assert judge(_ticks(flat, fds=spikes)).fds_ok
    # A SuperNode's threads: 10 idle, 12 while a task runs, in no order (the 200-round soak's).
    busy = [10 + 2 * ((t * 7919) % 3 == 0) for t in range(201)]
    assert judge(_ticks(flat, threads=busy)).threads_ok


def test_a_launch_or_two_after_the_main_run_is_too_short_to_call_growth_and_eighteen_are_not() -> None:
    # The short soak's superexec, restarted at round 16 of 24: reference round 24, then two launches
    # while whose ServerApp it holds two pipes more. Growth needs an evaluation period of ticks.
    def superexec(fds_after: list[int]) -> soak_watch.ProcessVerdict:
        fds = [4] * 9 + fds_after
        ticks = _ticks([90.0] * len(fds), fds=fds, first=16)
        return soak_watch.judge_process("coordinator/superexec/1", ticks, 8, 8, 0.10, rounds=24)

    assert superexec([4, 6]).fds_ok
    leak = superexec([4 + t // 2 for t in range(18)])  # 18 launches, a descriptor more every other one
    assert not leak.fds_ok and leak.fds_growth > 2


def test_a_process_started_late_is_judged_from_its_own_settling_and_a_short_one_not_at_all() -> None:
    late = judge(_ticks([200.0] * 81, first=120))  # a SuperLink restarted at round 120
    assert late.judged and late.reference == 140 and late.rss_ok
    short = judge(_ticks([200.0] * 25, first=190))
    assert not short.judged


def test_the_disk_verdict_follows_the_retention() -> None:
    def sizes(t: int) -> dict[str, int]:
        return {
            "run-main/rounds.jsonl": 4000 * t,
            "run-main/audit.jsonl": 1500 * t,
            "run-main/server.log": (300 * t) % 10000,  # rotated
            "run-main/server.log.1": 10000 if t > 30 else 0,
            "run-main/checkpoints/step-00000009/arrays.safetensors": 100,
            "run-main/checkpoints/step-00000010/arrays.safetensors": 100,
            "state-x/site-state/privacy_ledger.json": 400 * t,
            "fed/server/registry.json": 900,
            # Rewritten whole: a count's or an id's digits move it a byte (the 200-round soak's
            # outcome.json 223 -> 225, a site's node.json with its new node id after a restart).
            "run-main/outcome.json": 223 + (t > 50) + (t > 90),
        }

    by_tick = {t: sizes(t) for t in range(0, 101)}
    for t in range(26, 101):  # the release gate's record, first written at an evaluation after the settle
        by_tick[t]["state-x/site-state/released/evaluation.parquet"] = 3225
    ok = soak_watch.judge_disk(by_tick, 20, 100, log_max_bytes=10000, log_backups=3, keep_checkpoints=2)
    assert ok.ok, ok.detail()
    assert ok.records == {
        "run-main/rounds.jsonl": 4000,
        "run-main/audit.jsonl": 1500,
        "state-x/site-state/privacy_ledger.json": 400,
        "state-x/site-state/released/evaluation.parquet": 3225 / 80,
    }
    assert ok.checkpoints == {"run-main": 2}
    # Something else that grows, a log past its bound, a fifth backup, a third checkpoint: each fails.
    # A file that grows a byte a round is caught all the same (80 bytes over the 80 rounds judged).
    creeping = {t: {**v, "state-x/node.json": 250 + max(0, t - 20)} for t, v in by_tick.items()}
    verdict = soak_watch.judge_disk(creeping, 20, 100, log_max_bytes=10000, log_backups=3, keep_checkpoints=2)
    assert not verdict.ok and "state-x/node.json grows 1 B a round" in verdict.detail()
    for extra, what in (
        ({"state-x/cache/blob.bin": 0}, "state-x/cache/blob.bin grows"),
        ({"fed/server/nginx-access.log": 10000 + 65536 + 1}, "log fed/server/nginx-access.log"),
        ({"run-main/server.log.4": 10}, "run-main/server.log: 4 backups"),
        ({"run-main/checkpoints/step-00000008/arrays.safetensors": 100}, "run-main: 3 checkpoints"),
    ):
        bad = {t: dict(v) for t, v in by_tick.items()}
        for name, size in extra.items():
            bad[100][name] = size if size else 1
            if not size:  # grows round by round
                for t in range(20, 101):
                    bad[t][name] = 100 * t
        verdict = soak_watch.judge_disk(bad, 20, 100, log_max_bytes=10000, log_backups=3, keep_checkpoints=2)
        assert not verdict.ok and what in verdict.detail(), (what, verdict.detail())


def test_the_samples_are_read_from_proc_and_the_disk(tmp_path: Path) -> None:
    samples = soak_watch.sample_processes({"tests": os.getpid()})
    mine = [s for s in samples if s.pid == os.getpid()]
    assert (
        len(mine) == 1 and mine[0].rss_kib >= mine[0].anon_kib > 10 * MIB and mine[0].fds >= 3 and mine[0].threads >= 1
    )
    assert mine[0].key == f"tests/{mine[0].role}/{os.getpid()}"
    assert soak_watch.role_of("/usr/bin/python -m server.deploy.superlink_main --x flower-superlink") == "superlink"
    assert soak_watch.role_of("python -P -m client.deploy.warm_clientapp --run-id 7") == "clientapp"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.log").write_text("x" * 10)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "f.log")
    assert soak_watch.file_sizes({"w": tmp_path}) == {"w/a/f.log": 10}
