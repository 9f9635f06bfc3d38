"""Packed messages (healthfm_core/protocol/packing.py): a model message is a handful of Flower objects,
arrays come back exactly as sent, and a malformed packed reply - replayed as a hostile site would
send it - is rejected with a reason naming the record, the part and the problem while the round
goes on with the good replies."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from helpers.flower_messages import train_metadata
from safetensors.numpy import save

from client.client_app import message_arrays, train_reply_content
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.protocol import ARRAYS_RECORD, TrainReply
from healthfm_core.protocol.packing import (
    MAX_PARTS,
    PACKED_PART,
    pack_arrays,
    pack_group_sets,
    unpack_arrays,
    unpack_record,
)
from healthfm_core.terms.groups import GROUPS
from healthfm_core.terms.model_config import load_model_config
from server.limits import array_record_bytes
from server.round import aggregate_replies
from server.strategy import ModalityAwareFedAvg, pack_record

SHAPES = {"shared.w": (2, 3), "shared.b": (3,), "ehr.w": (4,)}
PREVIOUS = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
COUNTS = {"shared": 10, "ehr": 10}


def group_of(key: str) -> str:
    return key.split(".")[0]


def site_arrays(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def reply_with(node: int, record: ArrayRecord | None = None, value: float = 1.0) -> Message:
    """A site's train reply (its metrics as a site makes them) carrying `record` as its arrays
    (None: the well-formed packed record of `value`)."""
    reply = TrainReply.model_validate(
        {"arrays": site_arrays(value), "num_examples": 10, "group_examples": COUNTS}, context={"group_of": group_of}
    )
    content = train_reply_content(reply)
    if record is not None:
        content[ARRAYS_RECORD] = record
    return make_message(train_metadata(f"r{node}", src=node, dst=0, reply_to=f"m{node}"), content)


def sent(*nodes: int) -> list[Message]:
    return [make_message(train_metadata(f"m{n}", src=0, dst=n), RecordDict()) for n in nodes]


def blob_of(header: dict, data: bytes) -> np.ndarray:
    """A safetensors blob written by hand: 8-byte little-endian header length, JSON, data."""
    text = json.dumps(header).encode()
    return np.frombuffer(struct.pack("<Q", len(text)) + text + data, np.uint8)


def good_blob() -> np.ndarray:
    return pack_arrays(site_arrays(2.0))[PACKED_PART]


def header_and_data(blob: np.ndarray) -> tuple[dict, bytes]:
    raw = blob.tobytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def one_part(blob: np.ndarray) -> ArrayRecord:
    return ArrayRecord({PACKED_PART: Array(blob)})


def _overlapping() -> ArrayRecord:
    header, data = header_and_data(good_blob())
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    start = header[keys[0]]["data_offsets"][0]
    first = header[keys[1]]
    first["data_offsets"] = [start, start + first["data_offsets"][1] - first["data_offsets"][0]]
    return one_part(blob_of(header, data))


def _shape_mismatch() -> ArrayRecord:
    header, data = header_and_data(good_blob())
    header["ehr.w"]["shape"] = [5]  # 20 bytes announced, 16 held
    return one_part(blob_of(header, data))


def _header_length_lies() -> ArrayRecord:
    raw = bytearray(good_blob().tobytes())
    raw[:8] = struct.pack("<Q", 2**40)
    return one_part(np.frombuffer(bytes(raw), np.uint8))


def _header_not_json() -> ArrayRecord:
    header, data = header_and_data(good_blob())
    text = json.dumps(header).encode()
    return one_part(np.frombuffer(struct.pack("<Q", len(text)) + b"!" * len(text) + data, np.uint8))


def _garbage_npy() -> ArrayRecord:
    good = Array(good_blob())
    return ArrayRecord({PACKED_PART: Array(dtype="uint8", shape=good.shape, stype=good.stype, data=b"\x93NUMPY junk")})


def _npy_shape_lies() -> ArrayRecord:
    good, other = Array(good_blob()), Array(np.zeros(7, np.uint8))
    return ArrayRecord({PACKED_PART: Array(dtype="uint8", shape=good.shape, stype=good.stype, data=other.data)})


def _duplicate_json_key() -> ArrayRecord:
    text = b'{"ehr.w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
    text += b'"ehr.w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}'
    return one_part(np.frombuffer(struct.pack("<Q", len(text)) + text + b"\0" * 32, np.uint8))


# fault -> (the reply's ArrayRecord, a word its rejection must contain)
FAULTS = {
    "truncated": (lambda: one_part(good_blob()[:-5]), "incomplete"),
    "trailing bytes": (lambda: one_part(np.concatenate([good_blob(), np.zeros(8, np.uint8)])), "not fully covered"),
    "empty blob": (lambda: one_part(np.zeros(0, np.uint8)), "header too small"),
    "header length lies": (_header_length_lies, "header too large"),
    "header not JSON": (_header_not_json, "invalid json"),
    "overlapping offsets": (_overlapping, "invalid offset"),
    "offsets do not fit the shape": (_shape_mismatch, "invalid shape"),
    "a key twice in the header": (_duplicate_json_key, "invalid offset"),
    "dtype numpy does not hold": (
        lambda: one_part(blob_of({"ehr.w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)),
        "bf16",
    ),
    "negative shape": (
        lambda: one_part(blob_of({"ehr.w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16)),
        "invalid json",
    ),
    "part is not uint8": (lambda: ArrayRecord({PACKED_PART: Array(np.zeros(8, np.float32))}), "not a packed blob"),
    "part is two-dimensional": (lambda: ArrayRecord({PACKED_PART: Array(good_blob().reshape(1, -1))}), "not a packed"),
    "one Array per key": (lambda: ArrayRecord({k: Array(v) for k, v in site_arrays(2.0).items()}), "predates"),
    "a key in two parts": (
        lambda: ArrayRecord(
            {"a": Array(good_blob()), "b": Array(pack_arrays({"ehr.w": np.ones(4, np.float32)})[PACKED_PART])}
        ),
        "packed twice",
    ),
    "too many parts": (
        lambda: ArrayRecord({f"p{i}": Array(np.frombuffer(save({}), np.uint8)) for i in range(MAX_PARTS + 1)}),
        f"at most {MAX_PARTS}",
    ),
    "undecodable npy payload": (_garbage_npy, "undecodable"),
    "npy payload unlike its header": (_npy_shape_lies, "does not match its header"),
    "extra key": (
        lambda: one_part(pack_arrays({**site_arrays(2.0), "ehr.x": np.ones(2, np.float32)})[PACKED_PART]),
        "unknown key 'ehr.x'",
    ),
    "wrong dtype": (
        lambda: one_part(pack_arrays({**site_arrays(2.0), "ehr.w": np.ones(4, np.float64)})[PACKED_PART]),
        "dtype float64",
    ),
    "wrong shape": (
        lambda: one_part(pack_arrays({**site_arrays(2.0), "ehr.w": np.ones(5, np.float32)})[PACKED_PART]),
        "shape (5,)",
    ),
    "NaN": (
        lambda: one_part(pack_arrays({**site_arrays(2.0), "ehr.w": np.full(4, np.nan, np.float32)})[PACKED_PART]),
        "nan",
    ),
    "oversize": (lambda: one_part(np.concatenate([good_blob(), np.zeros(10_000, np.uint8)])), "exceeds the limit"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_malformed_packed_reply_is_rejected_with_its_reason_and_the_round_goes_on(fault: str) -> None:
    make, word = FAULTS[fault]
    limit = array_record_bytes(pack_record(PREVIOUS, group_of)) * 4
    strategy = ModalityAwareFedAvg(group_of=group_of, max_reply_bytes=limit)
    replies = [reply_with(1, value=1.0), reply_with(2, make()), reply_with(3, value=3.0)]
    outcome = aggregate_replies(strategy, 1, replies, current_arrays=PREVIOUS, node_groups=None, sent=sent(1, 2, 3))
    assert outcome.accepted == [1, 3]
    assert outcome.arrays is not None
    np.testing.assert_allclose(outcome.arrays["ehr.w"], 2.0)  # the two good replies, averaged
    [rejected] = outcome.rejected
    assert rejected.node_id == 2 and rejected.kind == "invalid"
    assert word.lower() in rejected.reason.lower(), rejected.reason
    if fault not in ("extra key", "wrong dtype", "wrong shape", "NaN", "oversize"):
        # A fault of the packed form names the record and the part (or the parts' count).
        assert "record 'arrays'" in rejected.reason, rejected.reason


def test_a_malformed_train_message_is_refused_by_the_site_naming_the_record() -> None:
    make, word = FAULTS["overlapping offsets"]
    msg = make_message(train_metadata("m", src=0, dst=7), RecordDict({"arrays": make()}))
    with pytest.raises(ValueError, match="train message, record 'arrays': part 'packed'.*invalid offset"):
        message_arrays(msg)


def test_arrays_come_back_exactly_as_packed() -> None:
    arrays: dict[str, np.ndarray] = {
        "shared.f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "shared.f16": np.linspace(-1, 1, 5).astype(np.float16),
        "ehr.i8": np.array([-127, 0, 127], np.int8),
        "ehr.i64": np.array([3], np.int64),
        "ehr.bool": np.array([True, False]),
        "ehr.scalar": np.array(2.5, np.float32),
        "genomics.empty": np.zeros((0, 3), np.float32),
        "genomics.strided": np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],  # not contiguous
    }
    for part_of in (None, group_of):
        record = pack_record(arrays, part_of)
        assert set(record) == ({PACKED_PART} if part_of is None else {"shared", "ehr", "genomics"})
        back = unpack_record(record, where="test")
        assert back.keys() == arrays.keys()
        for key, value in arrays.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            np.testing.assert_array_equal(back[key], value)
            assert back[key].flags.writeable  # the site loads them into torch
    assert pack_arrays({}) == {} and unpack_record(ArrayRecord({}), where="test") == {}
    with pytest.raises(ValueError, match="here: not a valid packed"):
        unpack_arrays(b"\0" * 3, where="here")


def test_a_model_message_is_a_handful_of_objects_of_about_the_same_bytes() -> None:
    model = HealthFM(load_model_config("tiny"), vocab_size=2000, n_prs_traits=4)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    per_key = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    # As the server sends them: one packed part for the site's group set (here every group).
    [packed] = ModalityAwareFedAvg().records_for_nodes(arrays, {1: list(GROUPS)}).values()
    old, new = get_all_nested_objects(per_key), get_all_nested_objects(packed)
    assert len(arrays) > 100 and len(old) > len(arrays)  # every key an Array (and a chunk)
    # The record, one Array and its chunk(s) of 5 MiB: three objects for tiny.
    assert set(packed) == {PACKED_PART} and len(new) == 3, len(new)
    old_bytes = sum(len(o.deflate()) for o in old.values())
    new_bytes = sum(len(o.deflate()) for o in new.values())
    assert abs(new_bytes - old_bytes) < 0.02 * old_bytes, (old_bytes, new_bytes)
    # A site's reply (one part) unpacks to the same arrays.
    back = unpack_record(pack_record(arrays), where="test")
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())


# ---------------------------------------------------------------- the server's group-set packing

ALL_SHAPES = {"shared.w": (2, 3), "shared.b": (3,), "ehr.w": (4,), "wearables.w": (2, 2), "genomics.w": (3,)}
NODE_GROUPS = {  # the tiny scenario's sites: two hold every group, one no genomics, one no wearables
    1: ["shared", "ehr", "wearables", "genomics"],
    2: ["shared", "ehr", "wearables"],
    3: ["genomics", "ehr", "shared", "wearables"],  # the set of node 1, named in another order
    4: ["shared", "ehr", "genomics"],
}


def global_model(value: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {k: (value + rng.standard_normal(s)).astype(np.float32) for k, s in ALL_SHAPES.items()}


def test_sites_with_the_same_groups_carry_the_same_blob_and_others_their_own() -> None:
    records = ModalityAwareFedAvg(group_of=group_of).records_for_nodes(global_model(0.0), NODE_GROUPS)
    assert records.keys() == NODE_GROUPS.keys()
    assert all(set(r) == {PACKED_PART} for r in records.values())  # one part per message
    part = {node: r[PACKED_PART] for node, r in records.items()}
    # Same set: the very same blob (its bytes shared, not copied; one content-addressed object,
    # pushed and stored once).
    assert part[1].data is part[3].data and part[1].object_id == part[3].object_id
    assert records[1] is not records[3]  # each message its own record around it
    ids = {part[n].object_id for n in (1, 2, 4)}
    assert len(ids) == 3  # different sets, different blobs
    for node, groups in NODE_GROUPS.items():
        msg = make_message(train_metadata(f"m{node}", src=0, dst=node), RecordDict({"arrays": records[node]}))
        received = message_arrays(msg)  # as the site reads it, with the site's own checks
        assert {group_of(k) for k in received} == set(groups)
        assert received.keys() == {k for k in ALL_SHAPES if group_of(k) in groups}


def test_group_set_packing_packs_each_distinct_set_once() -> None:
    arrays = global_model(0.0)
    sets = pack_group_sets(arrays, group_of, [["ehr", "shared"], ["shared", "ehr"], ["shared"], ["other"]])
    assert set(sets) == {frozenset({"ehr", "shared"}), frozenset({"shared"}), frozenset({"other"})}
    assert sets[frozenset({"other"})] == {}  # no array of the set: no part, as before
    back = unpack_arrays(sets[frozenset({"shared"})][PACKED_PART], where="test")
    assert back.keys() == {"shared.w", "shared.b"}
    assert all(np.array_equal(back[k], arrays[k]) for k in back)


def test_a_round_averages_to_the_same_bits_as_with_one_part_per_group() -> None:
    """What the sites receive, and so what a round aggregates, is bit for bit what the per-group
    packing (the server's format before) gave."""
    previous = global_model(-1.0)
    strategy = ModalityAwareFedAvg(group_of=group_of)
    per_group = pack_record(previous, group_of)  # before: one part per group, each site its groups'
    before = {n: ArrayRecord({g: per_group[g] for g in gs if g in per_group}) for n, gs in NODE_GROUPS.items()}
    after = strategy.records_for_nodes(previous, NODE_GROUPS)
    outcomes = []
    for records in (before, after):
        sent_msgs, replies = [], []
        for node, groups in NODE_GROUPS.items():
            msg = make_message(train_metadata(f"m{node}", src=0, dst=node), RecordDict({"arrays": records[node]}))
            received = message_arrays(msg)
            # A deterministic "training" of what was received, so any difference in it shows.
            trained = {k: (v * np.float32(1.0 + 0.1 * node) + np.float32(node)) for k, v in received.items()}
            counts = {g: 10 * node for g in groups}
            reply = TrainReply.model_validate(
                {"arrays": trained, "num_examples": 10 * node, "group_examples": counts},
                context={"group_of": group_of},
            )
            sent_msgs.append(msg)
            replies.append(
                make_message(
                    train_metadata(f"r{node}", src=node, dst=0, reply_to=f"m{node}"), train_reply_content(reply)
                )
            )
        outcomes.append(
            aggregate_replies(strategy, 1, replies, current_arrays=previous, node_groups=NODE_GROUPS, sent=sent_msgs)
        )
    a, b = outcomes
    assert a.accepted == b.accepted == [1, 2, 3, 4] and not a.rejected and not b.rejected
    assert a.arrays is not None and b.arrays is not None and a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        assert a.arrays[key].dtype == b.arrays[key].dtype
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
        assert not np.array_equal(a.arrays[key], previous[key])  # every group was updated
