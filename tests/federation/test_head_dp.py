"""DP for the federated task head (healthfm_core/privacy/head.py, client/head_app.py,
server/head_app.py): each site's train.head rounds run DP-SGD per subject and spend from the
site's durable ledger (its state directory, the pretraining's own) under its policy's cap; a
site that cannot train under DP refuses and the run says so; DP off changes nothing.

The sites' ClientApps run in this process (InProcessGrid: every stage, real Opacus and real
ledgers), and on Flower's simulation engine over Ray (slow: each site's rounds in Ray actor
processes, two runs in a row, one ledger per site on disk)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.head_grid import (
    BATCH,
    C_GRID,
    DELTA,
    KEY,
    ROUNDS,
    SHA,
    STEPS,
    WEIGHTS,
    head_config,
    in_process_grid,
    site_nodes,
    site_splits,
    synthetic_rows,
)
from helpers.narrowing import present

from healthfm_core.eval.federated_head import fit_federated_logistic
from healthfm_core.privacy.ledger import PrivacyLedger
from healthfm_core.protocol.head import HEAD_RECORD, MSG_TRAIN, HeadRoundRequest
from server.config import PrivacyRequest
from server.head_app import ROUNDS_FILE, SUMMARY_FILE, HeadRunConfig, fit_head, fit_head_on, fit_keys, head_sites


def ledger_rounds(node: Mapping[str, Any]) -> list:
    return PrivacyLedger(node["state-dir"]).data.rounds


@pytest.mark.usefixtures("serverapp_identity")
def test_dp_off_is_the_head_without_dp_and_spends_nothing(tmp_path: Path) -> None:
    """No DP asked, no site's DP mandatory: the sites with DP budgets and ledgers give bit for bit
    the head of sites without any (the head before DP existed), the one-process driver's to 1e-9
    (as test_head_over_flower), and no ledger is written."""
    nodes = site_nodes(tmp_path, [3.0, 3.0])
    result, sites = fit_head(in_process_grid(nodes), _task(), 5, head_config(tmp_path / "out"))
    bare = [{"site-name": n["site-name"]} for n in nodes]
    plain, _ = fit_head(in_process_grid(bare), _task(), 5, head_config(tmp_path / "plain"))
    np.testing.assert_array_equal(result.probe.weight, plain.probe.weight)
    assert (result.probe.bias, result.probe.c, result.probe.tuning_log_loss) == (
        plain.probe.bias, plain.probe.c, plain.probe.tuning_log_loss,
    )  # fmt: skip
    expected, _ = fit_federated_logistic({n["site-name"]: site_splits(n["site-name"]) for n in nodes}, C_GRID, ROUNDS, STEPS)  # fmt: skip
    np.testing.assert_allclose(result.probe.weight, expected.weight, rtol=0, atol=1e-9)
    assert sites.epsilon == {} and sites.refused == {}
    assert not any((Path(n["state-dir"]) / "privacy_ledger.json").exists() for n in nodes)
    # The request says DP is off and carries none of DP's settings (the one flat form sends every
    # field that is not None, protocol/flat.py): what a site reads back is the request without DP.
    request = HeadRoundRequest(
        **_task().model_dump(), mean=[0.0], scale=[1.0], round=1, weight=[0.0], bias=0.0, penalty=0.0, steps=1, lr=1.0
    )
    flat = request.to_flat()
    sent = {k: v for k, v in flat.items() if k.startswith("dp")}
    assert sent == {"dp": False, "dp-batch-size": 64, "dp-run": ""}, sent
    assert HeadRoundRequest.from_flat(flat) == request


def _task():  # noqa: ANN202
    from healthfm_core.protocol.head import HeadTask

    return HeadTask(setup_sha256=SHA, tasks=[], key=KEY)


@pytest.mark.usefixtures("serverapp_identity")
def test_dp_head_spends_from_each_sites_ledger_and_a_site_over_its_cap_refuses(tmp_path: Path) -> None:
    """DP asked at noise 1.0: each site reserves STEPS steps per round in its own ledger, at the
    rate of expected subjects / train SUBJECTS (the privacy unit), on top of what the ledger held
    already (the pretraining's spend); the heads.json epsilon is the ledger's. site2's cap is
    below one round's spend: it refuses the first train.head (nothing reserved), says why, and
    the head goes on without it."""
    nodes = site_nodes(tmp_path, [20.0, 20.0, 0.05])
    # site0 spent before (a pretraining round): the head adds to that same ledger.
    PrivacyLedger(nodes[0]["state-dir"]).commit(
        PrivacyLedger(nodes[0]["state-dir"]).reserve(
            round=1, run="pretrain", noise_multiplier=1.5, sample_rate=0.1, steps=4, max_grad_norm=1.0,
            delta=DELTA, epsilon_cap=20.0,
        ),
        4,
    )  # fmt: skip
    before = PrivacyLedger(nodes[0]["state-dir"]).epsilon(DELTA)
    out = tmp_path / "out"
    cfg = head_config(out, PrivacyRequest(noise_multiplier=1.0, delta=DELTA))
    fit_keys(in_process_grid(nodes), cfg, SHA, 5, [KEY], WEIGHTS)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    fitted = summary["heads"][KEY]
    assert set(fitted["train_rows"]) == {"site0", "site1", "site2"}  # site2 sent its stats
    assert summary["privacy"]["requested"] and summary["privacy"]["noise_multiplier"] == 1.0
    assert fitted["refused"]["site2"]["stage"] == MSG_TRAIN
    reason = fitted["refused"]["site2"]["refused"]
    assert reason.startswith("DP refused: epsilon after this round would be") and "cap 0.05" in reason
    assert fitted["refused"]["site2"]["epsilon"] == 0.0  # its spend so far: nothing
    assert ledger_rounds(nodes[2]) == []  # the refused round reserved nothing
    planned = ROUNDS * len(C_GRID)
    for i, node in enumerate(nodes[:2]):
        rounds = ledger_rounds(node)
        head = [r for r in rounds if r.run.startswith(f"head:{KEY}:")]
        assert len(head) == planned and all(r.status == "trained" and r.steps_taken == STEPS for r in head)
        subjects = len(np.unique(present(site_splits(f"site{i}").train_subjects)))
        assert all(r.sample_rate == pytest.approx(BATCH / subjects) and r.noise_multiplier == 1.0 for r in head)
        ledger = PrivacyLedger(node["state-dir"])
        assert fitted["epsilon"][f"site{i}"] == {"epsilon": pytest.approx(ledger.epsilon(DELTA)), "delta": DELTA}
    assert len(ledger_rounds(nodes[0])) == planned + 1  # the pretraining's round, then the head's
    assert fitted["epsilon"]["site0"]["epsilon"] > before > 0
    lines = [json.loads(x) for x in (out / ROUNDS_FILE).read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, planned + 1))
    assert all(set(x["epsilon"]) == {"site0", "site1"} for x in lines)
    eps = [x["epsilon"]["site1"]["epsilon"] for x in lines]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))  # cumulative: grows every round


@pytest.mark.usefixtures("serverapp_identity")
def test_dp_asked_of_a_site_without_a_budget_or_a_ledger_is_refused_never_trained_without_dp(
    tmp_path: Path,
) -> None:
    """site0 has a DP budget and a ledger; site1's policy has no DP budget; site2 has a budget but
    no state directory (no durable ledger). DP asked: site1 and site2 refuse their first round,
    saying why, and only site0's DP updates are averaged."""
    nodes = site_nodes(tmp_path, [20.0, None, 20.0])
    del nodes[2]["state-dir"]
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=1.0, delta=DELTA))
    grid = in_process_grid(nodes)
    _, sites = fit_head(grid, _task(), 5, cfg)
    assert "the server asks for DP but the site policy sets no privacy budget" in sites.refused["site1"]["refused"]
    assert "DP needs a durable privacy ledger" in sites.refused["site2"]["refused"]
    assert {s["stage"] for s in sites.refused.values()} == {MSG_TRAIN}
    assert set(sites.epsilon) == {"site0"}
    for node in (101, 102):  # stats, setup, the refused round: no update ever left them
        replies = [r for r in grid.replies if r.metadata.src_node_id == node]
        assert len(replies) == 3 and "refused" in replies[-1].content.config_records[HEAD_RECORD]


@pytest.mark.usefixtures("serverapp_identity")
def test_a_reply_without_its_epsilon_under_dp_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def strip(record: Any) -> None:
        del record["epsilon"], record["delta"]

    nodes = site_nodes(tmp_path, [20.0, 20.0])
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=1.0, delta=DELTA))
    with caplog.at_level(logging.INFO, logger="healthfm"):
        result, sites = fit_head(in_process_grid(nodes, corrupt=(101, strip)), _task(), 5, cfg)
    assert any("site1: train.head reply rejected: DP was asked but it reports no epsilon" in r.getMessage() for r in caplog.records)  # fmt: skip
    assert set(sites.epsilon) == {"site0"} and np.isfinite(result.probe.weight).all()


@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_whose_policy_makes_dp_mandatory_refuses_a_run_without_dp_and_trains_when_asked(tmp_path: Path) -> None:
    """No DP asked; the sites' policies make it mandatory (noise 2.0): the server trusts a DP
    update only in a run that asked for DP (issue 67), so each site refuses its first round,
    saying why, before reserving anything. Asked for DP at that noise, every round is DP at the
    policy's noise, spent in the ledger and reported; the head differs from the non-DP one."""
    nodes = site_nodes(tmp_path, [20.0, 20.0], mandatory=True)
    sites = head_sites(in_process_grid(nodes), _task(), 5, head_config(tmp_path / "unasked"))
    with pytest.raises(ValueError, match="no site scored a head"):
        fit_head_on(sites, head_config(tmp_path / "unasked"))
    for node in nodes:
        refusal = sites.refused[node["site-name"]]
        assert refusal["stage"] == MSG_TRAIN and "makes DP mandatory and this head run did not ask for DP" in refusal["refused"]  # fmt: skip
        assert ledger_rounds(node) == []
    cfg = head_config(tmp_path / "out", PrivacyRequest(noise_multiplier=2.0, delta=DELTA))
    result, sites = fit_head(in_process_grid(nodes), _task(), 5, cfg)
    assert set(sites.epsilon) == {"site0", "site1"} and sites.rejected == {}
    for node in nodes:
        rounds = ledger_rounds(node)
        assert len(rounds) == ROUNDS * len(C_GRID) and {r.noise_multiplier for r in rounds} == {2.0}
    plain, _ = fit_head(in_process_grid([{"site-name": n["site-name"]} for n in nodes]), _task(), 5, head_config(tmp_path / "p"))  # fmt: skip
    assert not np.array_equal(result.probe.weight, plain.probe.weight)


def synthetic_heads(grid: Any, cfg: HeadRunConfig) -> dict[str, Path]:
    """The ServerApp's work over the synthetic sites (no release folder: its setup and width)."""
    return fit_keys(grid, cfg, SHA, 5, [KEY], WEIGHTS)


@pytest.fixture
def ray_started() -> Any:
    from simulations.ray_start import RaySettings, start_ray

    start_ray(RaySettings(num_cpus=2))
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_started")
def test_dp_head_on_flowers_simulation_engine_spends_from_the_durable_ledgers_across_runs(tmp_path: Path) -> None:
    """Flower's simulation engine (the head's ServerApp, one ClientApp per site in Ray actor
    processes), three sites, DP asked, run twice: each site's ledger on disk holds every DP
    round of both runs (the second run's actors start from what the first wrote, so its epsilon
    is larger); site2's cap admits the first run but not all of the second: it refuses there (fail
    closed), heads.json says why, and its ledger never passes its cap."""
    from simulations.federated_head_run import run_head_simulation

    planned = ROUNDS * len(C_GRID)
    first_cap = PrivacyLedger(tmp_path / "probe")  # the epsilon of one run's rounds at site2's rate
    subjects2 = len(np.unique(present(site_splits("site2").train_subjects)))
    one_run = first_cap.projected_epsilon(DELTA, 1.0, BATCH / subjects2, planned * STEPS)
    nodes = site_nodes(tmp_path, [20.0, 20.0, one_run * 1.2])
    privacy = PrivacyRequest(noise_multiplier=1.0, delta=DELTA)
    spent: list[dict[str, Any]] = []
    for run in ("run1", "run2"):
        out = tmp_path / run
        heads = run_head_simulation(
            head_config(out, privacy), nodes, num_cpus=2, rows_of=synthetic_rows, fit=synthetic_heads
        )
        assert KEY in heads and heads[KEY].is_file()
        spent.append(json.loads((out / SUMMARY_FILE).read_text())["heads"][KEY])
    for i, node in enumerate(nodes[:2]):
        rounds = ledger_rounds(node)
        assert len(rounds) == 2 * planned and all(r.status == "trained" for r in rounds)
        ledger = PrivacyLedger(node["state-dir"])
        assert spent[1]["epsilon"][f"site{i}"]["epsilon"] == pytest.approx(ledger.epsilon(DELTA))
        assert spent[1]["epsilon"][f"site{i}"]["epsilon"] > spent[0]["epsilon"][f"site{i}"]["epsilon"]
    assert "site2" not in spent[0]["refused"] and len(spent[0]["epsilon"]) == 3
    refusal = spent[1]["refused"]["site2"]
    assert refusal["stage"] == MSG_TRAIN and refusal["refused"].startswith("DP refused: epsilon after this round")
    site2 = PrivacyLedger(nodes[2]["state-dir"])
    assert planned < len(site2.data.rounds) < 2 * planned
    assert site2.epsilon(DELTA) <= one_run * 1.2 and refusal["epsilon"] == pytest.approx(site2.epsilon(DELTA))


@pytest.mark.usefixtures("serverapp_identity")
def test_sites_whose_budget_runs_out_mid_grid_stop_the_grid_and_the_best_c_so_far_is_kept(tmp_path: Path) -> None:
    """Each site's cap admits the first C's rounds but not the second's: every site refuses during
    C=1.0, the grid stops there (no tuning loss of a C no site scored) and the head is C=0.1's;
    heads.json names every refusal, and no ledger passed its cap."""
    per_c = ROUNDS * STEPS
    spend = {}
    for i in range(3):
        rate = BATCH / len(np.unique(present(site_splits(f"site{i}").train_subjects)))
        fresh = PrivacyLedger(tmp_path / f"probe{i}")
        spend[i] = (
            fresh.projected_epsilon(DELTA, 1.0, rate, per_c),
            fresh.projected_epsilon(DELTA, 1.0, rate, 2 * per_c),
        )
    caps = [spend[i][0] * 1.01 for i in range(3)]
    assert all(cap < spend[i][1] for i, cap in enumerate(caps))  # the test's premise
    nodes = site_nodes(tmp_path, caps)
    out = tmp_path / "out"
    fit_keys(
        in_process_grid(nodes),
        head_config(out, PrivacyRequest(noise_multiplier=1.0, delta=DELTA)),
        SHA,
        5,
        [KEY],
        WEIGHTS,
    )
    fitted = json.loads((out / SUMMARY_FILE).read_text())["heads"][KEY]
    assert fitted["c"] == 0.1 and list(fitted["tuning_by_c"]) == ["0.1"]
    assert set(fitted["refused"]) == {"site0", "site1", "site2"}
    for node, cap in zip(nodes, caps, strict=True):
        assert PrivacyLedger(node["state-dir"]).epsilon(DELTA) <= cap


def test_head_node_configs_carry_policies_ledgers_and_max_subjects(tmp_path: Path) -> None:
    from client.head_rows import max_subjects_of
    from simulations.federated_head_run import head_node_configs

    sites = [tmp_path / "a", tmp_path / "b"]
    nodes = head_node_configs(
        tmp_path / "model", sites, 5, None, 1, [tmp_path / "p.yaml"], [tmp_path / "sa", tmp_path / "sb"], 12
    )
    assert [n["policy"] for n in nodes] == [str((tmp_path / "p.yaml").resolve())] * 2  # one policy for every site
    assert [n["state-dir"] for n in nodes] == [str((tmp_path / s).resolve()) for s in ("sa", "sb")]
    assert [max_subjects_of(n) for n in nodes] == [12, 12] and max_subjects_of({}) is None
    with pytest.raises(ValueError, match="--state-dirs: 1 directories for 2 sites"):  # a ledger is never shared
        head_node_configs(tmp_path / "model", sites, 5, None, 1, None, [tmp_path / "s"])
    for bad in (-1, "12", 1.5):
        with pytest.raises(ValueError, match=f"node config field max-subjects: value {bad!r}"):
            max_subjects_of({"max-subjects": bad})


@pytest.mark.slow  # 12 s of the default suite; CI's slow stage runs it (Makefile SLOW_CI)
@pytest.mark.usefixtures("serverapp_identity")
def test_a_target_epsilon_is_spent_over_the_heads_planned_steps(tmp_path: Path) -> None:
    """--dp-target-epsilon 2: the noise that reaches 2 over rounds x C grid x local steps at the
    site's subject sampling rate; a fresh ledger ends at about 2, never above it."""
    nodes = site_nodes(tmp_path, [20.0, 20.0])
    _, sites = fit_head(in_process_grid(nodes), _task(), 5, head_config(tmp_path / "out", PrivacyRequest(target_epsilon=2.0, delta=DELTA)))  # fmt: skip
    for node in nodes:
        spent = PrivacyLedger(node["state-dir"]).epsilon(DELTA)
        assert 1.9 < spent <= 2.0 + 1e-6 and sites.epsilon[node["site-name"]]["epsilon"] == pytest.approx(spent)
        assert sum(r.steps for r in ledger_rounds(node)) == ROUNDS * len(C_GRID) * STEPS
