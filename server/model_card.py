"""The model card of a release, generated from the run's own record (markdown and the same as JSON).

Everything on it comes from the run directory: the setup event (sites, their modalities and
subject counts), the round events (examples trained per site, each site's cumulative epsilon),
the last evaluation (evaluation.json: per site and task the metric with its 95% subject-bootstrap
interval, calibration error, or the reason there is none; copied, never recomputed, so the card's
numbers are the report's), the run config (training budget, DP request) and the setup (model,
vocabulary, token settings). Subject counts below the federation's minimum are not shown
(`<N`). The TRIPOD+AI items a run can fill are filled; the rest are listed for the authors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from healthfm_core.eval.federation_auroc import FederationAUROC
from healthfm_core.eval.outcomes import outcome_table, replies_from_event
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, FederationSetup, largest_row_share, median_site_metrics
from healthfm_core.protocol.site_share import SHARE_CAP_RULE
from server.config import FederationConfig

# TRIPOD+AI (Collins et al., BMJ 2024) items a federated pretraining run cannot know.
TO_BE_COMPLETED = (
    "Title and abstract (TRIPOD+AI 1-2)",
    "Background, objectives and intended clinical pathway (3)",
    "Study dates, setting and eligibility criteria of each site's cohort (5-6)",
    "Sample size justification (9)",
    "Ethics approval and consent at each site (5, 21)",
    "Fairness: performance in subgroups (sex, age, ethnicity, site) and how it was assessed (12, 23)",
    "Model updating, monitoring and clinical implementation (13, 27)",
    "Patient and public involvement (18)",
    "Registration, protocol, funding and conflicts of interest (18-19)",
    "Interpretation, limitations in the intended setting and usability (24-27)",
)

INTENDED_USE = (
    "A frozen feature extractor for research: embeddings of a subject's EHR events, wearable epochs "
    "and polygenic scores at a prediction time, on which a site fits its own linear probe or head "
    "and validates it on its own held-out subjects."
)
LIMITS = (
    "Not a medical device and not validated for clinical decisions.",
    "Pretrained on the federation's sites only; codes outside the vocabulary are read as unknown.",
    "The evaluation below is each site's frozen linear probe on its own splits, not external validation.",
    "A site lacking a modality the model was trained with gets embeddings without it; one with a "
    "modality the model lacks cannot use it.",
)


def shown_count(n: int, minimum: int) -> int | str:
    """A subject count as the card shows it: itself at or above the minimum (or 0), else `<minimum`."""
    return n if n == 0 or n >= minimum else f"<{minimum}"


def _f(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def model_card(
    setup: FederationSetup,
    cfg: FederationConfig,
    events: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any] | None,
    eval_config: EvalConfig | None,
    run_id: str,
    round_done: int,
    groups_trained: Sequence[str],
    untrained_groups: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(markdown, JSON data) of the card (see the module docstring). `untrained_groups`: group ->
    why no round trained it (server/outcome.py untrained_groups), named on the card."""
    minimum = cfg.vocab_min_subjects
    start = [e for e in events if e["event"] in ("setup", "resume")]
    rounds = {e["round"]: e for e in events if e["event"] == "round" and e["round"] <= round_done}
    site_caps = start[-1]["sites"] if start else {}
    examples: dict[str, dict[str, int]] = {}
    for e in rounds.values():
        for site, s in e["sites"].items():
            if s.get("status") == "ok":
                per = examples.setdefault(site, {})
                for group, n in s.get("num_examples", {}).items():
                    per[group] = per.get(group, 0) + int(n)
    epsilon: dict[str, float] = {}
    for _, e in sorted(rounds.items()):
        epsilon.update(e.get("epsilon", {}))
    sites = {
        name: {
            "modalities": caps["modalities"],
            "subjects": {m: shown_count(int(n), minimum) for m, n in caps["subjects"].items()},
            "examples_trained": examples.get(name, {}),
            "epsilon": epsilon.get(name),
        }
        for name, caps in sorted(site_caps.items())
    }
    n_params = sum(int(np.prod(v.shape)) for v in init_model(setup).state_dict().values())
    tasks: dict[str, Any] = {}
    if eval_config is not None:
        for spec in eval_config.tasks:
            tasks[spec.name] = {
                "kind": spec.kind,
                "horizons_days": list(spec.horizons_days),
                "keys": spec.keys(),
                "definition": spec.aces_yaml,
            }
    card: dict[str, Any] = {
        "model": {
            "name": setup.model.name,
            "d_model": setup.model.d_model,
            "embedding_width": setup.embedding_width,
            "n_layers": setup.model.n_layers,
            "n_heads": setup.model.n_heads,
            "parameters": n_params,
            "modalities": setup.modalities,
            "groups_trained": list(groups_trained),
            "untrained_groups": dict(untrained_groups or {}),
            "vocab_size": setup.vocabulary.vocab_size,
            "prs_traits": setup.vocabulary.prs_traits,
            "tokens": setup.tokens.model_dump(),
            "setup_sha256": setup.sha256,
        },
        "run": {"run_id": run_id, "rounds_done": round_done, "rounds_planned": cfg.rounds},
        "training": {
            "rounds": round_done,
            "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "max_events": cfg.max_events,
            "max_patches": cfg.max_patches,
            "transport": cfg.transport,
            "downlink": cfg.downlink,
            "server_optimizer": None if cfg.server_optimizer is None else cfg.server_optimizer.model_dump(),
        },
        "privacy": {
            "request": cfg.privacy.model_dump(),
            "described": cfg.privacy.describe(),
            "epsilon_per_site": epsilon,
        },
        "minimum_subjects_shown": minimum,
        "sites": sites,
        "tasks": tasks,
        "evaluation": dict(evaluation) if evaluation is not None else None,
        "intended_use": INTENDED_USE,
        "limits": list(LIMITS),
        "tripod_ai": {
            "data_sources": "sites, their modalities and subject counts (above)",
            "outcome_definitions": "tasks: ACES definitions (above)",
            "missing_data": "each site's modalities; a missing modality contributes no tokens",
            "performance_with_uncertainty": "evaluation: AUROC with 95% subject-bootstrap intervals per site",
            "calibration": "evaluation: expected calibration error per site",
            "to_be_completed_by_the_authors": list(TO_BE_COMPLETED),
        },
    }
    return _markdown(card, evaluation, minimum), card


def pooled_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The federation-wide AUROC per binary task as evaluation.json records it (copied), with the
    median over sites, the share cap and the sites it capped beside it."""
    pooled = {str(k): FederationAUROC.model_validate(f) for k, f in (evaluation.get("federation") or {}).items()}
    if not pooled:
        return []
    lines = [
        f"Federation-wide AUROC (the sites' score histograms pooled; {SHARE_CAP_RULE}), beside it the median "
        "of the sites' AUROCs and the sites the cap lowered (each site's own value: the table above):",
        "",
        "| task | pooled AUROC (95% CI) | median over sites | capped (claimed -> weight) |",
        "|---|---|---|---|",
    ]
    for key, f in pooled.items():
        value = (
            f"n/a: {f.note}"
            if f.auroc is None
            else f"{f.auroc:.3f} [{_f(f.low)}, {_f(f.high)}] over {len(f.sites)} site(s), {f.rows} rows"
        )
        lines.append(f"| {key} | {value} | {_f(f.median_site_auroc)} | {f.capped_text()} |")
    return [*lines, ""]


def _markdown(card: Mapping[str, Any], evaluation: Mapping[str, Any] | None, minimum: int) -> str:
    m, t, p = card["model"], card["training"], card["privacy"]
    lines = [
        f"# Model card: healthfm `{m['name']}`, run {card['run']['run_id']}",
        "",
        "## Model",
        "",
        f"- Architecture: continuous-time transformer, d_model {m['d_model']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads, {m['parameters']:,} parameters",
        f"- Embedding: {m['embedding_width']} values per (subject, time): the query state ({m['d_model']})"
        + (", then the genomics encoder's output (zero without PRS)" if m["embedding_width"] > m["d_model"] else ""),
        f"- Modalities: {', '.join(m['modalities'])}; parameter groups trained by some site: "
        f"{', '.join(m['groups_trained'])}",
        *(
            [
                "- **Untrained parameter groups** (no round averaged an update into them: their weights are "
                "the initialisation, and what the model computes from them is not learned): "
                + "; ".join(f"{g} ({why})" for g, why in sorted(m["untrained_groups"].items()))
            ]
            if m.get("untrained_groups")
            else []
        ),
        f"- Vocabulary: {m['vocab_size']} codes; PRS traits: {', '.join(m['prs_traits']) or 'none'}",
        f"- Tokens: window {m['tokens']['token_window_days']:g} day(s), at most "
        f"{m['tokens']['max_codes_per_token']} codes per token",
        f"- Federation setup sha256: `{m['setup_sha256']}`",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limits",
        "",
        *[f"- {x}" for x in card["limits"]],
        "",
        "## Training",
        "",
        f"- {t['rounds']} federated round(s) of {card['run']['rounds_planned']} planned, {t['local_steps']} local "
        f"step(s) of batch {t['batch_size']} per site and round, lr {t['lr']:g}, transport {t['transport']} "
        f"(downlink {t.get('downlink', 'fp32')})",
        f"- Differential privacy: {p['described']}",
        "",
        f"## Sites (data sources; subject counts below {minimum} not shown)",
        "",
        "| site | modalities | subjects per modality | examples trained per group | epsilon |",
        "|---|---|---|---|---|",
    ]
    for name, s in card["sites"].items():
        subjects = ", ".join(f"{k} {v}" for k, v in s["subjects"].items())
        trained = ", ".join(f"{k} {v}" for k, v in sorted(s["examples_trained"].items())) or "none"
        eps = "-" if s["epsilon"] is None else f"{s['epsilon']:.3f}"
        lines.append(f"| {name} | {', '.join(s['modalities'])} | {subjects} | {trained} | {eps} |")
    lines += ["", "## Tasks (outcome definitions)", ""]
    if not card["tasks"]:
        lines.append("The run evaluated no task.")
    for name, task in card["tasks"].items():
        horizons = ", ".join(f"{h} days" for h in task["horizons_days"]) or "as defined"
        lines.append(f"- `{name}` ({task['kind']}; horizons: {horizons}; keys {', '.join(task['keys'])})")
    lines += ["", "## Performance with uncertainty and calibration", ""]
    if evaluation is None:
        lines.append("No evaluation in the run.")
    else:
        keys, per_site, asked = replies_from_event(evaluation)
        lines += [
            f"Each site's frozen linear probe after round {evaluation['round']} on its own held-out subjects "
            "(95% subject-bootstrap interval of the AUROC; ECE: expected calibration error):",
            "",
            outcome_table(keys, per_site, asked),
            "",
            *pooled_lines(evaluation),
            f"n-weighted mean over sites ({SHARE_CAP_RULE}), and beside it the median over sites (each site "
            "once, whatever rows it claims: the robust summary), the site with the largest share of the weights "
            "and the sites the cap lowered:",
            "",
            "| task | AUROC | AUPRC | ECE | n | median AUROC over sites | largest share | capped (weight) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        agg = evaluation.get("aggregated", {})
        median, largest = median_site_metrics(per_site), largest_row_share(per_site)
        for key in keys:
            if f"{key}.auroc" in agg or f"{key}.r2" in agg:
                metric = "r2" if f"{key}.r2" in agg else "auroc"
                first = f"R2 {_f(agg[key + '.r2'])}" if metric == "r2" else _f(agg.get(f"{key}.auroc"))
                big = largest.get(key)
                share = f"{big['site']} {100 * big['share']:.0f}%" if big else "-"
                capped = ", ".join(f"{s} {w:.0f}" for s, w in (big or {}).get("capped", {}).items()) or "none"
                lines.append(
                    f"| {key} | {first} | {_f(agg.get(f'{key}.auprc'))} | {_f(agg.get(f'{key}.ece'))} "
                    f"| {int(agg.get(f'{key}.n', 0))} | {_f(median.get(f'{key}.{metric}'))} | {share} | {capped} |"
                )
        if rejected := evaluation.get("rejected") or {}:
            lines += ["", "Evaluation replies rejected (in no number above):", ""]
            lines += [f"- site {site}: {why}" for site, why in sorted(rejected.items())]
    lines += [
        "",
        "## TRIPOD+AI",
        "",
        "Filled from the run: data sources (Sites), outcome definitions (Tasks), missing data (each site's "
        "modalities; a missing modality contributes no tokens), performance with uncertainty and calibration "
        "(above).",
        "",
        "To be completed by the authors:",
        "",
        *[f"- [ ] {x}" for x in card["tripod_ai"]["to_be_completed_by_the_authors"]],
        "",
    ]
    return "\n".join(lines)


__all__ = ["model_card", "pooled_lines", "shown_count"]
