"""A real federation (the tiny scenario's three sites, the real ServerApp and ClientApps in this
process), its release, then `client.py embed / probe / predict` at each site: the site's numbers
at home are the run's own evaluation on the same rows (slow: a two-round run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from client.client import main as client_main
from client.head_rows import load_head_rows
from client.model_use import eval_config, open_site_runtime
from healthfm_core.eval.federated_head import SiteSplits, fit_federated_logistic
from healthfm_core.eval.probes import fit_logistic_probe
from healthfm_core.eval.saved_head import load_head
from healthfm_core.protocol import EvalReply
from healthfm_core.protocol.task_reason import TaskReason
from healthfm_core.release import load_release
from simulations.federated_head_run import head_node_configs
from simulations.task_head import compare_heads, markdown

pytestmark = pytest.mark.slow

KEY = "onset_hypertension_365d"


def key_of(model: Path) -> str:
    """The public key the `run` fixture's release verifies with (release_signing.pem)."""
    return str(model.parent / "fed" / "server" / "release_signing.pem")


def test_probe_at_each_site_equals_the_runs_evaluation_and_predict_equals_probe(
    released_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(One scored site's probe shows its progress bars: its numbers are the same.)"""
    run_dir, nodes, model = released_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    scored = 0
    shown = next(n["site-name"] for n in nodes.values() if KEY in EvalReply.from_records(evaluation["sites"][n["site-name"]]).tasks)  # fmt: skip
    for node in nodes.values():
        site, root = node["site-name"], node["site-root"]
        out = tmp_path / site
        capsys.readouterr()
        code = client_main(
            [
                "probe",
                root,
                "--model",
                str(model),
                "--release-key",
                key_of(model),
                "--min-subjects",
                "2",
                "--min-positives",
                "1",
                "--progress" if site == shown else "--no-progress",
                "--out",
                str(out),
            ]
        )
        assert ("task fits" in capsys.readouterr().err) == (site == shown)
        reported = EvalReply.from_records(evaluation["sites"][site])
        if KEY not in reported.tasks:  # withheld in the run (one class): withheld at home too, same reason
            assert code == 1
            report = json.loads((out / "report.json").read_text())
            assert KEY in report["reasons"] and KEY in reported.reasons
            continue
        assert code == 0
        scored += 1
        report = json.loads((out / "report.json").read_text())
        assert report["metrics"][KEY]["auroc"] == reported.tasks[KEY].auroc
        assert report["metrics"][KEY]["auroc_low"] == reported.tasks[KEY].auroc_low
        assert report["metrics"][KEY]["n"] == reported.tasks[KEY].n
        # The same held-out rows and probabilities as the run's own predictions file at the site.
        ours = pq.read_table(out / "predictions" / site / f"{KEY}.parquet")
        theirs = pq.read_table(Path(node["state-dir"]) / "evaluation" / site / f"{KEY}.parquet")
        cols = ["subject_id", "prediction_time", "boolean_value"]
        assert ours.select(cols).equals(theirs.select(cols))
        # Probabilities to float32 rounding (another thread count can round a forward pass differently).
        np.testing.assert_allclose(
            ours["predicted_boolean_probability"].to_numpy(),
            theirs["predicted_boolean_probability"].to_numpy(),
            rtol=0,
            atol=1e-6,
        )
        # predict with the saved head on those rows: the probe's probabilities.
        pq.write_table(ours.select(["subject_id", "prediction_time"]), tmp_path / f"{site}-rows.parquet")
        pred = tmp_path / f"{site}-pred.parquet"
        argv = ["predict", root, "--model", str(model), "--release-key", key_of(model), "--min-subjects", "2"]
        argv += ["--min-positives", "1", "--no-progress"]
        argv += [
            "--head",
            str(out / "heads" / f"{KEY}.json"),
            "--prediction-times",
            str(tmp_path / f"{site}-rows.parquet"),
        ]
        assert client_main([*argv, "--out", str(pred)]) == 0
        # Its rows embedded in other batches: float32 rounding of an embedding times the probe's
        # weight per unit, which reaches ~3,600 on a genomics column spread 3e-4 over these subjects.
        np.testing.assert_allclose(
            pq.read_table(pred)["predicted_boolean_probability"].to_numpy(),
            ours["predicted_boolean_probability"].to_numpy(),
            rtol=0,
            atol=1e-5,
        )
    assert scored >= 1


def test_embed_gives_the_evaluations_embeddings(released_run, tmp_path: Path) -> None:
    """A probe refitted here on `embed`'s output (train, tuning) scores the held-out rows as the
    run's evaluation did: the embeddings are the evaluation's."""
    run_dir, nodes, model = released_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    node = next(n for n in nodes.values() if KEY in EvalReply.from_records(evaluation["sites"][n["site-name"]]).tasks)
    site, root = node["site-name"], node["site-root"]
    out = tmp_path / "emb.parquet"
    argv = [
        "embed",
        root,
        "--model",
        str(model),
        "--release-key",
        key_of(model),
        "--min-subjects",
        "2",
        "--min-positives",
        "1",
        "--no-progress",
        "--tasks",
        KEY,
    ]
    assert client_main([*argv, "--out", str(out)]) == 0
    emb = pq.read_table(out)
    labels = pq.read_table(Path(node["state-dir"]) / "evaluation" / site / f"{KEY}.parquet")
    # The task's labelled rows with their labels, as the evaluation drew them at the site.
    release = load_release(model, trusted_keys=[key_of(model)])
    runtime, _ = open_site_runtime(Path(root), release, 2, None, 0.5)
    table = runtime.labels(eval_config(release, [KEY]))[KEY]
    assert not isinstance(table, TaskReason)
    key = {(s, t): i for i, (s, t) in enumerate(zip(emb["subject_id"].to_pylist(), emb["prediction_time"].to_pylist()))}
    idx = np.array([key[(s, t)] for s, t in zip(table["subject_id"].to_pylist(), table["prediction_time"].to_pylist())])
    x = np.stack(emb["embedding"].to_numpy(zero_copy_only=False))[idx].astype(np.float64)
    split = np.asarray(emb["split"].to_pylist())[idx]
    y = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    probe = fit_logistic_probe(x[split == "train"], y[split == "train"], x[split == "tuning"], y[split == "tuning"])
    p = probe.predict_proba(x[split == "held_out"])
    np.testing.assert_allclose(p, labels["predicted_boolean_probability"].to_numpy(), rtol=0, atol=1e-5)


def test_model_card_numbers_are_the_reports(released_run) -> None:
    run_dir, _, model = released_run
    card = json.loads((model / "model_card.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert card["evaluation"] == evaluation
    md = (model / "MODEL_CARD.md").read_text()
    summary = (run_dir / "summary.md").read_text()
    # Each per-site row of the run's summary is on the card as written there.
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and f"| {KEY} |" in ln and "AUROC" in ln]
    assert rows and all(r in md for r in rows)


def test_task_heads_table_local_head_is_the_runs_probe(released_run) -> None:
    """simulations.task_head: per site and task the federated, local and pooled heads scored on the
    same held-out rows with intervals; the local head is the run's own probe (same AUROC)."""
    run_dir, nodes, model = released_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    report = compare_heads(
        model,
        [Path(n["site-root"]) for n in nodes.values()],
        None,
        2,
        rounds=50,
        min_positives=1,
        release_key=Path(key_of(model)),
    )
    table = report["results"][KEY]
    scored = [s for s, r in table.items() if "reason" not in r]
    assert scored and all("reason" in table[s] for s in table if s not in scored)
    for site in scored:
        reported = EvalReply.from_records(evaluation["sites"][site]).tasks[KEY]
        assert table[site]["local head"]["auroc"] == pytest.approx(reported.auroc, abs=1e-12)
        assert table[site]["n"] == reported.n
        for method in ("federated head", "pooled head"):
            low, high = table[site][method]["auroc_ci"]
            # An interval, or none with its reason (one class in the held-out rows' resamples).
            assert 0 <= low <= high <= 1 or (np.isnan([low, high]).all() and table[site][method]["auroc_ci_undefined"])
    text = markdown(report)
    assert all(f"| {KEY} | {s} |" in text for s in table)


def test_the_head_over_flowers_simulation_engine_is_the_one_process_head(released_run, tmp_path: Path) -> None:
    """simulations.task_head --over-flower: the federated head from Flower's simulation engine (the
    head's ServerApp, one ClientApp per site) equals the one-process driver's on the same rows and
    sites, to 1e-9; `client.py predict --head` applies it."""
    _, nodes, model = released_run
    roots = [Path(n["site-root"]) for n in nodes.values()]
    embs = []
    for root in roots:  # each site's embed file: both paths read the same embeddings
        emb = tmp_path / f"emb-{root.name}.parquet"
        argv = [
            "embed",
            str(root),
            "--model",
            str(model),
            "--release-key",
            key_of(model),
            "--min-subjects",
            "2",
            "--min-positives",
            "1",
            "--no-progress",
        ]
        assert client_main([*argv, "--out", str(emb)]) == 0
        embs.append(emb)
    out = tmp_path / "flower"
    report = compare_heads(
        model,
        roots,
        None,
        2,
        rounds=30,
        embeddings=embs,
        over_flower=out,
        min_positives=1,
        release_key=Path(key_of(model)),
    )
    assert report["federated"] == "flower"
    summary = json.loads((out / "heads.json").read_text())
    fitted = summary["heads"][KEY]
    splits = {}
    for node in head_node_configs(model, roots, 2, embs, 1, release_key=Path(key_of(model))):
        rows = load_head_rows(node, [])
        if isinstance(got := rows.keys.get(KEY), SiteSplits):
            splits[rows.site] = got
    assert fitted["train_rows"] == {s: len(v.y_train) for s, v in splits.items()}
    expected, _ = fit_federated_logistic(splits, rounds=30)
    head = load_head(fitted["head"])
    assert head.meta.regularisation == expected.c
    np.testing.assert_allclose(head.probe.weight, expected.weight, rtol=0, atol=1e-9)
    assert head.probe.bias == pytest.approx(expected.bias, abs=1e-9)
    assert "federated head: C=" in (out / "head.log").read_text()
    scored = [s for s, r in report["results"][KEY].items() if "reason" not in r]
    assert scored and all(report["results"][KEY][s]["federated head"] is not None for s in scored)
    rows = pq.read_table(embs[0]).select(["subject_id", "prediction_time"]).slice(0, 5)
    pq.write_table(rows, tmp_path / "rows.parquet")
    argv = [
        "predict",
        str(roots[0]),
        "--model",
        str(model),
        "--release-key",
        key_of(model),
        "--min-subjects",
        "2",
        "--min-positives",
        "1",
        "--no-progress",
    ]
    argv += ["--head", fitted["head"], "--prediction-times", str(tmp_path / "rows.parquet")]
    assert client_main([*argv, "--out", str(tmp_path / "pred.parquet")]) == 0
    assert pq.read_table(tmp_path / "pred.parquet").num_rows == 5
