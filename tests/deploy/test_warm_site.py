"""Warm sites and their threads: what a long-lived ClientApp process keeps between messages, when
it lets go, and the site's torch thread setting.

The warm ClientApp (client/deploy/warm_clientapp.py) is the same ClientApp called again in one process:
the tests call client.client_app's real app with real Flower messages and one Context, as the
warm process does for a run's messages. The process handling (tokens, idle stop) runs the real
warm process; the whole path with a SuperNode is benchmarks/federation_round.py's.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import weakref
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.config import get_metadata_from_config
from flwr.common.constant import Status
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_and_inflate_object_from_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.start_client_internal import _pull_and_store_message
from helpers.deploy_fixtures import CLIENT, SITES, TINY_RUN, Process, join_args, round_events, site_policy
from helpers.narrowing import present
from helpers.process_faults import wait_until

from client import site_runtime
from client.client import build_parser
from client.client_app import make_client_app
from client.deploy.app_guard import FAST_POLL_SECONDS, FAST_WINDOW_SECONDS, POLL_SECONDS, AppGuard
from client.deploy.approval import approve, inspect_bundle
from client.deploy.flower_patches import set_pull_backoff
from client.deploy.warm_clientapp import TaskTokens, WarmWorker, collect_between_tasks, serve_tasks
from client.policy import PolicyError, load_policy
from client.site_runtime import SiteConfig, get_runtime
from client.threads import AUTO_MAX, apply_threads, auto_threads
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.files import write_flat_toml
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import SETUP, FederationSetup, RoundConfig
from healthfm_core.terms.groups import GROUPS, parameter_group
from healthfm_core.terms.model_config import load_model_config
from server.deploy.bundle import build_bundle
from server.deploy.flwr_app import parse_overrides, write_app
from server.deploy.flwr_control import start_run, wait_for_run
from server.deploy.provision import FederationPaths
from server.deploy.registry import registry_path
from server.strategy import ModalityAwareFedAvg, pack_record
from simulations.synthetic import generate_federation


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
            {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in runtime.groups}
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
    every_group = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
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
    that forever too (tests/deploy/test_faults.py's frozen site found it)."""
    cmd = [sys.executable, "-m", "client.deploy.warm_clientapp", "--runtime-api-address", "127.0.0.1:9"]
    proc = subprocess.Popen(
        [*cmd, "--run-id", "7", "--fab-hash", "a" * 64],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
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


def test_the_quick_collection_frees_a_tasks_own_cycles_and_the_full_one_the_frozen_too() -> None:
    class Cycle:
        pass

    def cycle() -> weakref.ref[Cycle]:
        c = Cycle()
        c.me = c  # type: ignore[attr-defined]
        return weakref.ref(c)

    try:
        frozen = cycle()
        gc.freeze()  # made garbage while frozen: only a full collection finds it
        fresh = cycle()  # made by this task, after the last freeze
        assert frozen() is not None and fresh() is not None
        collect_between_tasks(full=False)
        assert fresh() is None and frozen() is not None
        collect_between_tasks(full=True)
        assert frozen() is None
    finally:
        gc.unfreeze()


def _tokens(*lines: str) -> tuple[TaskTokens, io.TextIOWrapper]:
    """TaskTokens on a real pipe with `lines` already written; the writing end, to write more or close."""
    read_fd, write_fd = os.pipe()
    writer = os.fdopen(write_fd, "w", buffering=1)
    for line in lines:
        writer.write(line + "\n")
    return TaskTokens(os.fdopen(read_fd)), writer


def _serving(tokens: TaskTokens, events: list[str], **kwargs: Any) -> tuple[threading.Thread, io.StringIO]:
    replies = io.StringIO()

    def serve(token: str) -> str:
        events.append(f"serve {token}")
        return "COMPLETED"

    def collect(full: bool) -> None:
        events.append("full" if full else "quick")
        collect_between_tasks(full)

    thread = threading.Thread(target=serve_tasks, args=(tokens, serve, replies, collect), kwargs=kwargs, daemon=True)
    thread.start()
    return thread, replies


def test_a_task_that_follows_at_once_waits_for_no_full_collection_and_an_idle_moment_gets_it() -> None:
    # The site whose reply ends a round gets its next task ~0.15 s later: it is served after the
    # quick collection; the full one waits until no task came for idle_s.
    events: list[str] = []
    tokens, writer = _tokens("a", "b")
    try:
        thread, replies = _serving(tokens, events, idle_s=0.2, every=16)
        wait_until(lambda: "full" in events, 60, "the full collection")
        assert events == ["serve a", "quick", "serve b", "quick", "full"]
        writer.write("c\n")
        writer.close()  # c, then the end: the loop ends after c's quick collection
        thread.join(60)
        assert not thread.is_alive()
        assert events == ["serve a", "quick", "serve b", "quick", "full", "serve c", "quick"]
        assert replies.getvalue().splitlines() == ["done 1 COMPLETED", "done 2 COMPLETED", "done 3 COMPLETED"]
    finally:
        gc.unfreeze()
        writer.close()


def test_a_site_never_idle_still_gets_a_full_collection_every_few_tasks() -> None:
    events: list[str] = []
    tokens, writer = _tokens("a", "b", "c")
    writer.close()
    try:
        thread, _ = _serving(tokens, events, idle_s=60.0, every=2)
        thread.join(60)
        assert not thread.is_alive()
        assert events == ["serve a", "quick", "serve b", "full", "serve c", "quick"]
    finally:
        gc.unfreeze()


def test_app_guard_refuses_an_unknown_clientapp_mode() -> None:
    with pytest.raises(ValueError, match="--clientapp: value 'lukewarm'"):
        AppGuard("127.0.0.1:9", None, "hospital", clientapp="lukewarm")


# ---------------------------------------------------------------------------- the approved code


class LocalSuperNode:
    """Flower's SuperNode state and its Runtime API (the real FastAPI app, on 127.0.0.1) with the
    SuperLink's side played here: a message is stored by Flower's own `_pull_and_store_message`
    (run, FAB and context as the SuperNode stores them), the site's real app guard takes the task
    and runs it warm (client/deploy/warm_clientapp.py) or cold (flwr-clientapp), and the reply is read
    back from the node's state. The deployed path is tests/deploy/test_trust.py's."""

    NODE_ID = 42

    def __init__(self) -> None:
        self.state_factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.state_factory.state()
        self.store = self.state_factory.objectstore_factory.store()
        self.state.set_node_id(self.NODE_ID)
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app=create_app(state_factory=self.state_factory), host="127.0.0.1", port=self.port)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while self.thread.is_alive() and not self.server.started:
            time.sleep(0.05)
        assert self.server.started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def deliver(self, fab: bytes, run_id: int, message: Message, node_config: dict) -> None:
        config = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())
        fab_id, fab_version = get_metadata_from_config(config)
        run = Run.create_empty(run_id)
        run.fab_id, run.fab_version, run.fab_hash = fab_id, fab_version, hashlib.sha256(fab).hexdigest()
        run.status = RunStatus(status=Status.RUNNING, sub_status="", details="")
        run.primary_task_type = TaskType.SERVER_APP
        message.metadata.__dict__["_message_id"] = message.object_id
        objects = get_all_nested_objects(message)
        delivered = [(message, get_object_tree(message))]
        assert (
            _pull_and_store_message(
                state=self.state,
                object_store=self.store,
                node_config=node_config,
                receive=lambda: delivered.pop() if delivered else None,
                get_run=lambda _run_id: run,
                get_fab=lambda fab_hash, _run_id: Fab(fab_hash, fab, {}),
                pull_object=lambda _run_id, object_id: objects[object_id].deflate(),
                confirm_message_received=lambda *_: None,
                trusted_entities=None,
            )
            == run_id
        )

    def reply(self, guard: AppGuard, patience: float = 900.0) -> Message:
        """Let the guard take the task, then wait for the ClientApp's reply (`patience` only
        guards against a hang)."""
        deadline = time.monotonic() + patience
        while guard.poll_once() is None:
            assert time.monotonic() < deadline, "the guard never got the task"
            time.sleep(0.05)
        while not (replies := self.state.get_messages_legacy(is_reply=True)):
            assert time.monotonic() < deadline, "no reply from the ClientApp"
            time.sleep(0.1)
        (reply,) = replies
        tree = self.store.get_object_tree(reply.metadata.message_id)
        # The reply is listed once its tree is; its objects follow (b"" until each has arrived).
        while not all(
            (contents := {t.object_id: self.store.get(t.object_id) or b"" for t in iterate_object_tree(tree)}).values()
        ):
            assert time.monotonic() < deadline, "the reply's objects never arrived"
            time.sleep(0.1)
        inflated = inflate_object_from_contents(reply.metadata.message_id, contents)
        assert isinstance(inflated, Message)
        return inflated

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


REPO = Path(__file__).resolve().parents[2]
CAPABILITIES_REPLY = "return Message(RecordDict({CAPABILITIES_RECORD: ConfigRecord(caps.to_flat())}), reply_to=msg)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    """The federation's bundle (no code: the site's installed client) and one built from a copy of
    this checkout's client/ whose capabilities reply names the file of every `client` module the
    process runs (issue 26, break 6)."""
    tmp = tmp_path_factory.mktemp("bundles")
    app = write_app(FederationPaths(root=tmp / "fed"))
    shipped = tmp / "healthfm-federation"
    shipped.mkdir()
    shutil.copy(app / "pyproject.toml", shipped / "pyproject.toml")
    shutil.copytree(REPO / "client", shipped / "client", ignore=shutil.ignore_patterns("__pycache__"))
    source = (shipped / "client" / "client_app.py").read_text()
    assert CAPABILITIES_REPLY in source and "\nimport logging\n" in source
    marked = CAPABILITIES_REPLY.replace(
        "ConfigRecord(caps.to_flat())}",
        'ConfigRecord(caps.to_flat()), "code": ConfigRecord({n: str(getattr(m, "__file__", None)) '
        'for n, m in list(sys.modules.items()) if n.partition(".")[0] == "client"})}',
    )
    source = source.replace(CAPABILITIES_REPLY, marked).replace("\nimport logging\n", "\nimport logging\nimport sys\n")
    (shipped / "client" / "client_app.py").write_text(source)
    built = {"installed": build_bundle(app), "shipped": build_bundle(shipped)}
    assert "client/client_app.py" in inspect_bundle(built["shipped"][0]).python_files()
    assert inspect_bundle(built["installed"][0]).python_files() == []
    return built


@pytest.mark.slow  # four real SuperNode + ClientApp process sets (~25 s): CI's slow stage
@pytest.mark.usefixtures("identity")
@pytest.mark.parametrize("bundle", ["shipped", "installed"])
@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_what_runs_is_the_approved_bundles_code_warm_and_cold(
    mode: str,
    bundle: str,
    bundles: dict[str, tuple[bytes, str]],
    hospital: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 26, break 6: the same approved bundle, the same message, the real guard in either
    mode: a bundle that ships its own client/ runs its files in both (warm ran the site's
    checkout instead); one that ships no code runs the site's installed client in both."""
    fab, digest = bundles[bundle]
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"approved_apps: [{digest}]\n")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    node = LocalSuperNode()
    guard = AppGuard(node.address, policy, "hospital", clientapp=mode)
    try:
        query = Message(RecordDict(), dst_node_id=LocalSuperNode.NODE_ID, message_type="query.capabilities")
        node.deliver(fab, 7, query, hospital)
        reply = node.reply(guard)
    finally:
        guard.close()
        node.close()
    assert not reply.has_error(), reply.error
    assert "capabilities" in reply.content.config_records
    if bundle == "installed":
        assert "code" not in reply.content.config_records  # the checkout's ClientApp, unmarked
        return
    assert "code" in reply.content.config_records, f"{mode}: the site's client ran, not the approved bundle's"
    code = dict(reply.content.config_records["code"])
    assert "client.client_app" in code and "client.site_runtime" in code, code
    # Every `client` module of this ClientApp is the bundle's own file, unpacked from the approved bytes.
    outside = {name: f for name, f in code.items() if f"{digest[:8]}/client/" not in str(f)}
    assert not outside, outside


@pytest.mark.usefixtures("identity")
def test_a_warm_clientapp_refuses_a_bundle_file_it_cannot_run_as_shipped(
    bundles: dict[str, tuple[bytes, str]], hospital: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle that ships `flwr/` (loaded by every ClientApp process before the app: its files
    there would never run) is answered with an error reply naming the file, before any of the
    bundle's code runs; the server sees it as that site's reply. (flwr-clientapp, cold, runs the
    installed Flower there and no check of its own.)"""
    app = tmp_path / "healthfm-federation"
    app.mkdir()
    with zipfile.ZipFile(io.BytesIO(bundles["installed"][0])) as fab:
        (app / "pyproject.toml").write_bytes(fab.read("pyproject.toml"))
    (app / "flwr").mkdir()
    (app / "flwr" / "__init__.py").write_text("raise SystemExit('the bundle ran its own flwr')\n")
    fab_bytes, digest = build_bundle(app)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"approved_apps: [{digest}]\n")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    node = LocalSuperNode()
    guard = AppGuard(node.address, policy, "hospital", clientapp="warm")
    try:
        query = Message(RecordDict(), dst_node_id=LocalSuperNode.NODE_ID, message_type="query.capabilities")
        node.deliver(fab_bytes, 7, query, hospital)
        reply = node.reply(guard)
    finally:
        guard.close()
        node.close()
    assert reply.has_error()
    assert "the approved bundle's file flwr/__init__.py is not what this process runs" in present(reply.error.reason)
    assert "site-packages/flwr/__init__.py" in present(reply.error.reason)


def _marking_app(paths: FederationPaths, app: Path, marks: Path) -> Path:
    """The federation's app shipping a copy of this checkout's client/ whose client_app, imported
    at a site (its Flower home is under a `state-*` directory here), leaves a file in `marks`
    naming that site's Flower home and the file it was imported from."""
    app.mkdir()
    shutil.copy(paths.server_dir / "app" / "pyproject.toml", app / "pyproject.toml")
    shutil.copytree(REPO / "client", app / "client", ignore=shutil.ignore_patterns("__pycache__"))
    source = (app / "client" / "client_app.py").read_text()
    mark = (
        "\nimport os as _os\n"
        "if 'state-' in _os.environ.get('FLWR_HOME', ''):\n"
        f"    (Path({str(marks)!r}) / str(_os.getpid())).write_text(_os.environ['FLWR_HOME'] + '\\n' + __file__)\n"
    )
    (app / "client" / "client_app.py").write_text(
        source.replace("\nimport logging\n", "\nimport logging\nfrom pathlib import Path\n") + mark
    )
    return app


@pytest.mark.slow
def test_deployed_sites_run_the_approved_bundles_code_warm_and_cold(
    superlink: str,
    federation: FederationPaths,
    sites: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Issue 26, break 6, deployed: three sites (biobank and genomics warm, hospital cold) approve a
    bundle shipping its own client/; every site's ClientApp is imported from that bundle's files
    (warm sites ran their checkout's before), and the run completes."""
    marks = tmp_path / "marks"
    marks.mkdir()
    app = _marking_app(federation, tmp_path / "healthfm-federation", marks)
    fab, digest = build_bundle(app)
    assert approve(inspect_bundle(fab), site_policy(federation))
    modes = {"biobank": "warm", "hospital": "cold", "genomics": "warm"}
    procs: dict[str, Process] = {}
    out = tmp_path / "run"
    try:
        for name in SITES:
            args = join_args(federation, sites[name], name, superlink, tmp_path / f"state-{name}")
            procs[name] = Process(
                [sys.executable, str(CLIENT), *args, "--clientapp", modes[name]], tmp_path / f"join-{name}.out"
            )
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        config = {
            **parse_overrides([a for a in TINY_RUN[2:] if a != "-c"]),
            "rounds": 1,
            "out-dir": str(out),
            "registry": str(registry_path(federation)),
        }
        run_id = start_run(federation, app, write_flat_toml(tmp_path / "run-config.toml", config))
        status = wait_for_run(federation, run_id, 1200)
    finally:
        for proc in procs.values():
            proc.stop()
    assert status == "finished:completed", (status, (out / "server.log").read_text()[-3000:])
    _, rounds = round_events(out)
    assert {s: e["status"] for s, e in rounds[1]["sites"].items()} == {s: "ok" for s in SITES}
    ran = [m.read_text().splitlines() for m in marks.iterdir()]
    for name in SITES:
        files = {f for home, f in ran if f"state-{name}" in home}
        assert files, f"{name} ({modes[name]}): the bundle's client_app never ran there"
        assert all(f"{digest[:8]}/client/client_app.py" in f for f in files), (name, files)


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
