"""Where a deployed round's time goes, hop by hop, from the logs a deployment already writes.

Sources (all on one machine's wall clock, so their times line up):
- the ServerApp's rounds.jsonl (server/server_app.py): the round's start, its push of the train
  messages (`timings.sent_at`, `timings.push_seconds`), when each site's reply came
  (`sites.*.reply_after_seconds`), its training (`train_seconds`), the round's end;
- each site's SuperNode log (client/deploy/supernode_main.py gives Flower's lines timestamps):
  "Receiving: train message", "Received successfully", "Sending: train message", "Sent successfully";
- each site's app-guard log: the guard's hand-over ("task N of run R: ... approved") and the warm
  ClientApp's line per task (client/deploy/warm_clientapp.py: "train completed in T s (pull P s,
  ClientApp A s, push U s; ...)").

Hops of the site whose reply came last (the round's critical path), in order; they sum to the round:
  configure    round start -> the ServerApp starts pushing (strategy, records)
  push         the ServerApp's push of the messages and their objects to the SuperLink
  node_poll    push done -> the SuperNode pulls the message (its idle poll interval)
  guard        -> the app guard hands the task to the warm ClientApp (its poll; task creation)
  app_pull     -> the ClientApp has the message (waits for the SuperNode to pull its objects)
  handler      the ClientApp handler less its training (model load, data, encoding the reply)
  train        the site's training loop
  app_push     the reply's push from the ClientApp to its SuperNode
  node_send    -> the SuperNode has uploaded the reply to the SuperLink
  server_pull  -> the ServerApp has the reply (its poll; pulling the reply's objects)
  after        last reply -> the round's end (aggregation; the checkpoint and logs only after the
               last round: the others are written while the next round is out)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

HOPS = (
    "configure",
    "push",
    "node_poll",
    "guard",
    "app_pull",
    "handler",
    "train",
    "app_push",
    "node_send",
    "server_pull",
    "after",
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_FLOWER_LINE = re.compile(rf"^\w+\s+{_STAMP}\s*:\s*(.*)$")
_GUARD_LINE = re.compile(rf"^{_STAMP} INFO healthfm\.client\.app_guard: task \d+ of run \d+: app bundle \S+ approved")
_WARM_LINE = re.compile(
    rf"^{_STAMP} INFO healthfm\.client\.warm: run \d+: (\S+) \S+ in ([\d.]+) s "
    r"\(pull ([\d.]+) s, ClientApp ([\d.]+) s, push ([\d.]+) s"
)


def stamp(text: str) -> float:
    """A logging asctime (local time, ms) as seconds since the epoch."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class NodeTrain:
    """One train message at a SuperNode: when it came in, was stored, and its reply left."""

    receiving: float | None = None
    received: float | None = None
    sending: float | None = None
    sent: float | None = None


@dataclass
class WarmTrain:
    """One train task at the site's app guard and warm ClientApp."""

    handed_over: float
    done: float
    pull: float
    app: float
    push: float


def supernode_trains(lines: Iterable[str]) -> list[NodeTrain]:
    """The train messages of a SuperNode log, in order."""
    out: list[NodeTrain] = []
    waiting: str | None = None  # the "...successfully" line the last train line waits for
    for raw in lines:
        m = _FLOWER_LINE.match(_ANSI.sub("", raw).rstrip())
        if not m:
            continue
        when, text = stamp(m.group(1)), m.group(2).strip()
        if text.startswith("Receiving: train message"):
            out.append(NodeTrain(receiving=when))
            waiting = "Received successfully"
        elif text.startswith("Sending: train message"):
            # The reply to the last train message that has none yet.
            target = next((t for t in out if t.sending is None), None)
            if target is not None:
                target.sending = when
                waiting = "Sent successfully"
            else:
                waiting = None
        elif text.startswith(("Receiving:", "Sending:")):
            waiting = None  # another message type
        elif waiting is not None and text == waiting and out:
            if waiting == "Received successfully":
                out[-1].received = when
            else:
                target = next((t for t in reversed(out) if t.sending is not None and t.sent is None), None)
                if target is not None:
                    target.sent = when
            waiting = None
    return out


def warm_trains(lines: Iterable[str]) -> list[WarmTrain]:
    """The train tasks of an app-guard log (warm mode), in order."""
    out: list[WarmTrain] = []
    handed: float | None = None
    for raw in lines:
        line = raw.rstrip()
        if m := _GUARD_LINE.match(line):
            handed = stamp(m.group(1))
        elif (m := _WARM_LINE.match(line)) and handed is not None:
            if m.group(2) == "train":
                out.append(WarmTrain(handed, stamp(m.group(1)), *(float(m.group(i)) for i in (4, 5, 6))))
            handed = None
    return out


def round_hops(
    rnd: int, event: Mapping[str, Any], node: NodeTrain | None, warm: WarmTrain | None, site: str
) -> dict[str, float | None]:
    """The hops of `site`'s path through round `rnd` (see the module's doc); None where a source
    is missing (e.g. a cold site has no warm line)."""
    t = event["timings"]
    entry = event["sites"][site]
    start = t["sent_at"] - t["configure_seconds"]
    push_end = t["sent_at"] + t["push_seconds"]
    end = start + t["round_seconds"]
    reply = t["sent_at"] + entry["reply_after_seconds"] if "reply_after_seconds" in entry else None
    train = entry.get("train_seconds")

    def gap(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    app_start = warm.done - warm.push - warm.app if warm else None
    return {
        "configure": t["configure_seconds"],
        "push": t["push_seconds"],
        "node_poll": gap(push_end, node.receiving if node else None),
        "guard": gap(node.receiving if node else None, warm.handed_over if warm else None),
        "app_pull": gap(warm.handed_over if warm else None, app_start),
        "handler": warm.app - train if warm and train is not None else None,
        "train": train,
        "app_push": warm.push if warm else None,
        "node_send": gap(warm.done if warm else None, node.sent if node else None),
        "server_pull": gap(node.sent if node else None, reply),
        "after": gap(reply, end),
        # Not on the path's sum: the SuperNode's own pull of the message's objects (overlaps guard/app_pull).
        "node_receive": gap(node.receiving, node.received) if node else None,
    }


def site_logs(state_dir: Path) -> tuple[list[NodeTrain], list[WarmTrain]]:
    """A joined site's train messages, from its state dir (`join --state-dir`)."""

    def read(name: str) -> list[str]:
        path = state_dir / name
        return path.read_text(errors="replace").splitlines() if path.is_file() else []

    return supernode_trains(read("supernode.log")), warm_trains(read("app-guard.log"))
