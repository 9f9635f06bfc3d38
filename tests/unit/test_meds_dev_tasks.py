"""MEDS-DEV's tasks (`meds-dev:<task>`), resolved and labelled as MEDS-DEV and ACES do.

The reference is ACES's own command-line tool, run as MEDS-DEV runs it (`aces-cli --multirun
data=sharded data.standard=meds data.root=... data.shard=$(expand_shards ...) config_path=<task>
predicates_path=<dataset predicates>`), on every site of the mimic scenario, the multi-shard one
included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from aces.config import PlainPredicateConfig, TaskExtractorConfig

from healthfm_core.data.checks.task_check import count_tasks
from healthfm_core.data.labels.aces_tasks import (
    aces_config,
    aces_labels,
    aces_labels_shared,
    load_task,
    task_from_text,
    unmatched_predicates,
)
from healthfm_core.data.labels.meds_dev_tasks import (
    meds_dev_dir,
    meds_dev_task,
    meds_dev_task_names,
    predicates_file,
    task_file,
)
from healthfm_core.data.labels.task_spec import aces_task, resolve_task, resolve_tasks, runner_tasks
from healthfm_core.data.sites.site import open_site
from healthfm_core.model.healthfm import init_model
from healthfm_core.terms.task_spec import OWN_WINDOWS, TaskSpec
from simulations.synthetic import generate_federation

NINE = [
    "abnormal_lab/blood_chemistry/elevated_creatinine/first_24h",
    "abnormal_lab/blood_chemistry/hyponatremia/first_24h",
    "abnormal_lab/blood_chemistry/metabolic_acidosis/first_24h",
    "abnormal_lab/cbc/anemia/first_24h",
    "abnormal_lab/cbc/leukocytosis/first_24h",
    "abnormal_lab/cbc/thrombocytopenia/first_24h",
    "abnormal_lab/vital/hypotension/first_24h",
    "mortality/in_icu/first_24h",
    "readmission/general_hospital/30d",
]
ABNORMAL = [t for t in NINE if t.startswith("abnormal_lab/")]
BIN = Path(sys.executable).parent
MULTI_SHARD = "tertiary_icu"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The mimic scenario, 300 subjects a site: tertiary_icu keeps 200 a shard (two shards)."""
    out = tmp_path_factory.mktemp("mimic")
    manifest = generate_federation(out, "mimic", seed=3, n_subjects=300, progress=False)
    roots = {s.name: Path(s.root) for s in manifest.sites}
    assert len(list((roots[MULTI_SHARD] / "data").glob("*.parquet"))) == 2
    return roots


def _cli_name(task: str, rewritten: bool) -> str:
    return task.replace("/", "-") + ("-rewritten" if rewritten else "")


def aces_cli(site_root: Path, tasks: list[str], rewritten: list[str], out: Path) -> dict[str, pl.DataFrame]:
    """ACES's command line on one site, as MEDS-DEV runs it (one hydra sweep over the tasks and
    the shards; each task's file is MEDS-DEV's own, reached through a link named after the task,
    or the rewritten config for `rewritten`). Returns each task's labels, all shards together."""
    out.mkdir(parents=True)
    for task in tasks:
        (out / f"{_cli_name(task, False)}.yaml").symlink_to(task_file(task))
    for task in rewritten:
        resolved = meds_dev_task(task, "MIMIC-IV")
        (out / f"{_cli_name(task, True)}.yaml").write_text(yaml.safe_dump(resolved.config, sort_keys=False))
    names = [_cli_name(t, False) for t in tasks] + [_cli_name(t, True) for t in rewritten]
    shards = subprocess.run(
        [str(BIN / "expand_shards"), str(site_root / "data")], capture_output=True, text=True, check=True
    ).stdout.strip()
    cmd = [
        str(BIN / "aces-cli"),
        "--multirun",
        f"cohort_dir={out}",
        f"cohort_name={','.join(names)}",
        "data=sharded",
        "data.standard=meds",
        f"data.root={site_root / 'data'}",
        f"data.shard={shards}",
        f"predicates_path={predicates_file('MIMIC-IV')}",
        f"log_dir={out}/.logs",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)  # a hang guard only
    assert done.returncode == 0, done.stderr[-4000:]
    result = {}
    for name in names:
        files = sorted((out / name).glob("*.parquet"))
        assert len(files) == len(shards.split(",")), (name, files)
        result[name] = pl.concat([pl.read_parquet(f) for f in files])
    return result


def _rows(table: pl.DataFrame) -> list[tuple]:
    return sorted(table.select("subject_id", "prediction_time", "boolean_value").iter_rows())


def _platform_rows(task: str, site_root: Path, rewrite: bool) -> list[tuple]:
    (labels,) = aces_labels(meds_dev_task(task, "MIMIC-IV", rewrite=rewrite), site_root).values()
    return _rows(pl.from_arrow(labels))  # type: ignore[arg-type]


# ----------------------------------------------------------------------- resolution


def test_meds_dev_ships_the_nine_tasks_and_mimic_predicates() -> None:
    assert set(NINE) <= set(meds_dev_task_names())
    assert predicates_file("MIMIC-IV") == meds_dev_dir() / "datasets" / "MIMIC-IV" / "predicates.yaml"


@pytest.mark.parametrize("task", NINE)
def test_resolution_is_aces_own_merge_of_task_and_dataset_predicates(task: str) -> None:
    """The resolved config (as written) parses to what ACES's loader makes of MEDS-DEV's two files."""
    resolved = meds_dev_task(task, "MIMIC-IV", rewrite=False)
    theirs = TaskExtractorConfig.load(config_path=task_file(task), predicates_path=predicates_file("MIMIC-IV"))
    assert repr(aces_config(resolved.config, task)) == repr(theirs)
    assert resolved.name == task.replace("/", "-") and resolved.horizons == [OWN_WINDOWS]
    assert resolved.metadata.supported_datasets == ["MIMIC-IV"] and resolved.metadata.contacts
    assert "???" not in yaml.safe_dump(resolved.config)


@pytest.mark.slow  # the mimic sites (module fixture): make test-slow
def test_a_plain_aces_file_without_horizons_is_a_task_with_its_own_windows(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """MEDS-DEV's metadata (description, links, contacts, supported_datasets) and no horizons:
    one label table, under OWN_WINDOWS, equal to the MEDS-DEV resolution's."""
    resolved = meds_dev_task("mortality/in_icu/first_24h", "MIMIC-IV")
    meta = yaml.safe_load(task_file("mortality/in_icu/first_24h").read_text())["metadata"]
    path = tmp_path / "icu_mortality.yaml"
    path.write_text(yaml.safe_dump({"metadata": meta, **resolved.config}, sort_keys=False))
    task = load_task(path)
    assert task.name == "icu_mortality" and task.horizons == [OWN_WINDOWS]
    assert task.metadata.contacts[0]["github_username"] == "mmcdermott"
    labels = aces_labels(task, sites[MULTI_SHARD])
    assert list(labels) == [OWN_WINDOWS]
    assert labels[OWN_WINDOWS].equals(aces_labels(resolved, sites[MULTI_SHARD])[OWN_WINDOWS])


def test_a_missing_predicate_names_task_dataset_and_predicate(tmp_path: Path) -> None:
    mine = tmp_path / "site_predicates.yaml"
    theirs = yaml.safe_load(predicates_file("MIMIC-IV").read_text())
    del theirs["predicates"]["icu_discharge"]
    mine.write_text(yaml.safe_dump(theirs))
    with pytest.raises(ValueError) as err:
        meds_dev_task("mortality/in_icu/first_24h", mine)
    msg = str(err.value)
    assert "mortality/in_icu/first_24h" in msg and str(mine) in msg and "icu_discharge" in msg
    # A task that does not need it resolves with the same file.
    assert meds_dev_task("readmission/general_hospital/30d", mine).name == "readmission-general_hospital-30d"


def test_unknown_task_dataset_or_no_dataset_are_clear_errors() -> None:
    with pytest.raises(FileNotFoundError, match="mortality/in_icu/first_48h.*known"):
        meds_dev_task("mortality/in_icu/first_48h", "MIMIC-IV")
    with pytest.raises(FileNotFoundError, match="'eICU'.*MIMIC-IV"):
        meds_dev_task("mortality/in_icu/first_24h", "eICU")
    with pytest.raises(FileNotFoundError, match="not a MEDS-DEV task"):
        meds_dev_task("../datasets/MIMIC-IV/predicates", "MIMIC-IV")
    os.environ.pop("HEALTHFM_MEDS_DEV_DATASET", None)
    with pytest.raises(ValueError, match="needs a dataset"):
        resolve_task("meds-dev:mortality/in_icu/first_24h")


def test_a_checkout_named_by_the_environment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MEDS-DEV checkout ($HEALTHFM_MEDS_DEV_DIR/src/MEDS_DEV) instead of the package."""
    pkg = tmp_path / "MEDS-DEV" / "src" / "MEDS_DEV"
    (pkg / "tasks" / "mortality" / "in_icu").mkdir(parents=True)
    (pkg / "datasets" / "MIMIC-IV").mkdir(parents=True)
    text = task_file("mortality/in_icu/first_24h").read_text().replace("trigger + 24h", "trigger + 12h")
    (pkg / "tasks" / "mortality" / "in_icu" / "first_12h.yaml").write_text(text)
    (pkg / "datasets" / "MIMIC-IV" / "predicates.yaml").write_text(predicates_file("MIMIC-IV").read_text())
    (pkg / "datasets" / "MIMIC-IV" / "dataset.yaml").write_text("metadata: {}\n")
    monkeypatch.setenv("HEALTHFM_MEDS_DEV_DIR", str(tmp_path / "MEDS-DEV"))
    assert meds_dev_task_names() == ["mortality/in_icu/first_12h"]
    task = meds_dev_task("mortality/in_icu/first_12h", "MIMIC-IV")
    assert task.config["windows"]["input"]["end"] == "trigger + 12h"


def test_specs_of_meds_dev_tasks_have_one_key_and_travel_as_text() -> None:
    specs = resolve_tasks(
        ["meds-dev:mortality/in_icu/first_24h", "meds-dev:readmission/general_hospital/30d@MIMIC-IV", "t2d"],
        dataset="MIMIC-IV",
    )
    assert [s.keys() for s in specs] == [
        ["mortality-in_icu-first_24h"],
        ["readmission-general_hospital-30d"],
        ["onset_t2d_30d", "onset_t2d_90d", "onset_t2d_180d", "onset_t2d_365d"],
    ]
    again = aces_task(TaskSpec.model_validate_json(specs[0].model_dump_json()))  # as a site reads it
    assert again.config == meds_dev_task("mortality/in_icu/first_24h", "MIMIC-IV").config
    assert again.horizons == [OWN_WINDOWS] and (again.metadata.meds_dev or {})["dataset"] == "MIMIC-IV"
    assert list(runner_tasks(specs))[:2] == ["mortality-in_icu-first_24h", "readmission-general_hospital-30d"]
    with pytest.raises(ValueError, match="own windows"):
        aces_task(specs[0].model_copy(update={"horizons_days": [30]}))
    half = yaml.safe_load(specs[0].aces_yaml or "") | {"metadata": {"horizons_days": [30]}}
    with pytest.raises(ValueError, match="horizons_days and horizon_window go together"):
        task_from_text(yaml.safe_dump(half), "x.yaml")


# ----------------------------------------------------------------------- ACES issue #192


def test_a_code_null_range_predicate_matches_no_row_in_this_aces() -> None:
    """ACES issue #192 as installed here (es-aces 0.7.3, polars 1.x): `code: null` with a value
    range compiles to `code == null`, true for no row, whatever the values."""
    frame = pl.DataFrame({"code": ["LAB//50912//mg/dL", "LAB//50912//mg/dL"], "numeric_value": [0.9, 2.4]})
    with pytest.warns(UserWarning, match="always result in null"):
        expr = PlainPredicateConfig(code=None, value_min=1.3, value_min_inclusive=False).MEDS_eval_expr()
    assert frame.select(expr.fill_null(False).sum()).item() == 0
    coded = PlainPredicateConfig(code="LAB//50912//mg/dL", value_min=1.3, value_min_inclusive=False)
    assert frame.select(coded.MEDS_eval_expr().sum()).item() == 1


@pytest.mark.slow  # the mimic sites (module fixture): make test-slow
def test_as_written_abnormal_lab_tasks_get_no_positive_and_check_says_why(sites: dict[str, Path]) -> None:
    root = sites[MULTI_SHARD]
    for task in ABNORMAL:
        written = _platform_rows(task, root, rewrite=False)
        fixed = _platform_rows(task, root, rewrite=True)
        assert written and not any(r[2] for r in written), task  # rows, never a positive
        assert any(r[2] for r in fixed), task
    anemia = meds_dev_task("abnormal_lab/cbc/anemia/first_24h", "MIMIC-IV", rewrite=False)
    silent = unmatched_predicates(anemia, root)
    assert silent[0] == "abnormally_low_hemoglobin_gdl"
    assert silent[1].startswith("abnormally_low_hemoglobin_gdl_range") and "#192" in silent[1]
    assert unmatched_predicates(meds_dev_task("abnormal_lab/cbc/anemia/first_24h", "MIMIC-IV"), root) == []


@pytest.mark.slow  # the mimic sites (module fixture): make test-slow
def test_check_tasks_names_the_predicates_that_match_nothing(sites: dict[str, Path], tmp_path: Path) -> None:
    as_written = tmp_path / "anemia.yaml"
    task = meds_dev_task("abnormal_lab/cbc/anemia/first_24h", "MIMIC-IV", rewrite=False)
    as_written.write_text(yaml.safe_dump(task.config))
    report = count_tasks(
        open_site(sites[MULTI_SHARD]), [as_written, Path("meds-dev:abnormal_lab/cbc/anemia/first_24h@MIMIC-IV")]
    )
    named = [p for p in report.problems if p.kind == "predicate_matches_nothing"]
    assert [p.file for p in named] == [str(as_written)]
    assert "abnormally_low_hemoglobin_gdl_range" in named[0].message and "#192" in named[0].message
    assert [c.task for c in report.tasks] == ["anemia", "abnormal_lab-cbc-anemia-first_24h"]


@pytest.mark.slow  # the mimic sites (module fixture): make test-slow
def test_the_rewrite_equals_a_working_code_null_range_where_the_lab_is_alone(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """Rewritten `and(coded, range)` == the same task with the range made to work (`code:
    null` -> any code) on data where the lab is the only valued row at its times; on the full
    data, where a panel's other labs share the lab's time, the literal form counts their values."""
    for task in ("abnormal_lab/blood_chemistry/elevated_creatinine/first_24h", "abnormal_lab/cbc/anemia/first_24h"):
        rewritten = meds_dev_task(task, "MIMIC-IV")
        working = meds_dev_task(task, "MIMIC-IV", rewrite=False).config
        for p in working["predicates"].values():
            if isinstance(p, dict) and "code" in p and p["code"] is None:
                p["code"] = {"regex": ".*"}
        literal = task_from_text(yaml.safe_dump(working), "working.yaml")
        codes = rewritten.config["predicates"][(rewritten.metadata.meds_dev or {})["rewritten"][0].split(":")[0]]
        codes = codes["code"]["any"]
        alone = tmp_path / task.replace("/", "-")
        (alone / "data").mkdir(parents=True)
        for shard in sorted((sites[MULTI_SHARD] / "data").glob("*.parquet")):
            frame = pl.read_parquet(shard)
            valued = pl.col("numeric_value").is_not_null()
            frame.filter(~valued | pl.col("code").is_in(codes)).write_parquet(alone / "data" / shard.name)
        (a,) = aces_labels(rewritten, alone).values()
        (b,) = aces_labels(literal, alone).values()
        assert a.num_rows > 0 and sum(a["boolean_value"].to_pylist()) > 0
        assert a.equals(b), task
        (full_a,) = aces_labels(rewritten, sites[MULTI_SHARD]).values()
        (full_b,) = aces_labels(literal, sites[MULTI_SHARD]).values()
        assert not full_a.equals(full_b)


# ----------------------------------------------------------------------- labels == aces-cli


@pytest.mark.slow  # the mimic sites (module fixture): make test-slow
def test_mortality_labels_equal_aces_cli_on_the_multi_shard_site(sites: dict[str, Path], tmp_path: Path) -> None:
    task = "mortality/in_icu/first_24h"
    theirs = aces_cli(sites[MULTI_SHARD], [task], [], tmp_path / "cli")
    mine = _platform_rows(task, sites[MULTI_SHARD], rewrite=False)
    assert mine == _rows(theirs[_cli_name(task, False)])
    assert sum(r[2] for r in mine) > 0 and len(mine) > sum(r[2] for r in mine)
    # The shared path (one read of each shard for every task) gives the same rows.
    (shared,) = aces_labels_shared([meds_dev_task(task, "MIMIC-IV")], sites[MULTI_SHARD])
    assert _rows(pl.from_arrow(shared[OWN_WINDOWS])) == mine  # type: ignore[arg-type]


@pytest.mark.slow
def test_all_nine_tasks_label_as_aces_cli_on_every_site(sites: dict[str, Path], tmp_path: Path) -> None:
    """Each of the nine, as written (MEDS-DEV's files and predicates) and rewritten (the seven
    abnormal-lab tasks), on each site: the platform's rows are ACES's rows."""
    for name, root in sites.items():
        theirs = aces_cli(root, NINE, ABNORMAL, tmp_path / name)
        tasks = [meds_dev_task(t, "MIMIC-IV", rewrite=False) for t in NINE]
        tasks += [meds_dev_task(t, "MIMIC-IV") for t in ABNORMAL]
        shared = aces_labels_shared(tasks, root)
        keys = [_cli_name(t, False) for t in NINE] + [_cli_name(t, True) for t in ABNORMAL]
        for key, task, labels in zip(keys, tasks, shared, strict=True):
            mine = _rows(pl.from_arrow(labels[OWN_WINDOWS]))  # type: ignore[arg-type]
            assert mine == _rows(theirs[key]), (name, key)
            assert mine == _rows(pl.from_arrow(aces_labels(task, root)[OWN_WINDOWS])), (name, key)  # type: ignore[arg-type]
            if key in {_cli_name(t, True) for t in ABNORMAL} or not key.startswith("abnormal"):
                assert any(r[2] for r in mine), (name, key)  # positives at every site


# ----------------------------------------------------------------------- scored as MEDS-DEV scores


def _per_split(rows: list[tuple], split_of: dict[int, str]) -> dict[str, tuple[int, int]]:
    """(rows, positives) per split of (subject_id, prediction_time, boolean_value) rows."""
    out: dict[str, tuple[int, int]] = {}
    for sid, _, y in rows:
        n, pos = out.get(split_of[int(sid)], (0, 0))
        out[split_of[int(sid)]] = (n + 1, pos + int(bool(y)))
    return out


@pytest.mark.slow  # the mimic sites, aces-cli and a site's evaluation of nine tasks
def test_check_and_held_out_scoring_give_aces_cli_rows_and_meds_dev_results(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """On a site shaped like MIMIC-IV's export (timed births, several admissions a subject, two
    shards), MEDS-DEV's nine tasks: check --tasks counts exactly aces-cli's rows and positives per
    split; the site's evaluation scores every one of aces-cli's held_out rows (nothing capped, no
    row at birth); and each scored task's MEDS-DEV folder holds those predictions, meds-evaluation-cli's
    own results.json for them, and a packed result as meds-dev-pack-result writes it."""
    from client.site_runtime import SiteConfig, SiteRuntime
    from healthfm_core.data.sequences.code_stats import site_code_stats
    from healthfm_core.data.sequences.vocab import build_vocabulary
    from healthfm_core.eval.meds_dev_result import MAX_RESULT_BYTES, meds_dev_result_dir
    from healthfm_core.protocol import EvalConfig, FederationSetup
    from healthfm_core.terms.model_config import load_model_config

    root = sites[MULTI_SHARD]
    site = open_site(root)
    splits = site.subject_splits()
    split_of = dict(zip(splits["subject_id"].to_pylist(), splits["split"].to_pylist(), strict=True))
    theirs = aces_cli(root, NINE, ABNORMAL, tmp_path / "cli")
    cli = {t: _rows(theirs[_cli_name(t, t in ABNORMAL)]) for t in NINE}  # the tasks as the platform resolves them
    births = {
        (int(s), t)
        for s, t, c in pl.read_parquet(root / "data", columns=["subject_id", "time", "code"]).iter_rows()
        if c == "MEDS_BIRTH"
    }
    entries = [Path(f"meds-dev:{t}@MIMIC-IV") for t in NINE]
    report = count_tasks(site, entries, min_subjects=1)
    assert [c.task for c in report.tasks] == [t.replace("/", "-") for t in NINE]
    for task, counted in zip(NINE, report.tasks, strict=True):
        expected = _per_split(cli[task], split_of)
        got = {s: (c.rows, c.positives) for s, c in counted.splits.items() if c.rows}
        assert got == expected, task
        assert counted.evaluated is not None and counted.evaluated["held_out"] == counted.splits["held_out"], task
        assert not births & {(int(r[0]), r[1]) for r in cli[task]}, task  # no row at birth
    vocab = build_vocabulary([site_code_stats(site, min_subjects=5)], min_subjects=5)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=0, modalities=["ehr"])
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    cfg = EvalConfig(
        round=1,
        tasks=resolve_tasks([str(e) for e in entries]),
        setup_sha256=setup.sha256,
        n_boot=10,
        meds_tab=False,
        score_bins=0,
    )
    eval_dir = tmp_path / "eval"
    rt = SiteRuntime(SiteConfig(site_root=root, min_report_subjects=1, min_report_positives=1, eval_dir=eval_dir))
    reply = rt.evaluate(setup, arrays, cfg)
    assert len(reply.tasks) >= 5, reply.reasons  # most of the nine have both classes in held_out here
    held = {t: [r for r in cli[t] if split_of[int(r[0])] == "held_out"] for t in NINE}
    for task in NINE:
        key = task.replace("/", "-")
        if key not in reply.tasks:
            continue
        written = pl.read_parquet(eval_dir / rt.name / f"{key}.parquet")
        assert _rows(written) == held[task], task  # every held_out row aces-cli gives, nothing else
        assert reply.tasks[key].n == len(held[task])
        folder = meds_dev_result_dir(eval_dir, rt.name, task)
        assert _rows(pl.read_parquet(folder / "predictions.parquet")) == held[task]
        out = tmp_path / "mev" / key
        done = subprocess.run(
            [
                str(BIN / "meds-evaluation-cli"),
                f"predictions_path={folder / 'predictions.parquet'}",
                f"output_file={out}",
            ],
            capture_output=True,
            text=True,
            timeout=600,  # a hang guard only
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads((folder / "results.json").read_text()) == json.loads(out.read_text()), task
        packed = json.loads((folder / "result.json").read_text())
        assert (folder / "result.json").stat().st_size <= MAX_RESULT_BYTES
        assert set(packed) == {"dataset", "task", "model", "timestamp", "result", "version"}
        assert (packed["dataset"], packed["task"], packed["model"]) == ("MIMIC-IV", task, "healthfm")
        assert packed["result"] == json.loads(out.read_text())
        assert packed["result"]["samples_equally_weighted"]["roc_auc_score"] == pytest.approx(reply.tasks[key].auroc)
        _assert_meds_dev_validates(folder / "result.json", tmp_path / "meds_dev_registered")


MODEL_ENTRY = Path(__file__).resolve().parents[2] / "docs" / "meds-dev" / "models" / "healthfm"


def _validate(result: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from MEDS_DEV.results.__main__ import validate_result; validate_result()",
            f"result_fp={result}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a hang guard only
    )


def _assert_meds_dev_validates(result: Path, registered: Path) -> None:
    """MEDS-DEV's own validator (`meds-dev-validate-result`) refuses the packed result while
    healthfm is not a registered model, and accepts it once docs/meds-dev/models/healthfm is
    added to a copy of the installed package."""
    import MEDS_DEV

    refused = _validate(result)
    assert refused.returncode != 0 and "Unknown model: healthfm" in refused.stderr, refused.stderr[-2000:]
    package = registered / "MEDS_DEV"
    if not package.exists():
        shutil.copytree(Path(MEDS_DEV.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(MODEL_ENTRY, package / "models" / "healthfm")
    accepted = _validate(result, str(registered))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
