"""A small, typed client for agent authors: talk to your node's sidecar.

    async with AgentClient("tether.sock", token=open("agent.token").read()) as client:
        while (task := await client.claim("emails", wait_ms=10_000)) is not None:
            async with client.keepalive(task):
                await client.start(task.task_id)
                out = await client.call_tool(task.task_id, "send", {"to": "a@b.c"})
                await client.complete(task.task_id, result=b"done")

Every failure is a `tether.core.errors.TetherError` subclass: `LeaseLost`
(stop working on the task), `NotOwner`, `PolicyDenied`, `Unavailable` (retry
after `err.metadata["retry_after_ms"]`), ... The agent never sees a credential:
the sidecar injects them into tool calls and redacts the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from tether.core.errors import LeaseLost, TaskCanceled, TaskTimedOut, TetherError
from tether.core.states import state_name
from tether.core.timeouts import end_reason_label
from tether.grpcutil.status import from_rpc_error
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

AGENT_TOKEN_HEADER = "x-tether-agent-token"
CHUNK_BYTES = 256 * 1024
log = logging.getLogger("tether.agent")
T = TypeVar("T")

MEMORY_SCOPES = {"task": bpb.MEMORY_SCOPE_TASK, "agent": bpb.MEMORY_SCOPE_AGENT}


@dataclass(frozen=True)
class McpAccess:
    """How to reach this task's lease through the sidecar's MCP server (docs/mcp.md)."""

    token: str = field(repr=False)
    """Bearer token bound to the lease: a secret, valid only while the lease lasts."""
    url: str = ""
    """Streamable HTTP endpoint on loopback TCP ("" when only the Unix socket is served)."""
    unix_socket: str = ""
    """The MCP Unix socket (HTTP over it, path /mcp; "" when not served)."""


@dataclass(frozen=True)
class Task:
    """What the agent knows about a claimed task (no credential, ever)."""

    task_id: str
    queue: str
    payload: bytes
    attempt: int
    fencing_token: int
    lease_expires_unix_ms: int
    tools: tuple[str, ...]
    state: str
    mcp: McpAccess | None = None
    """Set on a claim when the sidecar serves MCP."""

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload or b"null")


@dataclass(frozen=True)
class ToolResult:
    """A tool call's redacted outcome."""

    result: Any
    status: str
    replayed: bool
    cost_micros: int
    budget_remaining_micros: int


def _task(view: bpb.TaskView, mcp: bpb.McpAccess | None = None) -> Task:
    access = None
    if mcp is not None and mcp.token:
        access = McpAccess(token=mcp.token, url=mcp.url, unix_socket=mcp.unix_socket)
    return Task(
        mcp=access,
        task_id=view.task_id,
        queue=view.queue,
        payload=bytes(view.payload),
        attempt=view.attempt,
        fencing_token=view.fencing_token,
        lease_expires_unix_ms=view.lease_expires_unix_ms,
        tools=tuple(view.tools),
        state=state_name(view.state),
    )


class AgentClient:
    """Async client of the sidecar's BrokerService.

    Args:
        socket_path: the sidecar's Unix socket (or "host:port" for TCP).
        token: the agent token, when connecting to a shared socket; not needed
            on the agent's own socket.
        timeout_s: deadline of each call (a claim adds its wait).
    """

    def __init__(
        self, socket_path: str | Path, token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        target = str(socket_path)
        if not (target.startswith("unix:") or (":" in target and "/" not in target)):
            target = f"unix:{target}"
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = bpb_grpc.BrokerServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            ((AGENT_TOKEN_HEADER, token.strip()),) if token else ()
        )
        self._timeout = timeout_s

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection."""
        await self._channel.close()

    async def _call(
        self,
        fn: Callable[..., Any],
        request: Any,
        extra_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> Any:
        timeout = self._timeout + extra_s if timeout_s is None else timeout_s
        try:
            return await fn(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def claim(self, queue: str, wait_ms: int = 0) -> Task | None:
        """Claims the next task of `queue`, waiting up to `wait_ms`; None when none came.

        Raises:
            Unavailable: the control plane is unreachable or the sidecar is stopping.
        """
        response = await self._call(
            self._stub.ClaimTask, bpb.ClaimTaskRequest(queue=queue, wait_ms=wait_ms), wait_ms / 1000
        )
        if not response.HasField("task"):
            return None
        return _task(response.task, response.mcp if response.HasField("mcp") else None)

    async def start(self, task_id: str) -> Task:
        """Marks the task running (leased -> running)."""
        response = await self._call(self._stub.StartTask, bpb.StartTaskRequest(task_id=task_id))
        return _task(response.task)

    async def heartbeat(self, task_id: str) -> int:
        """Tells the sidecar the agent is alive; returns the lease expiry (Unix ms).

        Raises:
            TaskTimedOut: the control plane ended the task at a time limit (the
                error's metadata["end_reason"] names it); stop working on it.
            TaskCanceled: an operator canceled the task; stop working on it.
            LeaseLost: the lease is gone; stop working on the task.
        """
        response = await self._call(self._stub.Heartbeat, bpb.HeartbeatRequest(task_id=task_id))
        if response.end_reason:
            label = end_reason_label(response.end_reason) or str(response.end_reason)
            meta = {"task_id": task_id, "end_reason": label}
            message = f"task {task_id!r} ended at the control plane ({label}); stop working on it"
            if label == "canceled":
                raise TaskCanceled(message, metadata=meta)
            raise TaskTimedOut(message, metadata=meta)
        return int(response.lease_expires_unix_ms)

    @contextlib.asynccontextmanager
    async def keepalive(
        self, task: Task, interval_s: float | None = None
    ) -> AsyncIterator[asyncio.Event]:
        """Heartbeats in the background while the block runs.

        Yields an event that is set if the lease is lost, so long work can check
        it. Defaults to a third of the task's remaining lease window.
        """
        lost = asyncio.Event()
        if interval_s is None:
            window_ms = task.lease_expires_unix_ms - time.time() * 1000
            interval_s = max(window_ms / 3000, 0.1)

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.heartbeat(task.task_id)
                except LeaseLost:
                    log.warning("lease lost on task %s", task.task_id)
                    lost.set()
                    return
                except TetherError as err:
                    if err.reason in ("NOT_OWNER", "INVALID_TRANSITION", "NOT_FOUND"):
                        return
                    log.warning("heartbeat failed (%s); retrying", err.message)

        runner = asyncio.create_task(beat())
        try:
            yield lost
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def call_tool(
        self,
        task_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> ToolResult:
        """Calls a tool the task's policy grants; returns its (redacted) result.

        `timeout_s` is the call's gRPC deadline (default: the client's timeout);
        the sidecar stops the tool by then, as by its policy timeout.

        Raises:
            PolicyDenied: the tool is not granted.
            LeaseLost: the lease is gone; the tool did not run.
            BudgetExhausted: the task's budget does not cover the call.
        """
        response = await self._call(
            self._stub.CallTool,
            bpb.CallToolRequest(
                task_id=task_id,
                tool=tool,
                arguments_json=json.dumps(args or {}),
                idempotency_key=idempotency_key or "",
            ),
            timeout_s=timeout_s,
        )
        return ToolResult(
            result=json.loads(response.result_json) if response.result_json else None,
            status=response.status,
            replayed=response.replayed,
            cost_micros=response.cost_micros,
            budget_remaining_micros=response.budget_remaining_micros,
        )

    async def put_artifact(
        self,
        task_id: str,
        name: str,
        data: bytes | Path,
        content_type: str = "application/octet-stream",
    ) -> tuple[str, int]:
        """Uploads an artifact (bytes or a file); returns (sha256 hex, size)."""

        async def parts() -> AsyncIterator[bpb.PutArtifactRequest]:
            yield bpb.PutArtifactRequest(
                header=bpb.ArtifactHeader(task_id=task_id, name=name, content_type=content_type)
            )
            if isinstance(data, Path):
                with data.open("rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        yield bpb.PutArtifactRequest(chunk=chunk)
            else:
                for i in range(0, len(data), CHUNK_BYTES):
                    yield bpb.PutArtifactRequest(chunk=data[i : i + CHUNK_BYTES])

        try:
            response = await self._stub.PutArtifact(
                parts(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return response.sha256, int(response.size)

    async def remember(self, task_id: str, key: str, value: bytes, scope: str = "task") -> str:
        """Stores memory in the "task" or "agent" scope; returns its sha256."""
        response = await self._call(
            self._stub.Remember,
            bpb.RememberRequest(task_id=task_id, scope=MEMORY_SCOPES[scope], key=key, value=value),
        )
        return str(response.sha256)

    async def recall(self, task_id: str, key: str, scope: str = "task") -> bytes | None:
        """Reads memory from the "task" or "agent" scope; None when absent."""
        response = await self._call(
            self._stub.Recall,
            bpb.RecallRequest(task_id=task_id, scope=MEMORY_SCOPES[scope], key=key),
        )
        return bytes(response.value) if response.found else None

    async def complete(
        self,
        task_id: str,
        *,
        result: bytes = b"",
        succeeded: bool = True,
        error: str = "",
        non_retryable: bool = False,
        failure_type: str = "",
    ) -> tuple[str, bool]:
        """Finishes the task; returns (final state, receipts_pending).

        A failure may be retried by the task's retry policy (the state is then
        "queued"); `non_retryable`, or a `failure_type` the policy lists, prevents it.

        Raises:
            LeaseLost: the lease was lost first; another holder owns the task now.
            Unavailable: the control plane is unreachable; retry (the lease is
                still held until its expiry).
        """
        outcome = bpb.TASK_OUTCOME_SUCCEEDED if succeeded else bpb.TASK_OUTCOME_FAILED
        response = await self._call(
            self._stub.CompleteTask,
            bpb.CompleteTaskRequest(
                task_id=task_id,
                outcome=outcome,
                result=result,
                error=error,
                non_retryable=non_retryable,
                failure_type=failure_type,
            ),
        )
        return state_name(response.state), bool(response.receipts_pending)


async def retrying(
    call: Callable[[], Any], *, attempts: int = 20, retry_on: Sequence[str] = ("UNAVAILABLE",)
) -> Any:
    """Awaits `call()`, retrying on the given reasons after the server's retry hint."""
    for attempt in range(attempts):
        try:
            return await call()
        except TetherError as err:
            if err.reason not in retry_on or attempt == attempts - 1:
                raise
            delay_ms = int(err.metadata.get("retry_after_ms", "500") or 500)
            await asyncio.sleep(min(delay_ms, 2000) / 1000)
    raise AssertionError("unreachable")
