"""Bounded influence (issue 26, breaks 1 and 2): attack replays that drive ModalityAwareFedAvg with
real Flower messages, as the ServerApp hands them over with the round's RoundConfig.

- A reply claiming 10**12 examples (overall and per group) used to make the new global weights
  its own (to ~1e-12); with int8 transport and a scale of 7000 it moved them to ~8.9e5. Counts
  above local_steps x batch_size are now malformed: rejected, and the global is the honest average.
- A 1e4x update to a group held by one or two sites was accepted (the outlier check needs two
  other holders; max-update-norm is off by default). Every group's update norm is now bounded by
  the round's step bound and, after its first round, by its norm history; both are replayed in
  round 1 and in a later round, and the history survives a checkpoint.
- Honest replies stay in: DP-like expected counts, fewer subjects than a batch, and two real
  ClientApps (one under DP, int8 transport) over two rounds.

The synthetic model's keys are named after their groups; sizes and update magnitudes follow the
measured honest federation (server/influence.py): an honest update moves each value by about
0.4 x lr x local_steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app import ConfigRecord as FlowerConfig
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAvg
from helpers.flower_messages import train_metadata
from helpers.influence_rounds import (
    ATTACKER,
    HONEST_COUNTS,
    HONEST_STEP,
    NODE_GROUPS,
    SHAPES,
    aggregate,
    initial_arrays,
    reply,
    round_config,
)
from safetensors.numpy import load_file, save_file

from client.client_app import make_client_app
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import (
    ARRAYS_RECORD,
    SETUP,
    FederationSetup,
    RoundConfig,
)
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from server.config import RESUMABLE_CHANGES, FederationConfig
from server.influence import ADAM_STEP_RATIO, NormHistory, max_examples
from server.round import aggregate_replies
from server.strategy import ModalityAwareFedAvg, pack_record
from simulations.synthetic import generate_federation

SHAPES_GROUPS = sorted({k.split(".")[0] for k in SHAPES})


def group_of(key: str) -> str:
    return key.split(".")[0]


def strategy(**kw) -> ModalityAwareFedAvg:
    return ModalityAwareFedAvg(group_of=group_of, **kw)


def trained(previous: dict[str, np.ndarray], groups: list[str], seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A site's trained arrays: an honest-sized update (times `scale`) of each of its groups."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * HONEST_STEP * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in previous.items()
        if group_of(k) in groups
    }


def honest_reply(node: int, previous: dict[str, np.ndarray], rnd: int) -> Message:
    groups = NODE_GROUPS[node]
    return reply(node, trained(previous, groups, seed=100 * rnd + node), dict.fromkeys(groups, HONEST_COUNTS[node]))


def honest_replies(previous: dict[str, np.ndarray], rnd: int) -> list[Message]:
    return [honest_reply(n, previous, rnd) for n in (1, 2, 3)]


def honest_average(rnd: int, previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The round's global without the attacker (a fresh strategy: no history to differ)."""
    outcome = aggregate(strategy(), rnd, honest_replies(previous, rnd), previous)
    assert outcome.arrays is not None and not outcome.rejected
    return outcome.arrays


def assert_equal_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def group_norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray], group: str) -> float:
    return float(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a if group_of(k) == group) ** 0.5)


# --------------------------------------------------------------- break 1: counts


@pytest.mark.parametrize("claim", ["every count", "num-examples.shared", "num-examples only"])
def test_a_reply_claiming_a_trillion_examples_is_rejected(claim: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the attacker's 10**12 made the global `shared` and `ehr` its own reply to ~1e-12
    (weight 10**12 / (10**12 + 456)); now it is malformed and the global is the honest average."""
    previous = initial_arrays()
    # A plausible update: only the counts give the attacker away.
    attack_arrays = trained(previous, NODE_GROUPS[ATTACKER], seed=999)
    honest_n = dict.fromkeys(NODE_GROUPS[ATTACKER], 160)
    if claim == "every count":
        attack = reply(ATTACKER, attack_arrays, dict.fromkeys(NODE_GROUPS[ATTACKER], 10**12), num_examples=10**12)
    elif claim == "num-examples.shared":
        attack = reply(ATTACKER, attack_arrays, {**honest_n, "shared": 10**12}, num_examples=160)
    else:  # weighs the round's losses (and any FedAvg weighted by num-examples)
        attack = reply(ATTACKER, attack_arrays, honest_n, num_examples=10**12)
    outcome = aggregate(strategy(), 1, [*honest_replies(previous, 1), attack], previous)
    [rejected] = outcome.rejected
    assert rejected.node_id == ATTACKER and rejected.kind == "invalid"
    assert (
        "10" in rejected.reason and "> 160" in rejected.reason and "local-steps 10 x batch-size 16" in rejected.reason
    )
    assert f"rejected reply from node {ATTACKER}" in caplog.text
    assert outcome.accepted == [1, 2, 3]
    assert outcome.arrays is not None
    assert_equal_arrays(outcome.arrays, honest_average(1, previous))
    assert outcome.losses == {"total": 1.0}


@pytest.mark.parametrize("honest", [(1,), (1, 2, 3)])  # one other holder: no outlier check before
def test_int8_with_a_scale_of_7000_and_a_trillion_examples_is_rejected(honest: tuple[int, ...]) -> None:
    """Before: de-quantised to ~8.9e5 per value (under the 1e6 magnitude limit) and weighted by
    10**12, the reply moved the global `shared` and `ehr` weights to ~8.9e5 (with one other
    holder; with three the outlier check caught it)."""
    previous = initial_arrays()
    q = {k: np.full(v.shape, 127, np.int8) for k, v in previous.items() if group_of(k) in ("shared", "ehr")}
    attack = reply(
        ATTACKER,
        q,
        {"shared": 10**12, "ehr": 10**12},
        num_examples=10**12,
        scales=dict.fromkeys(q, 7000.0),
    )
    replies = [honest_reply(n, previous, 1) for n in honest]
    outcome = aggregate(strategy(), 1, [*replies, attack], previous)
    [rejected] = outcome.rejected
    assert rejected.node_id == ATTACKER and rejected.kind == "invalid" and "num-examples" in rejected.reason
    assert outcome.arrays is not None
    assert_equal_arrays(outcome.arrays, aggregate(strategy(), 1, replies, previous).arrays or {})
    assert max(float(np.max(np.abs(v))) for v in outcome.arrays.values()) < 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("num-examples", -3), ("num-examples", 2.5), ("num-examples", float("nan")), ("num-examples.ehr", 1e12)],
)
def test_counts_that_are_not_positive_integers_are_rejected(field: str, value: object) -> None:
    previous = initial_arrays()
    counts: dict[str, object] = {"shared": 100, "ehr": 100}
    kwargs: dict[str, Any] = {"num_examples": 100}
    if field == "num-examples":
        kwargs["num_examples"] = value
    else:
        counts["ehr"] = value
    attack = reply(ATTACKER, trained(previous, ["shared", "ehr"], seed=5), counts, **kwargs)
    outcome = aggregate(strategy(), 1, [*honest_replies(previous, 1), attack], previous)
    [rejected] = outcome.rejected
    assert rejected.node_id == ATTACKER and rejected.kind == "invalid" and field in rejected.reason


def test_honest_dp_counts_and_small_sites_are_accepted() -> None:
    """A DP site reports its expected counts: sample rate x subjects x steps, at most 160 here,
    per group scaled by its modality's share; a site smaller than a batch reports fewer."""
    previous = initial_arrays()
    dp_site = reply(
        ATTACKER,
        trained(previous, NODE_GROUPS[ATTACKER], seed=7),
        {"shared": 160, "ehr": 160, "wearables": 53, "genomics": 160},
        dp=True,
    )
    small = reply(2, trained(previous, NODE_GROUPS[2], seed=8), {"shared": 70, "ehr": 70})  # 7 subjects x 10 steps
    outcome = aggregate(strategy(), 1, [honest_reply(1, previous, 1), small, dp_site], previous)
    assert outcome.rejected == [] and outcome.accepted == [1, 2, ATTACKER]
    assert max_examples(round_config(1)) == 160  # the DP site's counts are at the bound itself


def test_honest_sites_under_the_bounds_are_stock_fedavg_bit_for_bit() -> None:
    """Rejection, never rescaling: with the round's bounds on, honest sites holding every group
    average exactly as Flower's FedAvg does. With the clip to the other holders' median on
    (server/clipping.py, the default), so does every group where no update is over it: here the
    6 values of `genomics` spread 1.64x (a norm of 6 random values), node 1's is clipped, and the
    other groups are FedAvg's to the last bit."""
    previous = initial_arrays()
    every = ["shared", "ehr", "wearables", "genomics"]
    replies = [
        reply(node, trained(previous, every, seed=node), dict.fromkeys(every, n))
        for node, n in zip([1, 2, 3, 4], [17, 160, 5, 64])
    ]
    ours = aggregate(strategy(norm_clip_factor=None), 1, replies, previous, node_groups=None)
    assert ours.rejected == [] and ours.arrays is not None and set(ours.norm_bounds) == set(every)
    clipped = aggregate(strategy(), 1, replies, previous, node_groups=None)
    assert {n: sorted(g) for n, g in clipped.clipped.items()} == {1: ["genomics"]} and clipped.arrays is not None
    for key, value in clipped.arrays.items():
        same = np.array_equal(value, ours.arrays[key])
        assert same == (group_of(key) != "genomics"), key
    per_key = [
        make_message(
            m.metadata,
            RecordDict(
                {
                    **dict(m.content),
                    ARRAYS_RECORD: ArrayRecord(
                        {
                            k: Array(v)
                            for k, v in unpack_record(m.content.array_records[ARRAYS_RECORD], where="t").items()
                        }
                    ),
                }
            ),
        )
        for m in replies
    ]
    stock, _ = FedAvg().aggregate_train(1, per_key)
    assert stock is not None
    assert_equal_arrays(ours.arrays, {k: v.numpy() for k, v in stock.items()})


# --------------------------------------------------------------- break 2: update norms


def _honest_history(s: ModalityAwareFedAvg, rounds: int) -> dict[str, np.ndarray]:
    """`rounds` honest rounds (the attacker honest too) through `s`; the global after them."""
    arrays = initial_arrays()
    for rnd in range(1, rounds + 1):
        attacker = reply(
            ATTACKER,
            trained(arrays, NODE_GROUPS[ATTACKER], seed=100 * rnd + ATTACKER),
            dict.fromkeys(NODE_GROUPS[ATTACKER], 160),
        )
        outcome = aggregate(s, rnd, [*honest_replies(arrays, rnd), attacker], arrays)
        assert outcome.rejected == [] and outcome.arrays is not None
        arrays = outcome.arrays
    return arrays


@pytest.mark.parametrize("group", ["wearables", "genomics"])  # one holder, two holders
@pytest.mark.parametrize("rnd", [1, 3])  # no history yet; after two honest rounds
def test_a_1e4x_update_to_a_group_with_few_holders_is_rejected(group: str, rnd: int) -> None:
    """Before: accepted (fewer than two other holders: no outlier check; no max-update-norm), the
    group's global moved 1e4x (genomics: 5e3x, averaged with its one honest holder)."""
    s = strategy()
    previous = _honest_history(s, rnd - 1)
    arrays = trained(previous, NODE_GROUPS[ATTACKER], seed=4242)
    for key in arrays:
        if group_of(key) == group:
            arrays[key] = previous[key] + np.float32(1e4) * (arrays[key] - previous[key])
    attack = reply(ATTACKER, arrays, dict.fromkeys(NODE_GROUPS[ATTACKER], 160))
    outcome = aggregate(s, rnd, [*honest_replies(previous, rnd), attack], previous)
    [rejected] = outcome.rejected
    assert rejected.node_id == ATTACKER and rejected.kind == "outlier"
    assert f"group {group!r} update norm" in rejected.reason
    bound = "step bound" if rnd == 1 else "history bound"
    assert bound in rejected.reason
    assert outcome.arrays is not None
    assert_equal_arrays(outcome.arrays, honest_average(rnd, previous))
    if rnd > 1:  # the history bound is the tighter one once there is history
        assert outcome.norm_bounds[group] < aggregate(strategy(), rnd, [attack], previous).norm_bounds[group]


def test_int8_with_a_scale_of_7000_to_a_group_with_one_holder_is_rejected() -> None:
    """Honest counts this time: only the update norm gives it away (wearables: one holder)."""
    previous = initial_arrays()
    arrays = trained(previous, ["shared", "ehr"], seed=3)
    arrays["wearables.w"] = np.full(SHAPES["wearables.w"], 127, np.int8)
    scales = {"wearables.w": 7000.0}
    attack = reply(ATTACKER, arrays, {"shared": 160, "ehr": 160, "wearables": 160}, scales=scales)
    outcome = aggregate(strategy(), 1, [*honest_replies(previous, 1), attack], previous)
    [rejected] = outcome.rejected
    assert rejected.node_id == ATTACKER and "group 'wearables' update norm" in rejected.reason
    assert outcome.arrays is not None
    np.testing.assert_array_equal(outcome.arrays["wearables.w"], previous["wearables.w"])


def test_a_lone_holder_is_accepted_within_the_bounds() -> None:
    """Not too tight: a lone holder's update a few times an honest one's is averaged in, in its
    first round and with history."""
    s = strategy()
    previous = _honest_history(s, 2)
    for rnd, scale in ((3, 3.0), (4, 5.0)):
        arrays = trained(previous, ["wearables"], seed=rnd, scale=scale)
        outcome = aggregate(
            s,
            rnd,
            [*honest_replies(previous, rnd), reply(ATTACKER, arrays, {"wearables": 160})],
            previous,
            node_groups={**NODE_GROUPS, ATTACKER: ["wearables"]},
        )
        assert outcome.rejected == [], outcome.rejected
        assert outcome.arrays is not None
        np.testing.assert_array_equal(outcome.arrays["wearables.w"], arrays["wearables.w"])
        previous = outcome.arrays
    first = aggregate(
        strategy(),
        1,
        [reply(ATTACKER, trained(previous, ["wearables"], seed=1, scale=8.0), {"wearables": 160})],
        previous,
    )
    assert first.rejected == []  # no history: the step bound alone (about 25 honest updates)


def test_the_coordinator_can_tighten_the_bounds() -> None:
    previous = initial_arrays()
    arrays = trained(previous, ["wearables"], seed=2)
    norm = group_norm(arrays, previous, "wearables")
    lone = [reply(ATTACKER, arrays, {"wearables": 160})]
    assert aggregate(strategy(), 1, lone, previous).rejected == []
    capped = aggregate(strategy(max_update_norm=norm / 2), 1, lone, previous)
    assert "max-update-norm" in capped.rejected[0].reason
    tight = aggregate(strategy(norm_step_factor=1.01), 1, lone, previous, round_config=round_config(1, lr=1e-4))
    assert "step bound" in tight.rejected[0].reason


# --------------------------------------------------------------- the norm history across a resume


def test_the_norm_history_survives_a_checkpoint(tmp_path: Path) -> None:
    """Round 4's bounds of a resumed strategy are the uninterrupted one's: a 15x update (under the
    step bound, over the history bound) is rejected by both, and accepted without the history."""
    straight = strategy()
    arrays = _honest_history(straight, 3)
    path = tmp_path / "strategy.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in straight.state_dict().items()}, str(path))
    resumed = strategy()
    resumed.load_state_dict(load_file(str(path)))
    assert resumed.state_dict().keys() == straight.state_dict().keys() == {f"norms.{g}" for g in SHAPES_GROUPS}

    # An update of exactly 15x the median of genomics' accepted norms (two holders: no outlier check).
    reference = straight.norm_history.reference("genomics", 4)
    assert reference is not None and reference == resumed.norm_history.reference("genomics", 4)
    attack = trained(arrays, NODE_GROUPS[ATTACKER], seed=77)
    direction = attack["genomics.w"].astype(np.float64) - arrays["genomics.w"]
    attack["genomics.w"] = (arrays["genomics.w"] + 15 * reference * direction / np.linalg.norm(direction)).astype(
        np.float32
    )
    replies = [*honest_replies(arrays, 4), reply(ATTACKER, attack, dict.fromkeys(NODE_GROUPS[ATTACKER], 160))]
    a, b = aggregate(straight, 4, replies, arrays), aggregate(resumed, 4, replies, arrays)
    for outcome in (a, b):
        [rejected] = outcome.rejected
        assert rejected.node_id == ATTACKER and "history bound" in rejected.reason
    assert a.norm_bounds == b.norm_bounds and a.arrays is not None and b.arrays is not None
    assert_equal_arrays(a.arrays, b.arrays)
    assert_equal_arrays(straight.state_dict(), resumed.state_dict())
    assert aggregate(strategy(), 4, replies, arrays).rejected == []  # no history: within the step bound


def test_the_norm_history_keeps_its_last_rounds_and_refuses_a_bad_entry() -> None:
    history = NormHistory(rounds=5)
    for rnd in range(1, 8):
        history.record(rnd, "ehr", [float(rnd), 2.0 * rnd])
    [table] = history.state_dict().values()
    assert sorted(set(table[:, 0].tolist())) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert history.reference("ehr", 8) == float(np.median([r * f for r in range(3, 8) for f in (1, 2)]))
    assert history.reference("ehr", 3) is None  # rounds 1-2 dropped; nothing earlier than 3 left
    with pytest.raises(ValueError, match="norms.ehr"):
        NormHistory().load_state_dict({"norms.ehr": np.array([1.0, float("nan")])})
    with pytest.raises(ValueError, match="unexpected entry"):
        NormHistory().load_state_dict({"ehr": np.zeros((1, 2))})


# --------------------------------------------------------------- real sites, run config


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


POLICY = {"min-code-subjects": 5, "min-report-subjects": 2}


def metadata(message_id: str, src: int, dst: int, message_type: str) -> Metadata:
    """A message's metadata as the SuperLink delivers it to a ClientApp (run 1)."""
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


DP_POLICY = "min_subjects: 3\ndp:\n  mandatory: true\n  epsilon_cap: 100\n  delta: 1.0e-5\n  noise_multiplier: 1.1\n"


@pytest.mark.slow  # 21 s of the default suite; CI's slow stage runs it (Makefile SLOW_CI)
def test_real_sites_one_under_dp_over_int8_are_never_rejected(federation, tmp_path: Path) -> None:
    """Two real ClientApps (the genomics cohort under DP: Poisson batches, expected counts) over
    two rounds: both replies are averaged in each round, under the count, step and history bounds."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DP_POLICY)
    configs: dict[str, dict[str, Any]] = {
        "biobank": {"site-root": str(federation.site("biobank").root), "site-name": "biobank", **POLICY},
        "genomics": {
            "site-root": str(federation.site("genomics").root),
            "site-name": "genomics",
            **POLICY,
            "policy": str(policy),
            "state-dir": str(tmp_path / "state"),
        },
    }
    stats = [SiteRuntime(SiteConfig.from_node_config(c)).code_stats() for c in configs.values()]
    setup = FederationSetup(
        vocabulary=build_vocabulary(stats, min_subjects=5), model=load_model_config("tiny"), model_seed=1
    )
    nodes = {1: "biobank", 2: "genomics"}
    apps = {n: make_client_app() for n in nodes}
    contexts = {
        n: Context(run_id=1, node_id=n, node_config=configs[name], state=RecordDict(), run_config={})
        for n, name in nodes.items()
    }
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    node_groups = {1: ["shared", "ehr", "wearables", "genomics"], 2: ["shared", "ehr", "genomics"]}
    s = ModalityAwareFedAvg()  # the real parameter groups
    for n in nodes:
        setup_record = FlowerConfig({"json": setup.to_json(), "sha256": setup.sha256})
        apps[n](make_message(metadata(f"setup-{n}", 0, n, SETUP), RecordDict({"setup": setup_record})), contexts[n])
    for rnd in (1, 2):
        cfg = RoundConfig(
            round=rnd,
            rounds=2,
            local_steps=2,
            lr=1e-3,
            batch_size=4,
            max_events=32,
            max_patches=4,
            transport="int8",
            setup_sha256=setup.sha256,
        )
        sent, replies = [], []
        for n in nodes:
            own = {k: v for k, v in arrays.items() if parameter_group(k) in node_groups[n]}
            content = RecordDict({"arrays": pack_record(own), "config": FlowerConfig(cfg.to_flat())})
            message = make_message(metadata(f"train-{rnd}-{n}", 0, n, MessageType.TRAIN), content)
            sent.append(message)
            answer = apps[n](message, contexts[n])
            replies.append(make_message(train_metadata(f"r-{rnd}-{n}", n, 0, f"train-{rnd}-{n}"), answer.content))
        outcome = aggregate_replies(
            s, rnd, replies, current_arrays=arrays, node_groups=node_groups, sent=sent, round_config=cfg
        )
        assert outcome.rejected == [], outcome.rejected
        assert outcome.accepted == [1, 2] and outcome.replies[2].dp is not None  # the DP site
        assert set(outcome.norm_bounds) == {"shared", "ehr", "wearables", "genomics"}
        assert outcome.arrays is not None
        arrays = outcome.arrays
    assert all(s.norm_history.reference(g, 3) is not None for g in outcome.norm_bounds)


def test_the_bounds_are_run_config_keys_a_resume_may_change() -> None:
    cfg = FederationConfig.from_run_config(
        {
            "out-dir": "/tmp/x",
            "model": "tiny",
            "norm-step-factor": 5,
            "norm-history-factor": 3,
            "norm-history-rounds": 2,
        }
    )
    assert (cfg.norm_step_factor, cfg.norm_history_factor, cfg.norm_history_rounds) == (5, 3, 2)
    defaults = FederationConfig.from_run_config({"out-dir": "/tmp/x", "model": "tiny"})
    assert (defaults.norm_step_factor, defaults.norm_history_factor, defaults.norm_history_rounds) == (10, 10, 5)
    assert defaults.norm_step_factor > ADAM_STEP_RATIO  # no AdamW site can exceed the default step bound
    for key, value in (("norm-step-factor", 0.5), ("norm-history-factor", float("inf")), ("norm-history-rounds", 0)):
        with pytest.raises(ValueError, match=key.replace("-", "_")):
            FederationConfig.from_run_config({"out-dir": "/tmp/x", "model": "tiny", key: value})
    assert {"max_update_norm", "norm_step_factor", "norm_history_factor", "norm_history_rounds"} <= RESUMABLE_CHANGES
