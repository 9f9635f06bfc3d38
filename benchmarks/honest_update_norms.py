"""Honest update norms of a real short federation: what the clip to the other holders' median
(server/clipping.py, norm-clip-factor) costs honest rounds, and how coherent honest updates are.

    nice -n 5 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/honest_update_norms.py OUT --rounds 6 --dp

The default scenario (biobank: every group; city_hospital: EHR; wearable_clinic: EHR + wearables;
genomics_cohort: EHR + genomics, under DP with --dp), `--subjects` per site, `tiny` model, 10 local
steps x 16 at lr 1e-3, through the real ClientApps in this process and the real strategy (the clip
on, at its default). Per round and group: each site's update norm over the median of the other
holders' norms (what the clip compares to norm-clip-factor), and each site's cosine between its
update and its previous round's (1: the same direction every round). Written to OUT/norms.json
after each round; a summary printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# The repository first: this folder's secure_aggregation.py would shadow the package.
REPO = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from helpers.flower_messages import train_metadata  # noqa: E402

from client.client_app import make_client_app  # noqa: E402
from client.site_runtime import SiteConfig, SiteRuntime  # noqa: E402
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.model.healthfm import init_model  # noqa: E402
from healthfm_core.protocol import SETUP, FederationSetup, RoundConfig  # noqa: E402
from healthfm_core.terms.groups import parameter_group  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from server.round import aggregate_replies  # noqa: E402
from server.strategy import ModalityAwareFedAvg, pack_record  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402

SITES = {
    "biobank": ["shared", "ehr", "wearables", "genomics"],
    "city_hospital": ["shared", "ehr"],
    "wearable_clinic": ["shared", "ehr", "wearables"],
    "genomics_cohort": ["shared", "ehr", "genomics"],
}
DP_POLICY = "min_subjects: 3\ndp:\n  mandatory: true\n  epsilon_cap: 100\n  delta: 1.0e-5\n  noise_multiplier: 1.1\n"


def setup_metadata(node: int) -> Metadata:
    """The run's setup message to `node`, as the SuperLink delivers it (run 1)."""
    md = train_metadata(f"setup-{node}", 0, node)
    md.message_type = SETUP
    return md


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group of 3+ holders: the range of norm / median of the others, by site; per group: the
    cosines with the previous round."""
    by_round: dict[tuple[int, str], dict[str, float]] = {}
    for r in records:
        by_round.setdefault((r["round"], r["group"]), {})[r["site"]] = r["norm"]
    ratios: dict[str, dict[str, list[float]]] = {}
    for (_, group), norms in sorted(by_round.items()):
        if len(norms) < 3:
            continue
        for site, norm in norms.items():
            median = float(np.median([n for other, n in norms.items() if other != site]))
            ratios.setdefault(group, {}).setdefault(site, []).append(round(norm / median, 3))
    cosines: dict[str, dict[str, float]] = {}
    for group in sorted({r["group"] for r in records}):
        values = [r["cos_prev"] for r in records if r["group"] == group and r["cos_prev"] is not None]
        if values:
            cosines[group] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return {"norm_over_others_median": ratios, "cosine_with_previous_round": cosines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--subjects", type=int, default=150)
    parser.add_argument("--dp", action="store_true", help="genomics_cohort trains under DP-SGD")
    args = parser.parse_args()
    out: Path = args.out
    if not (out / "manifest.json").exists():
        generate_federation(out, scenario="default", seed=0, n_subjects=args.subjects, progress=False)
    configs: dict[str, dict[str, Any]] = {
        name: {
            "site-root": str(out / "sites" / name),
            "site-name": name,
            "min-code-subjects": 5,
            "min-report-subjects": 2,
        }
        for name in SITES
    }
    if args.dp:
        (out / "policy.yaml").write_text(DP_POLICY)
        configs["genomics_cohort"].update({"policy": str(out / "policy.yaml"), "state-dir": str(out / "state")})
    stats = [SiteRuntime(SiteConfig.from_node_config(c)).code_stats() for c in configs.values()]
    setup = FederationSetup(
        vocabulary=build_vocabulary(stats, min_subjects=5), model=load_model_config("tiny"), model_seed=1
    )
    nodes = {i + 1: name for i, name in enumerate(SITES)}
    node_groups = {node: SITES[name] for node, name in nodes.items()}
    app = make_client_app()
    contexts = {
        n: Context(run_id=1, node_id=n, node_config=configs[name], state=RecordDict(), run_config={})
        for n, name in nodes.items()
    }
    for n in nodes:
        record = ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})
        app(Message(RecordDict({"setup": record}), metadata=setup_metadata(n)), contexts[n])
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    strategy = ModalityAwareFedAvg()
    records: list[dict[str, Any]] = []
    previous_update: dict[tuple[int, str], np.ndarray] = {}
    for rnd in range(1, args.rounds + 1):
        cfg = RoundConfig(
            round=rnd, rounds=args.rounds, local_steps=10, lr=1e-3, batch_size=16, setup_sha256=setup.sha256
        )
        sent, replies = [], []
        for n in nodes:
            own = {k: v for k, v in arrays.items() if parameter_group(k) in node_groups[n]}
            content = RecordDict({"arrays": pack_record(own), "config": ConfigRecord(cfg.to_flat())})
            message = Message(content, metadata=train_metadata(f"train-{rnd}-{n}", 0, n))
            sent.append(message)
            answer = app(message, contexts[n])
            replies.append(Message(answer.content, metadata=train_metadata(f"r-{rnd}-{n}", n, 0, f"train-{rnd}-{n}")))
        outcome = aggregate_replies(
            strategy, rnd, replies, current_arrays=arrays, node_groups=node_groups, sent=sent, round_config=cfg
        )
        assert outcome.arrays is not None and not outcome.rejected, outcome.rejected
        for n, reply in outcome.replies.items():
            for group in reply.group_examples:
                keys = sorted(k for k in reply.arrays if parameter_group(k) == group)
                update = np.concatenate([(reply.arrays[k].astype(np.float64) - arrays[k]).ravel() for k in keys])
                before = previous_update.get((n, group))
                cosine = (
                    None
                    if before is None
                    else float(update @ before / (np.linalg.norm(update) * np.linalg.norm(before)))
                )
                previous_update[n, group] = update
                records.append(
                    {
                        "round": rnd,
                        "site": nodes[n],
                        "group": group,
                        "norm": float(np.linalg.norm(update)),
                        "cos_prev": cosine,
                        "clipped": outcome.clipped.get(n, {}).get(group),
                    }
                )
        arrays = outcome.arrays
        (out / "norms.json").write_text(json.dumps({"records": records, "summary": summary(records)}, indent=1))
        print(f"round {rnd}: clipped {outcome.clipped or 'nothing'}", flush=True)
    print(json.dumps(summary(records), indent=1))


if __name__ == "__main__":
    main()
