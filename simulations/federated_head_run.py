"""The federated task head on Flower's simulation engine (Ray): the head's ServerApp
(server/head_app.py) and one simulated SuperNode per site running the head's ClientApp
(client/head_app.py), as a deployment would run them.

    python -m simulations.federated_head_run --model model/ --sites SITE ... \
        [--embeddings emb-SITE.parquet ...] [--tasks onset_t2d ...] [--keys onset_t2d_365d ...] \
        [--min-subjects 20] [--max-subjects N] [--rounds 200] [--c-grid 0.1 1] [--local-steps 5] \
        [--dp-target-epsilon 3 | --dp-noise-multiplier 1.1] [--dp-max-grad-norm 1] [--dp-delta 1e-5] \
        [--dp-batch-size 64] [--policies policy.yaml ...] [--state-dirs STATE ...] --out heads/

Writes OUT/heads/<key>.json (+ .safetensors: `client.py predict --head` applies them),
OUT/heads.json (per key: the sites that took part, their train rows, the tuning loss per C, the C
kept, or why no head; the DP asked, each site's refusal and cumulative epsilon), OUT/head.log
(the stages and rounds) and OUT/head_rounds.jsonl (each round's sites and their epsilon).

DP: `--dp-target-epsilon` or `--dp-noise-multiplier` asks every site for DP-SGD per subject
(the pretraining run config's `privacy`: target_epsilon / noise_multiplier, delta,
max_grad_norm). A site trains under DP only with a budget in its own policy (`--policies`, its
`dp:` section) and spends from its durable ledger (`--state-dirs`: give the pretraining run's,
RUN/sites/<site>/state, so that the head and the pretraining share one ledger and one cap). Each site embeds its rows of the
tasks with the release (or reads its `client.py embed` file) once per ClientApp process.
`python -m simulations.task_head ... --over-flower` scores these heads beside the local and
pooled ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from client.head_app import RowsOf, make_head_client_app
from client.head_rows import load_head_rows
from healthfm_core.strict_files import read_json
from server.head_app import HEADS_DIR, SUMMARY_FILE, FitHeads, HeadRunConfig, make_head_server_app
from server.head_options import add_head_dp_args, head_dp_config
from simulations.logs import setup_job_logging
from simulations.ray_start import RaySettings, RayStartError, start_ray

log = logging.getLogger("healthfm.simulations")


def _per_site(flag: str, values: Sequence[Path] | None, n: int) -> list[Path] | None:
    """One value per site: as given (one per site), or one value for every site."""
    if values is None:
        return None
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise ValueError(f"{flag}: {len(values)} values for {n} sites (give one, or one per site)")
    return list(values)


def head_node_configs(
    model: Path,
    sites: Sequence[Path],
    min_subjects: int | None,
    embeddings: Sequence[Path] | None,
    min_positives: int | None = None,
    policies: Sequence[Path] | None = None,
    state_dirs: Sequence[Path] | None = None,
    max_subjects: int | None = None,
    release_key: Path | None = None,
    trust_unsigned: bool = False,
) -> list[dict[str, Any]]:
    """One node config per site: its root, the release it holds and the key it verifies it with
    (or trust-unsigned-release), its minimums, its embed file, its policy (its DP budget) and its
    state directory (its durable privacy ledger)."""
    if embeddings is not None and len(embeddings) != len(sites):
        raise ValueError(f"--embeddings: {len(embeddings)} files for {len(sites)} sites")
    policy_of = _per_site("--policies", policies, len(sites))
    if state_dirs is not None and len(state_dirs) != len(sites):  # one ledger per site, never shared
        raise ValueError(f"--state-dirs: {len(state_dirs)} directories for {len(sites)} sites (one per site)")
    out = []
    for i, root in enumerate(sites):
        node: dict[str, Any] = {"site-root": str(Path(root).resolve()), "model": str(Path(model).resolve())}
        if release_key is not None:
            node["release-key"] = str(Path(release_key).resolve())
        if trust_unsigned:
            node["trust-unsigned-release"] = True
        if min_subjects is not None:
            node["min-report-subjects"] = min_subjects
        if min_positives is not None:
            node["min-report-positives"] = min_positives
        if embeddings is not None:
            node["embeddings"] = str(Path(embeddings[i]).resolve())
        if policy_of is not None:
            node["policy"] = str(Path(policy_of[i]).resolve())
        if state_dirs is not None:
            node["state-dir"] = str(Path(state_dirs[i]).resolve())
        if max_subjects is not None:
            node["max-subjects"] = max_subjects
        out.append(node)
    return out


def add_release_trust_args(parser: argparse.ArgumentParser) -> None:
    """How the sites and the server verify the release (healthfm_core/release_signing.py)."""
    parser.add_argument(
        "--release-key", metavar="PEM", help="the public key the release is signed with (release_signing.pem)"
    )
    parser.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="load an unsigned release (`coordinator release --unsigned` of a simulation's run) unverified",
    )


def add_dp_args(parser: argparse.ArgumentParser) -> None:
    """The head's DP flags (server/head_options.py), and the sites' policies and ledgers."""
    dp = add_head_dp_args(parser)
    dp.add_argument("--policies", nargs="+", help="site policy files (their dp: budget): one, or one per site")
    dp.add_argument(
        "--state-dirs", nargs="+", help="each site's state directory (its durable privacy ledger), in --sites order"
    )


def run_head_simulation(
    config: HeadRunConfig,
    node_configs: Sequence[Mapping[str, Any]],
    num_cpus: int = 2,
    client_num_cpus: float = 1,
    rows_of: RowsOf = load_head_rows,
    fit: FitHeads | None = None,
) -> dict[str, Path]:
    """The heads of `config` over Flower's simulation engine; returns key -> saved head file
    (keys without a head are in OUT/heads.json with their reason). `rows_of`: the sites' rows
    (tests give synthetic ones; a module-level function, which Ray pickles by reference) and
    `fit` the ServerApp's work (default: server.head_app.fit_heads, the release's keys)."""
    from flwr.simulation import run_simulation

    settings = RaySettings(num_cpus=num_cpus, client_num_cpus=client_num_cpus)
    start_ray(settings)
    run_simulation(
        server_app=make_head_server_app(config.model_copy(update={"min_sites": len(node_configs)}), fit),
        client_app=make_head_client_app(node_configs, rows_of),
        num_supernodes=len(node_configs),
        backend_config=settings.backend_config(),
    )
    summary_path = Path(config.out_dir) / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the head's ServerApp wrote no {summary_path} (see {Path(config.out_dir) / 'head.log'})")
    summary = read_json(summary_path)
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
    parser.add_argument(
        "--max-subjects",
        type=int,
        default=None,
        help="subjects per split of each site's rows (default: the run's; 0: all)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--c-grid", nargs="+", type=float, help="the head's C values (default: the probe's grid)")
    parser.add_argument("--local-steps", type=int, default=5, help="each site's steps per round")
    parser.add_argument("--out", required=True, help="output folder")
    add_dp_args(parser)
    add_release_trust_args(parser)
    args = parser.parse_args(argv)
    setup_job_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    grid = {"c_grid": args.c_grid} if args.c_grid else {}
    cfg = HeadRunConfig(
        model=Path(args.model), out_dir=Path(args.out), tasks=args.tasks, keys=args.keys, rounds=args.rounds,
        local_steps=args.local_steps, **grid, **head_dp_config(args),
        release_key=args.release_key, trust_unsigned=args.trust_unsigned,
    )  # fmt: skip
    nodes = head_node_configs(
        Path(args.model), [Path(s) for s in args.sites], args.min_subjects,
        [Path(e) for e in args.embeddings] if args.embeddings else None, None,
        [Path(p) for p in args.policies] if args.policies else None,
        [Path(d) for d in args.state_dirs] if args.state_dirs else None, args.max_subjects,
        Path(args.release_key) if args.release_key else None, args.trust_unsigned,
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
