"""`coordinator head` in a deployed federation: a real SuperLink (TLS, SuperNode authentication,
nginx) and three SuperNodes started with `client.py join` on 127.0.0.1, each holding the release
and its `client.py embed` file in its node config. The head's own app bundle is approved at two
sites; the third approved only the pretraining's bundle and its app guard refuses the head's.
The heads written equal the one-process federated head on the two sites' rows; DP asked of sites
without a DP budget is refused at each site, and no head is written (slow: a two-round pretraining
run in this process, then the real processes)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.deploy_fixtures import CLIENT, SITES, Process, join_args, run_client, run_coordinator, site_policy

from client.client import main as client_main
from client.head_rows import load_head_rows
from healthfm_core.eval.federated_head import SiteSplits, fit_federated_logistic
from healthfm_core.eval.saved_head import load_head
from server.deploy.commands import main as coordinator_main
from server.deploy.provision import FederationPaths
from server.head_app import HeadRunConfig, fit_heads
from simulations.federated_head_run import head_node_configs

pytestmark = pytest.mark.slow

KEY = "onset_hypertension_365d"
UNAPPROVED = "genomics"  # approved the pretraining's bundle only
ROUNDS = 20
C_GRID = (0.1, 1.0)


@pytest.fixture(scope="module")
def released(
    released_run, federation: FederationPaths, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Path], Path, dict[str, Path]]:
    """The tiny scenario's sites, a two-round run's release (test_release_federation's run,
    released by this federation: signed with its key), and each site's embed file."""
    run_dir, nodes, _ = released_run
    model = tmp_path_factory.mktemp("release") / "model"
    assert coordinator_main(["release", str(federation.root), "--run", str(run_dir), "--out", str(model)]) == 0
    roots = {n["site-name"]: Path(n["site-root"]) for n in nodes.values()}
    assert set(roots) == set(SITES)
    tmp = tmp_path_factory.mktemp("embeddings")
    embs = {}
    for site, root in roots.items():
        embs[site] = tmp / f"emb-{site}.parquet"
        argv = ["embed", str(root), "--model", str(model), "--release-key", str(federation.site(site).release_key)]
        argv += ["--min-subjects", "2", "--min-positives", "1"]
        assert client_main([*argv, "--no-progress", "--out", str(embs[site])]) == 0
    return roots, model, embs


def approve_head_bundle(federation: FederationPaths, policy: Path) -> str:
    """`coordinator bundle --head`, then `client.py approve` into `policy`; its sha256."""
    built = run_coordinator("bundle", str(federation.root), "--head", timeout=300)
    assert built.returncode == 0, built.stderr
    bundle = next(ln.split(" ", 2)[2] for ln in built.stdout.splitlines() if ln.startswith("app bundle "))
    digest = next(ln.split()[1] for ln in built.stdout.splitlines() if ln.startswith("sha256 "))
    assert "healthfm-task-head" in Path(bundle).name
    approved = run_client("approve", bundle, "--policy", str(policy), timeout=300)
    assert approved.returncode == 0, approved.stderr
    assert digest in approved.stdout and "clientapp  client.head_app:app" in approved.stdout
    assert "serverapp  server.head_app:app" in approved.stdout
    return digest


def test_the_coordinators_head_over_real_supernodes_is_the_one_process_head(
    released, superlink: str, federation: FederationPaths, tmp_path: Path
) -> None:
    roots, model, embs = released
    policy = site_policy(federation)  # the superlink fixture approved the pretraining's bundle in it
    pretrain_only = tmp_path / "pretrain-only-policy.yaml"
    shutil.copy(policy, pretrain_only)
    digest = approve_head_bundle(federation, policy)
    assert digest not in pretrain_only.read_text()
    procs: dict[str, Process] = {}
    try:
        for site in SITES:
            args = join_args(
                federation, roots[site], site, superlink, tmp_path / f"state-{site}",
                policy=pretrain_only if site == UNAPPROVED else policy,
            )  # fmt: skip
            args += ["--node-config", f"model={model}", "--node-config", f"embeddings={embs[site]}"]
            args += ["--release-key", str(federation.site(site).release_key)]
            args += ["--node-config", "min-report-positives=1"]
            procs[site] = Process([sys.executable, str(CLIENT), *args], tmp_path / f"join-{site}.out")
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        out = tmp_path / "heads"
        result = run_coordinator(
            "head", str(federation.root), "--model", str(model), "--keys", KEY, "--rounds", str(ROUNDS),
            "--c-grid", *map(str, C_GRID),
            "--stage-timeout", "300", "--out", str(out), timeout=1800,
        )  # fmt: skip
        # DP asked of sites whose policy holds no DP budget: each refuses its first round, no head.
        dp_out = tmp_path / "dp-heads"
        dp = run_coordinator(
            "head", str(federation.root), "--model", str(model), "--keys", KEY, "--rounds", "1", "--c-grid", "1",
            "--dp-noise-multiplier", "1.0", "--stage-timeout", "300", "--out", str(dp_out), timeout=1800,
        )  # fmt: skip
    finally:
        for proc in procs.values():
            proc.stop()
    # The head was fitted by the two approving sites; the third's app guard refused the bundle: exit 4.
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"head app bundle sha256 {digest}" in result.stdout
    assert f"{UNAPPROVED} took no part: error at query.head_stats: refused by site {UNAPPROVED}" in result.stderr
    summary = json.loads((out / "heads.json").read_text())
    fitted = summary["heads"][KEY]
    assert set(fitted["errors"]) == {UNAPPROVED}
    assert f"app bundle sha256 {digest} is not in the approved_apps" in fitted["errors"][UNAPPROVED]["error"]
    # The one-process head on the approving sites' rows (the same embed files).
    approving = [s for s in SITES if s != UNAPPROVED]
    splits = {}
    key = federation.release_public_key
    for node in head_node_configs(
        model, [roots[s] for s in approving], 2, [embs[s] for s in approving], 1, release_key=key
    ):
        rows = load_head_rows(node, [])
        if isinstance(got := rows.keys.get(KEY), SiteSplits):
            splits[rows.site] = got
    assert splits and fitted["train_rows"] == {s: len(v.y_train) for s, v in splits.items()}
    expected, _ = fit_federated_logistic(splits, C_GRID, ROUNDS)
    head = load_head(fitted["head"])
    assert head.meta.regularisation == expected.c
    np.testing.assert_allclose(head.probe.weight, expected.weight, rtol=0, atol=1e-9)
    assert head.probe.bias == pytest.approx(expected.bias, abs=1e-9)
    rounds = [json.loads(ln) for ln in (out / "head_rounds.jsonl").read_text().splitlines()]
    assert rounds and all(set(r["sites"]) == set(splits) for r in rounds)
    assert "federated head: C=" in (out / "head.log").read_text()
    assert dp.returncode == 1, dp.stdout + dp.stderr
    dp_summary = json.loads((dp_out / "heads.json").read_text())
    assert dp_summary["privacy"]["noise_multiplier"] == 1.0 and "head" not in dp_summary["heads"][KEY]
    refused = dp_summary["heads"][KEY]["refused"]
    assert set(refused) == set(splits) and all(r["stage"] == "train.head" for r in refused.values())
    assert all(r["refused"].startswith("DP refused: ") for r in refused.values()), refused
    assert not (dp_out / "heads").exists()
    # A site applies the saved head with `client.py predict --head`.
    site = approving[0]
    pq.write_table(pq.read_table(embs[site]).select(["subject_id", "prediction_time"]).slice(0, 5), tmp_path / "rows.parquet")  # fmt: skip
    argv = ["predict", str(roots[site]), "--model", str(model), "--release-key", str(federation.site(site).release_key)]
    argv += ["--min-subjects", "2", "--min-positives", "1"]
    argv += ["--no-progress", "--head", fitted["head"], "--prediction-times", str(tmp_path / "rows.parquet")]
    assert client_main([*argv, "--out", str(tmp_path / "pred.parquet")]) == 0
    assert pq.read_table(tmp_path / "pred.parquet").num_rows == 5


def test_the_head_server_app_refuses_a_release_that_changed_since_the_launch(
    released, federation: FederationPaths, tmp_path: Path
) -> None:
    """The run config carries the setup hash `coordinator head` read; a ServerApp that loads
    another release from that folder stops before any message, naming both."""
    _, model, _ = released
    key = federation.release_public_key
    cfg = HeadRunConfig(model=model, out_dir=tmp_path, setup_sha256="0" * 64, release_key=key)
    with pytest.raises(
        ValueError, match=r"has setup [0-9a-f]{12}\.\.\., the run config's setup-sha256 is 000000000000"
    ):
        fit_heads(None, cfg)  # type: ignore[arg-type]  # refused before the grid is used
