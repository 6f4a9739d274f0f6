"""A typed async client of ControlService for the CLI, sidecars and tests.

Failed calls raise the same `TetherError` subclasses the server raised
(via `tether.grpcutil.status.from_rpc_error`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.control.grpc_api import NODE_TOKEN_HEADER, OPERATOR_TOKEN_HEADER
from tether.control.server import MAX_MESSAGE_BYTES
from tether.core.states import Event, State
from tether.grpcutil.status import from_rpc_error
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc
from tether.v1 import receipt_pb2 as rpb

R = TypeVar("R")


class ControlClient:
    """One channel to a control plane at `address` ("host:port" or "unix:/path")."""

    def __init__(
        self,
        address: str,
        *,
        node_token: str = "",
        operator_token: str = "",
        timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self.node_token = node_token
        self.operator_token = operator_token
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = pb_grpc.ControlServiceStub(self._channel)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self, node: bool) -> tuple[tuple[str, str], ...]:
        if node:
            return ((NODE_TOKEN_HEADER, self.node_token),) if self.node_token else ()
        return ((OPERATOR_TOKEN_HEADER, self.operator_token),) if self.operator_token else ()

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        node: bool = False,
        timeout_s: float | None = None,
    ) -> R:
        try:
            return await method(
                request, metadata=self._metadata(node), timeout=timeout_s or self.timeout_s
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # -- nodes -----------------------------------------------------------------------

    async def register_node(
        self, node_id: str, public_key: bytes, enrollment_token: str = ""
    ) -> pb.RegisterNodeResponse:
        """Enrols a node; remembers the returned node token for node calls."""
        resp: pb.RegisterNodeResponse = await self._call(
            self.stub.RegisterNode,
            pb.RegisterNodeRequest(
                node_id=node_id, public_key=public_key, enrollment_token=enrollment_token
            ),
        )
        self.node_token = resp.node_token
        return resp

    async def acquire_lease(
        self, queue: str, node_id: str, agent_id: str, wait_ms: int = 0, start: bool = False
    ) -> pb.AcquireLeaseResponse:
        """Leases the next ready task; `resp.HasField("task")` is False when none was.

        `start` grants it already RUNNING, saving the TransitionTask(START) round trip.
        """
        return await self._call(
            self.stub.AcquireLease,
            pb.AcquireLeaseRequest(
                queue=queue, node_id=node_id, agent_id=agent_id, wait_ms=wait_ms, start=start
            ),
            node=True,
            timeout_s=self.timeout_s + wait_ms / 1000,
        )

    async def renew_lease(
        self, task_id: str, fencing_token: int, node_id: str
    ) -> pb.RenewLeaseResponse:
        return await self._call(
            self.stub.RenewLease,
            pb.RenewLeaseRequest(task_id=task_id, fencing_token=fencing_token, node_id=node_id),
            node=True,
        )

    async def transition(
        self,
        task_id: str,
        fencing_token: int,
        event: Event | int,
        node_id: str,
        *,
        result: bytes = b"",
        error: str = "",
    ) -> pb.Task:
        resp: pb.TransitionTaskResponse = await self._call(
            self.stub.TransitionTask,
            pb.TransitionTaskRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                event=int(event),  # type: ignore[arg-type]
                result=result,
                error=error,
                node_id=node_id,
            ),
            node=True,
        )
        return resp.task

    async def issue_credential(
        self, task_id: str, fencing_token: int, name: str, tool: str, node_id: str
    ) -> pb.IssueCredentialResponse:
        """Credential `name` for `tool` under the live lease (keep it in memory only).

        Raises:
            PolicyDenied: the lease's policy does not grant it to the tool.
            NotFound: no secret is stored under `name`.
            StaleFencingToken, LeaseExpired, InvalidTransition: no live lease.
        """
        return await self._call(
            self.stub.IssueCredential,
            pb.IssueCredentialRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                name=name,
                tool=tool,
                node_id=node_id,
            ),
            node=True,
        )

    async def reserve_budget(
        self,
        task_id: str,
        fencing_token: int,
        reservation_id: str,
        amount_micros: int,
        node_id: str,
    ) -> int:
        """Reserves spend atomically (idempotent on `reservation_id`); returns what is left.

        Raises:
            BudgetExhausted: the limit does not cover it (metadata remaining_micros).
            IdempotencyConflict: the id was used with another amount.
            StaleFencingToken, LeaseExpired, InvalidTransition: no live lease.
        """
        resp: pb.ReserveBudgetResponse = await self._call(
            self.stub.ReserveBudget,
            pb.ReserveBudgetRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                reservation_id=reservation_id,
                amount_micros=amount_micros,
                node_id=node_id,
            ),
            node=True,
        )
        return int(resp.remaining_micros)

    async def settle_budget(
        self,
        task_id: str,
        fencing_token: int,
        reservation_id: str,
        actual_micros: int,
        node_id: str,
    ) -> int:
        """Replaces a reservation by the actual cost; returns what is left."""
        resp: pb.SettleBudgetResponse = await self._call(
            self.stub.SettleBudget,
            pb.SettleBudgetRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                reservation_id=reservation_id,
                actual_micros=actual_micros,
                node_id=node_id,
            ),
            node=True,
        )
        return int(resp.remaining_micros)

    async def record_tool_call(
        self,
        task_id: str,
        fencing_token: int,
        idempotency_key: str,
        tool: str,
        arguments_sha256: str,
        phase: int,
        node_id: str,
        *,
        result: bytes = b"",
        status: str = "",
        cost_micros: int = 0,
    ) -> tuple[pb.ToolCallRecord, bool]:
        """Records STARTED or COMPLETED; returns (the record now, whether one existed).

        Raises:
            IdempotencyConflict: the key was recorded with other arguments.
            StaleFencingToken, LeaseExpired, InvalidTransition: no live lease.
        """
        resp: pb.RecordToolCallResponse = await self._call(
            self.stub.RecordToolCall,
            pb.RecordToolCallRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                tool=tool,
                arguments_sha256=arguments_sha256,
                phase=phase,  # type: ignore[arg-type]
                result=result,
                status=status,
                node_id=node_id,
                cost_micros=cost_micros,
            ),
            node=True,
        )
        return resp.record, resp.existed

    async def lookup_tool_call(
        self, task_id: str, idempotency_key: str
    ) -> pb.ToolCallRecord | None:
        """The recorded (task, key) outcome or STARTED marker, or None."""
        resp: pb.LookupToolCallResponse = await self._call(
            self.stub.LookupToolCall,
            pb.LookupToolCallRequest(task_id=task_id, idempotency_key=idempotency_key),
            node=True,
        )
        return resp.record if resp.found else None

    # -- operators ---------------------------------------------------------------------

    async def submit(
        self,
        queue: str,
        payload: bytes,
        *,
        idempotency_key: str = "",
        max_attempts: int = 0,
        lease_ttl_ms: int = 0,
        budget_limit_micros: int = 0,
    ) -> pb.SubmitTaskResponse:
        return await self._call(
            self.stub.SubmitTask,
            pb.SubmitTaskRequest(
                queue=queue,
                payload=payload,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                lease_ttl_ms=lease_ttl_ms,
                budget_limit_micros=budget_limit_micros,
            ),
        )

    async def get_task(self, task_id: str) -> pb.GetTaskResponse:
        return await self._call(self.stub.GetTask, pb.GetTaskRequest(task_id=task_id))

    async def list_tasks(
        self,
        *,
        queue: str = "",
        state: State | int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListTasksResponse:
        return await self._call(
            self.stub.ListTasks,
            pb.ListTasksRequest(
                queue=queue,
                state=int(state),  # type: ignore[arg-type]
                page_size=page_size,
                page_token=page_token,
            ),
        )

    async def list_all_tasks(self, *, queue: str = "", state: State | int = 0) -> list[pb.Task]:
        """Every page of ListTasks."""
        out: list[pb.Task] = []
        token = ""
        while True:
            resp = await self.list_tasks(queue=queue, state=state, page_size=1000, page_token=token)
            out.extend(resp.tasks)
            token = resp.next_page_token
            if not token:
                return out

    async def cancel(self, task_id: str, reason: str = "") -> pb.Task:
        resp: pb.CancelTaskResponse = await self._call(
            self.stub.CancelTask, pb.CancelTaskRequest(task_id=task_id, reason=reason)
        )
        return resp.task

    async def export_bundle(
        self, task_ids: Sequence[str] = (), since_unix_ms: int = 0
    ) -> rpb.Bundle:
        """Exports an offline-verifiable bundle (operator RPC)."""
        resp = await self._call(
            self.stub.ExportBundle,
            pb.ExportBundleRequest(task_ids=list(task_ids), since_unix_ms=since_unix_ms),
        )
        return resp.bundle

    async def put_policy(self, document: str) -> pb.PutPolicyResponse:
        return await self._call(self.stub.PutPolicy, pb.PutPolicyRequest(document=document))

    async def get_policy(self, version: int = 0) -> pb.GetPolicyResponse:
        return await self._call(self.stub.GetPolicy, pb.GetPolicyRequest(version=version))

    async def put_secret(self, name: str, value: bytes) -> int:
        """Seals and stores a new version of secret `name` (write-only); returns the version."""
        resp: pb.PutSecretResponse = await self._call(
            self.stub.PutSecret, pb.PutSecretRequest(name=name, value=value)
        )
        return int(resp.version)

    async def health(self, service: str = "") -> int:
        """The grpc.health.v1 status (1 = SERVING) of `service` ("" for the server)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        # The typeshed stub declares no methods on HealthStub (it is built at run time).
        check = stub.Check  # type: ignore[attr-defined]
        resp = await self._call(check, health_pb2.HealthCheckRequest(service=service))
        return int(resp.status)
