"""One lying site in a real deployment does not set the federation's evaluation numbers (issue 67,
break 2): a SuperLink with TLS and node authentication behind nginx on 127.0.0.1, three sites
joined with `client.py join`, one of which (genomics) runs a Python whose `sitecustomize` rewrites
its own replies (what a site controlling its machine can do): its capabilities declare 1000 times
its timed rows, and its evaluate reply claims 40 times the held-out rows it scored, half of them
positives perfectly ranked, with a histogram that adds up. The run's evaluation.json accepts the
reply (within the bounds) and caps its share of every pooled figure; the per-site table, the
median and the cap are beside the pooled figure in evaluation.json, summary.md and the dashboard's
view."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_fixtures import CLIENT, REPO, SITES, Process, join_args, launch_args, run_coordinator

from healthfm_core.eval.federation_auroc import FederationAUROC, federation_aurocs
from healthfm_core.eval.outcomes import replies_from_event
from server.deploy.dashboard.view import evaluation_view
from server.deploy.provision import FederationPaths
from server.runlog import read_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deployment fixtures' sites at the red team's size (150 subjects: the tiny fixtures'
    30 leave the task withheld at every site)."""
    from simulations.synthetic import generate_federation

    manifest = generate_federation(tmp_path_factory.mktemp("data"), scenario="tiny", seed=0, n_subjects=150, progress=False)  # fmt: skip
    return {s.name: Path(s.root) for s in manifest.sites}


LIAR = "genomics"  # a site whose tiny data gets a metric for KEY (hospital's is withheld)
KEY = "onset_hypertension_365d"
INFLATE = 40

# Runs in every Python process of the lying site: once a module below is imported, its reply
# builders are rewritten (an import hook: nothing heavy is imported before the site imports it).
SITECUSTOMIZE = f"""
import importlib.abc
import sys

INFLATE = {INFLATE}


def _capabilities(module):
    original = module.SiteCapabilities.to_flat

    def to_flat(self):
        out = original(self)
        out["rows"] = int(out["rows"]) * 1000
        return out

    module.SiteCapabilities.to_flat = to_flat


def _eval_reply(module):
    original = module.EvalReply.to_records

    def to_records(self):
        out = original(self)
        for task in self.reasons:  # a task withheld here: a metric made up for it
            out = {{k: v for k, v in out.items() if not k.startswith(task + ".")}}
            out[task + ".n"], out[task + ".subjects"], out[task + ".auroc"] = 30_000, 30, 0.999
            out[task + ".histogram-minimum"] = max(1, self.min_subjects)
            out[task + ".histogram-bounds"] = [0, 1, 49, 50]
            out[task + ".histogram-positives"], out[task + ".histogram-negatives"] = [0, 0, 15_000], [15_000, 0, 0]
            out[task + ".positives"] = 15_000
            out["tasks"] = int(out["tasks"]) + 1
        for task, m in self.tasks.items():
            n = m.n * INFLATE
            out[task + ".n"] = n
            if task in self.histograms:
                positives, bins = n // 2, 50
                out[task + ".positives"] = positives
                out[task + ".auroc"], out[task + ".auroc-low"], out[task + ".auroc-high"] = 0.999, 0.99, 1.0
                out[task + ".histogram-bounds"] = [0, 1, bins - 1, bins]
                out[task + ".histogram-positives"] = [0, 0, positives]
                out[task + ".histogram-negatives"] = [n - positives, 0, 0]
        return out

    module.EvalReply.to_records = to_records


_PATCHES = {{"healthfm_core.protocol.capabilities": _capabilities, "healthfm_core.protocol.eval_reply": _eval_reply}}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterImport())
"""


def test_a_lying_sites_share_of_the_pooled_figures_is_capped_and_shown(
    superlink: str, federation: FederationPaths, sites: dict[str, Path], tmp_path: Path
) -> None:
    liar_path = tmp_path / "liar-python"
    liar_path.mkdir()
    (liar_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    procs: dict[str, Process] = {}
    try:
        for name in SITES:
            extra = {"PYTHONPATH": f"{liar_path}:{REPO}"} if name == LIAR else None
            procs[name] = Process(
                [
                    sys.executable,
                    str(CLIENT),
                    *join_args(federation, sites[name], name, superlink, tmp_path / f"state-{name}"),
                ],  # fmt: skip
                tmp_path / f"join-{name}.out",
                extra,
            )
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        out = tmp_path / "run"
        result = run_coordinator(*launch_args(federation, out, rounds=1), timeout=1000)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    finally:
        for proc in procs.values():
            proc.stop()

    evaluation = json.loads((out / "evaluation.json").read_text())
    assert not evaluation["rejected"], evaluation["rejected"]  # within the bounds: accepted, capped
    _, per_site, _ = replies_from_event(evaluation)
    claimed = per_site[LIAR].tasks[KEY].n
    honest = {s: r for s, r in per_site.items() if s != LIAR}
    assert claimed >= 30_000 or all(claimed > 4 * r.tasks[KEY].n for r in honest.values() if KEY in r.tasks)

    # The n-weighted mean: the liar weighs 2 x the others' median rows, at most the worst share.
    others = [r.tasks[KEY].n for r in honest.values() if KEY in r.tasks]
    worst = 2.0 / (2.0 + (len(others) + 2) // 2)  # docs/coordinator.md: 2 / (2 + floor((k + 1) / 2))
    share = evaluation["largest_share"][KEY]
    assert others, f"only the lying site scored {KEY}: nothing to cap it against ({evaluation['share_cap']})"
    assert share["site"] == LIAR and LIAR in share["capped"] and share["share"] <= worst + 1e-12
    weights = evaluation["share_cap"]["weights"][KEY]
    assert weights[LIAR] == pytest.approx(2.0 * float(np.median(others)))
    assert "2 x the median of the other sites' rows" in evaluation["share_cap"]["rule"]

    # The pooled AUROC, where the sites released histograms: the liar's classes capped, the value
    # within the pairs it can take of the honest sites' pooled value, and the per-site table beside it.
    pooled = FederationAUROC.model_validate(evaluation["federation"][KEY])
    if LIAR in pooled.sites and len(pooled.sites) >= 2:
        line = pooled.per_site[LIAR]
        assert line.capped and pooled.capped_sites == [LIAR]
        s_pos = line.weight_positives / sum(p.weight_positives for p in pooled.per_site.values())
        s_neg = line.weight_negatives / sum(p.weight_negatives for p in pooled.per_site.values())
        pooled_worst = 2.0 / (2.0 + (len(pooled.sites) + 1) // 2)
        assert s_pos <= pooled_worst + 1e-12 and s_neg <= pooled_worst + 1e-12
        truth = federation_aurocs([KEY], {s: honest[s] for s in pooled.sites if s != LIAR})[KEY].auroc
        assert pooled.auroc is not None and truth is not None
        assert abs(pooled.auroc - truth) <= 1 - (1 - s_pos) * (1 - s_neg) + 1e-12
        print(f"pooled AUROC: honest sites {truth:.3f}, with the lying site capped {pooled.auroc:.3f}")
    else:
        print(f"no pooled AUROC with the lying site in this run (pooled {pooled.sites}, {pooled.not_pooled})")
    print(f"n-weighted: liar claims {claimed} rows, weighs {weights[LIAR]:.0f} ({100 * share['share']:.0f}%)")

    summary = (out / "summary.md").read_text()
    assert "capped (weight)" in summary and f"{LIAR} {weights[LIAR]:.0f}" in summary
    assert "### Per site and task" in summary and f"| {LIAR} | {KEY} | {claimed} |" in summary
    view = evaluation_view(out, read_events(out / "rounds.jsonl"))
    assert view is not None and LIAR in {row.site for row in view.rows}
    if pooled.per_site:
        assert view.pooled_sites[KEY][LIAR].capped and f"capped: {LIAR}" in view.federation[KEY]
