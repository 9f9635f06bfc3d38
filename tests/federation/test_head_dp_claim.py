"""The head's DP claim is trusted only where DP was asked (issue 67, break 3;
server/head_app.FlowerSites.train, server/head_bounds.dp_step_bound). The exact step bound used to
apply only to a reply without an epsilon: in a run without DP, a head update carrying
epsilon/delta was bounded by the magnitude and 10x-median rules alone, and with two sites the
attacker moved |w| 2.05 -> 782 (cosine -0.22 to the honest head) and changed the chosen C. The
sites' ClientApps run in this process (real Opacus, real ledgers: InProcessGrid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.head_grid import DELTA, KEY, ROUNDS, SHA, WEIGHTS, head_config, in_process_grid, site_nodes

from healthfm_core.privacy.ledger import PrivacyLedger
from healthfm_core.protocol.head import MSG_TRAIN, HeadTask
from server.config import PrivacyRequest
from server.head_app import SUMMARY_FILE, fit_head, fit_head_on, fit_keys, head_sites

TASK = HeadTask(setup_sha256=SHA, tasks=[], key=KEY)
ATTACKER = 101  # site1


def _claim_dp_and_push(norm: float) -> Any:
    """The attacker's train.head reply: its honest head pushed `norm` along a fixed direction
    against the honest sites', with an epsilon and delta it never spent."""
    direction = -np.array([1.0, -0.5, 0.3, 0.2, -0.1])
    direction /= np.linalg.norm(direction)

    def corrupt(record: Any) -> None:
        record["weight"] = list(np.asarray(list(record["weight"]), np.float64) + norm * direction)
        record["epsilon"], record["delta"] = 0.5, DELTA

    return corrupt


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.usefixtures("serverapp_identity")
def test_a_dp_claim_in_a_run_without_dp_is_rejected_and_the_head_stays_the_honest_one(tmp_path: Path) -> None:
    """Two sites, no DP asked: the attacker's update claims DP and moves the head far. Rejected at
    its first round, the site takes no further part, the head is the honest site's, and heads.json
    names it as under that one site's control."""
    nodes = site_nodes(tmp_path, [None, None])
    honest, _ = fit_head(in_process_grid(nodes), TASK, 5, head_config(tmp_path / "honest"))
    out = tmp_path / "attacked"
    grid = in_process_grid(nodes, corrupt=(ATTACKER, _claim_dp_and_push(400.0)))
    result, sites = fit_head(grid, TASK, 5, head_config(out))
    w, h = result.probe.weight, honest.probe.weight
    print(f"|w| {np.linalg.norm(h):.3g} -> {np.linalg.norm(w):.3g}, cosine {_cosine(w, h):.3f}, C {honest.probe.c} -> {result.probe.c}")  # fmt: skip
    assert np.linalg.norm(w) < 3 * np.linalg.norm(h) and _cosine(w, h) > 0.9
    (rejection,) = sites.rejected["site1"]
    assert rejection["stage"] == MSG_TRAIN and rejection["round"] == 1
    assert "claims DP (epsilon 0.5) in a head run that did not ask for DP" in rejection["reason"]
    assert sites.contributors == {"site0"}
    fit_keys(in_process_grid(nodes, corrupt=(ATTACKER, _claim_dp_and_push(400.0))), head_config(out), SHA, 5, [KEY], WEIGHTS)  # fmt: skip
    assert json.loads((out / SUMMARY_FILE).read_text())["heads"][KEY]["under_holders_control"] == ["site0"]


@pytest.mark.usefixtures("serverapp_identity")
def test_in_a_dp_run_an_update_past_the_dp_step_bound_is_rejected_and_honest_dp_sites_never_are(
    tmp_path: Path,
) -> None:
    """DP asked (noise 1): the honest DP sites' updates, real DP-SGD with Opacus's noise, are all
    within the DP step bound in every round; the attacker's, 50 beyond its DP update, is not."""
    nodes = site_nodes(tmp_path, [20.0, 20.0, 20.0])
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=1.0, delta=DELTA))
    honest, sites = fit_head(in_process_grid(nodes), TASK, 5, cfg)
    assert sites.rejected == {} and sites.contributors == {"site0", "site1", "site2"}
    grid = in_process_grid(nodes, corrupt=(ATTACKER, _claim_dp_and_push(50.0)))
    result, attacked = fit_head(grid, TASK, 5, head_config(tmp_path / "out2", PrivacyRequest(noise_multiplier=1.0, delta=DELTA)))  # fmt: skip
    reasons = [r["reason"] for r in attacked.rejected["site1"]]
    assert len(reasons) == ROUNDS * 2 and all("under DP: noise multiplier at most 1" in r for r in reasons)
    assert np.linalg.norm(result.probe.weight) < 3 * np.linalg.norm(honest.probe.weight)


@pytest.mark.usefixtures("serverapp_identity")
def test_honest_dp_updates_stay_within_the_dp_step_bound_at_high_noise_and_small_batches(tmp_path: Path) -> None:
    """The bound against many honest DP rounds at a noise and a batch where the noise dominates
    (noise 4, 4 subjects a step): no honest update is rejected; the largest is well inside it."""
    nodes = site_nodes(tmp_path, [100.0, 100.0, 100.0])
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=4.0, delta=DELTA))
    cfg = cfg.model_copy(update={"dp_batch_size": 4, "rounds": 12, "local_steps": 3})
    _, sites = fit_head(in_process_grid(nodes), TASK, 5, cfg)
    assert sites.rejected == {} and len(sites.contributors) == 3


def test_the_dp_step_bound_covers_the_noise_of_every_step() -> None:
    """The bound's noise term against draws of the noise itself: 20,000 draws of one step's
    noise norm (std sigma C per value, width + 1 values, over the expected batch) never pass the
    part of the bound the noise is given."""
    from server.head_bounds import dp_step_bound

    rng = np.random.default_rng(0)
    width, sigma, clip, batch = 64, 2.0, 1.0, 16
    draws = np.linalg.norm(rng.normal(size=(20_000, width + 1)) * sigma * clip, axis=1) / batch
    bound = dp_step_bound(width, 1, 1.0, 0.0, 0.0, noise_multiplier=sigma, max_grad_norm=clip, batch_size=batch, subjects=400)  # fmt: skip
    clipped_part = dp_step_bound(width, 1, 1.0, 0.0, 0.0, noise_multiplier=1e-12, max_grad_norm=clip, batch_size=batch, subjects=400)  # fmt: skip
    assert draws.max() < bound - clipped_part
    assert bound < 3 * (sigma * clip * np.sqrt(width + 1) / batch + clipped_part)  # not vacuous


@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_whose_policy_needs_more_noise_than_the_run_accepts_refuses_before_spending(tmp_path: Path) -> None:
    nodes = site_nodes(tmp_path, [20.0, 20.0], mandatory=True)  # the policies' noise: 2.0
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=1.0, delta=DELTA))
    sites = head_sites(in_process_grid(nodes), TASK, 5, cfg)
    with pytest.raises(ValueError, match="no site scored a head"):  # every site refused its first round
        fit_head_on(sites, cfg)
    for site in ("site0", "site1"):
        assert "noise multiplier 2 is above the most this head run accepts, 1" in sites.refused[site]["refused"]
    assert all(PrivacyLedger(n["state-dir"]).data.rounds == [] for n in nodes)
    raised = cfg.model_copy(update={"dp_max_noise_multiplier": 2.0, "out_dir": tmp_path / "raised"})
    _, sites = fit_head(in_process_grid(nodes), TASK, 5, raised)
    assert sites.refused == {} and sites.rejected == {} and set(sites.epsilon) == {"site0", "site1"}
