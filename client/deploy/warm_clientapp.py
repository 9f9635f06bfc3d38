"""A warm ClientApp: one long-lived process serves every ClientApp task of one run at this site.

Flower 1.41's `flwr-clientapp` serves exactly one task and exits (flwr/supernode/runtime/
run_clientapp.py), so a new process per message imported torch, opened the site, mapped its
sequences to the vocabulary and built the model again: 47-127 s rounds for 5-9 s of training.
Here the site's app guard (client/deploy/app_guard.py), which already decides per task whether a
bundle may run, hands the task's token to this process instead; it does for each task what
`flwr-clientapp` does (pull the message, context and FAB from the SuperNode's Runtime API, call
the ClientApp, push the reply and the context), but stays, so that client/site_runtime.py's
runtimes (data, sequences and model per setup sha256) and client/client_app.py's parsed setups
are reused by the next message of the run.

Scope and lifetime, so that nothing of a run outlives it:
- one process per (run id, app bundle sha256): the guard starts it for the first approved task
  of a run and stops it when a task of another run or bundle arrives; a new setup within a run
  replaces the runtime's sequences and model (they are keyed by the setup's sha256), an edited
  policy rebuilds the runtime (site_runtime.get_runtime);
- the guard stops it after `idle` seconds without a task (a run that ended; Flower tells a
  SuperNode nothing when a run ends), and it exits with the guard (parent-pid monitor, and
  SIGTERM from the kernel when the guard dies on Linux), which exits with `join`;
- a task of another run or bundle reaching it (the guard routes by both) is refused.

Code: the ClientApp is imported from the approved bundle's own files, unpacked and hash-checked by
this process, exactly the code `flwr-clientapp` (`--clientapp cold`) runs for that bundle; this
process's own modules (imported from the site's checkout) never stand in for the bundle's
(client/deploy/approved_code.py). An approval pins the same code in both modes.

    python -m client.deploy.warm_clientapp --runtime-api-address 127.0.0.1:PORT --run-id N --fab-hash SHA256 [--parent-pid PID]

Protocol with the guard: one task token per line on stdin; after each task, one line
`done N STATUS` on stdout (N tasks served so far); EOF on stdin stops it. Its log goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.deploy.approved_code import BundleCode, module_files
from client.deploy.flower_patches import set_pull_backoff
from client.memory import release_after_reply, release_memory, warm_process_env

log = logging.getLogger("healthfm.client.warm")

DONE = "done"


# The full collection rescans every frozen object (the process's torch, data and model: 340-470
# thousand objects, 0.3-0.8 s with `tiny` and `small`, measured in benchmarks/federation_round.py's
# sites) and trims the heap; it waits for a moment without a task, since the site whose reply ends a
# round gets its next task ~0.15 s after it (it used to wait out the collection: 0.15-0.35 s of each
# round there). A site that is never idle that long still gets one every FULL_COLLECTION_EVERY tasks.
IDLE_BEFORE_FULL_COLLECTION_S = 1.0
FULL_COLLECTION_EVERY = 16


def collect_between_tasks(full: bool = True) -> None:
    """Garbage collection after a task's reply left (and a heap trim if `full`), then everything
    left frozen.
    The ClientApp's handlers leave their own release to this (`release_after_reply`, set by `run`):
    it came before the reply left, on the round's path.

    full=False collects what was made since the last freeze (the task's own objects: under 1 ms
    after a `small` training task): in steady state that is all the garbage there is (a task's
    cycles, 280-640 objects a task in a 3-site run, were all found there; a full collection right
    after found none more, except 20 once after the first task). It gives no heap pages back: a
    site whose next task comes ~0.15 s later takes the same pages again. Trimmed after every task
    (as before 2026-11-28), the slowest site spent 57-74 ms in malloc_trim right as its SuperNode
    sent the reply, and its next training ran 0.23-0.74 s longer, faulting the pages back in
    (benchmarks/federation_round.py, `small`, 10 local steps, seven pairs: training 5.7-6.4 s
    against 6.1-6.7 s, rounds 6.0-6.7 s against 6.4-7.1 s); what it costs is that site's peak RSS,
    3-12% higher (heap holes that a later allocation does not fit stay resident).

    full=True first unfreezes, so that cycles among objects frozen by an earlier task are found
    too, then trims (`serve_tasks` schedules it for an idle moment: the sites that wait for the
    slowest one give their pages back then)."""
    if full:
        gc.unfreeze()
        release_memory()
    else:
        gc.collect()
    gc.freeze()


class TaskTokens:
    """The guard's task tokens, one a line on `stream`, read by a thread so that the wait for the
    next one can end after a while (`next`). None at the end of the stream."""

    IDLE = object()  # `next` found no token within its timeout

    def __init__(self, stream: TextIO) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True, name="task-tokens").start()

    def _read(self, stream: TextIO) -> None:
        try:
            for line in stream:
                if token := line.strip():
                    self._lines.put(token)
        finally:
            self._lines.put(None)

    def next(self, timeout: float | None) -> object:
        """The next token, None at the end, or IDLE when `timeout` s passed without one."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return self.IDLE


def serve_tasks(
    tokens: TaskTokens,
    serve: Callable[[str], str],
    replies: TextIO,
    collect: Callable[[bool], None] = collect_between_tasks,
    idle_s: float = IDLE_BEFORE_FULL_COLLECTION_S,
    every: int = FULL_COLLECTION_EVERY,
) -> int:
    """Serve each token as it comes, `done N STATUS` on `replies` after each; after each task the
    quick collection, and the full one once no task came for `idle_s` s or every `every` tasks
    (`collect_between_tasks`). Returns the tasks served."""
    served = since_full = 0  # tasks served; of them, since the last full collection
    while True:
        # A full collection is owed once a task ran since the last one: it waits for an idle moment.
        token = tokens.next(idle_s if since_full else None)
        if token is None:
            return served
        if token is not TaskTokens.IDLE:
            served += 1
            since_full += 1
            status = serve(str(token))
            print(f"{DONE} {served} {status}", file=replies, flush=True)
        full = token is TaskTokens.IDLE or since_full >= every
        collect(full)  # the reply has left: off the round's path (what the task made, unless full)
        if full:
            since_full = 0


def task_client(runtime_api_address: str, token: str) -> RuntimeHttpClient:
    """The SuperNode Runtime API client for one task, as flwr-clientapp builds it."""
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )


# ---------------------------------------------------------------------------- the process


class WarmClientApp:
    """Serves tasks of run `run_id` and bundle `fab_hash` one after another, keeping the loaded
    ClientApp (and with it the site runtime's state) between them."""

    def __init__(self, runtime_api_address: str, run_id: int, fab_hash: str) -> None:
        self.address, self.run_id, self.fab_hash = runtime_api_address, run_id, fab_hash
        self.app: ClientApp | None = None
        self.bundle: BundleCode | None = None
        self.served = 0

    def load(self, fab_id: str, fab_version: str, fab_content: bytes) -> ClientApp:
        """Unpack the approved FAB and import its ClientApp from the FAB's own files, once: the
        code flwr-clientapp runs for that bundle in a fresh process (client/deploy/approved_code.py)."""
        if self.app is None:
            if self.bundle is None:
                self.bundle = BundleCode(fab_content, self.fab_hash)
            self.app = self.bundle.load(fab_id, fab_version)
            log.info(
                "run %d: ClientApp of app bundle %s loaded from %s",
                self.run_id,
                self.fab_hash[:12],
                ", ".join(sorted({str(p.relative_to(self.bundle.app_dir)) for p in self.bundle_modules()}))
                or "the site's installed packages (the bundle ships no code)",
            )
        return self.app

    def bundle_modules(self) -> list[Path]:
        """The bundle's files this process has imported."""
        if self.bundle is None:
            return []
        return [path for name, path in module_files(self.bundle.app_dir).items() if name in sys.modules]

    def close(self) -> None:
        if self.bundle is not None:
            self.bundle.close()

    def serve(self, token: str) -> str:
        """One task; its sub status. Errors become an error reply, as in flwr-clientapp."""
        client = task_client(self.address, token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0 = time.perf_counter()
        t_pulled = t_handled = t0
        interrupted = False
        try:
            message, context, run, fab = pull_task_input(client)
            t_pulled = time.perf_counter()
            if run.run_id != self.run_id or fab.hash_str != self.fab_hash:
                # The guard routes by run and bundle; anything else is not what the site approved here.
                raise LoadClientAppError(
                    f"warm ClientApp of run {self.run_id} (bundle {self.fab_hash[:12]}...) got a task of run "
                    f"{run.run_id} (bundle {fab.hash_str[:12]}...)"
                )
            app = self.load(run.fab_id, run.fab_version, fab.content)
            reply = app(message=message, context=context)
            t_handled = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - any error is the task's error reply, the process stays
            code = (
                ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                if isinstance(ex, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            )
            reason = f"{type(ex)}:<'{ex}'>"
            log.error("ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        except BaseException:
            # SIGTERM (the guard stops us, or died: PR_SET_PDEATHSIG) or SIGINT (Flower's parent
            # monitor) during a task. Its SuperNode may be gone, and Flower retries a call to a
            # dead one for minutes: answer nothing and leave (the heartbeat thread is a daemon).
            interrupted = True
            raise
        finally:
            if not interrupted:
                t_handled = max(t_handled, t_pulled)
                try:
                    if reply is not None and context is not None:
                        push_message(client, reply, context)
                except Exception as ex:  # noqa: BLE001
                    log.error("could not push the reply: %s", ex)
                    sub_status, details = SubStatus.FAILED, f"could not push the reply: {ex}"
                push_task_output(client, context, sub_status, details)
                heartbeat.stop()
                client.close()
        self.served += 1
        t_end = time.perf_counter()
        # Where the task's time went (benchmarks/federation_round.py reads this line): the pull of
        # the message from the SuperNode, the ClientApp, the reply's push back to it.
        log.info(
            "run %d: %s %s in %.2f s (pull %.2f s, ClientApp %.2f s, push %.2f s; warm task %d of this process)",
            self.run_id,
            message.metadata.message_type if message is not None else "task",
            sub_status,
            t_end - t0,
            t_pulled - t0,
            t_handled - t_pulled,
            t_end - t_handled,
            self.served,
        )
        return sub_status


def run(runtime_api_address: str, run_id: int, fab_hash: str, replies: TextIO) -> None:
    release_after_reply()  # serve_tasks collects once each reply has left, not the handler before it
    worker = WarmClientApp(runtime_api_address, run_id, fab_hash)
    try:
        serve_tasks(TaskTokens(sys.stdin), worker.serve, replies)
    finally:
        worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.deploy.warm_clientapp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's local Runtime API (HOST:PORT)")
    parser.add_argument("--run-id", type=int, required=True, help="the only run this process serves")
    parser.add_argument("--fab-hash", required=True, help="the only app bundle (sha256) this process runs")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the guard) exits")
    args = parser.parse_args(argv)
    # The protocol keeps the original stdout to itself; anything the app prints goes to the log.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per local HTTP poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The guard hands a task over as soon as the SuperNode created it, before the SuperNode has
    # pulled the message's objects; Flower's pull retries an object not there yet after 1, 2, 4,
    # 8, 10 s, so a message arriving over a few seconds was read up to twice as late.
    set_pull_backoff()
    log.info("warm ClientApp for run %d, app bundle %s: serving its tasks", args.run_id, args.fab_hash[:12])
    run(args.runtime_api_address, args.run_id, args.fab_hash, replies)
    log.info("warm ClientApp for run %d: stopped (its data and model are freed)", args.run_id)
    return 0


# ---------------------------------------------------------------------------- the guard's handle


def _die_with_parent() -> None:
    """In the child: SIGTERM when the guard dies (Linux), so no warm ClientApp outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WarmWorker:
    """The guard's handle on one warm ClientApp process: hands it tokens, counts what it has
    finished, knows how long it has been idle."""

    def __init__(self, runtime_api_address: str, run_id: int, fab_hash: str) -> None:
        self.key = (run_id, fab_hash)
        # -P: no working-directory entry on sys.path, which flwr-clientapp has not either: both
        # import a bundle's code, and what it does not ship, from the same places.
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "client.deploy.warm_clientapp",
            "--runtime-api-address",
            runtime_api_address,
            "--run-id",
            str(run_id),
            "--fab-hash",
            fab_hash,
            "--parent-pid",
            str(os.getpid()),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=warm_process_env(os.environ),  # no kernel kept per tensor shape (client/memory.py)
            cwd=Path(__file__).resolve().parents[2],
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.sent = 0
        self.done = 0
        self.last_active = time.monotonic()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(DONE):
                with self._lock:
                    self.done += 1
                    self.last_active = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, token: str) -> bool:
        """Hand it a task; False when it could not take it (it died)."""
        if not self.alive():
            return False
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(token + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        with self._lock:
            self.sent += 1
            self.last_active = time.monotonic()
        return True

    def busy(self) -> bool:
        """Whether a task handed to it has not finished yet."""
        with self._lock:
            return self.done < self.sent

    def idle_for(self) -> float:
        """Seconds since it finished its last task; 0 while a task is outstanding."""
        with self._lock:
            return 0.0 if self.done < self.sent else time.monotonic() - self.last_active

    def stop(self, grace: float = 10.0) -> None:
        """EOF on stdin (it exits after the task at hand), then SIGTERM, then SIGKILL."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
