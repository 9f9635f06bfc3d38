"""The site's app guard: the only process that starts a ClientApp at this site, and only for an
app bundle the site approved.

How Flower 1.41 runs a ClientApp (flwr/supernode/start_client_internal.py, flwr/supercore/
superexec): the SuperNode pulls a message, fetches the run's FAB (it checks that the content
hashes to the run's fab_hash, NodeState.store_fab) and queues a task carrying that fab_hash. A
SuperExec polls the SuperNode's local Runtime API for tasks and starts `flwr-clientapp`, which
unpacks the FAB and imports its `clientapp` component. A check inside the ClientApp would come
too late (the bundle's modules are imported by then), and Flower's own FAB verification
(`--trusted-entities`) needs FABs signed by the Flower platform.

So `join` runs the SuperNode with `--isolation process` (it starts no SuperExec of its own) and
runs this guard in the SuperExec's place. For each task the guard reads the policy's
`approved_apps` (again at every task, so an approval takes effect without rejoining):
- the task's fab_hash is approved: `flwr-clientapp` is started for it, as Flower's SuperExec does;
- it is not: no process is started and the bundle is never unpacked; the guard takes the task's
  message and answers it with an error reply (ErrorCode.INVALID_FAB, the reason naming the site,
  the bundle's sha256 and how to approve it), which reaches the ServerApp as that site's reply,
  and closes the task as failed.
Only ClientApp tasks are taken: agent, model and connector tasks are never started here.

An approved task runs (`--clientapp`):
- `warm` (join's default): in the run's long-lived ClientApp process (client/deploy/warm_clientapp.py),
  started for the run's first task and stopped when a task of another run or bundle arrives, after
  `--warm-idle` seconds without a task, or with this guard; the site's data, sequences and model
  stay loaded between the run's messages. The approval is still checked here for every task.
- `cold`: a new `flwr-clientapp` process per task, as Flower's SuperExec does.
Both run the same code for an approved bundle: the files it ships (unpacked from the approved
bytes; warm: client/deploy/approved_code.py), the site's installed packages for the rest.

    python -m client.deploy.app_guard --runtime-api-address 127.0.0.1:PORT --policy FILE --site NAME \
        [--clientapp warm|cold] [--warm-idle S] [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.deploy.approval import approved_apps
from client.deploy.warm_clientapp import WarmWorker, task_client

log = logging.getLogger("healthfm.client.app_guard")

POLL_SECONDS = 0.2  # a local HTTP call; a round waits on it once per message
# Right after the warm ClientApp answered a message, the run's next one is due (the next round):
# for this long the guard asks every FAST_POLL_SECONDS, so the task waits 0.025 s on average, not 0.1 s.
# While a task runs it cannot get another (the SuperNode waits for the reply), so it asks slowly then.
FAST_POLL_SECONDS = 0.05
FAST_WINDOW_SECONDS = 20.0
WARM_IDLE_SECONDS = 600.0  # a warm ClientApp with no task for this long is stopped (the run ended)
CLIENTAPP_MODES = ("warm", "cold")
REFUSED_PREFIX = "refused by site"


def refusal_reason(site: str, fab_hash: str, policy: Path | None, why: str | None) -> str:
    where = f"policy {policy}" if policy is not None else "policy"
    detail = f" ({why})" if why else ""
    return (
        f"{REFUSED_PREFIX} {site}: app bundle sha256 {fab_hash} is not in the approved_apps of its {where}"
        f"{detail}; the site admin approves a bundle with `client.py approve BUNDLE.fab --policy FILE`"
    )


class AppGuard:
    """Takes the SuperNode's ClientApp tasks one at a time; starts approved ones, refuses the rest."""

    def __init__(
        self,
        runtime_api_address: str,
        policy: Path | None,
        site: str,
        clientapp: str = "warm",
        warm_idle: float = WARM_IDLE_SECONDS,
    ) -> None:
        if clientapp not in CLIENTAPP_MODES:
            raise ValueError(f"--clientapp: value {clientapp!r}: one of {CLIENTAPP_MODES}")
        self.address, self.policy, self.site = runtime_api_address, policy, site
        self.clientapp, self.warm_idle = clientapp, warm_idle
        self.warm: WarmWorker | None = None
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.children: list[subprocess.Popen[bytes]] = []

    def poll_once(self) -> Task | None:
        res = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
        )
        if not (res.HasField("task") and res.token):
            return None
        task = res.task
        approved, why = approved_apps(self.policy)
        if task.type == TaskType.CLIENT_APP and task.fab_hash and task.fab_hash in approved:
            log.info(
                "task %d of run %d: app bundle %s approved, %s",
                task.task_id,
                task.run_id,
                task.fab_hash[:12],
                "to the run's warm ClientApp" if self.clientapp == "warm" else "starting flwr-clientapp",
            )
            if self.clientapp == "warm":
                self.dispatch_warm(task, res.token)
            else:
                self.launch(res.token)
        else:
            self.refuse(res.token, task, refusal_reason(self.site, task.fab_hash or "(none)", self.policy, why))
        return task

    def launch(self, token: str) -> None:
        """What Flower's SubprocessExecutor runs for a ClientApp task."""
        exe = Path(sys.executable).parent / "flwr-clientapp"
        cmd = [
            str(exe) if exe.exists() else "flwr-clientapp",
            "--runtime-api-address",
            self.address,
            "--token",
            token,
            "--insecure",
            "--parent-pid",
            str(os.getpid()),
        ]
        self.children.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))

    def dispatch_warm(self, task: Task, token: str) -> None:
        """Hand an approved task to its run's warm ClientApp, starting one if none serves this
        run and bundle (another run's is stopped first: its state is freed)."""
        key = (int(task.run_id), str(task.fab_hash))
        if self.warm is not None and self.warm.key != key and self.warm.alive() and self.warm.busy():
            # Two runs at once: the other run's message in progress is not cut; this one runs cold.
            log.info("run %d: the warm ClientApp of run %d is busy: this task runs cold", task.run_id, self.warm.key[0])
            self.launch(token)
            return
        if self.warm is not None and (self.warm.key != key or not self.warm.alive()):
            if self.warm.alive():
                log.info(
                    "run %d: stopping the warm ClientApp of run %d (its data and model are freed)",
                    task.run_id,
                    self.warm.key[0],
                )
            self.warm.stop()
            self.warm = None
        if self.warm is None:
            log.info("run %d: starting its warm ClientApp", task.run_id)
            self.warm = WarmWorker(self.address, *key)
        if not self.warm.send(token):  # it died between tasks: this task goes to a fresh one
            self.warm.stop()
            self.warm = WarmWorker(self.address, *key)
            if not self.warm.send(token):
                log.error("task %d: the warm ClientApp could not take it; starting flwr-clientapp", task.task_id)
                self.launch(token)

    def refuse(self, token: str, task: Task, reason: str) -> None:
        """Answer the task's message with an error reply and close the task, running nothing."""
        log.error("task %d of run %d: %s", task.task_id, task.run_id, reason)
        client = task_client(self.address, token)
        context = None
        try:
            # The message, its context and the FAB's bytes (held in memory, never unpacked).
            message, context, _run, _fab = pull_task_input(client)
            push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
        except Exception as err:  # noqa: BLE001 - the task is closed as failed whatever happened
            log.error("task %d: could not send the refusal to the server: %s", task.task_id, err)
        finally:
            push_task_output(client, context, SubStatus.FAILED, reason)
            client.close()

    def poll_interval(self) -> float:
        """How long to wait before asking for a task again."""
        if self.warm is not None and self.warm.alive() and not self.warm.busy():
            if self.warm.idle_for() < FAST_WINDOW_SECONDS:
                return FAST_POLL_SECONDS
        return POLL_SECONDS

    def reap(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]
        if self.warm is not None and (not self.warm.alive() or self.warm.idle_for() > self.warm_idle):
            if self.warm.alive():
                log.info(
                    "run %d: no task for %.0f s: stopping its warm ClientApp (its data and model are freed)",
                    self.warm.key[0],
                    self.warm.idle_for(),
                )
            self.warm.stop()
            self.warm = None

    def close(self) -> None:
        if self.warm is not None:
            self.warm.stop(grace=5.0)
            self.warm = None
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.client.close()


def run(
    runtime_api_address: str,
    policy: Path | None,
    site: str,
    clientapp: str = "warm",
    warm_idle: float = WARM_IDLE_SECONDS,
) -> None:
    guard = AppGuard(runtime_api_address, policy, site, clientapp=clientapp, warm_idle=warm_idle)
    approved, why = approved_apps(policy)
    print(
        f"app guard for site {site}: {len(approved)} approved app bundle(s)"
        f"{' (' + why + ')' if why else ''}; ClientApp tasks of any other bundle are refused; "
        f"approved ones run {'warm (one ClientApp process per run)' if clientapp == 'warm' else 'cold (one process per message)'}",
        flush=True,
    )
    try:
        while True:
            guard.poll_once()
            guard.reap()
            time.sleep(guard.poll_interval())
    finally:
        guard.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.deploy.app_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's local Runtime API (HOST:PORT)")
    parser.add_argument("--policy", type=Path, default=None, help="the site policy holding approved_apps")
    parser.add_argument("--site", required=True, help="the site's name (in refusals)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    parser.add_argument(
        "--clientapp",
        choices=CLIENTAPP_MODES,
        default="warm",
        help="warm: one ClientApp process per run, kept between messages; cold: one per message",
    )
    parser.add_argument(
        "--warm-idle",
        type=float,
        default=WARM_IDLE_SECONDS,
        metavar="S",
        help=f"stop a run's warm ClientApp after S seconds without a task (default {WARM_IDLE_SECONDS:g})",
    )
    args = parser.parse_args(argv)
    if args.warm_idle <= 0:
        parser.error(f"--warm-idle: value {args.warm_idle}: must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per local HTTP poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the ClientApps it started, then exit
    try:
        run(args.runtime_api_address, args.policy, args.site, clientapp=args.clientapp, warm_idle=args.warm_idle)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
