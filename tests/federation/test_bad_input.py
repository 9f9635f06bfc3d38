"""Property-based tests (hypothesis) of hostile input: malformed train replies (arrays, metrics,
records; error replies, refusals, replies to no message sent, second replies) fed to
ModalityAwareFedAvg.aggregate, malformed parquet files fed to the site reader (check_site), and
valid sites written in the ways MEDS 0.4 allows (accepted, and read as the canonical site).

Properties: nothing raises; every malformed reply is rejected with a reason while the well-formed
ones are still averaged exactly, and with every group at every site the average is plain FedAvg's
bit for bit; every malformed site file is reported with a problem naming it,
and checking a site writes nothing. Bounded (max_examples 40) so that both run in seconds.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAvg
from helpers.in_process_grid import InProcessGrid, tiny_nodes
from helpers.parquet_footer import set_row_counts, set_value_counts
from helpers.run_configs import fed_config
from helpers.site_tables import make_site_tables, write_site_tables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.client_app import train_reply_content
from healthfm_core.data.checks.site_check import check_site
from healthfm_core.data.sites.site import open_site
from healthfm_core.protocol import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    STATUS_RECORD,
    TRAIN_LOSSES,
    PrivacySpend,
    TrainReply,
)
from healthfm_core.protocol.packing import PACKED_PART, pack_arrays, unpack_record
from server.deploy.commands import report_outcome
from server.deploy.flwr_control import EXIT_SITE_LOST
from server.outcome import RunOutcome, read_outcome, sites_lost, write_outcome
from server.round import aggregate_replies
from server.server_app import FederationServer
from server.strategy import ModalityAwareFedAvg, pack_record

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------- the strategy

SHAPES = {"shared.w": (2, 3), "shared.b": (3,), "ehr.w": (4,)}
GROUP_KEYS = {"shared": ["shared.w", "shared.b"], "ehr": ["ehr.w"]}
PREVIOUS = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

# Malformed arrays, malformed metrics, malformed records: each makes a reply unusable.
ARRAY_FAULTS = [
    "dtype",
    "shape",
    "nan",
    "inf",
    "huge_value",
    "garbage_bytes",
    "empty_bytes",
    "oversized",
    "unknown_key",
    "partial_group",
    "empty_record",
    "group_not_sent",
    # the packed form itself (healthfm_core/protocol/packing.py; every case in tests/unit/test_packing.py)
    "truncated_blob",
    "trailing_bytes",
    "per_key_record",
    "key_packed_twice",
]
METRIC_FAULTS = [
    "missing_count",
    "negative_count",
    "zero_count",
    "fractional_count",
    "nan_metric",
    "list_metric",
    "unknown_metric",
    "no_metrics",
]
RECORD_FAULTS = ["extra_record", "metrics_as_config", "status_on_a_trained_reply", "refusal_with_arrays"]
MALFORMATIONS = ARRAY_FAULTS + METRIC_FAULTS + RECORD_FAULTS
# Well-formed replies that still contribute nothing: an error reply, a refusal by the site.
NOT_CONTRIBUTING = ["error", "refused"]


def group_of(key: str) -> str:
    return key.split(".")[0]


def _metadata(node: int, *, src: int | None = None, dst: int = 0, message_id: str = "", reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id or f"reply-{node}",
        src_node_id=node if src is None else src,
        dst_node_id=dst,
        reply_to_message_id=reply_to or f"train-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )


def _sent(nodes: list[int]) -> list[Message]:
    return [
        make_message(_metadata(0, src=0, dst=n, message_id=f"train-{n}", reply_to="-"), RecordDict()) for n in nodes
    ]


def _train_reply(arrays: dict[str, np.ndarray], counts: dict[str, int], **fields) -> TrainReply:
    data = {"arrays": arrays, "num_examples": max(counts.values()), "group_examples": counts, **fields}
    return TrainReply.model_validate(data, context={"group_of": group_of})


def _content(arrays: ArrayRecord | None, metrics: dict, status: dict | None) -> RecordDict:
    content = RecordDict({METRICS_RECORD: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS_RECORD] = arrays
    if status is not None:
        content[STATUS_RECORD] = ConfigRecord(status)
    return content


@st.composite
def a_reply(draw: st.DrawFn, node: int) -> tuple[Message, str | None, dict[str, np.ndarray], dict[str, int]]:
    """(message, fault or None, its arrays, its counts per group); the fault is a malformation
    or one of NOT_CONTRIBUTING."""
    groups = draw(st.sampled_from([["shared"], ["shared", "ehr"]]))
    # Well-formed values in [1, 2] around a global model of 0: no norm is an outlier.
    arrays = {
        k: np.asarray(
            draw(
                st.lists(
                    st.floats(1.0, 2.0, width=32), min_size=int(np.prod(SHAPES[k])), max_size=int(np.prod(SHAPES[k]))
                )
            ),
            np.float32,
        ).reshape(SHAPES[k])
        for g in groups
        for k in GROUP_KEYS[g]
    }
    counts = {g: draw(st.integers(1, 1000)) for g in groups}
    optional: dict[str, object] = {}
    if draw(st.booleans()):  # a DP update: the spend, and no losses or timings
        optional["dp"] = {
            "epsilon": draw(st.floats(0, 10)),
            "delta": 1e-5,
            "noise_multiplier": draw(st.floats(0.3, 3.0)),
        }
    else:
        if draw(st.booleans()):
            optional["losses"] = {draw(st.sampled_from(TRAIN_LOSSES)): draw(st.floats(0, 50))}
        if draw(st.booleans()):
            optional["train_seconds"] = draw(st.floats(0, 100))
    bad = draw(st.one_of(st.none(), st.sampled_from(MALFORMATIONS + NOT_CONTRIBUTING)))
    if bad == "error":
        return make_message(_metadata(node), error=Error(code=0, reason="site failed")), bad, arrays, counts
    if bad == "refused":
        reply = TrainReply.refused("epsilon cap", PrivacySpend(epsilon=3.0, delta=1e-5))
        return make_message(_metadata(node), train_reply_content(reply)), bad, arrays, counts
    _, metrics, status = _train_reply(arrays, counts, **optional).to_records()
    required = sorted(_train_reply(arrays, counts).to_records().metrics)  # the counts: never optional
    values = dict(arrays)  # what the reply packs
    key = draw(st.sampled_from(sorted(values)))
    items: ArrayRecord | None = None  # a fault in the packed record itself (else: values, packed)
    extra: dict[str, ArrayRecord] = {}
    if bad == "dtype":
        dtype = draw(st.sampled_from([np.float64, np.int32, np.int64, np.uint8, np.bool_, np.complex64]))
        values[key] = arrays[key].astype(dtype)
    elif bad == "shape":
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).filter(lambda s: tuple(s) != SHAPES[key]))
        values[key] = np.ones(shape, np.float32)
    elif bad in ("nan", "inf"):
        value = arrays[key].copy()
        value.flat[draw(st.integers(0, value.size - 1))] = (
            np.nan if bad == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        )
        values[key] = value
    elif bad == "huge_value":
        value = arrays[key].copy()
        value.flat[draw(st.integers(0, value.size - 1))] = draw(st.floats(1e7, 3.0000000054977558e38, width=32))
        values[key] = value
    elif bad in ("garbage_bytes", "empty_bytes", "oversized"):
        good = pack_record(values)[PACKED_PART]
        data = b"" if bad == "empty_bytes" else draw(st.binary(min_size=1, max_size=300))
        if bad == "oversized":
            data = good.data + b"\0" * 4096
        items = ArrayRecord(
            {PACKED_PART: Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=data)}
        )
    elif bad in ("truncated_blob", "trailing_bytes"):
        blob = pack_arrays(values)[PACKED_PART]
        if bad == "truncated_blob":
            blob = blob[: draw(st.integers(0, blob.size - 1))]
        else:
            blob = np.concatenate([blob, np.frombuffer(draw(st.binary(min_size=1, max_size=16)), np.uint8)])
        items = ArrayRecord({PACKED_PART: Array(blob)})
    elif bad == "per_key_record":
        items = ArrayRecord({k: Array(v) for k, v in values.items()})  # one Array per key: not packed
    elif bad == "key_packed_twice":
        items = ArrayRecord(
            {"a": Array(pack_arrays(values)[PACKED_PART]), "b": Array(pack_arrays({key: values[key]})[PACKED_PART])}
        )
    elif bad == "unknown_key":
        values[draw(st.sampled_from(["shared.zzz", "ehr.extra", "nothing"]))] = np.ones(2, np.float32)
    elif bad == "partial_group":
        values.pop("shared.b")  # every reply holds shared: one of its two keys missing
    elif bad == "empty_record":
        values = {}
    elif bad == "group_not_sent":
        # Sent shared only (see _node_groups), answers with ehr as well, counted as a site would.
        values = {**arrays, "ehr.w": np.ones(SHAPES["ehr.w"], np.float32)}
        _, metrics, _ = _train_reply(values, {**counts, "ehr": 5}).to_records()
    elif bad == "missing_count":
        del metrics[draw(st.sampled_from(required))]
    elif bad in ("negative_count", "zero_count", "fractional_count"):
        metrics[draw(st.sampled_from(required))] = {
            "negative_count": -draw(st.integers(1, 10**6)),
            "zero_count": 0,
            "fractional_count": draw(st.integers(1, 100)) + 0.5,
        }[bad]
    elif bad == "nan_metric":
        metrics[draw(st.sampled_from(sorted(metrics)))] = float("nan")
    elif bad == "list_metric":
        metrics[draw(st.sampled_from(sorted(metrics)))] = [1.0, 2.0]  # type: ignore[assignment]  # deliberately wrong: a list metric
    elif bad == "unknown_metric":
        name = "x-" + draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-", max_size=12))
        metrics[name] = draw(st.one_of(st.integers(0, 10), st.floats(0, 1)))
    elif bad == "extra_record":
        extra["more"] = pack_record(arrays)
    elif bad == "status_on_a_trained_reply":
        status = {"status": draw(st.sampled_from(["ok", "trained", ""])), "reason": "x"}
    elif bad == "refusal_with_arrays":
        status = {"status": "refused", "reason": "cap"}
    content = _content(items if items is not None else pack_record(values), metrics, status)
    if bad == "no_metrics":
        del content[METRICS_RECORD]
    elif bad == "metrics_as_config":
        content[METRICS_RECORD] = ConfigRecord(dict(metrics))
    for name, record in extra.items():
        content[name] = record
    return make_message(_metadata(node), content), bad, arrays, counts


def _per_key(msg: Message) -> Message:
    content = RecordDict(dict(msg.content))
    packed = unpack_record(msg.content.array_records[ARRAYS_RECORD], where="test")
    content[ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in packed.items()})
    return make_message(msg.metadata, content)


def _node_groups(replies: list) -> dict[int, list[str]]:
    """What the server sent each node: its groups; a 'group_not_sent' node was sent shared only."""
    out = {}
    for node, (_, bad, arrays, _) in enumerate(replies, start=10):
        out[node] = ["shared"] if bad == "group_not_sent" else sorted({group_of(k) for k in arrays})
    return out


@st.composite
def a_round(draw: st.DrawFn) -> tuple[list, list[Message]]:
    """(the replies to the messages sent, replies no message asked for or a second time)."""
    n = draw(st.integers(1, 4))
    replies = [draw(a_reply(node)) for node in range(10, 10 + n)]
    others = []
    for _ in range(draw(st.integers(0, 2))):
        message, *_ = draw(a_reply(draw(st.sampled_from([10, 99]))))  # node 10 again, or node 99: never sent to
        others.append(message)
    return replies, others


def _strategy() -> ModalityAwareFedAvg:
    return ModalityAwareFedAvg(
        group_of=group_of, max_reply_bytes=sum(len(Array(v).data) + 64 for v in PREVIOUS.values())
    )


@SETTINGS
@given(a_round())
def test_malformed_replies_are_rejected_and_the_rest_averaged(round_: tuple[list, list[Message]]) -> None:
    replies, others = round_
    messages = [m for m, *_ in replies] + others  # a second reply arrives after the first
    sent = _sent(sorted(_node_groups(replies)))
    outcome = aggregate_replies(
        _strategy(), 1, messages, current_arrays=PREVIOUS, node_groups=_node_groups(replies), sent=sent
    )  # never raises

    bad_nodes = {node for node, (_, bad, _, _) in enumerate(replies, start=10) if bad is not None}
    first_reply = {r.node_id: r for r in outcome.rejected if r.kind not in ("duplicate", "unsolicited")}
    assert set(first_reply) == bad_nodes, (first_reply, [b for _, b, _, _ in replies])
    for node, (_, bad, _, _) in enumerate(replies, start=10):
        if bad in NOT_CONTRIBUTING:
            assert first_reply[node].kind == bad
        elif bad is not None:
            assert first_reply[node].kind == "invalid", (bad, first_reply[node])
    # Every reply beyond the first from a node, or from a node never sent to, is rejected as such.
    extras = sorted((r.node_id, r.kind) for r in outcome.rejected if r.kind in ("duplicate", "unsolicited"))
    assert extras == sorted(
        (m.metadata.src_node_id, "duplicate" if m.metadata.src_node_id == 10 else "unsolicited") for m in others
    )
    assert all(isinstance(r.reason, str) and r.reason for r in outcome.rejected)

    good = [(arrays, counts) for _, bad, arrays, counts in replies if bad is None]
    assert len(outcome.accepted) == len(good)
    if not good:
        assert outcome.arrays is None
        return
    assert outcome.arrays is not None
    good = _clipped_to_holders(good, factor=_strategy().norm_clip_factor)
    for key, old in PREVIOUS.items():
        holders = [(a[key], c[group_of(key)]) for a, c in good if key in a]
        expected = old if not holders else sum(v * n for v, n in holders) / sum(n for _, n in holders)
        got = outcome.arrays[key]
        assert got.dtype == old.dtype and got.shape == old.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=key)


def _clipped_to_holders(good: list[tuple[dict, dict]], factor: float | None) -> list[tuple[dict, dict]]:
    """The accepted replies as the strategy's influence rule should leave them, written out here
    from its docstring: in a group of 3+ holders, an update over `factor` x the median of the other
    holders' update norms is scaled down to that."""
    if factor is None:
        return good
    norms: dict[str, dict[int, float]] = {}
    for i, (arrays, _) in enumerate(good):
        for group in {group_of(k) for k in arrays}:
            keys = [k for k in arrays if group_of(k) == group]
            sq = sum(float(np.sum((arrays[k].astype(np.float64) - PREVIOUS[k]) ** 2)) for k in keys)
            norms.setdefault(group, {})[i] = sq**0.5
    out = []
    for i, (arrays, counts) in enumerate(good):
        arrays = dict(arrays)
        for group, by_reply in norms.items():
            if i not in by_reply or len(by_reply) < 3:
                continue
            bound = factor * float(np.median([n for j, n in by_reply.items() if j != i]))
            if by_reply[i] > bound:
                for k in [k for k in arrays if group_of(k) == group]:
                    arrays[k] = PREVIOUS[k] + bound / by_reply[i] * (arrays[k] - PREVIOUS[k])
        out.append((arrays, counts))
    return out


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 2**32 - 1)), min_size=1, max_size=5))
def test_with_every_group_everywhere_it_is_plain_fedavg(sites: list[tuple[int, int]]) -> None:
    replies = []
    for node, (n, seed) in enumerate(sites, start=10):
        rng = np.random.default_rng(seed)
        arrays = {k: (1 + rng.random(s)).astype(np.float32) for k, s in SHAPES.items()}
        reply = _train_reply(arrays, {g: n for g in GROUP_KEYS}, losses={"total": float(rng.random())})
        replies.append(make_message(_metadata(node), train_reply_content(reply)))
    outcome = aggregate_replies(
        _strategy(),
        1,
        replies,
        current_arrays=PREVIOUS,
        node_groups=None,
        sent=_sent([10 + i for i in range(len(sites))]),
    )
    # Flower's stock FedAvg reads one Array per key: the same replies, unpacked.
    stock, _ = FedAvg().aggregate_train(1, [_per_key(m) for m in replies])
    assert outcome.arrays is not None and stock is not None
    assert outcome.rejected == [] and set(outcome.arrays) == set(stock)
    for key in stock:
        np.testing.assert_array_equal(outcome.arrays[key], stock[key].numpy())  # bit for bit


# ---------------------------------------------------------------------------- the site reader

SHARD = "train/0.parquet"
REQUIRED = ["subject_id", "time", "code"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@st.composite
def a_broken_shard(draw: st.DrawFn) -> tuple[str, pa.Table | bytes]:
    """(how it is broken, the broken shard: a pa.Table or raw bytes). Each of these is invalid."""
    table = make_site_tables().shards[SHARD]
    kind = draw(
        st.sampled_from(
            ["drop_columns", "retype", "null_required", "unsorted", "garbage", "truncated", "forged_rows", "not_utf8"]
        )
    )
    if kind == "drop_columns":
        dropped = draw(st.lists(st.sampled_from(REQUIRED), min_size=1, unique=True))
        extra = draw(st.lists(st.sampled_from(["numeric_value"]), max_size=1))
        return kind, table.drop_columns(dropped + extra)
    if kind == "retype":
        column = draw(st.sampled_from(["subject_id", "time", "code", "numeric_value"]))
        values = table.column(column).to_pylist()
        new_type = {"subject_id": pa.string(), "time": pa.string(), "code": pa.int64(), "numeric_value": pa.string()}[
            column
        ]
        converted = [None if v is None else (len(str(v)) if new_type == pa.int64() else f"x{v}") for v in values]
        return kind, table.set_column(table.schema.get_field_index(column), column, pa.array(converted, new_type))
    if kind == "null_required":
        column = draw(st.sampled_from(["subject_id", "code"]))
        rows = draw(st.lists(st.integers(0, table.num_rows - 1), min_size=1, max_size=4, unique=True))
        values = table.column(column).to_pylist()
        for r in rows:
            values[r] = None
        return kind, table.set_column(
            table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)
        )
    if kind == "unsorted":
        order = list(range(table.num_rows))
        subjects = table.column("subject_id").to_pylist()
        if draw(st.booleans()):
            # Reverse one subject's timed rows: its events are no longer in time order.
            timed = [
                i
                for i, (s, t) in enumerate(zip(subjects, table.column("time").to_pylist()))
                if s == 1 and t is not None
            ]
            order[timed[0] : timed[-1] + 1] = reversed(order[timed[0] : timed[-1] + 1])
        else:
            # Move one of subject 2's rows into subject 1's: subject 1 is no longer contiguous.
            row = draw(st.sampled_from([i for i, s in enumerate(subjects) if s == 2]))
            order.remove(row)
            order.insert(draw(st.integers(1, subjects.index(2) - 1)), row)
        return kind, table.take(pa.array(order))
    if kind == "garbage":
        return kind, draw(st.binary(min_size=0, max_size=400))
    if kind == "not_utf8":  # one code's bytes are not UTF-8
        row = draw(st.integers(0, table.num_rows - 1))
        codes = [c.encode() for c in table.column("code").to_pylist()]
        codes[row] = codes[row][:2] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80"]))
        return kind, table.set_column(2, "code", pa.array(codes, pa.binary()).view(pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    if kind == "forged_rows":  # the footer claims rows the file does not hold (break 8: 5e9)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "forged.parquet"
            path.write_bytes(data)
            claimed = draw(st.sampled_from([table.num_rows + 1, 2 * table.num_rows, 10**6, 5 * 10**9, 2**62]))
            set_row_counts(path, claimed)
            if draw(st.booleans()):
                set_value_counts(path, claimed)  # consistent with itself: only the bytes or the rows tell
            return kind, path.read_bytes()
    return kind, data[: draw(st.integers(0, len(data) - 1))]


@SETTINGS
@given(a_broken_shard())
def test_malformed_site_files_are_reported_by_name_and_nothing_is_written(broken: tuple[str, pa.Table | bytes]) -> None:
    kind, shard = broken
    with tempfile.TemporaryDirectory() as tmp:
        root = write_site_tables(make_site_tables(), Path(tmp) / "site")
        path = root / "data" / SHARD
        if isinstance(shard, pa.Table):
            pq.write_table(shard, path)
        else:
            path.write_bytes(shard)
        before = _snapshot(root)
        report = check_site(root)  # never raises
        assert _snapshot(root) == before, "check_site wrote or changed something under the site root"
        assert list(Path(tmp).iterdir()) == [root]
    assert not report.ok, (kind, [str(p) for p in report.problems])
    named = [p for p in report.errors if p.file == f"data/{SHARD}"]
    assert named, (kind, [str(p) for p in report.problems])
    for problem in report.problems:
        line = str(problem)
        assert "\n" not in line and problem.file in line


# ---------------------------------------------------------------------------- what MEDS allows


@st.composite
def a_meds_variant(draw: st.DrawFn) -> dict[str, pa.Table]:
    """The valid site's shards rewritten in ways MEDS 0.4 allows: core columns in types that cast
    losslessly (as `meds.DataSchema.align` casts them) and each subject's static rows anywhere
    among its timed rows, which keep their order."""
    shards = {}
    for rel, table in make_site_tables().shards.items():
        sid = table.column("subject_id").to_pylist()
        static = table.column("time").is_null().to_pylist()
        order: list[int] = []
        for s in dict.fromkeys(sid):
            rows = [i for i, x in enumerate(sid) if x == s]
            timed = [i for i in rows if not static[i]]
            statics = [i for i in rows if static[i]]  # their order among themselves is the file's
            slots = sorted(draw(st.lists(st.integers(0, len(timed)), min_size=len(statics), max_size=len(statics))))
            for k, (slot, i) in enumerate(zip(slots, statics)):
                timed.insert(slot + k, i)
            order += timed
        table = table.take(pa.array(order))
        types = {
            "subject_id": draw(st.sampled_from([pa.int64(), pa.int32(), pa.uint32()])),
            "time": draw(st.sampled_from([pa.timestamp("us"), pa.timestamp("ms"), pa.timestamp("ns")])),
            "code": draw(st.sampled_from([pa.string(), pa.large_string(), "dictionary"])),
            "numeric_value": draw(st.sampled_from([pa.float32(), pa.float64()])),
        }
        for name, type_ in types.items():
            column = table.column(name)
            column = column.dictionary_encode() if type_ == "dictionary" else column.cast(type_)
            table = table.set_column(table.schema.get_field_index(name), name, column)
        shards[rel] = table
    return shards


@SETTINGS
@given(a_meds_variant())
def test_what_meds_allows_is_accepted_and_read_as_the_canonical_site(shards: dict[str, pa.Table]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        canonical = open_site(write_site_tables(make_site_tables(), Path(tmp) / "canonical"))
        tables = make_site_tables()
        tables.shards = shards
        root = write_site_tables(tables, Path(tmp) / "variant")
        report = check_site(root)
        assert report.ok and report.problems == [], [str(p) for p in report.problems]
        assert open_site(root).read_events().equals(canonical.read_events())


# ---------------------------------------------------------------------------- a site whose data fails


def _round(rnd: int, statuses: dict[str, str], reason: str = "") -> dict:
    return {
        "event": "round",
        "round": rnd,
        "sites": {s: {"status": st, **({"reason": reason} if st != "ok" else {})} for s, st in statuses.items()},
    }


MALLOC = "ArrowMemoryError: malloc of size 17179869184 failed"


def test_a_site_whose_every_message_fails_is_lost_and_the_run_does_not_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Break 8: every message to a site failed (its reader allocated for a forged footer) and the
    run exited 0: only a site that trained in round 1 and not in the last counted as lost."""
    setup = {"event": "setup", "round": 0, "sites": {"biobank": {}, "genomics": {}, "hospital": {}}, "refused": {}}
    every_round_an_error = [
        setup,
        _round(1, {"biobank": "ok", "genomics": "ok", "hospital": "error"}, MALLOC),
        _round(2, {"biobank": "ok", "genomics": "ok", "hospital": "error"}, MALLOC),
        {"event": "evaluate", "round": 2, "sites": {"biobank": {}, "genomics": {}}, "absent": {"hospital": "x"}},
    ]
    lost = sites_lost(every_round_an_error)
    assert set(lost) == {"hospital"} and lost["hospital"].startswith("never trained (round 2: error: ArrowMemoryError")
    # Its first message already failed (capabilities): the site is only in round 0's refusals.
    refused_in_round_0 = [
        {**setup, "sites": {"biobank": {}, "genomics": {}}, "refused": {"hospital": f"SiteDataError: {MALLOC}"}},
        _round(1, {"biobank": "ok", "genomics": "ok"}),
    ]
    assert sites_lost(refused_in_round_0) == {"hospital": f"never trained (round 0: error: SiteDataError: {MALLOC})"}
    # Not lost: a site only ever left out by sampling, or one that trained in a later round.
    assert (
        sites_lost([setup, _round(1, {"biobank": "ok", "genomics": "ok", "hospital": "absent"}, "not sampled")]) == {}
    )
    late = [
        setup,
        _round(1, {"biobank": "ok", "genomics": "ok", "hospital": "error"}, MALLOC),
        _round(2, dict.fromkeys(("biobank", "genomics", "hospital"), "ok")),
    ]
    assert sites_lost(late) == {}

    outcome = RunOutcome(run_id=3, status="completed", sites_lost=lost, rounds=2, rounds_done=2, started_at=0.0)
    write_outcome(tmp_path, outcome)
    assert report_outcome(3, "finished:completed", tmp_path) == EXIT_SITE_LOST
    err = capsys.readouterr().err
    assert "lost site(s): hospital (never trained (round 2: error: ArrowMemoryError" in err, err


@pytest.mark.slow  # CI's slow stage (Makefile SLOW_CI): the default suite's 6 minutes
@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_whose_data_its_reader_refuses_is_reported_lost_by_the_server(tmp_path: Path) -> None:
    """A real server over the real ClientApps: the hospital's shard has the forged footer, so its
    every message fails (its site does not open); the other sites train; outcome.json counts it lost."""
    manifest, nodes = tiny_nodes(tmp_path)
    hospital = next(s for s in manifest.sites if s.name == "hospital")
    set_row_counts(Path(hospital.root) / "data" / "0.parquet", 5_000_000_000)
    out = tmp_path / "run"
    cfg = fed_config(
        out,
        local_steps=1,
        batch_size=8,
        max_events=64,
        max_patches=8,
        min_nodes=2,
        vocab_min_subjects=5,
        eval_n_boot=10,
    )
    FederationServer(InProcessGrid(nodes), cfg, run_id=1).run()
    outcome = read_outcome(out)
    assert outcome is not None and outcome.status == "completed" and not outcome.ok
    node = next(n for n, c in nodes.items() if c["site-name"] == "hospital")
    why = outcome.sites_lost.get(f"node-{node}", "")  # it never told its name: named by its node
    assert list(outcome.sites_lost) == [f"node-{node}"], outcome.sites_lost
    assert why.startswith("never trained (round 0: error: ") and "ERROR data/0.parquet" in why, why


def test_join_refuses_a_site_whose_footer_is_forged_before_saying_ok(tmp_path: Path) -> None:
    """The break: `join` printed "OK (150 subjects)" and connected; every message then failed."""
    root = write_site_tables(make_site_tables(), tmp_path / "site")
    set_row_counts(root / "data" / SHARD, 5_000_000_000)
    result = subprocess.run(
        [
            sys.executable,
            "client/client.py",
            "join",
            str(root),
            "--superlink",
            "127.0.0.1:1",
            "--insecure",
            "--state-dir",
            str(tmp_path / "state"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "OK" not in result.stdout and "not joining" in result.stderr
    assert f"ERROR data/{SHARD}, column subject_id" in result.stdout, result.stdout
