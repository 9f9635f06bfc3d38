"""The ServerApp's transcript of a round (run config `record-transcript`): every message it received
in the round and the state it kept, under out_dir/transcript/round-<n>/, for the attack replay
(`python -m secure_aggregation.replay`) and for whoever audits what the coordinator saw.

A secure round's files are secure_aggregation/transcript.py's. A plain round's are each reply
that parsed (what the plain coordinator averages), as the site sent it (TrainReply.to_records):
  replies/<node>.npz            its arrays (numpy's npz, no pickles), absent for a refusal
  replies/<node>.metrics.json   its MetricRecord
  replies/<node>.status.json    a refusal's status record
A round's directory appears whole: it is written as .round-<n>.tmp, then renamed. The Flower
SuperLink deletes a reply once the ServerApp pulls it, so this is the only place every reply of a
round is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from healthfm_core.protocol import RoundConfig, TrainReply
from secure_aggregation.transcript import (
    ROUND_CONFIG_FILE,
    TranscriptError,
    TranscriptHeader,
    read_header,
    read_json,
    read_model,
    write_header,
    write_secure_round,
)
from server.round import RoundRecord

log = logging.getLogger("healthfm.server.transcript")

TRANSCRIPT_DIR = "transcript"
_REPLY_FILE = re.compile(r"(\d+)\.(npz|metrics\.json|status\.json)")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_round_transcript(out_dir: Path, record: RoundRecord) -> Path:
    """Round `record`'s transcript under out_dir/transcript/round-<n>/ (replacing one an earlier,
    abandoned attempt at the round left: a resumed run plays the round again)."""
    rnd = record.config.round
    root = out_dir / TRANSCRIPT_DIR
    final, tmp = root / f"round-{rnd}", root / f".round-{rnd}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind: Literal["plain", "secure"] = "secure" if record.transcript is not None else "plain"
    sites = {entry.node_id: name for name, entry in record.sites.items()}
    write_header(tmp, TranscriptHeader(kind=kind, round=rnd, sites=sites))
    (tmp / ROUND_CONFIG_FILE).write_text(record.config.model_dump_json(indent=1) + "\n", encoding="utf-8")
    if record.transcript is not None:
        write_secure_round(tmp, record.transcript)
    else:
        replies = tmp / "replies"
        replies.mkdir()
        for node, reply in record.outcome.replies.items():
            arrays, metrics, status = reply.to_records()
            if arrays is not None:
                np.savez(replies / f"{node}.npz", **arrays)  # type: ignore[arg-type]
            (replies / f"{node}.metrics.json").write_text(_json(metrics))
            if status is not None:
                (replies / f"{node}.status.json").write_text(_json(status))
    if final.exists():
        old = root / f".round-{rnd}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    log.info("round %d: transcript (%s) written to %s, %d bytes", rnd, kind, final, _tree_bytes(final))
    return final


def _json(value: Mapping[str, object]) -> str:
    return json.dumps(dict(value), sort_keys=True) + "\n"


def read_round_config(directory: Path) -> RoundConfig:
    return read_model(RoundConfig, directory / ROUND_CONFIG_FILE)


def read_plain_round(directory: Path) -> tuple[TranscriptHeader, dict[int, TrainReply]]:
    """A plain round's transcript: its header and every reply, parsed as the server parses a peer's."""
    header = read_header(directory)
    if header.kind != "plain":
        raise TranscriptError(f"{directory / 'round.json'}: field kind: value {header.kind!r}, expected 'plain'")
    folder = directory / "replies"
    nodes: set[int] = set()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _REPLY_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            raise TranscriptError(f"{path}: not a file of a reply (<node>.npz, .metrics.json or .status.json)")
        nodes.add(int(match.group(1)))
    replies = {}
    for node in sorted(nodes):
        metrics = read_json(folder / f"{node}.metrics.json")
        status_path = folder / f"{node}.status.json"
        status = read_json(status_path) if status_path.is_file() else None
        arrays_path = folder / f"{node}.npz"
        try:
            arrays = None
            if arrays_path.is_file():
                with np.load(arrays_path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            if not isinstance(metrics, dict) or not (status is None or isinstance(status, dict)):
                raise ValueError("metrics and status are JSON objects")
            replies[node] = TrainReply.from_records(arrays, metrics, status)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise TranscriptError(f"{folder / str(node)}.*: {' '.join(str(err).split())[:500]}") from None
    return header, replies
