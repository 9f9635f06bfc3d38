"""A site's evaluation scored on every labelled held-out row against the cap on held_out too.

Since issue 42 held_out is scored on every row ACES gives (as MEDS-DEV scores); train and tuning
stay capped at EvalConfig.n_per_subject rows a subject (what the probe is fitted and tuned on).
Before, held_out was capped as well. This times one site's evaluation (the model's forward passes
over the rows, the probes, meds-evaluation's scoring and MEDS-Tab) both ways, on the same labels,
and prints the rows, forward passes and seconds of each.

    python -m simulations.synthetic /tmp/fed --scenario default      # 4 sites x 2000 subjects
    python benchmarks/held_out_rows.py /tmp/fed/sites/city_hospital [--tasks onset_t2d_90d,...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from client.site_runtime import SiteConfig, SiteRuntime  # noqa: E402
from healthfm_core.data.labels.task_spec import resolve_tasks  # noqa: E402
from healthfm_core.data.labels.tasks import cap_rows_per_subject  # noqa: E402
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.model.healthfm import init_model  # noqa: E402
from healthfm_core.protocol import EvalConfig, FederationSetup  # noqa: E402
from healthfm_core.terms.groups import parameter_group  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402

DEFAULT_TASKS = ("onset_t2d_90d", "onset_cad_90d", "onset_hypertension_90d", "onset_copd_90d")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("site", type=Path)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rt = SiteRuntime(SiteConfig(site_root=args.site, eval_dir=Path(tempfile.mkdtemp(prefix="held-out-rows-"))))
    setup = FederationSetup(
        vocabulary=build_vocabulary([rt.code_stats()], min_subjects=10),
        model=load_model_config(args.model),
        model_seed=0,
    )
    cfg = EvalConfig(round=1, tasks=resolve_tasks(args.tasks.split(",")), setup_sha256=setup.sha256, n_boot=100)
    init = init_model(setup).state_dict()
    model = rt.model(setup, {k: v.numpy() for k, v in init.items() if parameter_group(k) in rt.groups})
    rt.sequences(setup)
    every_held = rt.labels(cfg)  # held_out whole (the evaluation now)
    n = int(cfg.n_per_subject) if cfg.n_per_subject != "all" else None
    capped = {k: cap_rows_per_subject(t, n, cfg.seed) if isinstance(t, pa.Table) else t for k, t in every_held.items()}
    print(f"site {args.site.name}, tasks {args.tasks}, {args.model}, train and tuning at {cfg.n_per_subject} a subject")
    print(
        f"{'held_out':<10}{'rows':>8}{'held':>8}{'passes':>8}{'forward':>9}{'probes':>8}{'scoring':>8}{'meds_tab':>9}{'total':>8}"
    )
    for name, labels in (("capped", capped), ("every row", every_held)):
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = rt.evaluate_tasks(setup, model, cfg, labels=labels)
            total = time.perf_counter() - t
            held = sum(m.n for m in res.metrics.values())
            s = res.seconds
            print(
                f"{name:<10}{res.num_examples:>8}{held:>8}{res.num_passes:>8}{s['forward']:>9.1f}{s['probes']:>8.2f}"
                f"{s['scoring']:>8.2f}{s['meds_tab']:>9.1f}{total:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
