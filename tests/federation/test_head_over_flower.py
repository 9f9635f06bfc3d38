"""The federated task head over Flower's Message API (server/head_app.py <-> client/head_app.py),
the sites' ClientApps called in this process: the same head as the one-process driver, a site
below its minimums sends no number, a malformed reply is rejected and logged."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from helpers.head_grid import KEY, SHA, HeadGrid
from helpers.head_sites import head_sites

from client.head_app import make_head_client_app
from client.head_rows import HeadRows, head_splits
from healthfm_core.eval.federated_head import SiteSplits, fit_federated_logistic
from healthfm_core.protocol import TaskReason
from healthfm_core.protocol.head import (
    HEAD_RECORD,
    MSG_TRAIN,
    HeadMessageError,
    HeadRefusal,
    HeadStats,
    HeadTask,
    parse_reply,
)
from server.head_app import HeadRunConfig, fit_head

C_GRID = (0.01, 0.1, 1.0)


def _grid(sites: Mapping[str, SiteSplits | TaskReason | str], corrupt: tuple[int, Any] | None = None) -> HeadGrid:
    def rows_of(config: Mapping[str, Any], tasks: Sequence[str]) -> HeadRows:
        name = str(config["site-name"])
        return HeadRows(name, SHA, 64, 8, {KEY: sites[name]})

    nodes = {100 + i: {"site-name": name} for i, name in enumerate(sites)}
    return HeadGrid(nodes, make_head_client_app(rows_of=rows_of), corrupt)


def _cfg(tmp_path: Any, rounds: int) -> HeadRunConfig:
    return HeadRunConfig(model=tmp_path, out_dir=tmp_path, c_grid=list(C_GRID), rounds=rounds, timeout_s=5)


@pytest.mark.usefixtures("serverapp_identity")
def test_the_flower_head_is_the_one_process_head(tmp_path) -> None:
    sites = head_sites()
    expected, n = fit_federated_logistic(sites, c_grid=C_GRID, rounds=40)
    result, flower = fit_head(_grid(sites), HeadTask(setup_sha256=SHA, tasks=[], key=KEY), 5, _cfg(tmp_path, 40))
    assert result.train_rows == n
    assert result.probe.c == expected.c
    np.testing.assert_allclose(result.probe.standardizer.mean, expected.standardizer.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.probe.weight, expected.weight, rtol=0, atol=1e-9)
    assert result.probe.bias == pytest.approx(expected.bias, abs=1e-9)
    assert result.probe.tuning_log_loss == pytest.approx(expected.tuning_log_loss, abs=1e-9)
    assert (flower.max_events, flower.max_patches) == (64, 8)


@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_below_its_minimum_sends_no_number(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    sites: dict[str, SiteSplits | str] = dict(head_sites())
    sites["site2"] = "fewer than 20 subjects (min_report_subjects) in train"
    grid = _grid(sites)
    with caplog.at_level(logging.INFO, logger="healthfm"):
        result, _ = fit_head(grid, HeadTask(setup_sha256=SHA, tasks=[], key=KEY), 5, _cfg(tmp_path, 5))
    assert set(result.train_rows) == {"site0", "site1"}
    refusals = [r for r in grid.replies if r.metadata.src_node_id == 102]
    assert len(refusals) == 1  # asked once (stats), never again
    assert dict(refusals[0].content.config_records[HEAD_RECORD]).keys() == {"refused"}
    assert "fewer than 20 subjects" in str(refusals[0].content.config_records[HEAD_RECORD]["refused"])
    assert any("node 102 takes no part" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_requiring_secure_aggregation_sends_no_head_number(tmp_path) -> None:
    """Issue 40: the policy's require_secure_aggregation holds for the head too (its statistics and
    head are sent in the clear): the site refuses at the first stage, naming the policy."""
    sites = head_sites()

    def rows_of(config: Mapping[str, Any], tasks: Sequence[str]) -> HeadRows:
        name = str(config["site-name"])
        return HeadRows(name, SHA, 64, 8, {KEY: sites[name]}, require_secure_aggregation=name == "site2")

    grid = HeadGrid({100 + i: {"site-name": n} for i, n in enumerate(sites)}, make_head_client_app(rows_of=rows_of))
    result, _ = fit_head(grid, HeadTask(setup_sha256=SHA, tasks=[], key=KEY), 5, _cfg(tmp_path, 5))
    assert set(result.train_rows) == {"site0", "site1"}
    [refusal] = [r for r in grid.replies if r.metadata.src_node_id == 102]
    assert dict(refusal.content.config_records[HEAD_RECORD]).keys() == {"refused"}
    assert "requires secure aggregation" in str(refusal.content.config_records[HEAD_RECORD]["refused"])


def test_head_splits_below_the_minimum_give_a_reason_not_rows() -> None:
    n = 12
    labels = pa.table({"subject_id": np.arange(n, dtype=np.int64), "boolean_value": np.arange(n) % 2 == 0})
    split = np.array(["train"] * 6 + ["tuning"] * 3 + ["held_out"] * 3, dtype=object)
    x = np.ones((n, 4))
    got = head_splits(labels, x, split, 3, 3)
    assert isinstance(got, SiteSplits) and len(got.y_train) == 6 and len(got.y_tune) == 3
    assert head_splits(labels, x, split, 4, 1) == "fewer than 4 subjects (min_report_subjects) in tuning"
    assert "train subjects with a positive or a negative row" in str(head_splits(labels, x, split, 2, 4))  # 3 positives
    # Subjects, not rows: 3 positive subjects with two rows each are still 3.
    twice = pa.concat_tables([labels.slice(0, 6), labels.slice(0, 6), labels.slice(6)])
    split_twice = np.array(["train"] * 12 + ["tuning"] * 3 + ["held_out"] * 3, dtype=object)
    assert "train subjects with a positive or a negative row" in str(
        head_splits(twice, np.ones((18, 4)), split_twice, 2, 4)
    )  # 6 positive rows, 3 subjects


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [
        (
            lambda rec: rec.__setitem__("weight", list(rec["weight"])[:-1]),
            "HeadUpdate: field weight: 4 values, expected 5",
        ),  # fmt: skip
        (lambda rec: rec.__setitem__("weight", [float("nan")] + list(rec["weight"])[1:]), "field weight.0"),
        (lambda rec: rec.__setitem__("n", 7), "n 7, its stats said"),
    ],
)
@pytest.mark.usefixtures("serverapp_identity")
def test_a_malformed_head_reply_is_rejected_with_a_log_line(tmp_path, caplog, corrupt, field) -> None:  # noqa: ANN001
    grid = _grid(head_sites(), corrupt=(101, corrupt))
    with caplog.at_level(logging.INFO, logger="healthfm"):
        result, _ = fit_head(grid, HeadTask(setup_sha256=SHA, tasks=[], key=KEY), 5, _cfg(tmp_path, 5))
    lines = [r.getMessage() for r in caplog.records if "reply rejected" in r.getMessage()]
    assert len(lines) == 1 and "site1" in lines[0] and MSG_TRAIN in lines[0] and field in lines[0], lines
    assert np.isfinite(result.probe.weight).all()
    # site1 is out from its rejected reply on: only one train.head message reached it.
    assert sum(1 for r in grid.replies if r.metadata.src_node_id == 101) == 2 + 1  # stats, setup, one round


def test_head_stats_from_a_peer_are_checked() -> None:
    good = {"site": "a", "n": 10, "positives": 3, "total": [1.0, 2.0], "squares": [1.0, 4.0]}
    good |= {"max-events": 64, "max-patches": 8, "n-tuning": 5, "subjects": 8}
    assert isinstance(parse_reply(good, HeadStats, 2), HeadStats)
    for bad, field in (
        ({"positives": 11}, "positives"),  # more positives than rows
        ({"squares": [1.0, -4.0]}, "squares.1"),
        ({"total": [1.0, float("inf")]}, "total.1"),
        ({"total": [1.0, 2.0, 3.0]}, "total: 3 values, expected 2"),
        ({"n": 10.0}, "field n"),  # strict: a float is not a count
        ({"rows": [[1.0]]}, "rows"),  # no other field
    ):
        with pytest.raises(HeadMessageError, match=field.replace("[", r"\[")):
            parse_reply(good | bad, HeadStats, 2)
    assert parse_reply({"refused": "fewer than 20 subjects"}, HeadStats, 2) == HeadRefusal(
        refused="fewer than 20 subjects"
    )
