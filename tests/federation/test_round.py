"""server/round.py: one round, top to bottom, on real ClientApps in this process (the roster's
round 0 first), and its typed record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from helpers.in_process_grid import InProcessGrid, RecordingGrid, tiny_nodes
from helpers.run_configs import fed_config, three_site_config

from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import ARRAYS_RECORD
from healthfm_core.protocol.packing import unpack_record
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


@pytest.mark.usefixtures("serverapp_identity")
def test_an_fp16_downlink_sends_float16_and_keeps_the_float32_master(tmp_path: Path) -> None:
    """With a learning rate too small to move any float32 weight (1e-30), every site sends back
    what it received: the float16 values. A round that kept them would leave the global rounded to
    float16 (2^-11 of each weight); the master must come back instead."""
    _, nodes = tiny_nodes(tmp_path)
    grid = RecordingGrid(nodes)
    cfg = three_site_config(tmp_path / "run", local_steps=1, lr=1e-30, server_optimizer=None, downlink="fp16")
    roster = Roster(grid, cfg)
    roster.query_capabilities(roster.wait_for_nodes())
    setup = roster.agree_vocabulary()
    roster.send_setup(setup)
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}

    record = run_round(
        cfg, 1, setup, arrays, grid=grid, strategy=make_strategy(cfg, None), roster=roster, reply_lags={}
    )

    trains, _ = grid.exchange(MessageType.TRAIN)
    assert len(trains) == 3 and not record.rejected and record.outcome.arrays is not None
    for msg in trains:
        carried = unpack_record(msg.content.array_records[ARRAYS_RECORD], where="train message")
        assert {str(v.dtype) for v in carried.values() if v.dtype.kind == "f"} == {"float16"}
    rounded = [k for k in arrays if not np.array_equal(arrays[k].astype(np.float16).astype(np.float32), arrays[k])]
    assert len(rounded) >= 20  # the weight matrices: float16 rounds them (biases 0, norms 1 are exact)
    for key, value in arrays.items():
        assert record.arrays[key].dtype == value.dtype
        # AdamW's first step, lr x ~1, moves a zero weight to ~1e-30 and leaves every other one; the
        # weighted mean of three equal arrays may land a float32 step off (float16 is 2^-11 off).
        np.testing.assert_allclose(record.arrays[key], value, rtol=2.0**-22, atol=1e-25, err_msg=key)
