"""Any mix of modalities: the model holds only the federation's, sites that differ train and are
averaged correctly, and an EHR-only federation runs end to end.

The model tests use random batches and the tiny config; the site and strategy tests use tiny
synthetic sites (30 subjects) generated with their wearables and PRS rows left out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import (
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.app.message import make_message
from helpers.random_batch import random_batch

from client.client_app import train_reply_content
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.labels.tasks import TASKS
from healthfm_core.data.sequences.tokens import PretrainingDataset, collate
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.eval.probes import compute_embeddings
from healthfm_core.eval.runner import build_eval_set, method_features
from healthfm_core.model.groups import group_sizes
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.protocol import FederationSetup, RoundConfig, TrainReply, federation_modalities
from healthfm_core.protocol.setup import OPTIONS_BEFORE
from healthfm_core.terms.groups import GROUPS, parameter_group
from healthfm_core.terms.model_config import load_model_config, model_modalities
from healthfm_core.terms.objective_weights import LOSS_NAMES, ObjectiveWeights
from healthfm_core.terms.site_layout import MODALITIES
from healthfm_core.terms.vocabulary import Vocabulary
from healthfm_core.train.trainer import TrainConfig, train_local
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.replies import groups_for_node
from server.round import aggregate_replies
from server.strategy import ModalityAwareFedAvg
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
MODALITIES_LIST = list(MODALITIES)
VOCAB, TRAITS = 40, 4
SITE_POLICY = {"min-code-subjects": 5, "min-report-subjects": 2}
# modalities -> (n_prs_traits, groups the model holds, losses that can be non-zero)
CASES = {
    ("ehr",): (0, {"shared", "ehr"}, {"ehr_masked_code", "ehr_masked_value", "next_visit", "future_codes"}),
    ("ehr", "wearables"): (
        0,
        {"shared", "ehr", "wearables"},
        {"ehr_masked_code", "ehr_masked_value", "next_visit", "future_codes", "wear_masked", "predictive", "align"},
    ),
    ("ehr", "genomics"): (
        TRAITS,
        {"shared", "ehr", "genomics"},
        {"ehr_masked_code", "ehr_masked_value", "next_visit", "future_codes", "prs_masked"},
    ),
    MODALITIES: (TRAITS, set(GROUPS), set(LOSS_NAMES)),
}


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("modalities", list(CASES), ids=["+".join(m) for m in CASES])
def test_model_holds_only_its_modalities_and_trains(modalities: tuple[str, ...]) -> None:
    traits, groups, losses = CASES[modalities]
    torch.manual_seed(0)
    model = HealthFM(load_model_config("tiny"), VOCAB, traits, modalities)
    assert model.modalities == modalities
    sizes = group_sizes(model)
    assert {g for g, n in sizes.items() if n > 0} == groups
    assert {parameter_group(k) for k in model.state_dict()} == groups
    assert (model.wearable_encoder is None) == ("wearables" not in modalities)
    assert (model.genomics_encoder is None) == ("genomics" not in modalities)
    heads = set(model.heads)
    assert any(h.startswith("wear_") for h in heads) == ("wearables" in modalities)
    assert any(h.startswith("prs_") for h in heads) == ("genomics" in modalities)

    # Batches as a site of this federation makes them: the absent modalities padded (wearables,
    # one all-invalid patch) or empty (PRS: no trait in the vocabulary).
    data = [random_batch(6, vocab_size=VOCAB, n_prs_traits=traits, modalities=modalities, seed=i) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(
        model, data, TrainConfig(steps=3, lr=1e-2, progress=False, seed=1), weights_fn=ObjectiveWeights()
    )
    assert len(result.history) == 3
    for step in result.history:
        assert np.isfinite(step["total"])
        assert {name for name in LOSS_NAMES if step[name] != 0.0} <= losses
    assert {name for name in LOSS_NAMES if any(s[name] != 0.0 for s in result.history)} == losses
    changed = {parameter_group(k) for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == groups
    assert set(result.examples_per_group) == groups


def test_default_modalities_follow_the_prs_traits() -> None:
    cfg = load_model_config("tiny")
    assert HealthFM(cfg, VOCAB, TRAITS).modalities == MODALITIES
    no_prs = HealthFM(cfg, VOCAB, 0)  # was "n_prs_traits=0 must be >= 1"
    assert no_prs.modalities == ("ehr", "wearables") and no_prs.n_prs_traits == 0
    assert HealthFM(cfg, VOCAB, TRAITS, ["wearables", "ehr"]).n_prs_traits == 0  # order-free, no genomics
    assert model_modalities(3, {"genomics", "ehr"}) == ("ehr", "genomics")
    with pytest.raises(ValueError, match="n_prs_traits=0"):
        HealthFM(cfg, VOCAB, 0, ["ehr", "genomics"])
    with pytest.raises(ValueError, match="lack 'ehr'"):
        HealthFM(cfg, VOCAB, TRAITS, ["wearables", "genomics"])
    with pytest.raises(ValueError, match="subset"):
        HealthFM(cfg, VOCAB, TRAITS, ["ehr", "imaging"])
    with pytest.raises(ValueError, match="subset"):
        model_modalities(TRAITS, "ehr")


def test_a_batch_may_carry_a_missing_modality_only_as_padding() -> None:
    model = HealthFM(load_model_config("tiny"), VOCAB, 0, ["ehr"]).eval()
    # Padding of any width for the absent modalities: accepted, same embedding as without it.
    padded = random_batch(3, vocab_size=VOCAB, n_prs_traits=2, modalities=["ehr"], seed=1)
    empty = random_batch(3, vocab_size=VOCAB, n_prs_traits=0, modalities=["ehr"], seed=1, absent="empty")
    with torch.no_grad():
        torch.testing.assert_close(model.embed(padded), model.embed(empty))
    with pytest.raises(ValueError, match="wear_valid.*no wearables"):
        model(random_batch(3, vocab_size=VOCAB, n_prs_traits=0, modalities=["ehr", "wearables"]))
    with pytest.raises(ValueError, match="prs_valid.*no genomics"):
        model(random_batch(3, vocab_size=VOCAB, n_prs_traits=2, modalities=["ehr", "genomics"]))
    # A model with genomics still insists on its own trait count.
    with pytest.raises(ValueError, match="traits"):
        HealthFM(load_model_config("tiny"), VOCAB, TRAITS)(random_batch(2, vocab_size=VOCAB, n_prs_traits=0))


# ---------------------------------------------------------------- the setup


def test_setup_modalities_from_capabilities_and_vocabulary() -> None:
    cfg = load_model_config("tiny")
    vocab = Vocabulary(min_subjects=1, n_sites=2, codes=["A", "B", "C"], code_subjects=[5, 5, 5], code_events=[9, 9, 9])
    with_prs = Vocabulary(**{**vocab.model_dump(), "prs_traits": ["cad", "t2d"]})
    assert federation_modalities([["ehr"], ["ehr"]], vocab) == ["ehr"]
    assert federation_modalities([["genomics", "ehr"], ["ehr", "wearables"]], with_prs) == MODALITIES_LIST
    # A site with PRS rows whose traits all fell below the vocabulary's minimum: no genomics module.
    assert federation_modalities([["ehr", "genomics"]], vocab) == ["ehr"]

    setup = FederationSetup(vocabulary=vocab, model=cfg, modalities=["ehr"])
    assert setup.groups == ["shared", "ehr"]
    assert FederationSetup.model_validate_json(setup.to_json()) == setup
    assert {parameter_group(k) for k in init_model(setup).state_dict()} == {"shared", "ehr"}
    # Left out: what the vocabulary supports (the model every setup built before the field had).
    assert FederationSetup(vocabulary=with_prs, model=cfg).modalities == MODALITIES_LIST
    assert FederationSetup(vocabulary=vocab, model=cfg).modalities == ["ehr", "wearables"]
    assert setup.sha256 != FederationSetup(vocabulary=vocab, model=cfg).sha256
    # A setup written before the field existed (a server checkpoint) reads as, and hashes as, the default.
    old = json.loads(FederationSetup(vocabulary=with_prs, model=cfg).to_json())
    del old["modalities"]
    for (part, name), _ in OPTIONS_BEFORE.items():  # options added later, at their defaults
        del old["model"][part][name]
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    assert FederationSetup.model_validate_json(json.dumps(old)).sha256 == hashlib.sha256(canonical).hexdigest()
    shown = cfg.model_copy(update={"pretraining": cfg.pretraining.model_copy(update={"prs_reconstruct_shown": True})})
    pooled = cfg.model_copy(update={"pretraining": cfg.pretraining.model_copy(update={"separate_repeats": False})})
    ablated = cfg.model_copy(update={"curriculum": cfg.curriculum.model_copy(update={"objectives_off": ("align",)})})
    flat = cfg.model_copy(update={"curriculum": cfg.curriculum.model_copy(update={"enabled": False})})
    hashes = {FederationSetup(vocabulary=with_prs, model=m).sha256 for m in (cfg, shown, pooled, ablated, flat)}
    assert len(hashes) == 5  # an option away from its default is another setup
    with pytest.raises(ValueError, match="n_prs_traits=0"):
        FederationSetup(vocabulary=vocab, model=cfg, modalities=["ehr", "genomics"])
    with pytest.raises(ValueError, match="order"):
        FederationSetup(vocabulary=with_prs, model=cfg, modalities=["genomics", "ehr"])


# ---------------------------------------------------------------- sites that differ


def _scenario(modalities: dict[str, dict[str, float]]) -> dict:
    scenario = yaml.safe_load((REPO / "configs" / "scenario" / "tiny.yaml").read_text())
    for site in scenario["sites"]:
        site["modalities"] = modalities[site["name"]]
    scenario["name"] = "tiny-" + "-".join("+".join(m) for m in modalities.values())
    return scenario


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    """biobank: EHR only; hospital: EHR + wearables; genomics: EHR + genomics."""
    scenario = _scenario(
        {"biobank": {"ehr": 1.0}, "hospital": {"ehr": 1.0, "wearables": 1.0}, "genomics": {"ehr": 1.0, "genomics": 0.8}}
    )
    manifest = generate_federation(tmp_path_factory.mktemp("mixed"), scenario, seed=0, n_subjects=30, progress=False)
    return {
        s.name: SiteRuntime(SiteConfig.from_node_config({"site-root": str(s.root), "site-name": s.name, **SITE_POLICY}))
        for s in manifest.sites
    }


def _setup(runtimes: dict[str, SiteRuntime], names: list[str]) -> FederationSetup:
    vocab = build_vocabulary([runtimes[n].code_stats() for n in names], min_subjects=5)
    modalities = federation_modalities([runtimes[n].capabilities().modalities for n in names], vocab)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=1, modalities=modalities)


def _reply(node_id: int, reply: TrainReply) -> Message:
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
    return make_message(metadata, train_reply_content(reply))


def _sent(replies: list[Message]) -> list[Message]:
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


def test_ehr_only_and_genomics_sites_train_and_are_averaged_by_group(mixed) -> None:
    names = ["biobank", "genomics"]
    setup = _setup(mixed, names)
    assert setup.modalities == ["ehr", "genomics"]  # nobody has wearables: no wearable module
    assert [mixed[n].groups for n in names] == [["shared", "ehr"], ["shared", "ehr", "genomics"]]
    initial = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    assert {parameter_group(k) for k in initial} == {"shared", "ehr", "genomics"}

    strategy = ModalityAwareFedAvg()  # the real parameter_group
    node_groups = {1: mixed["biobank"].groups, 2: mixed["genomics"].groups}
    cfg = RoundConfig(
        round=1, rounds=1, local_steps=2, lr=1e-2, batch_size=4, max_events=32, seed=2, setup_sha256=setup.sha256
    )
    outcomes = {}
    for node, name in enumerate(names, start=1):
        mixed[name].check_setup(setup)
        wanted = groups_for_node(node, node_groups)
        outcomes[node] = mixed[name].train(
            setup, {k: v for k, v in initial.items() if parameter_group(k) in wanted}, cfg
        )
    assert {parameter_group(k) for k in outcomes[1].arrays} == {"shared", "ehr"}
    assert {parameter_group(k) for k in outcomes[2].arrays} == {"shared", "ehr", "genomics"}
    assert "genomics" not in outcomes[1].group_examples and outcomes[2].group_examples["genomics"] > 0

    replies = [_reply(n, o) for n, o in outcomes.items()]
    outcome = aggregate_replies(
        strategy, 1, replies, current_arrays=initial, node_groups=node_groups, sent=_sent(replies)
    )
    assert outcome.rejected == []
    assert outcome.contributors == {"shared": [1, 2], "ehr": [1, 2], "genomics": [2]}
    arrays = outcome.arrays
    assert arrays is not None
    new = dict(arrays)
    assert new.keys() == initial.keys()
    for key in initial:
        group = parameter_group(key)
        if group == "genomics":  # one site holds it: its values, untouched by the other
            np.testing.assert_array_equal(new[key], outcomes[2].arrays[key], err_msg=key)
            continue
        n1, n2 = (outcomes[n].group_examples[group] for n in (1, 2))
        expected = outcomes[1].arrays[key] * (n1 / (n1 + n2)) + outcomes[2].arrays[key] * (n2 / (n1 + n2))
        np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
    assert any(not np.array_equal(new[k], initial[k]) for k in new if parameter_group(k) == "genomics")


def test_wearable_site_beside_a_genomics_site_and_setup_refusal(mixed) -> None:
    setup = _setup(mixed, ["hospital", "genomics"])
    assert setup.modalities == MODALITIES_LIST
    cfg = RoundConfig(
        round=1, rounds=1, local_steps=3, lr=1e-2, batch_size=8, max_events=32, max_patches=4, setup_sha256=setup.sha256
    )
    init = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    hospital = mixed["hospital"].train(
        setup, {k: v for k, v in init.items() if parameter_group(k) in mixed["hospital"].groups}, cfg
    )
    assert {parameter_group(k) for k in hospital.arrays} == {"shared", "ehr", "wearables"}
    assert hospital.group_examples["wearables"] > 0 and "wear_masked" in hospital.losses
    # A setup agreed without the hospital has no wearable module: the hospital refuses it
    # (its batches would not fit), the EHR-only biobank accepts it.
    ehr_genomics = _setup(mixed, ["biobank", "genomics"])
    with pytest.raises(ValueError, match="wearables"):
        mixed["hospital"].check_setup(ehr_genomics)
    mixed["biobank"].check_setup(ehr_genomics)


def test_frozen_embeddings_and_eval_rows_of_an_ehr_only_site(mixed) -> None:
    rt = mixed["biobank"]
    setup = _setup(mixed, ["biobank"])
    assert setup.modalities == ["ehr"]
    model = init_model(setup).eval()
    seqs = rt.sequences(setup)
    ds = PretrainingDataset(seqs, rt.split_ids()["train"], time_mode="last", max_events=32, max_patches=4)
    feats = compute_embeddings(model, [collate([ds[i] for i in range(5)])])
    assert feats.x.shape == (5, model.cfg.d_model) and np.isfinite(feats.x).all()
    # The wearable task has no row at a site without wearables; the onset task keeps its rows.
    tasks = {k: TASKS[k] for k in ("onset_hypertension_365d", "wearable_resting_hr")}
    data = build_eval_set({"biobank": (rt.site, seqs)}, tasks, n_per_subject=2, seed=0)
    assert np.isfinite(data.labels("wearable_resting_hr")).sum() == 0
    assert np.isfinite(data.labels("onset_hypertension_365d")).sum() > 0
    features = method_features(data, model, max_events=32, max_patches=4, batch_size=16)
    assert features.present[:, 0].all() and not features.present[:, 1:].any()
    assert np.isfinite(features.x).all()


# ---------------------------------------------------------------- an EHR-only federation


@pytest.mark.slow  # a whole simulation (22 s): in CI's slow stage (Makefile SLOW_CI), keeping the default suite short
def test_three_ehr_only_sites_run_end_to_end(tmp_path: Path) -> None:
    """The third finding of issue 11: three EHR-only sites crashed with `n_prs_traits=0 must be >= 1`."""
    scenario = _scenario({"biobank": {"ehr": 1.0}, "hospital": {"ehr": 1.0}, "genomics": {"ehr": 1.0}})
    manifest = generate_federation(tmp_path / "data", scenario, seed=0, n_subjects=30, progress=False)
    roots = ",".join(str(s.root) for s in manifest.sites)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        f"site_roots=[{roots}]",
        "model=tiny",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.max_events=64",
        "federation.vocab_min_subjects=5",
        "federation.site.min_code_subjects=5",
        "federation.site.min_report_subjects=2",
        "federation.site.min_report_positives=1",
        "federation.eval_n_boot=10",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latest = latest_server_checkpoint(out / "checkpoints")
    assert latest is not None
    state = load_server_checkpoint(latest)
    assert state.round == 1 and state.setup.modalities == ["ehr"]
    assert {parameter_group(k) for k in state.arrays} == {"shared", "ehr"}
    summary = (out / "summary.md").read_text()
    assert "| 1 | 3/3 |" in summary
    assert "wear_masked" not in summary and "prs_masked" not in summary
