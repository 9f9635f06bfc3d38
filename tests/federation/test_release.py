"""Model releases (healthfm_core/release.py, server/release.py, server/model_card.py) and their use
at a site (client/model_use.py, `client.py embed | probe | predict`).

The fast tests release a run directory written here (a real server checkpoint of trained-looking
weights, a rounds.jsonl of the run's events and an evaluation.json) over the tiny scenario's sites;
tests/federation/test_release_federation.py (slow) runs a real federation end to end.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from client.client import build_parser
from client.client import main as client_main
from client.head_rows import load_head_rows
from client.model_use import (
    PREDICTION_TIMES_SCHEMA,
    embed_rows_at_site,
    eval_config,
    open_site_runtime,
    task_rows,
    zero_shot_at_site,
)
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.batch import N_SPECIAL_CODES
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.eval.metrics import auroc
from healthfm_core.eval.probes import fit_logistic_probe
from healthfm_core.eval.saved_head import HeadError, load_head, save_head
from healthfm_core.model.healthfm import init_model
from healthfm_core.personal_weights import load_personal, read_personal_meta
from healthfm_core.protocol import FederationSetup
from healthfm_core.release import ReleaseError, load_release
from healthfm_core.release_binding import ExpectedRun
from healthfm_core.release_fit import SiteDoesNotFit, release_fit, require_fit
from healthfm_core.release_signing import load_public_key, load_signing_key, make_signing_key, sign_folder
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.train.checkpoint import sha256_file
from server.checkpoint import ServerState, save_server_checkpoint
from server.config import FederationConfig
from server.deploy.commands import main as coordinator_main
from server.head_app import HeadRunConfig, fit_heads
from simulations.synthetic import generate_federation

ROOT = Path(__file__).resolve().parents[2]
MIN = {"min-code-subjects": 5, "min-report-subjects": 2}
US_PER_DAY = 86_400_000_000


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


@pytest.fixture(scope="module")
def setup(federation) -> FederationSetup:
    stats = [
        SiteRuntime(SiteConfig.from_node_config({"site-root": str(s.root), "site-name": s.name, **MIN})).code_stats()
        for s in federation.sites
    ]
    return FederationSetup(vocabulary=build_vocabulary(stats, min_subjects=5), model=load_model_config("tiny"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, setup: FederationSetup) -> Path:
    """A run directory as the ServerApp leaves one: checkpoint of round 2, events, evaluation."""
    return _write_run(tmp_path_factory.mktemp("run"), setup, seed=3, run_id=7)


def _write_run(out: Path, setup: FederationSetup, seed: int, run_id: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    arrays = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v).numpy()
        for k, v in init_model(setup).state_dict().items()
    }
    cfg = FederationConfig(
        out_dir=out, model=setup.model, rounds=2, vocab_min_subjects=5, eval_tasks=["onset_hypertension_365d"]
    )
    save_server_checkpoint(
        out / "checkpoints",
        ServerState(round=2, arrays=arrays, strategy={}, setup=setup, run_config=cfg.model_dump(mode="json")),
    )
    subjects = {
        "biobank": {"ehr": 30, "wearables": 24, "genomics": 30},
        "hospital": {"ehr": 30, "wearables": 3, "genomics": 0},  # 3 < the minimum 5: not shown
    }
    events = [
        {
            "event": "setup",
            "round": 0,
            "run_id": run_id,
            "setup_sha256": setup.sha256,
            "sites": {s: {"modalities": [m for m, n in c.items() if n], "subjects": c} for s, c in subjects.items()},
        },
        *[
            {
                "event": "round",
                "round": r,
                "sites": {
                    "biobank": {"status": "ok", "num_examples": {"shared": 8, "ehr": 8, "wearables": 6, "genomics": 8}},
                    "hospital": {"status": "ok", "num_examples": {"shared": 8, "ehr": 8}},
                },
                "contributors": {"shared": ["biobank", "hospital"], "ehr": ["biobank", "hospital"], "genomics": []},
                "epsilon": {"biobank": 0.5 * r},
            }
            for r in (1, 2)
        ],
    ]
    (out / "rounds.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    evaluation = {
        "round": 2,
        "sites": {
            "biobank": {
                "onset_hypertension_365d.auroc": 0.8125,
                "onset_hypertension_365d.auprc": 0.5,
                "onset_hypertension_365d.ece": 0.125,
                "onset_hypertension_365d.n": 12,
                "onset_hypertension_365d.auroc-low": 0.625,
                "onset_hypertension_365d.auroc-high": 0.9375,
                "num-examples": 90,
                "withheld": 0,
            }
        },
        "aggregated": {"onset_hypertension_365d.auroc": 0.8125, "onset_hypertension_365d.n": 12.0},
        "tasks": ["onset_hypertension_365d"],
        "asked_sites": ["biobank", "hospital"],
        "max_subjects": 0,
    }
    (out / "evaluation.json").write_text(json.dumps(evaluation))
    return out


@pytest.fixture(scope="module")
def fed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned federation: its release signing key, and the public key each site holds."""
    fed = tmp_path_factory.mktemp("federation")
    assert coordinator_main(["provision", str(fed), "--site", "biobank"]) == 0
    return fed


@pytest.fixture(scope="module")
def release_key(fed_dir: Path) -> Path:
    """The federation's public release key from the biobank's startup files."""
    return fed_dir / "sites" / "biobank" / "release_signing.pem"


@pytest.fixture(scope="module")
def release_dir(run_dir: Path, fed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "model"
    assert coordinator_main(["release", str(fed_dir), "--run", str(run_dir), "--out", str(out)]) == 0
    return out


def _copy(release_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(release_dir, dest)
    return dest


def _resum(path: Path, sign_with: Path | None = None) -> None:
    """Recompute SHA256SUMS, as someone editing a file and its hash would; with `sign_with` (a
    private key file) also sign the folder again, as a coordinator releasing that folder would."""
    lines = (path / "SHA256SUMS").read_text().splitlines()
    names = [ln.split("  ", 1)[1] for ln in lines]
    (path / "SHA256SUMS").write_text("".join(f"{sha256_file(path / n)}  {n}\n" for n in names))
    if sign_with is not None:
        sign_folder(path, [*names, "SHA256SUMS"], load_signing_key(sign_with))


# ---------------------------------------------------------------------------- the release


def test_release_holds_the_checkpoint_weights_and_loads_in_a_fresh_process_with_only_healthfm_core(
    release_dir: Path, run_dir: Path, release_key: Path
) -> None:
    files = sorted(p.name for p in release_dir.iterdir())
    assert files == sorted(
        [
            "release.json",
            "model_config.json",
            "vocabulary.json",
            "weights.safetensors",
            "MODEL_CARD.md",
            "model_card.json",
            "SHA256SUMS",
            "SIGNATURE.json",
        ]
    )
    # sha256sum's own format: the tool a site admin has verifies it.
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=release_dir, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    code = (
        "import json, sys, hashlib\n"
        "from healthfm_core.release import load_release\n"
        f"r = load_release({str(release_dir)!r}, trusted_keys=[{str(release_key)!r}])\n"
        "state = r.model.state_dict()\n"
        "digest = hashlib.sha256(b''.join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()\n"
        "print(json.dumps({'leaked': [m for m in ('flwr', 'server', 'client', 'ray') if m in sys.modules],"
        " 'training': r.model.training, 'round': r.meta.round, 'setup': r.setup.sha256, 'digest': digest,"
        " 'trained': r.meta.groups_trained}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["leaked"] == [] and got["training"] is False and got["round"] == 2
    assert got["trained"] == ["shared", "ehr"]  # the groups some site contributed to
    # Bit for bit the checkpoint's arrays, independently read from the checkpoint.
    arrays = load_file(str(next((run_dir / "checkpoints").iterdir()) / "arrays.safetensors"))
    expect = hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()
    assert got["digest"] == expect
    meta = json.loads((release_dir / "release.json").read_text())
    assert got["setup"] == meta["setup_sha256"]
    # release.json names the run and the exact weights.
    assert meta["run_id"] == "7" and meta["weights_sha256"] == sha256_file(release_dir / "weights.safetensors")


def test_release_refuses_a_run_without_checkpoint_and_an_existing_out(
    tmp_path: Path, release_dir: Path, run_dir: Path, capsys: pytest.CaptureFixture[str], fed_dir: Path
) -> None:
    (tmp_path / "empty").mkdir()
    assert coordinator_main(["release", str(fed_dir), "--run", str(tmp_path / "empty"), "--out", "x"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert coordinator_main(["release", str(tmp_path), "--run", str(tmp_path / "nope"), "--out", "x"]) == 2
    before = sha256_file(release_dir / "SHA256SUMS")
    assert coordinator_main(["release", str(fed_dir), "--run", str(run_dir), "--out", str(release_dir)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sha256_file(release_dir / "SHA256SUMS") == before and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        ("flip_weights", ["weights.safetensors", "sha256"]),
        ("edit_config", ["model_config.json", "sha256"]),
        ("missing_file", ["vocabulary.json", "missing"]),
        ("wrong_vocabulary_size", ["vocabulary.json", "field codes", "vocab_size"]),
        ("other_seed", ["release.json", "field setup_sha256"]),
        ("bad_field", ["release.json", "field round"]),
        ("extra_file", ["notes.txt", "SHA256SUMS"]),
        # issue 40: a second "groups_trained" would silently replace the first (sums rewritten)
        ("duplicate_key", ["release.json", "field groups_trained", "duplicated key"]),
    ],
)
def test_a_damaged_or_mismatched_release_is_refused_naming_file_and_field(
    release_dir: Path, tmp_path: Path, damage: str, names: list[str], fed_dir: Path, release_key: Path
) -> None:
    """Damage the signature cannot see (a folder signed again after the edit, as a coordinator
    releasing a broken folder would) is still refused by name."""
    signing_key = fed_dir / "server" / "release_signing.key"
    path = _copy(release_dir, tmp_path)
    if damage == "flip_weights":
        data = bytearray((path / "weights.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "edit_config":
        cfg = json.loads((path / "model_config.json").read_text())
        cfg["n_layers"] = 3
        (path / "model_config.json").write_text(json.dumps(cfg))
    elif damage == "missing_file":
        (path / "vocabulary.json").unlink()
    elif damage == "wrong_vocabulary_size":
        vocab = json.loads((path / "vocabulary.json").read_text())
        for key in ("codes", "code_subjects", "code_events"):
            vocab[key] = vocab[key][:-1]
        vocab["numeric"].pop(json.loads((release_dir / "vocabulary.json").read_text())["codes"][-1], None)
        (path / "vocabulary.json").write_text(json.dumps(vocab))
        _resum(path, signing_key)
    elif damage == "other_seed":
        meta = json.loads((path / "release.json").read_text())
        meta["model_seed"] = 99
        (path / "release.json").write_text(json.dumps(meta))
        _resum(path, signing_key)
    elif damage == "bad_field":
        meta = json.loads((path / "release.json").read_text())
        meta["round"] = -1
        (path / "release.json").write_text(json.dumps(meta))
        _resum(path, signing_key)
    elif damage == "extra_file":
        (path / "notes.txt").write_text("hi")
    elif damage == "duplicate_key":
        text = (path / "release.json").read_text().rstrip().removesuffix("}")
        (path / "release.json").write_text(text + ', "groups_trained": ["shared", "ehr", "wearables", "genomics"]}')
        _resum(path, signing_key)
    with pytest.raises(ReleaseError) as info:
        load_release(path, trusted_keys=[release_key])
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


# ---------------------------------------------------------------------------- signed releases


@pytest.fixture(scope="module")
def other_release(setup: FederationSetup, fed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Release B: another run (run 8, other weights) of the same federation and setup."""
    run = _write_run(tmp_path_factory.mktemp("run8"), setup, seed=4, run_id=8)
    out = tmp_path_factory.mktemp("relB") / "model"
    assert coordinator_main(["release", str(fed_dir), "--run", str(run), "--out", str(out)]) == 0
    return out


SIGNED = "not the file the federation signed"


@pytest.mark.parametrize(
    ("attack", "names"),
    [
        ("swap_weights", ["weights.safetensors", SIGNED]),
        ("edit_card", ["MODEL_CARD.md", SIGNED]),
        ("edit_release_json", ["release.json", SIGNED]),
        ("edit_signed_list", ["SIGNATURE.json", "field signature does not verify"]),
        ("sign_with_own_key", ["SIGNATURE.json", "field key_sha256", "not by the federation's key"]),
        ("unsigned", ["SIGNATURE.json", "missing", "unsigned", "--trust-unsigned"]),
    ],
)
def test_an_edited_release_with_its_sums_rewritten_is_refused_naming_the_file(
    release_dir: Path,
    other_release: Path,
    release_key: Path,
    biobank: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    attack: str,
    names: list[str],
) -> None:
    """Issue 40, break 6: weights of another run of the same federation with their SHA256SUMS line
    rewritten, an edited model card or release.json with its sum rewritten, a forged or missing
    signature: refused by load_release and by embed, probe and predict (exit 2), naming the file."""
    path = _copy(release_dir, tmp_path)
    if attack in ("swap_weights", "edit_signed_list", "sign_with_own_key"):
        shutil.copyfile(other_release / "weights.safetensors", path / "weights.safetensors")
        meta = json.loads((path / "release.json").read_text())
        meta["weights_sha256"] = sha256_file(path / "weights.safetensors")
        (path / "release.json").write_text(json.dumps(meta))
        _resum(path)
    if attack == "edit_card":
        with open(path / "MODEL_CARD.md", "a") as fh:
            fh.write("\nHeld-out AUROC 0.99 at every site.\n")
        _resum(path)
    elif attack == "edit_release_json":
        meta = json.loads((path / "release.json").read_text())
        meta["run_id"] = "8"
        (path / "release.json").write_text(json.dumps(meta))
        _resum(path)
    elif attack == "edit_signed_list":  # the signed list made to match the swap, the signature kept
        sig = json.loads((path / "SIGNATURE.json").read_text())
        for name in ("weights.safetensors", "release.json", "SHA256SUMS"):
            sig["signed"]["files"][name] = sha256_file(path / name)
        (path / "SIGNATURE.json").write_text(json.dumps(sig))
    elif attack == "sign_with_own_key":  # a key shipped with a release would authenticate nothing
        private, _ = make_signing_key()
        (tmp_path / "own.key").write_bytes(private)
        _resum(path, tmp_path / "own.key")
    elif attack == "unsigned":
        (path / "SIGNATURE.json").unlink()
    with pytest.raises(ReleaseError) as info:
        load_release(path, trusted_keys=[release_key])
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    times = tmp_path / "times.parquet"
    pq.write_table(pa.table({"subject_id": pa.array([1], pa.int64()), "prediction_time": pa.array([0], pa.timestamp("us"))}), times)  # fmt: skip
    use = ["--model", str(path), "--release-key", str(release_key), "--no-progress"]
    for argv in (
        ["embed", str(biobank), *use, "--prediction-times", str(times), "--out", str(tmp_path / "e.parquet")],
        ["probe", str(biobank), *use, "--out", str(tmp_path / "probe")],
        ["predict", str(biobank), *use, "--head", str(tmp_path / "h.json"), "--prediction-times", str(times)]
        + ["--out", str(tmp_path / "p.parquet")],
    ):
        assert client_main(argv) == 2
        err = capsys.readouterr().err
        for name in names:
            assert name in err, err
    assert not any((tmp_path / n).exists() for n in ("e.parquet", "probe", "p.parquet"))


def _times(biobank: Path, tmp_path: Path, n: int = 2) -> Path:
    """The biobank's first `n` subjects at time 0: a --prediction-times file."""
    times = tmp_path / "times.parquet"
    sid = pq.read_table(biobank / "metadata" / "subject_splits.parquet")["subject_id"].to_numpy()[:n]
    pq.write_table(pa.table({"subject_id": pa.array(sid, pa.int64()), "prediction_time": pa.array([0] * n, pa.timestamp("us"))}), times)  # fmt: skip
    return times


def test_a_release_without_a_key_to_verify_is_refused_and_trust_unsigned_loads_it_with_a_warning(
    release_dir: Path,
    run_dir: Path,
    biobank: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No key, no load; a local simulation's release (`release --unsigned`, no federation) loads
    only with trust_unsigned / --trust-unsigned, and says so."""
    with pytest.raises(ReleaseError, match="no public key to verify the release against"):
        load_release(release_dir)
    assert client_main(["embed", str(biobank), "--model", str(release_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--release-key" in capsys.readouterr().err
    # A folder without a provisioned federation: refused unless --unsigned.
    assert coordinator_main(["release", str(tmp_path), "--run", str(run_dir), "--out", str(tmp_path / "m")]) == 2
    assert "release_signing.key" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert coordinator_main(["release", str(tmp_path), "--run", str(run_dir), "--out", str(tmp_path / "m"), "--unsigned"]) == 0  # fmt: skip
    assert "WARNING: --unsigned" in capsys.readouterr().err
    assert not (tmp_path / "m" / "SIGNATURE.json").exists()
    with caplog.at_level("WARNING", logger="healthfm.release"):
        release = load_release(tmp_path / "m", trust_unsigned=True)
    assert release.meta.run_id == "7" and "WITHOUT verifying its signature" in caplog.text
    times = _times(biobank, tmp_path, 1)
    argv = ["embed", str(biobank), "--model", str(tmp_path / "m"), "--min-subjects", "2", "--no-progress"]
    argv += ["--prediction-times", str(times), "--out", str(tmp_path / "e.parquet")]
    assert client_main(argv) == 2  # unsigned, no key: refused
    assert client_main([*argv, "--trust-unsigned"]) == 0
    assert "WARNING: --trust-unsigned" in capsys.readouterr().err


def test_a_head_probed_on_one_release_is_refused_on_another_runs_release(
    release_dir: Path,
    other_release: Path,
    release_key: Path,
    biobank: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 40, break 6: release A and B of two runs of one federation share the setup hash; a head
    fitted on A's embeddings records A's weights and is refused on B, naming the head file."""
    a = load_release(release_dir, trusted_keys=[release_key])
    b = load_release(other_release, trusted_keys=[release_key])
    assert a.setup.sha256 == b.setup.sha256 and a.weights_sha256 != b.weights_sha256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, a.setup.embedding_width))
    y = x[:, 0] > 0
    probe = fit_logistic_probe(x[:40], y[:40], x[40:], y[40:])
    head = save_head(tmp_path / "t.json", "t", probe, a.setup.sha256, 64, 8, a.weights_sha256)
    times = _times(biobank, tmp_path)
    argv = ["predict", str(biobank), "--release-key", str(release_key), "--min-subjects", "2", "--no-progress"]
    argv += ["--head", str(head), "--prediction-times", str(times)]
    assert client_main([*argv, "--model", str(other_release), "--out", str(tmp_path / "b.parquet")]) == 2
    err = capsys.readouterr().err
    assert str(head) in err and "field weights_sha256" in err and not (tmp_path / "b.parquet").exists()
    assert client_main([*argv, "--model", str(release_dir), "--out", str(tmp_path / "a.parquet")]) == 0
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 2


def test_a_validly_signed_release_of_another_run_is_refused_where_a_site_expects_its_run(
    release_dir: Path,
    other_release: Path,
    release_key: Path,
    biobank: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 67, break 7: another run's validly signed release loaded; nothing bound a release to
    the run a site expects. Release B (run 8) is signed by the same federation key as release A
    (run 7), with the same setup. A site that names run 7 (`--expect-run`, or its policy's
    `expected_release`) refuses B by name, before any row is embedded; A still loads. A site that
    names nothing is told which run it loaded."""
    argv = ["embed", str(biobank), "--release-key", str(release_key), "--min-subjects", "2", "--no-progress"]
    argv += ["--prediction-times", str(_times(biobank, tmp_path))]
    out = tmp_path / "e.parquet"
    assert client_main([*argv, "--model", str(other_release), "--expect-run", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the release is run 8 (round 2" in err and "this site expects run 7" in err and not out.exists(), err
    # The policy says it as well; a policy's run id may be written as the number it is.
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\nexpected_release:\n  run_id: 7\n")
    assert client_main([*argv, "--model", str(other_release), "--policy", str(policy), "--out", str(out)]) == 2
    assert "this site expects run 7" in capsys.readouterr().err and not out.exists()
    # Run 7's own release loads under both, with no warning.
    assert client_main([*argv, "--model", str(release_dir), "--policy", str(policy), "--expect-run", "7", "--out", str(out)]) == 0  # fmt: skip
    assert "WARNING" not in capsys.readouterr().err and pq.read_table(out).num_rows == 2
    # Each expectation named must hold: the policy's run 7 refuses B even when --expect-run names 8.
    assert client_main([*argv, "--model", str(other_release), "--policy", str(policy), "--expect-run", "8", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "this site expects run 7" in capsys.readouterr().err
    # By setup: A and B share it (same federation setup), another setup refuses both.
    with pytest.raises(ReleaseError, match=r"release.json: the release is run 7 .* this site expects setup 0{64}"):
        load_release(release_dir, trusted_keys=[release_key], expect=[ExpectedRun(setup_sha256="0" * 64)])
    setup_a = load_release(release_dir, trusted_keys=[release_key]).setup.sha256
    assert load_release(other_release, trusted_keys=[release_key], expect=[ExpectedRun(setup_sha256=setup_a)])
    assert client_main([*argv, "--model", str(release_dir), "--expect-setup", "abc", "--out", str(out)]) == 2
    assert "a setup sha256 is 64 lowercase hex characters" in capsys.readouterr().err
    # Nothing named: B loads, and the site is told which run it is.
    assert client_main([*argv, "--model", str(other_release), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: the release" in err and "is run 8 (round 2, setup" in err and "names no expected run" in err


def test_the_task_heads_clientapp_refuses_a_release_of_another_run_than_its_policy_expects(
    release_dir: Path, other_release: Path, release_key: Path, biobank: Path, tmp_path: Path
) -> None:
    """The task head's ClientApp (client/head_rows.py) loads the release its node config names,
    checked against the site policy's expected_release before anything is embedded."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\nexpected_release:\n  run_id: '7'\n")
    config = {"site-root": str(biobank), "site-name": "biobank", **MIN, "policy": str(policy)}
    config |= {"release-key": str(release_key), "state-dir": str(tmp_path / "state")}
    with pytest.raises(ReleaseError, match=r"the release is run 8 .* this site expects run 7"):
        load_head_rows({**config, "model": str(other_release)}, ["onset_hypertension_365d"])
    rows = load_head_rows({**config, "model": str(release_dir)}, ["onset_hypertension_365d"])
    assert rows.setup_sha256 == load_release(release_dir, trusted_keys=[release_key]).setup.sha256


def test_the_head_server_app_verifies_the_release_and_refuses_other_weights_than_launched(
    release_dir: Path, other_release: Path, release_key: Path, tmp_path: Path
) -> None:
    """`coordinator head` passes the release key and the weights' sha256 it read in the run config;
    the ServerApp refuses an unsigned folder and one whose weights changed since (another run's
    release of the same setup in that folder), before any message."""
    weights = load_release(release_dir, trusted_keys=[release_key]).weights_sha256
    cfg = HeadRunConfig(model=other_release, out_dir=tmp_path, weights_sha256=weights, release_key=release_key)
    assert HeadRunConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ValueError, match=r"has weights [0-9a-f]{12}\.\.\., the run config's weights-sha256 is"):
        fit_heads(None, cfg)  # type: ignore[arg-type]  # refused before the grid is used
    with pytest.raises(ReleaseError, match="no public key to verify the release against"):
        fit_heads(None, cfg.model_copy(update={"release_key": None}))  # type: ignore[arg-type]


def test_provision_makes_the_release_key_and_a_rotation_keeps_the_old_public_key(
    fed_dir: Path, release_dir: Path, tmp_path: Path
) -> None:
    """The private key stays with the coordinator (0600), each site's startup files hold the public
    key; after `provision --new-release-key` a release signed before is refused with the new key
    alone and verifies with the retired one beside it."""
    key = fed_dir / "server" / "release_signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    site_pem = fed_dir / "sites" / "biobank" / "release_signing.pem"
    assert site_pem.read_bytes() == (fed_dir / "server" / "release_signing.pem").read_bytes()
    manifest = json.loads((fed_dir / "federation.json").read_text())
    assert manifest["release_key_sha256"] == load_public_key(site_pem).sha256
    fed = tmp_path / "fed"
    shutil.copytree(fed_dir, fed)
    assert coordinator_main(["provision", str(fed)]) == 0  # again: the key is kept
    assert (fed / "server" / "release_signing.key").read_bytes() == key.read_bytes()
    assert coordinator_main(["provision", str(fed), "--new-release-key"]) == 0
    new_pem = fed / "sites" / "biobank" / "release_signing.pem"
    assert new_pem.read_bytes() != site_pem.read_bytes()
    retired = fed / "server" / "release-keys-retired" / f"{load_public_key(site_pem).sha256[:16]}.pem"
    assert retired.read_bytes() == site_pem.read_bytes()
    with pytest.raises(ReleaseError, match="field key_sha256"):
        load_release(release_dir, trusted_keys=[new_pem])
    assert load_release(release_dir, trusted_keys=[new_pem, retired]).meta.run_id == "7"


def test_an_unknown_task_in_probe_and_embed_is_a_usage_error_naming_the_known_ones(
    release_dir: Path, release_key: Path, biobank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 40, break 8: `--tasks onset_t2d` (the docs' error; the task is `t2d`) ended
    "internal error: FileNotFoundError", exit 3. Now exit 2, naming the known tasks."""
    use = ["--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2", "--no-progress"]
    for argv in (
        ["probe", str(biobank), *use, "--tasks", "onset_t2d", "--out", str(tmp_path / "p")],
        ["embed", str(biobank), *use, "--tasks", "onset_t2d", "--out", str(tmp_path / "e.parquet")],
    ):
        assert client_main(argv) == 2
        err = capsys.readouterr().err
        assert "--tasks: task 'onset_t2d' is unknown" in err and "cad, copd, hypertension, t2d" in err


def test_probe_at_a_small_site_says_why_every_head_is_withheld_and_how_to_get_one(
    release_dir: Path, release_key: Path, biobank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 40, break 8: `probe` at a 150-subject site withheld every head without saying how to
    get one. (This 30-subject site under a minimum of 40 subjects per split stands in for it.)"""
    argv = ["probe", str(biobank), "--model", str(release_dir), "--release-key", str(release_key)]
    assert client_main([*argv, "--min-subjects", "40", "--no-progress", "--out", str(tmp_path / "p")]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "Tasks without a head here" in out and "onset_hypertension_365d: no head here: too few subjects" in out
    assert "at least 40 subjects in each of train, tuning and held_out" in out
    assert "python -m server.coordinator head FED --model" in out and "client.py predict" in out
    assert "no task has a head at this site" in captured.err
    assert not (tmp_path / "p" / "heads").exists()


def test_probe_reports_zero_shot_on_the_probes_own_held_out_rows(
    release_dir: Path, release_key: Path, biobank: Path, tmp_path: Path
) -> None:
    """Issue 72: beside each onset key's probe, `probe` scores the release's zero-shot head on the
    very held-out rows of the probe's predictions file: the AUROC of `predict --zero-shot` there."""
    use = [str(biobank), "--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2"]
    use += ["--min-positives", "1", "--no-progress"]
    assert client_main(["probe", *use, "--tasks", "hypertension", "--out", str(tmp_path / "p")]) == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["zero_shot"] and set(report["zero_shot"]) <= set(report["predictions"])
    key, z = next(iter(report["zero_shot"].items()))
    held = pq.read_table(report["predictions"][key])
    pq.write_table(held.select(["subject_id", "prediction_time"]), tmp_path / "rows.parquet")
    times = ["--prediction-times", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "zs.parquet")]
    assert client_main(["predict", *use, "--zero-shot", "--tasks", "hypertension", *times]) == 0
    p = pq.read_table(tmp_path / "zs.parquet")[key].to_numpy().astype(np.float64)
    y = held["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    assert z["n"] == len(y) and z["auroc"] == pytest.approx(float(auroc(y, p)), abs=1e-6)
    assert z["auroc_low"] <= z["auroc"] <= z["auroc_high"] or math.isnan(z["auroc_low"])
    assert "## Zero-shot: the model's own future_codes head" in (tmp_path / "p" / "report.md").read_text()


def test_the_prediction_times_file_is_read_as_documented(
    release_dir: Path, release_key: Path, biobank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 40, break 8: the --prediction-times schema was nowhere. What docs/researcher.md and the
    CLI help say: integer subject ids, a timestamp (a date is its midnight, ISO text parsed), other
    columns ignored; a missing column or a null is refused naming file and column (exit 2)."""
    doc = (ROOT / "docs" / "researcher.md").read_text()
    assert "**The `--prediction-times` file**" in doc and "| `subject_id` | integer" in doc
    parser = build_parser()
    helps = {
        a.dest: a.help
        for sub in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]  # argparse internals: the parser has subcommands
        for a in sub._actions
        if a.dest == "prediction_times"
    }
    assert helps and all(h is not None and PREDICTION_TIMES_SCHEMA in h for h in helps.values())
    sid = pq.read_table(biobank / "metadata" / "subject_splits.parquet")["subject_id"].to_numpy()[:2]
    rows = {
        "int32_date_extra": pa.table(
            {
                "subject_id": pa.array(sid, pa.int32()),
                "prediction_time": pa.array([18262, 18263], pa.date32()),
                "note": ["a", "b"],
            }
        ),  # fmt: skip
        "iso_text": pa.table(
            {"subject_id": pa.array(sid, pa.int64()), "prediction_time": ["2020-01-01", "2020-01-02"]}
        ),  # fmt: skip
    }
    use = ["--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2", "--no-progress"]
    results = []
    for name, table in rows.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        out = tmp_path / f"{name}-emb.parquet"
        assert client_main(["embed", str(biobank), *use, "--prediction-times", str(tmp_path / f"{name}.parquet"), "--out", str(out)]) == 0  # fmt: skip
        got = pq.read_table(out)
        assert got["subject_id"].to_pylist() == [int(s) for s in sid]
        assert [t.isoformat() for t in got["prediction_time"].to_pylist()] == ["2020-01-01T00:00:00", "2020-01-02T00:00:00"]  # fmt: skip
        results.append(np.stack(got["embedding"].to_numpy(zero_copy_only=False)))
    np.testing.assert_array_equal(results[0], results[1])  # the date and its ISO text are one time
    bad = {
        "missing": (pa.table({"subject_id": pa.array(sid, pa.int64())}), "no column 'prediction_time'"),
        "null": (
            pa.table(
                {
                    "subject_id": pa.array([sid[0], None], pa.int64()),
                    "prediction_time": pa.array([0, 0], pa.timestamp("us")),
                }
            ),
            "column 'subject_id' has 1 null",
        ),  # fmt: skip
    }
    for name, (table, says) in bad.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        assert client_main(["embed", str(biobank), *use, "--prediction-times", str(tmp_path / f"{name}.parquet"), "--out", str(tmp_path / "x.parquet")]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"{name}.parquet" in err and says in err


# ---------------------------------------------------------------------------- the model card


def test_model_card_copies_the_runs_numbers_and_hides_small_counts(release_dir: Path, run_dir: Path) -> None:
    card = json.loads((release_dir / "model_card.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert card["evaluation"] == evaluation  # the report's numbers, not recomputed
    assert card["sites"]["hospital"]["subjects"] == {"ehr": 30, "wearables": "<5", "genomics": 0}
    assert card["sites"]["biobank"]["examples_trained"] == {"shared": 16, "ehr": 16, "wearables": 12, "genomics": 16}
    assert card["privacy"]["epsilon_per_site"] == {"biobank": 1.0}
    assert card["training"]["rounds"] == 2 and card["model"]["groups_trained"] == ["shared", "ehr"]
    assert "horizons_days" in card["tasks"]["onset_hypertension"] and card["tasks"]["onset_hypertension"]["definition"]
    assert card["tripod_ai"]["to_be_completed_by_the_authors"]
    md = (release_dir / "MODEL_CARD.md").read_text()
    assert "AUROC 0.812 [0.625, 0.938]" in md and "ECE 0.125" in md
    assert "| hospital | ehr, wearables | ehr 30, wearables <5, genomics 0 |" in md
    assert " 3," not in md.split("## Sites")[1].split("## Tasks")[0]
    assert "To be completed by the authors" in md


# ---------------------------------------------------------------------------- at a site


@pytest.fixture(scope="module")
def biobank(federation) -> Path:
    return Path(next(s.root for s in federation.sites if s.name == "biobank"))


def test_embeddings_equal_a_per_row_forward_pass_and_are_time_shift_invariant(
    release_dir: Path, biobank: Path, tmp_path: Path, release_key: Path
) -> None:
    release = load_release(release_dir, trusted_keys=[release_key])
    runtime, _ = open_site_runtime(biobank, release, 2, None, 0.5)
    cfg = release.meta.evaluation
    assert cfg is not None
    rows = task_rows(runtime, cfg).slice(0, 12)
    got = embed_rows_at_site(runtime, release, rows, cfg.max_events, cfg.max_patches)
    # The reference: one forward pass per row of the model's own embed (no shared passes, no patch reuse).
    seqs = runtime.sequences(release.setup)
    pt = pc.cast(rows["prediction_time"], pa.int64()).to_numpy()
    with torch.no_grad():
        ref = np.concatenate(
            [
                release.model.embed(
                    seqs.batch(
                        seqs.index_of(rows["subject_id"].to_numpy()[i : i + 1]),
                        pt[i : i + 1],
                        cfg.max_events,
                        cfg.max_patches,
                    )
                )
                .double()
                .numpy()
                for i in range(rows.num_rows)
            ]
        )
    np.testing.assert_allclose(got.x, ref, rtol=1e-5, atol=1e-5)
    # The same site 100 years later (as MIMIC shifts dates): the same embeddings.
    shifted = _shifted_site(biobank, tmp_path / "shifted", days=36_524)
    runtime2, _ = open_site_runtime(shifted, release, 2, None, 0.5)
    rows2 = rows.set_column(1, "prediction_time", pa.array(pt + 36_524 * US_PER_DAY, pa.timestamp("us")))
    again = embed_rows_at_site(runtime2, release, rows2, cfg.max_events, cfg.max_patches)
    np.testing.assert_allclose(again.x, got.x, rtol=1e-5, atol=1e-5)


def _shifted_site(root: Path, dest: Path, days: int) -> Path:
    shutil.copytree(root, dest)
    for path in [*(dest / "data").rglob("*.parquet"), *(dest / "wearables").rglob("*.parquet")]:
        table = pq.read_table(path)
        i = table.column_names.index("time")
        us = pc.cast(table["time"], pa.int64())
        table = table.set_column(i, table.schema.field(i), pc.cast(pc.add(us, days * US_PER_DAY), pa.timestamp("us")))
        pq.write_table(table, path)
    return dest


def test_embed_cli_writes_one_row_per_prediction_time(
    release_dir: Path, biobank: Path, tmp_path: Path, release_key: Path
) -> None:
    times = pa.table(
        {"subject_id": pa.array([0, 1, 1], pa.int64()), "prediction_time": pa.array([0, 0, 0], pa.timestamp("us"))}
    )
    sids = pq.read_table(biobank / "metadata" / "subject_splits.parquet")["subject_id"].to_numpy()[:2]
    times = times.set_column(0, "subject_id", pa.array([sids[0], sids[1], sids[1]], pa.int64()))
    when = np.array([20 * 365, 50 * 365, 60 * 365], dtype=np.int64) * US_PER_DAY  # 1990, 2020, 2030
    times = times.set_column(1, "prediction_time", pa.array(when, pa.timestamp("us")))
    pq.write_table(times, tmp_path / "times.parquet")
    out = tmp_path / "emb.parquet"
    argv = [
        "embed",
        str(biobank),
        "--model",
        str(release_dir),
        "--release-key",
        str(release_key),
        "--min-subjects",
        "2",
    ]
    argv += ["--no-progress"]
    assert client_main([*argv, "--prediction-times", str(tmp_path / "times.parquet"), "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 3 and table["subject_id"].to_pylist() == times["subject_id"].to_pylist()
    setup = load_release(release_dir, trusted_keys=[release_key]).setup
    assert setup.embedding_width == setup.model.d_model + setup.model.genomics.d_hidden  # the biobank has PRS
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), setup.embedding_width)
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    has = np.asarray(table["has_genomics"].to_pylist())
    assert np.all((np.abs(emb[:, setup.model.d_model :]).sum(1) > 0) == has)  # the genomics block: zero without PRS
    assert set(table["split"].to_pylist()) <= {"train", "tuning", "held_out"}
    # A file without prediction_time is refused by name.
    pq.write_table(times.drop(["prediction_time"]), tmp_path / "bad.parquet")
    assert client_main([*argv, "--prediction-times", str(tmp_path / "bad.parquet"), "--out", str(out)]) == 2


def test_predict_zero_shot_gives_the_models_own_probability_per_task(
    release_dir: Path, biobank: Path, tmp_path: Path, release_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 72: `predict --zero-shot` scores rows without a head or a label: each onset task's
    probability from the release's future_codes head, as a per-row forward pass computes it."""
    release = load_release(release_dir, trusted_keys=[release_key])
    runtime, _ = open_site_runtime(biobank, release, 2, None, 0.5)
    cfg = release.meta.evaluation
    assert cfg is not None
    rows = task_rows(runtime, cfg).slice(0, 9)
    pq.write_table(rows, tmp_path / "times.parquet")
    use = [str(biobank), "--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2"]
    use += ["--no-progress"]
    out = tmp_path / "zs.parquet"
    argv = ["predict", *use, "--zero-shot", "--tasks", "hypertension", "t2d", "site:readmission"]
    assert client_main([*argv, "--prediction-times", str(tmp_path / "times.parquet"), "--out", str(out)]) == 0
    table = pq.read_table(out)
    err = capsys.readouterr().err
    assert (
        "site:readmission" not in table.column_names and "readmission: no zero-shot score (a site-labelled task" in err
    )
    keys = [k for k in table.column_names if k not in ("subject_id", "prediction_time")]
    assert "onset_hypertension_30d" in keys and "onset_hypertension_365d" in keys  # every horizon the head has
    assert table["subject_id"].to_pylist() == rows["subject_id"].to_pylist()
    # The reference: per row, the model's head at the task's horizon over the vocabulary's codes of
    # the outcome (the tiny sites have one: ICD10//I10), noisy-OR, as a probability.
    vocab = release.setup.vocabulary.codes
    code = N_SPECIAL_CODES + vocab.index("ICD10//I10")
    seqs = runtime.sequences(release.setup)
    pt = pc.cast(rows["prediction_time"], pa.int64()).to_numpy()
    with torch.no_grad():
        for i in range(rows.num_rows):
            batch = seqs.batch(
                seqs.index_of(rows["subject_id"].to_numpy()[i : i + 1]), pt[i : i + 1], cfg.max_events, cfg.max_patches
            )
            logits = release.model.heads["ehr_future_codes"](release.model(batch).embedding)[0]
            for h, key in enumerate(
                (
                    "onset_hypertension_30d",
                    "onset_hypertension_90d",
                    "onset_hypertension_180d",
                    "onset_hypertension_365d",
                )
            ):
                assert table[key][i].as_py() == pytest.approx(float(torch.sigmoid(logits[h, code])), abs=1e-5)
    # Without a file: the tasks' rows; a head and --zero-shot together, or neither, are usage errors.
    assert client_main(["predict", *use, "--zero-shot", "--tasks", "hypertension", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == task_rows(runtime, eval_config(release, ["hypertension"])).num_rows
    assert client_main(["predict", *use, "--zero-shot", "--head", "h.json", "--out", str(out)]) == 2
    assert client_main(["predict", *use, "--out", str(out)]) == 2
    times = ["--prediction-times", str(tmp_path / "times.parquet")]
    assert client_main(["predict", *use, "--zero-shot", "--tasks", "site:readmission", *times, "--out", str(out)]) == 2
    assert (
        "no task the release's future_codes head can score (readmission: a site-labelled task"
        in capsys.readouterr().err
    )
    # A task the site names whose outcome codes the release has never seen: refused, naming both.
    shipped = (Path(__file__).parents[2] / "configs" / "tasks" / "hypertension.yaml").read_text()
    outcome = "code: {regex: '^(DIAGNOSIS//ICD//9//401|DIAGNOSIS//ICD//10//I10|ICD10//I10|ICD10CM/I10|ICD9CM/401)'}"
    assert outcome in shipped and "ICD10//Z99" not in vocab
    rare = shipped.replace(outcome, "code: ICD10//Z99").replace("task: onset_hypertension", "task: onset_rare")
    (tmp_path / "rare.yaml").write_text(rare)
    argv = ["predict", *use, "--zero-shot", "--tasks", "hypertension", f"file:{tmp_path / 'rare.yaml'}", *times]
    assert client_main([*argv, "--out", str(tmp_path / "none.parquet")]) == 2
    err = capsys.readouterr().err
    assert "task 'onset_rare_30d': its outcome code (ICD10//Z99) is not in the model's vocabulary" in err
    assert not (tmp_path / "none.parquet").exists()


def test_predict_zero_shot_is_time_shift_invariant(
    release_dir: Path, biobank: Path, tmp_path: Path, release_key: Path
) -> None:
    """The same site 100 years later (every event, wearable epoch and birth moved, and the rows
    with them): the same zero-shot probabilities."""
    release = load_release(release_dir, trusted_keys=[release_key])
    runtime, _ = open_site_runtime(biobank, release, 2, None, 0.5)
    cfg = eval_config(release, ["hypertension"])
    rows = task_rows(runtime, cfg).slice(0, 12)
    got = zero_shot_at_site(runtime, release, cfg.tasks, rows, cfg.max_events, cfg.max_patches)
    shifted = _shifted_site(biobank, tmp_path / "shifted", days=36_524)
    runtime2, _ = open_site_runtime(shifted, release, 2, None, 0.5)
    pt = pc.cast(rows["prediction_time"], pa.int64()).to_numpy()
    rows2 = rows.set_column(1, "prediction_time", pa.array(pt + 36_524 * US_PER_DAY, pa.timestamp("us")))
    again = zero_shot_at_site(runtime2, release, cfg.tasks, rows2, cfg.max_events, cfg.max_patches)
    keys = [k for k in got.table.column_names if k.startswith("onset_")]
    assert keys and again.table.column_names == got.table.column_names
    for key in keys:
        np.testing.assert_allclose(again.table[key].to_numpy(), got.table[key].to_numpy(), rtol=0, atol=1e-5)


def test_a_site_in_another_coding_is_refused_naming_codes_and_share(
    release_dir: Path, biobank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], release_key: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(biobank, other)
    for path in (other / "data").rglob("*.parquet"):
        table = pq.read_table(path)
        code = table["code"].cast(pa.string())
        renamed = pc.if_else(pc.starts_with(code, "PRS//"), code, pc.binary_join_element_wise("LOCAL", code, "//"))
        table = table.set_column(
            table.column_names.index("code"), "code", renamed.cast(table.schema.field("code").type)
        )
        pq.write_table(table, path)
    (other / "metadata" / "codes.parquet").unlink()
    release = load_release(release_dir, trusted_keys=[release_key])
    fit = release_fit(SiteRuntime(SiteConfig(site_root=other, min_report_subjects=2)).site, release.setup)
    assert fit.rows > 0 and fit.unknown_rows == fit.rows  # every EHR row's code is unknown
    assert fit.top_unknown[0][0].startswith("LOCAL//")
    with pytest.raises(SiteDoesNotFit):
        open_site_runtime(other, release, 2, None, 0.5)
    code = client_main(
        ["embed", str(other), "--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2"]
        + ["--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "100.0%" in err and "LOCAL//" in err and "outside the release's vocabulary" in err
    assert not (tmp_path / "x").exists()
    # The release's own sites fit it: their unknown share is small.
    assert (
        release_fit(SiteRuntime(SiteConfig(site_root=biobank, min_report_subjects=2)).site, release.setup).unknown_share
        < 0.5
    )


def test_a_saved_head_predicts_as_the_probe_and_is_refused_on_another_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = x[:, 0] + 0.5 * rng.normal(size=200) > 0
    probe = fit_logistic_probe(x[:120], y[:120], x[120:160], y[120:160])
    path = save_head(tmp_path / "h.json", "t", probe, "a" * 64, 64, 8, "c" * 64)
    head = load_head(path, "a" * 64, "c" * 64)
    np.testing.assert_array_equal(head.predict(x[160:]), probe.predict_proba(x[160:]))
    with pytest.raises(HeadError, match="field setup_sha256"):
        load_head(path, "b" * 64)
    with pytest.raises(HeadError, match="field weights_sha256"):  # same setup, another run's weights
        load_head(path, "a" * 64, "d" * 64)
    data = bytearray((tmp_path / "h.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "h.safetensors").write_bytes(bytes(data))
    with pytest.raises(HeadError, match="arrays_sha256"):
        load_head(path)


def test_a_site_with_a_modality_the_model_lacks_is_refused(setup: FederationSetup, biobank: Path) -> None:
    ehr_only = setup.model_copy(update={"modalities": ["ehr", "genomics"]})
    site = SiteRuntime(SiteConfig(site_root=biobank, min_report_subjects=2)).site
    assert release_fit(site, ehr_only).missing_modalities == ["wearables"]
    with pytest.raises(SiteDoesNotFit, match=r"has \['wearables'\], which the release's model"):
        require_fit(site, ehr_only)
    assert require_fit(site, setup).missing_modalities == []


def test_personalise_adapts_the_release_at_the_site_and_embed_probe_predict_use_it(
    release_dir: Path, release_key: Path, biobank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 68: `personalise` takes local steps on the site's train split from the release's
    weights, keeps the count its tuning split chooses (printed, written), and `--personal` makes
    embed / probe / predict read the adapted model; a head fitted on it names its weights."""
    use = ["--model", str(release_dir), "--release-key", str(release_key), "--min-subjects", "2", "--no-progress"]
    out = tmp_path / "personal"
    argv = ["personalise", str(biobank), *use, "--steps", "0", "3", "--batch-size", "8", "--out", str(out)]
    assert client_main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 local steps" in printed and "3 local steps" in printed and "<- kept" in printed
    meta = read_personal_meta(out)
    assert meta.site == "biobank" and meta.steps in (0, 3) and set(meta.tuning_auroc) == {"0", "3"}
    assert meta.groups == ["shared", "ehr", "wearables", "genomics"]  # the biobank's groups
    release = load_release(release_dir, trusted_keys=[release_key])
    personal = load_personal(out, release)
    changed = [k for k, v in release.model.state_dict().items() if not torch.equal(v, personal.model.state_dict()[k])]
    assert bool(changed) == (meta.steps > 0)
    # Written from 3 steps' snapshot, read back: the adapted weights are 3 local steps of training.
    assert client_main([*argv[:-1], str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()
    assert client_main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwritten

    probe_out = tmp_path / "probe"
    assert client_main(["probe", str(biobank), *use, "--personal", str(out), "--out", str(probe_out)]) in (0, 1)
    for fitted in (probe_out / "heads").glob("*.json"):  # a head fitted on it names the personalised weights
        assert json.loads(fitted.read_text())["weights_sha256"] == personal.weights_sha256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, release.setup.embedding_width))
    probe = fit_logistic_probe(x[:40], x[:40, 0] > 0, x[40:], x[40:, 0] > 0)
    head = save_head(tmp_path / "t.json", "t", probe, release.setup.sha256, 64, 8, personal.weights_sha256)
    times = tmp_path / "times.parquet"
    sid = pq.read_table(biobank / "metadata" / "subject_splits.parquet")["subject_id"].to_numpy()[:2]
    pq.write_table(pa.table({"subject_id": pa.array(sid, pa.int64()), "prediction_time": pa.array([0, 0], pa.timestamp("us"))}), times)  # fmt: skip
    predict = ["predict", str(biobank), *use, "--head", str(head), "--prediction-times", str(times)]
    assert client_main([*predict, "--personal", str(out), "--out", str(tmp_path / "p.parquet")]) == 0
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 2
    assert client_main([*predict, "--out", str(tmp_path / "q.parquet")]) == 2  # on the release alone: refused
    assert "field weights_sha256" in capsys.readouterr().err and not (tmp_path / "q.parquet").exists()
    # A folder from another release is refused by name.
    doc = json.loads((out / "personal.json").read_text())
    (out / "personal.json").write_text(json.dumps({**doc, "base_weights_sha256": "0" * 64}))
    assert client_main(["embed", str(biobank), *use, "--personal", str(out), "--out", str(tmp_path / "e.parquet")]) == 2
    assert "field base_weights_sha256" in capsys.readouterr().err
