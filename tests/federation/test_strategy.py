"""ModalityAwareFedAvg: averages by hand, equality with stock FedAvg, bad replies dropped."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import server.replies as replies_module
from client.client_app import train_reply_content
from healthfm_core.protocol import ARRAYS_RECORD, SCALES_RECORD, TrainReply
from healthfm_core.protocol.packing import PACKED_PART, unpack_record
from healthfm_core.protocol.transport import dequantise, encode_update
from server.replies import EarlyReads
from server.round import RoundOutcome, aggregate_replies, train_messages
from server.runlog import message_size
from server.strategy import GroupAdam, ModalityAwareFedAvg, pack_record

# Keys named after their group keep the arithmetic of these tests readable; the real
# mapping (healthfm_core.model.groups.parameter_group) is exercised in test_groups.py.
SHAPES = {
    "shared.w": (2, 3),
    "shared.b": (3,),
    "ehr.w": (4,),
    "wearables.w": (2, 2),
    "genomics.w": (3,),
}


def group_of(key: str) -> str:
    return key.split(".")[0]


def global_arrays(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def train_reply(arrays: dict[str, np.ndarray], counts: dict[str, int]) -> TrainReply:
    """A site's TrainReply over the synthetic keys (built, and so checked, as the site builds one)."""
    return TrainReply.model_validate(
        {"arrays": arrays, "num_examples": max(counts.values()), "group_examples": counts, "losses": {"total": 1.0}},
        context={"group_of": group_of},
    )


def reply(node_id: int, arrays: dict[str, np.ndarray], counts: dict[str, int]) -> Message:
    """A real Flower reply message from node_id, with the metadata a SuperLink delivers it with:
    the records of a TrainReply with these counts, carrying these arrays as they are (malformed
    ones included, which no site would build)."""
    placeholders = {f"{g}.w": np.zeros(1, np.float32) for g in counts}  # replaced by the arrays as given
    content = train_reply_content(train_reply(placeholders, counts))
    content[ARRAYS_RECORD] = pack_record(arrays)  # packed, as every message's arrays travel
    return message(node_id, content)


def per_key(replies: list[Message]) -> list[Message]:
    """The same replies with one Array per key: what Flower's stock FedAvg reads."""
    out = []
    for msg in replies:
        content = RecordDict(dict(msg.content))
        content[ARRAYS_RECORD] = ArrayRecord(
            {k: Array(v) for k, v in unpack_record(msg.content.array_records[ARRAYS_RECORD], where="test").items()}
        )
        out.append(make_message(msg.metadata, content))
    return out


def message(node_id: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"train-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return make_message(metadata, content)


def site_arrays(groups: list[str], value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items() if group_of(k) in groups}


def strategy(**kwargs) -> ModalityAwareFedAvg:
    """The averaging arithmetic alone: these sites' "updates" are whole weights (1.0 and 4.0
    against a global of -1.0), not training steps, so the clip to the other holders' median
    (server/clipping.py; tests/federation/test_influence_over_rounds.py) is off unless a test sets it."""
    return ModalityAwareFedAvg(group_of=group_of, **{"norm_clip_factor": None, **kwargs})


def sent_to(replies: list[Message]) -> list[Message]:
    """The train messages the replies answer (one per node, as the Grid addresses them)."""
    return [
        make_message(
            Metadata(
                run_id=1,
                message_id=f"train-{r.metadata.src_node_id}",
                src_node_id=0,
                dst_node_id=r.metadata.src_node_id,
                reply_to_message_id="",
                group_id="1",
                created_at=time.time(),
                ttl=3600.0,
                message_type=MessageType.TRAIN,
            ),
            RecordDict(),
        )
        for r in replies
    ]


def aggregate(s: ModalityAwareFedAvg, rnd: int, replies: list[Message], **kwargs) -> RoundOutcome:
    inputs = {"current_arrays": global_arrays(-1.0), "node_groups": None, "sent": sent_to(replies), **kwargs}
    return aggregate_replies(s, rnd, replies, **inputs)


def result(arrays: ArrayRecord | dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    assert arrays is not None
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in arrays.items()}


def test_hand_computed_average_with_missing_modalities() -> None:
    # Biobank: all groups; hospital: EHR only; genomics cohort: EHR + genomics.
    biobank = reply(
        1,
        site_arrays(["shared", "ehr", "wearables", "genomics"], 1.0),
        {"shared": 100, "ehr": 100, "wearables": 30, "genomics": 100},
    )
    hospital = reply(2, site_arrays(["shared", "ehr"], 4.0), {"shared": 300, "ehr": 300})
    cohort = reply(3, site_arrays(["shared", "ehr", "genomics"], 2.0), {"shared": 100, "ehr": 50, "genomics": 300})
    outcome = aggregate(strategy(), 1, [biobank, hospital, cohort])
    out = result(outcome.arrays)
    np.testing.assert_allclose(out["shared.w"], (100 * 1 + 300 * 4 + 100 * 2) / 500)
    np.testing.assert_allclose(out["ehr.w"], (100 * 1 + 300 * 4 + 50 * 2) / 450)
    np.testing.assert_allclose(out["wearables.w"], 1.0)  # only the biobank
    np.testing.assert_allclose(out["genomics.w"], (100 * 1 + 300 * 2) / 400)
    assert outcome.losses == {"total": 1.0} and outcome.accepted == [1, 2, 3]
    assert outcome.contributors == {"shared": [1, 2, 3], "ehr": [1, 2, 3], "wearables": [1], "genomics": [1, 3]}


def test_key_no_reply_holds_keeps_previous_value() -> None:
    only_ehr = reply(2, site_arrays(["shared", "ehr"], 4.0), {"shared": 3, "ehr": 3})
    out = result(aggregate(strategy(), 1, [only_ehr]).arrays)
    np.testing.assert_array_equal(out["wearables.w"], -1.0)
    np.testing.assert_array_equal(out["genomics.w"], -1.0)
    np.testing.assert_array_equal(out["ehr.w"], 4.0)
    assert set(out) == set(SHAPES)


def test_equals_stock_fedavg_when_every_site_holds_every_group() -> None:
    rng = np.random.default_rng(0)
    replies = []
    for node_id, n in zip([1, 2, 3, 4], [17, 230, 5, 64]):
        arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        replies.append(reply(node_id, arrays, {g: n for g in ["shared", "ehr", "wearables", "genomics"]}))
    ours = result(aggregate(strategy(), 1, replies).arrays)
    stock = result(FedAvg().aggregate_train(1, per_key(replies))[0])
    assert set(ours) == set(stock)
    for k in ours:
        np.testing.assert_array_equal(ours[k], stock[k])  # bit for bit


def good(node_id: int, value: float = 1.0) -> Message:
    return reply(node_id, site_arrays(["shared", "ehr"], value), {"shared": 10, "ehr": 10})


def bad_replies() -> dict[str, Message]:
    nan = site_arrays(["shared", "ehr"], 1.0)
    nan["ehr.w"][1] = np.nan
    inf = site_arrays(["shared", "ehr"], 1.0)
    inf["shared.b"][0] = np.inf
    shape = site_arrays(["shared", "ehr"], 1.0)
    shape["ehr.w"] = np.ones(5, dtype=np.float32)
    dtype = site_arrays(["shared", "ehr"], 1.0)
    dtype["ehr.w"] = np.ones(4, dtype=np.float64)
    unknown = site_arrays(["shared", "ehr"], 1.0)
    unknown["ehr.extra"] = np.ones(1, dtype=np.float32)
    partial = site_arrays(["shared", "ehr"], 1.0)
    del partial["shared.b"]
    return {
        "NaN": reply(90, nan, {"shared": 10, "ehr": 10}),
        "Inf": reply(91, inf, {"shared": 10, "ehr": 10}),
        "shape": reply(92, shape, {"shared": 10, "ehr": 10}),
        "dtype": reply(93, dtype, {"shared": 10, "ehr": 10}),
        "unknown key": reply(94, unknown, {"shared": 10, "ehr": 10}),
        "partial group": reply(95, partial, {"shared": 10, "ehr": 10}),
        "ehr count missing": reply(96, site_arrays(["shared", "ehr"], 1.0), {"shared": 10}),
        "norm": good(97, value=1e6),
    }


@pytest.mark.parametrize("kind", list(bad_replies()))
def test_bad_reply_is_dropped_and_round_goes_on(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    bad = bad_replies()[kind]
    outcome = aggregate(strategy(), 3, [good(1, 1.0), bad, good(2, 3.0), good(3, 2.0)])
    out = result(outcome.arrays)
    np.testing.assert_allclose(out["ehr.w"], 2.0)  # mean of the three good ones
    [rejected] = outcome.rejected
    assert rejected.node_id == bad.metadata.src_node_id
    assert kind.split()[0].lower() in rejected.reason.lower()
    assert f"node {rejected.node_id}" in caplog.text


def test_replies_read_as_they_arrive_are_judged_as_if_read_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    # The round reads each reply the moment it arrives (EarlyReads) and judges them all after the
    # last: the outcome must be the one judge_replies reaches reading them all then, and no reply
    # read early is parsed a second time.
    bad = bad_replies()
    replies = [good(1, 1.0), bad["NaN"], good(2, 3.0), bad["partial group"], good(3, 2.0)]
    s, previous = strategy(), global_arrays(-1.0)
    alone = aggregate(s, 3, replies)
    parsed: list[int] = []
    real_parse = replies_module.parse_reply

    def counting(content, *args, **kwargs):  # noqa: ANN001, ANN202
        parsed.append(id(content))
        return real_parse(content, *args, **kwargs)

    monkeypatch.setattr(replies_module, "parse_reply", counting)
    sent = sent_to(replies)
    read = EarlyReads(3, previous, None, sent, None, s.reply_limits)
    for msg in replies[:4]:  # the last one "arrives" after the wait: judge_replies reads it
        read(msg)
    assert len(parsed) == 4
    early = aggregate_replies(s, 3, replies, current_arrays=previous, node_groups=None, sent=sent, read=read)
    assert len(parsed) == 5 and parsed[-1] == id(replies[4].content)
    assert early.accepted == alone.accepted and early.rejected == alone.rejected
    for key, value in result(alone.arrays).items():
        np.testing.assert_array_equal(result(early.arrays)[key], value)
    # A reply alike but not the one read (another Message object) is read again, not looked up.
    again = make_message(replies[0].metadata, replies[0].content)
    assert read.get(again) is None and read.get(replies[0]) is not None
    assert read.size(replies[0]) == message_size(replies[0]) == read.size(again)  # sized on arrival, or now


def test_fp16_transport_is_upcast_before_averaging() -> None:
    half = {k: v.astype(np.float16) for k, v in site_arrays(["shared", "ehr"], 1.5).items()}
    out = result(aggregate(strategy(), 1, [reply(1, half, {"shared": 10, "ehr": 10}), good(2, 0.5)]).arrays)
    assert out["ehr.w"].dtype == np.float32
    np.testing.assert_allclose(out["ehr.w"], 1.0)


def test_group_below_minimum_sites_is_left_unchanged() -> None:
    biobank = reply(1, site_arrays(["shared", "ehr", "wearables"], 1.0), {"shared": 1, "ehr": 1, "wearables": 1})
    hospital = reply(2, site_arrays(["shared", "ehr"], 3.0), {"shared": 1, "ehr": 1})
    outcome = aggregate(strategy(min_sites_per_group=2), 1, [biobank, hospital])
    out = result(outcome.arrays)
    np.testing.assert_allclose(out["shared.w"], 2.0)
    np.testing.assert_array_equal(out["wearables.w"], -1.0)  # one site only: unchanged
    assert set(outcome.contributors) == {"shared", "ehr"}


def test_all_replies_bad_leaves_round_without_update() -> None:
    outcome = aggregate(strategy(), 1, [bad_replies()["NaN"]])
    assert outcome.arrays is None and outcome.accepted == [] and len(outcome.rejected) == 1


def test_server_adam_moves_towards_the_average() -> None:
    s = strategy(server_optimizer=GroupAdam(lr=0.1))
    out = result(aggregate(s, 1, [good(1, 1.0)]).arrays)
    # previous -1, average 1: a first Adam step moves by about lr in the update's direction.
    np.testing.assert_allclose(out["ehr.w"], -1.0 + 0.1, rtol=1e-3)
    np.testing.assert_array_equal(out["genomics.w"], -1.0)


def test_only_the_sites_groups_are_sent() -> None:
    s = strategy()
    sent = s.records_for_nodes(global_arrays(), {7: ["shared", "ehr"]})[7]
    assert set(sent) == {PACKED_PART}  # one packed part per message
    assert {group_of(k) for k in unpack_record(sent, where="test")} == {"shared", "ehr"}


def test_the_strategy_keeps_no_round_state() -> None:
    """Two rounds through one strategy, in either order, give what each gives through a fresh one."""
    first = [good(1, 1.0), good(2, 3.0)]
    second = [good(1, 5.0), bad_replies()["NaN"]]
    shared = strategy()
    a, b = aggregate(shared, 1, first), aggregate(shared, 2, second)
    b2, a2 = aggregate(strategy(), 2, second), aggregate(strategy(), 1, first)
    for x, y in ((a, a2), (b, b2)):
        assert x.accepted == y.accepted and x.rejected == y.rejected and x.contributors == y.contributors
        assert x.arrays is not None and y.arrays is not None
        for k in x.arrays:
            np.testing.assert_array_equal(x.arrays[k], y.arrays[k])
    assert vars(shared).keys() == vars(strategy()).keys()


def test_the_round_sends_every_node_its_groups_and_averages_their_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_messages -> aggregate_replies as server/round.py calls them (the strategy is no
    Flower Strategy: docs/architecture.md, "Names other tools rely on")."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as inside a ServerApp run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    s = strategy()
    messages = train_messages(s, 1, global_arrays(-1.0), ConfigRecord({}), [1, 2])
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    outcome = aggregate(s, 1, [good(1, 1.0), good(2, 3.0)], sent=messages)
    assert outcome.arrays is not None
    np.testing.assert_allclose(outcome.arrays["ehr.w"], 2.0)
    np.testing.assert_array_equal(outcome.arrays["genomics.w"], -1.0)
    assert outcome.accepted == [1, 2] and outcome.losses == {"total": 1.0}


# ------------------------------------------------------------------------ int8 transport


def trained_arrays(seed: int, groups: list[str]) -> dict[str, np.ndarray]:
    """What a site trained from global_arrays(-1.0): a small random update of each array."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in site_arrays(groups, -1.0).items()
    }


def quantised(node_id: int, arrays: dict[str, np.ndarray], scales: dict, counts: dict[str, int]) -> Message:
    """A reply carrying these (int8) arrays and this scales record as they are."""
    msg = reply(node_id, arrays, counts)
    msg.content[SCALES_RECORD] = MetricRecord(scales)
    return msg


def int8_reply(node_id: int, seed: int, counts: dict[str, int]) -> tuple[Message, dict[str, np.ndarray]]:
    """A site's int8 reply (as SiteRuntime.encode makes it) and the arrays it de-quantises to."""
    previous = global_arrays(-1.0)
    encoded = encode_update(
        trained_arrays(seed, list(counts)), previous, "int8", rng=np.random.default_rng(seed), residual={}
    )
    assert encoded.scales is not None and all(v.dtype == np.int8 for v in encoded.arrays.values())
    decoded = {k: dequantise(previous[k], q, encoded.scales[k]) for k, q in encoded.arrays.items()}
    return quantised(node_id, encoded.arrays, encoded.scales, counts), decoded


def test_int8_replies_average_as_fedavg_of_their_dequantised_arrays() -> None:
    everything = ["shared", "ehr", "wearables", "genomics"]
    int8, dequantised = [], []
    for node_id, n in zip([1, 2, 3], [17, 230, 64]):
        msg, decoded = int8_reply(node_id, node_id, {g: n for g in everything})
        int8.append(msg)
        dequantised.append(reply(node_id, decoded, {g: n for g in everything}))
    outcome = aggregate(strategy(), 1, int8)
    assert outcome.accepted == [1, 2, 3] and outcome.rejected == []
    ours = result(outcome.arrays)
    stock = result(FedAvg().aggregate_train(1, per_key(dequantised))[0])
    assert set(ours) == set(stock)
    for k in ours:
        assert ours[k].dtype == np.float32
        np.testing.assert_array_equal(ours[k], stock[k])  # bit for bit
    # And not the previous arrays: the updates arrived.
    assert not np.allclose(ours["shared.w"], -1.0)


def test_int8_and_float_replies_mix_in_one_round() -> None:
    msg, decoded = int8_reply(1, 7, {"shared": 10, "ehr": 10})
    out = result(aggregate(strategy(), 1, [msg, good(2, 0.5)]).arrays)
    np.testing.assert_array_equal(out["ehr.w"], (decoded["ehr.w"] * 0.5 + np.float32(0.5) * 0.5).astype(np.float32))


def bad_int8_replies() -> dict[str, Message]:
    counts = {"shared": 10, "ehr": 10}
    base, _ = int8_reply(0, 3, counts)
    arrays = unpack_record(base.content.array_records[ARRAYS_RECORD], where="test")
    scales = dict(base.content.metric_records[SCALES_RECORD])

    def variant(node_id: int, key: str = "ehr.w", value=None, array=None, drop_scale=False) -> Message:
        a, s = dict(arrays), dict(scales)
        if array is not None:
            a[key] = array
        if value is not None:
            s[key] = value
        if drop_scale:
            del s[key]
        return quantised(node_id, a, s, counts)

    no_record = reply(90, arrays, counts)  # int8 arrays, no scales record at all
    minus128 = arrays["ehr.w"].copy()
    minus128[0] = -128
    return {
        "scale record missing": no_record,
        "scale missing": variant(91, drop_scale=True),
        "scale NaN": variant(92, value=float("nan")),
        "scale inf": variant(93, value=float("inf")),
        "scale zero": variant(94, value=0.0),
        "scale negative": variant(95, value=-0.01),
        "scale not a number": variant(96, value=[0.1, 0.2]),
        "scale for no int8 array": variant(97, key="ehr.extra", value=0.1),
        "dtype uint8": variant(98, array=arrays["ehr.w"].view(np.uint8)),
        "dtype int16": variant(99, array=arrays["ehr.w"].astype(np.int16)),
        "shape": variant(100, array=np.zeros(5, np.int8)),
        "int8 value -128": variant(101, array=minus128),
        "scale overflows": variant(102, value=1e38, array=np.full(4, 127, np.int8)),
    }


@pytest.mark.parametrize("kind", list(bad_int8_replies()))
def test_malformed_int8_reply_is_rejected_and_round_goes_on(kind: str) -> None:
    bad = bad_int8_replies()[kind]
    outcome = aggregate(strategy(), 3, [good(1, 1.0), bad, good(2, 3.0), good(3, 2.0)])
    np.testing.assert_allclose(result(outcome.arrays)["ehr.w"], 2.0)  # mean of the three good ones
    [rejected] = outcome.rejected
    assert rejected.node_id == bad.metadata.src_node_id and rejected.kind == "invalid"
    word = {"dtype uint8": "dtype", "dtype int16": "dtype", "shape": "shape", "int8 value -128": "-128"}
    assert word.get(kind, "scale") in rejected.reason.lower(), rejected.reason
