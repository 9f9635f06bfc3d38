"""The run's record on disk: rounds.jsonl (one JSON object per event, fsynced as each completes),
read back by read_events, and summary.md written from it (write_summary); message_bytes measures
what each message cost on the wire.

Events: setup / resume (round 0), round (per site: status, groups, counts, losses, DP spend,
bytes and Flower objects; contributors, rejections, the n-weighted mean `losses`, timings), evaluate (per site
metrics and their n-weighted means).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from healthfm_core.eval.federation_auroc import FederationAUROC, federation_aurocs
from healthfm_core.eval.outcomes import outcome_table, replies_from_event, scored_counts
from healthfm_core.eval.plots import IntervalPoint, auroc_forest_plot
from healthfm_core.files import atomic_write_text
from healthfm_core.protocol import SMALL_CELL, EvalReply, largest_row_share, median_site_metrics
from healthfm_core.protocol.site_share import SHARE_CAP_RULE
from healthfm_core.strict_files import DuplicateKeyError, StrictFileError, strict_json
from server.config import PrivacyRequest

log = logging.getLogger("healthfm.server")
EVAL_PLOT = "evaluation_auroc.png"  # summary.md's forest plot of the last evaluation
HEAD_ROUNDS_FILE = "head_rounds.jsonl"  # a task-head run's events (server/head_app.py), written by EventLog


def message_bytes(message: Message) -> int:
    """Serialized size of a message: every object Flower transfers for it (content-addressed,
    so identical arrays count once), excluding transport framing."""
    return message_size(message)[0]


def message_size(message: Message) -> tuple[int, int]:
    """(bytes, objects) of a message: Flower moves each object with a request of its own, so the
    count says how many round trips a hop costs (healthfm_core/protocol/packing.py keeps it small)."""
    objects = get_all_nested_objects(message)
    return sum(len(obj.deflate()) for obj in objects.values()), len(objects)


class EventLog:
    """rounds.jsonl: one JSON object per line, flushed and fsynced as each event completes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=_json_default)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def json_values(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields as rounds.jsonl would read them back (numpy scalars and paths as JSON values)."""
    return json.loads(json.dumps(fields, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a rounds.jsonl (a line cut short by a crash is skipped with a warning)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        event = event_of_line(line, path, i)
        if event is not None:
            out.append(event)
    return out


def event_of_line(line: str, path: str | Path, number: int) -> dict[str, Any] | None:
    """Line `number` of a rounds.jsonl as read_events reads it: None for a blank line or one cut
    short by a crash (skipped with a warning); DuplicateKeyError for one written with a key twice."""
    if not line.strip():
        return None
    try:
        return strict_json(line, f"{path} line {number}")
    except DuplicateKeyError:  # not a line cut short: one written so
        raise
    except StrictFileError:
        log.warning("%s line %d is not JSON (cut short?); skipped", path, number)
        return None


def write_summary(out_dir: str | Path) -> Path:
    """out_dir/summary.md from rounds.jsonl: per-round losses and time split, bytes per site."""
    out_dir = Path(out_dir)
    events = read_events(out_dir / "rounds.jsonl")
    rounds = {e["round"]: e for e in events if e["event"] == "round"}  # a re-run round: the last one
    lines = [f"# Federated run: {out_dir}", ""]
    if not rounds:
        lines.append("No round completed.")
    else:
        loss_names = sorted({k for e in rounds.values() for k in e.get("losses", {})})
        lines += [
            "## Rounds",
            "",
            "| round | sites ok | " + " | ".join(loss_names) + " | round s | local training s (max) | other s |",
            "|---" * (len(loss_names) + 5) + "|",
        ]
        for r, e in sorted(rounds.items()):
            ok = sum(s.get("status") == "ok" for s in e["sites"].values())
            agg = e.get("losses", {})
            t = e["timings"]
            lines.append(
                f"| {r} | {ok}/{len(e['sites'])} | "
                + " | ".join(f"{agg[n]:.4f}" if n in agg else "" for n in loss_names)
                + f" | {t['round_seconds']:.1f} | {t['local_train_seconds_max']:.1f} | {t['other_seconds']:.1f} |"
            )
        site_names = sorted({s for e in rounds.values() for s in e["sites"]})
        lines += [
            "",
            "## Bytes per site per round (sent to the site / received from it)",
            "",
            "| round | " + " | ".join(site_names) + " | total |",
            "|---" * (len(site_names) + 2) + "|",
        ]
        for r, e in sorted(rounds.items()):
            cells = []
            for s in site_names:
                x = e["sites"].get(s, {})
                cells.append(f"{x.get('bytes_sent', 0):,} / {x.get('bytes_received', 0):,}")
            lines.append(f"| {r} | " + " | ".join(cells) + f" | {e['bytes_sent']:,} / {e['bytes_received']:,} |")
        if any(e.get("epsilon") for e in rounds.values()):
            last = rounds[max(rounds)]
            req = PrivacyRequest.model_validate(last["privacy"]) if last.get("privacy") else PrivacyRequest()
            eps_sites = sorted({s for e in rounds.values() for s in e.get("epsilon", {})})
            lines += [
                "",
                "## Privacy: each site's cumulative epsilon (its own accountant, every run at the site)",
                "",
                f"Server: {req.describe()}.",
                "",
                "| round | " + " | ".join(eps_sites) + " |",
                "|---" * (len(eps_sites) + 1) + "|",
            ]
            for r, e in sorted(rounds.items()):
                eps = e.get("epsilon", {})
                lines.append(f"| {r} | " + " | ".join(f"{eps[s]:.3f}" if s in eps else "-" for s in eps_sites) + " |")
        rejected = [(r, x) for r, e in sorted(rounds.items()) for x in e.get("rejected", [])]
        if rejected:
            lines += ["", "## Rejected replies", ""] + [
                f"- round {r}, site {x['site']}: {x['reason']}" for r, x in rejected
            ]
    evaluations = [e for e in events if e["event"] == "evaluate"]
    if evaluations:
        lines += evaluation_section(evaluations[-1], out_dir)
    path = out_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def evaluation_section(ev: dict[str, Any], out_dir: Path) -> list[str]:
    """summary.md's part on an evaluate event: the federation-wide AUROC per binary task (the
    sites' score histograms pooled), every (site, task) with its rows, positives and interval or
    the reason it has none, the n-weighted means, and the forest plot EVAL_PLOT beside the file."""
    lines = ["", f"## Federated evaluation after round {ev['round']}", ""]
    try:
        keys, per_site, asked = replies_from_event(ev)
    except ValueError as err:  # a log written by another version: the means below still stand
        log.warning("summary: the per-site evaluation of round %s does not parse: %s", ev["round"], err)
        keys, per_site, asked = list(ev.get("tasks") or []), {}, []
    # A log from before binary_tasks was recorded: the tasks some site scored with an AUROC.
    scored = {k for r in per_site.values() for k, m in r.tasks.items() if m.auroc is not None}
    binary = list(ev.get("binary_tasks") or [k for k in keys if k in scored])
    absent = {s: str(why) for s, why in (ev.get("absent") or {}).items()}
    pooled = federation_aurocs(binary, per_site, asked, absent) if per_site else {}
    if pooled:
        lines += [
            "### Federation-wide AUROC per task",
            "",
            "Each site releases, per binary task, a histogram of its held-out probe scores per class "
            f"({ev.get('score_bins', '?')} bins on the {ev.get('score_scale', '?')} scale; adjacent bins merged "
            "until no count is below the site's minimum); the server pools them. 95% CI: DeLong on the "
            "binned table, variance times held-out rows per subject; binning: the AUROC of the exact "
            f"pooled scores lies within the bound of the binned one. Share cap: {SHARE_CAP_RULE} (a capped "
            "site's cells scaled down to its weight; rows and positives are the pooled weights); beside it the "
            "median of the sites' own AUROCs (each site once, whatever it claims) and, below, each site's line.",
            "",
            "| task | AUROC (95% CI) | median over sites | sites pooled | rows | positives | binning bound "
            "| capped (claimed -> weight) | not pooled (why) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, f in pooled.items():
            value = (
                "n/a: " + f.note
                if f.auroc is None
                else f"{f.auroc:.3f} "
                + (f"[{f.low:.3f}, {f.high:.3f}]" if f.low is not None and f.high is not None else "[undefined]")
            )
            bound = "-" if f.binning_bound is None else f"{f.binning_bound:.3f}"
            why = "; ".join(f"{s}: {r}" for s, r in f.not_pooled.items()) or "-"
            mid = "-" if f.median_site_auroc is None else f"{f.median_site_auroc:.3f}"
            lines.append(
                f"| {key} | {value} | {mid} | {len(f.sites)} of {len(f.sites) + len(f.not_pooled)} | {f.rows} | "
                f"{f.positives} | {bound} | {f.capped_text()} | {why} |"
            )
        if coarse := [k for k, f in pooled.items() if f.binning_bound is not None and f.binning_bound > 0.05]:
            lines += [
                "",
                f"Binning costs more than 0.05 AUROC for {', '.join(coarse)}: the sites' minimum merged their "
                "histograms into few cells (small sites, rare outcomes); read the per-site values below, or "
                "ask for more bins (eval_score_bins) only where sites are large.",
            ]
        lines.append("")
    median, largest = median_site_metrics(per_site), largest_row_share(per_site)
    lines += [
        "### The sites' values: n-weighted mean and median over sites (means of per-site numbers, not a pooled AUROC)",
        "",
        "The median counts every site once, whatever rows it claims: the robust summary. The largest share "
        f"names the site with the largest weight in the mean. Share cap: {SHARE_CAP_RULE}; the sites it "
        "capped are named with their weight.",
        "",
        "| task | metric | n-weighted mean | median over sites | rows | largest share | capped (weight) | positives | sites |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, value in ev.get("aggregated", {}).items():
        task, _, metric = key.rpartition(".")
        if metric in ("auroc", "r2", "meds-tab-auroc"):  # MEDS-Tab: the tabular baseline, same rows
            n_sites = sum(key in m for m in ev["sites"].values())
            mid = f"{median[key]:.3f}" if key in median else "-"
            big = largest.get(task)
            share = f"{big['site']} {100 * big['share']:.0f}%" if big else "-"
            capped = ", ".join(f"{s} {w:.0f}" for s, w in (big or {}).get("capped", {}).items()) or "none"
            lines.append(
                f"| {task} | {metric} | {value:.3f} | {mid} | {int(ev['aggregated'].get(task + '.n', 0))} | {share} | "
                f"{capped} | {positives_over_sites(task, per_site)} | {n_sites} |"
            )
    if rejected := ev.get("rejected") or {}:
        lines += ["", "### Rejected evaluation replies (not in any number above)", ""]
        lines += [f"- site {site}: {why}" for site, why in sorted(rejected.items())]
    if per_site or asked or absent:
        lines += [
            "",
            "### Per site and task: held-out rows, positives, AUROC with its 95% subject-bootstrap interval on "
            "the same rows, or the reason there is none",
            "",
            '"<min": a count below the site\'s minimum, not disclosed.',
            "",
            outcome_table(keys, per_site, asked, absent),
            "",
        ]
    points = forest_points(keys, per_site, pooled, sorted(set(asked) | set(absent)))
    if points:
        auroc_forest_plot(points, out_dir / EVAL_PLOT, title=f"Held-out AUROC after round {ev['round']} (95% CI)")
        lines += ["", f"![AUROC per site and task, with the federation-wide value]({EVAL_PLOT})"]
    return lines


def positives_over_sites(task: str, per_site: dict[str, EvalReply]) -> str:
    """The held-out positives of a task summed over the sites that scored it; a site whose count
    is below its minimum adds "+ <min" (not disclosed); "-" for a regression task."""
    counts = [m.positives for r in per_site.values() if (m := r.tasks.get(task)) is not None and m.auroc is not None]
    if not counts:
        return "-"
    said = [c for c in counts if c is not None and c != SMALL_CELL]
    hidden = sum(c == SMALL_CELL for c in counts)
    unsaid = sum(c is None for c in counts)
    parts = ([str(sum(said))] if said else []) + [f"<min at {hidden} site(s)"] * bool(hidden)
    parts += [f"not reported by {unsaid} site(s)"] * bool(unsaid)
    return " + ".join(parts)


def forest_points(
    keys: list[str], per_site: dict[str, EvalReply], pooled: dict[str, FederationAUROC], sites: list[str]
) -> list[IntervalPoint]:
    """Every (site, binary task) AUROC with its interval (a pair without one: its row, NaN), and
    each task's federation-wide one."""
    nan = float("nan")
    points = []
    for key in keys:
        if key not in pooled:
            continue  # a regression task
        for site in sorted(set(per_site) | set(sites)):
            m = per_site[site].tasks.get(key) if site in per_site else None
            if m is None or m.auroc is None or not np.isfinite(m.auroc):
                points.append(IntervalPoint(key, site, nan, nan, nan))
                continue
            low, high = (nan, nan) if m.auroc_low is None or m.auroc_high is None else (m.auroc_low, m.auroc_high)
            rows, positives = scored_counts(per_site[site], key)
            points.append(IntervalPoint(key, f"{site} (n {rows}, {positives} pos)", m.auroc, low, high))
        f = pooled[key]
        if f.auroc is None:
            points.append(IntervalPoint(key, "federation: none", nan, nan, nan, pooled=True))
            continue
        low, high = (nan, nan) if f.low is None or f.high is None else (f.low, f.high)
        label = f"federation, {len(f.sites)} sites (n {f.rows}, {f.positives} pos; binning +/-{f.binning_bound:.2f})"
        points.append(IntervalPoint(key, label, f.auroc, low, high, pooled=True))
    return points


__all__ = [
    "EVAL_PLOT",
    "HEAD_ROUNDS_FILE",
    "EventLog",
    "evaluation_section",
    "event_of_line",
    "message_bytes",
    "message_size",
    "read_events",
    "write_summary",
]
