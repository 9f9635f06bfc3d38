"""One lying site in a real deployment does not set the federation's evaluation numbers (issue 67,
break 2): a SuperLink with TLS and node authentication behind nginx on 127.0.0.1, three sites
joined with `client.py join`, one of which (biobank) runs a Python whose `sitecustomize` rewrites
its own replies (what a site controlling its machine can do): its capabilities declare 1000 times
its timed rows, and its evaluate reply, whatever its own evaluation found (at this size it
withholds the task: too few held-out positives), claims 30,000 held-out rows of 30 subjects, half
of them positives ranked perfectly, with a histogram that adds up. The two honest sites score the
task.

The made-up reply is ACCEPTED: it is within every bound the server can check (30,000 rows <=
held_out_rows_per_subject 1,024 x the 30 subjects it says it scored; 30 subjects <= the subjects
it declared; its declared timed rows are 1000 times its own). What keeps it from setting the
federation's numbers is the share cap: it weighs at most 2 x the median of the other sites' rows
(each class's rows in the pooled AUROC), with two honest sites at most half of each class. The
pooled AUROC and the n-weighted mean are checked against the documented worst case around the
value of the honest sites alone, computed from their own replies in the run's events; the
per-site table, the median and the cap are beside the pooled figure in evaluation.json,
summary.md and the dashboard's page. Before the cap the pooled AUROC went to ~1.0 (this test
fails there)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_fixtures import CLIENT, REPO, SITES, Process, join_args, launch_args, run_coordinator
from starlette.testclient import TestClient

from healthfm_core.eval.federation_auroc import federation_aurocs
from healthfm_core.eval.outcomes import replies_from_event
from server.deploy.commands import read_launches, resume_command
from server.deploy.dashboard.app import create_app, state_for
from server.deploy.dashboard.nodes import NodesAnswer
from server.deploy.dashboard.view import Launch
from server.deploy.provision import FederationPaths
from server.runlog import read_events

pytestmark = pytest.mark.slow

SUBJECTS = 300  # a site: the tiny scenario's own size


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deployment fixtures' sites at the tiny scenario's 300 subjects. At the red team's 150 no
    site has the 5 held-out subjects of each class (min_report_positives) that
    onset_hypertension_365d needs: every honest site withholds it, and the liar has nobody to be
    capped against. At 300 hospital and genomics score it (`client.py check SITE --tasks
    configs/tasks/hypertension.yaml`), biobank withholds it (3 positive subjects)."""
    from simulations.synthetic import generate_federation

    manifest = generate_federation(tmp_path_factory.mktemp("data"), scenario="tiny", seed=0, n_subjects=SUBJECTS, progress=False)  # fmt: skip
    return {s.name: Path(s.root) for s in manifest.sites}


LIAR = "biobank"
HONEST = tuple(s for s in SITES if s != LIAR)
KEY = "onset_hypertension_365d"
MADE_UP_ROWS, MADE_UP_SUBJECTS = 30_000, 30
FACTOR = 2.0  # docs/coordinator.md: no site weighs more than twice the median of the other sites


def _worst_share(sites: int) -> float:
    """docs/coordinator.md's worst share of one of `sites` sites, written out here as an
    independent reference: 2 / (2 + floor((k + 1) / 2))."""
    return FACTOR / (FACTOR + (sites + 1) // 2)


# Runs in every Python process of the lying site: once a module below is imported, its reply
# builders are rewritten (an import hook: nothing heavy is imported before the site imports it).
SITECUSTOMIZE = f"""
import importlib.abc
import sys

ROWS, SUBJECTS = {MADE_UP_ROWS}, {MADE_UP_SUBJECTS}


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
        made_up = [*self.reasons, *self.tasks]  # whatever its own evaluation found
        out = {{k: v for k, v in out.items() if not k.startswith(tuple(task + "." for task in made_up))}}
        for task in made_up:
            out[task + ".n"], out[task + ".subjects"], out[task + ".auroc"] = ROWS, SUBJECTS, 0.999
            out[task + ".positives"] = ROWS // 2  # ranked perfectly: every positive above every negative
            out[task + ".histogram-minimum"] = max(1, self.min_subjects)
            out[task + ".histogram-bounds"] = [0, 1, 49, 50]
            out[task + ".histogram-positives"] = [0, 0, ROWS // 2]
            out[task + ".histogram-negatives"] = [ROWS // 2, 0, 0]
        out["tasks"] = len(made_up)
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


def _run(superlink: str, federation: FederationPaths, sites: dict[str, Path], tmp_path: Path) -> Path:
    """The three sites joined (the liar with its sitecustomize), one round and its evaluation
    launched; the run's out-dir."""
    liar_path = tmp_path / "liar-python"
    liar_path.mkdir()
    (liar_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    procs: dict[str, Process] = {}
    out = tmp_path / "run"
    try:
        for name in SITES:
            # The liar's processes (its SuperNode, its ClientApps) import its sitecustomize first.
            python = ["env", f"PYTHONPATH={liar_path}:{REPO}", sys.executable] if name == LIAR else [sys.executable]
            procs[name] = Process(
                [
                    *python,
                    str(CLIENT),
                    *join_args(federation, sites[name], name, superlink, tmp_path / f"state-{name}"),
                ],
                tmp_path / f"join-{name}.out",
            )
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        result = run_coordinator(*launch_args(federation, out, rounds=1), timeout=1000)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    finally:
        for proc in procs.values():
            proc.stop()
    return out


def _dashboard_results(federation: FederationPaths) -> str:
    """The dashboard's page of the federation, its results section."""

    def launches() -> list[Launch]:
        return [Launch(r.run_id, Path(r.out_dir), r.launched_at, r.resumed) for r in read_launches(federation)]

    state = state_for(
        federation.root, launches, lambda out: resume_command(federation, out), lambda: NodesAnswer({}, asked_at=1.0)
    )
    html = TestClient(create_app(state), base_url="http://127.0.0.1:8765").get("/").text
    start = html.index('<section id="results">')
    return html[start : html.index("</section>", start)]


def test_a_lying_sites_share_of_the_pooled_figures_is_capped_and_shown(
    superlink: str, federation: FederationPaths, sites: dict[str, Path], tmp_path: Path
) -> None:
    out = _run(superlink, federation, sites, tmp_path)
    [event] = [e for e in read_events(out / "rounds.jsonl") if e["event"] == "evaluate"]
    _, replies, _ = replies_from_event(event)
    evaluation = json.loads((out / "evaluation.json").read_text())

    # Both honest sites scored the task with a histogram: the liar has sites to be capped against.
    honest = {s: r for s, r in replies.items() if s != LIAR}
    scored = {s for s, r in honest.items() if KEY in r.tasks and KEY in r.histograms}
    assert scored == set(HONEST), {s: r.reasons.get(KEY) or r.histograms_withheld.get(KEY) for s, r in honest.items()}
    hists = {site: honest[site].histograms[KEY] for site in HONEST}
    pos = {site: sum(hist.positives) for site, hist in hists.items()}
    neg = {site: sum(hist.negatives) for site, hist in hists.items()}
    # Within the cap of each other: their pooled value, alone or beside the liar, weighs each as it claims.
    assert max(pos.values()) <= FACTOR * min(pos.values()) and max(neg.values()) <= FACTOR * min(neg.values())

    # The liar's reply: accepted, within the bounds (rows <= held_out_rows_per_subject x the
    # subjects it says it scored; subjects <= what it declared): the bounds stop absurd claims only.
    claim = replies[LIAR].tasks[KEY]
    assert (claim.n, claim.subjects, claim.positives) == (MADE_UP_ROWS, MADE_UP_SUBJECTS, MADE_UP_ROWS // 2)
    assert not evaluation["rejected"] and not event["rejected"], evaluation["rejected"]
    assert claim.n <= 1024 * MADE_UP_SUBJECTS

    # The pooled AUROC: the honest sites' pairs keep at least (1 - s_pos)(1 - s_neg) of the weight,
    # each s (the liar's share of a class) at most the worst share among 3 sites (1/2), so the
    # pooled value is (1 - q) t + q x, t the honest sites' pooled AUROC, x in [0, 1] (the liar's
    # pairs), q <= 3/4: never above t/4 + 3/4. Uncapped, the liar's 15,000 rows per class take q
    # to ~1 and the pooled value to ~1.0.
    truth = federation_aurocs([KEY], honest)[KEY].auroc
    pooled = evaluation["federation"][KEY]
    assert truth is not None and pooled["auroc"] is not None
    assert sorted(pooled["sites"]) == sorted(SITES)
    worst = _worst_share(len(SITES))
    q = 1 - (1 - worst) ** 2
    print(f"pooled AUROC: honest sites alone {truth:.3f}; with the liar {pooled['auroc']:.3f} (bound {(1 - q) * truth + q:.3f})")  # fmt: skip
    assert (1 - q) * truth - 1e-9 <= pooled["auroc"] <= (1 - q) * truth + q + 1e-9

    # The n-weighted mean: (1 - s) h + s 0.999, h the honest sites' mean weighed by their rows.
    n = {site: honest[site].tasks[KEY].n for site in HONEST}
    own = {site: r.tasks[KEY].auroc for site, r in replies.items()}  # each site's own AUROC
    assert all(a is not None for a in own.values()), own
    h = sum(n[site] * float(own[site] or 0) for site in HONEST) / sum(n.values())
    mean = evaluation["aggregated"][f"{KEY}.auroc"]
    print(
        f"n-weighted mean AUROC: honest sites alone {h:.3f}; with the liar {mean:.3f} (bound {(1 - worst) * h + worst:.3f})"
    )
    assert (1 - worst) * h - 1e-9 <= mean <= (1 - worst) * h + worst + 1e-9

    # Beside the pooled figures in evaluation.json: the cap, each site's weight, the median, the
    # per-site table. The liar weighs 2 x the honest sites' median rows (each class in the pooled AUROC).
    weights = evaluation["share_cap"]["weights"][KEY]
    assert weights[LIAR] == pytest.approx(FACTOR * float(np.median(list(n.values()))))
    assert all(weights[site] == n[site] for site in HONEST)  # the honest sites: their own rows
    assert "2 x the median of the other sites' rows" in evaluation["share_cap"]["rule"]
    share = evaluation["largest_share"][KEY]
    assert share["site"] == LIAR and LIAR in share["capped"] and share["share"] <= worst + 1e-12
    median = float(np.median([float(a or 0) for a in own.values()]))
    assert evaluation["median"][f"{KEY}.auroc"] == pytest.approx(median)
    assert pooled["median_site_auroc"] == pytest.approx(median)
    table = pooled["per_site"]
    assert set(table) == set(SITES) and table[LIAR]["rows"] == MADE_UP_ROWS
    assert table[LIAR]["weight_positives"] == pytest.approx(FACTOR * float(np.median(list(pos.values()))))
    assert table[LIAR]["weight_negatives"] == pytest.approx(FACTOR * float(np.median(list(neg.values()))))
    assert all((table[x]["weight_positives"], table[x]["weight_negatives"]) == (pos[x], neg[x]) for x in HONEST)

    # summary.md: the pooled AUROC's line with its median and the capped claim, the mean's line
    # with the liar's weight, and each site's own line.
    summary = (out / "summary.md").read_text()
    pooled_line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {KEY} | {pooled['auroc']:.3f} "))
    assert f"| {pooled['median_site_auroc']:.3f} |" in pooled_line
    assert f"{LIAR}: positives {MADE_UP_ROWS // 2:,} -> {table[LIAR]['weight_positives']:,.0f}" in pooled_line
    mean_line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {KEY} | auroc | {mean:.3f} "))
    assert f"| {evaluation['median'][f'{KEY}.auroc']:.3f} |" in mean_line and f"{LIAR} {weights[LIAR]:.0f}" in mean_line
    assert "### Per site and task" in summary
    for site, reply in replies.items():
        assert f"| {site} | {KEY} | {reply.tasks[KEY].n} |" in summary

    # The dashboard's page: the pooled AUROC with the median and the cap, each pooled site's line
    # with the liar's weight marked capped.
    results = _dashboard_results(federation)
    assert f"median over sites {pooled['median_site_auroc']:.3f}; capped: {LIAR}" in results
    lines = results[results.index(f'<table class="pooled-sites" data-task="{KEY}">') :]
    lines = lines[: lines.index("</table>")]
    for site in SITES:
        assert f'<tr data-site="{site}">' in lines
    liar_line = lines[lines.index(f'<tr data-site="{LIAR}">') :]
    liar_line = liar_line[: liar_line.index("</tr>")]
    assert f">{MADE_UP_ROWS}<" in liar_line and "(capped)" in liar_line
