"""Warm sites and their threads: what a long-lived ClientApp process keeps between messages, when
it lets go, and the site's torch thread setting.

The warm ClientApp (client/warm_clientapp.py) is the same ClientApp called again in one process:
the tests call client.client_app's real app with real Flower messages and one Context, as the
warm process does for a run's messages. The process handling (tokens, idle stop) runs the real
warm process; the whole path with a SuperNode is benchmarks/federation_round.py's.
"""

from __future__ import annotations

import functools
import gc
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime import run_clientapp

from client import site_runtime
from client.app_guard import FAST_POLL_SECONDS, FAST_WINDOW_SECONDS, POLL_SECONDS, AppGuard
from client.client import build_parser
from client.client_app import make_client_app
from client.policy import PolicyError, load_policy
from client.site_runtime import SiteConfig, get_runtime
from client.threads import AUTO_MAX, apply_threads, auto_threads
from client.warm_clientapp import WarmWorker, collect_between_tasks, set_pull_backoff
from healthfm_core.data.synthetic import generate_federation
from healthfm_core.data.vocab import build_vocabulary
from healthfm_core.federation import SETUP, FederationSetup, RoundConfig
from healthfm_core.model.config import load_model_config
from healthfm_core.model.groups import GROUPS, parameter_group
from server.strategy import ModalityAwareFedAvg, pack_record


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    manifest = generate_federation(tmp_path_factory.mktemp("d"), scenario="tiny", seed=0, n_subjects=30, progress=False)
    site = manifest.site("hospital")
    return {"site-root": str(site.root), "site-name": "hospital", "min-code-subjects": 5, "min-report-subjects": 2}


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a process before messages are made (the Message constructor reads it)."""
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _message(content: RecordDict, message_type: str, n: int) -> Message:
    msg = Message(content, dst_node_id=1, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{n}"
    return msg


def _setup(config: SiteConfig, min_subjects: int) -> FederationSetup:
    runtime = get_runtime(config)
    vocab = build_vocabulary([runtime.code_stats()], min_subjects=min_subjects)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=1)


@pytest.mark.usefixtures("identity")
def test_a_runs_train_messages_reuse_the_sites_state_and_a_new_setup_replaces_it(hospital: dict) -> None:
    site_runtime.drop_runtimes()
    app = make_client_app()
    context = Context(run_id=7, node_id=1, node_config=dict(hospital), state=RecordDict(), run_config={})
    config = SiteConfig.from_node_config(hospital)
    n = 0

    def ask(content: RecordDict, message_type: str) -> Message:
        nonlocal n
        n += 1
        reply = app(_message(content, message_type, n), context)
        assert not reply.has_error(), reply.error
        return reply

    def send_setup(setup: FederationSetup) -> None:
        ask(RecordDict({"setup": ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})}), SETUP)

    def train(setup: FederationSetup, rnd: int) -> Message:
        runtime = get_runtime(config)
        arrays = pack_record(  # as the server sends them: its groups' arrays, one packed part
            {k: v.numpy() for k, v in setup.init_model().state_dict().items() if parameter_group(k) in runtime.groups}
        )
        cfg = RoundConfig(
            round=rnd, rounds=3, local_steps=1, lr=1e-3, batch_size=4, max_events=32, setup_sha256=setup.sha256
        )
        return ask(RecordDict({"arrays": arrays, "config": ConfigRecord(cfg.to_flat())}), MessageType.TRAIN)

    first = _setup(config, min_subjects=5)
    send_setup(first)
    train(first, 1)
    runtime = get_runtime(config)
    sequences, (model, _) = runtime._sequences[first.sha256], runtime._models[first.sha256]
    site = runtime.site
    train(first, 2)
    # The same runtime, site, vocabulary-mapped sequences and model object served the second message.
    assert get_runtime(config) is runtime and runtime.site is site
    assert runtime._sequences[first.sha256] is sequences and runtime._models[first.sha256][0] is model

    second = _setup(config, min_subjects=6)  # another vocabulary: another setup sha256
    assert second.sha256 != first.sha256
    send_setup(second)
    reply = train(second, 3)
    assert "arrays" in reply.content.array_records
    assert list(runtime._sequences) == [second.sha256] and list(runtime._models) == [second.sha256]
    assert runtime._sequences[second.sha256] is not sequences and runtime._models[second.sha256][0] is not model
    site_runtime.drop_runtimes()


@pytest.mark.usefixtures("identity")
def test_a_train_message_packed_for_another_group_set_is_refused(hospital: dict) -> None:
    """The server packs one blob per group set; a site sent the blob of a set holding a group it
    does not hold (hospital: no genomics) refuses the message, as it refused that group's part."""
    site_runtime.drop_runtimes()
    app = make_client_app()
    context = Context(run_id=7, node_id=1, node_config=dict(hospital), state=RecordDict(), run_config={})
    # The federation's setup, as with a biobank beside the hospital: its model holds genomics.
    biobank = {**hospital, "site-root": str(Path(hospital["site-root"]).with_name("biobank")), "site-name": "biobank"}
    stats = [get_runtime(SiteConfig.from_node_config(c)).code_stats() for c in (hospital, biobank)]
    setup = FederationSetup(
        vocabulary=build_vocabulary(stats, min_subjects=5), model=load_model_config("tiny"), model_seed=1
    )
    assert "genomics" in setup.groups
    setup_record = ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})
    assert not app(_message(RecordDict({"setup": setup_record}), SETUP, 1), context).has_error()
    assert "genomics" not in get_runtime(SiteConfig.from_node_config(hospital)).groups
    every_group = {k: v.numpy() for k, v in setup.init_model().state_dict().items()}
    record = ModalityAwareFedAvg().records_for_nodes(every_group, {1: list(GROUPS)})[1]
    cfg = RoundConfig(round=1, rounds=1, local_steps=1, lr=1e-3, batch_size=4, max_events=32, setup_sha256=setup.sha256)
    train = RecordDict({"arrays": record, "config": ConfigRecord(cfg.to_flat())})
    # Raised in the ClientApp (its process turns it into the error reply the server logs).
    with pytest.raises(ValueError, match="of group 'genomics': this site holds only"):
        app(_message(train, MessageType.TRAIN, 2), context)
    site_runtime.drop_runtimes()


def test_an_edited_policy_rebuilds_the_runtime_and_an_unchanged_one_does_not(hospital: dict, tmp_path: Path) -> None:
    site_runtime.drop_runtimes()
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\n")
    config = SiteConfig.from_node_config({**hospital, "policy": str(policy)})
    first = get_runtime(config)
    assert get_runtime(config) is first
    policy.write_text("min_subjects: 3\n")
    second = get_runtime(config)
    assert second is not first and second.policy is not None and second.policy.min_subjects == 3
    assert len(site_runtime._RUNTIMES) == 1  # the stale one is dropped, not kept beside it
    site_runtime.drop_runtimes()


# ---------------------------------------------------------------------------- the warm process


def test_a_warm_clientapp_process_is_stopped_when_idle_and_the_guard_polls_fast_only_after_a_task() -> None:
    guard = AppGuard("127.0.0.1:9", None, "hospital", clientapp="warm", warm_idle=0.5)
    worker = WarmWorker("127.0.0.1:9", 7, "a" * 64)  # nothing listens there: it is never sent a task
    try:
        assert guard.poll_interval() == POLL_SECONDS  # no run here yet
        guard.warm = worker
        assert worker.alive() and worker.key == (7, "a" * 64) and not worker.busy()
        worker.sent = 1  # as if a task were in progress: never idle, never stopped under it
        time.sleep(0.7)
        assert worker.busy() and worker.idle_for() == 0.0
        assert guard.poll_interval() == POLL_SECONDS  # the SuperNode has no other task while one runs
        guard.reap()
        assert guard.warm is worker and worker.alive()
        worker.done = 1  # it finished: the run's next message is due
        assert guard.poll_interval() == FAST_POLL_SECONDS
        time.sleep(0.7)
        assert worker.idle_for() > 0.5
        with worker._lock:  # long past the window: the idle pace again
            worker.last_active -= FAST_WINDOW_SECONDS
        assert guard.poll_interval() == POLL_SECONDS
        guard.reap()  # idle past --warm-idle: stopped, its state freed
        assert guard.warm is None and worker.proc.poll() is not None  # gone (EOF, or SIGTERM while importing)
        assert guard.poll_interval() == POLL_SECONDS
    finally:
        worker.stop(grace=5)
        guard.close()


def test_a_warm_clientapp_stopped_in_a_task_whose_supernode_is_gone_exits() -> None:
    """Nothing listens at 127.0.0.1:9, as when a site's SuperNode died during a task: every call
    of the task retries without end (Flower's HTTP retry has no limit). SIGTERM (the guard stops
    it, or died: PR_SET_PDEATHSIG) must end the process, not start the task's reply and retry
    that forever too (tests/test_faults.py's frozen site found it)."""
    cmd = [sys.executable, "-m", "client.warm_clientapp", "--runtime-api-address", "127.0.0.1:9"]
    proc = subprocess.Popen(
        [*cmd, "--run-id", "7", "--fab-hash", "a" * 64],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write("a-task-token\n")
        proc.stdin.flush()
        for line in proc.stderr:  # in the task once its first call to the SuperNode fails
            if "retrying in" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_the_warm_clientapp_asks_its_supernode_again_soon_for_a_message_still_arriving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower's pull_task_input reads a message's objects through this module name: if it stops,
    # the short backoff set by the warm process silently stops taking effect.
    assert "pull_and_inflate_object_from_tree" in run_clientapp.pull_task_input.__code__.co_names
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", pull_and_inflate_object_from_tree)
    set_pull_backoff(0.05, 0.5)
    pull = run_clientapp.pull_and_inflate_object_from_tree
    assert isinstance(pull, functools.partial) and pull.func is pull_and_inflate_object_from_tree
    assert pull.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_between_tasks_garbage_is_collected_and_the_rest_frozen() -> None:
    class Cycle:
        pass

    try:
        cycle = Cycle()
        cycle.me = cycle  # type: ignore[attr-defined]
        gone = weakref.ref(cycle)
        gc.freeze()  # frozen by the task before, garbage in this one
        del cycle
        gc.collect()
        assert gone() is not None  # a frozen cycle outlives a collection...
        collect_between_tasks()
        assert gone() is None  # ...but not the one between tasks
        assert gc.get_freeze_count() > 0  # the survivors: the next handler's collection skips them
    finally:
        gc.unfreeze()


def test_app_guard_refuses_an_unknown_clientapp_mode() -> None:
    with pytest.raises(ValueError, match="--clientapp: value 'lukewarm'"):
        AppGuard("127.0.0.1:9", None, "hospital", clientapp="lukewarm")


# ---------------------------------------------------------------------------- threads


@pytest.mark.parametrize("value", ["0", "-2", "'4'", "2.5", "true"])
def test_policy_threads_must_be_a_whole_number_of_at_least_one(tmp_path: Path, value: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"threads: {value}\n")
    with pytest.raises(PolicyError, match=rf"{policy}: field threads: value"):
        load_policy(policy)


def test_policy_threads_accepts_a_positive_int(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("threads: 3\n")
    assert load_policy(policy).threads == 3
    policy.write_text("min_subjects: 3\n")
    assert load_policy(policy).threads is None  # default: the free cores


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "zero"])
def test_node_config_threads_is_validated(hospital: dict, value: object) -> None:
    with pytest.raises(ValueError, match="threads"):
        SiteConfig.from_node_config({**hospital, "threads": value})


def test_node_config_threads_reads_toml_scalars(hospital: dict) -> None:
    assert SiteConfig.from_node_config({**hospital, "threads": "4"}).threads == 4
    assert SiteConfig.from_node_config({**hospital, "threads": 2}).threads == 2
    assert SiteConfig.from_node_config({**hospital, "threads": "auto"}).threads == "auto"
    assert SiteConfig.from_node_config(hospital).threads is None


def test_auto_threads_is_the_free_cores_clamped() -> None:
    assert auto_threads(cores=16, load=3.4, cap=16) == 12
    assert auto_threads(cores=16, load=0.0) == AUTO_MAX
    assert auto_threads(cores=6, load=2.5) == 3
    assert auto_threads(cores=2, load=22.9) == 1  # a busy machine: one thread, never zero
    assert 1 <= auto_threads() <= AUTO_MAX
    with pytest.raises(ValueError, match="threads: value 0"):
        apply_threads(0)


def test_join_threads_takes_a_count_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    parse = build_parser().parse_args
    assert parse(["join", "SITE", "--superlink", "h:1", "--threads", "4"]).threads == 4
    assert parse(["join", "SITE", "--superlink", "h:1", "--threads", "auto"]).threads == "auto"
    assert parse(["join", "SITE", "--superlink", "h:1"]).threads is None  # cmd_join: the policy's, else auto
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parse(["join", "SITE", "--superlink", "h:1", "--threads", bad])
        err = capsys.readouterr().err
        assert "--threads: value" in err and bad in err and "or auto" in err


def test_the_runtime_applies_node_config_then_policy_then_auto(hospital: dict, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    policy = tmp_path / "policy.yaml"
    policy.write_text("threads: 3\n")
    try:
        site_runtime.drop_runtimes()
        assert get_runtime(SiteConfig.from_node_config({**hospital, "threads": 2, "policy": str(policy)})).threads == 2
        assert torch.get_num_threads() == 2
        site_runtime.drop_runtimes()
        assert (
            get_runtime(SiteConfig.from_node_config({**hospital, "threads": "auto", "policy": str(policy)})).threads
            == 3
        )
        assert torch.get_num_threads() == 3
        site_runtime.drop_runtimes()
        auto = get_runtime(SiteConfig.from_node_config({**hospital, "threads": "auto"})).threads
        assert auto is not None and 1 <= auto <= AUTO_MAX and torch.get_num_threads() == auto
        site_runtime.drop_runtimes()
        assert get_runtime(SiteConfig.from_node_config(hospital)).threads is None  # simulation: untouched
    finally:
        torch.set_num_threads(before)
        site_runtime.drop_runtimes()


def test_a_resumed_setup_trains_with_the_threads_of_its_first_run(
    hospital: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ClientApp of a later run (here: the machine got quieter, auto measures 2) applies the
    count the setup's first run at this site chose (1): the same sums, bit for bit."""
    before = torch.get_num_threads()
    setup, other = "c" * 64, "d" * 64
    node = {**hospital, "threads": "auto", "state-dir": str(tmp_path / "state")}
    try:
        monkeypatch.setattr(site_runtime, "auto_threads", lambda: 1)
        site_runtime.drop_runtimes()
        first = get_runtime(SiteConfig.from_node_config(node))
        assert first.threads == 1 and first.threads_for(setup) == 1
        monkeypatch.setattr(site_runtime, "auto_threads", lambda: 2)
        site_runtime.drop_runtimes()
        later = get_runtime(SiteConfig.from_node_config(node))
        assert later.threads == 2 and torch.get_num_threads() == 2
        assert later.threads_for(setup) == 1 and torch.get_num_threads() == 1
        assert later.threads_for(other) == 2 and torch.get_num_threads() == 2  # a new setup: measured
        site_runtime.drop_runtimes()
        fixed = get_runtime(SiteConfig.from_node_config({**node, "threads": 3}))
        assert fixed.threads_for(setup) == 3 and torch.get_num_threads() == 3  # a fixed count is never replaced
    finally:
        torch.set_num_threads(before)
        site_runtime.drop_runtimes()
