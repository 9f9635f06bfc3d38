"""server/round.py: one round, top to bottom, on real ClientApps in this process (the roster's
round 0 first), and its typed record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.in_process_grid import InProcessGrid, tiny_nodes
from helpers.run_configs import fed_config

from healthfm_core.model.healthfm import init_model
from server.roster import Roster
from server.round import RoundRecord, SiteOutcome, run_round
from server.server_app import make_strategy


@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_retries_a_restarted_site_and_records_every_site(tmp_path: Path) -> None:
    _, nodes = tiny_nodes(tmp_path)
    victim = next(n for n, c in nodes.items() if c["site-name"] == "hospital")
    grid = InProcessGrid(nodes, restart=(victim, 1))  # the hospital's SuperNode restarts before round 1
    cfg = fed_config(
        tmp_path / "run", local_steps=1, batch_size=8, max_events=64, max_patches=8, min_nodes=3, vocab_min_subjects=5
    )
    roster = Roster(grid, cfg)
    roster.query_capabilities(roster.wait_for_nodes())
    setup = roster.agree_vocabulary()
    roster.send_setup(setup)
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    strategy = make_strategy(cfg, None)
    before = vars(strategy).keys()

    record = run_round(cfg, 1, setup, arrays, grid=grid, strategy=strategy, roster=roster, reply_lags={})

    assert isinstance(record, RoundRecord) and record.config.round == 1
    assert set(record.sites) == {c["site-name"] for c in nodes.values()}
    assert all(isinstance(e, SiteOutcome) and e.status == "ok" for e in record.sites.values()), record.sites
    hospital = record.sites["hospital"]
    assert hospital.setup_resent is True and hospital.reason is None and hospital.num_examples
    assert sorted(record.outcome.accepted) == sorted(nodes) and not record.rejected
    assert "hospital" in record.contributors["shared"]
    changed = [k for k in arrays if not np.array_equal(arrays[k], record.arrays[k])]
    assert changed  # the averaged arrays are the record's
    event = record.sites_event()["hospital"]
    assert event["status"] == "ok" and event["setup_resent"] is True and None not in event.values()
    assert "reason" not in event  # a field left None is not written
    assert vars(strategy).keys() == before  # no round kept in the strategy
