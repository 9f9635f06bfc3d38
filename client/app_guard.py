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

    python -m client.app_guard --runtime-api-address 127.0.0.1:PORT --policy FILE --site NAME [--parent-pid PID]
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
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.approval import approved_apps

log = logging.getLogger("healthfm.client.app_guard")

POLL_SECONDS = 0.5
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

    def __init__(self, runtime_api_address: str, policy: Path | None, site: str) -> None:
        self.address, self.policy, self.site = runtime_api_address, policy, site
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
                "task %d of run %d: app bundle %s approved, starting flwr-clientapp",
                task.task_id,
                task.run_id,
                task.fab_hash[:12],
            )
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

    def refuse(self, token: str, task: Task, reason: str) -> None:
        """Answer the task's message with an error reply and close the task, running nothing."""
        log.error("task %d of run %d: %s", task.task_id, task.run_id, reason)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
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

    def reap(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.client.close()


def run(runtime_api_address: str, policy: Path | None, site: str) -> None:
    guard = AppGuard(runtime_api_address, policy, site)
    approved, why = approved_apps(policy)
    print(
        f"app guard for site {site}: {len(approved)} approved app bundle(s)"
        f"{' (' + why + ')' if why else ''}; ClientApp tasks of any other bundle are refused",
        flush=True,
    )
    try:
        while True:
            guard.poll_once()
            guard.reap()
            time.sleep(POLL_SECONDS)
    finally:
        guard.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.app_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's local Runtime API (HOST:PORT)")
    parser.add_argument("--policy", type=Path, default=None, help="the site policy holding approved_apps")
    parser.add_argument("--site", required=True, help="the site's name (in refusals)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the ClientApps it started, then exit
    try:
        run(args.runtime_api_address, args.policy, args.site)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
