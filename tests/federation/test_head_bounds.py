"""The task head's replies bounded like a pretraining round's (issue 40, break 4;
server/head_bounds.py, server/head_average.bound_heads): the red team's attacks on a head run
over Flower's Message API (the sites' ClientApps in this process) replayed. Today a head update
with n = 10^12 and |w| = 10^6 made the average the attacker's head, an honest-looking n with
|w| = 10^6 moved |w| from 1.3 to 2.6e5, weights of 1e308 parsed, and a tuning reply with
n = 10^12 and loss 0 picked the C."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from helpers.head_sites import head_sites
from helpers.in_process_grid import InProcessGrid

from client.head_app import make_head_client_app
from client.head_rows import HeadRows
from healthfm_core.eval.federated_head import SiteSplits
from healthfm_core.eval.head_site import site_stats
from healthfm_core.protocol.head import HEAD_RECORD, MSG_SETUP, MSG_STATS, MSG_TRAIN, MSG_TUNE, HeadStats, HeadTask
from server.head_app import HeadRunConfig, fit_head
from server.head_average import bound_heads, head_strategy
from server.head_bounds import declared_head_rows, stats_problem

SHA = "ab" * 32
KEY = "onset_x_365d"
ATTACKER = 101  # site1
DECLARED = {"site0": 4 * 150, "site1": 4 * 150, "site2": 4 * 150}  # 150 subjects each, 4 rows a subject

Corrupt = Callable[[Any], object]  # rewrites the record in place; what it returns is dropped


class AttackGrid(InProcessGrid):
    """InProcessGrid with the head's ClientApp; the attacker's replies of each stage rewritten."""

    def __init__(self, node_configs: dict[int, dict], app: Any, corrupt: Mapping[str, Corrupt]) -> None:
        super().__init__(node_configs)
        self.app, self.corrupt = app, corrupt

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        replies = super().send_and_receive(messages, timeout=timeout)
        stage = messages[0].metadata.message_type if messages else ""
        for reply in replies:
            if reply.metadata.src_node_id == ATTACKER and not reply.has_error() and stage in self.corrupt:
                self.corrupt[stage](reply.content.config_records[HEAD_RECORD])
        return replies


def _grid(corrupt: Mapping[str, Corrupt]) -> AttackGrid:
    sites: dict[str, SiteSplits] = head_sites()

    def rows_of(config: Mapping[str, Any], tasks: Sequence[str]) -> HeadRows:
        name = str(config["site-name"])
        return HeadRows(name, SHA, 64, 8, {KEY: sites[name]})

    nodes = {100 + i: {"site-name": name} for i, name in enumerate(sites)}
    return AttackGrid(nodes, make_head_client_app(rows_of=rows_of), corrupt)


def _fit(tmp_path: Any, corrupt: Mapping[str, Corrupt], declared: Mapping[str, int] | None = DECLARED):  # noqa: ANN202
    cfg = HeadRunConfig(model=tmp_path, out_dir=tmp_path, c_grid=[0.01, 0.1, 1.0], rounds=8, timeout_s=5)
    return fit_head(_grid(corrupt), HeadTask(setup_sha256=SHA, tasks=[], key=KEY), 5, cfg, declared)


def _scale_weight(norm: float) -> Corrupt:
    def corrupt(record: Any) -> None:
        w = np.asarray(list(record["weight"]), np.float64)
        record["weight"] = list(w / max(float(np.linalg.norm(w)), 1e-12) * norm)

    return corrupt


def _set(field: str, value: Any) -> Corrupt:
    return lambda record: record.__setitem__(field, value)


@pytest.mark.usefixtures("serverapp_identity")
def test_an_update_with_a_trillion_rows_and_a_huge_norm_does_not_become_the_head(tmp_path) -> None:  # noqa: ANN001
    honest, _ = _fit(tmp_path, {})
    norm = float(np.linalg.norm(honest.probe.weight))
    result, sites = _fit(tmp_path, {MSG_STATS: _set("n", 10**12), MSG_TRAIN: lambda r: (_set("n", 10**12)(r), _scale_weight(1e6)(r))})  # fmt: skip
    w = result.probe.weight
    cosine = float(w @ honest.probe.weight / (np.linalg.norm(w) * norm))
    assert cosine > 0.95 and np.linalg.norm(w) < 3 * norm
    assert set(result.train_rows) == {"site0", "site2"}
    (reason,) = [r["reason"] for r in sites.rejected["site1"]]
    assert "field n + n-tuning: value 1,000,000,000,040 > 600" in reason


@pytest.mark.usefixtures("serverapp_identity")
def test_an_honest_count_with_a_huge_update_is_rejected_every_round_by_the_step_bound(tmp_path) -> None:  # noqa: ANN001
    honest, _ = _fit(tmp_path, {})
    result, sites = _fit(tmp_path, {MSG_TRAIN: _scale_weight(1e6)})
    assert np.linalg.norm(result.probe.weight) < 3 * np.linalg.norm(honest.probe.weight)
    rejected = sites.rejected["site1"]
    assert len(rejected) == 3 * 8 and all(r["stage"] == MSG_TRAIN for r in rejected)
    assert "update norm 1e+06 > " in rejected[0]["reason"] and "the most 5 step(s)" in rejected[0]["reason"]
    assert "site1" in result.train_rows  # rejected round by round, as in pretraining; its stats stand


@pytest.mark.usefixtures("serverapp_identity")
def test_weights_of_1e308_are_rejected(tmp_path) -> None:  # noqa: ANN001
    result, sites = _fit(tmp_path, {MSG_TRAIN: lambda r: r.__setitem__("weight", [1e308] * 5)})
    assert np.isfinite(result.probe.weight).all() and np.linalg.norm(result.probe.weight) < 10
    assert sites.rejected["site1"] and all("update norm" in r["reason"] for r in sites.rejected["site1"])
    # Under DP (an epsilon in the reply) the step bound does not apply: the magnitude limit does.
    heads = {"a": (np.full(5, 1e308), 0.0, 10), "b": (np.zeros(5), 0.0, 10)}
    kept, bad = bound_heads(head_strategy(), heads, np.zeros(5), 0.0, 1)
    assert set(kept) == {"b"} and "|value| up to 1e+308 > limit 1e+06" in bad["a"]


@pytest.mark.usefixtures("serverapp_identity")
def test_a_tuning_reply_with_a_trillion_rows_and_no_loss_does_not_pick_the_c(tmp_path) -> None:  # noqa: ANN001
    result, sites = _fit(tmp_path, {MSG_TUNE: lambda r: (_set("n", 10**12)(r), _set("loss-sum", 0.0)(r))})
    assert min(result.tuning.values()) > 0.2  # the honest sites' pooled log-loss, not the attacker's 0
    (reason,) = [r["reason"] for r in sites.rejected["site1"]]
    assert reason == "n 1000000000000, its stats said 40 tuning rows"


@pytest.mark.usefixtures("serverapp_identity")
def test_a_smoothness_no_rows_can_have_is_rejected(tmp_path) -> None:  # noqa: ANN001
    result, sites = _fit(tmp_path, {MSG_SETUP: _set("smoothness", 1e9)})
    assert "site1" in sites.rejected and "field smoothness: value 1e+09 > " in sites.rejected["site1"][0]["reason"]
    assert np.isfinite(result.probe.weight).all()


def test_the_history_and_outlier_bounds_apply_to_head_updates() -> None:
    """The strategy's own bounds: with two others, 10 x the median of theirs; from the second
    round of a C, 10 x the median of the accepted norms of its last rounds."""
    strategy, w = head_strategy(), np.zeros(5)
    rng = np.random.default_rng(0)
    honest = {s: (rng.normal(size=5) * 0.1, 0.0, 50) for s in ("a", "b", "c")}
    kept, bad = bound_heads(strategy, {**honest, "z": (np.full(5, 10.0), 0.0, 50)}, w, 0.0, 1)
    assert set(kept) == {"a", "b", "c"} and "x median of the others" in bad["z"]
    for rnd in (2, 3):
        kept, bad = bound_heads(strategy, honest, w, 0.0, rnd)
        assert set(kept) == set(honest) and not bad
    kept, bad = bound_heads(strategy, {"a": honest["a"], "z": (np.full(5, 10.0), 0.0, 50)}, w, 0.0, 4)
    assert set(kept) == {"a"} and "history bound" in bad["z"]


def test_stats_are_bounded_by_the_declared_rows_and_by_sums_real_rows_can_have() -> None:
    x = np.random.default_rng(1).normal(size=(40, 3))
    stats = HeadStats.of("a", site_stats(x, np.arange(40) % 2 == 0), 64, 8, 10, 20)
    assert stats_problem(stats, {"a": 50}) is None and stats_problem(stats, None) is None
    assert "field n + n-tuning: value 50 > 49" in str(stats_problem(stats, {"a": 49}))
    assert "declared no subject count" in str(stats_problem(stats, {"b": 50}))
    forged = stats.model_copy(update={"total": [1e6, 0.0, 0.0]})
    assert "field total.0" in str(stats_problem(forged, None))
    card = {"sites": {"a": {"subjects": {"ehr": 150, "wearables": "<10"}}, "b": {"subjects": {"ehr": 0}}}}
    assert declared_head_rows(card, 4) == {"a": 4 * (150 + 9), "b": 0}
    with pytest.raises(ValueError, match="site 'a': field subjects"):
        declared_head_rows({"sites": {"a": {"subjects": {"ehr": "many"}}}}, 4)
