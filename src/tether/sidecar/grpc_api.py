"""BrokerService: the agent-facing API (protobuf stops here).

Every call first learns its agent (the socket's bound agent, or the agent
token in metadata), then finds the task's lease with ownership and fencing
checks (`LeaseTable.for_agent`), and only then acts. A task leased to agent A
is PERMISSION_DENIED for agent B on every RPC; a lost lease is
FAILED_PRECONDITION "lease lost"; an unreachable control plane is UNAVAILABLE
with a `retry_after_ms` hint (see `tether.sidecar.uplink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from tether.core import errors as E
from tether.core.clock import Clock
from tether.core.policy import QueueSpec
from tether.core.receipts import ReceiptKind
from tether.core.states import Event, State
from tether.core.timeouts import end_reason_from_label
from tether.crypto.envelopes import from_proto
from tether.grpcutil.status import handle_errors
from tether.sidecar.config import NAME_RE
from tether.sidecar.finishing import Finisher, PendingFinish
from tether.sidecar.identity import AgentRegistry
from tether.sidecar.leases import HeldLease, LeaseTable
from tether.sidecar.mediation import Mediator, PolicySource
from tether.sidecar.memory import MAX_KEY_CHARS, MAX_VALUE_BYTES, MemoryStore, Scope
from tether.sidecar.receipts import ReceiptSink, sha256_hex
from tether.sidecar.uplink import Uplink
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc
from tether.v1 import control_pb2 as pb

if TYPE_CHECKING:
    from tether.sidecar.mcp_front import McpFront

log = logging.getLogger("tether.sidecar.broker")

MAX_WAIT_MS = 60_000
MAX_RESULT_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
ARTIFACT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
# How long CompleteTask waits for the control plane to confirm the end before it
# answers UNAVAILABLE (the sidecar keeps asking; a repeated CompleteTask joins it).
FINISH_WAIT_S = 30.0
# How long CompleteTask waits for the actions it stopped to return (their receipts first).
ACTING_GRACE_S = 5.0
_LOST = (E.StaleFencingToken, E.LeaseExpired, E.NotOwner, E.NotFound)


async def apply_transition(
    d: BrokerDeps,
    task_id: str,
    fencing_token: int,
    event: Event,
    *,
    result: bytes = b"",
    error: str = "",
    non_retryable: bool = False,
    failure_type: str = "",
) -> State:
    """Applies `event` to the task under `fencing_token`; returns the state after it.

    A repeat after a lost answer (a replica paused after its commit, or a sidecar
    restarted) finds the event applied under the same token; the control plane's
    refusal says so, and that counts as done.

    Raises:
        TetherError: the control plane's refusal (a lost lease among them).
    """
    target = {
        Event.START: State.RUNNING,
        Event.SUCCEED: State.SUCCEEDED,
        Event.FAIL: State.FAILED,
        Event.RELEASE: State.QUEUED,
    }[event]
    request = pb.TransitionTaskRequest(
        task_id=task_id,
        fencing_token=fencing_token,
        event=int(event),  # type: ignore[arg-type]
        result=result,
        error=error,
        node_id=d.node_id,
        non_retryable=non_retryable,
        failure_type=failure_type,
    )
    try:
        response: pb.TransitionTaskResponse = await d.uplink.call(
            "TransitionTask", request, safe_to_repeat=True
        )
    except E.InvalidTransition as err:
        same_token = err.metadata.get("current_fencing_token") == str(fencing_token)
        if same_token and err.metadata.get("state") in (target.name, State.QUEUED.name):
            return target if err.metadata.get("state") == target.name else State.QUEUED
        raise
    return State(response.task.state)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a finished task's exception seen (its caller may have hung up)."""
    if not task.cancelled():
        task.exception()


def final_transition(d: BrokerDeps) -> Callable[[PendingFinish], Awaitable[State]]:
    """The Finisher's way to apply a journaled end (no held lease needed: a restart)."""

    async def apply(pending: PendingFinish) -> State:
        return await apply_transition(
            d,
            pending.receipt.task_id,
            pending.receipt.fencing_token,
            pending.event,
            result=pending.result,
            error=pending.error,
            non_retryable=pending.non_retryable,
            failure_type=pending.failure_type,
        )

    return apply


@dataclass
class BrokerDeps:
    """What the Broker needs; shared by every socket's servicer."""

    node_id: str
    uplink: Uplink
    leases: LeaseTable
    registry: AgentRegistry
    memory: MemoryStore
    sink: ReceiptSink
    mediator: Mediator
    clock: Clock
    artifacts_dir: Path
    max_artifact_bytes: int
    default_queue: str = ""
    accepting_claims: bool = True
    # How long CompleteTask waits for the ledger to acknowledge the task's
    # receipts before answering receipts_pending=true (they stay spooled).
    receipt_ack_timeout_ms: int = 2_000
    # The policies leases were granted under (by digest); None only in unit tests
    # that run without a policy, where scope checks fall back to the narrowest.
    policies: PolicySource | None = None
    # Artifact bytes one task may store on this node in total.
    artifact_max_task_bytes: int = 1 << 30
    # Per task with uploads in flight: its stored bytes and the bytes streaming.
    artifact_usage: dict[str, _ArtifactUsage] = field(default_factory=dict)
    # The MCP front door (docs/mcp.md), when served: mints a lease's token at claim.
    mcp: McpFront | None = None
    # Journaled final transitions (tether.sidecar.finishing); set by Sidecar.start.
    finisher: Finisher | None = None


@dataclass
class _ArtifactUsage:
    """One task's artifact bytes while it has uploads in flight (dropped after the last)."""

    stored: int
    """Bytes of the task's artifact folder, measured when the first upload began,
    then kept up to date as uploads land."""
    streaming: int = 0
    """Bytes received by the task's uploads still in flight."""
    uploads: int = 0


def _file_bytes(path: Path) -> int:
    """Size of a regular file at `path`; 0 when there is none."""
    try:
        st = path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files in an artifact folder (unfinished parts included)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


_BACKGROUND: set[asyncio.Future[None]] = set()


def task_view(held: HeldLease) -> bpb.TaskView:
    """All an agent learns about its task: never a credential."""
    return bpb.TaskView(
        task_id=held.task_id,
        queue=held.queue,
        payload=held.payload,
        attempt=held.lease.attempt,
        fencing_token=held.lease.fencing_token,
        lease_expires_unix_ms=held.lease.expires_unix_ms,
        tools=list(held.lease.tools),
        state=int(held.state),  # type: ignore[arg-type]
    )


def _check_id(field: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise E.InvalidArgument(field, "must match [A-Za-z0-9._-]{1,128}")
    return value


class BrokerServicer(bpb_grpc.BrokerServiceServicer):
    """One per served socket; `bound_agent` is set for an agent's own socket."""

    def __init__(self, deps: BrokerDeps, bound_agent: str | None = None) -> None:
        self.d = deps
        self.bound_agent = bound_agent

    def agent_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The calling agent: the socket's bound agent, or the one whose token came.

        Raises:
            Unauthenticated: no token, or a token no agent has.
        """
        if self.bound_agent is not None:
            return self.bound_agent
        return self.d.registry.authenticate(context.invocation_metadata())

    _agent = agent_of

    async def _held(
        self, context: grpc.aio.ServicerContext[Any, Any], task_id: str
    ) -> tuple[str, HeldLease]:
        agent = self._agent(context)
        held = await self.d.leases.for_agent(agent, _check_id("task_id", task_id))
        return agent, held

    async def _transition(
        self,
        held: HeldLease,
        event: Event,
        *,
        result: bytes = b"",
        error: str = "",
        non_retryable: bool = False,
        failure_type: str = "",
    ) -> State:
        """Applies `event` under the held lease; a refusal that means loss fences it.

        A retry after a connection drop may find the event already applied by
        the first attempt; the same fencing token and the target state prove it.
        """
        try:
            return await apply_transition(
                self.d,
                held.task_id,
                held.lease.fencing_token,
                event,
                result=result,
                error=error,
                non_retryable=non_retryable,
                failure_type=failure_type,
            )
        except _LOST as err:
            await self.d.leases.mark_lost(
                held, f"control plane refused {event.name}: {err.message}"
            )
            raise E.LeaseLost(f"lease lost on task {held.task_id!r}: {err.message}") from err

    @handle_errors
    async def ClaimTask(
        self, request: bpb.ClaimTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.ClaimTaskResponse:
        agent = self._agent(context)
        queue = request.queue or self.d.default_queue
        _check_id("queue", queue)
        if request.wait_ms > MAX_WAIT_MS:
            raise E.InvalidArgument("wait_ms", f"must be at most {MAX_WAIT_MS}")
        if not self.d.accepting_claims:
            raise E.Unavailable(
                "sidecar is shutting down; retry on another node in 1000 ms",
                metadata={"retry_after_ms": "1000"},
            )
        sent = self.d.clock.monotonic_ms()  # the lease is valid from here, not from arrival
        acquire = asyncio.ensure_future(
            self.d.uplink.call(
                "AcquireLease",
                pb.AcquireLeaseRequest(
                    queue=queue, node_id=self.d.node_id, agent_id=agent, wait_ms=request.wait_ms
                ),
                safe_to_repeat=False,
                extra_timeout_ms=request.wait_ms,
            )
        )
        try:
            response: pb.AcquireLeaseResponse = await asyncio.shield(acquire)
        except asyncio.CancelledError:
            # The agent went away (deadline, disconnect): whatever is granted goes back
            # at once instead of sitting on the lease until its TTL.
            acquire.add_done_callback(self._give_back_orphan)
            raise
        if not response.HasField("task"):
            return bpb.ClaimTaskResponse()
        try:
            held = await self.d.leases.add(
                response.task,
                from_proto(response.lease),
                agent,
                sent_mono_ms=sent + response.waited_ms,  # the grant is no earlier than this
            )
        except E.VerificationError as err:
            log.error(
                "refusing a lease that failed verification: %s",
                err.message,
                extra={"task_id": response.task.task_id},
            )
            await self._release(response.task.task_id, response.task.fencing_token, "bad lease")
            raise E.TetherError(
                "the control plane sent a lease that failed verification; see the sidecar log"
            ) from err
        except E.ResourceExhausted as err:  # no spool room to keep the lease on record
            await self._release(response.task.task_id, response.task.fencing_token, err.message)
            raise
        except E.LeaseExpired as err:
            await self._release(response.task.task_id, response.task.fencing_token, err.message)
            raise E.Unavailable(
                f"{err.message}; claim again", metadata={"retry_after_ms": "0"}
            ) from err
        if context.done():
            await self._give_back(held, "the claiming agent went away before the reply")
            raise E.Unavailable("the claim was abandoned by its caller")
        await self._check_claim(held, agent, queue)
        try:  # the policy check may have taken time: hand over only a live lease
            await self.d.leases.check_live(held)
        except E.LeaseLost as err:
            await self._release(held.task_id, held.lease.fencing_token, err.message)
            raise E.Unavailable(
                f"{err.message}; claim again", metadata={"retry_after_ms": "0"}
            ) from err
        claimed = bpb.ClaimTaskResponse(task=task_view(held))
        if self.d.mcp is not None:
            grant = self.d.mcp.grant(held)
            claimed.mcp.CopyFrom(
                bpb.McpAccess(token=grant.token, url=grant.url, unix_socket=grant.unix_socket)
            )
        return claimed

    async def _check_claim(self, held: HeldLease, agent: str, queue: str) -> None:
        """The sidecar's own check of the agent->queue grant, on the signed lease's fields.

        Raises:
            PolicyDenied: the lease is for another queue, or its policy does not let
                `agent` claim from the queue (the lease is handed back at once).
        """
        problem = ""
        if held.queue != queue:
            problem = f"the lease is for queue {held.queue!r}, not {queue!r}"
        elif self.d.policies is not None:
            try:
                policy = await self.d.policies.get(
                    held.lease.policy_digest, held.task_id, held.lease.fencing_token
                )
            except E.PolicyDenied as err:
                problem = err.message
            else:
                if not policy.may_claim(agent, held.queue):
                    problem = f"the policy does not let agent {agent!r} claim from {queue!r}"
        if problem:
            await self._give_back(held, f"claim refused: {problem}")
            raise E.PolicyDenied(problem, metadata={"agent": agent, "queue": queue})

    async def _release(self, task_id: str, fencing_token: int, why: str) -> None:
        """Hands a just-granted lease back (best effort; otherwise it lapses)."""
        request = pb.TransitionTaskRequest(
            task_id=task_id,
            fencing_token=fencing_token,
            event=int(Event.RELEASE),  # type: ignore[arg-type]
            error=why[:512],
            node_id=self.d.node_id,
        )
        try:
            await self.d.uplink.call("TransitionTask", request, retry_budget_ms=1000)
        except E.TetherError as err:
            log.warning("could not hand back task %s: %s", task_id, err.message)

    async def _give_back(self, held: HeldLease, why: str) -> None:
        await self._release(held.task_id, held.lease.fencing_token, why)
        await self.d.leases.mark_lost(held, why)

    def _give_back_orphan(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        response = fut.result()
        if response.HasField("task"):
            task = response.task
            job = asyncio.ensure_future(
                self._release(task.task_id, task.fencing_token, "claiming agent went away")
            )
            _BACKGROUND.add(job)  # keep a reference until it ends (asyncio holds weak ones)
            job.add_done_callback(_BACKGROUND.discard)

    async def _queue_spec(self, held: HeldLease) -> QueueSpec | None:
        """The lease's queue as its signed policy declares it (None without a policy source)."""
        if self.d.policies is None:
            return None
        policy = await self.d.policies.get(
            held.lease.policy_digest, held.task_id, held.lease.fencing_token
        )
        return policy.queue(held.queue)

    async def _check_memory_scope(self, held: HeldLease, scope: Scope) -> None:
        """`memory_scope = "task"` allows task memory only; "agent" allows both."""
        spec = await self._queue_spec(held)
        widest = spec.memory_scope if spec is not None else "task"
        if scope is Scope.AGENT and widest != "agent":
            raise E.PolicyDenied(
                f"queue {held.queue!r} has memory_scope = {widest!r}: agent-scoped memory "
                "is not granted",
                metadata={"queue": held.queue, "scope": "agent"},
            )

    @handle_errors
    async def StartTask(
        self, request: bpb.StartTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.StartTaskResponse:
        _, held = await self._held(context, request.task_id)
        async with held.lock:
            await self._start_locked(held)
        return bpb.StartTaskResponse(task=task_view(held))

    async def _start_locked(self, held: HeldLease) -> None:
        if held.state is State.RUNNING:
            return
        held.state = await self._transition(held, Event.START)
        await self.d.leases.check_live(held)  # the round trip took time: still ours?
        await self.d.sink.emit(held.receipt(ReceiptKind.TASK_STARTED, self.d.clock.now_ms()))

    @handle_errors
    async def Heartbeat(
        self, request: bpb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.HeartbeatResponse:
        try:
            _, held = await self._held(context, request.task_id)
            if self.d.leases.renew_due(held):
                # Unreachable control plane: the lease stays held until its expiry,
                # the keeper keeps trying; the agent sees the unchanged expiry.
                with contextlib.suppress(E.Unavailable):
                    await self.d.leases.renew(held, retry_budget_ms=0)
                await self.d.leases.check_live(held)  # never "alive" once it lapsed meanwhile
        except (E.TaskTimedOut, E.TaskCanceled) as err:
            # The control plane ended the task: say why, so a cooperative agent stops.
            reason = end_reason_from_label(err.metadata.get("end_reason", ""))
            if reason is None:  # pragma: no cover - both errors always carry it
                raise
            return bpb.HeartbeatResponse(end_reason=int(reason))  # type: ignore[arg-type]
        return bpb.HeartbeatResponse(lease_expires_unix_ms=held.lease.expires_unix_ms)

    @handle_errors
    async def CallTool(
        self, request: bpb.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.CallToolResponse:
        if not request.tool or len(request.tool) > 128:
            raise E.InvalidArgument("tool", "must be 1..128 characters")
        if len(request.idempotency_key) > 256:
            raise E.InvalidArgument("idempotency_key", "must be at most 256 characters")
        agent, held = await self._held(context, request.task_id)
        outcome = await self.d.mediator.call_tool(
            agent,
            held,
            request.tool,
            request.arguments_json,
            request.idempotency_key,
            deadline_s=context.time_remaining(),  # None without a client deadline
        )
        return bpb.CallToolResponse(
            result_json=outcome.result_json,
            replayed=outcome.replayed,
            cost_micros=outcome.cost_micros,
            status=outcome.status,
            budget_remaining_micros=outcome.budget_remaining_micros,
        )

    @staticmethod
    def _memory_args(scope: int, key: str) -> Scope:
        if scope not in (Scope.TASK, Scope.AGENT):
            raise E.InvalidArgument("scope", "must be MEMORY_SCOPE_TASK or MEMORY_SCOPE_AGENT")
        if not 1 <= len(key) <= MAX_KEY_CHARS:
            raise E.InvalidArgument("key", f"must be 1..{MAX_KEY_CHARS} characters")
        return Scope(scope)

    @handle_errors
    async def Remember(
        self, request: bpb.RememberRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.RememberResponse:
        scope = self._memory_args(request.scope, request.key)
        if len(request.value) > MAX_VALUE_BYTES:
            raise E.InvalidArgument("value", "larger than 1 MiB")
        agent, held = await self._held(context, request.task_id)
        with held.acting():  # its receipt never follows the lease's task_finished
            await self._check_memory_scope(held, scope)
            await self.d.leases.check_live(held)  # the point of action, after the policy lookup
            owner = held.task_id if scope is Scope.TASK else agent
            now = self.d.clock.now_ms()
            digest = await self.d.memory.put(scope, owner, request.key, request.value, now)
            await self.d.sink.emit(
                held.receipt(
                    ReceiptKind.MEMORY_WRITE,
                    now,
                    memory_key=f"{scope.name.lower()}:{request.key}",
                    result_sha256=digest,
                )
            )
        return bpb.RememberResponse(sha256=digest)

    @handle_errors
    async def Recall(
        self, request: bpb.RecallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.RecallResponse:
        scope = self._memory_args(request.scope, request.key)
        agent, held = await self._held(context, request.task_id)
        await self._check_memory_scope(held, scope)
        owner = held.task_id if scope is Scope.TASK else agent
        value = await self.d.memory.get(scope, owner, request.key)
        await self.d.leases.check_live(held)  # nothing is answered under a lapsed lease
        if value is None:
            return bpb.RecallResponse(found=False)
        return bpb.RecallResponse(found=True, value=value)

    @handle_errors
    async def CompleteTask(
        self, request: bpb.CompleteTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.CompleteTaskResponse:
        if request.outcome not in (bpb.TASK_OUTCOME_SUCCEEDED, bpb.TASK_OUTCOME_FAILED):
            raise E.InvalidArgument("outcome", "must be TASK_OUTCOME_SUCCEEDED or _FAILED")
        if len(request.result) > MAX_RESULT_BYTES:
            raise E.InvalidArgument("result", "larger than 1 MiB")
        if len(request.error) > 4096:
            raise E.InvalidArgument("error", "longer than 4096 characters")
        if len(request.failure_type) > 64:
            raise E.InvalidArgument("failure_type", "longer than 64 characters")
        agent = self._agent(context)
        task_id = _check_id("task_id", request.task_id)
        held = self.d.leases.get(task_id)
        if held is None or held.agent != agent or held.finishing is None:
            _, held = await self._held(context, task_id)
        if held.finishing is None:
            # Run apart from this call: an agent that hangs up (or a deadline) must not
            # stop the end half-way, with the control plane's commit and no receipt.
            held.finishing = asyncio.ensure_future(self._complete(held, request))
            held.finishing.add_done_callback(_retrieved)  # its caller may have gone
            held.finishing_outcome = request.outcome
        elif held.finishing_outcome != request.outcome:
            raise E.InvalidTransition(
                f"task {task_id!r} is already being completed with another outcome"
            )
        try:
            state, final_seq = await asyncio.wait_for(asyncio.shield(held.finishing), FINISH_WAIT_S)
        except TimeoutError:
            raise E.Unavailable(
                f"the control plane has not confirmed the end of task {task_id!r} yet; the "
                "sidecar keeps asking and records the outcome; call CompleteTask again to "
                "learn it",
                metadata={"retry_after_ms": "1000"},
            ) from None
        log.info(
            "task finished: %s",
            state.name.lower(),
            extra={"task_id": held.task_id, "agent_id": held.agent},
        )
        # The task's receipts are all at or below final_seq (one chain per node).
        acked = await self.d.sink.wait_acked(final_seq, self.d.receipt_ack_timeout_ms / 1000)
        if not acked:
            log.warning(
                "task finished with receipts pending: the control plane has not acknowledged "
                "them; they are spooled and will be replayed",
                extra={"task_id": held.task_id, "seq": final_seq},
            )
        return bpb.CompleteTaskResponse(
            state=int(state),  # type: ignore[arg-type]
            receipts_pending=not acked,
        )

    async def _complete(
        self, held: HeldLease, request: bpb.CompleteTaskRequest
    ) -> tuple[State, int]:
        """Ends the task under its lease: the final transition journaled, then the receipt.

        Returns:
            (the task's state after it, seq of its task_finished receipt).
        """
        succeeded = request.outcome == bpb.TASK_OUTCOME_SUCCEEDED
        journaled = False
        try:
            async with held.lock:
                if held.finished:
                    raise E.InvalidTransition(f"task {held.task_id!r} is already finished")
                if held.acting_count:  # none starts now (`HeldLease.acting`)
                    # Completing ends the lease's work: what still runs is stopped now (its
                    # process tree, its MCP server), as the lease's end always did, and the
                    # end waits for its receipt, which must precede task_finished.
                    held.drop_credentials()
                    if not await held.wait_idle(ACTING_GRACE_S):
                        raise E.InvalidTransition(
                            f"task {held.task_id!r} still has {held.acting_count} tool "
                            "call(s), memory write(s) or upload(s) under way after "
                            f"{ACTING_GRACE_S:.0f} s; complete it after they return"
                        )
                if succeeded:
                    await self._start_locked(held)  # succeed needs running; start implicitly
                await self.d.mediator.end_lease(held)  # unspent budget back before the end
                # The calls above took time: the final transition is sent only under a
                # lease still valid here, which the control plane's expiry outlasts. The
                # receipt is timed now, inside the lease, whenever it is signed.
                await self.d.leases.check_live(held)
                pending = PendingFinish(
                    receipt=held.receipt(
                        ReceiptKind.TASK_FINISHED,
                        self.d.clock.now_ms(),
                        result_sha256=sha256_hex(request.result),
                        status="ok" if succeeded else "error",
                        reason=request.error[:512],
                    ),
                    event=Event.SUCCEED if succeeded else Event.FAIL,
                    result=request.result,
                    error=request.error,
                    non_retryable=request.non_retryable and not succeeded,
                    failure_type="" if succeeded else request.failure_type,
                )
                finisher = self.d.finisher
                if finisher is None:  # pragma: no cover - Sidecar.start always sets it
                    raise RuntimeError("the sidecar has no finisher")
                held.final_in_flight = True
                try:
                    await finisher.journal.record(pending)
                    journaled = True
                    state, seq = await finisher.start(pending, held.end_slot)
                except _LOST as err:
                    held.final_in_flight = False
                    await self.d.leases.mark_lost(
                        held, f"control plane refused {pending.event.name}: {err.message}"
                    )
                    raise E.LeaseLost(
                        f"lease lost on task {held.task_id!r}: {err.message}"
                    ) from err
                finally:
                    held.final_in_flight = False
                held.state = state
                await self.d.leases.finish(held)
                return state, seq
        except BaseException:
            if not journaled:
                held.finishing = None  # nothing was asked of the control plane: retryable
            raise

    @handle_errors
    async def PutArtifact(
        self,
        request_iterator: AsyncIterator[bpb.PutArtifactRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bpb.PutArtifactResponse:
        first = None
        async for message in request_iterator:
            first = message
            break
        if first is None or first.WhichOneof("part") != "header":
            raise E.InvalidArgument("header", "the first message must carry the header")
        header = first.header
        if not ARTIFACT_NAME_RE.match(header.name) or header.name in (".", ".."):
            raise E.InvalidArgument("name", "must match [A-Za-z0-9._-]{1,200}")
        _, held = await self._held(context, header.task_id)
        with held.acting():  # its receipt never follows the lease's task_finished
            return await self._put_artifact(held, header, request_iterator)

    async def _put_artifact(
        self,
        held: HeldLease,
        header: bpb.ArtifactHeader,
        request_iterator: AsyncIterator[bpb.PutArtifactRequest],
    ) -> bpb.PutArtifactResponse:
        """`PutArtifact` after its header, counted as acting under the lease."""
        limit = self.d.max_artifact_bytes
        spec = await self._queue_spec(held)
        if spec is not None:
            if spec.filesystem_scope == "none":
                raise E.PolicyDenied(
                    f'queue {held.queue!r} has filesystem_scope = "none": no artifacts',
                    metadata={"queue": held.queue},
                )
            limit = min(limit, spec.max_artifact_bytes)
        folder = self.d.artifacts_dir / held.task_id
        folder.mkdir(parents=True, exist_ok=True)
        usage = self.d.artifact_usage.get(held.task_id)
        if usage is None:  # no upload of the task in flight: the folder is all there is
            usage = self.d.artifact_usage[held.task_id] = _ArtifactUsage(_folder_bytes(folder))
        usage.uploads += 1
        target = folder / header.name
        tmp = folder / f".{header.name}.{secrets.token_hex(6)}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            replaced = _file_bytes(target)
            quota = self.d.artifact_max_task_bytes
            with tmp.open("wb") as out:
                async for message in request_iterator:
                    if message.WhichOneof("part") != "chunk":
                        raise E.InvalidArgument("chunk", "only the first message has a header")
                    if len(message.chunk) > MAX_CHUNK_BYTES:
                        raise E.InvalidArgument("chunk", "larger than 1 MiB")
                    size += len(message.chunk)
                    usage.streaming += len(message.chunk)
                    if size > limit:
                        raise E.ResourceExhausted(
                            f"artifact larger than the limit of {limit} bytes (the queue's "
                            "max_artifact_bytes or the sidecar's)"
                        )
                    if usage.stored - replaced + usage.streaming > quota:
                        raise E.ResourceExhausted(
                            f"artifact quota: task {held.task_id!r} would store more than "
                            f"artifact_max_task_bytes = {quota} bytes of artifacts on this "
                            "node; nothing was stored",
                            metadata={"quota": "artifact_max_task_bytes", "limit": str(quota)},
                        )
                    digest.update(message.chunk)
                    out.write(message.chunk)
                out.flush()
                os.fsync(out.fileno())
            # Fencing at the point of action: the artifact lands only under a live lease.
            await self.d.leases.for_agent(held.agent, held.task_id)
            replaced = _file_bytes(target)  # as it is now (another upload may have replaced it)
            os.replace(tmp, target)
            usage.stored += size - replaced
        finally:
            tmp.unlink(missing_ok=True)
            usage.streaming -= size
            usage.uploads -= 1
            if usage.uploads == 0:
                self.d.artifact_usage.pop(held.task_id, None)
        hexdigest = digest.hexdigest()
        await self.d.sink.emit(
            held.receipt(
                ReceiptKind.ARTIFACT,
                self.d.clock.now_ms(),
                artifact_name=header.name,
                artifact_size=size,
                artifact_sha256=hexdigest,
            )
        )
        return bpb.PutArtifactResponse(sha256=hexdigest, size=size)
