"""What one token per day (instead of one per row) does to probe AUROC, on synthetic data.

    python benchmarks/history_auroc.py [--scenario hospital] [--n-subjects 300] [--steps 150]
        [--seeds 0 1] [--model tiny] [--max-tokens 256] [--out runs/history_auroc]

Run from the repository root with PYTHONPATH=. (OMP_NUM_THREADS=1 on a shared machine). On a
generated federation (`--scenario hospital`: EHR-only, dense lab panels; `default` also works),
the same model budget is pretrained twice per seed, centrally on the pooled train splits with the
simulations.pretrain machinery: (a) one token per row (`per_event`, the layout before pooling:
every row its own one-code token, static rows included) and (b) one token per day (the default
token settings). Both see at most `--max-tokens` tokens per sample, start from the same seeded
initialisation and draw the same batches. Frozen linear probes (simulations.pretrain's: fitted on
train, C from tuning) on the ACES onset tasks (configs/tasks/) at 30/90/180/365 days are scored on
the same held_out rows. Printed: per horizon the mean held_out AUROC of each layout over the
tasks with at least `--min-positives` held_out positives, the paired difference (day - row) with a
subject-level bootstrap 95% interval (subjects resampled once for every task and seed), and the
history coverage (median days visible at each subject's last row) of each layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.checks.coverage import history_coverage_days
from healthfm_core.data.labels.tasks import OnsetTask
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import Site
from healthfm_core.eval.metrics import auroc, paired_difference
from healthfm_core.eval.runner import EvalSet, MethodResult, build_eval_set
from healthfm_core.protocol import federation_modalities
from healthfm_core.terms.model_config import model_config_from_dict
from simulations.common import job_tasks, open_sites
from simulations.pretrain import agree_vocabulary, evaluate_model_methods, pooled_train_loader, pretrain, token_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LAYOUTS = {"row": True, "day": False}  # name -> per_event
HORIZONS = (30, 90, 180, 365)
log = logging.getLogger("healthfm.benchmarks.history_auroc")


def job_config(args: argparse.Namespace, seed: int) -> DictConfig:
    overrides = [
        f"model={args.model}",
        f"scenario={args.scenario}",
        f"seed={seed}",
        "threads=1",
        "progress=false",
        f"data.n_subjects={args.n_subjects}",
        f"data.dir={args.out / 'data' / args.scenario}-n{args.n_subjects}",
        f"data.max_events={args.max_tokens}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.checkpoint_every={args.steps}",
        "eval.poolings=[query]",
        f"eval.n_boot={args.n_boot}",
        f"eval.n_per_subject={args.n_per_subject}",
        "task_list=[t2d,cad,hypertension,copd]",
        f"out_dir={args.out}",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def coverage(sites: dict[str, Site], max_tokens: int, per_event: bool) -> dict[str, float | int | str]:
    """History coverage over every site's subjects (subject ids made distinct per site)."""
    tables = []
    for i, site in enumerate(sites.values()):
        ev = site.read_events(columns=["subject_id", "time", "code"])
        sid = pa.array(ev["subject_id"].to_numpy().astype(np.int64) + i * 10**12)
        tables.append(pa.table({"subject_id": sid, "time": ev["time"], "code": ev["code"].cast(pa.string())}))
    return history_coverage_days(pa.concat_tables(tables), max_tokens, per_event=per_event)


def horizon_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1].removesuffix("d"))


def print_table(
    args: argparse.Namespace,
    results: dict[tuple[str, int], MethodResult],
    subject: np.ndarray,
    counted: list[str],
    least: int,
) -> None:
    """Per horizon: mean held_out AUROC of each layout over `counted` tasks (and seeds), and the
    paired difference day - row with a subject bootstrap over every task and seed."""

    def mean_auroc(layout: str, key: str) -> float:  # held_out AUROC, mean over seeds
        return float(np.mean([auroc(*results[(layout, seed)].predictions[key]) for seed in args.seeds]))

    print(f"\ntasks with >= {least} held_out positives: {len(counted)}")
    print(
        "| horizon | tasks | AUROC row | AUROC day | day - row [95% CI] | resamples <= 0 |\n|---|---|---|---|---|---|"
    )
    for h in [*HORIZONS, None]:
        keys = [k for k in counted if h is None or horizon_of(k) == h]
        if not keys:
            print(f"| {h or 'all'} | 0 | - | - | - | - |")
            continue
        items = []
        for seed in args.seeds:
            a, b = results[("day", seed)], results[("row", seed)]
            for k in keys:
                y, p_day = a.predictions[k]
                y_row, p_row = b.predictions[k]
                assert np.array_equal(a.scored_rows[k], b.scored_rows[k]) and np.array_equal(y, y_row)
                items.append((y, p_day, p_row, subject[a.scored_rows[k]]))
        diff = paired_difference(items, n_boot=args.n_boot, seed=0)
        row_auc = np.mean([mean_auroc("row", k) for k in keys])
        day_auc = np.mean([mean_auroc("day", k) for k in keys])
        print(
            f"| {h or 'all'} | {len(keys)} | {row_auc:.3f} | {day_auc:.3f} | {diff.mean:+.3f} "
            f"[{diff.ci[0]:+.3f}, {diff.ci[1]:+.3f}] | {diff.fraction_at_or_below_zero:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="hospital")
    parser.add_argument("--n-subjects", type=int, default=300, help="per synthetic site")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--n-per-subject", type=int, default=3)
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--min-positives", type=int, default=10, help="held_out positives a task needs to count")
    parser.add_argument("--out", type=Path, default=Path("runs/history_auroc"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    cfg0 = job_config(args, args.seeds[0])
    sites, _, _ = open_sites(cfg0.scenario, cfg0.data.dir, int(cfg0.seed), cfg0.data.n_subjects)
    n_subjects = sum(s.summary.n_subjects for s in sites.values())
    print(
        f"scenario {args.scenario}: {len(sites)} sites, {n_subjects} subjects ({args.n_subjects} per site); "
        f"model {args.model}, {args.steps} steps x batch {args.batch_size}, max {args.max_tokens} tokens, "
        f"seeds {args.seeds}"
    )
    vocab = agree_vocabulary(sites, int(cfg0.data.min_subjects))
    modalities = federation_modalities([s.modalities for s in sites.values()], vocab)
    seqs = {
        layout: {
            n: SiteSequences.from_site(s, vocab, tokens=token_settings(cfg0), per_event=per_event)
            for n, s in sites.items()
        }
        for layout, per_event in LAYOUTS.items()
    }
    cov = {layout: coverage(sites, args.max_tokens, per_event) for layout, per_event in LAYOUTS.items()}
    tasks = {k: t for k, t in job_tasks(cfg0, []).items() if isinstance(t, OnsetTask)}
    # One set of rows (subjects, prediction times, labels); each layout reads them with its own sequences.
    rows = build_eval_set(
        {n: (sites[n], seqs["day"][n]) for n in sites}, tasks, n_per_subject=args.n_per_subject, seed=int(cfg0.seed)
    )
    data = {
        layout: EvalSet(sites=[dataclasses.replace(p, seqs=seqs[layout][p.name]) for p in rows.sites], tasks=rows.tasks)
        for layout in LAYOUTS
    }
    print(f"setup {time.perf_counter() - t_start:.0f} s: vocabulary {vocab.vocab_size}, {len(rows)} evaluation rows")

    results: dict[tuple[str, int], MethodResult] = {}
    for seed in args.seeds:
        cfg = job_config(args, seed)
        mcfg = model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True), source=f"model={args.model}")
        for layout in LAYOUTS:
            t0 = time.perf_counter()
            loader = pooled_train_loader(cfg, sites, seqs[layout])
            out = args.out / f"{layout}-seed{seed}"
            model, _, history = pretrain(cfg, mcfg, vocab, loader, out, torch.device("cpu"), modalities)
            t1 = time.perf_counter()
            res, _, _ = evaluate_model_methods(cfg, data[layout], {"pretrained": model}, vocab)
            results[(layout, seed)] = res["pretrained"]
            loss = np.mean([h["total"] for h in history[-10:]]) if history else float("nan")
            print(
                f"seed {seed} {layout}: pretraining {t1 - t0:.0f} s (last loss {loss:.3f}), "
                f"probes {time.perf_counter() - t1:.0f} s"
            )

    # Tasks that count: enough held_out positives (the same rows in both layouts and every seed).
    first = results[("day", args.seeds[0])]
    n_pos = {k: int(first.predictions[k][0].sum()) for k in first.predictions}
    subject = rows.subject_keys()
    print("\nheld_out positives per task: " + ", ".join(f"{k} {n_pos.get(k, 0)}" for k in sorted(tasks)))

    # Also every task with a held_out positive: noisy, but never an empty table on a small run.
    for least in dict.fromkeys([args.min_positives, 1]):
        print_table(args, results, subject, sorted(k for k, n in n_pos.items() if n >= least), least)
    # The held_out scores, for another look without retraining.
    np.savez_compressed(
        args.out / "predictions.npz",
        **{
            f"{layout}.{seed}.{k}.{part}": v
            for (layout, seed), r in results.items()
            for k, (y, p) in r.predictions.items()
            for part, v in (("y", y), ("p", p))
        },
    )
    print("\n| layout | median days visible | q25 | q75 | median record days | whole record seen | rows per token |")
    print("|---|---|---|---|---|---|---|")
    for layout, c in cov.items():
        print(
            f"| {layout} | {c['median_days']:.0f} | {c['q25_days']:.0f} | {c['q75_days']:.0f} | "
            f"{c['median_history_days']:.0f} | {100 * float(c['fraction_full_history']):.0f}% | "
            f"{float(c['mean_rows_per_token']):.1f} |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
