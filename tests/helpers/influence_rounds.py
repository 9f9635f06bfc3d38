"""Rounds of replies for the influence bounds' tests: honest sites, an attacker, the strategy's
aggregation over them."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.typing import MetricRecordValues

from healthfm_core.protocol import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    SCALES_RECORD,
    RoundConfig,
)
from helpers.flower_messages import train_metadata
from server.round import RoundOutcome, aggregate_replies
from server.strategy import ModalityAwareFedAvg, pack_record

HONEST_STEP = 0.004  # per value: 0.4 x lr 1e-3 x 10 local steps, the measured honest ratio


ATTACKER = 9


# Honest sites 1-3; the attacker holds every group: wearables has one holder (the attacker),
# genomics two (node 1 and the attacker), shared and ehr four.
NODE_GROUPS = {
    1: ["shared", "ehr", "genomics"],
    2: ["shared", "ehr"],
    3: ["shared", "ehr"],
    ATTACKER: ["shared", "ehr", "wearables", "genomics"],
}


HONEST_COUNTS = {1: 152, 2: 160, 3: 144}


def round_config(rnd: int, **kw) -> RoundConfig:
    """What the server asks of every site: 10 local steps of batch 16 (at most 160 samples)."""
    base = dict(round=rnd, rounds=8, local_steps=10, lr=1e-3, batch_size=16, setup_sha256="0" * 64)
    return RoundConfig(**{**base, **kw})


def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def reply(
    node: int,
    arrays: dict[str, np.ndarray],
    counts: dict[str, Any],
    num_examples: object = None,
    scales: dict[str, float] | None = None,
    dp: bool = False,
) -> Message:
    """A real Flower train reply from `node`, its records written as they travel (any value, as a
    dishonest site may send it): packed arrays, the metrics, int8 scales."""
    metrics: dict = {"num-examples": max(counts.values()) if num_examples is None else num_examples}
    metrics.update({f"num-examples.{g}": n for g, n in counts.items()})
    if dp:  # a DP reply: expected counts and the spend, no losses
        metrics.update({"dp.epsilon": 0.8, "dp.delta": 1e-5, "dp.noise-multiplier": 1.1})
    else:
        metrics["loss.total"] = 1.0
    content = RecordDict({METRICS_RECORD: MetricRecord(metrics), ARRAYS_RECORD: pack_record(arrays)})
    if scales is not None:
        content[SCALES_RECORD] = MetricRecord(cast(dict[str, MetricRecordValues], scales))
    return make_message(train_metadata(f"reply-{node}", src=node, dst=0, reply_to=f"train-{node}"), content)


def aggregate(
    s: ModalityAwareFedAvg, rnd: int, replies: list[Message], previous: dict[str, np.ndarray], **kw
) -> RoundOutcome:
    inputs = dict(
        current_arrays=previous, node_groups=NODE_GROUPS, sent=sent_to(replies), round_config=round_config(rnd)
    )
    return aggregate_replies(s, rnd, replies, **{**inputs, **kw})


SHAPES = {"shared.w": (8, 16), "shared.b": (16,), "ehr.w": (32,), "wearables.w": (4, 4), "genomics.w": (6,)}


def sent_to(replies: list[Message]) -> list[Message]:
    """The train messages the replies answer (one per node, as the Grid addresses them)."""
    nodes = sorted({r.metadata.src_node_id for r in replies})
    return [make_message(train_metadata(f"train-{n}", src=0, dst=n), RecordDict()) for n in nodes]
