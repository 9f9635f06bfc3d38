"""server/server_app.py: a round's checkpoint and logs are written once the next round's messages
have left (off the round's path), with the states the round ended with, and never lost to a later
round's failure. Real ClientApps in this process (tests/helpers/in_process_grid.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from flwr.app import Message, MessageType
from helpers.in_process_grid import RecordingGrid, tiny_nodes
from helpers.narrowing import present
from helpers.run_configs import three_site_config

from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.outcome import read_outcome
from server.runlog import read_events
from server.server_app import FederationServer


class CheckpointsSeen(RecordingGrid):
    """RecordingGrid noting, at each train exchange, the rounds whose checkpoints are on disk;
    `fail_at`: the train exchange (1-based) that raises instead, before any message leaves."""

    def __init__(self, node_configs: dict[int, dict], ckpt_dir: Path, fail_at: int | None = None) -> None:
        super().__init__(node_configs)
        self.ckpt_dir, self.fail_at = ckpt_dir, fail_at
        self.seen: list[list[str]] = []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.seen.append(sorted(p.name for p in self.ckpt_dir.glob("step-*")) if self.ckpt_dir.is_dir() else [])
            if self.fail_at == len(self.seen):
                raise ConnectionError("the SuperLink went away")
        return super().send_and_receive(messages, timeout=timeout)

    def train_order(self) -> list[list[int]]:
        return [
            [m.metadata.dst_node_id for m in sent]
            for sent, _ in self.exchanges
            if sent[0].metadata.message_type == MessageType.TRAIN
        ]


@pytest.mark.usefixtures("serverapp_identity")
def test_a_rounds_checkpoint_is_written_while_the_next_round_is_out(tmp_path: Path) -> None:
    _, nodes = tiny_nodes(tmp_path)
    out = tmp_path / "run"
    grid = CheckpointsSeen(nodes, out / "checkpoints")
    FederationServer(
        grid, three_site_config(out, rounds=3, local_steps=1, eval_tasks=[], keep_checkpoints=3), run_id=1
    ).run()

    # Round 1's checkpoint did not exist as round 2's messages left: it is written after them.
    assert grid.seen == [[], [], ["step-00000001"]]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [f"step-0000000{r}" for r in (1, 2, 3)]
    rounds = [e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2, 3]
    assert [e["timings"]["checkpoint_on_path"] for e in rounds] == [False, False, True]
    for e in rounds:  # a round's time runs to the next round's start (or its own checkpoint)
        t = e["timings"]
        assert t["round_seconds"] >= t["configure_seconds"] + t["wait_seconds"] + t["aggregate_seconds"]
        assert t["other_seconds"] == pytest.approx(t["round_seconds"] - t["local_train_seconds_max"])
    assert present(read_outcome(out)).rounds_done == 3


@pytest.mark.usefixtures("serverapp_identity")
def test_a_resumed_run_samples_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """The checkpoint of a round keeps the random state as that round ended, not as it is when the
    checkpoint is written (after the next round has sampled its sites: here round 3, which then
    fails; the run resumes from round 2)."""
    _, nodes = tiny_nodes(tmp_path)
    straight = CheckpointsSeen(nodes, tmp_path / "straight" / "checkpoints")
    random.seed(5)  # both fresh runs from one state: the server samples with Python's random
    FederationServer(
        straight, three_site_config(tmp_path / "straight", rounds=4, local_steps=1, eval_tasks=[]), run_id=1
    ).run()
    out = tmp_path / "resumed"
    first = CheckpointsSeen(nodes, out / "checkpoints", fail_at=3)  # round 3 samples its sites, then fails
    random.seed(5)
    with pytest.raises(ConnectionError):
        FederationServer(first, three_site_config(out, rounds=4, local_steps=1, eval_tasks=[]), run_id=1).run()
    assert load_server_checkpoint(present(latest_server_checkpoint(out / "checkpoints"))).round == 2
    resumed = CheckpointsSeen(nodes, out / "checkpoints")
    random.seed(6)  # whatever the state before: resume restores the checkpoint's
    FederationServer(
        resumed, three_site_config(out, rounds=4, local_steps=1, eval_tasks=[], resume=True), run_id=2
    ).run()

    orders = straight.train_order()
    assert len({tuple(o) for o in orders}) > 1  # the sampled order changes from round to round
    assert first.train_order() + resumed.train_order() == orders


@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_that_fails_before_its_messages_leave_keeps_the_round_before(tmp_path: Path) -> None:
    _, nodes = tiny_nodes(tmp_path)
    out = tmp_path / "run"
    grid = CheckpointsSeen(nodes, out / "checkpoints", fail_at=2)
    with pytest.raises(ConnectionError, match="went away"):
        FederationServer(grid, three_site_config(out, rounds=3, local_steps=1, eval_tasks=[]), run_id=1).run()

    assert load_server_checkpoint(present(latest_server_checkpoint(out / "checkpoints"))).round == 1
    assert [e["round"] for e in read_events(out / "rounds.jsonl") if e["event"] == "round"] == [1]
    outcome = present(read_outcome(out))
    assert outcome.status == "failed" and outcome.rounds_done == 1 and "went away" in outcome.reason
