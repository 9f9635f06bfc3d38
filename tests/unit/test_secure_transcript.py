"""A recorded secure round on disk (secure_aggregation/transcript.py) and the replay a privacy
officer runs on it (`python -m secure_aggregation.replay`): the files hold exactly what the server
received, the attacker reads them back to the same estimates, and a transcript that is not what
the server wrote is refused with the file and field named (it is untrusted input)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.secure_aggregation_fixtures import MIXES, clipped, group_of, make_config, play

from healthfm_core.protocol import TrainReply
from secure_aggregation.layout import group_vector
from secure_aggregation.replay import attack, main
from secure_aggregation.transcript import (
    SecureTranscript,
    TranscriptError,
    TranscriptHeader,
    read_secure_round,
    write_header,
    write_secure_round,
)
from server.config import FederationConfig
from server.transcript import read_plain_round

REPO = Path(__file__).resolve().parents[2]


def _recorded(tmp_path: Path) -> tuple[Path, SecureTranscript, dict[tuple[int, str], np.ndarray]]:
    config = make_config(MIXES, threshold=3)
    (_, server, received, _), updates, _ = play(config, seed=21)
    view = SecureTranscript.of(server, received)
    directory = tmp_path / "transcript" / "round-7"
    directory.mkdir(parents=True)
    write_header(directory, TranscriptHeader(kind="secure", round=7, sites={n: f"site{n}" for n in MIXES}))
    write_secure_round(directory, view)
    truths = {(n, g): group_vector(clipped(updates[n], config), g, group_of) for n in config.sample for g in MIXES[n]}
    return directory, view, truths


def test_a_round_read_back_is_the_round_the_server_received(tmp_path: Path) -> None:
    directory, view, _ = _recorded(tmp_path)
    header, back = read_secure_round(directory)
    assert header.round == 7 and header.sites[3] == "site3"
    assert back == view  # every message, the config, directory and unmask request
    assert (directory / "masked" / "1.vector.bin").read_bytes() == view.received.masked[0].vector  # raw
    before, after = attack(view), attack(back)
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k].values, after[k].values) for k in before)


def test_the_replay_command_says_what_it_rebuilt_and_judges_against_the_truth(tmp_path: Path) -> None:
    directory, view, truths = _recorded(tmp_path)
    truth_file = tmp_path / "truth.npz"
    truth_arrays: dict[str, Any] = {f"{n}.{g}": v for (n, g), v in truths.items()}
    np.savez(truth_file, **truth_arrays)
    done = subprocess.run(
        [sys.executable, "-m", "secure_aggregation.replay", str(directory.parent), "--truth", str(truth_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "withheld: ['genomics', 'wearables']" in done.stdout  # one holder; two
    assert "site3 (node 3) genomics: self-mask kept" in done.stdout
    assert "site1 (node 1) shared: self-mask removed, pairwise masks removed 0 of 3" in done.stdout
    assert "11 estimates against the truth: no closer than random" in done.stdout

    # The verdict can fail: "truths" the attacker's own estimates are as close as can be.
    own = tmp_path / "own.npz"
    own_arrays: dict[str, Any] = {f"{n}.{g}": e.values for (n, g), e in attack(view).items()}
    np.savez(own, **own_arrays)
    assert main([str(directory), "--truth", str(own)]) == 1


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (
            lambda d: (d / "masked" / "2.vector.bin").write_bytes(b"\0" * 10),
            r"masked/2\.vector\.bin: field vector: 10 bytes",
        ),
        (
            lambda d: (d / "keys" / "4.json").write_text((d / "keys" / "3.json").read_text()),
            r"keys/4\.json: field node_id/round: value 3/7, expected 4/7",
        ),
        (lambda d: (d / "unmask" / "notes.txt").write_text("x"), r"unmask/notes\.txt: not a file of a unmask reply"),
        (
            lambda d: (d / "config.json").write_text('{"round": 7}'),
            r"config\.json: SecAggConfig: field sample: value \(missing\): Field required",
        ),
        (
            lambda d: (d / "keys" / "1.enc_key.bin").unlink(),
            r"keys/1\.json: PublicKeys: field enc_key: value \(missing\)",
        ),
        (
            lambda d: (d / "round.json").write_text('{"kind": "secret", "round": 7, "sites": {}}'),
            r"round\.json: TranscriptHeader: field kind: value 'secret'",
        ),
    ],
    ids=["short-vector", "wrong-sender", "stray-file", "bad-config", "missing-key", "bad-header"],
)
def test_a_transcript_not_as_the_server_wrote_it_is_refused_naming_file_and_field(
    tmp_path: Path,
    damage,
    error: str,  # noqa: ANN001
) -> None:
    directory, _, _ = _recorded(tmp_path)
    damage(directory)
    with pytest.raises(TranscriptError, match=error):
        read_secure_round(directory)
    assert main([str(directory)]) == 2


def test_a_plain_rounds_reply_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    replies = tmp_path / "round-1" / "replies"
    replies.mkdir(parents=True)
    write_header(tmp_path / "round-1", TranscriptHeader(kind="plain", round=1, sites={5: "clinic"}))
    reply = TrainReply(
        arrays={"backbone.norm.b": np.zeros(3, np.float32)}, num_examples=4, group_examples={"shared": 4}
    )
    arrays, metrics, _ = reply.to_records()
    np.savez(replies / "5.npz", **arrays)  # type: ignore[arg-type]
    (replies / "5.metrics.json").write_text(json.dumps(metrics))
    _, back = read_plain_round(tmp_path / "round-1")
    assert back[5].group_examples == {"shared": 4} and np.array_equal(back[5].arrays["backbone.norm.b"], np.zeros(3))
    (replies / "5.metrics.json").write_text(json.dumps({**metrics, "num-examples": "4"}))
    with pytest.raises(TranscriptError, match=r"replies/5\.\*: .*num"):
        read_plain_round(tmp_path / "round-1")
    np.savez(replies / "5.npz", x=np.array([object()], dtype=object))
    with pytest.raises(TranscriptError, match=r"replies/5\.\*"):
        read_plain_round(tmp_path / "round-1")


def test_record_transcript_is_a_strict_boolean_of_the_run_config() -> None:
    base = {"out-dir": "/tmp/x", "model": "tiny"}
    assert FederationConfig.from_run_config({**base, "record-transcript": True}).record_transcript is True
    assert FederationConfig.from_run_config(base).record_transcript is False
    with pytest.raises(ValueError, match="record_transcript"):
        FederationConfig.from_run_config({**base, "record-transcript": "yes"})
