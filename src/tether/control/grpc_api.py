"""ControlService servicer: protobuf <-> core, field validation, authentication.

Every request field is checked here, at the edge, so a bad one is refused with
INVALID_ARGUMENT naming it before any use case runs. Who may call each RPC is
decided before this code runs, by `tether.control.authz` from the verified
client certificate; here a node is further held to its own id (the request's
node_id must be the certificate's, and the node enrolled, active and with its
current key) and to the tasks it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from tether.control.authz import current_principal, principal_tag, sees_payloads
from tether.control.ledger import Ledger
from tether.control.service import (
    MAX_JOIN_TOKEN_TTL_MS,
    MIN_JOIN_TOKEN_TTL_MS,
    ControlService,
    RetryRequest,
)
from tether.control.vault import MAX_SECRET_BYTES
from tether.core.errors import (
    ConfigError,
    InvalidArgument,
    InvalidTransition,
    LeaseExpired,
    NotFound,
    NotOwner,
    PolicyDenied,
    StaleFencingToken,
    TetherError,
    Unauthenticated,
    VerificationError,
)
from tether.core.leases import MAX_TTL_MS, MIN_TTL_MS
from tether.core.policy import FAILURE_TYPE_RE
from tether.core.states import HOLDER_EVENTS, Event, State
from tether.core.timeouts import (
    MAX_COEFFICIENT,
    MAX_INTERVAL_MS,
    MAX_LIMIT_MS,
    MAX_NON_RETRYABLE,
    MIN_LIMIT_MS,
    RetryPolicy,
)
from tether.crypto.envelopes import from_proto, json_to_proto, proto_fields, to_proto
from tether.crypto.signing import Envelope, keyid_of
from tether.grpcutil.status import code_for, handle_errors
from tether.store.base import (
    HolderTransition,
    NodeRecord,
    SecretVersionInfo,
    TaskRecord,
    ToolCallPhase,
    ToolCallRecord,
    ToolCallWrite,
    stored_retry_policy,
)
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc
from tether.v1 import receipt_pb2
from tether.verify.bundle import bundle_to_proto, entries_to_proto
from tether.verify.bundle import checkpoint_to_proto as bundle_to_proto_checkpoint

MAX_PAYLOAD_BYTES = 1 << 20
MAX_TEXT_CHARS = 4096
MAX_KEY_CHARS = 256
MAX_ATTEMPTS_LIMIT = 100
MAX_WAIT_MS = 60_000
MAX_GRANTS_PER_CALL = 64
MAX_STARTS_PER_CALL = 256  # STARTED records in one StartToolCalls
"""AcquireLease's max_tasks bound: one answer stays small and one caller cannot drain a queue."""
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_INT64 = (1 << 63) - 1
"""The largest integer a store column holds (SQLite INTEGER, PostgreSQL BIGINT): a
uint64 field above it is refused here, never left to overflow in the store."""
MAX_MICROS = (1 << 53) - 1
"""The largest amount of money (micro-units) a request may name: exact in JSON, and
no sum of a few of them overflows a store column."""
MAX_EXPORT_TASKS = 10_000

log = logging.getLogger("tether.control")

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,256}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_STATUS_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# -- validation -------------------------------------------------------------------------


def check_id(field: str, value: str) -> str:
    """A required id matching [A-Za-z0-9._-]{1,128}."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID_RE.fullmatch(value):
        raise InvalidArgument(field, "must match [A-Za-z0-9._-]{1,128}")
    return value


def check_optional_id(field: str, value: str) -> str:
    """An optional id: empty or [A-Za-z0-9._-]{1,128}."""
    return check_id(field, value) if value else ""


@dataclass(frozen=True)
class _Acquire:
    """A validated AcquireLease request."""

    queue: str
    node_id: str
    agent_id: str
    wait_ms: int
    max_tasks: int
    start: bool


def _check_acquire(request: pb.AcquireLeaseRequest, prefix: str = "") -> _Acquire:
    """Validates an AcquireLease request (alone, or as TransitionTask's acquire_next)."""
    return _Acquire(
        queue=check_id(prefix + "queue", request.queue),
        node_id=check_id(prefix + "node_id", request.node_id),
        agent_id=check_id(prefix + "agent_id", request.agent_id),
        wait_ms=check_range(prefix + "wait_ms", request.wait_ms, 0, MAX_WAIT_MS),
        max_tasks=max(
            1, check_range(prefix + "max_tasks", request.max_tasks, 0, MAX_GRANTS_PER_CALL)
        ),
        start=request.start,
    )


# The store's refusals of a write on a leased task: each names the task's holder, token
# or state, which only a node that held it may learn (`ControlServicer._as_seen_by`).
_LEASE_REFUSALS = (NotFound, NotOwner, StaleFencingToken, LeaseExpired, InvalidTransition)


def _check_tool_call(request: pb.RecordToolCallRequest) -> ToolCallWrite:
    """Validates a RecordToolCall request (or one StartToolCalls record)."""
    task_id = check_id("task_id", request.task_id)
    token = check_token("fencing_token", request.fencing_token)
    key = check_idempotency_key("idempotency_key", request.idempotency_key)
    tool = check_id("tool", request.tool)
    args = check_sha256("arguments_sha256", request.arguments_sha256)
    phase = check_phase("phase", request.phase)
    result = check_bytes("result", request.result)
    if phase is ToolCallPhase.STARTED:
        for field, given in (
            ("result", bool(request.result)),
            ("status", bool(request.status)),
            ("cost_micros", request.cost_micros != 0),
        ):
            if given:
                raise InvalidArgument(field, "must be empty for phase STARTED")
    elif request.take_over:
        raise InvalidArgument("take_over", "is for phase STARTED only")
    elif not _STATUS_RE.fullmatch(request.status):
        raise InvalidArgument("status", "must match [A-Za-z0-9._-]{1,64} for COMPLETED")
    return ToolCallWrite(
        task_id=task_id,
        fencing_token=token,
        node_id=check_id("node_id", request.node_id),
        idempotency_key=key,
        tool=tool,
        arguments_sha256=args,
        phase=phase,
        result=result,
        status=request.status,
        cost_micros=check_micros("cost_micros", request.cost_micros),
        take_over=request.take_over,
    )


def _check_transition(
    request: pb.TransitionTaskRequest | pb.TaskCompletion, prefix: str = ""
) -> HolderTransition:
    """Validates the holder-event fields TransitionTask and each CompleteTasks item share."""
    event = check_holder_event(prefix + "event", request.event)
    failure_type = check_failure_type(prefix + "failure_type", request.failure_type)
    if (request.non_retryable or failure_type) and event is not Event.FAIL:
        raise InvalidArgument(
            prefix + ("non_retryable" if request.non_retryable else "failure_type"),
            "applies to FAIL only",
        )
    return HolderTransition(
        task_id=check_id(prefix + "task_id", request.task_id),
        fencing_token=check_token(prefix + "fencing_token", request.fencing_token),
        event=event,
        result=check_bytes(prefix + "result", request.result),
        error=check_text(prefix + "error", request.error),
        non_retryable=request.non_retryable,
        failure_type=failure_type,
    )


_COMPLETION_EVENTS: Final = {int(Event.SUCCEED): Event.SUCCEED, int(Event.FAIL): Event.FAIL}


def _plain_completion(c: pb.TaskCompletion) -> HolderTransition | None:
    """One batch item that passes every check of `_check_transition` (and is SUCCEED or
    FAIL) without a failure type, taken without naming each field first; None for any
    other, which the full checks then refuse with the field's name (or take)."""
    event = _COMPLETION_EVENTS.get(c.event)
    task_id, token, result, error = c.task_id, c.fencing_token, c.result, c.error
    if (
        event is None
        or c.failure_type
        or (c.non_retryable and event is not Event.FAIL)
        or not 0 < token <= MAX_INT64
        or len(result) > MAX_PAYLOAD_BYTES
        or len(error) > MAX_TEXT_CHARS
        or not task_id
        or not _ID_RE.fullmatch(task_id)
    ):
        return None
    return HolderTransition(
        task_id=task_id,
        fencing_token=token,
        event=event,
        result=result,
        error=error,
        non_retryable=c.non_retryable,
    )


def _check_completions(
    completions: Sequence[pb.TaskCompletion], *, required: bool
) -> list[HolderTransition]:
    """Validates a batch of ends (CompleteTasks, StreamLeases): 0..64 (1..64 when
    `required`), SUCCEED or FAIL each, every task once."""
    if required and not completions:
        raise InvalidArgument("completions", f"is required (1 to {MAX_GRANTS_PER_CALL} tasks)")
    if len(completions) > MAX_GRANTS_PER_CALL:
        raise InvalidArgument(
            "completions",
            f"has {len(completions)} tasks; the limit is {MAX_GRANTS_PER_CALL}",
        )
    items: list[HolderTransition] = []
    first: dict[str, int] = {}
    for i, c in enumerate(completions):
        t = _plain_completion(c)
        if t is None:  # the checks one by one, each field named (raises the first refusal)
            prefix = f"completions[{i}]."
            t = _check_transition(c, prefix)
            if t.event not in (Event.SUCCEED, Event.FAIL):
                raise InvalidArgument(prefix + "event", "must be SUCCEED or FAIL")
        if t.task_id in first:
            prefix = f"completions[{i}]."
            raise InvalidArgument(
                prefix + "task_id", f"repeats completions[{first[t.task_id]}].task_id"
            )
        first[t.task_id] = i
        items.append(t)
    return items


def check_range(field: str, value: int, lo: int, hi: int, *, zero_ok: bool = True) -> int:
    """An integer in [lo, hi], or 0 when `zero_ok` (meaning "the default")."""
    if value == 0 and zero_ok:
        return 0
    if not lo <= value <= hi:
        extra = " (or 0 for the default)" if zero_ok else ""
        raise InvalidArgument(field, f"must be between {lo} and {hi}{extra}, got {value}")
    return value


def check_bytes(field: str, value: bytes, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """At most `limit` bytes."""
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} bytes; the limit is {limit}")
    return bytes(value)


def check_text(field: str, value: str, limit: int = MAX_TEXT_CHARS) -> str:
    """At most `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {limit}")
    return value


def check_token(field: str, value: int) -> int:
    """A fencing token (1..2^63-1)."""
    if value <= 0:
        raise InvalidArgument(field, "must be a positive fencing token")
    if value > MAX_INT64:
        raise InvalidArgument(field, f"must be at most {MAX_INT64}, got {value}")
    return value


def check_uint(field: str, value: int, hi: int = MAX_INT64) -> int:
    """A non-negative integer no larger than `hi` (a uint64 field a store will hold)."""
    if not 0 <= value <= hi:
        raise InvalidArgument(field, f"must be between 0 and {hi}, got {value}")
    return value


def check_micros(field: str, value: int, *, positive: bool = False) -> int:
    """An amount of money in micro-units: 0 (or 1 when `positive`) up to MAX_MICROS."""
    if positive and value <= 0:
        raise InvalidArgument(field, "must be positive")
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value > MAX_MICROS:
        raise InvalidArgument(field, f"must be at most {MAX_MICROS}, got {value}")
    return value


def check_state(field: str, value: int, *, unspecified_ok: bool) -> State | None:
    """A TaskState value; UNSPECIFIED (0) only where it means "any"."""
    if value == 0 and unspecified_ok:
        return None
    try:
        return State(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown or unspecified TaskState {value}") from None


def check_holder_event(field: str, value: int) -> Event:
    """A TaskEvent a lease holder may send."""
    try:
        event = Event(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown or unspecified TaskEvent {value}") from None
    if event not in HOLDER_EVENTS:
        raise InvalidArgument(
            field,
            f"{event.name} is not a holder event; send START, SUCCEED, FAIL or RELEASE",
        )
    return event


def check_key(field: str, value: str) -> str:
    """A required key matching [A-Za-z0-9._:-]{1,256} (reservation ids)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _KEY_RE.fullmatch(value):
        raise InvalidArgument(field, "must match [A-Za-z0-9._:-]{1,256}")
    return value


def check_idempotency_key(field: str, value: str) -> str:
    """A required idempotency key: 1..256 printable characters."""
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_KEY_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {MAX_KEY_CHARS}")
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
    return value


def check_sha256(field: str, value: str) -> str:
    """A lower-case hex SHA-256 digest."""
    if not _SHA256_RE.fullmatch(value):
        raise InvalidArgument(field, "must be 64 lower-case hex characters (a SHA-256 digest)")
    return value


def check_phase(field: str, value: int) -> ToolCallPhase:
    """STARTED or COMPLETED."""
    try:
        return ToolCallPhase(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown or unspecified ToolCallPhase {value}") from None


def tool_call_to_proto(r: ToolCallRecord) -> pb.ToolCallRecord:
    """The wire form of an idempotency record."""
    return pb.ToolCallRecord(
        task_id=r.task_id,
        idempotency_key=r.idempotency_key,
        tool=r.tool,
        arguments_sha256=r.arguments_sha256,
        phase=int(r.phase),  # type: ignore[arg-type]
        result=r.result,
        status=r.status,
        fencing_token=r.fencing_token,
        cost_micros=r.cost_micros,
    )


# -- conversion -------------------------------------------------------------------------


def task_to_proto(t: TaskRecord) -> pb.Task:
    """The wire form of a stored task."""
    return pb.Task(**task_fields(t))


def task_fields(t: TaskRecord) -> dict[str, Any]:
    """The wire form's fields, for building it inside a larger message (a message given
    to a constructor is copied; a dict of fields is built in place).

    The fields that are mostly zero or empty (an unfinished task's result, error and end
    reason, the options few tasks set) are given only when set: no `Task` field has
    explicit presence, so a zero is not sent either way and the bytes are the same,
    while upb sets each given field (10 of 26 fewer per grant of a batch answer).
    """
    fields = {
        "task_id": t.task_id,
        "queue": t.queue,
        "state": int(t.state),
        "payload": t.payload,
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "fencing_token": t.fencing_token,
        "node_id": t.node_id,
        "agent_id": t.agent_id,
        "lease_expires_unix_ms": t.lease_expires_unix_ms,
        "lease_ttl_ms": t.lease_ttl_ms,
        "created_unix_ms": t.created_unix_ms,
        "updated_unix_ms": t.updated_unix_ms,
        "retry_policy": _task_retry_proto(
            t.retry_initial_ms,
            t.retry_coefficient,
            t.retry_max_interval_ms,
            t.max_attempts,
            t.non_retryable,
            t.retry_failures,
        ),
        "attempt_started_unix_ms": t.attempt_started_unix_ms,
        "submitted_by": t.submitted_by,
    }
    if t.result:
        fields["result"] = t.result
    if t.error:
        fields["error"] = t.error
    if t.end_reason:
        fields["end_reason"] = t.end_reason
    if t.not_before_unix_ms:
        fields["not_before_unix_ms"] = t.not_before_unix_ms
    if t.idempotency_key:
        fields["idempotency_key"] = t.idempotency_key
    if t.budget_limit_micros:
        fields["budget_limit_micros"] = t.budget_limit_micros
    if t.budget_spent_micros:
        fields["budget_spent_micros"] = t.budget_spent_micros
    if t.attempt_timeout_ms:
        fields["attempt_timeout_ms"] = t.attempt_timeout_ms
    if t.deadline_unix_ms:
        fields["deadline_unix_ms"] = t.deadline_unix_ms
    if t.schedule_to_start_ms:
        fields["schedule_to_start_timeout_ms"] = t.schedule_to_start_ms
    return fields


@functools.lru_cache(maxsize=256)
def _task_retry_proto(
    initial_ms: int,
    coefficient: float,
    max_interval_ms: int,
    max_attempts: int,
    non_retryable: tuple[str, ...],
    retry_failures: bool,
) -> pb.RetryPolicy:
    """`retry_to_proto(task.retry_policy())` cached by the stored fields it is made of,
    so a batch answer resolves no policy per task."""
    return retry_to_proto(
        stored_retry_policy(
            initial_ms, coefficient, max_interval_ms, max_attempts, non_retryable, retry_failures
        )
    )


def _grant_fields(grants: Sequence[tuple[TaskRecord, Envelope]], waited_ms: int) -> dict[str, Any]:
    """An AcquireLease answer's fields: the first grant, the rest in `more_grants` (empty:
    none). Fields, not messages, so that a batch answer (grants in an AcquireLeaseResponse
    in a StreamLeasesResponse) is built in place, not copied once per level."""
    if not grants:
        return {}
    (task, env), rest = grants[0], grants[1:]
    return {
        "task": task_fields(task),
        "lease": proto_fields(env),
        "waited_ms": waited_ms,
        "more_grants": [{"task": task_fields(t), "lease": proto_fields(e)} for t, e in rest],
    }


@functools.lru_cache(maxsize=256)
def retry_to_proto(r: RetryPolicy) -> pb.RetryPolicy:
    """The wire form of a resolved retry policy.

    Cached (most tasks share a few policies; a batch answer holds one per task): the
    message is only ever copied into a Task, never changed.
    """
    return pb.RetryPolicy(
        initial_interval_ms=r.initial_interval_ms,
        backoff_coefficient=r.backoff_coefficient,
        maximum_interval_ms=r.maximum_interval_ms,
        maximum_attempts=r.maximum_attempts,
        non_retryable_reasons=list(r.non_retryable_reasons),
        retry_failures=r.retry_failures,
    )


def check_failure_type(field: str, value: str) -> str:
    """A failure type: empty, or [A-Za-z0-9._-]{1,64}."""
    if value and not FAILURE_TYPE_RE.match(value):
        raise InvalidArgument(field, "must match [A-Za-z0-9._-]{1,64}")
    return value


def check_retry(msg: pb.RetryPolicy, attempts: int) -> tuple[RetryRequest, int]:
    """A submitted retry policy, and the attempts it and max_attempts agree on."""
    f = "retry_policy."
    initial = check_range(f + "initial_interval_ms", msg.initial_interval_ms, 1, MAX_INTERVAL_MS)
    maximum = check_range(f + "maximum_interval_ms", msg.maximum_interval_ms, 1, MAX_INTERVAL_MS)
    coefficient = msg.backoff_coefficient
    if coefficient and not (math.isfinite(coefficient) and 1.0 <= coefficient <= MAX_COEFFICIENT):
        raise InvalidArgument(
            f + "backoff_coefficient", f"must be between 1 and {MAX_COEFFICIENT:g} (or 0)"
        )
    if initial and maximum and maximum < initial:
        raise InvalidArgument(f + "maximum_interval_ms", "must be at least initial_interval_ms")
    most = check_range(f + "maximum_attempts", msg.maximum_attempts, 1, MAX_ATTEMPTS_LIMIT)
    if most and attempts and most != attempts:
        raise InvalidArgument(f + "maximum_attempts", "differs from max_attempts; set one of them")
    reasons = tuple(msg.non_retryable_reasons)
    if len(reasons) > MAX_NON_RETRYABLE:
        raise InvalidArgument(f + "non_retryable_reasons", f"at most {MAX_NON_RETRYABLE} types")
    for i, reason in enumerate(reasons):
        if not reason:
            raise InvalidArgument(f"{f}non_retryable_reasons[{i}]", "must not be empty")
        check_failure_type(f"{f}non_retryable_reasons[{i}]", reason)
    ask = RetryRequest(
        initial_interval_ms=initial,
        backoff_coefficient=coefficient,
        maximum_interval_ms=maximum,
        non_retryable_reasons=reasons,
        retry_failures=msg.retry_failures if msg.HasField("retry_failures") else None,
    )
    return ask, attempts or most


def node_to_proto(n: NodeRecord) -> pb.NodeInfo:
    """The operator's view of an enrolled node."""
    return pb.NodeInfo(
        node_id=n.node_id,
        keyid=keyid_of(n.public_key),
        status=n.status,
        status_reason=n.status_reason,
        registered_unix_ms=n.registered_unix_ms,
    )


class ControlServicer(pb_grpc.ControlServiceServicer):
    """The gRPC face of `ControlService`."""

    def __init__(self, service: ControlService) -> None:
        self.service = service

    async def _node(self, context: grpc.aio.ServicerContext[Any, Any], node_id: str) -> None:
        await self.service.check_node(node_id)

    @handle_errors
    async def GetEnrollmentChallenge(
        self,
        request: pb.GetEnrollmentChallengeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.GetEnrollmentChallengeResponse:
        node_id = check_id("node_id", request.node_id)
        return pb.GetEnrollmentChallengeResponse(
            challenge=to_proto(self.service.enrollment_challenge(node_id))
        )

    @handle_errors
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterNodeResponse:
        node_id = check_id("node_id", request.node_id)
        if len(request.public_key) != 32:
            raise InvalidArgument(
                "public_key", f"must be a raw 32-byte Ed25519 key, got {len(request.public_key)}"
            )
        token = check_text("enrollment_token", request.enrollment_token, 1024)
        if not request.HasField("statement"):
            raise InvalidArgument("statement", "is required: the node's signed enrolment statement")
        if not request.HasField("challenge"):
            raise InvalidArgument("challenge", "is required: the GetEnrollmentChallenge reply")
        try:
            statement = from_proto(request.statement)
            challenge = from_proto(request.challenge)
        except VerificationError as err:
            raise InvalidArgument("statement", err.message) from err
        got = await self.service.register_node(
            node_id=node_id,
            public_key=bytes(request.public_key),
            join_token=token,
            statement=statement,
            challenge=challenge,
            caller=self.service.caller_node(),
        )
        # Bundles carry every certificate a node had, so receipts signed under an
        # earlier key stay verifiable.
        await (await self._ledger()).record_certificate(node_id, got.certificate)
        return pb.RegisterNodeResponse(
            certificate=to_proto(got.certificate),
            control_public_key=self.service.key.public.raw,
            tls_certificate_pem=got.tls_certificate_pem,
            tls_expires_unix_ms=got.tls_expires_unix_ms,
            spiffe_id=got.spiffe_id,
        )

    @handle_errors
    async def CreateJoinToken(
        self, request: pb.CreateJoinTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateJoinTokenResponse:
        node_id = check_id("node_id", request.node_id)
        ttl = check_range("ttl_ms", request.ttl_ms, MIN_JOIN_TOKEN_TTL_MS, MAX_JOIN_TOKEN_TTL_MS)
        token, expires = await self.service.create_join_token(node_id, ttl)
        return pb.CreateJoinTokenResponse(token=token, expires_unix_ms=expires)

    @handle_errors
    async def RekeyNode(
        self, request: pb.RekeyNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RekeyNodeResponse:
        node_id = check_id("node_id", request.node_id)
        ttl = check_range("ttl_ms", request.ttl_ms, MIN_JOIN_TOKEN_TTL_MS, MAX_JOIN_TOKEN_TTL_MS)
        token, expires = await self.service.create_join_token(node_id, ttl, rekey=True)
        return pb.RekeyNodeResponse(token=token, expires_unix_ms=expires)

    @handle_errors
    async def RevokeNode(
        self, request: pb.RevokeNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RevokeNodeResponse:
        node_id = check_id("node_id", request.node_id)
        reason = check_text("reason", request.reason)
        rec = await self.service.revoke_node(node_id, reason or "revoked by an operator")
        return pb.RevokeNodeResponse(node=node_to_proto(rec))

    @handle_errors
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(
            nodes=[node_to_proto(n) for n in await self.service.list_nodes()]
        )

    @handle_errors
    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SubmitTaskResponse:
        queue = check_id("queue", request.queue)
        payload = check_bytes("payload", request.payload)
        key = request.idempotency_key
        if key and not _KEY_RE.fullmatch(key):
            raise InvalidArgument("idempotency_key", "must match [A-Za-z0-9._:-]{1,256}")
        attempts = check_range("max_attempts", request.max_attempts, 1, MAX_ATTEMPTS_LIMIT)
        ttl = check_range("lease_ttl_ms", request.lease_ttl_ms, MIN_TTL_MS, MAX_TTL_MS)
        budget = check_micros("budget_limit_micros", request.budget_limit_micros)
        limits = {
            name: check_range(name, getattr(request, name), MIN_LIMIT_MS, MAX_LIMIT_MS)
            for name in ("attempt_timeout_ms", "deadline_ms", "schedule_to_start_timeout_ms")
        }
        retry, attempts = check_retry(request.retry_policy, attempts)
        task, created = await self.service.submit(
            queue=queue,
            payload=payload,
            idempotency_key=key,
            max_attempts=attempts,
            lease_ttl_ms=ttl,
            budget_limit_micros=budget,
            retry=retry,
            submitted_by=principal_tag(current_principal()),
            **limits,
        )
        return pb.SubmitTaskResponse(task=task_to_proto(task), created=created)

    @handle_errors
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTaskResponse:
        task_id = check_id("task_id", request.task_id)
        task, history = await self.service.get(task_id, caller=current_principal())
        shown = task_to_proto(task)
        if not sees_payloads(current_principal()):  # auditors see evidence, not payloads
            shown.ClearField("payload")
            shown.ClearField("result")
        return pb.GetTaskResponse(
            task=shown,
            leases=[
                pb.LeaseRecord(lease=json_to_proto(h.envelope), outcome=h.outcome) for h in history
            ],
        )

    @handle_errors
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        queue = check_optional_id("queue", request.queue)
        state = check_state("state", request.state, unspecified_ok=True)
        size = check_range("page_size", request.page_size, 1, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
        token = check_text("page_token", request.page_token, 512)
        tasks, next_token = await self.service.list_tasks(
            queue=queue, state=state, page_size=size, page_token=token
        )
        listed = []
        for t in tasks:  # listings never carry payloads or results (GetTask does)
            msg = task_to_proto(t)
            msg.ClearField("payload")
            msg.ClearField("result")
            listed.append(msg)
        return pb.ListTasksResponse(tasks=listed, next_page_token=next_token)

    @handle_errors
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelTaskResponse:
        task_id = check_id("task_id", request.task_id)
        reason = check_text("reason", request.reason)
        task = await self.service.cancel(
            task_id, reason or "canceled by operator", caller=current_principal()
        )
        return pb.CancelTaskResponse(task=task_to_proto(task))

    @handle_errors
    async def AcquireLease(
        self, request: pb.AcquireLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AcquireLeaseResponse:
        acquire = _check_acquire(request)
        await self._node(context, acquire.node_id)
        return await self._acquire(acquire)

    @contextlib.asynccontextmanager
    async def _holder_only(self, task_id: str, token: int, node_id: str) -> AsyncIterator[None]:
        """Turns a lease refusal into one uniform NotOwner for a node that never held the task
        (see `_as_seen_by`)."""
        try:
            yield
        except _LEASE_REFUSALS as err:
            seen = await self._as_seen_by(err, task_id, token, node_id)
            if seen is err:
                raise
            raise seen from err

    async def _as_seen_by(
        self, err: TetherError, task_id: str, token: int, node_id: str
    ) -> TetherError:
        """`err` as `node_id` may see it: as is to a node that ever held the task, a lease
        refusal as one uniform NotOwner to any other.

        The store's diagnosis names the holder, the current token and the task's state:
        right for the holder (a stale token, a lapse), an oracle on other nodes' tasks
        (and on which task ids exist) for anyone else.
        """
        if not isinstance(err, _LEASE_REFUSALS) or await self.service.ever_held(task_id, node_id):
            return err
        index = {"index": err.metadata["index"]} if "index" in err.metadata else {}
        return NotOwner(
            f"node {node_id!r} holds no lease on task {task_id!r} under token {token}",
            metadata={"task_id": task_id, **index},
        )

    async def _acquire(self, a: _Acquire) -> pb.AcquireLeaseResponse:
        return pb.AcquireLeaseResponse(**await self._acquire_fields(a))

    async def _acquire_fields(self, a: _Acquire) -> dict[str, Any]:
        """The AcquireLease answer's fields (see `_grant_fields`)."""
        grants, waited_ms = await self.service.acquire_many(
            queue=a.queue,
            node_id=a.node_id,
            agent_id=a.agent_id,
            max_tasks=a.max_tasks,
            wait_ms=a.wait_ms,
            start=a.start,
            recheck=functools.partial(self.service.check_node, a.node_id),
        )
        return _grant_fields(grants, waited_ms)

    @handle_errors
    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RenewLeaseResponse:
        task_id = check_id("task_id", request.task_id)
        token = check_token("fencing_token", request.fencing_token)
        node_id = check_id("node_id", request.node_id)
        await self._node(context, node_id)
        try:
            async with self._holder_only(task_id, token, node_id):
                _, env = await self.service.renew(
                    task_id=task_id, fencing_token=token, node_id=node_id
                )
        except (LeaseExpired, InvalidTransition) as err:
            ended = await self.service.lease_end(task_id, token, node_id)
            if ended is None:
                raise
            reason, state = ended
            log.info(
                "renewal answered with the end reason",
                extra={"task_id": task_id, "end_reason": reason.label, "refusal": err.reason},
            )
            return pb.RenewLeaseResponse(
                end_reason=int(reason),  # type: ignore[arg-type]
                task_state=int(state),  # type: ignore[arg-type]
            )
        return pb.RenewLeaseResponse(lease=to_proto(env))

    @handle_errors
    async def TransitionTask(
        self, request: pb.TransitionTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TransitionTaskResponse:
        t = _check_transition(request)
        node_id = check_id("node_id", request.node_id)
        acquire: _Acquire | None = None
        if request.HasField("acquire_next"):
            if t.event not in (Event.SUCCEED, Event.FAIL):
                raise InvalidArgument("acquire_next", "applies to SUCCEED and FAIL only")
            acquire = _check_acquire(request.acquire_next, "acquire_next.")
            if acquire.node_id != node_id:
                raise InvalidArgument("acquire_next.node_id", "must equal node_id")
        await self._node(context, node_id)
        if acquire is not None:  # refuse before the transition, not after it committed
            await self.service.check_claim(acquire.queue, acquire.agent_id)
        async with self._holder_only(t.task_id, t.fencing_token, node_id):
            task = await self.service.transition(
                task_id=t.task_id,
                fencing_token=t.fencing_token,
                node_id=node_id,
                event=t.event,
                result=t.result,
                error=t.error,
                non_retryable=t.non_retryable,
                failure_type=t.failure_type,
            )
        if acquire is None:
            return pb.TransitionTaskResponse(task=task_to_proto(task))
        following = await self._acquire_next(acquire)
        return pb.TransitionTaskResponse(task=task_to_proto(task), next=following)

    async def _acquire_next(self, a: _Acquire) -> pb.AcquireLeaseResponse | None:
        """The grant after a committed end (acquire_next); None when the policy stopped
        letting the agent claim, or the node was revoked, since the request's check
        (the end stands)."""
        try:
            return await self._acquire(a)
        except (PolicyDenied, Unauthenticated):
            return None

    @handle_errors
    async def CompleteTasks(
        self, request: pb.CompleteTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompleteTasksResponse:
        node_id = check_id("node_id", request.node_id)
        items = _check_completions(request.completions, required=True)
        acquire: _Acquire | None = None
        if request.HasField("acquire_next"):
            acquire = _check_acquire(request.acquire_next, "acquire_next.")
            if acquire.node_id != node_id:
                raise InvalidArgument("acquire_next.node_id", "must equal node_id")
        await self._node(context, node_id)
        tasks, following = await self._complete(node_id, items, acquire)
        answer: dict[str, Any] = {"tasks": tasks, "next": following}  # built in place
        return pb.CompleteTasksResponse(**answer)

    @handle_errors
    async def StreamLeases(
        self, request_iterator: AsyncIterator[pb.StreamLeasesRequest], context: Any
    ) -> AsyncIterator[pb.StreamLeasesResponse]:
        node_id = ""
        async for request in request_iterator:
            if not node_id:
                node_id = check_id("node_id", request.node_id)
            elif request.node_id != node_id:
                raise InvalidArgument("node_id", "must not change within one stream")
            acquire: _Acquire | None = None
            if request.HasField("acquire"):
                acquire = _check_acquire(request.acquire, "acquire.")
                if acquire.node_id != node_id:
                    raise InvalidArgument("acquire.node_id", "must equal node_id")
            items = _check_completions(request.completions, required=acquire is None)
            await self._node(context, node_id)  # every request: a revocation holds mid-stream
            tasks, following = await self._complete(node_id, items, acquire, echo=not request.brief)
            answer: dict[str, Any] = {"tasks": tasks, "next": following}  # built in place
            yield pb.StreamLeasesResponse(**answer)

    async def _complete(
        self,
        node_id: str,
        items: list[HolderTransition],
        acquire: _Acquire | None,
        *,
        echo: bool = True,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """CompleteTasks' work after validation and the node check: the ended tasks
        (none without `echo`: a brief StreamLeases answer), and the next grants (None
        without `acquire`, or when the policy stopped the claim during a wait), as the
        answer's fields (see `_grant_fields`)."""
        if not items:
            assert acquire is not None  # _check_completions(required=acquire is None)
            return [], await self._acquire_fields(acquire)
        grants: list[tuple[TaskRecord, Envelope]] | None = None
        waited_ms = 0
        try:
            if acquire is None:
                tasks = await self.service.transition_many(node_id=node_id, items=items)
            else:  # the ends and the next grants share one transaction (one durable commit)
                tasks, grants, waited_ms = await self.service.complete_then_acquire(
                    node_id=node_id,
                    items=items,
                    queue=acquire.queue,
                    agent_id=acquire.agent_id,
                    max_tasks=acquire.max_tasks,
                    wait_ms=acquire.wait_ms,
                    start=acquire.start,
                    recheck=functools.partial(self.service.check_node, node_id),
                    brief=not echo,
                )
        except _LEASE_REFUSALS as err:
            index = err.metadata.get("index", "")
            if not index.isdigit() or int(index) >= len(items):
                raise
            t = items[int(index)]
            async with self._holder_only(t.task_id, t.fencing_token, node_id):
                raise err  # as is to a holder, else the uniform NotOwner (with the index)
            raise err  # not reached: _holder_only re-raises
        ended = [task_fields(t) for t in tasks] if echo else []
        return ended, None if grants is None else _grant_fields(grants, waited_ms)

    # -- RPCs owned by other parts (ledger, vault, budgets, tool calls, policy) ---------
    # The ledger engineer replaces StreamReceipts/GetCheckpoint/GetInclusionProof/
    # GetConsistencyProof/ExportBundle (e.g. by subclassing or delegating to
    # tether.control.ledger); each must stay decorated with @handle_errors.

    @handle_errors
    async def IssueCredential(
        self, request: pb.IssueCredentialRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IssueCredentialResponse:
        task_id = check_id("task_id", request.task_id)
        token = check_token("fencing_token", request.fencing_token)
        name = check_id("name", request.name)
        tool = check_id("tool", request.tool)
        node_id = check_id("node_id", request.node_id)
        await self._node(context, node_id)
        async with self._holder_only(task_id, token, node_id):
            value, expires = await self.service.issue_credential(
                task_id=task_id, fencing_token=token, node_id=node_id, name=name, tool=tool
            )
        return pb.IssueCredentialResponse(value=value, expires_unix_ms=expires)

    @handle_errors
    async def ReserveBudget(
        self, request: pb.ReserveBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReserveBudgetResponse:
        task_id = check_id("task_id", request.task_id)
        token = check_token("fencing_token", request.fencing_token)
        reservation_id = check_key("reservation_id", request.reservation_id)
        amount = check_micros("amount_micros", request.amount_micros, positive=True)
        node_id = check_id("node_id", request.node_id)
        await self._node(context, node_id)
        async with self._holder_only(task_id, token, node_id):
            state = await self.service.reserve_budget(
                task_id=task_id,
                fencing_token=token,
                node_id=node_id,
                reservation_id=reservation_id,
                amount_micros=amount,
            )
        return pb.ReserveBudgetResponse(remaining_micros=state.remaining_micros)

    @handle_errors
    async def SettleBudget(
        self, request: pb.SettleBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SettleBudgetResponse:
        task_id = check_id("task_id", request.task_id)
        token = check_token("fencing_token", request.fencing_token)
        reservation_id = check_key("reservation_id", request.reservation_id)
        actual = check_micros("actual_micros", request.actual_micros)
        node_id = check_id("node_id", request.node_id)
        await self._node(context, node_id)
        async with self._holder_only(task_id, token, node_id):
            state = await self.service.settle_budget(
                task_id=task_id,
                fencing_token=token,
                node_id=node_id,
                reservation_id=reservation_id,
                actual_micros=actual,
            )
        return pb.SettleBudgetResponse(remaining_micros=state.remaining_micros)

    @handle_errors
    async def RecordToolCall(
        self, request: pb.RecordToolCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecordToolCallResponse:
        write = _check_tool_call(request)
        await self._node(context, write.node_id)
        async with self._holder_only(write.task_id, write.fencing_token, write.node_id):
            record, existed = await self.service.record_tool_call(write)
        return pb.RecordToolCallResponse(record=tool_call_to_proto(record), existed=existed)

    @handle_errors
    async def StartToolCalls(
        self, request: pb.StartToolCallsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartToolCallsResponse:
        node_id = check_id("node_id", request.node_id)
        if not 1 <= len(request.calls) <= MAX_STARTS_PER_CALL:
            raise InvalidArgument(
                "calls", f"has {len(request.calls)} records; 1 to {MAX_STARTS_PER_CALL} allowed"
            )
        # Each record is checked on its own and a bad one refused in its place, as
        # RecordToolCall would refuse it alone: the records come from different agents,
        # and one agent's malformed key must not refuse the others' calls.
        checked: list[ToolCallWrite | TetherError] = []
        first: dict[tuple[str, str], int] = {}
        for i, call in enumerate(request.calls):
            try:
                write = _check_tool_call(call)
                if write.phase is not ToolCallPhase.STARTED:
                    raise InvalidArgument("phase", "must be STARTED")
                if write.node_id != node_id:
                    raise InvalidArgument("node_id", "must equal the request's node_id")
                slot = (write.task_id, write.idempotency_key)
                if slot in first:
                    raise InvalidArgument("idempotency_key", f"repeats calls[{first[slot]}]")
            except InvalidArgument as err:
                checked.append(err)
                continue
            first[slot] = i
            checked.append(write)
        await self._node(context, node_id)
        writes = [w for w in checked if isinstance(w, ToolCallWrite)]
        recorded = iter(await self.service.start_tool_calls(writes) if writes else [])
        answer = pb.StartToolCallsResponse()
        for item in checked:
            outcome = item if isinstance(item, TetherError) else next(recorded)
            if isinstance(outcome, TetherError):
                if isinstance(item, ToolCallWrite):  # a lease refusal says nothing to others
                    outcome = await self._as_seen_by(
                        outcome, item.task_id, item.fencing_token, node_id
                    )
                answer.results.add(
                    refused=pb.ToolCallRefusal(
                        code=code_for(outcome).value[0],
                        message=outcome.message,
                        reason=outcome.reason,
                        metadata=outcome.metadata,
                    )
                )
            else:
                record, existed = outcome
                answer.results.add(
                    recorded=pb.RecordToolCallResponse(
                        record=tool_call_to_proto(record), existed=existed
                    )
                )
        return answer

    @handle_errors
    async def LookupToolCall(
        self, request: pb.LookupToolCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LookupToolCallResponse:
        task_id = check_id("task_id", request.task_id)
        key = check_idempotency_key("idempotency_key", request.idempotency_key)
        node_id = self.service.caller_node()
        await self.service.check_node(node_id)
        await self.service.check_holds(task_id, node_id)
        record = await self.service.lookup_tool_call(task_id, key)
        if record is None:
            return pb.LookupToolCallResponse(found=False)
        return pb.LookupToolCallResponse(found=True, record=tool_call_to_proto(record))

    # -- receipt ledger (tether.control.ledger) ---------------------------------------

    def close_ledger(self) -> None:
        """Stops the ledger's signature-checking processes, if the ledger was opened."""
        ledger: Ledger | None = getattr(self, "_ledger_obj", None)
        if ledger is not None:
            ledger.close()

    async def get_ledger(self) -> Ledger:
        """The ledger (for the server's checkpointer)."""
        return await self._ledger()

    async def _ledger(self) -> Ledger:
        """The ledger over the service's store, opened on first use."""
        ledger: Ledger | None = getattr(self, "_ledger_obj", None)
        if ledger is not None:
            return ledger
        lock = self.__dict__.setdefault("_ledger_lock", asyncio.Lock())
        async with lock:  # two first callers must not open two ledgers (two trees)
            ledger = getattr(self, "_ledger_obj", None)
            if ledger is None:
                ledger = Ledger(
                    self.service.store,
                    self.service.key,
                    self.service.clock,
                    origin=self.service.log_origin,
                )
                await ledger.open()
                self._ledger_obj = ledger
        return ledger

    @handle_errors
    async def StreamReceipts(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.StreamReceiptsResponse]:
        ledger = await self._ledger()

        async def batches() -> AsyncIterator[tuple[str, list[tuple[int, bytes]], dict[int, bytes]]]:
            node_id = ""
            async for request in request_iterator:
                if not node_id:
                    node_id = check_id("node_id", request.node_id)
                    await self._node(context, node_id)
                elif request.node_id != node_id:
                    raise InvalidArgument("node_id", "must not change within one stream")
                batch = [
                    (check_uint("receipts.seq", r.seq), bytes(r.envelope)) for r in request.receipts
                ]
                # Outcomes of keyed tool calls riding with their receipts.
                results = {
                    int(r.seq): check_bytes("receipts.tool_call_result", r.tool_call_result)
                    for r in request.receipts
                    if r.tool_call_result
                }
                yield node_id, batch, results

        # Pipelined: the next batch's signatures are checked while this one commits.
        async for acked, index in ledger.ingest_stream(batches()):
            yield pb.StreamReceiptsResponse(acked_seq=acked, ledger_index=index)

    @handle_errors
    async def GetCheckpoint(self, request: Any, context: Any) -> Any:
        cp = await (await self._ledger()).checkpoint(fresh=request.fresh)
        return pb.GetCheckpointResponse(checkpoint=bundle_to_proto_checkpoint(cp))

    @handle_errors
    async def GetInclusionProof(self, request: Any, context: Any) -> Any:
        leaf_index = check_uint("leaf_index", request.leaf_index)
        tree_size = check_uint("tree_size", request.tree_size)
        ledger = await self._ledger()
        size, hashes = await ledger.inclusion_proof(leaf_index, tree_size)
        return pb.GetInclusionProofResponse(
            proof=receipt_pb2.InclusionProof(leaf_index=leaf_index, tree_size=size, hashes=hashes)
        )

    @handle_errors
    async def GetConsistencyProof(self, request: Any, context: Any) -> Any:
        first = check_uint("first_size", request.first_size)
        second = check_uint("second_size", request.second_size)
        ledger = await self._ledger()
        hashes = await ledger.consistency_proof(first, second)
        return pb.GetConsistencyProofResponse(hashes=hashes)

    def _export_selection(self, request: Any) -> tuple[list[str], int, int]:
        """(task ids, since, previous tree size) of an export request, validated."""
        if len(request.task_ids) > MAX_EXPORT_TASKS:
            raise InvalidArgument(
                "task_ids", f"names {len(request.task_ids)} tasks; the limit is {MAX_EXPORT_TASKS}"
            )
        task_ids = [check_id("task_ids", t) for t in request.task_ids]
        since = check_uint("since_unix_ms", request.since_unix_ms)
        previous = check_uint("previous_tree_size", request.previous_tree_size)
        return task_ids, since, previous

    @handle_errors
    async def ExportBundle(self, request: Any, context: Any) -> Any:
        task_ids, since, previous = self._export_selection(request)
        bundle = await (await self._ledger()).export(task_ids, since, previous)
        return pb.ExportBundleResponse(bundle=bundle_to_proto(bundle))

    @handle_errors
    async def StreamExportBundle(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.StreamExportBundleResponse]:
        task_ids, since, previous = self._export_selection(request)
        ledger = await self._ledger()
        async for part in ledger.export_stream(task_ids, since, previous):
            if part.entries:
                yield pb.StreamExportBundleResponse(entries=entries_to_proto(part.entries))
            elif part.node_certificates:
                yield pb.StreamExportBundleResponse(
                    node_certificates=[to_proto(e) for e in part.node_certificates]
                )
            elif part.leases:
                yield pb.StreamExportBundleResponse(leases=[to_proto(e) for e in part.leases])
            elif part.trailer is not None:
                yield pb.StreamExportBundleResponse(trailer=bundle_to_proto(part.trailer))

    @handle_errors
    async def PutPolicy(
        self, request: pb.PutPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PutPolicyResponse:
        document = check_text("document", request.document, MAX_PAYLOAD_BYTES)
        if not document.strip():
            raise InvalidArgument("document", "is required")
        try:
            rec = await self.service.put_policy(document)
        except ConfigError as err:
            raise InvalidArgument("document", err.message) from err
        return pb.PutPolicyResponse(version=rec.version, digest=rec.digest)

    @handle_errors
    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetPolicyResponse:
        principal = current_principal()
        if principal.is_node:
            task_id = check_id("task_id", request.task_id)
            token = check_token("fencing_token", request.fencing_token)
            await self.service.check_node(principal.name)
            rec = await self.service.lease_policy_record(task_id, token, principal.name)
        else:
            rec = await self.service.get_policy(check_uint("version", request.version))
        return pb.GetPolicyResponse(document=rec.document, version=rec.version, digest=rec.digest)

    @handle_errors
    async def PutSecret(
        self, request: pb.PutSecretRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PutSecretResponse:
        name = check_id("name", request.name)
        if not request.value:
            raise InvalidArgument("value", "is required (1 byte to 64 KiB)")
        if len(request.value) > MAX_SECRET_BYTES:
            # The length only: a secret never appears in an error.
            raise InvalidArgument(
                "value", f"is {len(request.value)} bytes; the limit is {MAX_SECRET_BYTES}"
            )
        version = await self.service.put_secret(name, bytes(request.value))
        return pb.PutSecretResponse(version=version)

    @handle_errors
    async def ListSecrets(
        self, request: pb.ListSecretsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSecretsResponse:
        return pb.ListSecretsResponse(secrets=secret_infos(await self.service.list_secrets()))


def secret_infos(versions: Sequence[SecretVersionInfo]) -> list[pb.SecretInfo]:
    """One SecretInfo per name from its stored versions (ordered by name, then version)."""
    out: dict[str, pb.SecretInfo] = {}
    for v in versions:
        info = out.setdefault(v.name, pb.SecretInfo(name=v.name))
        info.versions += 1
        info.versions_by_kek[v.kek_id] = info.versions_by_kek.get(v.kek_id, 0) + 1
        if v.version >= info.latest_version:
            info.latest_version = v.version
            info.kek_id = v.kek_id
            info.updated_unix_ms = v.created_unix_ms
    return [out[name] for name in sorted(out)]
