"""Server hardening without a federation: the audit log, TLS by default, checkpoint integrity
on the ServerApp's own resume path, reply size limits and the attribution of SuperLink errors.

The fault tests with real processes are in tests/deploy/test_faults.py; property tests of malformed
input in tests/federation/test_bad_input.py.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.message import make_message
from helpers.deploy_fixtures import Process, alive, command, descendants, free_port
from helpers.flower_messages import train_metadata
from helpers.in_process_grid import InProcessGrid, tiny_nodes
from helpers.run_configs import fed_config

from client.client_app import train_reply_content
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import FederationSetup, TrainReply
from healthfm_core.protocol.packing import PACKED_PART
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.train.checkpoint import CheckpointError
from server.audit import (
    AUDIT_FILE,
    AuditLog,
    AuditLogError,
    audit_from_rounds,
    read_audit_log,
    verify_audit_log,
)
from server.checkpoint import (
    ARRAYS_FILE,
    META_HASH_FILE,
    STRATEGY_FILE,
    ServerState,
    load_server_checkpoint,
    save_server_checkpoint,
)
from server.config import FederationConfig
from server.deploy.commands import LaunchRecord, launch_to_resume, report_outcome
from server.deploy.commands import main as coordinator_main
from server.deploy.flwr_app import default_run_config
from server.deploy.flwr_control import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SITE_LOST,
    EXIT_UNREACHABLE,
    CoordinatorError,
    write_connection,
)
from server.deploy.provision import ProvisionConfig, provision
from server.limits import array_record_bytes, default_max_reply_bytes
from server.outcome import RunOutcome, read_outcome, sites_lost, write_outcome
from server.replies import origin
from server.round import aggregate_replies
from server.runlog import read_events
from server.server_app import FederationServer
from server.strategy import ModalityAwareFedAvg, pack_record
from simulations.synthetic import generate_federation

# ---------------------------------------------------------------------------- audit log


ROUND_EVENT: dict[str, Any] = {
    "event": "round",
    "round": 3,
    "sites": {
        "hospital": {
            "node_id": 11,
            "groups_sent": ["ehr", "shared", "wearables"],
            "status": "ok",
            "groups_received": ["ehr", "shared"],
            "num_examples": {"ehr": 40.0, "shared": 40.0},
            "bytes_received": 1234,
            "dp": {"epsilon": 1.5, "delta": 1e-5},
        },
        "biobank": {
            "node_id": 12,
            "groups_sent": ["ehr", "genomics", "shared", "wearables"],
            "status": "rejected",
            "reason": "key 'x' NaN",
            "groups_received": ["shared"],
            "num_examples": {"shared": 9.0},
        },
        "cohort": {
            "node_id": 13,
            "groups_sent": ["ehr", "genomics", "shared"],
            "status": "refused",
            "reason": "epsilon cap 3 would be exceeded",
            "dp": {"epsilon": 2.9},
        },
        "quiet": {"node_id": 14, "groups_sent": ["ehr", "shared"], "status": "no reply"},
    },
    "rejected": [
        {"site": "biobank", "node_id": 12, "reason": "key 'x' NaN"},
        {"site": "cohort", "node_id": 13, "reason": "refused by the site: epsilon cap 3 would be exceeded"},
    ],
    "contributors": {"ehr": ["hospital"], "shared": ["hospital"]},
}


def test_audit_log_records_each_site_and_round_and_chains_them(tmp_path: Path) -> None:
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(json.dumps(ROUND_EVENT) + "\n")
    log = AuditLog(tmp_path / AUDIT_FILE)
    log.write_round(ROUND_EVENT)
    records = list(read_audit_log(tmp_path / AUDIT_FILE))
    by_site = {r["site"]: r for r in records}
    assert [r["site"] for r in records] == sorted(ROUND_EVENT["sites"])  # one per site, sorted
    assert by_site["hospital"]["groups_contributed"] == ["ehr", "shared"] and by_site["hospital"]["epsilon"] == 1.5
    assert by_site["biobank"]["status"] == "rejected" and by_site["biobank"]["groups_contributed"] == []
    assert by_site["biobank"]["rejected"] == ["key 'x' NaN"]
    assert by_site["cohort"]["status"] == "refused" and "epsilon cap" in by_site["cohort"]["reason"]
    assert by_site["quiet"]["status"] == "no reply" and by_site["quiet"]["num_examples"] == {}
    # Derived, not duplicated: rounds.jsonl implies exactly the records the audit log holds.
    strip = [{k: v for k, v in r.items() if k not in ("time", "prev_sha256")} for r in records]
    assert strip == audit_from_rounds(rounds)

    # A reopened log (a resumed run) continues the chain; any edit breaks it.
    AuditLog(tmp_path / AUDIT_FILE).write_round({**ROUND_EVENT, "round": 4})
    assert verify_audit_log(tmp_path / AUDIT_FILE) == 8
    lines = (tmp_path / AUDIT_FILE).read_text().splitlines()
    assert '"status": "refused"' in lines[1]  # cohort's record
    lines[1] = lines[1].replace('"status": "refused"', '"status": "ok"')
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match="line 3"):
        verify_audit_log(tmp_path / AUDIT_FILE)
    del lines[1]  # deleting a record is detected as well
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match="line 2"):
        verify_audit_log(tmp_path / AUDIT_FILE)


# ---------------------------------------------------------------------------- TLS on by default


def test_superlink_refuses_to_start_without_certificates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    fed.superlink_key.unlink()
    rc = coordinator_main(["superlink", str(fed.root), "--port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and str(fed.superlink_key) in err[0] and "provision" in err[0]
    # Nothing was started and no connection was recorded for the flwr CLI.
    assert not (fed.server_dir / "flwr-home" / "config.toml").exists()


@pytest.mark.slow  # a real SuperLink process
def test_insecure_superlink_warns_loudly(tmp_path: Path) -> None:
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    port = free_port()
    proc = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(fed.root), "--port", str(port), "--insecure"],
        tmp_path / "superlink.out",
    )
    try:
        # Flower's own server comes up on plain http (https with certificates).
        assert proc.wait_for(f"Uvicorn running on http://127.0.0.1:{port}", 600), proc.output()[-2000:]
        out = proc.output()
        assert "WARNING: --insecure" in out and "without TLS and without SuperNode authentication" in out
        config = (fed.server_dir / "flwr-home" / "config.toml").read_text()
        assert "insecure = true" in config
    finally:
        proc.stop()
    # The default (no --insecure) records the CA for the flwr CLI, never insecure.
    assert "--insecure" not in " ".join(cast(list[str], proc.proc.args)[:-1])


@pytest.mark.slow  # a real SuperLink process
def test_superlink_stops_with_its_parent_process(tmp_path: Path) -> None:
    # A killed test run (or supervisor) must not leave a SuperLink, SuperExec or nginx behind.
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    port = free_port()
    proc = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(fed.root), "--port", str(port)]
        + ["--parent-pid", str(parent.pid)],
        tmp_path / "superlink.out",
    )
    try:
        assert proc.wait_for("SuperLink ready", 600), proc.output()[-2000:]
        started = descendants(proc.proc.pid)  # the SuperLink wrapper, nginx, the SuperExec
        assert len(started) >= 2, started
        parent.kill()
        parent.wait()
        assert proc.proc.wait(timeout=600) == 0, proc.output()[-2000:]
        assert "parent process" in proc.output() and "is gone: stopping" in proc.output()
        assert not [pid for pid in started if alive(pid)], [command(p) for p in started]
    finally:
        parent.kill()
        proc.stop()


# ---------------------------------------------------------------------------- checkpoint integrity


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> FederationSetup:
    manifest = generate_federation(
        tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=12, progress=False
    )
    stats = [site_code_stats(open_site(s.root)) for s in manifest.sites]
    return FederationSetup(
        vocabulary=build_vocabulary(stats, min_subjects=2), model=load_model_config("tiny"), model_seed=1
    )


def write_checkpoint(out_dir: Path, setup: FederationSetup) -> Path:
    arrays = {k: v.numpy() + 0.5 for k, v in init_model(setup).state_dict().items()}
    state = ServerState(
        round=1, arrays=arrays, strategy={}, setup=setup, run_config=fed_config(out_dir).model_dump(mode="json")
    )
    return save_server_checkpoint(out_dir / "checkpoints", state)


def _flip_byte(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def _change_step(path: Path) -> None:  # still valid JSON, other content
    assert '"round": 1' in path.read_text()
    path.write_text(path.read_text().replace('"round": 1', '"round": 7', 1))


CORRUPTIONS = {
    f"{ARRAYS_FILE}: one flipped byte": (ARRAYS_FILE, lambda p: _flip_byte(p, p.stat().st_size // 2)),
    f"{STRATEGY_FILE}: one flipped byte": (STRATEGY_FILE, lambda p: _flip_byte(p, p.stat().st_size - 1)),
    "checkpoint.json: truncated": ("checkpoint.json", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "checkpoint.json: valid JSON, changed": ("checkpoint.json", _change_step),
    "checkpoint.json.sha256: deleted": (META_HASH_FILE, lambda p: p.unlink()),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_refused_on_resume(corruption: str, setup: FederationSetup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt = write_checkpoint(out, setup)
    assert load_server_checkpoint(ckpt).round == 1  # intact: it loads
    name, corrupt = CORRUPTIONS[corruption]
    corrupt(ckpt / name)
    # The ServerApp's own resume path; grid=None: refusing must happen before any site is asked.
    server = FederationServer(grid=None, cfg=fed_config(out, resume=True))  # type: ignore[arg-type]  # deliberately no grid
    with pytest.raises(CheckpointError) as info:
        server.run()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(ckpt / name) in message and message.startswith(f"refusing checkpoint {ckpt}")
    # Never loaded: no resume was logged, no audit record written, the checkpoint left as it was.
    assert not (out / "rounds.jsonl").exists() and not (out / AUDIT_FILE).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]


# ---------------------------------------------------------------------------- limits


def _group_of(key: str) -> str:
    return key.split(".")[0]


def _reply(node: int, arrays: dict[str, np.ndarray], n: int = 10) -> Message:
    reply = TrainReply.model_validate(
        {"arrays": arrays, "num_examples": n, "group_examples": {_group_of(k): n for k in arrays}},
        context={"group_of": _group_of},
    )
    return make_message(train_metadata(f"r{node}", src=node, dst=0, reply_to=f"m{node}"), train_reply_content(reply))


def _sent(*nodes: int) -> list[Message]:
    """Train messages to these nodes, with the message ids the Grid sets when it pushes them."""
    return [
        make_message(train_metadata(f"m{i}", src=0, dst=n), RecordDict({"config": ConfigRecord({})}))
        for i, n in enumerate(nodes)
    ]


def _strategy(**kwargs) -> ModalityAwareFedAvg:
    return ModalityAwareFedAvg(group_of=_group_of, **kwargs)


def test_a_reply_over_the_size_limit_is_rejected_and_the_round_goes_on() -> None:
    glob = {"shared.w": np.zeros((4, 4), np.float32), "ehr.w": np.zeros(8, np.float32)}
    # As the ServerApp derives it: from the global arrays as a site holding every group receives them.
    limit = default_max_reply_bytes(pack_record(glob))
    # The derived limit admits a full-model reply (one packed part), float32 or float16.
    full = pack_record(glob)
    assert array_record_bytes(full) <= limit
    s = _strategy(max_reply_bytes=limit)
    ok = _reply(1, {k: v + 1 for k, v in glob.items()})
    # A reply as big as asked: right keys, but the bytes of 10x the model in one array's payload.
    huge = _reply(2, {k: v + 5 for k, v in glob.items()})
    arr = next(iter(huge.content.array_records.values()))[PACKED_PART]
    arr.data = arr.data + b"\0" * (10 * limit)
    outcome = aggregate_replies(s, 1, [ok, huge], current_arrays=glob, node_groups=None, sent=_sent(1, 2))
    assert outcome.arrays is not None
    np.testing.assert_array_equal(outcome.arrays["shared.w"], glob["shared.w"] + 1)  # the ok reply alone
    (rejected,) = outcome.rejected
    assert rejected.node_id == 2 and "exceeds the limit" in rejected.reason and f"{limit:,} B" in rejected.reason
    with pytest.raises(ValueError, match="margin"):
        default_max_reply_bytes(full, margin=0.5)


def test_error_replies_from_the_superlink_are_attributed_to_the_silent_node() -> None:
    glob = {"shared.w": np.zeros(3, np.float32)}
    s = _strategy()
    sent = _sent(5, 6)
    alive = _reply(5, {"shared.w": glob["shared.w"] + 2})
    alive.metadata.__dict__["_reply_to_message_id"] = "m0"
    # Flower's NODE_UNAVAILABLE reply: from the SuperLink (node 1), answering m1 (sent to node 6).
    dead = make_message(
        train_metadata("e1", src=1, dst=0, reply_to="m1"), error=Error(code=3, reason="Error: Node Unavailable")
    )
    assert origin(alive, sent) == 5 and origin(dead, sent) == 6
    outcome = aggregate_replies(
        s, 1, [alive, dead], current_arrays=glob, node_groups={5: ["shared"], 6: ["shared"]}, sent=sent
    )
    assert outcome.arrays is not None
    np.testing.assert_array_equal(outcome.arrays["shared.w"], glob["shared.w"] + 2)
    (rejected,) = outcome.rejected
    assert rejected.node_id == 6 and "Node Unavailable" in rejected.reason and rejected.kind == "error"


def test_a_reply_to_no_message_sent_and_a_second_reply_are_rejected() -> None:
    glob = {"shared.w": np.zeros(3, np.float32)}
    sent = _sent(5)
    first, again = _reply(5, {"shared.w": glob["shared.w"] + 2}), _reply(5, {"shared.w": glob["shared.w"] + 9})
    stranger = _reply(8, {"shared.w": glob["shared.w"] + 4})
    outcome = aggregate_replies(
        _strategy(), 1, [first, stranger, again], current_arrays=glob, node_groups=None, sent=sent
    )
    assert outcome.arrays is not None
    np.testing.assert_array_equal(outcome.arrays["shared.w"], glob["shared.w"] + 2)  # the first reply alone
    assert outcome.accepted == [5]
    assert [(r.node_id, r.kind) for r in outcome.rejected] == [(8, "unsolicited"), (5, "duplicate")]


def test_server_checkpoints_are_plain_arrays_and_resume_bit_for_bit(setup: FederationSetup, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        k: rng.standard_normal(v.shape).astype(v.numpy().dtype) for k, v in init_model(setup).state_dict().items()
    }
    moments = {"m.a": rng.standard_normal(3).astype(np.float32), "v.a": rng.random(3).astype(np.float32)}
    state = ServerState(
        round=4,
        arrays=arrays,
        strategy=moments,
        setup=setup,
        run_config=fed_config(tmp_path).model_dump(mode="json"),
        python_random=random.getstate(),
        torch_random=torch.get_rng_state(),
    )
    path = save_server_checkpoint(tmp_path / "checkpoints", state)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [ARRAYS_FILE, STRATEGY_FILE, "checkpoint.json", META_HASH_FILE]
    )
    back = load_server_checkpoint(path)
    assert back.round == 4 and back.setup.sha256 == setup.sha256 and back.python_random == state.python_random
    assert back.torch_random is not None and state.torch_random is not None
    assert torch.equal(back.torch_random, state.torch_random)
    for saved, loaded in ((arrays, back.arrays), (moments, back.strategy)):
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert loaded[k].dtype == saved[k].dtype and loaded[k].tobytes() == saved[k].tobytes(), k


def test_limits_are_run_config_keys() -> None:
    flat = default_run_config()
    assert flat["max-reply-bytes"] == 0 and flat["timeout-s"] == 3600.0 and flat["reply-size-margin"] == 1.25
    cfg = FederationConfig.from_run_config({**flat, "out-dir": "/tmp/x", "max-reply-bytes": 1000, "timeout-s": 30})
    assert (cfg.max_reply_bytes, cfg.timeout_s) == (1000, 30)
    with pytest.raises(ValueError, match="reply_size_margin"):
        FederationConfig.from_run_config({**flat, "out-dir": "/tmp/x", "reply-size-margin": 0.5})


# ---------------------------------------------------------------------------- what the coordinator sees


def test_a_refused_checkpoint_reaches_server_log_outcome_and_the_coordinator(
    setup: FederationSetup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    ckpt = write_checkpoint(out, setup)
    _flip_byte(ckpt / ARRAYS_FILE, 100)
    # As in a deployed flwr-serverapp process: the root logger at WARNING, "healthfm" unset.
    root, healthfm = logging.getLogger(), logging.getLogger("healthfm")
    saved = root.level, healthfm.level
    root.setLevel(logging.WARNING)
    healthfm.setLevel(logging.NOTSET)
    try:
        with pytest.raises(CheckpointError):
            FederationServer(grid=None, cfg=fed_config(out, resume=True), run_id=7).run()  # type: ignore[arg-type]  # deliberately no grid
    finally:
        root.setLevel(saved[0])
        healthfm.setLevel(saved[1])
    log_text = (out / "server.log").read_text()
    assert " INFO healthfm.server: run 7: out_dir" in log_text  # the INFO log, not only warnings
    assert " ERROR healthfm.server: run failed: CheckpointError: refusing checkpoint" in log_text
    outcome = read_outcome(out)
    assert outcome is not None and outcome.run_id == 7 and outcome.status == "failed"
    assert outcome.reason.startswith("CheckpointError: refusing checkpoint") and str(ckpt) in outcome.reason
    # `launch --wait` / `status` print that reason and fail.
    assert report_outcome(7, "finished:failed", out) == EXIT_FAILED
    assert "refusing checkpoint" in capsys.readouterr().err
    # Another run's outcome is not this one's.
    assert report_outcome(8, "finished:failed", out) == EXIT_FAILED
    assert "records nothing for it" in capsys.readouterr().err


def _round(rnd: int, statuses: dict[str, str]) -> dict:
    return {
        "event": "round",
        "round": rnd,
        "sites": {
            s: {"status": st, **({"reason": "Node Unavailable"} if st == "error" else {})} for s, st in statuses.items()
        },
    }


def test_a_site_lost_after_round_one_fails_the_coordinator(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    events = [
        _round(1, {"biobank": "ok", "hospital": "ok", "genomics": "ok", "late": "error"}),
        _round(2, {"biobank": "ok", "hospital": "error", "genomics": "ok", "late": "ok"}),
        {
            "event": "evaluate",
            "round": 2,
            "sites": {"biobank": {}, "late": {}},
            "absent": {"hospital": "x", "genomics": "no usable evaluation reply"},
        },
    ]
    lost = sites_lost(events)
    assert set(lost) == {"hospital", "genomics"}  # "late" never trained in round 1: not lost
    assert "Node Unavailable" in lost["hospital"] and "no evaluation after round 2" in lost["genomics"]
    assert sites_lost(events[:2] + [{"event": "evaluate", "round": 1, "sites": {}}]) == {"hospital": lost["hospital"]}
    outcome = RunOutcome(run_id=3, status="completed", sites_lost=lost, rounds=2, rounds_done=2, started_at=0.0)
    write_outcome(tmp_path, outcome)
    assert report_outcome(3, "finished:completed", tmp_path) == EXIT_SITE_LOST
    err = capsys.readouterr().err
    assert "lost site(s): genomics" in err and "hospital (round 2: error: Node Unavailable)" in err
    write_outcome(tmp_path, outcome.model_copy(update={"sites_lost": {}}))
    assert report_outcome(3, "finished:completed", tmp_path) == EXIT_OK


def test_resume_skips_a_launch_that_failed_before_round_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    good = LaunchRecord(run_id=1, out_dir=str(out), run_config={"rounds": 3}, launched_at="t1")
    bad = LaunchRecord(
        run_id=2, out_dir=str(out), run_config={"rounds": 3, "model": "paper"}, launched_at="t2", resumed=True
    )
    with pytest.raises(CoordinatorError, match="no launch of .* got through round 0"):
        launch_to_resume([good, bad], out)
    (out / "rounds.jsonl").write_text(json.dumps({"event": "setup", "run_id": 1, "round": 0}) + "\n{cut sh")
    write_outcome(
        out, RunOutcome(run_id=2, status="failed", reason="ValueError: cannot resume: model differs", started_at=0.0)
    )
    assert launch_to_resume([good, bad], out) is good
    err = capsys.readouterr().err
    assert "not reusing the config of run 2" in err and "cannot resume: model differs" in err


def test_an_unreachable_superlink_is_not_an_unknown_run_and_a_one_off_address_is_not_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    saved = write_connection(paths, f"127.0.0.1:{free_port()}", insecure=False)  # nothing listens there
    before = saved.read_bytes()
    assert coordinator_main(["status", str(paths.root), "--run-id", "3"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "unreachable" in err and "knows no run" not in err
    other = f"127.0.0.1:{free_port()}"
    assert coordinator_main(["status", str(paths.root), "--superlink", other]) == EXIT_UNREACHABLE
    assert other in capsys.readouterr().err  # it used the one-off address ...
    assert saved.read_bytes() == before  # ... and did not save it


# ---------------------------------------------------------------------------- a site that comes back


@pytest.mark.slow  # CI's slow stage (Makefile SLOW_CI): the default suite's 6 minutes
@pytest.mark.usefixtures("serverapp_identity")
def test_a_site_that_lost_its_setup_gets_it_again_and_trains_in_that_round(tmp_path: Path) -> None:
    manifest, nodes = tiny_nodes(tmp_path)
    victim = next(n for n, c in nodes.items() if c["site-name"] == "hospital")
    grid = InProcessGrid(nodes, restart=(victim, 2))  # before round 2
    out = tmp_path / "run"
    cfg = fed_config(
        out,
        local_steps=1,
        batch_size=8,
        max_events=64,
        max_patches=8,
        min_nodes=3,
        vocab_min_subjects=5,
        eval_n_boot=10,
        timeout_s=60,
    )
    FederationServer(grid, cfg, run_id=1).run()
    rounds = {e["round"]: e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"}
    back = rounds[2]["sites"]["hospital"]
    assert back["status"] == "ok" and back["setup_resent"] is True, back
    assert "hospital" in rounds[2]["contributors"]["shared"]
    outcome = read_outcome(out)
    assert outcome is not None
    assert outcome.ok


@pytest.mark.usefixtures("serverapp_identity")
def test_every_site_absent_from_a_round_is_in_the_audit_log(tmp_path: Path) -> None:
    manifest, nodes = tiny_nodes(tmp_path)
    grid = InProcessGrid(nodes)
    out = tmp_path / "run"
    cfg = fed_config(
        out,
        local_steps=1,
        batch_size=8,
        max_events=64,
        max_patches=8,
        min_nodes=2,
        vocab_min_subjects=5,
        eval_n_boot=10,
        timeout_s=2,
    )
    gone = next(n for n, c in nodes.items() if c["site-name"] == "genomics")
    real_send = grid.send_and_receive

    def send(messages, *, timeout=None):  # noqa: ANN001, ANN202 - the site disconnects after round 1
        replies = real_send(messages, timeout=timeout)
        if grid.train_exchanges == 1 and gone in grid.contexts:
            del grid.contexts[gone]
        return replies

    grid.send_and_receive = send  # type: ignore[method-assign]  # this grid's sites: one disconnects
    FederationServer(grid, cfg, run_id=1).run()
    records = list(read_audit_log(out / AUDIT_FILE))
    missing = [r for r in records if r["record"] == "site-round" and r["round"] == 2 and r["site"] == "genomics"]
    assert missing and missing[0]["status"] == "absent" and missing[0]["reason"] == "not connected to the SuperLink"
    evaluation = [r for r in records if r["record"] == "evaluation"][-1]
    assert evaluation["absent"] == {"genomics": "not connected to the SuperLink"}
    outcome = read_outcome(out)
    assert outcome is not None
    assert outcome.sites_lost.keys() == {"genomics"}
