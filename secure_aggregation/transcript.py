"""A round's transcript on disk: every message the server received in it, and the state the server
kept (run config `record-transcript`; the ServerApp writes it, server/transcript.py). The attack
replay (replay.py) reads a secure round's back; it is untrusted input, so reading validates each
file and names the file and field that does not parse.

One directory per round, `round-<n>/` (docs/architecture.md, "The transcript"):
  round.json                 TranscriptHeader: format, kind ("secure" or "plain"), round, node -> site
  round-config.json          the RoundConfig the round sent (plain and secure rounds)
A secure round adds, each message in its flat form (healthfm_core/protocol/secure_records.py:
`<name>.json` is the JSON string, `<name>.<field>.bin` each top-level bytes field, raw; the masked
vector is `masked/<node>.vector.bin`):
  config, directory, unmask-request     the server's own: SecAggConfig, KeyDirectory, UnmaskRequest
  keys/<node>, shares/<node>, masked/<node>, unmask/<node>   every reply that parsed, per stage
A stage the round never reached (it failed before) has no files.

Beside the steps of this room, this module does I/O; nothing here is sent to anyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.data.sequences.token_settings import one_line_error
from healthfm_core.protocol.secure_records import JSON_KEY, from_flat, to_flat
from healthfm_core.strict_files import StrictFileError, strict_json, strict_model
from secure_aggregation.config import SecAggConfig
from secure_aggregation.masks import field_dtype
from secure_aggregation.messages import (
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    UnmaskRequest,
    UnmaskShares,
)
from secure_aggregation.server import ServerRound
from secure_aggregation.simulate import Transcript

FORMAT: Literal["healthfm-transcript/1"] = "healthfm-transcript/1"
HEADER_FILE = "round.json"
ROUND_CONFIG_FILE = "round-config.json"
_ROUND_DIR = re.compile(r"round-(\d+)")
_FILE = re.compile(r"(\d+)\.json|(\d+)\.([a-z_]+)\.bin")

M = TypeVar("M", bound=BaseModel)


class TranscriptError(ValueError):
    """A transcript file that is missing or does not parse (the message names the file and field)."""


class TranscriptHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["healthfm-transcript/1"] = FORMAT
    kind: Literal["plain", "secure"]
    round: int
    sites: dict[int, str]  # node id -> site name, every site the round addressed


@dataclass
class SecureTranscript:
    """A secure round as its server saw it: its own messages and every reply (`received`)."""

    config: SecAggConfig | None = None
    directory: KeyDirectory | None = None
    request: UnmaskRequest | None = None
    received: Transcript = field(default_factory=Transcript)

    @classmethod
    def of(cls, server: ServerRound, received: Transcript) -> SecureTranscript:
        """The server's view of a round: its own state and what it received."""
        return cls(server.config, server.directory, server.request, received)


def round_dirs(root: Path) -> list[Path]:
    """The round directories under `root` (a run's `transcript/`), by round; or `root` itself
    when it is one round's directory."""
    if (root / HEADER_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise TranscriptError(f"{root}: no transcript directory")
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND_DIR.fullmatch(p.name)) and p.is_dir()),
    )
    if not found:
        raise TranscriptError(f"{root}: holds no round-<n> directory nor {HEADER_FILE}")
    return [p for _, p in found]


def _write_flat(directory: Path, name: str, message: BaseModel) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in to_flat(message).items():
        if key == JSON_KEY:
            (directory / f"{name}.json").write_text(value, encoding="utf-8")
        else:
            (directory / f"{name}.{key}.bin").write_bytes(value)


def _read_flat(cls: type[M], directory: Path, name: str) -> M:
    path = directory / f"{name}.json"
    try:
        record: dict[str, object] = {JSON_KEY: path.read_text(encoding="utf-8")}
        for part in sorted(directory.glob(f"{name}.*.bin")):
            record[part.name[len(name) + 1 : -len(".bin")]] = part.read_bytes()
        return from_flat(cls, record)
    except (OSError, UnicodeDecodeError) as err:
        raise TranscriptError(f"{path}: cannot read ({err})") from None
    except ValidationError as err:
        raise TranscriptError(one_line_error(err, f"{path}: {cls.__name__}")) from None
    except ValueError as err:  # from_flat's own, json's
        raise TranscriptError(f"{path}: {' '.join(str(err).split())}") from None


def write_header(directory: Path, header: TranscriptHeader) -> None:
    (directory / HEADER_FILE).write_text(header.model_dump_json(indent=1) + "\n", encoding="utf-8")


def read_model(cls: type[M], path: Path) -> M:
    """A JSON file of the transcript parsed by its model; TranscriptError naming the file and field."""
    try:
        return strict_model(cls, path.read_bytes(), path)
    except OSError as err:
        raise TranscriptError(f"{path}: cannot read ({err})") from None
    except ValidationError as err:
        raise TranscriptError(one_line_error(err, f"{path}: {cls.__name__}")) from None


def read_header(directory: Path) -> TranscriptHeader:
    return read_model(TranscriptHeader, directory / HEADER_FILE)


def write_secure_round(directory: Path, transcript: SecureTranscript) -> None:
    """The secure round's files into `directory` (the caller makes the round's directory appear
    at once: server/transcript.py writes a temporary one and renames it)."""
    for name, own in (("config", transcript.config), ("directory", transcript.directory)):
        if own is not None:
            _write_flat(directory, name, own)
    if transcript.request is not None:
        _write_flat(directory, "unmask-request", transcript.request)
    received = transcript.received
    for stage, replies in (
        ("keys", received.keys),
        ("shares", received.shares),
        ("masked", received.masked),
        ("unmask", received.unmask),
    ):
        for reply in replies:
            _write_flat(directory / stage, str(reply.node_id), reply)


def _check_round(message: BaseModel, path: Path, round_: int, node: int | None = None) -> None:
    """Every message of the round carries its round, and a reply its sender (its file's name)."""
    got = (getattr(message, "node_id", None), message.round)  # type: ignore[attr-defined]
    if got != (node if node is not None else got[0], round_):
        raise TranscriptError(
            f"{path}: field node_id/round: value {got[0]}/{got[1]}, expected {node}/{round_} (its file name, the round's)"
        )


def _read_own(cls: type[M], directory: Path, name: str, round_: int) -> M | None:
    if not (directory / f"{name}.json").is_file():
        return None
    message = _read_flat(cls, directory, name)
    _check_round(message, directory / f"{name}.json", round_)
    return message


def _read_stage(cls: type[M], directory: Path, stage: str, round_: int) -> list[M]:
    folder = directory / stage
    if not folder.is_dir():
        return []
    nodes: set[int] = set()
    for path in sorted(folder.iterdir()):
        match = _FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            raise TranscriptError(f"{path}: not a file of a {stage} reply (<node>.json or <node>.<field>.bin)")
        nodes.add(int(match.group(1) or match.group(2)))
    out = []
    for node in sorted(nodes):
        message = _read_flat(cls, folder, str(node))
        _check_round(message, folder / f"{node}.json", round_, node)
        out.append(message)
    return out


def read_secure_round(directory: Path) -> tuple[TranscriptHeader, SecureTranscript]:
    """A secure round's transcript, every file parsed as the server parsed the message."""
    header = read_header(directory)
    if header.kind != "secure":
        raise TranscriptError(f"{directory / HEADER_FILE}: field kind: value {header.kind!r}, expected 'secure'")
    rnd = header.round
    config = _read_own(SecAggConfig, directory, "config", rnd)
    masked = _read_stage(MaskedInput, directory, "masked", rnd)
    for message in masked:  # the layout the server checked on receipt (ServerRound.unmask_request)
        path = directory / "masked" / f"{message.node_id}.vector.bin"
        if config is None or message.node_id not in config.sample:
            raise TranscriptError(f"{path}: a masked vector of node {message.node_id}, not in the round's config")
        expected = config.vector_length(message.node_id) * np.dtype(field_dtype(config.field_bits)).itemsize
        if message.groups != config.segments(message.node_id) or len(message.vector) != expected:
            raise TranscriptError(
                f"{path}: field vector: {len(message.vector)} bytes of groups {message.groups}, "
                f"the round's layout is {expected} bytes of {config.segments(message.node_id)}"
            )
    return header, SecureTranscript(
        config=config,
        directory=_read_own(KeyDirectory, directory, "directory", rnd),
        request=_read_own(UnmaskRequest, directory, "unmask-request", rnd),
        received=Transcript(
            keys=_read_stage(PublicKeys, directory, "keys", rnd),
            shares=_read_stage(EncryptedShares, directory, "shares", rnd),
            masked=masked,
            unmask=_read_stage(UnmaskShares, directory, "unmask", rnd),
        ),
    )


def read_json(path: Path) -> object:
    """A JSON file of the transcript, with the file named when it does not parse."""
    try:
        return strict_json(path.read_bytes(), path)
    except (OSError, StrictFileError) as err:
        raise TranscriptError(f"{path}: cannot read ({err})") from None
