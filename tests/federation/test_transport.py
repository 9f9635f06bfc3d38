"""The uplink's wire encoding (healthfm_core/protocol/transport.py): int8 round trips, stochastic rounding's
unbiasedness, error feedback, the site's encoding and residual state, and a federated simulation
under int8. Malformed int8 replies against the strategy: tests/federation/test_strategy.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import RESIDUAL_STATE_KEY, make_client_app, stored_residual
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import ARRAYS_RECORD, METRICS_RECORD, SCALES_RECORD, FederationSetup, RoundConfig
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.protocol.transport import (
    INT8_MAX,
    decode_update,
    downlink_arrays,
    encode_update,
    onto_master,
    quantise,
)
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from server.config import FederationConfig, resume_conflicts
from server.runlog import read_events
from server.strategy import pack_record
from simulations.run import run_federation_simulation
from simulations.synthetic import generate_federation

POLICY = {"min-code-subjects": 5, "min-report-subjects": 2}


# ------------------------------------------------------------------------------ the codec


@pytest.mark.parametrize("magnitude", [1e-6, 1e-2, 3.0, 1e4])
def test_nearest_rounding_round_trips_within_half_a_step(magnitude: float) -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((17, 33)).astype(np.float32)
    trained = (reference + magnitude * rng.standard_normal(reference.shape)).astype(np.float32)
    encoded = encode_update({"w": trained}, {"w": reference}, "int8", rounding="nearest")
    assert encoded.scales is not None
    q, scale = encoded.arrays["w"], encoded.scales["w"]
    assert q.dtype == np.int8 and q.min() >= -INT8_MAX and np.abs(q.astype(int)).max() == INT8_MAX
    decoded = decode_update(encoded.arrays, encoded.scales, {"w": reference})["w"]
    assert decoded.dtype == np.float32
    update = trained.astype(np.float64) - reference
    sent = decoded.astype(np.float64) - reference
    # scale/2 from rounding, plus float32's own rounding of the rebuilt weights.
    slack = np.spacing(np.abs(decoded)).astype(np.float64)
    assert np.all(np.abs(sent - update) <= scale / 2 + slack)
    assert scale == pytest.approx(np.abs(update).max() / INT8_MAX, rel=1e-6)


def test_an_unchanged_tensor_is_sent_exactly_with_a_positive_scale() -> None:
    reference = {"w": np.linspace(-1, 1, 10, dtype=np.float32)}
    encoded = encode_update(reference, reference, "int8", rng=np.random.default_rng(0))
    assert encoded.scales is not None
    assert encoded.scales["w"] > 0 and not encoded.arrays["w"].any()
    np.testing.assert_array_equal(decode_update(encoded.arrays, encoded.scales, reference)["w"], reference["w"])


def test_stochastic_rounding_is_unbiased_and_nearest_is_not() -> None:
    """Each value sits a quarter of a step above a grid point: nearest rounding is off by -s/4
    on every one of them; stochastic rounding averages to the value."""
    x = np.concatenate([np.arange(-126, 126) + 0.25, [127.0]])  # scale 1: max |x| is 127
    draws = 4000
    rng = np.random.default_rng(1234)

    def mean_error(rounding: str) -> np.ndarray:
        total = np.zeros_like(x)
        for _ in range(draws):
            q, scale = quantise(x, rounding, rng)  # type: ignore[arg-type]
            assert scale == 1.0
            total += q
        return total / draws - x

    stochastic = mean_error("stochastic")
    sigma = np.sqrt(0.25 * 0.75 / draws)  # one value's standard error
    overall = sigma / np.sqrt(x.size)
    assert abs(stochastic.mean()) < 4 * overall  # ~1e-3 of a step
    assert np.abs(stochastic).max() < 5 * sigma
    nearest = mean_error("nearest")
    assert abs(nearest.mean()) > 100 * 4 * overall  # a biased rounding fails the same check


def test_error_feedback_keeps_the_cumulative_error_within_one_step() -> None:
    """The same small update, round after round: without feedback nearest rounding drops the
    same fraction every round; with it the sum sent tracks the sum trained."""
    rng = np.random.default_rng(5)
    reference = {"w": np.zeros(64, np.float32)}
    update = np.zeros(64)
    update[0] = 1.0  # sets the scale: 1/127
    update[1:] = rng.uniform(-0.3, 0.3, 63) / INT8_MAX  # each below half a step: nearest sends 0
    trained = {"w": update.astype(np.float32)}
    residual: dict[str, np.ndarray] = {}
    sent_with = np.zeros(64)
    sent_without = np.zeros(64)
    rounds = 20
    for _ in range(rounds):
        enc = encode_update(trained, reference, "int8", rounding="nearest", residual=residual)
        residual = enc.residual
        sent_with += decode_update(enc.arrays, enc.scales, reference)["w"]
        plain = encode_update(trained, reference, "int8", rounding="nearest")
        assert plain.residual == {}
        sent_without += decode_update(plain.arrays, plain.scales, reference)["w"]
    target = rounds * trained["w"].astype(np.float64)
    assert enc.scales is not None
    step = enc.scales["w"]
    assert np.abs(sent_with - target).max() <= step  # bounded, whatever the number of rounds
    np.testing.assert_allclose(sent_with + residual["w"], target, atol=1e-5)  # nothing lost, only delayed
    assert np.abs(sent_without - target).max() > 5 * step  # grows with the rounds
    # Stochastic rounding with feedback is bounded the same way.
    residual = {}
    total = np.zeros(64)
    for _ in range(rounds):
        enc = encode_update(trained, reference, "int8", rng=rng, residual=residual)
        residual = enc.residual
        total += decode_update(enc.arrays, enc.scales, reference)["w"]
    assert enc.scales is not None
    assert np.abs(total - target).max() <= 2 * enc.scales["w"]


def test_fp16_and_fp32_and_non_floating_arrays() -> None:
    arrays: dict[str, np.ndarray] = {"w": np.full(3, 1.5, np.float32), "n": np.arange(3, dtype=np.int64)}
    assert encode_update(arrays, {}, "fp32").arrays["w"].dtype == np.float32
    half = encode_update(arrays, {}, "fp16")
    assert half.arrays["w"].dtype == np.float16 and half.arrays["n"].dtype == np.int64 and half.scales is None
    np.testing.assert_array_equal(decode_update(half.arrays, None, arrays)["w"], arrays["w"])
    int8 = encode_update(arrays, arrays, "int8", rng=np.random.default_rng(0))
    assert int8.scales is not None
    assert int8.arrays["n"].dtype == np.int64 and set(int8.scales) == {"w"}
    with pytest.raises(ValueError, match="no received array"):
        encode_update(arrays, {}, "int8", rng=np.random.default_rng(0))


# ------------------------------------------------------------------------------ the downlink


def test_the_fp16_downlink_casts_what_float16_holds_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "w": rng.standard_normal((8, 5)).astype(np.float32),
        "large": np.array([1.0, -7e4], np.float32),  # beyond float16's 65504: would travel as Inf
        "nan": np.array([np.nan, 1.0], np.float32),
        "n": np.arange(3, dtype=np.int64),
        "empty": np.zeros((0, 4), np.float32),
    }
    same = downlink_arrays(arrays, "fp32")
    assert all(same.wire[k] is same.received[k] for k in arrays)
    half = downlink_arrays(arrays, "fp16")
    assert {k: str(v.dtype) for k, v in half.wire.items()} == {
        "w": "float16",
        "large": "float32",
        "nan": "float32",
        "n": "int64",
        "empty": "float16",
    }
    # What a site loads: the float16 values back in float32, within float16's precision of the master.
    assert half.received["w"].dtype == np.float32
    np.testing.assert_array_equal(half.received["w"], half.wire["w"].astype(np.float32))
    assert not np.array_equal(half.received["w"], arrays["w"])
    np.testing.assert_allclose(half.received["w"], arrays["w"], rtol=2.0**-11, atol=0)
    for key in ("large", "nan", "n"):
        assert half.received[key] is half.wire[key]
    with pytest.raises(ValueError, match="downlink 'int8'"):
        downlink_arrays(arrays, "int8")  # type: ignore[arg-type]


def test_onto_master_gives_back_the_master_where_the_round_left_what_was_received() -> None:
    rng = np.random.default_rng(1)
    # Values across float16's normal and subnormal range and below it (those become 0 on the wire).
    master: dict[str, np.ndarray] = {
        "w": (rng.standard_normal(4000) * np.logspace(-10, 3, 4000)).astype(np.float32),
        "v": rng.standard_normal(50).astype(np.float32),
        "n": np.arange(3, dtype=np.int64),
    }
    sent = downlink_arrays(master, "fp16")
    assert (sent.received["w"] == 0).any() and (master["w"] != 0).all()
    # A round that moved nothing: the master to the bit, not its float16 rounding.
    kept = onto_master(sent.received, master, sent.received)
    for key in master:
        np.testing.assert_array_equal(kept[key], master[key])
        assert kept[key].dtype == master[key].dtype
    # A round's update lands on the master: master + update, within one float32 rounding.
    update = (1e-3 * rng.standard_normal(50)).astype(np.float32)
    moved = onto_master({"v": sent.received["v"] + update}, master, sent.received)["v"]
    expected = master["v"].astype(np.float64) + (sent.received["v"] + update - sent.received["v"])
    np.testing.assert_allclose(moved, expected, rtol=2.0**-23, atol=0)
    # Under an fp32 downlink the round's result is the new global itself.
    plain = downlink_arrays(master, "fp32")
    np.testing.assert_array_equal(
        onto_master({"v": master["v"] + update}, master, plain.received)["v"], master["v"] + update
    )


# ------------------------------------------------------------------------------ the site


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


@pytest.fixture(scope="module")
def node_configs(federation) -> list[dict]:
    return [
        {"site-root": str(s.root), "site-name": s.name, **POLICY}
        for s in federation.sites
        if s.name in ("biobank", "hospital")
    ]


def _message(content: RecordDict, message_type: str, node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"{message_type}-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return make_message(metadata, content)


@pytest.mark.parametrize("downlink", ["fp32", "fp16"])
def test_the_site_sends_int8_and_keeps_its_residual_in_its_run_state(
    node_configs, monkeypatch: pytest.MonkeyPatch, downlink: str
) -> None:
    for name, ident in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, ident)
    config = node_configs[0]
    site = SiteRuntime(SiteConfig.from_node_config(config))
    vocab = build_vocabulary([site.code_stats()], min_subjects=5)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=1)
    master = {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in site.groups}
    # What the message carries, and what the server judges the reply against (the float16 values
    # in float32 under an fp16 downlink): the site's residual must be against the same.
    downlinked = downlink_arrays(master, downlink)  # type: ignore[arg-type]
    received = downlinked.received
    app = make_client_app()
    context = Context(run_id=1, node_id=7, node_config=dict(config), state=RecordDict(), run_config={})
    app(
        _message(
            RecordDict({"setup": ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})}), "query.setup", 7
        ),
        context,
    )
    cfg = RoundConfig(
        round=1,
        rounds=2,
        local_steps=1,
        lr=1e-3,
        batch_size=4,
        max_events=32,
        setup_sha256=setup.sha256,
        transport="int8",
    )
    train = RecordDict({"arrays": pack_record(downlinked.wire), "config": ConfigRecord(cfg.to_flat())})
    reply = app(_message(train, MessageType.TRAIN, 7), context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {ARRAYS_RECORD, METRICS_RECORD, SCALES_RECORD}  # no residual
    sent = unpack_record(reply.content.array_records[ARRAYS_RECORD], where="test")
    assert {str(v.dtype) for v in sent.values()} == {"int8"}
    residual = context.state.array_records[RESIDUAL_STATE_KEY]
    assert set(residual) == set(sent)
    # The residual is what the message left out: trained = received + sent + residual.
    trained = site.train(setup, received, cfg)
    scales = dict(reply.content.metric_records[SCALES_RECORD])
    decoded = decode_update(sent, scales, received)
    assert decoded.keys() == trained.arrays.keys()
    for key, value in decoded.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value.astype(np.float64) + residual[key].numpy(), trained.arrays[key], atol=1e-6)
    # The next round starts from the kept residual; a new setup starts from none.
    again = app(_message(train, MessageType.TRAIN, 7), context)
    assert not again.has_error(), again.error
    assert RESIDUAL_STATE_KEY in context.state
    assert stored_residual(context, setup.sha256) and stored_residual(context, "0" * 64) == {}


# ------------------------------------------------------------------------------ a federation


@pytest.mark.slow  # a whole simulation (16-20 s): in CI's slow stage (Makefile SLOW_CI), keeping the default suite short
def test_a_two_site_simulation_under_int8(tmp_path: Path, node_configs) -> None:
    config = FederationConfig(
        out_dir=tmp_path,
        model=load_model_config("tiny"),
        rounds=2,
        local_steps=2,
        lr=3e-3,
        batch_size=8,
        max_events=64,
        max_patches=8,
        seed=3,
        min_nodes=2,
        vocab_min_subjects=5,
        transport="int8",
        eval_tasks=["onset_hypertension_365d"],
        eval_n_boot=10,
    )
    run_federation_simulation(config, node_configs, num_cpus=2)
    rounds = [e for e in read_events(tmp_path / "rounds.jsonl") if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2]
    for event in rounds:
        assert event["rejected"] == [] and event["updated"] is True
        assert set(event["sites"]) == {"biobank", "hospital"}
        for site, entry in event["sites"].items():
            assert entry["status"] == "ok", (site, entry)
            # The site was sent its groups in float32 and answered the same groups in int8. Whole
            # messages: Flower's per-array framing weighs on a model this small (fp16 is ~0.75, int8 ~0.5).
            assert entry["groups_received"] == entry["groups_sent"]
            assert entry["bytes_received"] < 0.6 * entry["bytes_sent"], entry
        assert np.isfinite(event["losses"]["total"])


def test_the_downlink_is_a_run_config_key_checked_strictly_that_a_resume_may_not_change() -> None:
    base = {"out-dir": "/tmp/x", "model": "tiny"}
    assert FederationConfig.from_run_config(base).downlink == "fp32"
    half = FederationConfig.from_run_config({**base, "downlink": "fp16"})
    assert half.downlink == "fp16"
    with pytest.raises(ValueError, match="downlink"):
        FederationConfig.from_run_config({**base, "downlink": "int8"})  # the uplink's int8 is no downlink
    # A checkpoint of an fp32 run, resumed with fp16 (or one written before the key existed): refused.
    saved = FederationConfig.from_run_config(base).model_dump(mode="json")
    assert resume_conflicts(half, saved) == ["downlink"]
    assert resume_conflicts(half, {k: v for k, v in saved.items() if k != "downlink"}) == ["downlink"]
    assert (
        resume_conflicts(FederationConfig.from_run_config(base), {k: v for k, v in saved.items() if k != "downlink"})
        == []
    )
