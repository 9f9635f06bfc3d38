"""Utility against privacy: the federation at several target epsilons, evaluated per site.

    python -m simulations.privacy_sweep                                   # configs/privacy_sweep.yaml
    python -m simulations.privacy_sweep 'epsilons=[2,null]' federation.rounds=2 out_dir=runs/eps
    python -m simulations.privacy_sweep privacy.delta=1e-6 privacy.max_grad_norm=0.5

One process runs the settings in turn (each a fresh Flower simulation, simulations.run), which
keeps one evaluation set and one table; `python -m simulations.run -m privacy=none,eps1,eps3,eps8`
gives the same four federations as a Hydra multirun, with only their in-run federated evaluation.

Steps (composition only):
1. the sites (synthetic, generated or reused; or `site_roots`);
2. for each target epsilon in `epsilons` (null = no DP asked): the federation with
   `privacy.target_epsilon` set, into out_dir/runs/<setting>; when DP is asked each simulated site
   gets a DP budget (epsilon cap = the target) and a fresh ledger (simulations.run), so the
   epsilon it reports is what this run spent. Same sites, same seed: the same vocabulary and
   initialisation in every setting (checked: the setups' sha256 must be equal);
3. each final model evaluated as in the comparison report (simulations.report): per site, frozen
   probes fitted on its train rows and scored on its held_out rows, every new-onset task and horizon;
4. privacy.md (the table: target epsilon x horizon mean AUROC / ECE over the (site, task) pairs
   every setting has, and the epsilon each site reported spending), utility_vs_epsilon.png and
   privacy_sweep.json in out_dir.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.eval import compare
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.protocol import FederationSetup
from server.runlog import read_events
from simulations.common import (
    Clock,
    clear_previous_runs,
    eval_settings,
    onset_eval_data,
    open_sites,
    write_outputs,
)
from simulations.logs import setup_job_logging
from simulations.ray_start import RayStartError
from simulations.run import run_federation

log = logging.getLogger("healthfm.simulations.privacy_sweep")

MARKER = "privacy_sweep.json"  # present once a sweep has finished in out_dir
STARTED = ".privacy_sweep.started"  # present once a sweep has begun writing in out_dir


def setting_dir(epsilon: float | None, draw: int | None = None) -> str:
    return ("no-dp" if epsilon is None else f"eps-{epsilon:g}") + ("" if draw is None else f"-draw{draw}")


def prepare_out_dir(out: Path) -> Path:
    """out/runs must be fresh (the server refuses to overwrite a run): a previous sweep's runs
    are removed; a directory no sweep wrote is refused. Returns out/runs."""
    clear_previous_runs(out, ("runs",), (MARKER, STARTED), "privacy sweep")
    (out / STARTED).touch()
    return out / "runs"


def spent_epsilon(fed_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """From a run's rounds.jsonl: each site's cumulative epsilon after its last reported round,
    and the sites whose last reply was not a trained update (status and reason)."""
    rounds = {e["round"]: e for e in read_events(fed_dir / "rounds.jsonl") if e["event"] == "round"}
    spent: dict[str, float] = {}
    trouble: dict[str, str] = {}
    for _, event in sorted(rounds.items()):
        spent.update(event.get("epsilon", {}))
        for site, entry in event["sites"].items():
            if entry.get("status") != "ok":
                trouble[site] = f"round {event['round']}: {entry.get('status')} ({entry.get('reason', '')})"
    return spent, trouble


def parse_epsilons(values: Sequence[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            out.append(None)
            continue
        try:
            eps = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"epsilons: {v!r} is neither a number nor null") from None
        if not eps > 0:
            raise ValueError(f"epsilons: {v!r} must be > 0 (null for no DP)")
        out.append(eps)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"epsilons: {list(values)!r} must be a non-empty list without repeats")
    return out


class Settings:
    """The runs of a sweep, by setting name (compare.epsilon_label): target epsilon, final
    model, each site's spent epsilon, sites that did not contribute, wall time."""

    def __init__(self) -> None:
        self.epsilon: dict[str, float | None] = {}
        self.models: dict[str, HealthFM] = {}
        self.spent: dict[str, dict[str, float]] = {}
        self.trouble: dict[str, dict[str, str]] = {}
        self.seconds: dict[str, float] = {}
        self.dirs: dict[str, Path] = {}
        self.setup: FederationSetup | None = None

    def add(
        self,
        epsilon: float | None,
        setup: FederationSetup,
        model: HealthFM,
        fed_dir: Path,
        seconds: float,
        draw: int | None = None,
    ) -> str:
        label = compare.epsilon_label(epsilon) + ("" if draw is None else f" draw {draw}")
        if self.setup is not None and setup.sha256 != self.setup.sha256:
            # Different vocabulary or initialisation: the settings would not be comparable.
            raise RuntimeError(
                f"{label}: setup {setup.sha256[:12]} differs from the other settings' "
                f"{self.setup.sha256[:12]}; a sweep compares runs on one setup"
            )
        self.setup = setup
        self.epsilon[label], self.models[label], self.seconds[label] = epsilon, model, seconds
        self.dirs[label] = fed_dir
        self.spent[label], self.trouble[label] = spent_epsilon(fed_dir)
        for site, why in self.trouble[label].items():
            log.warning("%s: site %s %s", label, site, why)
        return label


def dp_recipe_config(dcfg: DictConfig, recipe: DictConfig | None) -> DictConfig:
    """The DP settings' config (issue 68): dcfg with the recipe's local_steps and lr in
    `federation`, its max_grad_norm and train (all | encoders) in `privacy`, and the batch that keeps a site's samples
    (rounds x local_steps x batch_size) those of dcfg, so DP and no DP see the same samples.
    None: dcfg (DP at the federation's own settings)."""
    if not recipe:
        return dcfg
    fed = dcfg.federation
    samples = int(fed.local_steps) * int(fed.batch_size)
    steps = int(recipe.local_steps)
    if steps <= 0 or samples % steps:
        raise ValueError(
            f"dp_recipe.local_steps is {recipe.local_steps}: it must divide the {samples} samples a "
            f"round of `federation` gives a site ({fed.local_steps} steps x batch {fed.batch_size})"
        )
    change = {
        "federation": {"local_steps": steps, "batch_size": samples // steps, "lr": float(recipe.lr)},
        "privacy": {"max_grad_norm": float(recipe.max_grad_norm), "train": str(recipe.get("train", "all"))},
    }
    return cast(DictConfig, OmegaConf.merge(dcfg, change))


def run_setting(
    cfg: DictConfig,
    runs: Path,
    epsilon: float | None,
    settings: Settings,
    draw: int | None = None,
    federate: Callable[[DictConfig, Path], tuple[FederationSetup, HealthFM, int]] = run_federation,
) -> str:
    """One federation with the server asking for `epsilon` (None: no DP), into runs/<setting>;
    `draw`: one of several runs of the same setting (each its own secret noise draw: the privacy
    engine's noise is unseeded whatever the run's seed), labelled "<setting> draw <draw>";
    `federate(cfg, fed_dir)`: what trains it (the evidence job's loads a finished one instead)."""
    t0 = time.perf_counter()
    fed_dir = runs / setting_dir(epsilon, draw)
    log.info("federation at %s into %s", compare.epsilon_label(epsilon), fed_dir)
    setup, model, _ = federate(
        cast(DictConfig, OmegaConf.merge(cfg, {"privacy": {"target_epsilon": epsilon}})), fed_dir
    )
    return settings.add(epsilon, setup, model, fed_dir, time.perf_counter() - t0, draw)


def evaluate_settings(
    settings: Settings,
    per_site_data: Mapping,
    ev: Mapping[str, Any],
    progress: bool,
    view: Callable[[HealthFM], Any] | None = None,
) -> compare.PerSite:
    """Each setting's per-site probes; `view` (e.g. the evidence job's probe_view) is what the
    probes read of a model (default: the model's own embedding)."""
    per_site: compare.PerSite = {name: {} for name in per_site_data}
    for label, model in settings.models.items():
        shown = model if view is None else view(model)
        res, _ = compare.evaluate_per_site(label, per_site_data, shown, progress=progress, **ev)
        for name, r in res.items():
            per_site[name][label] = r
    return per_site


def run(cfg: DictConfig) -> Path:
    clock = Clock()
    torch.set_num_threads(int(cfg.threads))
    epsilons = parse_epsilons(list(cfg.epsilons))
    out = Path(cfg.out_dir)
    runs = prepare_out_dir(out)
    sites, _, _ = open_sites(cfg.scenario, cfg.data_dir, cfg.seed, cfg.n_subjects, cfg.site_roots)
    clock.lap("data (generate or reuse)")

    settings = Settings()
    private = dp_recipe_config(cfg, cfg.get("dp_recipe"))
    for epsilon in epsilons:
        label = run_setting(cfg if epsilon is None else private, runs, epsilon, settings)
        clock.lap(f"federation {label}")
    setup = settings.setup
    assert setup is not None

    seqs = {name: SiteSequences.from_site(site, setup.vocabulary, tokens=setup.tokens) for name, site in sites.items()}
    per_site_data = onset_eval_data(cfg, sites, seqs)
    per_site = evaluate_settings(settings, per_site_data, eval_settings(cfg), bool(cfg.progress))
    clock.lap("evaluation (per site, every onset task and horizon)")
    return write_sweep(cfg, out, clock, settings, per_site)


def privacy_section(
    cfg: DictConfig, out: Path, settings: Settings, per_site: compare.PerSite
) -> tuple[list[str], list[Any]]:
    """The table, its notes and the plot (written to out/utility_vs_epsilon.png) as markdown
    lines; also the summary rows."""
    rows = compare.summarize(per_site, list(settings.epsilon))
    plot = compare.privacy_plot(rows, settings.epsilon, out / "utility_vs_epsilon.png") if rows else None
    fed, priv = cfg.federation, cfg.privacy
    assert settings.setup is not None
    lines = [
        f"Each setting is one federation over the same {len(per_site)} sites ({', '.join(per_site)}), vocabulary and "
        f"initialisation (setup {settings.setup.sha256[:12]}): {fed.rounds} rounds x {fed.local_steps} local steps per site, "
        f"batch {fed.batch_size} (under DP the expected size of a Poisson-sampled batch), lr {fed.lr}, model "
        f"`{cfg.model.name}`. Under DP the server asks each site for the target epsilon over the run's "
        f"{fed.rounds * fed.local_steps} planned steps at delta {priv.delta:g}, clipping norm {priv.max_grad_norm:g}; "
        "each site turns it into a noise multiplier at its sampling rate (batch / its train subjects), clips "
        "per-sample gradients (batch-of-one loop) and accounts every step in its own ledger (RDP), which starts "
        "empty in each setting."
        + (
            f" The DP settings train at their own recipe at the same samples seen: {cfg.dp_recipe.local_steps} local "
            f"steps a round of the larger Poisson batch, lr {cfg.dp_recipe.lr:g}, clipping norm "
            f"{cfg.dp_recipe.max_grad_norm:g}"
            + (", only the modality encoders trained." if cfg.dp_recipe.get("train") == "encoders" else ".")
            if cfg.get("dp_recipe")
            else ""
        ),
        "",
        "Evaluation as in the comparison report: per site, frozen linear probes on the final global model's "
        "embeddings, fitted on the site's train rows (C from its tuning rows) and scored on its held_out rows, "
        "every new-onset task; means over the (site, task) pairs every setting has.",
        "",
        "### Mean held-out AUROC / ECE per horizon, and the epsilon each site spent",
        "",
        compare.privacy_table(rows, settings.epsilon, settings.spent)
        if rows
        else "No (site, task) pair was evaluated in every setting.",
        "",
        "Spent = the site's cumulative epsilon (at its delta) after the last round, as it reported it.",
    ]
    problems = [f"{label}: site {s} {why}" for label, per in settings.trouble.items() for s, why in per.items()]
    if problems:
        lines += ["", "Sites that did not contribute in some round: " + "; ".join(problems) + "."]
    lines += ["", "| target epsilon | run | wall s | (site, task) pairs |", "|---|---|---:|---:|"]
    by_method: dict[str, int] = {}
    for r in rows:
        by_method[r.method] = by_method.get(r.method, 0) + r.pairs
    for label, eps in settings.epsilon.items():
        run_dir = settings.dirs[label]
        shown = run_dir.relative_to(out).as_posix() if run_dir.is_relative_to(out) else str(run_dir)
        lines.append(
            f"| {'none' if eps is None else f'{eps:g}'} | `{shown}/` | "
            f"{settings.seconds[label]:.0f} | {by_method.get(label, 0)} |"
        )
    if plot is not None:
        lines += ["", f"![Utility against epsilon]({plot.name})"]
    return lines, rows


def write_sweep(cfg: DictConfig, out: Path, clock: Clock, settings: Settings, per_site: compare.PerSite) -> Path:
    section, rows = privacy_section(cfg, out, settings, per_site)
    lines = [
        "# Utility against the privacy budget (DP-SGD at every site)",
        "",
        f"Wall time {clock.total / 60:.1f} min on {torch.get_num_threads()} torch thread(s) here, Ray with "
        f"{cfg.ray.num_cpus} CPUs: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()) + ".",
        "",
        "## Utility against epsilon",
        "",
        *section,
    ]
    assert settings.setup is not None
    dump = {
        "settings": dict(settings.epsilon),
        "summary": [r.model_dump() for r in rows],
        "spent": settings.spent,
        "trouble": settings.trouble,
        "rows": {
            s: {m: [r.model_dump() for r in res.rows] for m, res in methods.items()} for s, methods in per_site.items()
        },
        "seconds": settings.seconds,
        "phases_seconds": clock.phases,
        "setup_sha256": settings.setup.sha256,
        "federation": OmegaConf.to_container(cfg.federation, resolve=True),
        "privacy": OmegaConf.to_container(cfg.privacy, resolve=True),
    }
    return write_outputs(out, MARKER, dump, "privacy.md", lines, clock)


@hydra.main(config_path="../configs", config_name="privacy_sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_job_logging()
    try:
        print(run(cfg))
    except RayStartError as err:
        sys.exit(f"simulations.privacy_sweep: {err}")  # one line, exit status 1


if __name__ == "__main__":
    sys.exit(main())
