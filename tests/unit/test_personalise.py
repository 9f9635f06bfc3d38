"""Personalisation's pieces (issue 68): local steps after the last round snapshotted at each
candidate count (healthfm_core/train/adapt.py), the count chosen on tuning AUROC
(healthfm_core/eval/personal_choice.py), and the site's personalised weights on disk
(healthfm_core/personal_weights.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.data.sequences.vocab import Normalizer, Vocabulary
from healthfm_core.eval.personal_choice import choose_steps
from healthfm_core.model.healthfm import init_model
from healthfm_core.personal_weights import (
    PersonalError,
    load_personal,
    personal_sha256,
    read_personal_meta,
    write_personal,
)
from healthfm_core.protocol import FederationSetup
from healthfm_core.release import ReleaseMeta, load_release, write_release
from healthfm_core.terms.groups import group_state_dict
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import curriculum_weights
from healthfm_core.train.adapt import adapt_snapshots, candidate_steps, last_round_weights
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import train_local

VOCAB = 40
GROUPS = ["shared", "ehr"]


@pytest.fixture(scope="module")
def setup() -> FederationSetup:
    codes = [f"ICD10//C{i:02d}" for i in range(VOCAB - 5)]
    vocab = Vocabulary(
        min_subjects=5,
        n_sites=2,
        codes=codes,
        code_subjects=[10] * len(codes),
        code_events=[20] * len(codes),
        prs_traits=["T2D", "CAD"],
        prs={"T2D": Normalizer(), "CAD": Normalizer()},
    )
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=3)


def _data(setup: FederationSetup) -> list:
    v = setup.vocabulary
    return [random_batch(4, vocab_size=v.vocab_size, n_prs_traits=v.n_prs_traits, seed=i) for i in range(3)]


def _run() -> LocalRun:
    return LocalRun(lr=3e-3, weight_decay=0.01, batch_size=4, max_events=16, max_patches=4)


def test_each_snapshot_is_the_model_a_run_of_that_many_steps_gives_and_the_start_is_untouched(
    setup: FederationSetup,
) -> None:
    model = init_model(setup)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weights = last_round_weights(setup.model, 4)
    snaps = adapt_snapshots(model, _data(setup), _run(), [3, 0, 1, 3], seed=7, groups=GROUPS, weights=weights)
    assert sorted(snaps) == [0, 1, 3]
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # a copy trained
    for key in snaps[0]:
        assert torch.equal(snaps[0][key], start[key])
    assert set(snaps[3]) == set(group_state_dict(start, GROUPS))  # the adapted groups only
    for k in (1, 3):  # the same as one uninterrupted run stopped at k
        alone = init_model(setup)
        cfg = _run().train_config(3, 7, log_every=3)
        result = train_local(alone, _data(setup), cfg, groups=GROUPS, weights_fn=weights, stop_step=k)
        for key, value in result.group_state.items():
            assert torch.equal(snaps[k][key], value), (k, key)
    assert any(not torch.equal(snaps[3][key], start[key]) for key in snaps[3])  # it trained


def test_the_steps_continue_the_runs_last_round_objectives() -> None:
    cfg = load_model_config("tiny")
    assert last_round_weights(cfg, 4) == curriculum_weights(3, 4, cfg)
    with pytest.raises(ValueError, match="at least one round"):
        last_round_weights(cfg, 0)
    with pytest.raises(ValueError, match=">= 0"):
        candidate_steps([0, -1])
    with pytest.raises(ValueError, match="non-empty"):
        candidate_steps([])


def test_the_choice_reads_tuning_auroc_on_common_tasks_and_a_tie_keeps_the_fewest_steps() -> None:
    nan = float("nan")
    c = choose_steps({0: {"a": 0.70, "b": 0.60}, 20: {"a": 0.75, "b": 0.62}, 80: {"a": 0.74, "b": 0.64}})
    assert c.steps == 80 and c.tasks == ["a", "b"] and c.tuning_auroc[20] == pytest.approx(0.685)
    # 20 is within the tie (2e-3) of 80's best: the fewer steps win.
    assert choose_steps({0: {"a": 0.70}, 20: {"a": 0.7490}, 80: {"a": 0.7505}}).steps == 20
    # A task one candidate could not score is left out of every candidate's mean.
    c = choose_steps({0: {"a": 0.70, "b": 0.99}, 20: {"a": 0.72, "b": nan}})
    assert c.steps == 20 and c.tasks == ["a"]
    # Nothing to compare on: the federated model (the fewest steps offered) is kept.
    c = choose_steps({0: {"a": nan}, 20: {"b": 0.9}})
    assert c.steps == 0 and c.tasks == [] and all(math.isnan(v) for v in c.tuning_auroc.values())


def test_the_kept_model_is_never_below_local_only_on_the_tuning_split() -> None:
    """Issue 68: with the site's local-only model a candidate, the kept model's mean tuning AUROC
    (on the tasks every candidate scored) is never below local-only's, whatever the scores; the
    tie never keeps an adapted model below it; all adapted models below it: local-only is kept."""
    rng = np.random.default_rng(68)
    kept_local = kept_adapted = 0
    for _ in range(2_000):
        tasks = [f"t{i}" for i in range(int(rng.integers(1, 5)))]
        tuning = {k: {t: float(rng.uniform(0.5, 0.9)) for t in tasks} for k in (0, 20, 80)}
        local = {t: float(rng.uniform(0.5, 0.9)) for t in tasks}
        c = choose_steps(tuning, local_only=local)
        local_mean = float(np.mean([local[t] for t in c.tasks]))
        assert c.local_only_auroc == pytest.approx(local_mean)
        kept = local_mean if c.local_only else c.tuning_auroc[c.steps]
        assert kept >= local_mean
        kept_local += c.local_only
        kept_adapted += not c.local_only
    assert kept_local > 100 and kept_adapted > 100  # both outcomes were exercised
    # Within the tie of the best but below local-only: the tie does not keep it.
    c = choose_steps({0: {"a": 0.7490}, 20: {"a": 0.7505}}, local_only={"a": 0.7500})
    assert (c.steps, c.local_only) == (20, False)
    c = choose_steps({0: {"a": 0.70}, 20: {"a": 0.72}}, local_only={"a": 0.73})
    assert c.local_only and c.kept == "its local-only model" and c.steps == 20
    # A task local-only could not score is left out of every candidate's mean.
    c = choose_steps({0: {"a": 0.70, "b": 0.9}, 20: {"a": 0.72, "b": 0.5}}, local_only={"a": 0.71, "b": float("nan")})
    assert c.tasks == ["a"] and (c.steps, c.local_only) == (20, False)


def _release(setup: FederationSetup, out: Path, seed: int):
    gen = torch.Generator().manual_seed(seed)
    arrays = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).numpy()
        for k, v in init_model(setup).state_dict().items()
    }
    meta = ReleaseMeta(
        format="healthfm-model-release", version=1, run_id=str(seed), round=2, setup_sha256=setup.sha256,
        model_seed=setup.model_seed, modalities=setup.modalities, tokens=setup.tokens, groups=setup.groups,
        groups_trained=setup.groups, min_report_subjects=5,
    )  # fmt: skip
    write_release(out, arrays, setup, meta, "card", {})
    return load_release(out, trust_unsigned=True)


def _personal_meta() -> dict:
    return {"site": "city", "groups": GROUPS, "steps": 20, "tuning_auroc": {"0": 0.7, "20": 0.71},
            "tasks": ["t"], "lr": 3e-3, "batch_size": 16, "seed": 0}  # fmt: skip


def test_personal_weights_round_trip_on_their_release_only(setup: FederationSetup, tmp_path: Path) -> None:
    release = _release(setup, tmp_path / "model", seed=1)
    other = _release(setup, tmp_path / "other", seed=2)  # the same setup, another run's weights
    adapted = {k: v.numpy() + 1.0 for k, v in group_state_dict(release.model.state_dict(), GROUPS).items()}
    out = write_personal(tmp_path / "personal", adapted, release, _personal_meta())
    personal = load_personal(out, release)
    state = personal.model.state_dict()
    for k, v in release.model.state_dict().items():  # adapted groups replaced, the others the release's
        want = torch.from_numpy(adapted[k]) if k in adapted else v
        assert torch.equal(state[k], want.to(state[k].dtype)), k
    assert not personal.model.training
    meta = read_personal_meta(out)
    assert personal.weights_sha256 == personal_sha256(release.weights_sha256, meta.arrays_sha256)
    assert personal.weights_sha256 != release.weights_sha256  # a head on one is refused on the other
    key = next(iter(adapted))
    assert not torch.equal(release.model.state_dict()[key], personal.model.state_dict()[key])  # the release kept
    with pytest.raises(PersonalError, match="field base_weights_sha256 .* personalised from another release"):
        load_personal(out, other)
    with pytest.raises(PersonalError, match="already exists"):
        write_personal(out, adapted, release, _personal_meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other", "personal"]  # nothing half-written


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("weights", "field arrays_sha256 .* damaged or edited"),
        ("meta_field", r"personal.json: field steps"),
        ("extra_field", r"personal.json: field surprise"),
        ("format", r"field format/version is 'something-else'/1"),
        ("missing", r"personal.json: missing"),
    ],
)
def test_damaged_personal_weights_are_refused_naming_file_and_field(
    setup: FederationSetup, tmp_path: Path, damage: str, expected: str
) -> None:
    release = _release(setup, tmp_path / "model", seed=1)
    adapted = {k: v.numpy() for k, v in group_state_dict(release.model.state_dict(), GROUPS).items()}
    out = write_personal(tmp_path / "personal", adapted, release, _personal_meta())
    meta_file = out / "personal.json"
    doc = json.loads(meta_file.read_text())
    if damage == "weights":
        raw = bytearray((out / "weights.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (out / "weights.safetensors").write_bytes(bytes(raw))
    elif damage == "meta_field":
        meta_file.write_text(json.dumps({**doc, "steps": -3}))
    elif damage == "extra_field":
        meta_file.write_text(json.dumps({**doc, "surprise": 1}))
    elif damage == "format":
        meta_file.write_text(json.dumps({**doc, "format": "something-else"}))
    else:
        meta_file.unlink()
    with pytest.raises(PersonalError, match=expected):
        load_personal(out, release)


def test_arrays_that_do_not_fit_the_release_are_refused_before_anything_is_written(
    setup: FederationSetup, tmp_path: Path
) -> None:
    release = _release(setup, tmp_path / "model", seed=1)
    adapted = {k: v.numpy() for k, v in group_state_dict(release.model.state_dict(), GROUPS).items()}
    key = next(iter(adapted))
    with pytest.raises(PersonalError, match=f"key '{key}': shape"):
        write_personal(tmp_path / "p1", {**adapted, key: np.zeros((1, 2, 3), np.float32)}, release, _personal_meta())
    with pytest.raises(PersonalError, match="of an adapted group is missing"):
        write_personal(tmp_path / "p2", {k: v for k, v in adapted.items() if k != key}, release, _personal_meta())
    with pytest.raises(PersonalError, match="is not a key of the release's model"):
        write_personal(
            tmp_path / "p3", {**adapted, "backbone.extra": np.zeros(1, np.float32)}, release, _personal_meta()
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
