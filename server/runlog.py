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

from healthfm_core.eval.outcomes import outcome_table, replies_from_event
from healthfm_core.files import atomic_write_text
from server.config import PrivacyRequest

log = logging.getLogger("healthfm.server")


def message_bytes(message: Message) -> int:
    """Serialized size of a message: every object Flower transfers for it (content-addressed,
    so identical arrays count once), excluding transport framing."""
    return message_size(message)[0]


def message_size(message: Message) -> tuple[int, int]:
    """(bytes, objects) of a message: Flower moves each object with a request of its own, so the
    count says how many round trips a hop costs (healthfm_core/packing.py keeps it small)."""
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
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (cut short?); skipped", path, i)
    return out


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
        ev = evaluations[-1]
        lines += [
            "",
            f"## Federated evaluation after round {ev['round']} (n-weighted mean over sites)",
            "",
            "| task | metric | value | n | sites |",
            "|---|---|---|---|---|",
        ]
        for key, value in ev["aggregated"].items():
            task, _, metric = key.rpartition(".")
            if metric in ("auroc", "r2", "meds-tab-auroc"):  # MEDS-Tab: the tabular baseline, same rows
                n_sites = sum(key in m for m in ev["sites"].values())
                lines.append(
                    f"| {task} | {metric} | {value:.3f} | {int(ev['aggregated'].get(task + '.n', 0))} | {n_sites} |"
                )
        try:
            keys, per_site, asked = replies_from_event(ev)
        except ValueError as err:  # a log written by another version: the table above still stands
            log.warning("summary: the per-site evaluation of round %s does not parse: %s", ev["round"], err)
        else:
            lines += [
                "",
                "## Per site and task: a metric or the reason there is none",
                "",
                outcome_table(keys, per_site, asked),
            ]
    path = out_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


__all__ = ["EventLog", "message_bytes", "message_size", "read_events", "write_summary"]
