"""One site does not set the federation's evaluation numbers (issue 67, break 2): a deployed
site's held-out rows were bounded only by the timed rows it declared itself, so a 150-subject
site claiming n = 30,399 took the pooled AUROC to 1.000 and the n-weighted mean to 0.998, a site
declaring 10^9 subjects could claim n = 10^9, and even the documented edge n = 600 at 150
subjects moved the pooled AUROC to 0.972. Replayed in process through the server's own judge
(server/evaluation.judge_eval_replies) and summaries: each claim is rejected or capped
(healthfm_core/protocol/site_share.py), the pooled figures stay within the cap's bound of the
honest sites' and do not move however far past the cap the claim goes, and the per-site table,
the median and the cap are beside them in evaluation.json's form, summary.md and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.eval_replies import KEY, honest_reply, inflated_reply

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.eval.federation_auroc import federation_aurocs
from healthfm_core.protocol import (
    EvalConfig,
    EvalReply,
    SiteCapabilities,
    aggregate_site_metrics,
    largest_row_share,
    median_site_metrics,
)
from server.deploy.dashboard.view import evaluation_view
from server.eval_counts import DeclaredCounts
from server.evaluation import judge_eval_replies
from server.model_card import pooled_lines
from server.runlog import EventLog, read_events, write_summary

SUBJECTS = 150  # every site of the red team's federation
TIMED_ROWS = 40_000  # what a 150-subject site declares at setup (its events and epochs)
FACTOR = 2.0  # the documented share cap: a site weighs at most 2 x the others' median


def _worst_share(sites: int) -> float:
    """The documented worst share of one of `sites` sites (docs/coordinator.md), written out here
    as an independent reference: F / (F + floor((k + 1) / 2))."""
    return FACTOR / (FACTOR + (sites + 1) // 2)


def _honest() -> dict[str, EvalReply]:
    """Three honest 150-subject sites: 1.1-1.3 held-out rows a subject, 20% positives."""
    return {
        "a": honest_reply(1, 180, 1.2, prevalence=0.2, subjects=SUBJECTS),
        "b": honest_reply(2, 165, 0.9, prevalence=0.2, subjects=SUBJECTS),
        "c": honest_reply(3, 195, 1.5, prevalence=0.2, subjects=SUBJECTS),
    }


def _cfg() -> EvalConfig:
    return EvalConfig(round=2, tasks=resolve_tasks(["t2d"]), setup_sha256="ab" * 32, score_bins=50)


def _judge(per_site: dict[str, EvalReply], declared_subjects: int = SUBJECTS) -> dict[str, EvalReply]:
    """The server's judgement of the replies; the attacker z declared `declared_subjects` and as
    many timed rows as its claim needs (a deployed site's own declaration: its rows bound)."""
    declared = {s: DeclaredCounts(SUBJECTS, TIMED_ROWS) for s in per_site}
    claimed = per_site["z"].tasks[KEY].n if "z" in per_site else 0
    declared["z"] = DeclaredCounts(declared_subjects, max(TIMED_ROWS, claimed))
    accepted, rejected = judge_eval_replies({s: r.to_records() for s, r in per_site.items()}, _cfg(), declared)
    assert not rejected, rejected
    return accepted


def _figures(per_site: dict[str, EvalReply]) -> tuple[float, float]:
    """(pooled AUROC, n-weighted mean AUROC) as the server records them."""
    pooled = federation_aurocs([KEY], per_site)[KEY].auroc
    assert pooled is not None
    return pooled, aggregate_site_metrics(per_site)[f"{KEY}.auroc"]


def _pair_share(per_site: dict[str, EvalReply], site: str) -> tuple[float, float]:
    """The site's share of the pooled AUROC's positive and negative weights, as recorded."""
    table = federation_aurocs([KEY], per_site)[KEY].per_site
    pos = table[site].weight_positives / sum(line.weight_positives for line in table.values())
    neg = table[site].weight_negatives / sum(line.weight_negatives for line in table.values())
    return pos, neg


@pytest.mark.parametrize(
    ("n", "subjects", "declared"),
    [(30_399, SUBJECTS, SUBJECTS), (10**9, 10**6, 10**8), (600, SUBJECTS, SUBJECTS)],
    ids=["30399-rows-at-150-subjects", "a-billion-rows-at-the-most-subjects-a-site-may-declare", "600-rows-edge"],
)
def test_a_site_claiming_any_n_moves_the_pooled_figures_by_at_most_its_capped_share(
    n: int, subjects: int, declared: int
) -> None:
    honest = _honest()
    pooled_h, mean_h = _figures(honest)
    sites = {**honest, "z": inflated_reply(n, subjects)}
    accepted = _judge(sites, declared)  # within the bounds: accepted, and capped
    pooled, mean = _figures(accepted)
    share = _worst_share(len(accepted))
    assert mean - mean_h <= share * (1.0 - mean_h) + 1e-12  # today: 0.98 of the weight for n = 30,399
    s_pos, s_neg = _pair_share(accepted, "z")
    assert s_pos <= share + 1e-12 and s_neg <= share + 1e-12
    # The pooled AUROC moves by at most the pairs that involve the site; the mean by its share.
    assert abs(pooled - pooled_h) <= 1 - (1 - s_pos) * (1 - s_neg) + 1e-12
    # Its weight is exactly 2 x the others' median where it claims more (the rule as documented).
    positives = {s: accepted[s].tasks[KEY].positives or 0 for s in accepted}
    line = federation_aurocs([KEY], accepted)[KEY].per_site["z"]
    assert line.weight_positives == min(positives["z"], FACTOR * np.median([positives[s] for s in "abc"]))
    print(f"n={n:,}: pooled AUROC {pooled_h:.3f} -> {pooled:.3f}, n-weighted mean {mean_h:.3f} -> {mean:.3f}")


def test_past_the_cap_a_larger_claim_changes_nothing() -> None:
    """30,399 rows and 10^9 rows weigh the same: the cap, not the claim, sets the site's weight,
    and the median over sites is the honest sites' neighbour whatever the claim."""
    honest = _honest()
    small = _judge({**honest, "z": inflated_reply(30_399, SUBJECTS)})
    huge = _judge({**honest, "z": inflated_reply(10**9, 10**6)}, 10**8)
    assert _figures(small) == _figures(huge)
    assert median_site_metrics(small) == median_site_metrics(huge)
    honest_values = sorted(r.tasks[KEY].auroc or 0.0 for r in honest.values())
    assert honest_values[1] <= median_site_metrics(huge)[f"{KEY}.auroc"] <= 1.0


def test_a_federation_of_similar_honest_sites_gets_exactly_the_uncapped_figures() -> None:
    """No honest site here is more than twice the others' median: the figures are the ones
    without any cap, bit for bit (the pooled table's weights are the sites' own counts)."""
    honest = _honest()
    pooled = federation_aurocs([KEY], honest)[KEY]
    assert pooled.capped_sites == [] and pooled.rows == sum(r.tasks[KEY].n for r in honest.values())
    weights = {s: r.tasks[KEY].n for s, r in honest.items()}
    values = {s: r.tasks[KEY].auroc or 0.0 for s, r in honest.items()}
    expected = sum(weights[s] * values[s] for s in honest) / sum(weights.values())
    assert aggregate_site_metrics(honest)[f"{KEY}.auroc"] == expected


def test_a_site_declaring_a_billion_subjects_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match="subjects.ehr"):
        SiteCapabilities.from_flat({"site": "z", "modalities": ["ehr"], "subjects.ehr": 10**9, "rows": 0})


def test_the_summary_the_model_card_and_the_dashboard_show_the_cap_the_median_and_each_site(tmp_path: Path) -> None:
    """Beside every pooled figure: summary.md's pooled AUROC and n-weighted rows name the capped
    site with its weight and the median; the model card's pooled table the same; the dashboard's
    view the pooled line and each pooled site's claims and weights."""
    accepted = _judge({**_honest(), "z": inflated_reply(30_399, SUBJECTS)})
    asked = sorted(accepted)
    pooled = {KEY: federation_aurocs([KEY], accepted, asked)[KEY].model_dump()}
    record = {
        "round": 2,
        "sites": {s: r.to_records() for s, r in accepted.items()},
        "aggregated": aggregate_site_metrics(accepted),
        "median": median_site_metrics(accepted),
        "largest_share": largest_row_share(accepted),
        "federation": pooled,
        "rejected": {},
        "tasks": [KEY],
        "binary_tasks": [KEY],
        "asked_sites": asked,
        "score_bins": 50,
        "score_scale": "logit",
    }
    out = tmp_path / "run"
    EventLog(out / "rounds.jsonl").write("evaluate", **record)
    (out / "evaluation.json").write_text(json.dumps(record))
    summary = write_summary(out).read_text()
    weight = largest_row_share(accepted)[KEY]["capped"]["z"]
    assert f"z {weight:.0f}" in summary and "2 x the median of the other sites' rows" in summary
    line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {KEY} | 0."))
    assert f"| {pooled[KEY]['median_site_auroc']:.3f} |" in line and "z: positives 15,199 -> " in line
    card = "\n".join(pooled_lines(record))
    assert "z: positives 15,199 -> " in card and f"{pooled[KEY]['median_site_auroc']:.3f}" in card
    absent = {e["round"]: e.get("absent") or {} for e in read_events(out / "rounds.jsonl") if e["event"] == "evaluate"}
    view = evaluation_view(out, absent)
    assert view is not None and view.pooled_sites[KEY]["z"].capped and "capped: z" in view.federation[KEY]
    assert not view.pooled_sites[KEY]["a"].capped
