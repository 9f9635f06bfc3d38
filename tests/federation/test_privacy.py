"""DP at the site: per-sample clipping against Opacus, the durable privacy ledger, and the
site policy enforced through the real ClientApp (epsilon cap, local groups, minimum subjects).

Three tiny synthetic sites (30 subjects each), the tiny model, 1-2 local steps per round.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.app.message import make_message
from helpers.narrowing import present
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from client.client_app import make_client_app
from client.policy import PolicyError
from client.site_runtime import SiteConfig, SiteRuntime, TrainRefused
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sequences.tokens import PretrainingDataset, collate
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import init_model
from healthfm_core.privacy.engine import (
    DPLocalStep,
    DPSettings,
    PoissonBatches,
    StreamingDPOptimizer,
    noise_for_target,
)
from healthfm_core.privacy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from healthfm_core.protocol import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    STATUS_RECORD,
    EvalConfig,
    FederationSetup,
    PrivacySpend,
    RoundConfig,
    TrainReply,
)
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.terms.groups import is_encoder, parameter_group
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights
from server.config import FederationConfig, PrivacyRequest
from server.round import aggregate_replies
from server.strategy import ModalityAwareFedAvg, pack_record
from simulations.synthetic import generate_federation

BASE = {"min-code-subjects": 5, "min-report-subjects": 2}
DELTA = 1e-5
SPEND: dict[str, Any] = {"noise_multiplier": 1.0, "sample_rate": 0.1, "max_grad_norm": 1.0, "delta": DELTA}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


@pytest.fixture(scope="module")
def setup(federation) -> FederationSetup:
    stats = [
        SiteRuntime(SiteConfig.from_node_config({"site-root": str(s.root), "site-name": s.name, **BASE})).code_stats()
        for s in federation.sites
    ]
    return FederationSetup(
        vocabulary=build_vocabulary(stats, min_subjects=5), model=load_model_config("tiny"), model_seed=1
    )


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def runtime(federation, name: str, policy: Path | None = None, state_dir: Path | None = None, **extra) -> SiteRuntime:
    site = federation.site(name)
    cfg = {"site-root": str(site.root), "site-name": name, **BASE, **extra}
    if policy is not None:
        cfg["policy"] = str(policy)
    if state_dir is not None:
        cfg["state-dir"] = str(state_dir)
    return SiteRuntime(SiteConfig.from_node_config(cfg))


def own_arrays(setup: FederationSetup, groups: list[str]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in groups}


def round_cfg(setup: FederationSetup, rnd: int, **kw: Any) -> RoundConfig:
    base: dict[str, Any] = dict(
        round=rnd,
        rounds=3,
        local_steps=2,
        lr=1e-3,
        batch_size=4,
        max_events=32,
        max_patches=4,
        setup_sha256=setup.sha256,
    )
    base.update(kw)
    return RoundConfig(**base)


DP_POLICY = """
min_subjects: 3
dp:
  mandatory: true
  epsilon_cap: {cap}
  delta: 1.0e-5
  max_grad_norm: 1.0
  noise_multiplier: 1.1
"""


# ------------------------------------------------------------------------ per-sample clipping


def test_streaming_clipping_and_noise_equal_opacus_hooks() -> None:
    """The clipped, summed, noised, scaled gradient equals Opacus's hook-based DP-SGD on a model
    Opacus supports (same per-sample losses, same noise generator seed)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    # Opacus's full backward hooks fire on the module's inputs: one that takes a gradient (torch
    # warns otherwise); the parameters' gradients, all the test compares, are the same either way.
    x.requires_grad_(True)
    ref_model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ours = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ours.load_state_dict(ref_model.state_dict())
    kw = dict(noise_multiplier=0.7, max_grad_norm=0.3, expected_batch_size=4, loss_reduction="mean")

    gsm = GradSampleModule(ref_model)
    ref_opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), generator=torch.Generator().manual_seed(5), **kw)
    ((gsm(x) - y) ** 2).sum().backward()  # per-sample losses summed: hooks give each sample's gradient
    ref_opt.step()

    opt = StreamingDPOptimizer(
        torch.optim.SGD(ours.parameters(), lr=0.1), generator=torch.Generator().manual_seed(5), **kw
    )
    params = opt.params
    for i in range(len(x)):
        loss = ((ours(x[i : i + 1]) - y[i : i + 1]) ** 2).sum()
        opt.accumulate(list(torch.autograd.grad(loss, params)))
    opt.step()
    for (name, p), q in zip(ours.named_parameters(), gsm._module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_every_healthfm_parameter_gets_a_clipped_per_sample_gradient(federation, setup) -> None:
    """Per-sample gradients reach the whole model, including the continuous-time attention's
    mixture log-weights and decay rates; each sample's contribution is clipped."""
    rt = runtime(federation, "biobank")
    model = init_model(setup)
    model.train()
    ds = PretrainingDataset(
        rt.sequences(setup), rt.split_ids()["train"], time_mode="last", max_events=32, max_patches=4
    )
    batch = collate([ds[i] for i in range(4)])
    clip = 1e-3  # far below every sample's norm: each contributes exactly `clip`
    step = DPLocalStep(
        DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5, n_samples=8, delta=DELTA), RDPAccountant()
    )
    opt = step.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    losses, mean_norm = step(model, batch, ObjectiveWeights(), torch.Generator().manual_seed(0))
    assert np.isfinite(losses["total"]) and mean_norm > clip
    # A parameter no sample's loss reaches (e.g. a head whose objective these samples lack) has none.
    summed = {n: p.summed_grad for n, p in model.named_parameters() if p.summed_grad is not None}  # type: ignore[attr-defined]  # set by the DP step's per-sample hooks
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in summed.values()]))
    assert float(total) <= 4 * clip * (1 + 1e-4)
    for name in [
        "backbone.blocks.0.attn.decay.weight_logits",
        "backbone.blocks.0.attn.decay.rate_logits",
        "ehr_encoder.modality_embedding",
        "ehr_encoder.code_embedding.weight",
        "wearable_encoder.input_proj.weight",
        "genomics_encoder.mlp.0.weight",
    ]:
        assert float(summed[name].abs().sum()) > 0, name
    opt.step()  # noise 0: the gradient is the clipped sum over the expected batch (4 x 0.5 / 2 = 2 samples)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, summed[name] / 4 if name in summed else torch.zeros_like(p), msg=name)


def test_poisson_batches_draw_each_sample_independently(federation, setup) -> None:
    rt = runtime(federation, "genomics")
    ds = PretrainingDataset(
        rt.sequences(setup), rt.split_ids()["train"], time_mode="last", max_events=16, max_patches=2
    )
    loader = PoissonBatches(ds, collate, sample_rate=0.25, steps=40, generator=torch.Generator().manual_seed(3))
    sizes = [b.batch_size for b in loader]
    assert len(sizes) == 40 and min(sizes) <= 4 < 8 < max(sizes)  # sizes vary around 0.25 x 24 = 6
    assert abs(np.mean(sizes) - 0.25 * len(ds)) < 1.5
    sparse = [
        b for b in PoissonBatches(ds, collate, sample_rate=0.02, steps=20, generator=torch.Generator().manual_seed(3))
    ]
    empty = [b for b in sparse if b.batch_size == 0]
    assert empty and empty[0].codes.shape[0] == 0  # an empty batch is a Batch of size 0, not skipped


# ------------------------------------------------------------------------ the ledger


def test_epsilon_after_three_rounds_equals_the_accountant_and_survives_a_restart(federation, setup, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=100))
    state = tmp_path / "state"
    rt = runtime(federation, "genomics", policy, state)
    arrays = own_arrays(setup, rt.groups)
    replies = [rt.train(setup, arrays, round_cfg(setup, r)) for r in (1, 2, 3)]
    n = len(PretrainingDataset(rt.sequences(setup), rt.split_ids()["train"]))
    rate = 4 / n
    reference = RDPAccountant()
    reference.history = [(1.1, rate, 3 * 2)]  # total steps at the site's sampling rate
    expected = reference.get_epsilon(DELTA)
    assert present(replies[-1].dp).epsilon == pytest.approx(expected, rel=1e-12)
    assert present(replies[-1].dp).delta == DELTA
    # Epsilon grows round by round (a fresh accountant per round would report round 1's value each time).
    eps = [present(r.dp).epsilon for r in replies]
    assert eps[0] < eps[1] < eps[2]
    ledger = json.loads((state / LEDGER_FILE).read_text())
    assert [r["round"] for r in ledger["rounds"]] == [1, 2, 3] and ledger["history"] == [[1.1, rate, 6]]
    assert not replies[-1].losses and replies[-1].grad_norm is None  # not covered by DP: withheld

    restarted = runtime(federation, "genomics", policy, state)  # a new SuperNode process on the same state
    assert present(restarted.privacy_spend()).epsilon == pytest.approx(expected, rel=1e-12)
    fourth = restarted.train(setup, arrays, round_cfg(setup, 4, rounds=4))
    reference.history = [(1.1, rate, 8)]
    assert present(fourth.dp).epsilon == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)


def test_a_damaged_ledger_is_never_replaced_by_a_fresh_one(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.commit(ledger.reserve(round=1, run="r", steps=5, epsilon_cap=100.0, **SPEND), 5)
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    data["rounds"] = []
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="5 steps but the rounds log 0"):
        PrivacyLedger(tmp_path)
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(LedgerError, match=LEDGER_FILE):
        PrivacyLedger(tmp_path)


def test_two_processes_serving_one_site_never_lose_each_others_spend(tmp_path) -> None:
    """Two ledger objects on one state dir stand for two worker processes of the same site
    (tests/unit/test_privacy_ledger.py races two real processes)."""
    first, second = PrivacyLedger(tmp_path), PrivacyLedger(tmp_path)  # both opened on an empty ledger
    one = first.reserve(round=1, run="r", steps=3, epsilon_cap=100.0, **SPEND)
    assert second.steps == 3  # the other process sees round 1 at once, before it has trained
    two = second.reserve(round=2, run="r", steps=2, epsilon_cap=100.0, **SPEND)
    first.commit(one, 3)
    second.commit(two, 2)
    assert first.steps == 5 and [r.round for r in first.data.rounds] == [1, 2]
    assert PrivacyLedger(tmp_path).steps == 5


def test_target_epsilon_is_reached_at_the_end_of_the_run(federation, setup, tmp_path) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml", DP_POLICY.format(cap=10).replace("noise_multiplier: 1.1", "target_epsilon: 4.0")
    )
    rt = runtime(federation, "genomics", policy, tmp_path / "state")
    arrays = own_arrays(setup, rt.groups)
    out = [rt.train(setup, arrays, round_cfg(setup, r, rounds=2, local_steps=1)) for r in (1, 2)]
    assert present(out[0].dp).epsilon < 4.0
    assert present(out[1].dp).epsilon == pytest.approx(4.0, abs=0.05)


# ------------------------------------------------------------------------ the policy via the ClientApp


def message(content: RecordDict, message_type: str, node: int = 7) -> Message:
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


class Node:
    """One site's real ClientApp with its node config and state, driven message by message."""

    def __init__(self, node_config: dict) -> None:
        self.app = make_client_app()
        self.context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    def send_setup(self, setup: FederationSetup) -> None:
        record = ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})
        self.app(message(RecordDict({"setup": record}), "query.setup"), self.context)

    def train(self, setup: FederationSetup, groups: list[str], cfg: RoundConfig) -> Message:
        arrays = pack_record(own_arrays(setup, groups))  # as the server sends them: one packed part
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(cfg.to_flat())})
        return self.app(message(content, MessageType.TRAIN), self.context)


def parsed(reply: Message) -> TrainReply:
    """A ClientApp's train reply as the server parses it."""
    content = reply.content
    arrays = content.array_records.get(ARRAYS_RECORD)
    status = content.config_records.get(STATUS_RECORD)
    return TrainReply.from_records(
        unpack_record(arrays, where="test") if arrays is not None else None,
        dict(content.metric_records[METRICS_RECORD]),
        dict(status) if status is not None else None,
    )


def node_config(federation, name: str, **extra) -> dict:
    site = federation.site(name)
    return {"site-root": str(site.root), "site-name": name, **BASE, **{k: str(v) for k, v in extra.items()}}


def test_a_request_over_the_cap_is_refused_and_no_update_leaves(federation, setup, tmp_path) -> None:
    state = tmp_path / "state"
    # One round of 2 steps at rate 4/24, noise 1.1 spends ~2.3; a cap of 3 refuses the second.
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=3.0))
    node = Node(node_config(federation, "hospital", policy=policy, **{"state-dir": state}))
    node.send_setup(setup)
    groups = ["shared", "ehr", "wearables"]
    first = node.train(setup, groups, round_cfg(setup, 1))
    assert not first.has_error() and len(first.content.array_records) == 1
    epsilon = present(parsed(first).dp).epsilon
    assert 0 < epsilon <= 3.0
    assert present(parsed(first).dp).epsilon_cap == 3.0  # the policy's cap travels with the spend
    ledger_before = (state / LEDGER_FILE).read_bytes()

    second = node.train(setup, groups, round_cfg(setup, 2))
    assert not second.has_error()
    assert len(second.content.array_records) == 0  # no update leaves the site
    refused = parsed(second)
    assert refused.status == "refused" and "cap 3" in refused.reason
    assert refused.dp == PrivacySpend(epsilon=epsilon, delta=DELTA, epsilon_cap=3.0)
    assert (state / LEDGER_FILE).read_bytes() == ledger_before  # nothing trained, nothing spent

    # The server counts the site out of the round and says why.
    sent = message(RecordDict(), MessageType.TRAIN)  # to node 7, whom `second` answers
    outcome = aggregate_replies(
        ModalityAwareFedAvg(), 2, [second], current_arrays=own_arrays(setup, groups), node_groups=None, sent=[sent]
    )
    assert outcome.arrays is None
    [rejected] = outcome.rejected
    assert rejected.kind == "refused" and "refused by the site" in rejected.reason and "cap" in rejected.reason


def test_dp_requested_without_a_site_budget_is_refused(federation, setup) -> None:
    rt = runtime(federation, "genomics")
    with pytest.raises(TrainRefused, match="no privacy budget"):
        rt.train(setup, own_arrays(setup, rt.groups), round_cfg(setup, 1, dp=True, dp_noise_multiplier=1.0))


def test_a_group_the_policy_keeps_local_never_appears_in_a_reply(federation, setup, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", "min_subjects: 3\ngroups_allowed: [shared, ehr]\n")
    node = Node(node_config(federation, "biobank", policy=policy))
    node.send_setup(setup)
    reply = node.train(setup, ["shared", "ehr", "wearables", "genomics"], round_cfg(setup, 1, local_steps=1))
    arrays = unpack_record(reply.content.array_records[ARRAYS_RECORD], where="test")
    assert {parameter_group(k) for k in arrays} == {"shared", "ehr"}
    assert sorted(parsed(reply).group_examples) == ["ehr", "shared"]
    # The site did train them (the shared weights saw wearables and genomics): they only stay home.
    assert any(
        parameter_group(k) == "wearables"
        for k in runtime(federation, "biobank", policy)
        .train(setup, own_arrays(setup, ["shared", "ehr", "wearables", "genomics"]), round_cfg(setup, 1, local_steps=1))
        .arrays
    )


def test_metrics_and_statistics_on_too_few_subjects_are_withheld(federation, setup, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", "min_subjects: 10\n")
    rt = runtime(federation, "hospital", policy)
    # 7 subjects with wearables < 10: not revealed, not trained.
    assert rt.capabilities().subjects["wearables"] == 0 and "wearables" not in rt.groups
    assert runtime(federation, "hospital").capabilities().subjects["wearables"] == 7
    # Training losses over 4 samples describe 4 < 10 subjects: withheld; over 16, reported.
    arrays = own_arrays(setup, rt.groups)
    few = rt.train(setup, arrays, round_cfg(setup, 1, local_steps=1, batch_size=4))
    assert few.num_examples == 4 and not few.losses and few.grad_norm is None
    many = rt.train(setup, arrays, round_cfg(setup, 1, local_steps=2, batch_size=8))
    assert "total" in many.losses
    # Code statistics: the policy's minimum (10) overrides the node config's (5).
    stats = rt.code_stats()
    assert stats.min_subjects == 10 and stats.codes and min(c.n_subjects for c in stats.codes.values()) >= 10
    assert stats.n_wearable_subjects == 0 and not stats.wearables  # 7 wearable subjects: moments withheld
    loose = runtime(federation, "hospital").code_stats()
    assert loose.n_wearable_subjects == 7 and min(c.n_subjects for c in loose.codes.values()) < 10
    # Evaluation: splits of 3 subjects < 10: every task withheld.
    evaluation = rt.evaluate(
        setup,
        arrays,
        EvalConfig(round=1, tasks=resolve_tasks(["onset_hypertension_365d"]), setup_sha256=setup.sha256, n_boot=10),
    )
    assert evaluation.withheld == 1 and not evaluation.tasks


def test_a_policy_error_stops_the_site_with_a_clear_message(federation, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", "min_subjects: 0\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: field min_subjects: value 0"):
        runtime(federation, "hospital", policy)


# ------------------------------------------------------------------------ the ledger fails closed at the site


def test_under_dp_no_timing_or_actual_count_leaves_and_without_dp_no_epsilon(federation, setup, tmp_path) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml", DP_POLICY.format(cap=100).replace("mandatory: true", "mandatory: false")
    )
    rt = runtime(federation, "genomics", policy, tmp_path / "state")
    arrays = own_arrays(setup, rt.groups)
    private = rt.train(setup, arrays, round_cfg(setup, 1, dp=True))
    n = len(PretrainingDataset(rt.sequences(setup), rt.split_ids()["train"]))
    records = private.to_records()
    assert set(records.metrics) <= {
        "num-examples",
        "dp.epsilon",
        "dp.delta",
        "dp.noise-multiplier",
        "dp.epsilon-cap",  # the policy's, a constant: nothing of the data
        "rate-min",
        "rate-max",
    } | {f"num-examples.{g}" for g in rt.groups}
    assert private.num_examples == round(4 / n * n * 2)  # the expected count, not the Poisson draws
    assert private.train_seconds is None and private.client_seconds is None and not private.losses
    plain = rt.train(setup, arrays, round_cfg(setup, 2))  # DP not mandatory, not asked: an update without DP
    assert plain.train_seconds is not None and plain.dp is None
    assert not [k for k in plain.to_records().metrics if k.startswith("dp.")]


def test_the_empty_object_and_the_deleted_ledger_attacks_are_refused(federation, setup, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=100))
    state = tmp_path / "state"
    rt = runtime(federation, "genomics", policy, state)
    arrays = own_arrays(setup, rt.groups)
    rt.train(setup, arrays, round_cfg(setup, 1))
    (state / LEDGER_FILE).write_text("{}")  # overwritten while the site runs
    with pytest.raises(TrainRefused) as refused:
        rt.train(setup, arrays, round_cfg(setup, 2))
    assert f"{state / LEDGER_FILE}: field history: value (missing)" in refused.value.reason
    assert refused.value.reply.dp is None  # no figure from a ledger that cannot be trusted
    assert (state / LEDGER_FILE).read_text() == "{}"
    with pytest.raises(LedgerError):
        runtime(federation, "genomics", policy, state)  # nor does a restarted site start afresh

    (state / LEDGER_FILE).unlink()  # deleted
    with pytest.raises(TrainRefused, match="privacy ledger is missing, but .* already spent 2 DP steps"):
        rt.train(setup, arrays, round_cfg(setup, 2))
    with pytest.raises(LedgerError, match="missing"):
        runtime(federation, "genomics", policy, state)


def test_a_round_that_fails_after_its_reservation_stays_counted(federation, setup, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=100))
    state = tmp_path / "state"
    rt = runtime(federation, "genomics", policy, state)
    arrays = own_arrays(setup, rt.groups)
    bad = {k: (np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v) for k, v in arrays.items()}
    with pytest.raises(FloatingPointError):
        rt.train(setup, bad, round_cfg(setup, 1))  # NaN weights: the loss fails during training
    ledger = PrivacyLedger(state)
    assert ledger.steps == 2 and [r.status for r in ledger.data.rounds] == ["reserved"]
    assert present(rt.privacy_spend()).epsilon > 0


def test_two_runtimes_training_at_once_record_every_step_and_stop_at_the_cap(federation, setup, tmp_path) -> None:
    """The replayed race: two site runtimes on one state directory (threads here, each with its
    own runtime and ledger object) used to release updates whose spend the ledger lost."""
    n = 24  # genomics train subjects with a timed observation
    reference = RDPAccountant()
    reference.history = [(1.1, 4 / n, 10)]
    cap = reference.get_epsilon(DELTA) + 1e-9  # room for 10 steps: 5 rounds of 2
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=repr(cap)))
    state = tmp_path / "state"
    runtimes = [runtime(federation, "genomics", policy, state) for _ in range(2)]
    assert len(PretrainingDataset(runtimes[0].sequences(setup), runtimes[0].split_ids()["train"])) == n
    arrays = own_arrays(setup, runtimes[0].groups)
    replies: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            for rnd in range(1, 8):
                try:
                    replies[i].append(runtimes[i].train(setup, arrays, round_cfg(setup, rnd, rounds=7)))
                except TrainRefused:
                    break
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    released = [r for rs in replies.values() for r in rs]
    ledger = PrivacyLedger(state)
    assert len(released) == 5 and ledger.steps == 2 * len(released) == 10  # every released step recorded
    assert all(r.status == "trained" for r in ledger.data.rounds)
    assert ledger.epsilon(DELTA) <= cap and all(r.dp.epsilon <= cap for r in released)
    assert max(r.dp.epsilon for r in released) == pytest.approx(ledger.epsilon(DELTA), rel=1e-12)


def test_a_delta_above_one_over_the_train_subjects_is_refused_at_load(federation, tmp_path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=8).replace("delta: 1.0e-5", "delta: 0.1"))
    with pytest.raises(PolicyError, match=r"policy.yaml: field dp.delta: value 0.1: .*above 1/n = 1/\d+"):
        runtime(federation, "genomics", policy, tmp_path / "state")


def test_under_dp_the_encoders_only_round_trains_and_noises_only_the_modality_encoders(
    federation, setup, tmp_path
) -> None:
    """Issue 68: a round whose config asks `dp-train: encoders` trains only the modality encoders
    under DP (the rest is sent back exactly as received, so no noise is added there) and spends
    as an all-parameter round does; without DP the field changes nothing."""
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=10))
    node = Node(node_config(federation, "biobank", policy=policy, **{"state-dir": tmp_path / "state"}))
    node.send_setup(setup)
    groups = runtime(federation, "biobank").groups
    sent = own_arrays(setup, groups)
    cfg = round_cfg(setup, 1, dp=True, dp_train="encoders")
    assert RoundConfig.from_flat(cfg.to_flat()).dp_train == "encoders"  # on the wire
    raw = node.train(setup, groups, cfg)
    assert not raw.has_error(), raw.error
    reply = parsed(raw)
    assert reply.status == "ok"
    moved = {k for k, v in reply.arrays.items() if not np.array_equal(v, sent[k])}
    assert moved and all(is_encoder(k) for k in moved)
    assert any(k.startswith("ehr_encoder.") for k in moved) and any(k.startswith("genomics_encoder.") for k in moved)
    other = Node(node_config(federation, "biobank", policy=policy, **{"state-dir": tmp_path / "other"}))
    other.send_setup(setup)
    same_spend = parsed(other.train(setup, groups, round_cfg(setup, 1, dp=True)))
    # The all-parameter round spends the same: the same steps at the same rate and noise.
    assert present(reply.dp).epsilon == pytest.approx(present(same_spend.dp).epsilon)
    assert {k for k, v in same_spend.arrays.items() if not np.array_equal(v, sent[k])} - moved  # it moved more


def test_the_larger_batch_lever_spends_what_opacus_accounts_at_its_own_rate_and_steps(
    federation, setup, tmp_path
) -> None:
    """Issue 68's DP recipe (fewer, larger Poisson batches at the same samples a site sees): asked
    for epsilon 8 over the run, the site spends what Opacus's RDP accountant gives for the lever's
    own sampling rate, steps and the noise it derived; both settings reach the target, and the
    larger batch carries less noise on its mean gradient (sigma / batch), the lever's point."""
    policy = write_policy(tmp_path / "policy.yaml", DP_POLICY.format(cap=100).replace("  noise_multiplier: 1.1\n", ""))
    spent = {}
    for batch, steps in ((4, 4), (16, 1)):  # 16 samples a round either way
        state = tmp_path / f"state-{batch}"
        rt = runtime(federation, "genomics", policy, state)
        cfg = round_cfg(setup, 1, rounds=1, local_steps=steps, batch_size=batch, dp=True, dp_target_epsilon=8.0)
        reply = rt.train(setup, own_arrays(setup, rt.groups), cfg)
        n = len(PretrainingDataset(rt.sequences(setup), rt.split_ids()["train"]))
        [(sigma, rate, taken)] = json.loads((state / LEDGER_FILE).read_text())["history"]
        assert (rate, taken) == (batch / n, steps)
        assert sigma == pytest.approx(noise_for_target(8.0, DELTA, batch / n, steps), rel=1e-12)
        reference = RDPAccountant()
        reference.history = [(sigma, rate, steps)]
        assert present(reply.dp).epsilon == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
        assert 7.9 < present(reply.dp).epsilon <= 8.0 + 1e-9  # the target, to the search's tolerance
        spent[batch] = sigma
    assert spent[16] / 16 < spent[4] / 4


def test_the_server_asks_for_encoder_only_dp_in_every_round_config() -> None:
    request = PrivacyRequest(target_epsilon=8.0, train="encoders")
    assert request.round_fields()["dp_train"] == "encoders" and "only the modality encoders" in request.describe()
    run = {"out-dir": "runs/x", "model": "tiny", "privacy-target-epsilon": 8.0}
    assert FederationConfig.from_run_config({**run, "privacy-train": "encoders"}).privacy == request
    with pytest.raises(ValueError, match="privacy.train"):
        FederationConfig.from_run_config({**run, "privacy-train": "heads"})
