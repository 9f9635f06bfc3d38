"""Zero-shot onset forecasting (question `z`) and the repeated-event pitfall (question `r`) in the
evidence job (issue 72).

z. Every onset task scored by the model's own future_codes head (healthfm_core/eval/zero_shot.py:
   P(the task's codes in (prediction time, + horizon]), no task-specific training) on the same
   held-out rows as the frozen probes, per site, for the federated and the pooled model; they
   join the per-site summary beside the probes, the tabular baseline and the oracle. Paired, over
   seeds, sites, tasks and horizons: zero-shot - the probe of the same model (all horizons and per
   horizon), - the tabular baseline, - the oracle, and - a probe that reads only the query state
   (what the head reads: the probes' features are [query state, genomics encoder output]), which
   splits the gap into the head's read-out and the genomics path. The budget curve's FedAvg
   federations add zero-shot - probe as rounds grow (`z|budget: ...`).

r. The repeated-event pitfall (arXiv 2507.00574): the onset tasks with repeats counted
   (healthfm_core/data/labels/repeat_events.py: the exclusion of prevalent cases removed, so a
   recurrence of the diagnosis is a positive) against the shipped labels (new onsets only). The
   same federated model scored on both, zero-shot and by its probe: the two definitions' rows
   differ (the prevalent rows), so these comparisons draw subjects once for both row sets
   (compare_row_sets). And pretrained without the separate repeat term
   (`repeated_events.variant`: next-visit and future-codes over every code in one balanced term)
   against the pooled model (separate term), at the same budget, zero-shot on both label sets and
   probed on new onsets, paired on the same rows. The counts of the positives that are repeats
   are in the unit's diagnostics.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from healthfm_core.data.labels.repeat_events import counting_repeats
from healthfm_core.data.labels.task_spec import AcesOnsetTask
from healthfm_core.eval import compare
from healthfm_core.eval.metrics import auroc, log_loss
from healthfm_core.eval.paired_comparison import Comparison, RowSetItem, Verdict
from healthfm_core.eval.runner import EvalSet, MethodFeatures, MethodResult, build_eval_set, evaluate_method
from healthfm_core.eval.zero_shot import zero_shot_rows
from healthfm_core.model.healthfm import HealthFM
from simulations.common import site_eval_rows_per_subject
from simulations.evidence_stage import Unit, pooled_variant, site_items
from simulations.evidence_units import Evidence

log = logging.getLogger("healthfm.simulations.evidence")

QUESTIONS = {
    "z": "Zero-shot onset forecasting from the model's own future_codes head, beside the probes",
    "r": "The repeated-event pitfall: repeats counted against new onsets only, and the separate repeat term",
}
ZERO_SHOT = "zero-shot"  # the federated model's head
ZERO_SHOT_POOLED = "zero-shot (pooled)"
QUERY_PROBE = "federated probe [query state]"  # what the head reads: the probes' features without the genomics output
REPEATS = "repeats pooled in pretraining"  # repeated_events.variant's model
KEY = "issue72"  # this module's entry in a unit's diagnostics (r's counts)
HEAD_KEY = "issue72_head"  # z's fit of the head to each task's codes (head_fit)
# A head whose logits vary less than this over a task's rows (standard deviation) barely tells
# them apart (the tiny model's head on the quick preset's rows: ~1e-4): under-trained.
FLAT_HEAD = 0.01


def methods(cfg: DictConfig) -> list[str]:
    """The methods this module adds to a unit's per-site summary."""
    return [ZERO_SHOT, ZERO_SHOT_POOLED] if bool(cfg.zero_shot.enabled) else []


def pitfall_runs_here(cfg: DictConfig, scenario: str, seed: int) -> bool:
    r = cfg.repeated_events
    return bool(cfg.zero_shot.enabled) and scenario in r.scenarios and int(seed) in r.seeds


def not_run(cfg: DictConfig, question: str, scenario: str) -> str | None:
    """Why question z or r has no number for a scenario, when it is the config's choice."""
    if question in QUESTIONS and not bool(cfg.zero_shot.enabled):
        return "not run (zero_shot.enabled: false)"
    if question == "r" and not any(pitfall_runs_here(cfg, scenario, int(s)) for s in cfg.seeds):
        return "not run for this scenario (repeated_events.scenarios / seeds)"
    return None


def stage_name(unit: str) -> str:
    return f"{unit}: zero-shot and repeated events"


def plan(
    cfg: DictConfig, scenario: str, seed: int, unit: str, train_s: float, eval_s: float
) -> list[tuple[str, float]]:
    """The stage for the plan: zero-shot scores of the federated and pooled models and their
    query-state probes (`cost.zero_shot_evaluations` of one model's per-site evaluation,
    `eval_s`); where the pitfall runs, one pooled training (`train_s`) and the evaluations of the
    repeat-counting rows, which hold the prevalent ones too (`cost.repeated_events_evaluations`)."""
    if not bool(cfg.zero_shot.enabled):
        return []
    t = float(cfg.cost.zero_shot_evaluations) * eval_s
    if pitfall_runs_here(cfg, scenario, seed):
        t += train_s + float(cfg.cost.repeated_events_evaluations) * eval_s
    return [(stage_name(unit), t)]


def budget_plan(cfg: DictConfig, eval_s: float) -> float:
    """What budget_zero_shot adds to the budget curve's stage: half of z's cost (one model's
    held-out pass, no probe) for each FedAvg budget."""
    bc = cfg.budget_curve
    if not bool(cfg.zero_shot.enabled):
        return 0.0
    n = sum(not change for change in bc.strategies.values()) * len(bc.rounds)
    return n * 0.5 * float(cfg.cost.zero_shot_evaluations) * eval_s


def settings(u: Unit) -> dict[str, Any]:
    fed = u.fed
    return {
        "max_events": fed.max_events,
        "max_patches": fed.max_patches,
        "batch_size": u.cfg.eval.batch_size,
        "n_boot": u.n_boot,
        "seed": u.seed,
    }


def zero_shot_per_site(
    u: Unit, per_site_data: Mapping[str, EvalSet], model: torch.nn.Module, method: str
) -> dict[str, MethodResult]:
    """The model's zero-shot scores on every site's held-out rows."""
    if not isinstance(model, HealthFM):
        raise TypeError(f"zero-shot scores need a HealthFM (its future_codes head), got {type(model).__name__}")
    codes = u.setup.vocabulary.codes
    return {name: zero_shot_rows(method, data, model, codes, **settings(u)) for name, data in per_site_data.items()}


def add_zero_shot(u: Unit, per_site_data: Mapping[str, EvalSet], per_site: compare.PerSite) -> None:
    """per_site[site]["zero-shot"] (federated) and ["zero-shot (pooled)"]: the summary's rows."""
    if not bool(u.cfg.zero_shot.enabled):
        return
    for method, model in ((ZERO_SHOT, u.fed_model), (ZERO_SHOT_POOLED, u.regimes.central_model)):
        for name, res in zero_shot_per_site(u, per_site_data, model, method).items():
            per_site[name][method] = res


def zero_shot_comparisons(
    u: Unit,
    per_site_data: Mapping[str, EvalSet],
    per_site: compare.PerSite,
    features: Mapping[str, Mapping[str, MethodFeatures]],
    horizons: Mapping[str, int],
) -> None:
    """Question z's paired comparisons (the scores are in per_site already: add_zero_shot)."""
    if not bool(u.cfg.zero_shot.enabled):
        return
    ev_out, scenario, seed = u.ev_out, u.scenario, u.seed

    def add(key: str, a: str, b: str, keep: Any = lambda k: True) -> None:
        ev_out.add(scenario, f"z|{key}", a, b, seed, site_items(per_site_data, per_site, a, b, keep))

    add("federated: zero-shot - probe", ZERO_SHOT, "federated")
    for h in sorted(set(horizons.values())):
        add(f"federated, {h} d: zero-shot - probe", ZERO_SHOT, "federated", lambda k, h=h: horizons.get(k) == h)
    add("federated: zero-shot - tabular", ZERO_SHOT, "tabular")
    add("federated: zero-shot - oracle", ZERO_SHOT, "oracle")
    add("pooled: zero-shot - probe", ZERO_SHOT_POOLED, "pooled")
    # The probe on the query state alone (the head's input), from the features already computed.
    d = int(u.setup.model.d_model)
    for name, data in per_site_data.items():
        f = features.get("federated", {}).get(name)
        if f is not None:
            query = MethodFeatures(f.x[:, :d], f.present, f.rows)
            per_site[name][QUERY_PROBE] = evaluate_method(QUERY_PROBE, data, query, n_boot=u.n_boot, seed=seed)
    add("federated: zero-shot - probe on the query state", ZERO_SHOT, QUERY_PROBE)
    add("federated: probe on the query state - probe", QUERY_PROBE, "federated")
    u.ev_out.diagnostics[scenario].setdefault(seed, {})[HEAD_KEY] = head_fit(per_site_data, per_site)


def head_fit(per_site_data: Mapping[str, EvalSet], per_site: compare.PerSite) -> dict[str, dict[str, float]]:
    """Per task key, pooled over sites, on the rows both the zero-shot head and the federated
    probe scored: held-out rows, positive rate, train positives (what the probe could learn
    from), the head's mean probability, the spread of its logits over the rows, and its log loss
    against the probe's. Logits that hardly vary between rows (FLAT_HEAD) are a head not yet
    trained to tell the rows apart: the budget. A head whose mean
    probability is far from the positive rate is miscalibrated for those codes (the balanced BCE
    shifts it by design); a log loss far above the probe's on the same rows says it reads the
    task's codes worse than a fitted read-out of the same model does."""
    pooled: dict[str, dict[str, list[np.ndarray]]] = {}
    train_pos: dict[str, int] = {}
    for name, data in per_site_data.items():
        z, probe = per_site[name].get(ZERO_SHOT), per_site[name].get("federated")
        if z is None or probe is None:
            continue
        for key in z.predictions.keys() & probe.predictions.keys():
            both, iz, ip = np.intersect1d(z.scored_rows[key], probe.scored_rows[key], return_indices=True)
            if len(both) == 0:
                continue
            y, pz = z.predictions[key]
            part = pooled.setdefault(key, {"y": [], "zero": [], "probe": []})
            part["y"].append(y[iz].astype(float))
            part["zero"].append(pz[iz])
            part["probe"].append(probe.predictions[key][1][ip])
            labels = data.labels(key)
            train_pos[key] = train_pos.get(key, 0) + int(np.nansum(labels[data.column("split") == "train"]))
    out: dict[str, dict[str, float]] = {}
    for key, part in sorted(pooled.items()):
        y, pz, pp = (np.concatenate(part[k]) for k in ("y", "zero", "probe"))
        out[key] = {
            "rows": float(len(y)),
            "positive_rate": float(y.mean()),
            "train_positives": float(train_pos[key]),
            "zero_shot_mean_p": float(pz.mean()),
            "zero_shot_logit_sd": float(np.std(np.log(pz) - np.log1p(-pz))),
            "zero_shot_log_loss": float(log_loss(y, pz)),
            "probe_log_loss": float(log_loss(y, pp)),
            "zero_shot_auroc": float(auroc(y, pz)) if 0 < y.sum() < len(y) else float("nan"),
            "probe_auroc": float(auroc(y, pp)) if 0 < y.sum() < len(y) else float("nan"),
        }
    return out


def budget_zero_shot(
    u: Unit, per_site_data: Mapping[str, EvalSet], budget: compare.PerSite, label: str, model: torch.nn.Module, key: str
) -> None:
    """The budget curve's model `label` scored zero-shot against its own probe (budget[site][label])."""
    if not bool(u.cfg.zero_shot.enabled):
        return
    zero = f"{label}, zero-shot"
    for name, res in zero_shot_per_site(u, per_site_data, model, zero).items():
        budget[name][zero] = res
    u.ev_out.add(
        u.scenario,
        f"z|budget: {key}: zero-shot - probe",
        zero,
        label,
        u.seed,
        site_items(per_site_data, budget, zero, label),
    )


# ---------------------------------------------------------------- r: the repeated-event pitfall


def repeat_counting_data(u: Unit, per_site_data: Mapping[str, EvalSet]) -> dict[str, EvalSet]:
    """Every site's rows of the onset tasks with repeats counted (same keys, same row cap and
    seed as the shipped tasks' rows: compare.split_sites of build_eval_set)."""
    tasks = next(iter(per_site_data.values())).tasks
    counting: dict[str, Any] = {}
    for key, task in tasks.items():
        if isinstance(task, AcesOnsetTask):
            counting[key] = task.model_copy(update={"aces": counting_repeats(task.aces)})
    sites = {name: (u.sites[name], per_site_data[name].sites[0].seqs) for name in per_site_data}
    data = build_eval_set(sites, counting, n_per_subject=site_eval_rows_per_subject(u.ucfg), seed=u.seed)
    return compare.split_sites(data)


def row_set_items(
    data_a: Mapping[str, EvalSet],
    a: Mapping[str, MethodResult],
    data_b: Mapping[str, EvalSet],
    b: Mapping[str, MethodResult],
) -> list[RowSetItem]:
    """Per site and task both scored: (y, p, subject) of a's rows and of b's."""
    out: list[RowSetItem] = []
    for name in data_a:
        if name not in a or name not in b or name not in data_b:
            continue
        ka, kb = data_a[name].subject_keys(), data_b[name].subject_keys()
        for key in data_a[name].tasks:
            if key in a[name].predictions and key in b[name].predictions:
                ya, pa_ = a[name].predictions[key]
                yb, pb = b[name].predictions[key]
                out.append((ya, pa_, ka[a[name].scored_rows[key]], yb, pb, kb[b[name].scored_rows[key]]))
    return out


def repeat_counts(counting: Mapping[str, EvalSet], per_site_data: Mapping[str, EvalSet]) -> dict[str, Any]:
    """Held-out rows and positives under both definitions, summed over sites and tasks: how many
    of the repeat-counting positives are repeats (rows of a subject already diagnosed)."""
    out = {"rows_counting_repeats": 0, "positives_counting_repeats": 0, "rows_new_onsets": 0, "positives_new_onsets": 0}
    for name, data in counting.items():
        for key in data.tasks:
            for prefix, d in (("counting_repeats", data), ("new_onsets", per_site_data[name])):
                y = d.labels(key)[d.column("split") == "held_out"]
                y = y[np.isfinite(y)]
                out[f"rows_{prefix}"] += len(y)
                out[f"positives_{prefix}"] += int(y.sum())
    return out


def repeated_events(
    u: Unit,
    per_site_data: Mapping[str, EvalSet],
    per_site: compare.PerSite,
    ev: Mapping[str, Any],
    view: Any,
) -> None:
    """Question r (repeated_events' scenarios and seeds)."""
    cfg, scenario, seed, ev_out = u.cfg, u.scenario, u.seed, u.ev_out
    if not pitfall_runs_here(cfg, scenario, seed):
        return
    counting = repeat_counting_data(u, per_site_data)
    fed_any = zero_shot_per_site(u, counting, u.fed_model, ZERO_SHOT)
    new = {name: res[ZERO_SHOT] for name, res in per_site.items() if ZERO_SHOT in res}
    ev_out.add_row_sets(
        scenario,
        "r|federated, zero-shot: repeats counted - new onsets only",
        f"{ZERO_SHOT}, repeats counted",
        f"{ZERO_SHOT}, new onsets only",
        seed,
        row_set_items(counting, fed_any, per_site_data, new),
    )
    probe_any, _ = compare.evaluate_per_site("federated", counting, view(u.fed_model), progress=u.show, **ev)
    probe_new = {name: res["federated"] for name, res in per_site.items() if "federated" in res}
    ev_out.add_row_sets(
        scenario,
        "r|federated, probe: repeats counted - new onsets only",
        "federated probe, repeats counted",
        "federated probe, new onsets only",
        seed,
        row_set_items(counting, probe_any, per_site_data, probe_new),
    )
    # Pretrained without the separate repeat term, against the pooled model (same budget).
    variant = pooled_variant(
        u.setup, u.regimes, u.fed, seed, u.show, cfg.repeated_events.variant, "repeated_events.variant"
    )
    zero = f"{REPEATS}, zero-shot"
    pooled_any = zero_shot_per_site(u, counting, u.regimes.central_model, ZERO_SHOT_POOLED)
    variant_any = zero_shot_per_site(u, counting, variant, zero)
    any_results: compare.PerSite = {n: {ZERO_SHOT_POOLED: pooled_any[n], zero: variant_any[n]} for n in counting}
    probes, _ = compare.evaluate_per_site(REPEATS, per_site_data, view(variant), progress=u.show, **ev)
    for name, res in zero_shot_per_site(u, per_site_data, variant, zero).items():
        per_site[name][zero] = res
        if name in probes:
            per_site[name][REPEATS] = probes[name]
    pairs = {
        "zero-shot, new onsets only": (per_site_data, per_site, zero, ZERO_SHOT_POOLED),
        "zero-shot, repeats counted": (counting, any_results, zero, ZERO_SHOT_POOLED),
        "probe, new onsets only": (per_site_data, per_site, REPEATS, "pooled"),
    }
    for what, (data, results, a, b) in pairs.items():
        ev_out.add(scenario, f"r|{what}: {REPEATS} - separate repeat term", a, b, seed, site_items(data, results, a, b))
    ev_out.diagnostics[scenario].setdefault(seed, {})[KEY] = repeat_counts(counting, per_site_data)


# ---------------------------------------------------------------- the report


def _interval(c: Comparison) -> str:
    lo, hi = c.difference_ci
    return f"{c.difference:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def verdicts(comps: Mapping[str, Comparison]) -> list[Verdict]:
    """z and r have no numeric target in the issue: what the report states for each."""
    z = {k: comps.get(f"z|federated: zero-shot - {b}") for k, b in (("probe", "probe"), ("tabular", "tabular"))}
    z_detail = "; ".join(f"zero-shot - {k} {_interval(c)}" for k, c in z.items() if c is not None)
    r_keys = {
        "zero-shot, repeats counted - new onsets only": "r|federated, zero-shot: repeats counted - new onsets only",
        "probe, repeats counted - new onsets only": "r|federated, probe: repeats counted - new onsets only",
        f"zero-shot on new onsets, {REPEATS} - separate term": f"r|zero-shot, new onsets only: {REPEATS} - separate repeat term",
    }
    r_detail = "; ".join(f"{k} {_interval(comps[v])}" for k, v in r_keys.items() if v in comps)
    return [
        Verdict(
            question="z",
            target="(no numeric target) the federated model's zero-shot head against its probe and the tabular baseline",
            met=None,
            detail=z_detail or "not measured",
        ),
        Verdict(
            question="r",
            target="(no numeric target) how much counting repeats inflates, and what the separate repeat term is worth",
            met=None,
            detail=r_detail or "not measured",
        ),
    ]


def report_lines(
    question: str, scenario: str, ev_out: Evidence, comps: Mapping[str, Comparison], far_below: float
) -> list[str]:
    """z: why the zero-shot head falls below the probe (why_lines); r: how many of the
    repeat-counting positives are repeats."""
    if question == "z":
        return why_lines(scenario, ev_out, comps, far_below)
    if question != "r":
        return []
    lines = []
    for seed, d in sorted(ev_out.diagnostics.get(scenario, {}).items()):
        c = d.get(KEY)
        if c:
            lines += [
                "",
                f"Seed {seed}, held-out rows of every site, task and horizon: repeats counted {c['rows_counting_repeats']} "
                f"rows, {c['positives_counting_repeats']} positive; new onsets only {c['rows_new_onsets']} rows, "
                f"{c['positives_new_onsets']} positive (the extra rows are prevalent cases, most of their positives "
                "recurrences of a known diagnosis).",
            ]
    return lines


def why_lines(scenario: str, ev_out: Evidence, comps: Mapping[str, Comparison], far_below: float) -> list[str]:
    """Where the federated zero-shot AUROC is more than `far_below` under its probe's: by how
    much, and the gap split by what was measured on the same rows. Head: zero-shot against a
    probe on the query state (the head's own input), and the head's log loss and mean probability
    on the task's codes (head_fit). Genomics path: that probe against the full probe. World: the
    probe against the oracle (the true risk), the most any score can reach. Budget: the budget
    curve's zero-shot - probe as rounds grow, where it ran."""
    gap = comps.get("federated: zero-shot - probe")
    if gap is None:
        return []
    far = gap.difference < -far_below
    lines = [
        "",
        f"**Zero-shot against the probe.** The federated model's head scores {_interval(gap)} AUROC "
        f"against its own probe on the same rows: "
        + (f"more than {far_below:.2f} below (far below)." if far else f"within {far_below:.2f}."),
    ]
    head = comps.get("federated: zero-shot - probe on the query state")
    genomics = comps.get("federated: probe on the query state - probe")
    oracle_z = comps.get("federated: zero-shot - oracle")
    parts = []
    if head is not None:
        parts.append(f"the head's read-out (zero-shot - a probe on the query state it reads) {_interval(head)}")
    if genomics is not None:
        parts.append(f"the genomics path (query-state probe - full probe) {_interval(genomics)}")
    if oracle_z is not None:
        parts.append(
            f"the world: zero-shot - oracle {_interval(oracle_z)}, so the probe sits "
            f"{oracle_z.difference - gap.difference:+.3f} from the oracle"
        )
    budget = {k: c for k, c in comps.items() if k.startswith("budget: ") and k.endswith("zero-shot - probe")}
    if budget:
        parts.append(
            "the budget: zero-shot - probe as rounds grow "
            + ", ".join(f"{k.split(': ')[1]} {_interval(c)}" for k, c in sorted(budget.items()))
        )
    if parts:
        lines.append("Split by what was measured on the same rows: " + "; ".join(parts) + ".")
    n_flat = n_fit = 0
    for seed, d in sorted(ev_out.diagnostics.get(scenario, {}).items()):
        fit = d.get(HEAD_KEY)
        if not fit:
            continue
        lines += [
            "",
            f"Seed {seed}: the head on each task's codes (held-out rows both scored, pooled over sites):",
            "",
            "| task | rows | positive rate | train positives | head's mean p | head's logit SD | head's log loss "
            "| probe's log loss | zero-shot AUROC | probe AUROC |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {int(f['rows'])} | {f['positive_rate']:.3f} | {int(f['train_positives'])} | "
            f"{f['zero_shot_mean_p']:.3f} | {f.get('zero_shot_logit_sd', math.nan):.2g} | {f['zero_shot_log_loss']:.3f} | "
            f"{f['probe_log_loss']:.3f} | {f['zero_shot_auroc']:.3f} | {f['probe_auroc']:.3f} |"
            for k, f in fit.items()
        ]
        # A unit written before the spread was recorded (resume=true) has none: nan, not flat.
        flat = [k for k, f in fit.items() if f.get("zero_shot_logit_sd", math.nan) < FLAT_HEAD]
        n_flat, n_fit = n_flat + len(flat), n_fit + len(fit)
        if flat:
            lines += [
                "",
                f"The head's logits vary by less than {FLAT_HEAD} (SD over the rows) on {len(flat)} of {len(fit)} "
                "tasks: it barely tells the rows apart, a head not yet trained at this budget; its AUROC there "
                "ranks rows by differences that small.",
            ]
    if far and head is not None and genomics is not None:
        lines += ["", likely_why(gap, head, genomics, budget, (n_flat, n_fit))]
    return lines


def likely_why(
    gap: Comparison,
    head: Comparison,
    genomics: Comparison,
    budget: Mapping[str, Comparison],
    flat: tuple[int, int] = (0, 0),
) -> str:
    """The measured split read as a cause: the larger share of the gap, whether more rounds
    close it (the budget curve's last point against its first), and `flat`: (tasks whose head
    logits hardly vary, tasks) over the seeds (an under-trained head: budget)."""
    shares = {"the head's read-out": head.difference, "the genomics path the head does not read": genomics.difference}
    main = min(shares, key=lambda k: shares[k])
    text = f"Likely why: most of the {gap.difference:+.3f} is {main} ({shares[main]:+.3f})"
    if budget:
        points = [c.difference for _, c in sorted(budget.items(), key=lambda kv: _rounds(kv[0]))]
        trend = "narrows" if points[-1] > points[0] else "does not narrow"
        text += f"; the gap {trend} as rounds grow ({points[0]:+.3f} to {points[-1]:+.3f}: budget)"
    if flat[0]:
        text += f"; the head's logits hardly vary on {flat[0]} of {flat[1]} tasks (under-trained: budget)"
    return text + "."


def _rounds(key: str) -> int:
    m = re.search(r"(\d+) rounds", key)
    return int(m.group(1)) if m else 0


__all__ = [
    "FLAT_HEAD",
    "HEAD_KEY",
    "KEY",
    "QUESTIONS",
    "QUERY_PROBE",
    "REPEATS",
    "ZERO_SHOT",
    "ZERO_SHOT_POOLED",
    "add_zero_shot",
    "budget_plan",
    "budget_zero_shot",
    "methods",
    "not_run",
    "pitfall_runs_here",
    "plan",
    "report_lines",
    "repeat_counting_data",
    "repeat_counts",
    "repeated_events",
    "row_set_items",
    "head_fit",
    "likely_why",
    "why_lines",
    "settings",
    "stage_name",
    "verdicts",
    "zero_shot_comparisons",
    "zero_shot_per_site",
]
