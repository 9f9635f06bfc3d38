"""Upload size and training loss of a federated run under each uplink transport (fp32, fp16, int8),
and the download size and loss under the fp16 downlink.

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/update_transport.py
    python benchmarks/update_transport.py --rounds 6 --local-steps 10 --json out.json

Part 1, payload: the bytes of one site's ArrayRecord (every group of the model, packed as a site
sends it, healthfm_core/protocol/packing.py, Flower's own serialisation, headers included) under each
transport, for the `tiny` and `small` models, with a random update of the initial weights
(healthfm_core/protocol/transport.py encodes; the ratio is to fp32; NVFlare's 8-bit messages are 25% of
fp32); beside it the same arrays as one Flower Array per key (the format before packing) and the
number of Flower objects (each moved by its own request) either way.

Part 1b, the server's train messages: the `tiny` scenario's three sites (biobank: every group;
hospital: no genomics; genomics: no wearables) sent the global fp32 arrays, as the server packed
them before (one part per parameter group, each site the parts of its groups) and now (one part
per message, packed once per distinct group set: ModalityAwareFedAvg.records_for_nodes). Per
message: Flower objects (Message, RecordDict, ArrayRecord, Arrays, chunks, ConfigRecord) and the
bytes a site downloads; per round: the distinct objects and bytes the ServerApp pushes to the
SuperLink (content-addressed: an object in several messages is pushed once).

Part 2, a run: the same small federated run (two synthetic sites, `tiny` model, same seeds) in
Flower's simulation engine once per transport, and once more with fp32 replies and the fp16
downlink (`downlink=fp16`: the global weights sent in float16, the server's float32 master kept).
Per round: the bytes the sites uploaded and downloaded (whole messages as the server's run log
measures them: arrays, metrics, int8 scales, the round's config) and the n-weighted mean training
loss the sites reported, so int8 and the fp16 downlink can be read against fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

from healthfm_core.model.healthfm import HealthFM  # noqa: E402
from healthfm_core.protocol.transport import TRANSPORTS, encode_update  # noqa: E402
from healthfm_core.terms.groups import parameter_group  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from server.config import FederationConfig  # noqa: E402
from server.limits import array_record_bytes  # noqa: E402
from server.runlog import read_events  # noqa: E402
from server.strategy import ModalityAwareFedAvg, pack_record  # noqa: E402
from simulations.run import run_federation_simulation  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402

SITES = ("biobank", "hospital")
# The tiny scenario's sites and their groups (tests/helpers/deploy_fixtures.py EXPECTED_GROUPS).
SCENARIO_GROUPS = {
    "biobank": ["shared", "ehr", "wearables", "genomics"],
    "hospital": ["shared", "ehr", "wearables"],
    "genomics": ["shared", "ehr", "genomics"],
}


def payload_bytes(model_name: str, seed: int = 0) -> dict[str, int]:
    """Serialized ArrayRecord bytes of the whole model under each transport."""
    model = HealthFM(load_model_config(model_name), vocab_size=2000, n_prs_traits=4)
    received = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    trained = {k: (v + 1e-3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in received.items()}
    out = {}
    for transport in TRANSPORTS:
        encoded = encode_update(trained, received, transport, rng=rng)  # type: ignore[arg-type]
        # The int8 scales travel as one float per key in a MetricRecord: counted at 8 bytes + key.
        scales = sum(8 + len(k) for k in encoded.scales) if encoded.scales else 0
        packed = get_all_nested_objects(pack_record(encoded.arrays))
        per_key = get_all_nested_objects(
            ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encoded.arrays.items()})
        )
        out[transport] = sum(len(o.deflate()) for o in packed.values()) + scales
        out[f"{transport}_per_key"] = sum(len(o.deflate()) for o in per_key.values()) + scales
        out[f"{transport}_objects"], out[f"{transport}_objects_per_key"] = len(packed), len(per_key)
    out["params"] = sum(v.size for v in received.values())
    out["raw_fp32"] = array_record_bytes(ArrayRecord({k: Array(v) for k, v in received.items()}))
    return out


def train_messages(model_name: str) -> dict[str, dict[str, int]]:
    """The scenario's train messages under either packing of the server's arrays: objects and
    bytes per message (the largest site's), and the distinct objects and bytes of the round's push."""
    model = HealthFM(load_model_config(model_name), vocab_size=2000, n_prs_traits=4)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    per_group = pack_record(arrays, parameter_group)  # before: one part per group, packed once
    nodes = dict(enumerate(SCENARIO_GROUPS.values()))
    records = {
        "per group": {n: ArrayRecord({g: per_group[g] for g in gs}) for n, gs in nodes.items()},
        "per group set": ModalityAwareFedAvg().records_for_nodes(arrays, nodes),
    }
    out = {}
    for name, by_node in records.items():
        pushed: dict[str, int] = {}
        objects, site_bytes = [], []
        for node, record in by_node.items():
            content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1, "groups": nodes[node]})})
            nested = get_all_nested_objects(content)
            sizes = {oid: len(o.deflate()) for oid, o in nested.items()}
            pushed.update(sizes)
            objects.append(len(nested) + 1)  # + the Message itself
            site_bytes.append(sum(sizes.values()))
        out[name] = {
            "objects_per_message": max(objects),
            "site_bytes": max(site_bytes),
            "pushed_objects": len(pushed) + len(by_node),
            "pushed_bytes": sum(pushed.values()),
        }
    return out


DOWN16 = "fp32, fp16 downlink"  # the fp32 reply with the global weights sent in float16


def federated_run(transport: str, out: Path, args: argparse.Namespace, downlink: str = "fp32") -> dict[str, Any]:
    config = FederationConfig(
        out_dir=out,
        model=load_model_config("tiny"),
        rounds=args.rounds,
        local_steps=args.local_steps,
        lr=3e-3,
        batch_size=8,
        max_events=64,
        max_patches=8,
        seed=3,
        min_nodes=len(SITES),
        vocab_min_subjects=5,
        transport=transport,  # type: ignore[arg-type]
        downlink=downlink,  # type: ignore[arg-type]
        eval_tasks=["onset_hypertension_365d"],
        eval_n_boot=10,
    )
    t0 = time.perf_counter()
    run_federation_simulation(config, args.node_configs, num_cpus=2)
    seconds = time.perf_counter() - t0
    rounds = [e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"]
    return {
        "seconds": seconds,
        "upload_bytes": [sum(s.get("bytes_received", 0) for s in e["sites"].values()) for e in rounds],
        "download_bytes": [sum(s.get("bytes_sent", 0) for s in e["sites"].values()) for e in rounds],
        "loss": [e["losses"].get("total", float("nan")) for e in rounds],
        "rejected": sum(len(e["rejected"]) for e in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print("## Payload: one site's ArrayRecord, every group (bytes; ratio to fp32)\n")
    print("| model | params | fp32 | fp16 | int8 |")
    print("|---|---|---|---|---|")
    payload = {name: payload_bytes(name) for name in ("tiny", "small")}
    for name, p in payload.items():
        cells = [f"{p[t]:,} ({p[t] / p['fp32']:.1%})" for t in TRANSPORTS]
        print(f"| {name} | {p['params']:,} | " + " | ".join(cells) + " |")
    print("\n## Packed against one Flower Array per key (bytes; Flower objects per record)\n")
    print("| model | transport | packed bytes | per-key bytes | packed / per-key | objects packed | objects per-key |")
    print("|---|---|---|---|---|---|---|")
    for name, p in payload.items():
        for t in TRANSPORTS:
            print(
                f"| {name} | {t} | {p[t]:,} | {p[t + '_per_key']:,} | {p[t] / p[t + '_per_key']:.2%} | "
                f"{p[t + '_objects']} | {p[t + '_objects_per_key']} |"
            )

    print(
        "\n## The server's train messages, tiny scenario (3 sites, 3 distinct group sets; fp32): "
        "one part per group (before) or per group set (now)\n"
    )
    print(
        "| model | packing | objects / message | bytes / message (largest site) | objects pushed / round | "
        "bytes pushed / round |"
    )
    print("|---|---|---|---|---|---|")
    messages = {name: train_messages(name) for name in ("tiny", "small")}
    for name, by_packing in messages.items():
        for packing, m in by_packing.items():
            print(
                f"| {name} | {packing} | {m['objects_per_message']} | {m['site_bytes']:,} | {m['pushed_objects']} | "
                f"{m['pushed_bytes']:,} |"
            )
    print(
        "\nPushed: distinct objects from the ServerApp to its SuperLink (an object several messages "
        "carry is pushed once; Messages counted, their few hundred bytes not)."
    )

    with tempfile.TemporaryDirectory(prefix="healthfm-transport-") as tmp:
        fed = generate_federation(Path(tmp) / "fed", scenario="tiny", seed=0, n_subjects=args.subjects, progress=False)
        args.node_configs = [
            {"site-root": str(s.root), "site-name": s.name, "min-code-subjects": 5, "min-report-subjects": 2}
            for s in fed.sites
            if s.name in SITES
        ]
        runs = {t: federated_run(t, Path(tmp) / f"run-{t}", args) for t in TRANSPORTS}
        runs[DOWN16] = federated_run("fp32", Path(tmp) / "run-downlink-fp16", args, downlink="fp16")

    base = runs["fp32"]
    print(
        f"\n## A run: {len(SITES)} sites ({', '.join(SITES)}), tiny model, {args.rounds} rounds x "
        f"{args.local_steps} local steps, same seeds\n"
    )
    print(
        "| transport | upload bytes / round (mean) | ratio to fp32 | download bytes / round (mean) | ratio to fp32 "
        "| rejected replies | run s |"
    )
    print("|---|---|---|---|---|---|---|")
    for t, r in runs.items():
        up, down = float(np.mean(r["upload_bytes"])), float(np.mean(r["download_bytes"]))
        print(
            f"| {t} | {up:,.0f} | {up / np.mean(base['upload_bytes']):.1%} | {down:,.0f} | "
            f"{down / np.mean(base['download_bytes']):.1%} | {r['rejected']} | {r['seconds']:.0f} |"
        )
    print(
        "\nWhole messages (packed arrays, metrics, int8 scales; a train message's config); the payload tables above are "
        "the arrays alone."
    )
    print("\nTraining loss per round (n-weighted mean of the sites' total loss):\n")
    print("| round | " + " | ".join(runs) + " | int8 - fp32 | fp16 downlink - fp32 |")
    print("|---" * (len(runs) + 3) + "|")
    for i in range(args.rounds):
        losses = [runs[t]["loss"][i] for t in runs]
        print(
            f"| {i + 1} | "
            + " | ".join(f"{v:.4f}" for v in losses)
            + f" | {runs['int8']['loss'][i] - losses[0]:+.4f} | {runs[DOWN16]['loss'][i] - losses[0]:+.4f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"payload": payload, "train_messages": messages, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
