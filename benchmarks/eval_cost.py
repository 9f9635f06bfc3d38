"""Federated evaluation against a training round, per site, on one machine, in one run.

    python -m simulations.synthetic /tmp/fed --scenario default      # 4 sites x 2000 subjects
    python benchmarks/eval_cost.py /tmp/fed/sites                           # the federation's default eval_tasks (server/config.py)
    python benchmarks/eval_cost.py /tmp/fed/sites --tasks wearable_resting_hr --sites wearable_clinic,biobank

For each site (the site runtime the ClientApp uses, sequences prepared first and not timed):
  round      one training round: --local-steps steps of --batch-size (SiteRuntime.train), the
             median of --round-repeats rounds (one round alone varied 1.2-2.6 s at one site)
  labels     the tasks' labels at the site (once per run: the runtime keeps them), each MEDS shard
             read once for all ACES tasks (aces_labels_shared)
  per_task   the same labels with ACES reading the shards itself, per task and variant (the
             path before the shared read); checked equal to `labels`
  embed      evaluation given the labels: embeddings, probes, meds-evaluation scoring, with each
             distinct wearable patch pooled once (healthfm_core/eval/patch_reuse.py) and a
             subject's rows embedded in shared forward passes (healthfm_core/eval/row_embeddings.py)
  per_row    the same with one forward pass per row (the path before shared passes)
  plain      the same as per_row without patch reuse: every patch encoded where a sample asks for it
  hr_read    what a resting-HR task cost a site without heart rate before the statistics check:
             reading its epochs and labelling them (0 rows)
  lab_cut    the labels of the capped evaluation's subject sample only (--max-subjects, default the
             coordinator's eval_max_subjects: at most that many subjects per split; their epochs read)
  capped     `embed` on that sample
  rows       samples embedded, full -> capped; passes: the forward passes that embedded the full rows
  forward / probes / scoring   `embed`'s parts: the model's forward passes over the rows (with
             patch reuse), the linear probes' fits, meds-evaluation's scoring
  fwd/round  `forward` alone against the round: what a full evaluation costs however fast its
             probes and scoring, unless it embeds fewer subjects (docs/performance.md)
and checks that `per_row` and `plain` give the same metrics, that `embed`'s differ from them by at
most METRIC_TOL (its embeddings equal theirs to float rounding: a probe refit on them moves in
the last digits), and that both label paths give the same tables (`same`). The totals compare evaluation (labels + embed) and the capped evaluation
(lab_cut + capped) with a round, summed over sites and for the slowest site (a simulation with
one actor per site waits for the slowest); `embed/round` and `capped/round` leave out the labels,
which a site extracts once per run and keeps. The server asks with batch size max(batch, 32).
meds-evaluation's import (scikit-learn, scipy), once per site process, is timed and printed
apart, before the rest.
--no-baselines skips `per_task`, `per_row` and `plain`.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.site_runtime import SiteConfig, SiteRuntime  # noqa: E402
from healthfm_core.data.labels.aces_tasks import aces_labels  # noqa: E402
from healthfm_core.data.labels.task_spec import aces_task, resolve_tasks  # noqa: E402
from healthfm_core.data.labels.tasks import (  # noqa: E402
    cap_rows_per_subject,
    rows_per_subject,
    wearable_regression_labels,
)
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.eval.site_eval import _may_hold_heart_rate, task_labels_at_site  # noqa: E402
from healthfm_core.model.healthfm import init_model  # noqa: E402
from healthfm_core.protocol import EvalConfig, FederationSetup, RoundConfig  # noqa: E402
from healthfm_core.terms.groups import parameter_group  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from healthfm_core.terms.task_spec import TaskSpec, horizon_key  # noqa: E402
from server.config import DEFAULT_EVAL_MAX_SUBJECTS, DEFAULT_EVAL_TASKS  # noqa: E402

DEFAULT_TASKS = list(DEFAULT_EVAL_TASKS)  # the federation's default tasks (server/config.py)


def per_task_labels(site, specs: list[TaskSpec], n_per_subject: int | str, seed: int) -> dict:
    """The labels with ACES reading every shard per task and variant (aces_labels), capped as the
    evaluation caps them (train and tuning, held_out whole), the rest as task_labels_at_site gives
    them, in the same key order."""
    rest = task_labels_at_site(site, [s for s in specs if s.kind != "aces"], n_per_subject=n_per_subject, seed=seed)
    cap, held = rows_per_subject(n_per_subject), site.held_out_subjects()
    out = {}
    for spec in specs:
        if spec.kind == "aces":
            out.update(
                {
                    horizon_key(spec.name, h): cap_rows_per_subject(t, cap, seed, every_row_of=held)
                    for h, t in aces_labels(aces_task(spec), site.root).items()
                }
            )
        else:
            out[spec.name] = rest[spec.name]
    return out


def _same_labels(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        (x == y) if not hasattr(x, "equals") or not hasattr(y, "equals") else x.equals(y)
        for x, y in zip(a.values(), b.values(), strict=True)
    )


METRIC_TOL = 1e-3  # shared passes against one pass per row: AUROC, AUPRC, ECE, R^2


def _metric_gap(a: dict, b: dict) -> float:
    """Largest difference between two sites' metrics (inf when their task keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    gaps = [0.0]
    for key in a:
        x, y = a[key].model_dump(), b[key].model_dump()
        for f in x:
            if isinstance(x[f], float) and isinstance(y[f], float):
                nan_x, nan_y = math.isnan(x[f]), math.isnan(y[f])
                gaps.append(0.0 if nan_x and nan_y else math.inf if nan_x or nan_y else abs(x[f] - y[f]))
    return max(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sites_dir", type=Path, help="a directory of MEDS site roots")
    ap.add_argument("--sites", default="", help="comma-separated site names (default: all)")
    ap.add_argument(
        "--tasks",
        default="",
        help="comma-separated task names (default: the federation's, server/config.py DEFAULT_EVAL_TASKS)",
    )
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--local-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--round-repeats", type=int, default=3, help="rounds timed per site; `round` is their median")
    ap.add_argument(
        "--max-subjects", type=int, default=DEFAULT_EVAL_MAX_SUBJECTS, help="the capped evaluation's budget"
    )
    ap.add_argument("--no-baselines", action="store_true", help="skip per_task and plain")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tasks = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    roots = sorted(p for p in args.sites_dir.iterdir() if (p / "metadata").is_dir())
    pred = Path(tempfile.mkdtemp(prefix="eval-cost-"))
    rts = {p.name: SiteRuntime(SiteConfig(site_root=p, site_name=p.name, eval_dir=pred)) for p in roots}
    vocab = build_vocabulary([r.code_stats() for r in rts.values()], min_subjects=10)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config(args.model), model_seed=0)
    cfg = EvalConfig(
        round=1,
        tasks=resolve_tasks(tasks),
        setup_sha256=setup.sha256,
        batch_size=max(args.batch_size, 32),
        n_boot=100,
        seed=0,
    )
    rc = RoundConfig(
        round=1,
        rounds=1,
        local_steps=args.local_steps,
        lr=1e-3,
        batch_size=args.batch_size,
        max_events=cfg.max_events,
        max_patches=cfg.max_patches,
        setup_sha256=setup.sha256,
    )
    capped_cfg = cfg.model_copy(update={"max_subjects": args.max_subjects})
    init = init_model(setup).state_dict()
    names = args.sites.split(",") if args.sites else list(rts)
    # Once per process, not per evaluation: imported before anything is timed, so the first
    # variant measured does not carry it (score_predictions imports it lazily).
    t = time.perf_counter()
    import meds_evaluation.evaluate  # noqa: F401

    print(f"meds-evaluation import (once per process, not in the times below): {time.perf_counter() - t:.1f} s")
    print(f"tasks: {', '.join(tasks)}")
    print(f"capped: at most {args.max_subjects} subjects per split")
    print(
        f"{'site':<18}{'round':>8}{'labels':>8}{'per_task':>9}{'embed':>8}{'per_row':>8}{'plain':>8}{'hr_read':>8}"
        f"{'lab_cut':>8}{'capped':>8}{'rows':>14}{'passes':>8}{'forward':>8}{'probes':>8}{'scoring':>8}"
        "  eval/round  capped_eval/round  embed/round  capped/round  fwd/round  same"
    )
    rounds, evals, capped, forwards = {}, {}, {}, {}
    for name in names:
        rt = rts[name]
        arrays = {k: v.numpy() for k, v in init.items() if parameter_group(k) in rt.groups}
        rt.sequences(setup)  # prepared before anything is timed
        laps = []
        for _ in range(args.round_repeats):
            t = time.perf_counter()
            rt.train(setup, arrays, rc)
            laps.append(time.perf_counter() - t)
        rounds[name] = statistics.median(laps)
        t = time.perf_counter()
        labels = rt.labels(cfg)
        t_labels = time.perf_counter() - t
        t = time.perf_counter()
        labels_cut = rt.labels(capped_cfg)  # the sample's labels only: its wearable epochs read
        t_labels_cut = time.perf_counter() - t
        t = time.perf_counter()
        labels_1 = labels if args.no_baselines else per_task_labels(rt.site, cfg.tasks, cfg.n_per_subject, cfg.seed)
        t_per_task = time.perf_counter() - t
        timed = {}
        results = {}
        # name: (reuse patches, shared passes, subject budget)
        variants = {"embed": (True, True, 0), "per_row": (True, False, 0), "plain": (False, False, 0)}
        variants["capped"] = (True, True, args.max_subjects)
        for variant, (reuse, shared, cap) in variants.items():
            if args.no_baselines and variant in ("per_row", "plain"):
                continue
            model = rt.model(setup, arrays)
            t = time.perf_counter()
            results[variant] = rt.evaluate_tasks(
                setup,
                model,
                cfg if cap == 0 else capped_cfg,
                out_dir=pred,
                labels=labels if cap == 0 else labels_cut,
                reuse_patches=reuse,
                shared_passes=shared,
            )
            timed[variant] = time.perf_counter() - t
        hr = "-"
        if (
            "wearable_resting_hr" in tasks
            and rt.site.wearable_files
            and not _may_hold_heart_rate(rt.site.wearable_files)
        ):
            t = time.perf_counter()
            wearable_regression_labels(rt.site.read_wearables(), target="resting_hr")
            hr = f"{time.perf_counter() - t:.1f}"
        full, cut = results["embed"], results["capped"]
        same = args.no_baselines or (
            results["per_row"].metrics == results["plain"].metrics
            and full.reasons == results["plain"].reasons
            and _metric_gap(full.metrics, results["per_row"].metrics) <= METRIC_TOL
            and _same_labels(labels, labels_1)
        )
        embed, embed_cut = timed["embed"], timed["capped"]
        per_row, plain = (f"{timed[v]:.1f}" if v in timed else "-" for v in ("per_row", "plain"))
        per_task = "-" if args.no_baselines else f"{t_per_task:.1f}"
        evals[name] = t_labels + embed
        capped[name] = t_labels_cut + embed_cut
        rows = f"{full.num_examples}->{cut.num_examples}"
        forward = full.seconds["forward"]
        forwards[name] = forward
        print(
            f"{name:<18}{rounds[name]:>8.1f}{t_labels:>8.1f}{per_task:>9}{embed:>8.1f}{per_row:>8}{plain:>8}{hr:>8}"
            f"{t_labels_cut:>8.1f}{embed_cut:>8.1f}{rows:>14}{full.num_passes:>8}"
            f"{forward:>8.1f}{full.seconds['probes']:>8.2f}{full.seconds['scoring']:>8.2f}"
            f"  {evals[name] / rounds[name]:>10.2f}  {capped[name] / rounds[name]:>17.2f}"
            f"  {embed / rounds[name]:>11.2f}  {embed_cut / rounds[name]:>12.2f}  {forward / rounds[name]:>9.2f}  {same}",
            flush=True,
        )
    print(
        f"all sites: evaluation {sum(evals.values()):.1f} s vs round {sum(rounds.values()):.1f} s "
        f"(x{sum(evals.values()) / sum(rounds.values()):.2f}); slowest site: evaluation {max(evals.values()):.1f} s "
        f"vs round {max(rounds.values()):.1f} s (x{max(evals.values()) / max(rounds.values()):.2f})"
    )
    print(
        f"forward passes alone: {sum(forwards.values()):.1f} s (x{sum(forwards.values()) / sum(rounds.values()):.2f} "
        f"of a round, all sites; slowest site x{max(forwards[s] / rounds[s] for s in rounds):.2f})"
    )
    print(
        f"capped at {args.max_subjects} subjects: evaluation {sum(capped.values()):.1f} s vs round "
        f"{sum(rounds.values()):.1f} s (x{sum(capped.values()) / sum(rounds.values()):.2f}); slowest site: "
        f"{max(capped.values()):.1f} s vs round {max(rounds.values()):.1f} s "
        f"(x{max(capped.values()) / max(rounds.values()):.2f})"
    )


if __name__ == "__main__":
    main()
