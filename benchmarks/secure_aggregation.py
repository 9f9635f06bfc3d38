"""Secure aggregation's cost against plain int8 transport, in the same run: per-site compute and
bytes, and the server's compute, for the `tiny` and `small` models and 3, 4, 6 and 12 sites.

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/secure_aggregation.py
    python benchmarks/secure_aggregation.py --models tiny --sites 3 --json out.json

Every site holds every group (the largest vector a site sends) and trains the full round (count =
weight_max); its update is N(0, 1e-3) per value of the model's initial weights.

Plain (int8), per site: `encode_update(..., "int8")` and `pack_arrays` (what a site does after
training); bytes: the packed blob plus the scales record (8 bytes and the key per tensor). Server:
`decode_update` of every reply and ModalityAwareFedAvg's `average`.
Secure (secure_aggregation/), per site: every stage (advertise, share_keys, mask, unmask); bytes:
what the site sends (`wire_bytes` of its four messages; the same raw-payload measure, Flower's
framing left out on both sides), and beside it what it receives besides the global arrays (key
directory, share inbox, unmask request). Server: all four stages.

Only compute is measured: the protocol's three extra message exchanges (keys, shares, unmask)
each cost a SuperLink round trip in a deployment, which this script cannot see.

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/secure_aggregation.py --rounds

--rounds: the wired round end to end instead (server/secure_round.py against server/round.py): the
real FederationServer and each site's real ClientApp called in this process (tests/helpers/in_process_grid.py,
the grid the secure round's default tests use; no SuperLink, so no network round trips: sites run one
after another and a round's wall time is the sum of theirs plus the server's). N synthetic sites of
every modality (the `tiny` scenario's biobank, --n-subjects each), --train-rounds rounds of
`tiny`/`small` at 2 local steps x batch 8, seed 3, no evaluation. Per configuration (plain fp32,
plain int8, secure) and --repeats, alternating so drift hits all alike: the last round's wall and CPU
time (process CPU: sites and server, both in this process) and, per site, the bytes the server
received from it and sent to it (rounds.jsonl, Flower's message framing included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.protocol.packing import pack_arrays  # noqa: E402
from healthfm_core.protocol.transport import decode_update, encode_update  # noqa: E402
from healthfm_core.terms.groups import GROUPS, parameter_group  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from secure_aggregation.config import SecAggConfig  # noqa: E402
from secure_aggregation.server import ServerRound  # noqa: E402
from secure_aggregation.site import SiteRound  # noqa: E402
from server.strategy import ModalityAwareFedAvg  # noqa: E402

WEIGHT_MAX = 10 * 16  # the default round: 10 local steps x batch 16


def model_arrays(name: str) -> dict[str, np.ndarray]:
    model = HealthFM(load_model_config(name), vocab_size=2000, n_prs_traits=4)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def plain_round(received: dict[str, np.ndarray], trained: dict[int, dict[str, np.ndarray]]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    site_s, site_bytes, replies = [], [], []
    for node, arrays in trained.items():
        start = time.perf_counter()
        encoded = encode_update(arrays, received, "int8", rng=rng)
        blob = pack_arrays(encoded.arrays)
        site_s.append(time.perf_counter() - start)
        scales = encoded.scales or {}
        site_bytes.append(sum(b.nbytes for b in blob.values()) + sum(8 + len(k) for k in scales))
        replies.append((node, encoded))
    start = time.perf_counter()
    accepted = [
        (node, SimpleNamespace(arrays=decode_update(e.arrays, e.scales, received)), dict.fromkeys(GROUPS, WEIGHT_MAX))
        for node, e in replies
    ]
    ModalityAwareFedAvg().average(accepted, received)  # type: ignore[arg-type]
    server_s = time.perf_counter() - start
    return {"site_s": statistics.median(site_s), "site_bytes": max(site_bytes), "server_s": server_s}


def secure_round(received: dict[str, np.ndarray], trained: dict[int, dict[str, np.ndarray]]) -> dict[str, Any]:
    nodes = sorted(trained)
    sizes: dict[str, int] = {}
    for key, value in received.items():
        sizes[parameter_group(key)] = sizes.get(parameter_group(key), 0) + value.size
    updates = {n: {k: v.astype(np.float64) - received[k] for k, v in arrays.items()} for n, arrays in trained.items()}
    config = SecAggConfig(
        round=1,
        sample=nodes,
        groups={n: list(GROUPS) for n in nodes},
        group_sizes=sizes,
        threshold=len(nodes) // 2 + 1,
        min_holders=min(3, len(nodes)),
        clip_norm=dict.fromkeys(GROUPS, 10.0),
        value_range=dict.fromkeys(GROUPS, 0.01),
        weight_max=WEIGHT_MAX,
    )
    site_s = dict.fromkeys(nodes, 0.0)
    sent = dict.fromkeys(nodes, 0)
    got = dict.fromkeys(nodes, 0)

    def timed(node: int, step: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = step(*args)
        site_s[node] += time.perf_counter() - start
        sent[node] += out.wire_bytes()
        return out

    server_s = 0.0

    def served(step: Any, *args: Any) -> Any:
        nonlocal server_s
        start = time.perf_counter()
        out = step(*args)
        server_s += time.perf_counter() - start
        return out

    sites = {}
    for n in nodes:
        start = time.perf_counter()
        sites[n] = SiteRound(config, n, site_min_holders=config.min_holders)  # the benchmark's sites accept it
        site_s[n] += time.perf_counter() - start
    server = ServerRound(config)
    directory = served(server.key_directory, [timed(n, sites[n].advertise) for n in nodes])
    inboxes = served(server.route_shares, [timed(n, sites[n].share_keys, directory) for n in nodes])
    counts = dict.fromkeys(GROUPS, WEIGHT_MAX)
    request = served(server.unmask_request, [timed(n, sites[n].mask, inboxes[n], updates[n], counts) for n in nodes])
    result = served(server.aggregate, [timed(n, sites[n].unmask, request) for n in nodes])
    for n in nodes:
        got[n] = directory.wire_bytes() + inboxes[n].wire_bytes() + request.wire_bytes()
    plain = {g: np.mean([np.concatenate([updates[n][k].ravel() for k in sorted(updates[n]) if parameter_group(k) == g]) for n in nodes], axis=0) for g in GROUPS}  # fmt: skip
    worst = max(float(np.abs(result.means[g] - plain[g]).max() / result.error_bounds[g]) for g in result.means)
    return {
        "site_s": statistics.median(site_s.values()),
        "site_s_max": max(site_s.values()),
        "site_bytes": max(sent.values()),
        "site_bytes_in": max(got.values()),
        "server_s": server_s,
        "error_over_bound": worst,
    }


def every_modality_scenario(count: int) -> dict[str, Any]:
    """`count` copies of the tiny scenario's biobank, each holding every modality (so every group is
    unmasked: the largest round the protocol runs)."""
    import yaml

    scenario = yaml.safe_load((REPO / "configs" / "scenario" / "tiny.yaml").read_text())
    biobank = next(s for s in scenario["sites"] if s["name"] == "biobank")
    modalities = {"ehr": 1.0, "wearables": 1.0, "genomics": 1.0}
    sites = [{**biobank, "name": f"site{i:02d}", "modalities": modalities} for i in range(1, count + 1)]
    return {**scenario, "name": f"tiny-every-modality-{count}", "sites": sites}


def timed_rounds(module: Any, names: list[str]) -> tuple[list[dict[str, float]], Callable[[], None]]:
    """Wrap `module`'s round functions to record each call's wall and process CPU time; the list
    filled and a function that puts the originals back."""
    calls: list[dict[str, float]] = []
    originals = {name: getattr(module, name) for name in names}

    def wrap(fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            calls.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
            return out

        return timed

    def restore() -> None:
        for name, fn in originals.items():
            setattr(module, name, fn)

    for name, fn in originals.items():
        setattr(module, name, wrap(fn))
    return calls, restore


def federation_round(
    model: str, node_configs: dict[int, dict[str, Any]], out: Path, train_rounds: int, **settings: Any
) -> dict[str, Any]:
    """One run of the real FederationServer over an in-process grid; its last round's times and
    the per-site bytes from rounds.jsonl."""
    sys.path.insert(0, str(REPO / "tests"))
    import pytest
    from helpers.in_process_grid import InProcessGrid, set_serverapp_identity

    import server.server_app as server_app
    from server.config import FederationConfig
    from server.runlog import read_events

    cfg = FederationConfig(
        out_dir=out,
        model=load_model_config(model),
        rounds=train_rounds,
        local_steps=2,
        batch_size=8,
        max_events=64,
        max_patches=8,
        seed=3,
        min_nodes=len(node_configs),
        vocab_min_subjects=5,
        eval_tasks=[],
        timeout_s=600,
        server_optimizer=None,
        **settings,
    )
    calls, restore = timed_rounds(server_app, ["run_round", "run_secure_round"])
    try:
        with pytest.MonkeyPatch.context() as mp:
            set_serverapp_identity(mp)
            server_app.FederationServer(InProcessGrid(node_configs), cfg, run_id=1).run()
    finally:
        restore()
    events = [e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"]
    last = events[-1]
    assert len(calls) == train_rounds and last.get("updated", True) is not False, last
    assert all(e["status"] == "ok" for e in last["sites"].values()), last["sites"]
    if settings.get("secure_aggregation"):
        assert "error" not in last["secure_aggregation"] and not last["secure_aggregation"]["withheld"], last
    return {
        **calls[-1],
        "bytes_in": statistics.median(e["bytes_received"] for e in last["sites"].values()),
        "bytes_out": statistics.median(e["bytes_sent"] for e in last["sites"].values()),
    }


ROUND_SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"transport": "fp32"},
    "int8": {"transport": "int8"},
    "secure": {"secure_aggregation": True},
}


def rounds_main(args: argparse.Namespace) -> None:
    from simulations.synthetic import generate_federation

    rows = []
    with tempfile.TemporaryDirectory(prefix="secagg-rounds-") as tmp:
        work = Path(tmp)
        manifest = generate_federation(
            work / "data", every_modality_scenario(max(args.sites)), seed=0, n_subjects=args.n_subjects, progress=False
        )
        node_configs = {
            100 + i: {"site-root": str(s.root), "site-name": s.name, "min-code-subjects": 5, "min-report-subjects": 2}
            for i, s in enumerate(manifest.sites)
        }
        for model in args.models:
            for count in args.sites:
                nodes = dict(list(node_configs.items())[:count])
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ROUND_SETTINGS}
                for rep in range(args.repeats):
                    order = list(ROUND_SETTINGS) if rep % 2 == 0 else list(reversed(ROUND_SETTINGS))
                    for name in order:
                        out = work / f"{model}-{count}-{name}-{rep}"
                        runs[name].append(
                            federation_round(model, nodes, out, args.train_rounds, **ROUND_SETTINGS[name])
                        )
                row = {
                    "model": model,
                    "sites": count,
                    **{name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()},
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        "| model | sites | round wall fp32 / int8 / secure (s) | secure / int8 wall | round CPU int8 / secure (s) "
        "| secure / int8 CPU | bytes from a site fp32 / int8 / secure | secure / int8 | bytes to a site int8 / secure |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        f, i, s = row["fp32"], row["int8"], row["secure"]
        print(
            f"| {row['model']} | {row['sites']} | {f['wall_s']:.2f} / {i['wall_s']:.2f} / {s['wall_s']:.2f} "
            f"| x{s['wall_s'] / i['wall_s']:.2f} | {i['cpu_s']:.2f} / {s['cpu_s']:.2f} | x{s['cpu_s'] / i['cpu_s']:.2f} "
            f"| {f['bytes_in']:,.0f} / {i['bytes_in']:,.0f} / {s['bytes_in']:,.0f} | x{s['bytes_in'] / i['bytes_in']:.2f} "
            f"| {i['bytes_out']:,.0f} / {s['bytes_out']:,.0f} |"
        )
    print(
        "targets (issue 32): round time <= 1.25 x plain at 4 sites with `small` (wall and CPU above, against "
        "int8); bytes from a site <= 2 x int8 transport"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 4, 6, 12])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", action="store_true", help="time the wired round end to end (module docstring)")
    parser.add_argument("--train-rounds", type=int, default=2, help="--rounds: rounds per run (the last is timed)")
    parser.add_argument("--repeats", type=int, default=2, help="--rounds: runs per configuration")
    parser.add_argument("--n-subjects", type=int, default=20, help="--rounds: subjects per site")
    args = parser.parse_args()
    if args.rounds:
        rounds_main(args)
        return
    rows = []
    for name in args.models:
        received = model_arrays(name)
        rng = np.random.default_rng(1)
        for count in args.sites:
            trained = {
                n: {k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in received.items()}
                for n in range(1, count + 1)
            }
            plain, secure = plain_round(received, trained), secure_round(received, trained)
            rows.append({"model": name, "sites": count, "params": sum(v.size for v in received.values()), "plain": plain, "secure": secure})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | sites | values | site compute int8 / secure (s) | secure extra | site bytes int8 / secure | x int8 | secure bytes in (besides arrays) | server int8 / secure (s) | max error / bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p, s = row["plain"], row["secure"]
        print(
            f"| {row['model']} | {row['sites']} | {row['params']:,} | {p['site_s']:.3f} / {s['site_s']:.3f} "
            f"| +{s['site_s'] - p['site_s']:.3f} s | {p['site_bytes']:,} / {s['site_bytes']:,} "
            f"| x{s['site_bytes'] / p['site_bytes']:.2f} | {s['site_bytes_in']:,} | {p['server_s']:.3f} / {s['server_s']:.3f} "
            f"| {s['error_over_bound']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
