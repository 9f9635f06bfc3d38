"""A deployed federation's rounds, timed: local training against everything else, cold vs warm sites.

    nice -n 5 python benchmarks/federation_round.py                 # 3 rounds cold, then 3 warm
    nice -n 5 python benchmarks/federation_round.py --modes warm --rounds 4 --local-steps 50
    python benchmarks/federation_round.py --modes warm --states file memory --rounds 5
    nice -n 5 python benchmarks/federation_round.py --modes warm --secure --rounds 3 --local-steps 10 --eval-tasks ""
    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/federation_round.py --modes warm --secure --dead-site \
        --model small --rounds 4 --local-steps 10 --eval-tasks "" --threads 1     # issue 45's three targets

A real deployment on 127.0.0.1, started as the slow tests start it (tests/helpers/deploy_fixtures.py):
`coordinator provision`, `coordinator superlink` (TLS, SuperNode authentication, the nginx proxy
in front of the Fleet API), `coordinator register`, the federation's bundle approved in the sites'
policy (`client.py approve`), and three synthetic `tiny`-scenario sites (biobank, hospital,
genomics) joined with `client.py join`. For each mode in --modes the sites join with
`--clientapp MODE` (cold: a new flwr-clientapp per message, Flower's way; warm: one ClientApp
process per run, client/deploy/warm_clientapp.py), one run of --rounds rounds of the `tiny` model at
--local-steps is launched and waited for, and the sites leave. For each SuperLink store in
--states (`coordinator superlink --state`: memory, the default, Flower's in-memory store; file,
FED/server/superlink.db through Flower's SQL layer) a SuperLink is started and the modes run
against it. Everything runs in this one invocation, so it sees the same machine.

Per round, from the run's rounds.jsonl (server/server_app.py): the round's wall time (the
ServerApp configuring the round to its configuring the next; the last round to its checkpoint
written), the slowest site's local training (`train_seconds` of its reply; a DP site sends none,
and the column then reads "-"), and "other" = round - slowest training: message transport,
Flower's polling, the ClientApp's start, data loading, vocabulary mapping, model building,
aggregation (a round's checkpoint is written while the next round is out, off its path). The share
printed is other / round. --secure: each mode runs a second time under secure aggregation
(`secure-aggregation=true`, `secagg-min-holders=2` so that the groups two of the three sites hold
are unmasked too: every group's protocol runs; the sites' policy lowers their own floor,
`secagg_min_holders: 2`, to accept it), its label suffixed `-secure`; the summary gives
its round time over the plain run's (issue 45: <= 1.15 at `small`, 10 local steps; with
`secagg-key-rounds`, default 8, the rounds after the first run on keys the first round made: two
exchanges more than a plain round's one; --secagg-key-rounds 1 times every round with its own keys). --dead-site: one
more warm plain run of 2 rounds in which hospital's `join` and everything below it are killed
(SIGKILL, no goodbye) as its SuperNode logs round 2's train message; the time from the kill to the
server naming it (the SuperLink's "Node Unavailable" reply: rounds.jsonl `sent_at` +
`reply_after_seconds`) is a dead site's cost to a round (issue 45: <= 10 s; the SuperLink expires a
site 2 x its heartbeat interval after its last heartbeat, 8 s at `join`'s 4 s, client/deploy/heartbeat.py). Targets:
other <= 5% of a warm plain round after the first (issue 45; issue 13 asked 10% at 50 local steps
on tiny). The last lines put the three side by side.

Then "other" by hop, for the site whose reply came last (benchmarks/round_hops.py: from the
ServerApp's rounds.jsonl and the sites' SuperNode and app-guard logs, on this machine's clock):
the ServerApp's configure and push, the SuperNode's poll, the guard's hand-over, the ClientApp's
pull of the message, its handler less training, training, the reply's way back, aggregation and
checkpoint. The hops sum to the round. Last, the Flower objects per message (rounds.jsonl
objects_sent / objects_received): each is one request per hop (healthfm_core/packing.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers.deploy_fixtures import (  # noqa: E402
    CLIENT,
    SITES,
    Process,
    join_args,
    round_events,
    site_policy,
    start_registered_superlink,
)
from helpers.process_faults import Background, kill_hard  # noqa: E402
from round_hops import HOPS, round_hops, site_logs  # noqa: E402

from server.deploy.commands import main as coordinator_main  # noqa: E402
from server.deploy.provision import FederationPaths  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402


def run_config(local_steps: int, eval_tasks: str, model: str = "tiny") -> list[str]:
    return [
        "--model",
        model,
        "-c",
        f"local-steps={local_steps}",
        "-c",
        "min-nodes=3",
        "-c",
        "vocab-min-subjects=5",
        "-c",
        f"eval-tasks={eval_tasks}",
        "-c",
        "eval-n-boot=10",
        "-c",
        "timeout-s=900",
    ]


def provision(work: Path) -> FederationPaths:
    fed = FederationPaths(root=work / "fed")
    rc = coordinator_main(["provision", str(fed.root), *[a for s in SITES for a in ("--site", s)]])
    if rc != 0:
        raise SystemExit(f"provision failed ({rc})")
    # The sites' own floor (secagg_min_holders, default 3) would refuse --secure's
    # secagg-min-holders=2: these sites accept it, so that every group's protocol is timed.
    site_policy(fed).write_text("min_subjects: 1\nsecagg_min_holders: 2\n")
    return fed


TRAIN_RECEIVED = "Receiving: train message"  # a SuperNode's line as a round's train message arrives
DEAD_SITE = "hospital"
DEAD_ROUND = 2  # killed as this round's train message arrives: it trained the round before


def kill_in_round(proc: Process, state: Path, run: Background, rnd: int) -> float:
    """SIGKILL `proc` (a site's join) once its SuperNode log (STATE/supernode.log, from now on)
    shows round `rnd`'s train message arriving; the wall clock of the kill."""
    log = state / "supernode.log"
    offset = log.stat().st_size if log.is_file() else 0
    while True:
        text = log.read_text(errors="replace")[offset:] if log.is_file() else ""
        if text.count(TRAIN_RECEIVED) >= rnd:
            killed_at = time.time()
            kill_hard(proc)
            return killed_at
        if not run.thread.is_alive():
            raise SystemExit(f"the run ended before {DEAD_SITE} got round {rnd}'s train message")
        time.sleep(0.02)


def noticed_after(event: dict, site: str, killed_at: float) -> float | None:
    """Seconds from the kill to the server having the SuperLink's answer for the dead site."""
    entry = event["sites"].get(site, {})
    if "reply_after_seconds" not in entry or "sent_at" not in event.get("timings", {}):
        return None
    return float(event["timings"]["sent_at"] + entry["reply_after_seconds"] - killed_at)


def one_mode(
    mode: str,
    fed: FederationPaths,
    address: str,
    roots: dict[str, Path],
    work: Path,
    args: argparse.Namespace,
    dead: dict[str, float] | None = None,
) -> list[dict]:
    """One run of `mode` sites against the SuperLink at `address`; `mode` also names the log files
    under `work` (e.g. warm-memory). With `dead` (a dict to fill), DEAD_SITE is killed in round
    DEAD_ROUND and `dead` gets how soon the server named it and that round's wait."""
    clientapp = mode.split("-")[0]
    joins: dict[str, Process] = {}
    try:
        for name in SITES:
            joins[name] = Process(
                [
                    sys.executable,
                    str(CLIENT),
                    *join_args(fed, roots[name], name, address, work / f"state-{mode}-{name}"),
                    "--clientapp",
                    clientapp,
                    *(["--threads", str(args.threads)] if args.threads else []),
                ],
                work / f"join-{mode}-{name}.out",
            )
        for name, proc in joins.items():
            if not proc.wait_for("joined: SuperNode", 600):
                raise SystemExit(f"{name} did not join:\n{proc.output()[-3000:]}")
        out = work / f"run-{mode}"
        t0 = time.perf_counter()
        launch = Background(
            "launch",
            str(fed.root),
            "--out-dir",
            str(out),
            "--rounds",
            str(DEAD_ROUND if dead is not None else args.rounds),
            *run_config(args.local_steps, args.eval_tasks, args.model),
            *(secure_config(args.secagg_key_rounds) if mode.endswith("-secure") else []),
            *[arg for item in args.run_config for arg in ("-c", item)],
            "--wait",
            "--timeout",
            "3000",
            timeout=3300,
        )
        if dead is not None:
            dead["killed_at"] = kill_in_round(joins[DEAD_SITE], work / f"state-{mode}-{DEAD_SITE}", launch, DEAD_ROUND)
        launch.join(3400)
        result = launch.result
        assert result is not None
        wall = time.perf_counter() - t0
        if result.returncode != 0 and not (dead is not None and result.returncode == 4):  # 4: the killed site is lost
            print(
                f"\n{mode}: the run failed ({result.returncode}): {(result.stdout + result.stderr)[-1500:]}", flush=True
            )
        if not (out / "rounds.jsonl").is_file():
            return []
        events, rounds = round_events(out)
        if dead is not None and DEAD_ROUND in rounds:
            event = rounds[DEAD_ROUND]
            dead["wait_s"] = float(event["timings"]["wait_seconds"])
            if (after := noticed_after(event, DEAD_SITE, dead["killed_at"])) is not None:
                dead["noticed_s"] = after
            entry = event["sites"].get(DEAD_SITE, {})
            print(f"\n{mode}: {DEAD_SITE} killed in round {DEAD_ROUND}: {entry.get('status')} ({entry.get('reason')})")
            return []  # its rounds are not the plain ones
        logs = {name: site_logs(work / f"state-{mode}-{name}") for name in SITES}
        setup = next((e for e in events if e["event"] == "setup"), {})
        evaluation = next((e for e in events if e["event"] == "evaluate"), {})
        print(
            f"\n{mode}: run wall {wall:.1f} s (launch to outcome); round 0 (setup) {setup.get('seconds', float('nan')):.1f} s; "
            f"evaluation {evaluation.get('seconds', float('nan')):.1f} s",
            flush=True,
        )
        rows = []
        for rnd in sorted(rounds):
            t = rounds[rnd].get("timings", rounds[rnd])
            train = [e.get("train_seconds") for e in rounds[rnd]["sites"].values()]
            known = [x for x in train if x is not None]
            client = [e.get("client_seconds") for e in rounds[rnd]["sites"].values()]
            row = {
                "mode": mode,
                "round": rnd,
                "round_s": float(t["round_seconds"]),
                "wait_s": float(t["wait_seconds"]),
                # on the round's path: the checkpoint only where it was written between rounds
                "server_s": float(
                    t["configure_seconds"]
                    + t["aggregate_seconds"]
                    + (t["checkpoint_seconds"] if t.get("checkpoint_on_path", True) else 0.0)
                ),
                "client_max_s": max((x for x in client if x is not None), default=None),
                "train_max_s": max(known) if known else None,
                "other_s": float(t["round_seconds"]) - (max(known) if known else 0.0),
                # Flower objects per message (each its own request): the largest train message, reply
                "objects_sent": max((e.get("objects_sent", 0) for e in rounds[rnd]["sites"].values()), default=0),
                "objects_received": max(
                    (e.get("objects_received", 0) for e in rounds[rnd]["sites"].values()), default=0
                ),
                # The slowest site's message alone (server/exchange.py push_first_alone)
                "alone_s": float(t.get("first_alone_seconds") or 0.0),
                "delivered": t.get("first_delivered"),
            }
            if not mode.endswith("-secure"):  # round_hops reads one train exchange; a secure round has four
                row.update(critical_path(rnd, rounds[rnd], logs))
            else:  # each stage's messages out to its last reply (server/secure_round.py)
                row["stages"] = (rounds[rnd].get("secure_aggregation") or {}).get("stage_seconds") or {}
            rows.append(row)
        if args.keep:
            print(f"{mode}: logs under {work}")
        return rows
    finally:
        for proc in joins.values():
            proc.stop()


def critical_path(rnd: int, event: dict, logs: dict) -> dict:
    """The hops of the site whose reply came last in round `rnd` (round_hops.py)."""
    replied = {s: e["reply_after_seconds"] for s, e in event["sites"].items() if "reply_after_seconds" in e}
    if "sent_at" not in event.get("timings", {}) or not replied:
        return {}
    site = max(replied, key=lambda s: replied[s])
    nodes, warms = logs.get(site, ([], []))
    node = nodes[rnd - 1] if len(nodes) >= rnd else None
    warm = warms[rnd - 1] if len(warms) >= rnd else None
    return {"last_site": site, "hops": round_hops(rnd, event, node, warm, site)}


def print_hops(rows: list[dict]) -> None:
    print(
        "\nwhere a round goes, for the site whose reply came last (seconds; the hops sum to round_s):"
        "\nconfigure/push: the ServerApp; node_poll: until the SuperNode pulls the message; guard: until"
        "\nthe app guard hands the task over; app_pull: until the ClientApp has the message; handler:"
        "\nthe ClientApp less training; train; app_push/node_send: the reply to the SuperNode, then to"
        "\nthe SuperLink; server_pull: until the ServerApp has it; after: aggregation (and checkpoint)."
        "\n(node_receive: the SuperNode pulling the message's objects, overlapping guard and app_pull)"
    )
    names = [*HOPS, "node_receive"]
    print(f"{'mode':<11} round  site       " + " ".join(f"{h:>11}" for h in names))
    for r in rows:
        hops = r.get("hops")
        if not hops:
            continue
        cells = " ".join(f"{hops[h]:11.2f}" if hops.get(h) is not None else f"{'-':>11}" for h in names)
        print(f"{r['mode']:<11} {r['round']:>5}  {r['last_site']:<10} {cells}")


def secure_config(key_rounds: int | None) -> list[str]:
    """A secure run's run config: every group's protocol runs (secagg-min-holders=2, the docstring)."""
    rounds = ["-c", f"secagg-key-rounds={key_rounds}"] if key_rounds is not None else []
    return ["-c", "secure-aggregation=true", "-c", "secagg-min-holders=2", *rounds]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    p.add_argument(
        "--states",
        nargs="+",
        choices=("file", "memory"),
        default=["memory"],
        help="the SuperLink's store (coordinator superlink --state), one SuperLink each (default: memory)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=50)
    p.add_argument("--subjects", type=int, default=30, help="subjects per synthetic site")
    p.add_argument("--threads", type=int, default=None, help="join --threads (default: the sites' auto)")
    p.add_argument("--eval-tasks", default="onset_hypertension_365d")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--model", default="tiny", help="the run's model (configs/model/)")
    p.add_argument("--secure", action="store_true", help="each mode also under secure aggregation (docstring)")
    p.add_argument(
        "--secagg-key-rounds",
        type=int,
        default=None,
        help="the secure runs' secagg-key-rounds (default: the run config's, 8; 1: every round its own keys)",
    )
    p.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more run config entry for every run (coordinator launch -c), e.g. transport=fp16",
    )
    p.add_argument(
        "--dead-site", action="store_true", help="one more warm run in which a site is killed mid-round (docstring)"
    )
    args = p.parse_args()
    if args.rounds < 2 or args.local_steps < 1:
        p.error("--rounds >= 2 (the target is about rounds after the first), --local-steps >= 1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="healthfm-fedround-")
    work = Path(tmp)
    manifest = generate_federation(work / "data", scenario="tiny", seed=0, n_subjects=args.subjects, progress=False)
    roots = {s.name: Path(s.root) for s in manifest.sites}
    print(
        f"federation on 127.0.0.1: {len(SITES)} sites ({args.subjects} subjects each), model {args.model}, "
        f"{args.rounds} rounds x {args.local_steps} local steps per mode; cores {len(os.sched_getaffinity(0))}, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    fed = provision(work)
    rows: list[dict] = []
    labels: list[str] = []
    dead: dict[str, float] = {}
    try:
        for state in args.states:
            superlink, address = start_registered_superlink(fed, "--state", state, out=work / f"superlink-{state}.out")
            try:
                for mode in args.modes:
                    for secure in ("", "-secure") if args.secure else ("",):
                        labels.append(label := f"{mode}-{state}{secure}")
                        rows += one_mode(label, fed, address, roots, work, args)
                if args.dead_site and state == args.states[0]:
                    one_mode(f"warm-{state}-dead", fed, address, roots, work, args, dead)
            finally:
                superlink.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        "\nround_s: the round at the server, to the next round's start; wait_s: messages out to the last reply;"
        "\nserver_s: configure + aggregate (+ checkpoint, where it was not written while the next round was out);"
        "\nclient_max_s: the slowest site's ClientApp handler (data, model, training);"
        "\ntrain_max_s: the slowest site's training loop; other_s = round_s - train_max_s"
    )
    print(f"\n{'mode':<11} round  round_s  wait_s  server_s  client_max_s  train_max_s  other_s  other_share")

    def cell(x: float | None, width: int) -> str:
        return f"{x:{width}.2f}" if x is not None else f"{'-':>{width}}"

    for r in rows:
        print(
            f"{r['mode']:<11} {r['round']:>5} {r['round_s']:8.2f} {r['wait_s']:7.2f} {r['server_s']:9.2f} "
            f"{cell(r['client_max_s'], 13)} {cell(r['train_max_s'], 12)} {r['other_s']:8.2f} "
            f"{r['other_s'] / r['round_s']:11.1%}"
        )
    print_hops(rows)
    print("\nFlower objects per message (each moved by its own request; largest over the sites):")
    for r in rows:
        print(f"  {r['mode']} round {r['round']}: train message {r['objects_sent']}, reply {r['objects_received']}")
    print("\nthe slowest site's message alone before the others were pushed (server/exchange.py head_start_seconds):")
    for r in rows:
        how = {None: "nobody held back", True: "until its site had it", False: "until the bound"}[r["delivered"]]
        print(f"  {r['mode']} round {r['round']}: {r['alone_s']:.2f} s, {how}")
    print("\nafter the first round (median other share; target <= 5% warm, issue 45):")
    summary = {}
    for mode in labels:
        if mode.endswith("-secure"):  # its replies carry no training time: no "other" to tell
            continue
        later = [r for r in rows if r["mode"] == mode and r["round"] > 1]
        if not later:
            print(f"  {mode}: no round after the first completed")
            continue
        share = statistics.median(r["other_s"] / r["round_s"] for r in later)
        other = statistics.median(r["other_s"] for r in later)
        summary[mode] = other
        print(
            f"  {mode}: other {other:.1f} s per round, {share:.1%} of a round ({'met' if share <= 0.05 else 'NOT met'})"
        )
    for state in args.states:  # ratios within this run
        cold, warm = summary.get(f"cold-{state}"), summary.get(f"warm-{state}")
        if cold and warm:
            print(f"  {state}: warm/cold other time x{warm / cold:.2f}")
    for label in labels:  # issue 45: a secure round <= 1.15 x the plain one
        if (ratio := secure_ratio(rows, label)) is not None:
            print(f"  {label}: secure/plain round time x{ratio:.2f} ({'met' if ratio <= 1.15 else 'NOT met'}: <= 1.15)")
    for mode in args.modes:
        file, memory = summary.get(f"{mode}-file"), summary.get(f"{mode}-memory")
        if file and memory:
            print(f"  {mode}: memory/file other time x{memory / file:.2f}")
    print_targets(rows, dead, args)
    return 0


def secure_ratio(rows: list[dict], label: str) -> float | None:
    """Median secure round over median plain round of `label`, rounds after the first."""
    secure = [r["round_s"] for r in rows if r["mode"] == f"{label}-secure" and r["round"] > 1]
    plain = [r["round_s"] for r in rows if r["mode"] == label and r["round"] > 1]
    return statistics.median(secure) / statistics.median(plain) if secure and plain else None


def print_targets(rows: list[dict], dead: dict[str, float], args: argparse.Namespace) -> None:
    """Issue 45's three targets, side by side (warm sites, the first SuperLink store)."""
    label = f"warm-{args.states[0]}"
    plain = [r for r in rows if r["mode"] == label and r["round"] > 1]
    secure = [r for r in rows if r["mode"] == f"{label}-secure" and r["round"] > 1]
    ratio = secure_ratio(rows, label)
    overhead = statistics.median(r["other_s"] / r["round_s"] for r in plain) if plain else None

    def verdict(value: float | None, target: float) -> str:
        return "-" if value is None else ("met" if value <= target else "NOT met")

    print(
        f"\nissue 45, {label}, model {args.model}, {args.local_steps} local steps (medians of rounds after the first):"
    )
    print(f"{'':<46}{'plain':>8}{'secure':>8}   {'measured':<19}{'target':<10}")
    ratio_text = f"secure/plain x{ratio:.2f}" if ratio is not None else "-"
    print(
        f"{'round (s)':<46}{cell(plain, 'round_s')}{cell(secure, 'round_s')}   {ratio_text:<19}{'<= x1.15':<10}{verdict(ratio, 1.15)}"
    )
    print(f"{'  the slowest site training (s)':<46}{cell(plain, 'train_max_s')}{'-':>8}")
    share_text = f"plain {overhead:.1%}" if overhead is not None else "-"
    print(
        # a secure reply carries no training time (server/secure_round.py): its rest is not known
        f"{'  the rest: configure, push, pull, aggr., ckpt':<46}{cell(plain, 'other_s')}{'-':>8}   "
        f"{share_text:<19}{'<= 5%':<10}{verdict(overhead, 0.05)}"
    )
    stages = [r["stages"] for r in secure if r.get("stages")]
    if stages:
        medians = {k: statistics.median(st[k] for st in stages if k in st) for k in stages[0]}
        print(f"{'  secure stages (s): ' + ', '.join(f'{k} {v:.2f}' for k, v in medians.items())}")
    noticed = dead.get("noticed_s")
    noticed_text = f"{noticed:.1f} s" if noticed is not None else "-"
    print(
        f"{'a dead site named, after its kill':<46}{'':>16}   {noticed_text:<19}{'<= 10 s':<10}{verdict(noticed, 10.0)}"
    )
    if "wait_s" in dead:
        print(f"{'  its round: messages out to the end (s)':<46}{dead['wait_s']:8.2f}")


def cell(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.median(values):8.2f}" if values else f"{'-':>8}"


if __name__ == "__main__":
    sys.exit(main())
