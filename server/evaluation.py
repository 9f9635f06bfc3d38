"""Federated evaluation: every `evaluate_every` rounds and after the last, each site probes its own
splits and reports held-out metrics with their intervals, and per binary task a histogram of its
held-out scores (small cells merged). Each reply's counts are bounded by what the site declared
at setup and what the evaluation asked (server/eval_counts.py); a reply over a bound is rejected,
named with its reason (`rejected`, and the site's line in `absent`). Of the accepted replies the
server takes n-weighted means and pools the histograms into a federation-wide AUROC per task
(healthfm_core/eval/federation_auroc.py), in both no site weighing more than twice the median of
the others' (healthfm_core/protocol/site_share.py: `share_cap`, each site's weight per task);
beside them the median over sites (unweighted), the site with the largest share of each task's
weights and the per-site table (`sites`). A site that lost
the run's setup gets it again and one more evaluate message. Written to rounds.jsonl (`evaluate`),
the audit log, evaluation.json and server.log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict

from healthfm_core.data.labels.task_spec import task_keys
from healthfm_core.eval.federation_auroc import FederationAUROC, binary_keys, federation_aurocs
from healthfm_core.eval.outcomes import outcome_lines, scored_of_available
from healthfm_core.files import atomic_write_text
from healthfm_core.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    SETUP_NEEDED_RECORD,
    EvalConfig,
    EvalReply,
    FederationSetup,
    aggregate_site_metrics,
    largest_row_share,
    median_site_metrics,
    task_weights,
)
from healthfm_core.protocol.site_share import SHARE_CAP_FACTOR, SHARE_CAP_RULE
from server.audit import AuditLog
from server.config import FederationConfig
from server.eval_counts import DeclaredCounts, declared_counts, eval_count_problem
from server.roster import Roster
from server.runlog import EventLog
from server.strategy import ModalityAwareFedAvg

log = logging.getLogger("healthfm.server")


def evaluate(
    cfg: FederationConfig,
    rnd: int,
    setup: FederationSetup,
    arrays: dict[str, np.ndarray],
    *,
    roster: Roster,
    strategy: ModalityAwareFedAvg,
    events: EventLog,
    audit: AuditLog,
) -> dict[str, float]:
    """Evaluate the global `arrays` after round `rnd` at every site (the module docstring);
    returns the n-weighted means."""
    t0 = time.perf_counter()
    eval_cfg = cfg.eval_config(rnd, setup.sha256)
    if cfg.eval_max_subjects:
        log.info(
            "evaluation after round %d: each site scores a fixed subject sample, at most %d subjects per task "
            "and split (eval_max_subjects; 0 scores every subject)",
            rnd,
            cfg.eval_max_subjects,
        )
    connected = set(roster.wait_for_nodes(f"evaluation after round {rnd}"))
    # One packed part per message, packed once per distinct group set (strategy.records_for_nodes).
    records = strategy.records_for_nodes(
        arrays, {node: groups for node, groups in sorted(roster.node_groups.items()) if node in connected}
    )
    contents = {
        node: RecordDict({ARRAYS_RECORD: record, CONFIG_RECORD: ConfigRecord(eval_cfg.to_flat())})
        for node, record in records.items()
    }
    replies = roster.ask(MessageType.EVALUATE, contents)
    need = {n for n, r in replies.items() if SETUP_NEEDED_RECORD in r.content.config_records}
    if need:  # restarted sites: the setup again, then one more evaluate message each
        for node in need:
            replies.pop(node)
        accepted = roster.resend_setup(need, f"evaluation after round {rnd}")
        replies.update(roster.ask(MessageType.EVALUATE, {n: contents[n] for n in sorted(accepted)}))
        for node in [n for n, r in replies.items() if SETUP_NEEDED_RECORD in r.content.config_records]:
            replies.pop(node)
    # Each reply parsed and its counts bounded; rejected: site -> why its reply is left out.
    answered = {node: reply for node, reply in replies.items() if not reply.has_error()}
    per_site, rejected = judge_eval_replies(
        {roster.site(node): reply.content.metric_records.get(METRICS_RECORD) for node, reply in answered.items()},
        eval_cfg,
        {roster.site(node): declared_counts(roster.sites.get(node)) for node in answered},
    )
    for node in sorted(set(replies) - set(answered)):
        rejected[roster.site(node)] = f"error reply: {replies[node].error.reason}"
    aggregated = aggregate_site_metrics(per_site)
    robust: dict[str, Any] = {
        "median": median_site_metrics(per_site),
        "largest_share": largest_row_share(per_site),
        "share_cap": {"rule": SHARE_CAP_RULE, "factor": SHARE_CAP_FACTOR, "weights": task_weights(per_site)},
    }
    seconds = time.perf_counter() - t0
    flat = {site: reply.to_records() for site, reply in per_site.items()}
    absent = {
        caps.site: (
            "did not accept the run's setup in round 0"
            if node not in roster.node_groups
            else "not connected to the SuperLink"
            if node not in contents
            else "lost the setup and did not take it again"
            if node in need and node not in replies
            else f"evaluation reply rejected: {rejected[caps.site]}"
            if caps.site in rejected
            else "no usable evaluation reply (see server.log)"
        )
        for node, caps in sorted(roster.sites.items())
        if caps.site not in per_site
    }
    asked_sites = sorted(roster.site(n) for n in roster.node_groups)
    binary = binary_keys(eval_cfg.tasks)
    asked = {
        "tasks": task_keys(eval_cfg.tasks),
        "binary_tasks": binary,
        "asked_sites": asked_sites,
        "max_subjects": cfg.eval_max_subjects,
        "score_bins": eval_cfg.score_bins,
        "score_scale": eval_cfg.score_scale,
        "n_per_subject": eval_cfg.n_per_subject,
        "held_out_rows_per_subject": eval_cfg.held_out_rows_per_subject,
    }
    # Per binary task, the sites' histograms pooled (healthfm_core/eval/federation_auroc.py).
    pooled = {key: f.model_dump() for key, f in federation_aurocs(binary, per_site, asked_sites, absent).items()}
    events.write(
        "evaluate",
        round=rnd,
        sites=flat,
        aggregated=aggregated,
        **robust,
        federation=pooled,
        seconds=seconds,
        absent=absent,
        rejected=rejected,
        **asked,
    )
    audit.write_evaluation(rnd, sorted(per_site), absent)
    atomic_write_text(
        Path(cfg.out_dir) / "evaluation.json",
        json.dumps(
            {
                "round": rnd,
                "sites": flat,
                "aggregated": aggregated,
                **robust,
                "federation": pooled,
                "rejected": rejected,
                **asked,
            },
            indent=1,
        ),
    )
    log.info("evaluation after round %d (%.1f s): %d sites reported", rnd, seconds, len(per_site))
    for line in outcome_lines(
        task_keys(eval_cfg.tasks), per_site, [roster.site(n) for n in sorted(roster.node_groups)], absent
    ):
        log.info("  %s", line)
    for key, f in pooled.items():
        log.info("  %-28s federation-wide AUROC: %s", key, FederationAUROC.model_validate(f).describe())
    scope = scored_of_available(per_site)
    for key, value in aggregated.items():
        if key.endswith(".auroc") or key.endswith(".r2"):
            task = key.rsplit(".", 1)[0]
            sampled = ""
            if task in scope:
                n, subjects, avail_subjects = scope[task]
                sampled = f"; a subject sample: rows of {subjects} of {avail_subjects} held-out subjects"
            n_task = aggregated.get(f"{task}.n", 0)
            largest = robust["largest_share"].get(task, {})
            capped = ", ".join(largest.get("capped", {})) or "none"
            log.info(
                "  %-28s %s %.3f (n-weighted mean of sites, n=%d%s); median over sites %.3f; largest share: %s %.0f%%"
                "; capped (%s): %s",
                task,
                key.rsplit(".", 1)[1],
                value,
                n_task,
                sampled,
                robust["median"].get(key, float("nan")),
                largest.get("site", "-"),
                100 * largest.get("share", 0.0),
                SHARE_CAP_RULE,
                capped,
            )
    return aggregated


def judge_eval_replies(
    metrics: Mapping[str, Mapping[str, Any] | None], cfg: EvalConfig, declared: Mapping[str, DeclaredCounts]
) -> tuple[dict[str, EvalReply], dict[str, str]]:
    """Each site's evaluate reply (its MetricRecord, by site) parsed and bounded by what the site
    `declared` at setup (its subjects and timed rows) and what `cfg` asked: the accepted replies by site, and
    why each other site's is rejected (logged)."""
    per_site: dict[str, EvalReply] = {}
    rejected: dict[str, str] = {}
    for site, record in sorted(metrics.items()):
        try:
            per_site[site] = judge_eval_reply(record, cfg, declared.get(site, DeclaredCounts(None, None)))
        except ValueError as err:
            log.warning("evaluate: the reply of site %s is rejected: %s", site, err)
            rejected[site] = str(err)
    return per_site, rejected


def judge_eval_reply(metrics: Mapping[str, Any] | None, cfg: EvalConfig, declared: DeclaredCounts) -> EvalReply:
    """A site's evaluate reply (its MetricRecord) parsed and its counts bounded
    (server/eval_counts.py); ValueError naming the field, the value and the bound."""
    if metrics is None:
        raise ValueError(f"no MetricRecord {METRICS_RECORD!r}")
    parsed = EvalReply.from_records(dict(metrics), expected=task_keys(cfg.tasks), score_bins=cfg.score_bins)
    if problem := eval_count_problem(parsed, cfg, declared):
        raise ValueError(problem)
    return parsed
