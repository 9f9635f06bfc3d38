"""Task names that look like paths (issue 67, break 7): `--tasks ../../../../etc/passwd` and
`-c eval-tasks=...` were read as files on the coordinator. A bare task entry is now a name only
(configs/tasks/<name>.yaml, a synthetic task, site:, meds-dev:); a task file is read only when
given explicitly as `file:PATH`, and anything else is refused naming that form, without reading.
The simulations' `tasks=`, documented to take task files as paths, makes its paths explicit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from healthfm_core.data.labels.aces_tasks import TASK_DIR
from healthfm_core.data.labels.task_spec import UnknownTask, resolve_task, resolve_tasks
from server.config import FederationConfig
from server.deploy.commands import main as coordinator_main
from simulations.common import task_entries

PASSWD = "../../../../etc/passwd"


@pytest.fixture
def task_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid ACES task file outside configs/tasks/, and the working directory beside it."""
    path = tmp_path / "mine" / "cad_copy.yaml"
    path.parent.mkdir()
    path.write_text((TASK_DIR / "cad.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return path


@pytest.mark.parametrize(
    "entry", [PASSWD, "/etc/passwd", "mine/cad_copy.yaml", "./mine/cad_copy.yaml", "cad.yaml", "~/x"]
)
def test_a_bare_entry_that_looks_like_a_path_is_refused_not_read(task_file: Path, entry: str) -> None:
    with pytest.raises(UnknownTask, match=rf"task '{entry}' is not a task name .*file:{entry}"):
        resolve_task(entry)


def test_a_task_file_is_read_when_given_explicitly(task_file: Path) -> None:
    spec = resolve_task("file:mine/cad_copy.yaml")
    assert spec.aces_yaml == task_file.read_text() and spec == resolve_task(task_file)  # a Path is explicit too
    assert spec == resolve_task(f"file:{task_file}")
    with pytest.raises(UnknownTask, match=r"task file nope.yaml: no such file"):
        resolve_task("file:nope.yaml")
    # Names still name configs/tasks/ and the synthetic tasks, never a file of the working directory.
    (task_file.parent.parent / "t2d").write_text("not a task")
    assert resolve_task("t2d").aces_yaml == (TASK_DIR / "t2d.yaml").read_text()
    assert [s.name for s in resolve_tasks(["onset_t2d_365d", "wearable_resting_hr", "site:readmit"])] == [
        "onset_t2d",
        "wearable_resting_hr",
        "readmit",
    ]


def test_the_run_config_and_head_refuse_a_path_as_a_task(
    task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`launch -c eval-tasks=...` (the ServerApp reads the run config the same way) and `head --tasks`."""
    for tasks in (PASSWD, "mine/cad_copy.yaml"):
        with pytest.raises(ValueError, match=rf"not a task name .*file:{tasks}"):
            FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "eval-tasks": tasks})
    config = FederationConfig.from_run_config(
        {"out-dir": str(tmp_path), "model": "tiny", "eval-tasks": "file:mine/cad_copy.yaml,t2d"}
    )
    assert [t.name for t in config.eval_task_specs()] == ["onset_cad", "onset_t2d"]
    rc = coordinator_main(["head", str(tmp_path / "fed"), "--model", str(tmp_path), "--out", str(tmp_path / "h"), "--tasks", PASSWD])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "not a task name" in err and f"file:{PASSWD}" in err, err


def test_the_simulations_tasks_take_paths_as_files(task_file: Path) -> None:
    """docs/researcher.md: a job's `tasks=` names task files or names; its paths are made explicit."""
    cfg = OmegaConf.create({"task_list": [str(task_file), "t2d", "site:readmit"]})
    entries = task_entries(cfg)
    assert entries == [f"file:{task_file}", "t2d", "site:readmit"]
    assert resolve_tasks(entries)[0].aces_yaml == task_file.read_text()
    assert os.path.relpath(task_file) == "mine/cad_copy.yaml"
