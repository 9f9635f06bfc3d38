"""Federated task head vs each site's local head vs a pooled head, on a model release's frozen
embeddings, per site and task with subject-bootstrap intervals.

    python -m simulations.task_head --model model/ --sites runs/data/default-seed0-nNone/sites/* \
        [--embeddings emb-SITE.parquet ...] [--tasks onset_t2d_365d ...] [--min-subjects 20] \
        [--max-subjects N] [--rounds 200] [--over-flower HEADS_DIR [--dp-target-epsilon 3 | --dp-noise-multiplier 1.1] \
        [--dp-max-grad-norm 1] [--dp-delta 1e-5] [--dp-batch-size 64] [--policies policy.yaml ...] \
        [--state-dirs STATE ...]] --out task_head.md

Each site embeds its rows of the run's evaluation tasks with the release (client/model_use.py:
the evaluation's rows and path). Per binary task key:

- federated head: healthfm_core/eval/federated_head.py (FedAvg of a logistic head over the sites'
  train splits, C on the pooled tuning log-loss; labels stay at their site);
- local head: the site's own probe (fit_logistic_probe on its train split, C on its tuning split);
- pooled head: the same probe on every site's train and tuning rows together (the ceiling a
  federation approximates, not possible across real sites);

each scored on each site's held-out rows: AUROC with a 95% subject-bootstrap interval on the same
rows. A site whose splits are below the minimum (or one class) is neither scored nor gives a local
head (its reason is printed), but its train rows still join the federated and pooled heads.
By default the federated head runs the sites in one process (the protocol's site and server
steps called directly). With `--over-flower DIR` it comes from Flower's simulation engine
instead (simulations/federated_head_run.py: the head's ServerApp and one ClientApp per site,
heads saved under DIR); there a site below its minimums takes no part at all (it sends no number),
so its train rows do not join the federated head. Both paths call the same site and server steps.
`--max-subjects` applies to both (over Flower each site's node config `max-subjects`).
With `--over-flower`, `--dp-*` asks the sites for DP-SGD per subject (server/head_app.py,
healthfm_core/privacy/head.py); the report then states the DP asked and each site's cumulative
epsilon from its durable ledger, or why it refused (the local and pooled heads are not private).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from client.head_rows import embedded_task_rows, label_row_index
from client.model_use import eval_config, open_site_runtime, splits_of
from healthfm_core.data.checks.report_floor import DEFAULT_MIN_POSITIVES
from healthfm_core.eval.federated_head import SiteSplits, fit_federated_logistic
from healthfm_core.eval.probes import LogisticProbe, binary_row, fit_logistic_probe
from healthfm_core.eval.report import ResultRow
from healthfm_core.eval.saved_head import load_head
from healthfm_core.eval.site_eval import held_out_class_subjects, task_split_counts, withheld_reason
from healthfm_core.files import atomic_write_text
from healthfm_core.protocol import TaskReason
from healthfm_core.release import load_release
from healthfm_core.release_fit import DEFAULT_MAX_UNKNOWN_SHARE
from healthfm_core.strict_files import read_json
from server.head_app import SUMMARY_FILE, HeadRunConfig
from server.head_options import head_dp_config
from simulations.federated_head_run import add_dp_args, add_release_trust_args, head_node_configs, run_head_simulation

METHODS = ("federated head", "local head", "pooled head")


def _cell(row: ResultRow | None) -> str:
    if row is None:
        return "n/a"
    low, high = row.auroc_ci
    return f"{row.auroc:.3f} [{low:.3f}, {high:.3f}]"


def _logistic(path: Path) -> LogisticProbe:
    probe = load_head(path).probe
    if not isinstance(probe, LogisticProbe):
        raise ValueError(f"{path}: not a logistic head")
    return probe


def compare_heads(
    model: Path,
    sites: Sequence[Path],
    tasks: Sequence[str] | None,
    min_subjects: int,
    rounds: int,
    max_subjects: int | None = None,
    embeddings: Sequence[Path] | None = None,
    over_flower: Path | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    dp: dict[str, Any] | None = None,
    policies: Sequence[Path] | None = None,
    state_dirs: Sequence[Path] | None = None,
    release_key: Path | None = None,
    trust_unsigned: bool = False,
) -> dict:
    """The three heads per site and key (module docstring). `dp`: HeadRunConfig's DP fields
    (server/head_options.head_dp_config), with `policies` and `state_dirs` the sites' DP budgets and
    ledgers: only with `over_flower` (the in-process driver has no DP)."""
    if over_flower is None and (dp or policies or state_dirs):
        raise ValueError("DP of the federated head (--dp-*, --policies, --state-dirs) needs --over-flower")
    release = load_release(model, trusted_keys=[release_key] if release_key else [], trust_unsigned=trust_unsigned)
    per_site: dict[str, dict] = {}
    cfg = None
    if embeddings is not None and len(embeddings) != len(sites):
        raise ValueError(f"--embeddings: {len(embeddings)} files for {len(sites)} sites")
    for i, root in enumerate(sites):
        runtime, _ = open_site_runtime(
            Path(root), release, min_subjects, None, DEFAULT_MAX_UNKNOWN_SHARE, min_positives=min_positives
        )
        cfg = eval_config(release, tasks, max_subjects)
        labels = runtime.labels(cfg)
        # `client.py embed`'s file of this site's task rows, else embedded here
        rows, x_all = embedded_task_rows(runtime, release, cfg, embeddings[i] if embeddings is not None else None)
        split_of = partial(splits_of, runtime)
        per_key = {}
        for key, table in labels.items():
            if isinstance(table, TaskReason) or "boolean_value" not in table.column_names or table.num_rows == 0:
                continue
            sids = table["subject_id"].to_numpy()
            idx = label_row_index(rows, table, runtime.name)
            split = split_of(sids)
            reason = withheld_reason(
                task_split_counts(table, split_of),
                min_subjects,
                True,
                min_positives,
                held_out_classes=held_out_class_subjects(table, split_of),
            )
            y = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
            x = x_all[idx]
            per_key[key] = {"x": x, "y": y, "split": split, "sids": sids, "reason": reason}
        per_site[runtime.name] = per_key
    assert cfg is not None
    keys = [k for spec in cfg.tasks for k in spec.keys() if any(k in v for v in per_site.values())]
    flower_heads: dict[str, Path] = {}
    flower: dict[str, Any] = {}
    if over_flower is not None:
        head_cfg = HeadRunConfig(
            model=model,
            out_dir=over_flower,
            tasks=list(tasks or []),
            keys=keys,
            rounds=rounds,
            release_key=release_key,
            trust_unsigned=trust_unsigned,
            **(dp or {}),
        )
        flower_heads = run_head_simulation(
            head_cfg,
            head_node_configs(
                model,
                sites,
                min_subjects,
                embeddings,
                min_positives,
                policies,
                state_dirs,
                max_subjects,
                release_key,
                trust_unsigned,
            ),
        )
        flower = read_json(over_flower / SUMMARY_FILE)
    results: dict[str, dict] = {}
    for key in keys:
        data = {s: v[key] for s, v in per_site.items() if key in v}
        splits = {
            s: SiteSplits(
                d["x"][d["split"] == "train"],
                d["y"][d["split"] == "train"],
                d["x"][d["split"] == "tuning"],
                d["y"][d["split"] == "tuning"],
            )
            for s, d in data.items()
        }
        if over_flower is None:
            fed: LogisticProbe | None = fit_federated_logistic(splits, rounds=rounds)[0]
        else:  # no head: no site (or one class) took part over Flower; see OVER_FLOWER/heads.json
            fed = _logistic(flower_heads[key]) if key in flower_heads else None
        pooled = fit_logistic_probe(
            np.concatenate([s.x_train for s in splits.values()]),
            np.concatenate([s.y_train for s in splits.values()]),
            np.concatenate([s.x_tune for s in splits.values()]),
            np.concatenate([s.y_tune for s in splits.values()]),
        )
        results[key] = {}
        for site, d in data.items():
            if d["reason"] is not None:
                results[key][site] = {"reason": d["reason"].describe()}
                continue
            held = d["split"] == "held_out"
            x_held, y_held, groups = d["x"][held], d["y"][held], d["sids"][held]
            local = fit_logistic_probe(
                splits[site].x_train, splits[site].y_train, splits[site].x_tune, splits[site].y_tune
            )
            row: dict[str, dict | None] = {}
            for method, probe in zip(METHODS, (fed, local, pooled), strict=True):
                if probe is None:
                    row[method] = None
                    continue
                scored = binary_row(
                    method, key, None, y_held, probe.predict_proba(x_held), cfg.n_boot, cfg.seed, groups
                )
                row[method] = scored.model_dump()
            results[key][site] = {"n": int(held.sum()), "subjects": int(len(np.unique(groups))), **row}
            if over_flower is not None:  # the site's spend after the head's rounds, or why it refused
                fitted = flower.get("heads", {}).get(key, {})
                results[key][site]["dp"] = fitted.get("epsilon", {}).get(site)
                if site in fitted.get("refused", {}):
                    results[key][site]["refused"] = fitted["refused"][site]["refused"]
    return {
        "release": str(model),
        "min_subjects": min_subjects,
        "min_positives": min_positives,
        "rounds": rounds,
        "federated": "flower" if over_flower is not None else "in-process",
        "privacy": flower.get("privacy"),  # the DP asked of the federated head (None: in-process)
        "results": results,
    }


def _spend(r: dict) -> str:
    """The site's DP cell: its cumulative epsilon (delta) after the head, or its refusal."""
    if r.get("refused"):
        return f"refused: {r['refused']}"
    dp = r.get("dp")
    return f"{dp['epsilon']:.3f} ({dp['delta']:g})" if dp else "no DP"


def markdown(report: dict) -> str:
    privacy = report.get("privacy") or {}
    dp = bool(privacy.get("requested"))
    lines = [
        f"# Task heads on release {report['release']}: federated vs local vs pooled",
        "",
        "Held-out AUROC at each site [95% subject-bootstrap interval], the same rows for the three heads.",
    ]
    if privacy:
        lines += [
            "",
            f"Federated head: {privacy['describe']}"
            + (
                f"; expected {privacy['batch_size']} subjects per step, {privacy['planned_steps']} steps planned; "
                "epsilon: each site's cumulative epsilon (delta) in its durable ledger after the head "
                "(pretraining's spend included), or why it refused"
                if dp
                else ""
            )
            + ".",
        ]
    extra = " epsilon (delta) |" if dp else ""
    lines += [
        "",
        "| task | site | n (subjects) | " + " | ".join(METHODS) + " |" + extra,
        "|---|---|---|---|---|---|" + ("---|" if dp else ""),
    ]
    for key, sites in report["results"].items():
        for site, r in sites.items():
            if "reason" in r:
                lines.append(f"| {key} | {site} | - | not scored: {r['reason']} | | |" + (" |" if dp else ""))
                continue
            cells = [_cell(ResultRow.model_validate(r[m]) if r.get(m) else None) for m in METHODS]
            if dp:
                cells.append(_spend(r))
            lines.append(f"| {key} | {site} | {r['n']} ({r['subjects']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.task_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model release folder")
    parser.add_argument("--sites", nargs="+", required=True, help="site roots")
    parser.add_argument("--tasks", nargs="+", help="task names (default: the run's evaluation tasks)")
    parser.add_argument("--min-subjects", type=int, default=20)
    parser.add_argument(
        "--min-positives", type=int, default=DEFAULT_MIN_POSITIVES, help="positive and negative held-out rows"
    )
    parser.add_argument("--max-subjects", type=int, default=None, help="per split (default: the run's; 0: all)")
    parser.add_argument(
        "--embeddings",
        nargs="+",
        help="`client.py embed` files of the sites' task rows, in --sites order (else embedded here)",
    )
    parser.add_argument("--rounds", type=int, default=200, help="FedAvg rounds of the federated head per C")
    parser.add_argument(
        "--over-flower",
        metavar="DIR",
        help="fit the federated head on Flower's simulation engine (heads and head.log under DIR)",
    )
    parser.add_argument("--out", required=True, help="the markdown report (JSON beside it)")
    add_dp_args(parser)
    add_release_trust_args(parser)
    args = parser.parse_args(argv)
    report = compare_heads(
        Path(args.model),
        [Path(s) for s in args.sites],
        args.tasks,
        args.min_subjects,
        args.rounds,
        args.max_subjects,
        [Path(e) for e in args.embeddings] if args.embeddings else None,
        Path(args.over_flower) if args.over_flower else None,
        args.min_positives,
        head_dp_config(args) if args.dp_target_epsilon is not None or args.dp_noise_multiplier is not None else None,
        [Path(p) for p in args.policies] if args.policies else None,
        [Path(d) for d in args.state_dirs] if args.state_dirs else None,
        Path(args.release_key) if args.release_key else None,
        args.trust_unsigned,
    )
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1))
    text = markdown(report)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
