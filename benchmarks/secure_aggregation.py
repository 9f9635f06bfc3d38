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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from healthfm_core.model.config import load_model_config  # noqa: E402
from healthfm_core.model.groups import GROUPS, parameter_group  # noqa: E402
from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.packing import pack_arrays  # noqa: E402
from healthfm_core.transport import decode_update, encode_update  # noqa: E402
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
        sites[n] = SiteRound(config, n)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 4, 6, 12])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
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
