"""server/round.py: one round, top to bottom, on real ClientApps in this process (the roster's
round 0 first), and its typed record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from helpers.in_process_grid import InProcessGrid, RecordingGrid, tiny_nodes
from helpers.run_configs import fed_config, three_site_config

from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import ARRAYS_RECORD, FederationSetup
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.terms.groups import parameter_group
from server.config import FederationConfig
from server.roster import Roster
from server.round import RoundRecord, SiteOutcome, run_round
from server.server_app import make_strategy
from server.strategy import pack_record


def round_zero(grid: Grid, cfg: FederationConfig) -> tuple[Roster, FederationSetup, dict[str, np.ndarray]]:
    """What the ServerApp does before round 1: the sites' capabilities, the agreed setup sent to
    them, and the model's initial arrays."""
    roster = Roster(grid, cfg)
    roster.query_capabilities(roster.wait_for_nodes())
    setup = roster.agree_vocabulary()
    roster.send_setup(setup)
    return roster, setup, {k: v.numpy() for k, v in init_model(setup).state_dict().items()}


@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_retries_a_restarted_site_and_records_every_site(tmp_path: Path) -> None:
    _, nodes = tiny_nodes(tmp_path)
    victim = next(n for n, c in nodes.items() if c["site-name"] == "hospital")
    grid = InProcessGrid(nodes, restart=(victim, 1))  # the hospital's SuperNode restarts before round 1
    cfg = fed_config(
        tmp_path / "run", local_steps=1, batch_size=8, max_events=64, max_patches=8, min_nodes=3, vocab_min_subjects=5
    )
    roster, setup, arrays = round_zero(grid, cfg)
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
    roster, setup, arrays = round_zero(grid, cfg)

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


class TamperingGrid(RecordingGrid):
    """RecordingGrid whose `victim`'s train replies come back moved by `shift` in every value of
    the shared group (a site, or a man in the middle, sending an absurd update)."""

    def __init__(self, node_configs: dict[int, dict], victim: int, shift: float) -> None:
        super().__init__(node_configs)
        self.victim, self.shift = victim, shift

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        replies = super().send_and_receive(messages, timeout=timeout)
        out = []
        for reply in replies:
            if reply.metadata.src_node_id == self.victim and ARRAYS_RECORD in reply.content.array_records:
                content = RecordDict(dict(reply.content))
                moved = unpack_record(reply.content.array_records[ARRAYS_RECORD], where="test")
                moved = {k: v + self.shift if parameter_group(k) == "shared" else v for k, v in moved.items()}
                content[ARRAYS_RECORD] = pack_record(moved)
                reply.content = content  # the same reply (its metadata: the node, the message it answers)
            out.append(reply)
        return out


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("downlink", ["fp32", "fp16"])
def test_an_absurd_reply_is_rejected_and_never_reaches_the_master_in_either_downlink(
    tmp_path: Path, downlink: str
) -> None:
    """Under the fp16 downlink the server judges replies against what the sites received (the float16
    values), then moves the result onto the float32 master: a rejected reply must leave no trace
    there, and the honest sites' average must arrive as it does in fp32."""
    _, nodes = tiny_nodes(tmp_path)
    victim = next(n for n, c in nodes.items() if c["site-name"] == "hospital")
    grid = TamperingGrid(nodes, victim, shift=50.0)
    cfg = three_site_config(tmp_path / "run", local_steps=1, server_optimizer=None, downlink=downlink)
    roster, setup, arrays = round_zero(grid, cfg)

    record = run_round(
        cfg, 1, setup, arrays, grid=grid, strategy=make_strategy(cfg, None), roster=roster, reply_lags={}
    )

    assert [r["site"] for r in record.rejected] == ["hospital"], record.rejected
    assert "update norm" in record.rejected[0]["reason"]
    assert record.sites["hospital"].status == "rejected"
    assert "hospital" not in record.contributors["shared"] and len(record.contributors["shared"]) == 2
    assert record.outcome.arrays is not None
    for key, value in arrays.items():
        moved = np.abs(record.arrays[key].astype(np.float64) - value)
        assert moved.max(initial=0.0) < 1.0, key  # the honest sites' one step; the shift was 50
