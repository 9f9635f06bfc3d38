"""The federation end to end: round 0, rounds, evaluation, checkpoint and resume.

Real Flower simulations (Ray, one SuperNode per site) on three tiny synthetic sites: a biobank
with every modality, a hospital without genomics, a genomics cohort without wearables. Three
simulations run (uninterrupted, stopped after round 1, resumed), ~30 s each on 2 cores; the
other tests exercise the site runtime and the server's checkpoints without Flower.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.narrowing import present
from helpers.run_configs import three_site_config

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.config import load_model_config
from healthfm_core.model.groups import GROUPS, parameter_group
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import (
    EvalConfig,
    FederationSetup,
    RoundConfig,
    SiteCapabilities,
    site_seed,
)
from healthfm_core.protocol.site_share import capped_weights
from healthfm_core.train.checkpoint import CheckpointError
from server.audit import audit_from_rounds, read_audit_log, verify_audit_log
from server.checkpoint import (
    ARRAYS_FILE,
    latest_server_checkpoint,
    load_server_checkpoint,
)
from server.config import DEFAULT_EVAL_MAX_SUBJECTS, FederationConfig
from server.runlog import read_events
from server.server_app import FederationServer
from simulations.run import run_federation_simulation
from simulations.synthetic import generate_federation

EXPECTED_GROUPS = {
    "biobank": ["ehr", "genomics", "shared", "wearables"],
    "hospital": ["ehr", "shared", "wearables"],
    "genomics": ["ehr", "genomics", "shared"],
}
POLICY = {"min-code-subjects": 5, "min-report-subjects": 2}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


@pytest.fixture(scope="module")
def node_configs(federation) -> list[dict]:
    return [{"site-root": str(s.root), "site-name": s.name, **POLICY} for s in federation.sites]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, node_configs) -> Path:
    out = tmp_path_factory.mktemp("full")
    run_federation_simulation(three_site_config(out), node_configs, num_cpus=2)
    return out


def round_events(out: Path) -> dict[int, dict]:
    return {e["round"]: e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"}


def test_each_site_receives_and_returns_only_its_groups(full_run: Path) -> None:
    rounds = round_events(full_run)
    assert sorted(rounds) == [1, 2]
    for rnd, event in rounds.items():
        assert set(event["sites"]) == set(EXPECTED_GROUPS)
        for site, entry in event["sites"].items():
            assert entry["status"] == "ok", (rnd, site, entry)
            assert entry["groups_sent"] == EXPECTED_GROUPS[site]
            assert set(entry["groups_received"]) <= set(EXPECTED_GROUPS[site])
            assert set(entry["num_examples"]) == set(entry["groups_received"])
            assert entry["bytes_sent"] > 0 and entry["bytes_received"] > 0
            assert entry["train_seconds"] > 0
        # Each group averaged over exactly the sites that hold it.
        assert event["contributors"]["genomics"] == ["biobank", "genomics"]
        assert set(event["contributors"]["wearables"]) <= {"biobank", "hospital"}
        assert event["contributors"]["shared"] == ["biobank", "genomics", "hospital"]
        assert event["rejected"] == []
        assert event["updated"] is True
        assert event["timings"]["round_seconds"] >= event["timings"]["local_train_seconds_max"] > 0
    # Curriculum: intra-modal only in round 1, cross-modal rising afterwards.
    assert rounds[1]["weights"]["align"] == 0.0 and rounds[2]["weights"]["align"] > 0.0


def test_round_zero_and_evaluation_are_logged(full_run: Path) -> None:
    events = read_events(full_run / "rounds.jsonl")
    assert [e["event"] for e in events] == ["setup", "round", "round", "evaluate"]
    setup = events[0]
    for site, groups in EXPECTED_GROUPS.items():
        assert sorted(setup["sites"][site]["groups"]) == groups
    assert setup["sites"]["hospital"]["subjects"]["genomics"] == 0
    evaluation = events[-1]
    assert evaluation["round"] == 2 and set(evaluation["sites"]) == set(EXPECTED_GROUPS)
    # The subject budget the sites were asked for, and each reported task's scored subjects.
    assert evaluation["max_subjects"] == DEFAULT_EVAL_MAX_SUBJECTS
    for flat in evaluation["sites"].values():
        assert flat["max-subjects"] == DEFAULT_EVAL_MAX_SUBJECTS
        for key in [k for k in flat if k.endswith(".n")]:
            assert 0 < flat[key[:-2] + ".subjects"] <= flat[key[:-2] + ".subjects-available"]
    # The genomics cohort has no wearables: it never reports a metric of the wearable task, only
    # the reason it has none.
    genomics = evaluation["sites"]["genomics"]
    assert not [k for k in genomics if k.startswith("wearable_") and k.endswith((".r2", ".auroc", ".n"))]
    assert any(k.startswith("wearable_") and ".withheld." in k for k in genomics)
    for key, value in evaluation["aggregated"].items():
        if key.endswith(".auroc"):
            task = key[: -len(".auroc")]
            reported = {s: m for s, m in evaluation["sites"].items() if key in m}
            # Each site's weight: its n, at most 2 x the others' median (the share cap).
            rows = {s: m[f"{task}.n"] for s, m in evaluation["sites"].items() if f"{task}.n" in m}
            weights = evaluation["share_cap"]["weights"][task]
            assert weights == pytest.approx(capped_weights(rows))
            n = sum(weights[s] for s in reported)
            assert value == pytest.approx(sum(m[key] * weights[s] for s, m in reported.items()) / n)
    summary = (full_run / "summary.md").read_text()
    assert "| 1 | 3/3 |" in summary and "| 2 | 3/3 |" in summary
    assert json.loads((full_run / "vocabulary.json").read_text())["codes"]


def test_each_site_is_opened_and_prepared_once_per_run(full_run: Path) -> None:
    # Two actors served three sites over round 0, two rounds and the evaluation: without the
    # run's shared cache each actor opened and prepared every site it met.
    loads = json.loads((full_run / "site_loads.json").read_text())
    assert loads == {site: {"site": 1, "sequences": 1} for site in EXPECTED_GROUPS}


def test_replies_are_averaged_into_the_global_model(full_run: Path) -> None:
    state = load_server_checkpoint(present(latest_server_checkpoint(full_run / "checkpoints")))
    assert state.round == 2
    initial = {k: v.numpy() for k, v in init_model(state.setup).state_dict().items()}
    changed = {g: False for g in GROUPS}
    for key, value in state.arrays.items():
        assert np.isfinite(value).all()
        changed[parameter_group(key)] |= not np.array_equal(value, initial[key])
    assert all(changed.values()), changed
    assert state.strategy and all(k.startswith(("m.", "v.", "norms.")) for k in state.strategy)
    # the groups' accepted update norms (bounded influence, server/influence.py): every group trained
    assert {k for k in state.strategy if k.startswith("norms.")} == {f"norms.{g}" for g in GROUPS}


@pytest.mark.slow  # two more Flower simulations (~2 min on a loaded machine); CI runs it (Makefile SLOW_CI)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, node_configs, full_run: Path) -> None:
    out = tmp_path / "resumed"
    run_federation_simulation(three_site_config(out, stop_after_round=1), node_configs, num_cpus=2)
    assert present(latest_server_checkpoint(out / "checkpoints")).name == "step-00000001"
    run_federation_simulation(three_site_config(out, resume=True), node_configs, num_cpus=2)
    resumed = load_server_checkpoint(present(latest_server_checkpoint(out / "checkpoints")))
    straight = load_server_checkpoint(present(latest_server_checkpoint(full_run / "checkpoints")))
    assert resumed.round == straight.round == 2
    assert resumed.setup.sha256 == straight.setup.sha256
    assert resumed.arrays.keys() == straight.arrays.keys()
    for key in straight.arrays:
        np.testing.assert_array_equal(resumed.arrays[key], straight.arrays[key], err_msg=key)
    for key in straight.strategy:
        np.testing.assert_array_equal(resumed.strategy[key], straight.strategy[key], err_msg=key)
    events = [e["event"] for e in read_events(out / "rounds.jsonl")]
    assert events == ["setup", "round", "resume", "round", "evaluate"]


# ------------------------------------------------------------------ without Flower


def test_resume_refuses_a_changed_config_and_a_fresh_run_an_used_directory(full_run: Path) -> None:
    with pytest.raises(ValueError, match="lr"):
        FederationServer(grid=None, cfg=three_site_config(full_run, resume=True, lr=1e-2)).run()  # type: ignore[arg-type]  # deliberately no grid
    with pytest.raises(FileExistsError, match="resume"):
        FederationServer(grid=None, cfg=three_site_config(full_run)).run()  # type: ignore[arg-type]  # deliberately no grid


def test_a_round_checkpointed_but_not_logged_is_logged_on_resume(full_run: Path, tmp_path: Path) -> None:
    """The server killed after round 2's checkpoint, before its rounds.jsonl line and audit
    records: resume writes them from the checkpoint, once, and the audit chain stays whole."""
    import shutil

    out = tmp_path / "killed"
    shutil.copytree(full_run, out)
    lines = (out / "rounds.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines) if json.loads(ln)["event"] == "round" and json.loads(ln)["round"] == 2)
    (out / "rounds.jsonl").write_text("".join(lines[:cut]))
    audit = (out / "audit.jsonl").read_bytes().splitlines(keepends=True)
    first = next(i for i, ln in enumerate(audit) if json.loads(ln).get("round") == 2)
    (out / "audit.jsonl").write_bytes(b"".join(audit[:first]))

    server = FederationServer(grid=None, cfg=three_site_config(out, resume=True))  # type: ignore[arg-type]  # deliberately no grid: resume reads only the out-dir
    state, path = server.initial_state()
    assert state is not None and path is not None and state.round == 2
    for _ in range(2):  # a second resume finds the round logged and writes nothing more
        server._recover_round_event(state, path)
    original = json.loads(lines[cut])
    recovered = round_events(out)[2]
    assert (
        recovered.pop("recovered") is True
        and [e["event"] for e in read_events(out / "rounds.jsonl")].count("round") == 2
    )
    assert Path(recovered["checkpoint"]).name == Path(original["checkpoint"]).name == "step-00000002"
    for key in ("sites", "losses", "contributors", "rejected", "epsilon", "weights", "bytes_received", "time"):
        assert recovered[key] == original[key], key
    verify_audit_log(out / "audit.jsonl")
    logged = [r for r in read_audit_log(out / "audit.jsonl") if r["record"] == "site-round"]
    implied = audit_from_rounds(out / "rounds.jsonl")
    assert [{k: r[k] for k in implied[0]} for r in logged] == implied
    assert {r["site"] for r in logged if r["round"] == 2} == set(EXPECTED_GROUPS)


def test_corrupted_server_checkpoint_is_refused(full_run: Path, tmp_path: Path) -> None:
    import shutil

    src = present(latest_server_checkpoint(full_run / "checkpoints"))
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    data = bytearray((copy / ARRAYS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / ARRAYS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=ARRAYS_FILE):
        load_server_checkpoint(copy)


@pytest.fixture(scope="module")
def runtimes(federation) -> dict[str, SiteRuntime]:
    return {
        s.name: SiteRuntime(SiteConfig.from_node_config({"site-root": str(s.root), "site-name": s.name, **POLICY}))
        for s in federation.sites
    }


@pytest.fixture(scope="module")
def setup(runtimes) -> FederationSetup:
    vocab = build_vocabulary([r.code_stats() for r in runtimes.values()], min_subjects=5)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=1)


def own_arrays(setup: FederationSetup, groups: list[str]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in groups}


def test_capabilities_carry_counts_only(runtimes) -> None:
    caps = runtimes["hospital"].capabilities()
    flat = caps.to_flat()
    assert set(flat) == {"site", "modalities", "subjects.ehr", "subjects.wearables", "subjects.genomics", "rows"}
    assert SiteCapabilities.from_flat(flat) == caps
    assert sorted(caps.groups) == EXPECTED_GROUPS["hospital"]


def test_site_refuses_a_group_it_does_not_hold(runtimes, setup) -> None:
    arrays = own_arrays(setup, ["shared", "ehr", "genomics"])
    cfg = RoundConfig(round=1, rounds=1, local_steps=1, lr=1e-3, batch_size=4, max_events=32, setup_sha256=setup.sha256)
    with pytest.raises(ValueError, match="genomics"):
        runtimes["hospital"].train(setup, arrays, cfg)


def test_site_training_is_deterministic_and_fp16_transport_halves_the_payload(runtimes, setup) -> None:
    site = runtimes["genomics"]
    arrays = own_arrays(setup, site.groups)
    cfg = RoundConfig(
        round=2, rounds=2, local_steps=2, lr=1e-3, batch_size=4, max_events=32, seed=5, setup_sha256=setup.sha256
    )
    first, second = site.train(setup, arrays, cfg), site.train(setup, arrays, cfg)
    assert first.arrays.keys() == second.arrays.keys()
    for k in first.arrays:
        np.testing.assert_array_equal(first.arrays[k], second.arrays[k])
    assert {parameter_group(k) for k in first.arrays} == {"shared", "ehr", "genomics"}
    assert first.group_examples["genomics"] > 0
    assert "align" not in first.losses  # no wearables here: no alignment loss reported
    half, _, _ = site.encode(first, arrays, cfg.model_copy(update={"transport": "fp16"}))
    assert all(v.dtype == np.float16 for v in half.arrays.values())
    assert sum(v.nbytes for v in half.arrays.values()) * 2 == sum(v.nbytes for v in first.arrays.values())
    np.testing.assert_allclose(
        half.arrays["backbone.final_norm.weight"].astype(np.float32),
        first.arrays["backbone.final_norm.weight"],
        rtol=1e-3,
    )
    assert site_seed(5, 2, "genomics") != site_seed(5, 3, "genomics") != site_seed(5, 2, "hospital")


def test_site_proximal_mu_zero_is_unchanged_and_positive_stays_near_the_global_model(federation, setup) -> None:
    # FedProx (issue 31): node / run config key proximal-mu; 0 trains bit for bit as without it.
    s = next(x for x in federation.sites if x.name == "genomics")

    def site(**extra: object) -> SiteRuntime:
        return SiteRuntime(
            SiteConfig.from_node_config({"site-root": str(s.root), "site-name": s.name, **POLICY, **extra})
        )

    plain, zero, prox = site(), site(**{"proximal-mu": 0.0}), site(**{"proximal-mu": 50.0})
    assert prox.config.proximal_mu == 50.0
    arrays = own_arrays(setup, plain.groups)
    cfg = RoundConfig(
        round=1, rounds=1, local_steps=3, lr=1e-2, batch_size=4, max_events=32, seed=5, setup_sha256=setup.sha256
    )
    a, b, c = plain.train(setup, arrays, cfg), zero.train(setup, arrays, cfg), prox.train(setup, arrays, cfg)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])

    def moved(reply) -> float:
        return float(sum(((reply.arrays[k] - arrays[k]) ** 2).sum() for k in reply.arrays) ** 0.5)

    assert moved(c) < moved(a)


def test_evaluation_withholds_metrics_below_the_site_minimum(federation, setup) -> None:
    site = federation.site("biobank")
    strict = SiteRuntime(SiteConfig(site_root=site.root, site_name="biobank", min_report_subjects=10_000))
    cfg = EvalConfig(
        round=1,
        tasks=["onset_hypertension_365d", "wearable_resting_hr"],
        setup_sha256=setup.sha256,
        n_boot=10,
    )
    evaluation = strict.evaluate(setup, own_arrays(setup, strict.groups), cfg)
    assert evaluation.withheld == 2 and evaluation.tasks == {}


def test_run_config_from_flower_and_hydra(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config(
        {
            "out-dir": str(tmp_path),
            "model": "tiny",
            "rounds": 4,
            "local-steps": 3,
            "transport": "fp16",
            "eval-tasks": "onset_t2d_365d, onset_cad_90d",
            "server-optimizer-lr": 0.02,
            "stop-after-round": 0,
        }
    )
    assert (cfg.rounds, cfg.local_steps, cfg.transport, cfg.stop_after_round) == (4, 3, "fp16", None)
    assert cfg.eval_tasks == ["onset_t2d_365d", "onset_cad_90d"] and present(cfg.server_optimizer).lr == 0.02
    with pytest.raises(ValueError, match="local_stepz"):
        FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "local-stepz": 3})
    with pytest.raises(ValueError, match="onset_nothing"):
        three_site_config(tmp_path, eval_tasks=["onset_nothing_30d"])

    from hydra import compose, initialize_config_dir

    from simulations.run import federation_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        hcfg = compose(
            "run",
            overrides=[
                "federation=fedadam",
                "federation.rounds=5",
                "model=tiny",
                f"out_dir={tmp_path}",
                "federation.transport=fp16",
            ],
        )
    fed = federation_config(hcfg, n_sites=3)
    assert (fed.rounds, fed.min_nodes, fed.transport, fed.model.name) == (5, 3, "fp16", "tiny")
    assert fed.server_optimizer is not None and fed.server_optimizer.lr == 0.01
    assert hcfg.federation.site.min_report_subjects == 20
