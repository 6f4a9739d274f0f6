"""`tether run`: any program as a Tether agent, unchanged.

For each task: claim it through the sidecar (as the agent whose token this
process holds), mark it running, start the command with

- the payload on stdin and in the file `$TETHER_PAYLOAD_FILE`;
- `TETHER_TASK_ID`, `TETHER_QUEUE`, `TETHER_ATTEMPT`, `TETHER_FENCING_TOKEN`;
- when the sidecar serves MCP: `TETHER_MCP_URL` (and `TETHER_MCP_SOCKET` for
  its Unix socket), `TETHER_MCP_TOKEN` (bound to this lease only) and
  `TETHER_MCP_CONFIG`, a file in the common `{"mcpServers": {...}}` shape;

heartbeat while it runs; end its whole process tree on lease loss (which is
also how a cancel arrives), on `--timeout`, or once it exits (nothing it left
behind outlives the lease); upload the `--artifact` files it wrote; and
complete the task: exit 0 is `succeeded` with stdout as the result, anything
else `failed` with the tail of stderr (secrets this process knows redacted).

The command never sees the agent token: it holds only the per-lease MCP token,
which can do nothing but call this lease's tools while the lease lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.agent import AgentClient, Task, retrying
from tether.core.errors import LeaseLost, TaskCanceled, TaskTimedOut, TetherError, Unavailable
from tether.runner import proctree
from tether.sidecar.redaction import Redactor

log = logging.getLogger("tether.run")

MAX_RESULT_BYTES = 1024 * 1024  # CompleteTask's result limit
MAX_ERROR_CHARS = 4000  # CompleteTask's error limit is 4096
STDERR_TAIL_BYTES = 16 * 1024
_GONE = ("NOT_FOUND", "NOT_OWNER", "INVALID_TRANSITION")


@dataclass(frozen=True)
class RunConfig:
    """One `tether run` invocation."""

    socket: str
    """The sidecar's Broker socket (or host:port)."""
    token: str | None
    """The agent token (None on the agent's own socket)."""
    queue: str
    argv: tuple[str, ...]
    """The command and its arguments."""
    count: int = 1
    """Tasks to run; 0: until stopped."""
    artifacts: tuple[Path, ...] = ()
    """Files the command writes, uploaded after it exits (relative to the working dir)."""
    timeout_s: float | None = None
    """Kill the command after this long (the task fails with reason timeout)."""
    wait_ms: int = 10_000
    """How long each claim waits for a task."""
    exit_when_idle: bool = False
    """Stop when a claim finds no task, instead of waiting for the next."""
    kill_grace_s: float = 2.0
    """Between SIGTERM and SIGKILL when the command is stopped."""
    json_lines: bool = False
    """Print one JSON object per task on stdout."""


@dataclass
class Outcome:
    """What happened to one task."""

    task_id: str
    attempt: int
    state: str = ""
    """The task's final state as the sidecar reported it; "" when it could not be completed."""
    exit_code: int | None = None
    stopped: str = ""
    """Why the command was stopped: "" (it exited), "timeout" (--timeout), "canceled",
    a control-plane time limit ("attempt_timeout", "deadline", ...), "lease_lost", or
    "interrupted" (SIGTERM/SIGINT to `tether run`). Only "timeout" is completed (failed):
    in every other case the task is no longer this agent's to complete."""
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "state": self.state,
            "exit_code": self.exit_code,
            "stopped": self.stopped,
            "artifacts": self.artifacts,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(mtime ns, inode, size) of a regular file; None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def _why(err: LeaseLost) -> str:
    """Why a lease ended, as `Outcome.stopped` names it."""
    if isinstance(err, TaskCanceled):
        return "canceled"
    if isinstance(err, TaskTimedOut):
        return str(err.metadata.get("end_reason") or "timed_out")
    return "lease_lost"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def mcp_config(task: Task) -> dict[str, Any]:
    """The `mcpServers` entry for this lease: HTTP when on loopback TCP, else the stdio bridge."""
    assert task.mcp is not None
    if task.mcp.url:
        server: dict[str, Any] = {
            "type": "http",
            "url": task.mcp.url,
            "headers": {"Authorization": f"Bearer {task.mcp.token}"},
        }
    else:
        server = {
            "type": "stdio",
            "command": sys.executable,
            "args": ["-m", "tether.cli", "mcp"],
            "env": {
                "TETHER_MCP_SOCKET": task.mcp.unix_socket,
                "TETHER_MCP_TOKEN": task.mcp.token,
            },
        }
    return {"mcpServers": {"tether": server}}


def task_env(task: Task, workdir: Path) -> dict[str, str]:
    """The command's environment: ours, less Tether's own settings, plus the task's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        TETHER_TASK_ID=task.task_id,
        TETHER_QUEUE=task.queue,
        TETHER_ATTEMPT=str(task.attempt),
        TETHER_FENCING_TOKEN=str(task.fencing_token),
        TETHER_PAYLOAD_FILE=str(workdir / "payload"),
    )
    if task.mcp is not None:
        env["TETHER_MCP_TOKEN"] = task.mcp.token
        env["TETHER_MCP_URL"] = task.mcp.url or "http://localhost/mcp"
        if task.mcp.unix_socket:
            env["TETHER_MCP_SOCKET"] = task.mcp.unix_socket
        env["TETHER_MCP_CONFIG"] = str(workdir / "mcp.json")
    return env


class Runner:
    """Claims and runs tasks one after another."""

    def __init__(self, cfg: RunConfig, client: AgentClient) -> None:
        self.cfg = cfg
        self.client = client
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """SIGTERM/SIGINT: stops the current command (its task is left to lapse and be
        retried, as after a crash) and ends the loop."""
        self._stop.set()

    async def run(self) -> list[Outcome]:
        """Runs up to `count` tasks; returns their outcomes."""
        proctree.become_subreaper()
        while not self._stop.is_set() and (
            self.cfg.count == 0 or len(self.outcomes) < self.cfg.count
        ):
            try:
                task = await self.client.claim(self.cfg.queue, wait_ms=self.cfg.wait_ms)
            except Unavailable as err:  # the sidecar or its control plane is away: wait
                log.warning("claim unavailable (%s); retrying", err.message)
                delay_ms = int(err.metadata.get("retry_after_ms", "1000") or 1000)
                await asyncio.sleep(min(max(delay_ms, 200), 5000) / 1000)
                continue
            if task is not None and self._stop.is_set():
                break  # stopping: the claim lapses back to the queue
            if task is None:
                if self.cfg.exit_when_idle:
                    break
                continue
            outcome = await self.run_one(task)
            self.outcomes.append(outcome)
            self._report(outcome)
        return self.outcomes

    def _report(self, outcome: Outcome) -> None:
        if self.cfg.json_lines:
            print(json.dumps(outcome.to_dict()), flush=True)
        how = outcome.stopped or f"exit {outcome.exit_code}"
        print(
            f"tether run: task {outcome.task_id} attempt {outcome.attempt}: "
            f"{outcome.state or 'not completed'} ({how}, {outcome.seconds:.1f} s, "
            f"{len(outcome.artifacts)} artifacts)",
            file=sys.stderr,
            flush=True,
        )

    async def run_one(self, task: Task) -> Outcome:
        """Runs the command for one claimed task and completes it."""
        outcome = Outcome(task.task_id, task.attempt)
        started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="tether-run-"))
        try:
            _write_private(workdir / "payload", task.payload)
            if task.mcp is not None:
                _write_private(workdir / "mcp.json", json.dumps(mcp_config(task)).encode())
            await self.client.start(task.task_id)
            before = {path: _signature(path) for path in self.cfg.artifacts}
            stdout, stderr_tail = await self._execute(task, workdir, outcome)
            if outcome.stopped in ("", "timeout"):
                await self._upload(task, outcome, before)
            await self._complete(task, outcome, stdout, stderr_tail)
        except LeaseLost as err:
            outcome.stopped = outcome.stopped or _why(err)
            outcome.error = err.message
        except TetherError as err:
            if err.reason not in _GONE:
                raise
            outcome.stopped = outcome.stopped or "lease_lost"
            outcome.error = err.message
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            outcome.seconds = time.monotonic() - started
        return outcome

    async def _execute(self, task: Task, workdir: Path, outcome: Outcome) -> tuple[bytes, bytes]:
        """Runs the command to its end (or stops it); returns (stdout, stderr tail)."""
        proc = await asyncio.create_subprocess_exec(
            *self.cfg.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=task_env(task, workdir),
            start_new_session=True,  # its own group: signals reach the whole tree
        )
        stdout = bytearray()
        tail = bytearray()

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(task.payload)
                await proc.stdin.drain()
            proc.stdin.close()

        async def read_stdout() -> None:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                if len(stdout) <= MAX_RESULT_BYTES:
                    stdout.extend(chunk[: MAX_RESULT_BYTES + 1 - len(stdout)])

        async def read_stderr() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(65536):
                sys.stderr.buffer.write(chunk)  # the operator still sees it
                sys.stderr.flush()
                tail.extend(chunk)
                del tail[:-STDERR_TAIL_BYTES]

        async def watch() -> str:
            """Returns why the command must stop, when it must."""
            # A third of the lease window by our wall clock, but at least once a second:
            # a skewed clock must never stretch heartbeats past the lease.
            window_s = (task.lease_expires_unix_ms - time.time() * 1000) / 1000
            interval = min(max(window_s / 3, 0.1), 1.0)
            deadline = None if self.cfg.timeout_s is None else time.monotonic() + self.cfg.timeout_s
            while True:
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                await asyncio.sleep(max(wait, 0))
                if self._stop.is_set():
                    return "interrupted"
                if deadline is not None and time.monotonic() >= deadline:
                    return "timeout"
                try:
                    await self.client.heartbeat(task.task_id)
                except LeaseLost as err:
                    return _why(err)
                except TetherError as err:
                    if err.reason in _GONE:
                        return "lease_lost"
                    log.warning("heartbeat failed (%s); retrying", err.message)

        io = asyncio.gather(feed(), read_stdout(), read_stderr())
        watcher = asyncio.create_task(watch())
        waiter = asyncio.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                outcome.stopped = watcher.result()
                await self._stop_command(proc)
            else:
                watcher.cancel()
            outcome.exit_code = await proc.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            # Whatever the command left running ends with the task.
            await asyncio.to_thread(proctree.kill_all, proc.pid)
            try:
                await asyncio.wait_for(io, 10)
            except TimeoutError:
                io.cancel()
        return bytes(stdout), bytes(tail)

    async def _stop_command(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the whole tree, then SIGKILL after the grace period."""
        proctree.signal_tree(signal.SIGTERM, proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), self.cfg.kill_grace_s)
        except TimeoutError:
            await asyncio.to_thread(proctree.kill_all, proc.pid)

    async def _upload(
        self, task: Task, outcome: Outcome, before: dict[Path, tuple[int, int, int] | None]
    ) -> None:
        """Uploads each declared artifact the command wrote during this task."""
        for path in self.cfg.artifacts:
            now = _signature(path)
            if now is None or now == before.get(path):
                continue  # absent, or untouched since the task began: never upload a stale file
            upload = functools.partial(self.client.put_artifact, task.task_id, path.name, path)
            sha256, size = await retrying(upload)
            outcome.artifacts.append({"name": path.name, "sha256": sha256, "size": size})

    async def _complete(
        self, task: Task, outcome: Outcome, stdout: bytes, stderr_tail: bytes
    ) -> None:
        if outcome.stopped not in ("", "timeout"):
            outcome.error = f"the command was stopped ({outcome.stopped}); task not completed"
            return
        missing = [
            p.name
            for p in self.cfg.artifacts
            if p.name not in {a["name"] for a in outcome.artifacts}
        ]
        succeeded = outcome.stopped == "" and outcome.exit_code == 0
        if outcome.stopped == "timeout":
            error = f"timed out after {self.cfg.timeout_s:g} s; the command was killed"
        elif outcome.exit_code != 0:
            error = f"the command exited with status {outcome.exit_code}"
        elif len(stdout) > MAX_RESULT_BYTES:
            succeeded, error = (
                False,
                "stdout is larger than 1 MiB; write large output as an artifact",
            )
        elif missing:
            succeeded, error = False, f"declared artifacts not written: {', '.join(missing)}"
        else:
            error = ""
        if not succeeded:
            error = self._error_text(error, stderr_tail, task)
        state, _ = await retrying(  # an outage is waited out while the lease is held
            lambda: self.client.complete(
                task.task_id,
                result=stdout[:MAX_RESULT_BYTES] if succeeded else b"",
                succeeded=succeeded,
                error=error,
            )
        )
        outcome.state = state
        outcome.error = error

    def _error_text(self, headline: str, stderr_tail: bytes, task: Task) -> str:
        """The failure reason with the end of stderr, secrets this process knows redacted."""
        known = [t.encode() for t in (self.cfg.token, task.mcp.token if task.mcp else None) if t]
        text = stderr_tail.decode("utf-8", "replace")
        text = Redactor(known).redact_text(text) if known else text
        room = MAX_ERROR_CHARS - len(headline) - 20
        tail = text[-room:] if room > 0 else ""
        return f"{headline}; stderr tail:\n{tail}" if tail.strip() else headline


async def run_tasks(cfg: RunConfig) -> list[Outcome]:
    """Runs `cfg` to the end (or SIGTERM/SIGINT, after the current task)."""
    async with AgentClient(cfg.socket, token=cfg.token) as client:
        runner = Runner(cfg, client)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, runner.stop)
        return await runner.run()


def summary(outcomes: Sequence[Outcome]) -> str:
    """One line: how many tasks ended how."""
    by: dict[str, int] = {}
    for o in outcomes:
        key = o.state or (o.stopped or "not completed")
        by[key] = by.get(key, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(by.items()))
    return f"tether run: {len(outcomes)} tasks" + (f": {parts}" if parts else "")
