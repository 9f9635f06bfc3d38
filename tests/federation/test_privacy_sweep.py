"""The server asks for DP, and utility against epsilon.

One real sweep (simulations.privacy_sweep: two Flower simulations on three tiny synthetic sites,
tiny model, 2 rounds x 2 local steps, target epsilon 8 and no DP, then the per-site evaluation),
~60 s on 2 cores. Its epsilon-8 run is the server-side DP test: nothing but the server's request
makes the sites train under DP (their simulated policies hold a budget, DP not mandatory). The
other tests check the config plumbing and the table without Flower.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from client.policy import load_policy
from healthfm_core.eval import compare
from healthfm_core.privacy.ledger import PrivacyLedger
from healthfm_core.protocol import RoundConfig
from healthfm_core.terms.model_config import load_model_config
from server.config import FederationConfig, PrivacyRequest
from server.runlog import read_events
from server.server_app import FederationServer
from simulations import privacy_sweep
from simulations.run import federation_config, simulated_site_policy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SITES = ("biobank", "genomics", "hospital")
ROUNDS, LOCAL_STEPS, TARGET = 2, 2, 8.0


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


# ------------------------------------------------------------------------ config plumbing


def test_run_config_privacy_reaches_the_round_config(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config(
        {
            "out-dir": str(tmp_path),
            "model": "tiny",
            "privacy-target-epsilon": 3.0,
            "privacy-delta": 1e-6,
            "privacy-max-grad-norm": 0.5,
            "privacy-noise-multiplier": 0,  # 0: unset (a run config holds no null)
        }
    )
    assert cfg.privacy == PrivacyRequest(target_epsilon=3.0, delta=1e-6, max_grad_norm=0.5)
    flat = RoundConfig(
        round=1, rounds=2, local_steps=3, lr=1e-3, setup_sha256="x", **cfg.privacy.round_fields()
    ).to_flat()
    sent = RoundConfig.from_flat(flat)
    assert (sent.dp, sent.dp_target_epsilon, sent.dp_noise_multiplier, sent.dp_max_grad_norm) == (True, 3.0, None, 0.5)
    assert (
        RoundConfig.from_flat(
            RoundConfig(
                round=1, rounds=1, local_steps=1, lr=1e-3, setup_sha256="x", **PrivacyRequest().round_fields()
            ).to_flat()
        ).dp
        is False
    )
    with pytest.raises(ValueError, match="target_epsilon .*or noise_multiplier"):
        FederationConfig.from_run_config(
            {"out-dir": str(tmp_path), "model": "tiny", "privacy-target-epsilon": 3.0, "privacy-noise-multiplier": 1.1}
        )


def test_hydra_privacy_group_and_simulated_site_policy(tmp_path: Path) -> None:
    hcfg = compose_cfg("run", ["privacy=eps3", "privacy.delta=1e-6", f"out_dir={tmp_path}"])
    fed = federation_config(hcfg, n_sites=3)
    assert fed.privacy == PrivacyRequest(target_epsilon=3.0, delta=1e-6, max_grad_norm=1.0)
    policy = simulated_site_policy(hcfg, fed.privacy)
    path = tmp_path / "policy.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(policy)))
    loaded = load_policy(path)  # the site's own validation accepts it
    assert loaded.dp is not None and (loaded.dp.epsilon_cap, loaded.dp.delta, loaded.dp.mandatory) == (3.0, 1e-6, False)
    assert loaded.min_subjects == 1
    assert federation_config(compose_cfg("run", [f"out_dir={tmp_path}"]), 3).privacy.requested is False
    assert simulated_site_policy(compose_cfg("run", [f"out_dir={tmp_path}"]), PrivacyRequest()) is None
    noisy = compose_cfg("run", ["privacy.noise_multiplier=1.1", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="epsilon_cap"):
        simulated_site_policy(noisy, federation_config(noisy, 3).privacy)


def test_resume_accepts_an_older_checkpoint_but_not_a_changed_privacy_request(tmp_path: Path) -> None:
    cfg = FederationConfig(
        out_dir=tmp_path, model=load_model_config("tiny"), privacy=PrivacyRequest(target_epsilon=3.0)
    )
    server = FederationServer(None, cfg)  # type: ignore[arg-type]
    saved = cfg.model_dump(mode="json")
    server._check_resumable(saved)
    with pytest.raises(ValueError, match="privacy"):
        server._check_resumable({**saved, "privacy": PrivacyRequest(target_epsilon=8.0).model_dump(mode="json")})
    plain = FederationServer(None, cfg.model_copy(update={"privacy": PrivacyRequest()}))  # type: ignore[arg-type]
    plain._check_resumable({k: v for k, v in saved.items() if k != "privacy"})  # written before the field existed


def test_privacy_table_columns() -> None:
    rows = [
        compare.SummaryRow(method=m, horizon=h, auroc=a, ece=0.1, pairs=2, n=20)
        for m, h, a in (("eps=1", 30, 0.55), ("eps=1", 365, 0.6), ("no DP", 30, 0.7), ("no DP", 365, 0.75))
    ]
    table = compare.privacy_table(rows, {"eps=1": 1.0, "no DP": None}, {"eps=1": {"a": 0.98765, "b": 1.0}})
    lines = table.splitlines()
    assert lines[0] == "| target epsilon | AUROC / ECE 30 d | AUROC / ECE 365 d | spent at a | spent at b |"
    assert lines[2] == "| 1 | 0.550 / 0.100 | 0.600 / 0.100 | 0.988 | 1.000 |"
    assert lines[3] == "| none (no DP) | 0.700 / 0.100 | 0.750 / 0.100 | - | - |"


def test_epsilons_are_validated() -> None:
    assert privacy_sweep.parse_epsilons([1, "3", None]) == [1.0, 3.0, None]
    for bad in ([], [0], [-1], ["x"], [3, 3.0]):
        with pytest.raises(ValueError, match="epsilons"):
            privacy_sweep.parse_epsilons(bad)


def test_a_foreign_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileExistsError, match="not a previous privacy sweep"):
        privacy_sweep.prepare_out_dir(tmp_path)


# ------------------------------------------------------------------------ one real sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    cfg = compose_cfg(
        "privacy_sweep",
        [
            f"out_dir={out / 'run'}",
            f"data_dir={out / 'data'}",
            "scenario=tiny",
            "n_subjects=60",
            f"epsilons=[{TARGET},null]",
            f"federation.rounds={ROUNDS}",
            f"federation.local_steps={LOCAL_STEPS}",
            "federation.batch_size=8",
            "federation.max_events=32",
            "federation.max_patches=6",
            "federation.vocab_min_subjects=5",
            "federation.site.min_code_subjects=5",
            "federation.site.min_report_subjects=2",
            "federation.site.min_report_positives=1",
            "federation.eval_tasks=[onset_hypertension_365d]",
            "eval.n_boot=20",
            "eval.n_per_subject=4",
        ],
    )
    assert privacy_sweep.run(cfg) == out / "run" / "privacy.md"
    return out / "run"


def round_events(run: Path) -> dict[int, dict]:
    return {e["round"]: e for e in read_events(run / "rounds.jsonl") if e["event"] == "round"}


@pytest.mark.slow  # the sweep's four DP federations (~2 min); CI runs it (Makefile SLOW_CI)
def test_the_server_asks_for_dp_and_each_site_reports_its_spend(sweep: Path) -> None:
    run = sweep / "runs" / "eps-8"
    rounds = round_events(run)
    assert sorted(rounds) == [1, 2]
    previous = {s: 0.0 for s in SITES}
    for _, event in sorted(rounds.items()):
        assert event["privacy"]["target_epsilon"] == TARGET
        assert set(event["epsilon"]) == set(SITES)
        for site in SITES:
            entry = event["sites"][site]
            assert entry["status"] == "ok"
            eps = entry["dp"]["epsilon"]
            assert eps == event["epsilon"][site]
            assert previous[site] < eps <= TARGET + 1e-6  # cumulative: grows every round, never past the target
            previous[site] = eps
            assert entry["dp"]["delta"] == 1e-5 and entry["dp"]["noise_multiplier"] > 0
    for site in SITES:
        # The target is spent over the run's planned rounds x local steps: reached at the last round.
        assert previous[site] == pytest.approx(TARGET, abs=0.05)
        policy = load_policy(run / "sites" / site / "policy.yaml")
        assert policy.dp is not None and policy.dp.mandatory is False  # DP only because the server asked
        ledger = PrivacyLedger(run / "sites" / site / "state")
        assert ledger.steps == ROUNDS * LOCAL_STEPS
        assert [e.round for e in ledger.data.rounds] == [1, 2]
        assert ledger.epsilon(1e-5) == pytest.approx(previous[site], rel=1e-9)
    summary = (run / "summary.md").read_text()
    assert "## Privacy: each site's cumulative epsilon" in summary and "target epsilon 8" in summary
    # Without DP asked: no policy written, no DP at any site, no epsilon reported.
    plain = sweep / "runs" / "no-dp"
    # (a site's directory holds only its evaluation's predictions)
    assert not list(plain.glob("sites/*/policy.yaml")) and not list(plain.glob("sites/*/state"))
    for event in round_events(plain).values():
        assert event["epsilon"] == {} and all("dp" not in e for e in event["sites"].values())
    assert "## Privacy" not in (plain / "summary.md").read_text()


@pytest.mark.slow  # the sweep's four DP federations (~2 min); CI runs it (Makefile SLOW_CI)
def test_sweep_writes_table_and_plot_on_one_setup(sweep: Path) -> None:
    data = json.loads((sweep / "privacy_sweep.json").read_text())
    assert data["settings"] == {"eps=8": TARGET, "no DP": None}
    setups = {read_events(sweep / "runs" / d / "rounds.jsonl")[0]["setup_sha256"] for d in ("eps-8", "no-dp")}
    assert setups == {data["setup_sha256"]}  # same vocabulary and initialisation
    methods = {r["method"] for r in data["summary"]}
    assert methods == {"eps=8", "no DP"}, "no (site, task) pair was evaluated in both settings"
    for h in {r["horizon"] for r in data["summary"]}:  # like with like: the same pairs in both settings
        assert len({r["pairs"] for r in data["summary"] if r["horizon"] == h}) == 1
    report = (sweep / "privacy.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| target epsilon | AUROC"))
    assert header.endswith(" | ".join(f"spent at {s}" for s in SITES) + " |")
    spent = data["spent"]["eps=8"]
    row8 = next(line for line in report.splitlines() if line.startswith("| 8 |"))
    assert row8.endswith(" | ".join(f"{spent[s]:.3f}" for s in SITES) + " |")
    assert re.search(r"^\| none \(no DP\) \|.*\| - \| - \| - \|$", report, re.M)
    assert data["spent"]["no DP"] == {}
    blob = (sweep / "utility_vs_epsilon.png").read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert "](utility_vs_epsilon.png)" in report
