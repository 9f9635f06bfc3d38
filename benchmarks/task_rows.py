"""Rows and positives of the onset tasks per scenario, task and horizon, before and after issue 42.

Before: the task files as of bcbcb45 (trigger `_ANY_EVENT`: a row at every timed event, birth
included). After: configs/tasks/ (trigger `clinical_event`, at least one clinical event before).
Every row ACES gives, all splits; "at birth": rows whose prediction time is the subject's timed
MEDS_BIRTH; "held_out": the held_out split's rows (what is scored).

    python benchmarks/task_rows.py OUT_DIR --before-dir DIR_WITH_OLD_YAMLS [--n-subjects 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from healthfm_core.data.labels.aces_tasks import TASK_DIR, aces_labels_shared, load_task
from healthfm_core.data.sites.site import open_site
from simulations.synthetic import generate_federation

TASKS = ("t2d", "cad", "hypertension", "copd")


def counts(labels: pl.DataFrame, births: pl.DataFrame, held: pl.Series) -> tuple[int, int, int, int, int]:
    """rows, positives, rows at birth, held_out rows, held_out positives."""
    at_birth = labels.join(births, on=["subject_id", "prediction_time"], how="semi").height
    h = labels.filter(pl.col("subject_id").is_in(held.implode()))
    return labels.height, int(labels["boolean_value"].sum()), at_birth, h.height, int(h["boolean_value"].sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--before-dir", type=Path, required=True)
    ap.add_argument("--n-subjects", type=int, default=200)
    ap.add_argument("--scenarios", nargs="+", default=["default", "hospital", "mimic"])
    args = ap.parse_args()
    before = [load_task(args.before_dir / f"{t}.yaml") for t in TASKS]
    after = [load_task(TASK_DIR / f"{t}.yaml") for t in TASKS]
    print(
        "| scenario | task | horizon | rows before | rows after | at birth before | positives before | positives after | held_out rows before | held_out rows after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in args.scenarios:
        out = args.out / scenario
        if not (out / "manifest.json").exists():
            generate_federation(out, scenario, seed=0, n_subjects=args.n_subjects, progress=False)
        total: dict[tuple[str, int], list[int]] = {}
        for root in sorted(p for p in (out / "sites").iterdir() if p.is_dir()):
            site = open_site(root)
            events = pl.from_arrow(site.read_events(columns=["subject_id", "time", "code"]))
            births = events.filter(pl.col("code") == "MEDS_BIRTH").select(
                "subject_id", pl.col("time").cast(pl.Datetime("us")).alias("prediction_time")
            )
            held = pl.Series(site.held_out_subjects())
            for which, tasks in ((0, before), (1, after)):
                for name, labels in zip(TASKS, aces_labels_shared(tasks, root), strict=True):
                    for h, table in labels.items():
                        c = counts(pl.from_arrow(table), births, held)
                        acc = total.setdefault((name, h), [0] * 10)
                        for i, v in enumerate(c):
                            acc[i * 2 + which] += v
        for (name, h), a in total.items():
            # a: rows b/a, pos b/a, birth b/a, held rows b/a, held pos b/a
            print(
                f"| {scenario} | {name} | {h} | {a[0]} | {a[1]} | {a[4]} | {a[2]} | {a[3]} | {a[6]} | {a[7]} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
