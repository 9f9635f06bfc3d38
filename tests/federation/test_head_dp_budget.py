"""A DP head run's budget (issue 40, break 4): its planned epsilon per site before any round (the
accountant over the run's planned steps), and a per-run limit each site enforces from its own
ledger (HeadRunConfig.dp_run_epsilon, `coordinator head --dp-run-epsilon`). Today a DP site's
epsilon went 5.9 -> 49.2 (cap 50) in 9 head rounds of one run, with no estimate shown beforehand.
Real Opacus accounting, real ledgers; the sites' ClientApps in this process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers.head_grid import BATCH, DELTA, KEY, SHA, WEIGHTS, head_config, in_process_grid, site_nodes, site_splits
from helpers.narrowing import present
from opacus.accountants import RDPAccountant

from healthfm_core.privacy.head import subject_index
from healthfm_core.privacy.ledger import PrivacyLedger
from server.config import PrivacyRequest
from server.head_app import SUMMARY_FILE, fit_keys


def _run_epsilon(state_dir: str, prefix: str) -> float:
    """The epsilon of the ledger's rounds under `prefix` alone (Opacus, from the rounds)."""
    acc = RDPAccountant()
    acc.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in PrivacyLedger(state_dir).data.rounds if r.run.startswith(prefix)]  # fmt: skip
    return float(acc.get_epsilon(DELTA))


@pytest.mark.slow  # real Opacus accounting at every round of two sites
@pytest.mark.usefixtures("serverapp_identity")
def test_a_dp_head_run_logs_each_sites_planned_epsilon_before_it_starts_and_spends_it(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    nodes = site_nodes(tmp_path, [50.0, 50.0])
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=1.1, delta=DELTA)).model_copy(
        update={"run_id": 7}
    )
    with caplog.at_level(logging.INFO, logger="healthfm"):
        fit_keys(in_process_grid(nodes), cfg, SHA, 5, [KEY], WEIGHTS)
    messages = [r.getMessage() for r in caplog.records]
    first_round = next(i for i, m in enumerate(messages) if "round 1: cumulative epsilon" in m)
    plans = [i for i, m in enumerate(messages) if "DP plan: site" in m]
    assert len(plans) == 2 and max(plans) < first_round
    plan = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["heads"][KEY]["dp_plan"]
    steps = cfg.planned_dp_steps()
    for i, node in enumerate(nodes):
        subjects = subject_index(present(site_splits(f"site{i}").train_subjects))[1]
        rate = BATCH / subjects
        acc = RDPAccountant()
        acc.history = [(1.1, rate, steps)]
        assert plan[f"site{i}"]["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
        assert plan[f"site{i}"]["sample_rate"] == pytest.approx(rate) and plan[f"site{i}"]["steps"] == steps
        # What the run spent at the site (its own ledger) is what the plan said.
        assert _run_epsilon(node["state-dir"], "head:7:") == pytest.approx(plan[f"site{i}"]["epsilon"], rel=1e-6)
        assert any(f"site{i}: epsilon {plan[f'site{i}']['epsilon']:.3f} over this head's {steps} steps" in m for m in messages)  # fmt: skip


@pytest.mark.slow  # real Opacus accounting at every round of two sites
@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_refuses_the_rounds_past_the_runs_epsilon_limit(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    nodes = site_nodes(tmp_path, [50.0, 50.0])
    limit = 6.0
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=0.7, delta=DELTA))
    cfg = cfg.model_copy(update={"run_id": 9, "dp_run_epsilon": limit})
    with caplog.at_level(logging.INFO, logger="healthfm"):
        fit_keys(in_process_grid(nodes), cfg, SHA, 5, [KEY], WEIGHTS)
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    head = summary["heads"][KEY]
    assert summary["privacy"]["run_epsilon_limit"] == limit
    assert all(p["epsilon"] > limit for p in head["dp_plan"].values())  # the plan said it would not fit
    assert any("OVER the run's limit 6" in r.getMessage() for r in caplog.records)
    for i, node in enumerate(nodes):
        spent = _run_epsilon(node["state-dir"], "head:9:")
        assert 0 < spent <= limit
        refusal = head["refused"][f"site{i}"]
        assert refusal["stage"] == "train.head" and "this run's epsilon after this round would be" in refusal["refused"]
        assert f"> its limit {limit:g}" in refusal["refused"]
        assert refusal["epsilon"] == pytest.approx(spent, rel=1e-6)  # fresh ledgers: the site's whole spend


def test_the_head_command_takes_the_runs_limit() -> None:
    import argparse

    from server.head_options import add_head_dp_args, head_dp_config

    parser = argparse.ArgumentParser()
    add_head_dp_args(parser)
    args = parser.parse_args(["--dp-target-epsilon", "4", "--dp-run-epsilon", "6"])
    assert head_dp_config(args)["dp_run_epsilon"] == 6.0
