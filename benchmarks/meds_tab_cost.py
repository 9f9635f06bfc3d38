"""What MEDS-Tab costs a site beside the probe: one site's evaluation of MEDS-DEV's nine tasks
(an untrained model: the probe's cost does not depend on its weights), once with MEDS-Tab and once
without; per task key the probe's fit and MEDS-Tab's fit + predict + score, and the shared
tabularisation, from the site's own timers.

    python benchmarks/meds_tab_cost.py /tmp/mt_mimic/sites/tertiary_icu [--dataset MIMIC-IV]
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.meds_dev_tasks import meds_dev_task_names
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, FederationSetup
from healthfm_core.terms.model_config import load_model_config

PER_KEY = re.compile(r"site \S+: (\S+): probe ([\d.]+) s, MEDS-Tab ([\d.]+) s")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _auroc(x: float | None) -> float:
    return float("nan") if x is None else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("site_root", type=Path)
    ap.add_argument("--dataset", default="MIMIC-IV")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    lines = _Lines()
    logging.getLogger("healthfm_core.eval.site_eval").addHandler(lines)
    logging.getLogger("healthfm_core.eval.site_eval").setLevel(logging.INFO)
    tasks = [f"meds-dev:{t}@{args.dataset}" for t in meds_dev_task_names()]
    rt = SiteRuntime(SiteConfig(site_root=args.site_root, eval_dir=Path(tempfile.mkdtemp(prefix="meds-tab-cost-"))))
    setup = FederationSetup(
        vocabulary=build_vocabulary([rt.code_stats()], min_subjects=10), model=load_model_config(args.model)
    )
    model = init_model(setup)
    cfg = EvalConfig(round=1, tasks=resolve_tasks(tasks), setup_sha256=setup.sha256, n_boot=100)
    labels = rt.labels(cfg)  # once, outside both timings
    for meds_tab in (False, True):
        lines.lines.clear()
        t = time.perf_counter()
        res = rt.evaluate_tasks(setup, model, cfg.model_copy(update={"meds_tab": meds_tab}), labels=labels)
        wall = time.perf_counter() - t
        s = res.seconds
        print(
            f"meds_tab={meds_tab}: evaluation {wall:.1f} s (forward {s['forward']:.1f}, probes {s['probes']:.2f}, "
            f"scoring {s['scoring']:.2f}, MEDS-Tab {s.get('meds_tab', 0.0):.1f}); {len(res.metrics)} keys scored"
        )
    print("\n".join(line for line in lines.lines if "tabularised" in line))
    print(f"{'task key':<48}{'probe s':>9}{'MEDS-Tab s':>12}{'probe AUROC':>13}{'MEDS-Tab AUROC':>16}")
    for line in lines.lines:
        if m := PER_KEY.search(line):
            key = m.group(1)
            metric = res.metrics[key]
            print(
                f"{key:<48}{float(m.group(2)):>9.2f}{float(m.group(3)):>12.2f}"
                f"{_auroc(metric.auroc):>13.3f}{_auroc(metric.meds_tab_auroc):>16.3f}"
            )


if __name__ == "__main__":
    main()
