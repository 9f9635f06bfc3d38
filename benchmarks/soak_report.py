"""docs/performance.md's soak figures, written from a soak's JSON (benchmarks/soak.py --out), never by hand.

    python benchmarks/soak_report.py soak.json                              # print the figures
    python benchmarks/soak_report.py soak.json --docs docs/performance.md   # rewrite them there

In docs/performance.md the summary table's row that starts "| [a soak]" and the lines between
`<!-- soak figures: begin -->` and `<!-- soak figures: end -->` are replaced; the prose around them is
the page's own. The figures: the criteria as judged; every process judged, its RssAnon at its
reference tick (round 20 for one there from the start), at the main run's last round and its most
after the reference, descriptors and threads at the reference tick and at its last; each kind of
file's bytes at the end, growth a round and the retention that bounds it; the page's answer times
at the main run's last round and at the end; the DP site's epsilon in its ledger and on the page;
the machine's load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path[0:0] = [str(Path(__file__).resolve().parents[1])]

from healthfm_core.log_files import LOG_BACKUPS  # noqa: E402

SLOPE_SHOWN_MIB = 2.0  # a trend worth a line: past 10% of ~100 MiB within ~500 rounds
BEGIN, END = "<!-- soak figures: begin -->", "<!-- soak figures: end -->"
ROW = "| [a soak]"

# A file's kind by its path (soak_watch.py's names), the retention docs/coordinator.md and
# docs/site-admin.md document for it; first match wins.
KINDS: tuple[tuple[str, str, str], ...] = (
    (r"/checkpoints/", "checkpoints", "the last `keep-checkpoints` (default 2) kept per run"),
    (r"\.log(\.\d+)?$", "logs", "rotated at the bound, {backups} backups kept"),
    (r"rounds\.jsonl$", "rounds.jsonl", "kept whole: the run's record (grows by design)"),
    (r"audit\.jsonl$", "audit.jsonl", "kept whole: the run's audit chain (grows by design)"),
    (r"privacy_ledger", "privacy ledger", "kept whole: the site's DP account (grows by design)"),
    (r"/released/", "release record", "kept whole: what the site released (grows with subjects x fields)"),
    (r"launches\.jsonl$", "launches.jsonl", "kept whole: one line a launch"),
    (r"run-configs/", "run configs", "one file a launch"),
    (r"", "other", "fixed once written"),
)


def kind_of(name: str) -> tuple[str, str]:
    for pattern, kind, retention in KINDS:
        if re.search(pattern, name):
            return kind, retention.format(backups=LOG_BACKUPS)
    raise AssertionError("the last kind matches every name")


def process_rows(result: Mapping[str, Any]) -> list[str]:
    """One row per kind of process (every pid of a role: each site's, each restart's), its worst case.

    Every process's own figures stay in the run's JSON ("processes", "series")."""
    rows = [
        "| process | pids | RssAnon at reference (MiB) | worst ratio after it | fds reference -> last "
        "(most growth) | threads reference -> last (most growth) | judged |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for p in result["processes"]:
        if p["judged"]:
            kinds.setdefault(p["key"].split("/")[1], []).append(p)
    for kind, group in sorted(kinds.items()):
        worst = max(group, key=lambda p: p["anon_ratio"])
        refs = [p["anon_ref_mib"] for p in group]
        growth: dict[str, list[tuple[int, str]]] = {"fds": [], "threads": []}
        for p in group:
            last = result["series"][p["key"]][str(p["last"])]
            growth["fds"].append((last[2] - p["fds_ref"], f"{p['fds_ref']} -> {last[2]}"))
            growth["threads"].append((last[3] - p["threads_ref"], f"{p['threads_ref']} -> {last[3]}"))
        ok = all(p["rss_ok"] and p["fds_ok"] and p["threads_ok"] for p in group)
        rows.append(
            f"| {kind} | {len(group)} | {min(refs):,.1f}-{max(refs):,.1f} | x{worst['anon_ratio']:.3f} "
            f"({worst['key']} at tick {worst['anon_max_tick']}) | {max(growth['fds'])[1]} | "
            f"{max(growth['threads'])[1]} | {'pass' if ok else 'FAIL'} |"
        )
    return rows


def disk_rows(result: Mapping[str, Any]) -> list[str]:
    last: Mapping[str, int] = result["disk"]["last"]
    growth: dict[str, float] = {
        **result["disk"]["records_bytes_per_round"],
        **result["disk"]["logs_bytes_per_round"],
        **result["disk"]["unexpected_bytes_per_round"],
    }
    kinds: dict[str, dict[str, Any]] = {}
    for name, size in last.items():
        kind, retention = kind_of(name)
        k = kinds.setdefault(kind, {"files": 0, "bytes": 0, "largest": 0, "growth": 0.0, "retention": retention})
        k["files"] += 1
        k["bytes"] += size
        k["largest"] = max(k["largest"], size)
        k["growth"] += growth.get(name, 0.0)
    rows = [
        "| files | how many | bytes at the end | largest file | bytes a round (main run) | retention |",
        "|---|---|---|---|---|---|",
    ]
    for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"]):
        rows.append(
            f"| {kind} | {k['files']} | {k['bytes']:,} | {k['largest']:,} | {k['growth']:,.0f} | {k['retention']} |"
        )
    rows.append(f"| all | {len(last)} | {sum(last.values()):,} | | | |")
    return rows


def page_rows(result: Mapping[str, Any]) -> list[str]:
    rounds = int(result["config"]["rounds"])
    at_end = result["pages"].get(str(rounds), {})
    rows = [
        f"| page | first after round {rounds} | cached | first after each of rounds {rounds - 19}-{rounds}: "
        "median (most) | at the end: first | cached (median of 9) |",
        "|---|---|---|---|---|---|",
    ]
    for page, t in result["page_times"].items():
        main = at_end.get(page, [float("nan"), float("nan")])
        rows.append(
            f"| `{page}` | {main[0]:.0f} ms | {main[1]:.0f} ms | {t['in_flight_median']:.0f} ({t['in_flight_max']:.0f})"
            f" ms | {t['first']:.0f} ms | {t['cached']:.1f} ms |"
        )
    return rows


def load_figures(result: Mapping[str, Any], path: Path | None) -> str:
    """The 1-minute load average while the soak ran: at each tick (soak.py's `load_by_tick`), else
    sampled beside it into `path` (lines `HH:MM:SS L1 L5 L15 ...`)."""
    loads = [float(v) for v in result.get("load_by_tick", {}).values()]
    if not loads and path is not None:
        loads = [float(line.split()[1]) for line in path.read_text().splitlines() if len(line.split()) >= 2]
    if not loads:
        return "not sampled"
    return (
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f}, median {statistics.median(loads):.1f} "
        f"({len(loads)} samples)"
    )


def epsilon_figures(result: Mapping[str, Any]) -> str:
    detail = result["criteria"]["epsilon"]["detail"]
    return f"{result['config']['dp_site']}: {detail}"


def figures(result: Mapping[str, Any], load_log: Path | None) -> list[str]:
    c, m = result["config"], result["machine"]
    lines = [
        f"Measured {m['date']} at commit {m['commit']}, {m['cores']} cores, Python {m['python']}; "
        f"{c['rounds']} rounds, evaluation every {c['eval_every']}, {c['local_steps']} local steps, "
        f"{c['subjects']} subjects a site, {c['dp_site']} under DP, site restart at round {c['site_restart']}, "
        f"SuperLink restart at {c['superlink_restart']}, {c['runs']} launches at the end; "
        f"{result['wall_s'] / 60:.0f} min; load while it ran: {load_figures(result, load_log)}.",
        "",
        "| criterion | verdict | figures |",
        "|---|---|---|",
        *(f"| {name} | {'pass' if v['pass'] else 'FAIL'} | {v['detail']} |" for name, v in result["criteria"].items()),
        "",
        "Timeline (a tick is a round of the main run, then a launch): "
        + "; ".join(f"tick {t['tick']}: {t['what']}" for t in result["timeline"])
        + ".",
        "",
        "Every process judged, by kind (RssAnon: its own memory; VmRSS adds mapped libraries' pages; "
        "each pid's figures are in the JSON):",
        "",
        *process_rows(result),
        "",
        "Trends: RssAnon's least-squares slope from the reference round, MiB a 100 rounds, where at least "
        f"{SLOPE_SHOWN_MIB:g}: "
        + (
            ", ".join(
                f"{p['key']} {p['anon_slope_mib_per_100']:+.1f} (from {p['anon_ref_mib']:,.1f})"
                for p in sorted(result["processes"], key=lambda p: -abs(p["anon_slope_mib_per_100"]))
                if p["judged"] and abs(p["anon_slope_mib_per_100"]) >= SLOPE_SHOWN_MIB
            )
            or "none"
        )
        + ".",
        "",
        "Disk at the end, by kind of file:",
        "",
        *disk_rows(result),
        "",
        "The page's answer times (`/` the page, `/panels` what its script polls, `/metrics` a scrape):",
        "",
        *page_rows(result),
        "",
        f"Epsilon: {epsilon_figures(result)}.",
    ]
    return lines


def summary_row(result: Mapping[str, Any]) -> str:
    c = result["criteria"]
    verdicts = ", ".join(f"{k} {'pass' if v['pass'] else 'FAIL'}" for k, v in c.items())
    worst = max((p["anon_ratio"] for p in result["processes"] if p["judged"]), default=0.0)
    end = result["page_times"].get("/", {})
    return (
        "| [a soak](#a-soak) | a deployed federation for "
        f"{result['config']['rounds']} rounds and {result['config']['runs']} runs: every process's memory, "
        "descriptors and threads, disk, the page, epsilon | each process at its reference round (round 20) "
        f"| `python benchmarks/soak.py --rounds {result['config']['rounds']} --eval-every "
        f"{result['config']['eval_every']} --runs {result['config']['runs']}` | "
        f"2-core VM: {verdicts}; RssAnon at most x{worst:.3f} of its reference round; the page {end.get('first', 0):.0f} ms "
        f"first, {end.get('cached', 0):.1f} ms cached after {result['config']['runs']} runs |"
    )


def rewrite(doc: Path, result: Mapping[str, Any], load_log: Path | None) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} to write the figures between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + BEGIN + "\n" + "\n".join(figures(result, load_log)) + "\n" + END + tail
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(ROW)]
    if len(at) != 1:
        raise SystemExit(f"{doc}: {len(at)} summary rows start with {ROW!r}, expected 1")
    lines[at[0]] = summary_row(result)
    doc.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="the soak's JSON (benchmarks/soak.py --out)")
    p.add_argument("--load-log", type=Path, help="the load average sampled while it ran (`date; cat /proc/loadavg`)")
    p.add_argument("--docs", type=Path, help="rewrite the figures in this file (docs/performance.md)")
    args = p.parse_args()
    result = json.loads(args.result.read_text())
    if args.docs:
        rewrite(args.docs, result, args.load_log)
        print(f"written: {args.docs}")
    else:
        print(summary_row(result))
        print("\n".join(figures(result, args.load_log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
