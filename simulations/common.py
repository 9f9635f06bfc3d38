"""What the simulation jobs share: the phase clock, the sites, fresh output directories, the
per-site evaluation rows and the job's results files. Core only: no Flower here, so the
centralized job (simulations.pretrain) can use it without importing Flower."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.labels.aces_tasks import TASK_DIR
from healthfm_core.data.labels.meds_dev_tasks import with_dataset
from healthfm_core.data.labels.task_spec import SITE_PREFIX, TaskSpec, file_entries, resolve_tasks, runner_tasks
from healthfm_core.data.labels.tasks import TASKS, OnsetTask, Task, rows_per_subject
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import Site, open_site
from healthfm_core.eval import compare
from healthfm_core.eval.runner import EvalSet, build_eval_set
from healthfm_core.files import atomic_write_text
from healthfm_core.protocol import EvalConfig
from healthfm_core.strict_files import strict_model
from simulations.synthetic import ScenarioConfig, synthetic_sites

log = logging.getLogger("healthfm.simulations")


class Clock:
    """Wall time per phase: each `lap` closes the phase that began at the previous lap (or at
    the start). The reports state where the time went."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._t = self.start

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._t
        log.info("%s: %.1f s", phase, now - self._t)
        self._t = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def open_sites(
    scenario: Mapping[str, Any] | DictConfig,
    data_dir: str | Path,
    seed: int,
    n_subjects: int | None,
    site_roots: Sequence[str | Path] | None = None,
) -> tuple[dict[str, Site], Path | None, ScenarioConfig | None]:
    """The sites by name, the ground-truth directory and the scenario. `site_roots` (your own
    MEDS roots) win: no ground truth then. Otherwise the synthetic federation in data_dir,
    generated once and reused while scenario, seed and size match."""
    if site_roots:
        return {Path(r).resolve().name: open_site(r) for r in site_root_list(site_roots)}, None, None
    if isinstance(scenario, DictConfig):
        scenario = OmegaConf.to_container(scenario, resolve=True)  # type: ignore[assignment]
    manifest = synthetic_sites(data_dir, scenario, int(seed), n_subjects)
    truth = Path(manifest.truth_dir)
    return (
        {s.name: open_site(s.root) for s in manifest.sites},
        truth,
        strict_model(ScenarioConfig, (truth / "scenario.json").read_text(), truth / "scenario.json"),
    )


def clear_previous_runs(out: Path, runs: Sequence[str], markers: Sequence[str], job: str) -> None:
    """out/<each of runs> must be fresh (the server refuses to overwrite a run): those a previous
    `job` left (one of `markers` is in out) are removed; anything else there is refused."""
    previous = any((out / m).is_file() for m in markers)
    for name in runs:
        path = out / name
        if path.exists():
            if not previous:
                raise FileExistsError(
                    f"{path} exists but {out} holds no {markers[0]}: not a previous {job}; choose another out_dir"
                )
            log.info("removing the previous %s's %s", job, path)
            shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)


def site_root_list(site_roots: Sequence[str | Path] | str) -> list[Path]:
    """The user's site roots as given (never replaced): each must be a directory, and their
    names (the sites' names) distinct."""
    roots = [Path(str(r)) for r in ([site_roots] if isinstance(site_roots, (str, Path)) else site_roots)]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"site_roots: {root} is not a directory")
    names = [r.resolve().name for r in roots]
    if len(set(names)) != len(names):
        raise ValueError(f"site_roots: two roots share a directory name (the site's name): {names}")
    return roots


def task_entries(cfg: DictConfig) -> list[str] | None:
    """`tasks=` of a job (its `task_list`): task files (paths, or file:PATH) or names (configs/tasks/<name>.yaml),
    `site:<name>`, `meds-dev:<task>` (the job's `dataset=` gives their predicates); None: unset."""
    tasks = cfg.get("task_list")
    if tasks is None:
        return None
    entries = [str(tasks)] if isinstance(tasks, str) else [str(t) for t in tasks]
    # A job's `tasks=` takes task files as paths: made explicit (file:PATH) for resolve_tasks, which
    # reads no bare path. `dataset=MIMIC-IV` (or a predicates file) completes the MEDS-DEV entries
    # that name none.
    return with_dataset(file_entries(entries), cfg.get("dataset"))


def job_task_specs(cfg: DictConfig, synthetic: Sequence[str]) -> list[TaskSpec]:
    """The job's tasks as the federation's evaluation resolves them (resolve_tasks): `tasks=`;
    unset, the ACES configs of configs/tasks/ on your own sites and the built-in synthetic task
    names `synthetic` on synthetic sites (onset_t2d_365d: configs/tasks/t2d.yaml at 365 days)."""
    entries = task_entries(cfg)
    if entries is None:
        entries = [p.stem for p in sorted(TASK_DIR.glob("*.yaml"))] if cfg.get("site_roots") else list(synthetic)
    return resolve_tasks(entries)


def site_labelled(specs: Sequence[TaskSpec]) -> list[str]:
    """The `site:<name>` tasks among specs (labels only the sites hold), as entries."""
    return [f"{SITE_PREFIX}{s.name}" for s in specs if s.kind == "site"]


def job_tasks(cfg: DictConfig, synthetic: Sequence[str]) -> dict[str, Task]:
    """The tasks a job's own evaluation probes, by key: `tasks=` resolved (ACES, one per horizon);
    unset, the ACES configs of configs/tasks/ on your own sites, and the built-in synthetic
    tasks `synthetic` on synthetic sites. Site-labelled tasks are evaluated only by the sites in
    the federation's evaluation (their labels never leave a site)."""
    entries = task_entries(cfg)
    if entries is None and not cfg.get("site_roots"):
        return {k: TASKS[k] for k in synthetic}
    specs = job_task_specs(cfg, synthetic)
    if site_only := site_labelled(specs):
        log.info("tasks %s: site-supplied labels, evaluated only in the federation's evaluation", site_only)
    return runner_tasks(specs)


def site_eval_rows_per_subject(cfg: DictConfig) -> int | None:
    """`eval.n_per_subject`, or (null) the sites' own evaluation's (EvalConfig.n_per_subject): the
    cap on a subject's ACES rows per task key in train and tuning ("all": None, every row; held_out
    is scored whole), so that a report scores the rows the run's in-site evaluation scores for the
    same site, task and split."""
    value = cfg.eval.get("n_per_subject")
    return rows_per_subject(EvalConfig.model_fields["n_per_subject"].default if value is None else value)


def onset_eval_data(
    cfg: DictConfig, sites: Mapping[str, Site], seqs: Mapping[str, SiteSequences]
) -> dict[str, EvalSet]:
    """The per-site evaluation rows of the onset tasks (`tasks=`, else `eval.onset_tasks`: "all"
    or names of the built-in synthetic tasks), one EvalSet per site (compare.split_sites). The
    rows are those a site's evaluation labels (site_eval.task_labels_at_site): the tasks resolved
    as the federation resolves them (synthetic names to their ACES configs), ACES's rows capped
    per subject by cap_rows_per_subject with the same cap (site_eval_rows_per_subject) and seed."""
    onset = (
        [k for k, t in TASKS.items() if isinstance(t, OnsetTask)]
        if cfg.eval.onset_tasks == "all"
        else list(cfg.eval.onset_tasks)
    )
    tasks = {k: t for k, t in runner_tasks(job_task_specs(cfg, onset)).items() if isinstance(t, OnsetTask)}
    data = build_eval_set(
        {n: (sites[n], seqs[n]) for n in sites},
        tasks,
        n_per_subject=site_eval_rows_per_subject(cfg),
        seed=int(cfg.seed),
    )
    return compare.split_sites(data)


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of compare.evaluate_per_site shared by every regime of a report."""
    fed = cfg.federation
    return {
        "max_events": fed.max_events,
        "max_patches": fed.max_patches,
        "batch_size": cfg.eval.batch_size,
        "n_boot": cfg.eval.n_boot,
        "seed": int(cfg.seed),
    }


def write_outputs(out: Path, marker: str, dump: dict, name: str, lines: list[str], clock: Clock) -> Path:
    """The job's JSON results (its marker file: a finished run) and its markdown report."""
    atomic_write_text(out / marker, json.dumps(dump, indent=1, default=float))
    path = out / name
    atomic_write_text(path, "\n".join(lines) + "\n")
    log.info("%s written to %s (%.1f min)", name, path, clock.total / 60)
    return path
