"""A task as the server sends it to the sites: its definition as data, and how a user names one.

A `TaskSpec` is one of
- `aces`: the text of an ACES task file (configs/tasks/*.yaml, healthfm_core.data.labels.aces_tasks) and
  its horizons; evaluated at each site under one key per horizon, `<name>_<h>d`; a task without
  horizons (a MEDS-DEV task, any plain ACES file) has no horizons_days and one key, `<name>`;
- `site`: a task whose labels each site supplies itself (SITE_ROOT/tasks/<name>/, MEDS
  LabelSchema, healthfm_core.data.labels.site_labels); key `<name>`;
- `wearable`: one of the built-in wearable regression tasks (healthfm_core.data.labels.tasks); key `<name>`.

The site never needs the server's files: the ACES text travels in the message, and a TaskSpec is
a peer's input there (names restricted to a safe alphabet, sizes bounded, the ACES text parsed
and checked by ACES at the site before use).

`resolve_tasks(entries, dataset)` turns what a user writes (`tasks=[t2d, file:configs/tasks/cad.yaml,
site:readmission, meds-dev:mortality/in_icu/first_24h]`, or the synthetic tasks' names
`onset_t2d_365d` (an ACES task at one horizon), `wearable_resting_hr`) into specs; entries naming the same ACES task merge
their horizons. A bare entry is a name, never a path: a task file is read only when given as
`file:PATH` (or as a `Path` by a Python caller), so `--tasks ../../../../etc/passwd` or
`-c eval-tasks=...` naming a file is refused with the form to use, not read (issue 67, break 7). A `meds-dev:<task>[@<dataset>]` entry is resolved with the dataset's predicates
(healthfm_core.data.labels.meds_dev_tasks) here, at the coordinator: the sites get the resolved text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from healthfm_core.data.labels.aces_tasks import OWN_WINDOWS, TASK_DIR, AcesTask, load_task, task_from_text
from healthfm_core.data.labels.meds_dev_tasks import MEDS_DEV_PREFIX, meds_dev_task, parse_entry
from healthfm_core.data.labels.tasks import DISEASES, TASKS, OnsetTask, Task, WearableTask

TASK_NAME = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"  # also a file name and a metric-key prefix: no dots, no slashes
MAX_ACES_BYTES = 64 * 1024
SITE_PREFIX = "site:"
FILE_PREFIX = "file:"  # an ACES task file, given explicitly: file:PATH
# A synthetic onset task's name: configs/tasks/<disease>.yaml at one horizon.
_ONSET_NAME = re.compile(r"^onset_(?P<disease>[a-z0-9]+)_(?P<h>\d+)d$")


class UnknownTask(FileNotFoundError, ValueError):
    """A task entry that names no task: a usage error (callers catching either kind see it); the
    message names the entry and the known names."""


def known_task_names() -> list[str]:
    """What a bare name may be: a file of configs/tasks/ (by its stem) or a built-in synthetic task."""
    files = sorted(p.stem for p in TASK_DIR.glob("*.yaml")) if TASK_DIR.is_dir() else []
    return [*files, *sorted(TASKS)]


def unknown_task(entry: str) -> UnknownTask:
    return UnknownTask(
        f"task {entry!r} is unknown (known names: {', '.join(known_task_names())}; or {FILE_PREFIX}PATH for an "
        f"ACES file, {SITE_PREFIX}<name> for a site's own labels under SITE_ROOT/tasks/, {MEDS_DEV_PREFIX}<task>)"
    )


def _prefixed(text: str) -> bool:
    return text.startswith((FILE_PREFIX, SITE_PREFIX, MEDS_DEV_PREFIX))


def file_entries(entries: Iterable[str]) -> list[str]:
    """For a job whose `tasks=` takes task files as paths (the simulations', docs/researcher.md):
    each entry that is neither a task name nor a prefixed entry, as the explicit FILE_PREFIX + it."""
    return [
        e if _prefixed(e.strip()) or re.fullmatch(TASK_NAME, e.strip()) else FILE_PREFIX + e.strip() for e in entries
    ]


Horizon = Annotated[int, Field(ge=1, le=36500)]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TASK_NAME)
    kind: Literal["aces", "site", "wearable"] = "aces"
    aces_yaml: str | None = Field(default=None, max_length=MAX_ACES_BYTES)
    horizons_days: list[Horizon] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.kind == "aces":
            if not self.aces_yaml:
                raise ValueError(f"task {self.name!r}: an ACES task needs aces_yaml")
            if len(set(self.horizons_days)) != len(self.horizons_days):
                raise ValueError(
                    f"task {self.name!r}: field horizons_days: value {self.horizons_days}: repeated horizon"
                )
        elif self.aces_yaml is not None or self.horizons_days:
            raise ValueError(f"task {self.name!r}: a {self.kind} task carries no aces_yaml or horizons_days")
        if self.kind == "wearable" and not isinstance(TASKS.get(self.name), WearableTask):
            known = sorted(k for k, t in TASKS.items() if isinstance(t, WearableTask))
            raise ValueError(f"task {self.name!r}: not a wearable task (known: {known})")
        return self

    def keys(self) -> list[str]:
        """The evaluation keys of the task: one per horizon for ACES tasks with horizons."""
        if self.kind == "aces" and self.horizons_days:
            return [horizon_key(self.name, h) for h in self.horizons_days]
        return [self.name]

    def aces(self) -> AcesTask:
        """The ACES task of the text (parsed and checked by ACES; ValueError naming the task)."""
        if self.kind != "aces" or self.aces_yaml is None:
            raise ValueError(f"task {self.name!r} is a {self.kind} task, not an ACES task")
        return task_from_text(self.aces_yaml, f"task {self.name}", self.horizons_days)


class AcesOnsetTask(OnsetTask):
    """One horizon of an ACES task, for the frozen-probe runner (healthfm_core.eval.runner), which
    asks ACES for its labels. `outcome_code_prefix` is only the synthetic generator's code of the
    same disease (onset_<disease> of DISEASES; "" otherwise): where ground truth exists, the
    oracle finds its risk by it. A task without horizons has horizon_days OWN_WINDOWS (0)."""

    horizon_days: float = Field(ge=0)
    aces: AcesTask


def runner_tasks(specs: Iterable[TaskSpec]) -> dict[str, Task]:
    """The runner's tasks of `specs` by key: one AcesOnsetTask per ACES horizon, the built-in
    wearable tasks as they are. Site-labelled tasks have no runner form (left out)."""
    out: dict[str, Task] = {}
    for spec in specs:
        if spec.kind == "aces":
            task = spec.aces()
            prefix = DISEASES.get(spec.name.removeprefix("onset_"), "")
            for h in task.horizons:
                key = horizon_key(spec.name, h)
                out[key] = AcesOnsetTask(name=key, outcome_code_prefix=prefix, horizon_days=h, aces=task)
        elif spec.kind == "wearable":
            out[spec.name] = TASKS[spec.name]
    return out


def horizon_key(name: str, horizon_days: int) -> str:
    """`<name>_<h>d`; the task's bare name for OWN_WINDOWS (a task without horizons)."""
    return name if int(horizon_days) == OWN_WINDOWS else f"{name}_{int(horizon_days)}d"


def task_keys(specs: Iterable[TaskSpec]) -> list[str]:
    return [k for s in specs for k in s.keys()]


def _aces_spec(task: AcesTask, text: str, horizons: Iterable[int] | None = None) -> TaskSpec:
    return TaskSpec(
        name=task.name,
        kind="aces",
        aces_yaml=text,
        horizons_days=list(horizons) if horizons is not None else list(task.metadata.horizons_days or []),
    )


def resolve_task(entry: str | Path, dataset: str | Path | None = None) -> TaskSpec:
    """One user entry: a name in configs/tasks/, `file:PATH` (an ACES file; a `Path` is one too),
    `site:<name>`, `meds-dev:<task>[@<dataset>]` (with `dataset`: a MEDS-DEV dataset name or a
    predicates file), or a synthetic task's name (onset_<disease>_<h>d -> configs/tasks/<disease>.yaml
    at horizon h; wearable_*: the built-in wearable regression). Anything else, a path without
    `file:` among it, is an UnknownTask naming the form to use: never read."""
    if isinstance(entry, Path):
        return _file_spec(entry)
    text = entry.strip()
    if text.startswith(MEDS_DEV_PREFIX):
        task = meds_dev_task(*parse_entry(text, dataset))
        return _aces_spec(task, _text_of(task))
    if text.startswith(FILE_PREFIX):
        return _file_spec(Path(text[len(FILE_PREFIX) :]).expanduser())
    if text.startswith(SITE_PREFIX):
        return TaskSpec(name=text[len(SITE_PREFIX) :], kind="site")
    if not re.fullmatch(TASK_NAME, text):
        raise UnknownTask(
            f"task {text!r} is not a task name (letters, digits, _ and -); a task file is read only when given "
            f"explicitly: {FILE_PREFIX}{text}"
        )
    if isinstance(TASKS.get(text), WearableTask):
        return TaskSpec(name=text, kind="wearable")
    onset = _ONSET_NAME.match(text)
    if onset and isinstance(TASKS.get(text), OnsetTask):
        task = load_task(TASK_DIR / f"{onset['disease']}.yaml")
        return _aces_spec(task, task.path.read_text(), [int(onset["h"])])
    path = TASK_DIR / f"{text}.yaml"
    if not path.is_file():
        raise unknown_task(text)
    return _file_spec(path)


def _file_spec(path: Path) -> TaskSpec:
    """The ACES task of a file named explicitly; UnknownTask when there is no such file."""
    if not path.is_file():
        raise UnknownTask(f"task file {path}: no such file")
    task = load_task(path)
    return _aces_spec(task, task.path.read_text())


def _text_of(task: AcesTask) -> str:
    """The text that travels: the resolved config with its metadata, as task_from_text reads it."""
    return yaml.safe_dump({"metadata": task.metadata.model_dump(exclude_none=True), **task.config}, sort_keys=False)


def resolve_tasks(entries: Iterable[str | Path], dataset: str | Path | None = None) -> list[TaskSpec]:
    """Every entry resolved (`dataset`: the predicates of `meds-dev:` entries); ACES entries of the
    same task (same name and text) merged, their horizons in the order given. Two different texts
    under one name are refused."""
    out: dict[str, TaskSpec] = {}
    for entry in entries:
        spec = resolve_task(entry, dataset)
        have = out.get(spec.name)
        if have is None:
            out[spec.name] = spec
        elif have.kind == spec.kind == "aces" and have.aces_yaml == spec.aces_yaml:
            horizons = list(dict.fromkeys([*have.horizons_days, *spec.horizons_days]))
            out[spec.name] = have.model_copy(update={"horizons_days": horizons})
        elif have != spec:
            raise ValueError(f"tasks: entry {str(entry)!r}: a different task named {spec.name!r} is already listed")
    return list(out.values())


__all__ = [
    "AcesOnsetTask",
    "FILE_PREFIX",
    "MAX_ACES_BYTES",
    "SITE_PREFIX",
    "TASK_NAME",
    "TaskSpec",
    "UnknownTask",
    "file_entries",
    "known_task_names",
    "horizon_key",
    "resolve_task",
    "resolve_tasks",
    "runner_tasks",
    "task_keys",
]
