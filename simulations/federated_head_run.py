"""The federated task head on Flower's simulation engine (Ray): the head's ServerApp
(server/head_app.py) and one simulated SuperNode per site running the head's ClientApp
(client/head_app.py), as a deployment would run them.

    python -m simulations.federated_head_run --model model/ --sites SITE ... \
        [--embeddings emb-SITE.parquet ...] [--tasks onset_t2d ...] [--keys onset_t2d_365d ...] \
        [--min-subjects 20] [--rounds 200] --out heads/

Writes OUT/heads/<key>.json (+ .safetensors: `client.py predict --head` applies them),
OUT/heads.json (per key: the sites that took part, their train rows, the tuning loss per C, the C
kept, or why no head) and OUT/head.log (the stages and rounds). Each site embeds its rows of the
tasks with the release (or reads its `client.py embed` file) once per ClientApp process.
`python -m simulations.task_head ... --over-flower` scores these heads beside the local and
pooled ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from client.head_app import make_head_client_app
from server.head_app import HEADS_DIR, SUMMARY_FILE, HeadRunConfig, make_head_server_app
from simulations.logs import setup_job_logging
from simulations.ray_start import RaySettings, RayStartError, start_ray

log = logging.getLogger("healthfm.simulations")


def head_node_configs(
    model: Path,
    sites: Sequence[Path],
    min_subjects: int | None,
    embeddings: Sequence[Path] | None,
    min_positives: int | None = None,
) -> list[dict[str, Any]]:
    """One node config per site: its root, the release it holds, its minimums, its embed file."""
    if embeddings is not None and len(embeddings) != len(sites):
        raise ValueError(f"--embeddings: {len(embeddings)} files for {len(sites)} sites")
    out = []
    for i, root in enumerate(sites):
        node: dict[str, Any] = {"site-root": str(Path(root).resolve()), "model": str(Path(model).resolve())}
        if min_subjects is not None:
            node["min-report-subjects"] = min_subjects
        if min_positives is not None:
            node["min-report-positives"] = min_positives
        if embeddings is not None:
            node["embeddings"] = str(Path(embeddings[i]).resolve())
        out.append(node)
    return out


def run_head_simulation(
    config: HeadRunConfig, node_configs: Sequence[Mapping[str, Any]], num_cpus: int = 2, client_num_cpus: float = 1
) -> dict[str, Path]:
    """The heads of `config` over Flower's simulation engine; returns key -> saved head file
    (keys without a head are in OUT/heads.json with their reason)."""
    from flwr.simulation import run_simulation

    settings = RaySettings(num_cpus=num_cpus, client_num_cpus=client_num_cpus)
    start_ray(settings)
    run_simulation(
        server_app=make_head_server_app(config.model_copy(update={"min_sites": len(node_configs)})),
        client_app=make_head_client_app(node_configs),
        num_supernodes=len(node_configs),
        backend_config=settings.backend_config(),
    )
    summary_path = Path(config.out_dir) / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the head's ServerApp wrote no {summary_path} (see {Path(config.out_dir) / 'head.log'})")
    summary = json.loads(summary_path.read_text())
    return {key: Path(h["head"]) for key, h in summary["heads"].items() if "head" in h}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.federated_head_run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="the model release folder (every site holds it)")
    parser.add_argument("--sites", nargs="+", required=True, help="site roots")
    parser.add_argument("--embeddings", nargs="+", help="`client.py embed` files of the sites, in --sites order")
    parser.add_argument("--tasks", nargs="+", default=[], help="task names (default: the release's evaluation tasks)")
    parser.add_argument("--keys", nargs="+", help="label keys to fit (default: every key of the tasks)")
    parser.add_argument("--min-subjects", type=int, default=None, help="the sites' min_report_subjects (default 20)")
    parser.add_argument("--rounds", type=int, default=200, help="FedAvg rounds per C")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    setup_job_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = HeadRunConfig(model=Path(args.model), out_dir=Path(args.out), tasks=args.tasks, keys=args.keys, rounds=args.rounds)  # fmt: skip
    nodes = head_node_configs(
        Path(args.model), [Path(s) for s in args.sites], args.min_subjects,
        [Path(e) for e in args.embeddings] if args.embeddings else None,
    )  # fmt: skip
    try:
        heads = run_head_simulation(cfg, nodes, num_cpus=args.num_cpus)
    except RayStartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key, path in heads.items():
        print(f"{key}: {path}")
    print(f"summary: {Path(args.out) / SUMMARY_FILE}; heads under {Path(args.out) / HEADS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
