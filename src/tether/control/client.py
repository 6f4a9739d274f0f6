"""A typed async client of ControlService for the CLI, sidecars and tests.

Failed calls raise the same `TetherError` subclasses the server raised
(via `tether.grpcutil.status.from_rpc_error`). Identity is the TLS client
certificate of the channel (`ClientTLS`): an operator's, or a node's after
`enroll`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.core.states import Event, State
from tether.crypto.enrollment import make_statement
from tether.crypto.envelopes import from_proto, to_proto
from tether.crypto.pki import generate_tls_key, key_pem, spki_der
from tether.crypto.signing import SigningKey
from tether.grpcutil.limits import MAX_MESSAGE_BYTES
from tether.grpcutil.status import from_rpc_error
from tether.grpcutil.tls import ClientTLS, open_channel
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc
from tether.v1 import receipt_pb2 as rpb

R = TypeVar("R")


_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class LeaseStream:
    """A worker's StreamLeases stream: each `step` ends held tasks and/or asks for the
    next, and waits for its answer (one request in flight, as the server reads them)."""

    def __init__(self, call: Any, node_id: str) -> None:
        self._call = call
        self.node_id = node_id

    async def __aenter__(self) -> LeaseStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def step(
        self,
        completions: Sequence[pb.TaskCompletion] = (),
        *,
        queue: str = "",
        agent_id: str = "",
        wait_ms: int = 0,
        start: bool = False,
        max_tasks: int = 0,
        brief: bool = False,
    ) -> tuple[list[pb.Task], pb.AcquireLeaseResponse | None]:
        """Ends `completions` (all or nothing) and, with `queue`, leases up to `max_tasks`
        more in the same transaction, as `ControlClient.complete_tasks` does (or, with
        no completions, as `acquire_lease`). Returns the ended tasks (none when `brief`:
        the server skips echoing them) and AcquireLease's answer (None without `queue`).

        Raises:
            TetherError: the refusal CompleteTasks would give; it ends the stream, and
                every later step raises it again.
        """
        request = pb.StreamLeasesRequest(node_id=self.node_id, completions=completions, brief=brief)
        if queue:
            request.acquire.CopyFrom(
                pb.AcquireLeaseRequest(
                    queue=queue,
                    node_id=self.node_id,
                    agent_id=agent_id,
                    wait_ms=wait_ms,
                    start=start,
                    max_tasks=max_tasks,
                )
            )
        try:
            # An ended stream (a refusal ends it) answers with the status that ended it.
            with contextlib.suppress(asyncio.InvalidStateError):
                await self._call.write(request)
            resp = await self._call.read()
            if resp is grpc.aio.EOF:  # ended without a status error: nothing was answered
                raise grpc.aio.AioRpcError(
                    await self._call.code(),
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="the lease stream ended before its answer",
                )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return list(resp.tasks), (resp.next if resp.HasField("next") else None)

    async def close(self) -> None:
        """Ends the stream (the server has answered every step already)."""
        if not self._call.done():
            await self._call.done_writing()
            await self._call.code()  # the server ends its side once it read the end


class ControlClient:
    """One channel to a control plane at `address` ("host:port" or "unix:/path").

    `address` may list several replicas, comma-separated: entering the client
    (`async with`) picks the first whose health service answers SERVING, and a
    call that finds its replica UNAVAILABLE moves to the next healthy one and
    is repeated there.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: ClientTLS | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.addresses = tuple(a.strip() for a in address.split(",") if a.strip()) or (address,)
        self.address = self.addresses[0]
        self.tls = tls
        self.timeout_s = timeout_s
        self._channel = open_channel(self.address, tls, _OPTIONS)
        self.stub = pb_grpc.ControlServiceStub(self._channel)

    async def __aenter__(self) -> ControlClient:
        if len(self.addresses) > 1:
            await self.use_healthy()
        return self

    def _rebinder(self, method: Any) -> Callable[[], Any] | None:
        """How to get `method` (a stub callable) again on the current channel, if known."""
        path = getattr(method, "_method", b"")  # b"/package.Service/Rpc" on grpc.aio callables
        parts = (path.decode() if isinstance(path, bytes) else str(path)).split("/")
        if len(parts) != 3:
            return None
        service, rpc = parts[1], parts[2]
        if service == "grpc.health.v1.Health":
            return lambda: getattr(health_pb2_grpc.HealthStub(self._channel), rpc)
        return lambda: getattr(self.stub, rpc)

    async def _serving(self, address: str) -> bool:
        channel = self._channel if address == self.address else open_channel(address, self.tls)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            check = stub.Check  # type: ignore[attr-defined]
            resp = await check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False
        finally:
            if channel is not self._channel:
                await channel.close()

    async def use_healthy(self, skip: str = "") -> bool:
        """Moves to the first listed replica reporting SERVING (not `skip`); False if none."""
        candidates = [a for a in self.addresses if a != skip]
        serving = await asyncio.gather(*(self._serving(a) for a in candidates))
        for address, ok in zip(candidates, serving, strict=True):
            if ok:
                if address != self.address:
                    old = self._channel
                    self.address = address
                    self._channel = open_channel(address, self.tls, _OPTIONS)
                    self.stub = pb_grpc.ControlServiceStub(self._channel)
                    await old.close()
                return True
        return False

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        timeout_s: float | None = None,
    ) -> R:
        tried = 1
        while True:
            try:
                return await method(request, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
                # UNAVAILABLE: the call did not get through; another replica may take it.
                rebind = self._rebinder(method)
                if (
                    code == grpc.StatusCode.UNAVAILABLE
                    and rebind is not None
                    and tried < len(self.addresses)
                    and await self.use_healthy(skip=self.address)
                ):
                    tried += 1
                    method = rebind()
                    continue
                raise from_rpc_error(err) from err

    # -- nodes -----------------------------------------------------------------------

    async def register_node(
        self,
        node_id: str,
        node_key: SigningKey,
        join_token: str = "",
        tls_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> pb.RegisterNodeResponse:
        """Enrols (or renews) a node, proving possession of `node_key`.

        Call it on a channel to the enrolment address (or, to renew, on an mTLS
        channel with the node's current certificate).
        """
        try:
            return await enroll(
                self.stub,
                node_id,
                node_key,
                tls_key or generate_tls_key(),
                join_token,
                self.timeout_s,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def create_join_token(self, node_id: str, ttl_ms: int = 0) -> pb.CreateJoinTokenResponse:
        """A single-use join token for a node id not yet enrolled (admin)."""
        return await self._call(
            self.stub.CreateJoinToken, pb.CreateJoinTokenRequest(node_id=node_id, ttl_ms=ttl_ms)
        )

    async def rekey_node(self, node_id: str, ttl_ms: int = 0) -> pb.RekeyNodeResponse:
        """A join token that lets an enrolled node id enrol a new key (admin)."""
        return await self._call(
            self.stub.RekeyNode, pb.RekeyNodeRequest(node_id=node_id, ttl_ms=ttl_ms)
        )

    async def revoke_node(self, node_id: str, reason: str = "") -> pb.NodeInfo:
        resp: pb.RevokeNodeResponse = await self._call(
            self.stub.RevokeNode, pb.RevokeNodeRequest(node_id=node_id, reason=reason)
        )
        return resp.node

    async def list_nodes(self) -> list[pb.NodeInfo]:
        resp: pb.ListNodesResponse = await self._call(self.stub.ListNodes, pb.ListNodesRequest())
        return list(resp.nodes)

    async def acquire_lease(
        self,
        queue: str,
        node_id: str,
        agent_id: str,
        wait_ms: int = 0,
        start: bool = False,
        max_tasks: int = 0,
    ) -> pb.AcquireLeaseResponse:
        """Leases the next ready task; `resp.HasField("task")` is False when none was.

        `start` grants it already RUNNING, saving the TransitionTask(START) round trip;
        `max_tasks` > 1 also grants up to that many ready tasks in `resp.more_grants`.
        """
        return await self._call(
            self.stub.AcquireLease,
            pb.AcquireLeaseRequest(
                queue=queue,
                node_id=node_id,
                agent_id=agent_id,
                wait_ms=wait_ms,
                start=start,
                max_tasks=max_tasks,
            ),
            timeout_s=self.timeout_s + wait_ms / 1000,
        )

    async def renew_lease(
        self, task_id: str, fencing_token: int, node_id: str
    ) -> pb.RenewLeaseResponse:
        return await self._call(
            self.stub.RenewLease,
            pb.RenewLeaseRequest(task_id=task_id, fencing_token=fencing_token, node_id=node_id),
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
        non_retryable: bool = False,
        failure_type: str = "",
    ) -> pb.Task:
        resp: pb.TransitionTaskResponse = await self._call(
            self.stub.TransitionTask,
            pb.TransitionTaskRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                event=int(event),  # type: ignore[arg-type]
                result=result,
                non_retryable=non_retryable,
                failure_type=failure_type,
                error=error,
                node_id=node_id,
            ),
        )
        return resp.task

    async def finish_and_acquire(
        self,
        task_id: str,
        fencing_token: int,
        event: Event | int,
        node_id: str,
        next_queue: str,
        next_agent_id: str,
        *,
        result: bytes = b"",
        error: str = "",
        wait_ms: int = 0,
        start: bool = False,
        max_tasks: int = 0,
    ) -> tuple[pb.Task, pb.AcquireLeaseResponse]:
        """SUCCEED/FAIL a task and lease the next in one round trip (`acquire_next`).

        Returns the finished task and AcquireLease's answer for the next (its
        `HasField("task")` is False when none was ready).
        """
        resp: pb.TransitionTaskResponse = await self._call(
            self.stub.TransitionTask,
            pb.TransitionTaskRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                event=int(event),  # type: ignore[arg-type]
                result=result,
                error=error,
                node_id=node_id,
                acquire_next=pb.AcquireLeaseRequest(
                    queue=next_queue,
                    node_id=node_id,
                    agent_id=next_agent_id,
                    wait_ms=wait_ms,
                    start=start,
                    max_tasks=max_tasks,
                ),
            ),
            timeout_s=self.timeout_s + wait_ms / 1000,
        )
        return resp.task, resp.next

    async def complete_tasks(
        self,
        node_id: str,
        completions: Sequence[pb.TaskCompletion],
        *,
        next_queue: str = "",
        next_agent_id: str = "",
        wait_ms: int = 0,
        start: bool = False,
        max_tasks: int = 0,
    ) -> tuple[list[pb.Task], pb.AcquireLeaseResponse | None]:
        """Ends several held tasks in one round trip and one commit, all or nothing.

        With `next_queue`, also leases the next tasks (`acquire_next`, up to
        `max_tasks`) once the completions committed. Returns the ended tasks and
        AcquireLease's answer for the next (None without `next_queue`).
        """
        request = pb.CompleteTasksRequest(node_id=node_id, completions=completions)
        if next_queue:
            request.acquire_next.CopyFrom(
                pb.AcquireLeaseRequest(
                    queue=next_queue,
                    node_id=node_id,
                    agent_id=next_agent_id,
                    wait_ms=wait_ms,
                    start=start,
                    max_tasks=max_tasks,
                )
            )
        resp: pb.CompleteTasksResponse = await self._call(
            self.stub.CompleteTasks, request, timeout_s=self.timeout_s + wait_ms / 1000
        )
        return list(resp.tasks), (resp.next if resp.HasField("next") else None)

    def lease_stream(self, node_id: str) -> LeaseStream:
        """Opens a StreamLeases stream for `node_id`: `complete_tasks` and `acquire_lease`
        as steps of one long-lived call, with no per-call cost (use it `async with`).

        The stream stays on the replica it was opened on; after an error (which
        ends it) open a new one.
        """
        return LeaseStream(self.stub.StreamLeases(), node_id)

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
        )
        return resp.record, resp.existed

    async def lookup_tool_call(
        self, task_id: str, idempotency_key: str
    ) -> pb.ToolCallRecord | None:
        """The recorded (task, key) outcome or STARTED marker, or None."""
        resp: pb.LookupToolCallResponse = await self._call(
            self.stub.LookupToolCall,
            pb.LookupToolCallRequest(task_id=task_id, idempotency_key=idempotency_key),
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
        attempt_timeout_ms: int = 0,
        deadline_ms: int = 0,
        schedule_to_start_timeout_ms: int = 0,
        retry_policy: pb.RetryPolicy | None = None,
    ) -> pb.SubmitTaskResponse:
        """Submits a task; limits and retry fields left 0/unset take the queue's defaults."""
        return await self._call(
            self.stub.SubmitTask,
            pb.SubmitTaskRequest(
                queue=queue,
                payload=payload,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                lease_ttl_ms=lease_ttl_ms,
                budget_limit_micros=budget_limit_micros,
                attempt_timeout_ms=attempt_timeout_ms,
                deadline_ms=deadline_ms,
                schedule_to_start_timeout_ms=schedule_to_start_timeout_ms,
                retry_policy=retry_policy,
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
        self, task_ids: Sequence[str] = (), since_unix_ms: int = 0, previous_tree_size: int = 0
    ) -> rpb.Bundle:
        """Exports an offline-verifiable bundle in one message (small exports; see
        `export_stream` for any size)."""
        resp = await self._call(
            self.stub.ExportBundle,
            pb.ExportBundleRequest(
                task_ids=list(task_ids),
                since_unix_ms=since_unix_ms,
                previous_tree_size=previous_tree_size,
            ),
        )
        return resp.bundle

    async def checkpoint(self, fresh: bool = False) -> rpb.Checkpoint:
        """The ledger's latest signed checkpoint (a fresh one covering every receipt if asked)."""
        resp = await self._call(self.stub.GetCheckpoint, pb.GetCheckpointRequest(fresh=fresh))
        return resp.checkpoint

    async def export_stream(
        self,
        task_ids: Sequence[str] = (),
        since_unix_ms: int = 0,
        previous_tree_size: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[pb.StreamExportBundleResponse]:
        """Streams a bundle of any size as pages in file order (StreamExportBundle).

        `timeout_s` bounds the whole stream (default: none, an export of a large
        ledger takes as long as it takes; the server stops when the caller goes).
        """
        call = self.stub.StreamExportBundle(
            pb.StreamExportBundleRequest(
                task_ids=list(task_ids),
                since_unix_ms=since_unix_ms,
                previous_tree_size=previous_tree_size,
            ),
            timeout=timeout_s,
        )
        try:
            async for part in call:
                yield part
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    async def put_policy(self, document: str) -> pb.PutPolicyResponse:
        return await self._call(self.stub.PutPolicy, pb.PutPolicyRequest(document=document))

    async def get_policy(
        self, version: int = 0, *, task_id: str = "", fencing_token: int = 0
    ) -> pb.GetPolicyResponse:
        """A policy version (operators), or the policy of a lease the calling node holds."""
        return await self._call(
            self.stub.GetPolicy,
            pb.GetPolicyRequest(version=version, task_id=task_id, fencing_token=fencing_token),
        )

    async def put_secret(self, name: str, value: bytes) -> int:
        """Seals and stores a new version of secret `name` (write-only); returns the version."""
        resp: pb.PutSecretResponse = await self._call(
            self.stub.PutSecret, pb.PutSecretRequest(name=name, value=value)
        )
        return int(resp.version)

    async def list_secrets(self) -> list[pb.SecretInfo]:
        """Names, versions and KEK ids of the stored secrets (never a value)."""
        resp: pb.ListSecretsResponse = await self._call(
            self.stub.ListSecrets, pb.ListSecretsRequest()
        )
        return list(resp.secrets)

    async def health(self, service: str = "") -> int:
        """The grpc.health.v1 status (1 = SERVING) of `service` ("" for the server)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        # The typeshed stub declares no methods on HealthStub (it is built at run time).
        check = stub.Check  # type: ignore[attr-defined]
        resp = await self._call(check, health_pb2.HealthCheckRequest(service=service))
        return int(resp.status)


async def enroll(
    stub: pb_grpc.ControlServiceAsyncStub,
    node_id: str,
    node_key: SigningKey,
    tls_key: ec.EllipticCurvePrivateKey,
    join_token: str,
    timeout_s: float,
) -> pb.RegisterNodeResponse:
    """GetEnrollmentChallenge, then RegisterNode with a statement signed by `node_key`.

    Raises:
        grpc.RpcError: as the calls failed (callers map it).
    """
    got: pb.GetEnrollmentChallengeResponse = await stub.GetEnrollmentChallenge(
        pb.GetEnrollmentChallengeRequest(node_id=node_id), timeout=timeout_s
    )
    challenge = from_proto(got.challenge)
    statement = make_statement(node_key, node_id, spki_der(tls_key.public_key()), challenge)
    response: pb.RegisterNodeResponse = await stub.RegisterNode(
        pb.RegisterNodeRequest(
            node_id=node_id,
            public_key=node_key.public.raw,
            enrollment_token=join_token,
            statement=to_proto(statement),
            challenge=got.challenge,
        ),
        timeout=timeout_s,
    )
    return response


def node_client_tls(
    ca_pem: bytes, response: pb.RegisterNodeResponse, tls_key: ec.EllipticCurvePrivateKey
) -> ClientTLS:
    """The mTLS identity an enrolment gave a node (key and certificate in memory only)."""
    return ClientTLS(ca_pem, response.tls_certificate_pem.encode(), key_pem(tls_key))
