"""MEDS-DEV's benchmark tasks, resolved against a dataset's predicates as MEDS-DEV does.

    task = meds_dev_task("mortality/in_icu/first_24h", dataset="MIMIC-IV")
    task = meds_dev_task("readmission/general_hospital/30d", dataset="/site/predicates.yaml")
    resolve_task("meds-dev:mortality/in_icu/first_24h@MIMIC-IV")   # healthfm_core.data.labels.task_spec

Where the files come from: the `meds-dev` package (installed by `make setup` without its
dependencies: its pins are older than ours, and we read only its YAML), or a MEDS-DEV checkout
named by `root=` or $HEALTHFM_MEDS_DEV_DIR (its `src/MEDS_DEV`, or that folder itself).

Resolution is MEDS-DEV's: `meds-dev-task` runs `aces-cli config_path=<task> predicates_path=<the
dataset's predicates.yaml>`, and ACES (`TaskExtractorConfig.load`) lets every predicate named in
the predicates file replace the task's predicate of that name (and likewise
`patient_demographics`). We merge the two files the same way into one config (the text that
travels to the sites) and check that ACES parses it to the same config as ACES's own loader on
the two files. A `???` left after the merge is an error naming task, dataset and predicate.

The null-code workaround (default on, `meds_dev_task(..., rewrite=True)`): MEDS-DEV 0.0.14's seven
abnormal-lab tasks write the abnormal range as a predicate with `code: null` and combine it with
the lab's coded predicate, `and(creatinine_mgdl, abnormally_high_creatinine_mgdl_range)`. With
es-aces 0.7.3 and polars 1.x `code: null` compiles to `code == null`, which holds for no row (ACES
issue #192): those tasks get rows but never a positive label. Even where a code-less range did
match, ACES evaluates `and(...)` after summing each predicate per (subject, time), so it would
take any lab of the same panel in range as the creatinine's (ACES issue #193). We therefore
rewrite each such `and(coded, range)` into one plain predicate: the coded predicate's code and the
range's bounds, i.e. "a creatinine row with value > 1.3 mg/dL", which is what the tasks'
descriptions say and what MEDS-DEV itself went back to (per-dataset coded range predicates, its
PR #254). A window that names the range predicate directly (thrombocytopenia's input window
names `abnormally_low_platelets_kul_range` where its siblings name the combined predicate) is
pointed at the combined predicate. The task's metadata lists every rewrite
(`metadata.meds_dev.rewritten`); `rewrite=False` resolves the files exactly as
written (then check --tasks names the predicates that match nothing).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import ruamel.yaml
import yaml

from healthfm_core.data.labels.aces_tasks import AcesTask, aces_config, task_from_text
from healthfm_core.strict_files import strict_yaml

MEDS_DEV_PREFIX = "meds-dev:"
MEDS_DEV_DIR_ENV = "HEALTHFM_MEDS_DEV_DIR"
MISSING = "???"  # OmegaConf's mandatory value: MEDS-DEV's "the dataset says"
_AND = re.compile(r"^\s*and\(\s*([A-Za-z0-9_]+)\s*,\s*([A-Za-z0-9_]+)\s*\)\s*$")
_RANGE_KEYS = ("value_min", "value_max", "value_min_inclusive", "value_max_inclusive")


def meds_dev_dir(root: str | Path | None = None) -> Path:
    """MEDS-DEV's package folder (holding tasks/ and datasets/): `root`, else $HEALTHFM_MEDS_DEV_DIR,
    else the installed `meds-dev` package. Found without importing it (its __init__ imports
    packages we do not install)."""
    given = root if root is not None else os.environ.get(MEDS_DEV_DIR_ENV)
    if given:
        path = Path(given).expanduser()
        for cand in (path, path / "src" / "MEDS_DEV", path / "MEDS_DEV"):
            if (cand / "tasks").is_dir():
                return cand
        raise FileNotFoundError(f"MEDS-DEV folder {path}: no tasks/ under it, its src/MEDS_DEV or MEDS_DEV")
    spec = importlib.util.find_spec("MEDS_DEV")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MEDS-DEV tasks need the meds-dev package (`make setup` installs it: pip install --no-deps "
            f"meds-dev==0.0.14) or a MEDS-DEV checkout in ${MEDS_DEV_DIR_ENV}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def meds_dev_task_names(root: str | Path | None = None) -> list[str]:
    """Every task MEDS-DEV defines, as its path under tasks/ without .yaml (MEDS-DEV's TASKS keys)."""
    tasks = meds_dev_dir(root) / "tasks"
    return sorted(p.relative_to(tasks).with_suffix("").as_posix() for p in tasks.rglob("*.yaml"))


def meds_dev_datasets(root: str | Path | None = None) -> list[str]:
    """The datasets MEDS-DEV ships predicates for (datasets/<name>/dataset.yaml and predicates.yaml)."""
    base = meds_dev_dir(root) / "datasets"
    return sorted(
        p.parent.relative_to(base).as_posix()
        for p in base.rglob("dataset.yaml")
        if (p.parent / "predicates.yaml").is_file()
    )


def task_file(task: str, root: str | Path | None = None) -> Path:
    """The YAML of a MEDS-DEV task; FileNotFoundError naming the task and the known ones."""
    path = meds_dev_dir(root) / "tasks" / f"{task}.yaml"
    if ".." in Path(task).parts or not path.is_file():
        raise FileNotFoundError(f"MEDS-DEV task {task!r}: not a MEDS-DEV task (known: {meds_dev_task_names(root)})")
    return path


def predicates_file(dataset: str | Path, root: str | Path | None = None) -> Path:
    """A dataset's predicates: a YAML file path (a site's own), or a MEDS-DEV dataset name."""
    path = Path(dataset).expanduser()
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise FileNotFoundError(f"predicates file {path}: no such file")
        return path
    found = meds_dev_dir(root) / "datasets" / str(dataset) / "predicates.yaml"
    if ".." in path.parts or not found.is_file():
        raise FileNotFoundError(
            f"dataset {str(dataset)!r}: MEDS-DEV has no predicates for it (datasets: {meds_dev_datasets(root)}); "
            "give a predicates file (a path ending in .yaml) instead"
        )
    return found


def _read(path: Path) -> dict[str, Any]:
    """A YAML file read as ACES reads it (ruamel, safe, pure; YAML 1.2)."""
    loaded = ruamel.yaml.YAML(typ="safe", pure=True).load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def _unresolved(value: object) -> bool:
    return value == MISSING or (isinstance(value, dict) and any(v == MISSING for v in value.values()))


def merged_config(task_path: Path, predicates_path: Path) -> dict[str, Any]:
    """The task file with the predicates file's predicates and patient_demographics laid over it,
    name by name, as TaskExtractorConfig.load(config_path, predicates_path) does."""
    cfg = _read(task_path)
    over = _read(predicates_path)
    unknown = sorted(set(over) - {"predicates", "patient_demographics", "description", "metadata"})
    if unknown:
        raise ValueError(
            f"{predicates_path}: unrecognized key(s) {unknown} (ACES reads predicates, patient_demographics)"
        )
    for key in ("predicates", "patient_demographics"):
        if over.get(key) or key in cfg:
            cfg[key] = {**(cfg.get(key) or {}), **(over.get(key) or {})}
    return cfg


def _referenced(cfg: dict[str, Any]) -> set[str]:
    """Predicates a config names (trigger, windows' constraints, labels, boundaries, expressions)."""
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(cfg.get("trigger", ""))))
    for window in (cfg.get("windows") or {}).values():
        names |= set((window.get("has") or {}).keys())
        names |= {str(window["label"])} if window.get("label") else set()
        for edge in ("start", "end"):
            names |= set(re.findall(r"(?:->|<-)\s*([A-Za-z_][A-Za-z0-9_]*)", str(window.get(edge) or "")))
    preds = {**(cfg.get("predicates") or {}), **(cfg.get("patient_demographics") or {})}
    stack = [n for n in names if n in preds]
    while stack:
        p = preds[stack.pop()]
        if isinstance(p, dict) and "expr" in p:
            for arg in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(p["expr"]).split("(", 1)[-1]):
                if arg in preds and arg not in names:
                    names.add(arg)
                    stack.append(arg)
    return names


def rewrite_null_code_ranges(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`and(coded, range)` with `range` a plain predicate of `code: null` and a value range and
    `coded` a plain predicate with a code and no range, rewritten into one plain predicate (the
    code and the range); windows naming `range` itself are pointed at the combined predicate
    when exactly one combination uses it. Returns the new config and one line per rewrite."""
    out = copy.deepcopy(cfg)
    preds: dict[str, Any] = out.get("predicates") or {}
    done: list[str] = []
    combined: dict[str, list[str]] = {}

    def plain(name: str) -> dict[str, Any] | None:
        p = preds.get(name)
        return p if isinstance(p, dict) and "expr" not in p else None

    for name, p in list(preds.items()):
        m = _AND.match(str(p.get("expr", ""))) if isinstance(p, dict) else None
        if m is None:
            continue
        a, b = (plain(x) for x in m.groups())
        for coded_name, coded, rng_name, rng in ((m[1], a, m[2], b), (m[2], b, m[1], a)):
            if coded is None or rng is None or rng.get("code") is not None or coded.get("code") is None:
                continue
            if not any(rng.get(k) is not None for k in ("value_min", "value_max")):
                continue
            if any(coded.get(k) is not None for k in ("value_min", "value_max")):
                continue  # two ranges: no single predicate says both
            preds[name] = copy.deepcopy({**coded, **{k: rng[k] for k in _RANGE_KEYS if rng.get(k) is not None}})
            combined.setdefault(rng_name, []).append(name)
            done.append(f"{name}: and({m[1]}, {m[2]}) -> {coded_name}'s code with {rng_name}'s value range")
            break
    for wname, window in (out.get("windows") or {}).items():
        has = window.get("has") or {}
        for rng_name, users in combined.items():
            if rng_name in has and len(users) == 1 and users[0] not in has:
                window["has"] = {(users[0] if k == rng_name else k): v for k, v in has.items()}
                has = window["has"]
                done.append(f"windows.{wname}.has: {rng_name} -> {users[0]}")
            if window.get("label") == rng_name and len(users) == 1:
                window["label"] = users[0]
                done.append(f"windows.{wname}.label: {rng_name} -> {users[0]}")
    referenced = _referenced(out)
    for rng_name in combined:
        if rng_name not in referenced:
            preds.pop(rng_name, None)
    return out, done


def _check_against_aces(text: str, task_path: Path, predicates_path: Path, where: str) -> None:
    """ACES parses our merged config to the config its own loader makes of the two files."""
    from aces.config import TaskExtractorConfig

    mine = aces_config(strict_yaml(text, where), where)
    theirs = TaskExtractorConfig.load(config_path=task_path, predicates_path=predicates_path)
    if repr(mine) != repr(theirs):
        raise ValueError(f"{where}: the merged config differs from ACES's own merge of the two files")


def task_name(task: str) -> str:
    """The platform's name of a MEDS-DEV task (a file name and metric-key prefix: no slashes)."""
    return task.replace("/", "-")


def meds_dev_task(
    task: str,
    dataset: str | Path,
    root: str | Path | None = None,
    rewrite: bool = True,
) -> AcesTask:
    """A MEDS-DEV task resolved with `dataset`'s predicates (a MEDS-DEV dataset name or a
    predicates file), named `task_name(task)`; see the module docstring for the rewrite."""
    tpath = task_file(task, root)
    ppath = predicates_file(dataset, root)
    where = f"MEDS-DEV task {task!r} with dataset {str(dataset)!r}"
    cfg = merged_config(tpath, ppath)
    referenced = _referenced(cfg)
    preds = {**(cfg.get("predicates") or {}), **(cfg.get("patient_demographics") or {})}
    missing = sorted(n for n, p in preds.items() if n in referenced and _unresolved(p))
    if missing:
        raise ValueError(
            f"{where}: predicate(s) {missing} are left to the dataset ('???') and {ppath} does not define them"
        )
    as_written = {k: v for k, v in cfg.items() if k != "metadata"}
    _check_against_aces(yaml.safe_dump(as_written, sort_keys=False), tpath, ppath, where)
    rewritten: list[str] = []
    if rewrite:
        cfg, rewritten = rewrite_null_code_ranges(cfg)
    meta = dict(cfg.get("metadata") or {})
    meta["task"] = task_name(task)
    meta["meds_dev"] = {
        "task": task,
        "dataset": str(dataset),
        "predicates": str(ppath),
        "rewritten": rewritten,
    }
    cfg["metadata"] = meta
    return task_from_text(yaml.safe_dump(cfg, sort_keys=False), f"{MEDS_DEV_PREFIX}{task}")


def parse_entry(entry: str, dataset: str | Path | None = None) -> tuple[str, str | Path]:
    """`meds-dev:<task>[@<dataset or predicates file>]` -> (task, dataset); the entry's own
    dataset wins over `dataset`, then $HEALTHFM_MEDS_DEV_DATASET. No dataset: a ValueError."""
    body = entry.strip().removeprefix(MEDS_DEV_PREFIX)
    task, _, own = body.partition("@")
    chosen = own or dataset or os.environ.get("HEALTHFM_MEDS_DEV_DATASET")
    if not task:
        raise ValueError(f"task {entry!r}: no MEDS-DEV task named (e.g. meds-dev:mortality/in_icu/first_24h)")
    if not chosen:
        raise ValueError(
            f"task {entry!r}: a MEDS-DEV task needs a dataset's predicates: dataset=MIMIC-IV, a predicates "
            f"file, or {entry}@MIMIC-IV"
        )
    return task, chosen


def with_dataset(entries: list[str], dataset: str | Path | None) -> list[str]:
    """Task entries with `dataset` written into every `meds-dev:` entry that names none (a job's
    `dataset=MIMIC-IV`), so the resolved entries travel on complete; other entries unchanged."""
    if dataset is None or str(dataset) == "":
        return list(entries)
    out = []
    for entry in entries:
        if entry.strip().startswith(MEDS_DEV_PREFIX) and "@" not in entry:
            entry = f"{entry.strip()}@{dataset}"
        out.append(entry)
    return out


__all__ = [
    "MEDS_DEV_DIR_ENV",
    "MEDS_DEV_PREFIX",
    "meds_dev_datasets",
    "meds_dev_dir",
    "meds_dev_task",
    "meds_dev_task_names",
    "merged_config",
    "parse_entry",
    "predicates_file",
    "with_dataset",
    "rewrite_null_code_ranges",
    "task_file",
    "task_name",
]
