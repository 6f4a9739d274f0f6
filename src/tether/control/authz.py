"""Who may call which ControlService RPC: the one authorization table and its interceptor.

Every call is authorized here, before any servicer code runs, from the
verified TLS peer certificate alone (no bearer tokens, so replicas share no
cache). An RPC missing from `RULES` is refused: reject by default. Servicers
read the caller with `current_principal()` for the checks that need request
fields (a node may act only as itself, and only on tasks it holds).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tether.core.errors import (
    Forbidden,
    TetherError,
    Unauthenticated,
    VerificationError,
)
from tether.crypto.pki import Identity, Role, identity_from_pem
from tether.grpcutil.guard import guard_handler
from tether.grpcutil.status import abort as abort_with
from tether.metrics import AUTH_REFUSALS
from tether.store.common import task_not_found

log = logging.getLogger("tether.control.authz")

ANONYMOUS = "anonymous"
NODE = "node"
ADMIN = Role.ADMIN.value
SUBMITTER = Role.SUBMITTER.value
AUDITOR = Role.AUDITOR.value
_NODE_RPCS = (
    "AcquireLease",
    "RenewLease",
    "TransitionTask",
    "CompleteTasks",
    "StreamLeases",
    "IssueCredential",
    "ReserveBudget",
    "SettleBudget",
    "RecordToolCall",
    "StartToolCalls",
    "LookupToolCall",
    "StreamReceipts",
)

RULES: dict[str, frozenset[str]] = {
    # Enrolment: anyone may ask; the proof of possession and join token decide.
    "GetEnrollmentChallenge": frozenset({ANONYMOUS, NODE}),
    "RegisterNode": frozenset({ANONYMOUS, NODE}),
    # Operators.
    "SubmitTask": frozenset({ADMIN, SUBMITTER}),
    "CancelTask": frozenset({ADMIN, SUBMITTER}),
    "GetTask": frozenset({ADMIN, SUBMITTER, AUDITOR}),
    "ListTasks": frozenset({ADMIN, AUDITOR}),
    "GetCheckpoint": frozenset({ADMIN, AUDITOR}),
    "GetInclusionProof": frozenset({ADMIN, AUDITOR}),
    "GetConsistencyProof": frozenset({ADMIN, AUDITOR}),
    "ExportBundle": frozenset({ADMIN, AUDITOR}),
    "StreamExportBundle": frozenset({ADMIN, AUDITOR}),
    "PutPolicy": frozenset({ADMIN}),
    "PutSecret": frozenset({ADMIN}),
    "ListSecrets": frozenset({ADMIN, AUDITOR}),  # names and versions, never a value
    "CreateJoinToken": frozenset({ADMIN}),
    "RekeyNode": frozenset({ADMIN}),
    "RevokeNode": frozenset({ADMIN}),
    "ListNodes": frozenset({ADMIN, AUDITOR}),
    # A node reads only the policy of a lease it holds (checked in the servicer).
    "GetPolicy": frozenset({ADMIN, AUDITOR, NODE}),
    **{rpc: frozenset({NODE}) for rpc in _NODE_RPCS},
}
"""RPC name -> the principals allowed to call it.

The operator console (`tether.control.console`) reads the same table: each page
is authorized as the RPC whose data it shows (the tasks list as ListTasks, a
task's timeline as GetTask, "verify" as StreamExportBundle, cancel as
CancelTask, nodes as ListNodes, the ledger as GetCheckpoint)."""

PAYLOAD_READERS: frozenset[str] = frozenset({ADMIN, SUBMITTER})
"""Who sees a task's payload and result where GetTask shows a task (the gRPC
API and the console alike); an auditor sees the evidence (receipts, digests,
leases) but not what was submitted or returned. Secret values are readable by
no one (PutSecret is write-only)."""


def sees_payloads(principal: Principal) -> bool:
    """True when `principal` may read task payloads and results (`PAYLOAD_READERS`)."""
    return principal.insecure or principal.kind in PAYLOAD_READERS


OWN_TASKS_ONLY: frozenset[str] = frozenset({SUBMITTER})
"""Roles that may GetTask or CancelTask only the tasks they submitted (the
gRPC API and the console alike). Another operator's task is answered exactly
as a task that does not exist (NOT_FOUND), so its existence does not leak.
Tasks from before migration 0011 record no submitter: only an admin (or an
auditor, read-only and without payloads) reaches them. ListTasks is not open to
these roles (`RULES`)."""


def principal_tag(principal: Principal) -> str:
    """ "ROLE:NAME": how a task records who submitted it (as load shedding names callers)."""
    return f"{principal.kind}:{principal.name}"


def may_access_task(principal: Principal, submitted_by: str) -> bool:
    """True when `principal` may read or cancel a task submitted by `submitted_by`."""
    if principal.insecure or principal.kind not in OWN_TASKS_ONLY:
        return True
    return bool(submitted_by) and submitted_by == principal_tag(principal)


def check_task_access(principal: Principal, task_id: str, submitted_by: str) -> None:
    """Refuses another operator's task as if it did not exist (`OWN_TASKS_ONLY`).

    Raises:
        NotFound: `principal` may not reach the task (the store's own wording).
    """
    if not may_access_task(principal, submitted_by):
        refuse(
            "task",
            "not_owner",
            f"{principal_tag(principal)} asked for another operator's task",
            task_id=task_id,
        )
        raise task_not_found(task_id)


OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Health (for probes) and reflection (schema only) need no identity."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one RPC."""

    kind: str  # ANONYMOUS, NODE, or an operator role
    name: str = ""
    identity: Identity | None = None
    insecure: bool = False  # --insecure-plaintext: no identities at all

    @property
    def is_node(self) -> bool:
        return self.kind == NODE


_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("tether_principal")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by `AuthzInterceptor`).

    Raises:
        Unauthenticated: called outside an authorized RPC.
    """
    try:
        return _PRINCIPAL.get()
    except LookupError:
        raise Unauthenticated("no authenticated caller for this call") from None


def refuse(kind: str, reason: str, message: str, **fields: Any) -> None:
    """Logs (JSON, with the reason) and counts one refusal."""
    AUTH_REFUSALS.labels(kind=kind, reason=reason).inc()
    log.warning(message, extra={"refusal": kind, "reason": reason, **fields})


def principal_of(context: Any, trust_domain: str, insecure: bool) -> Principal:
    """The caller named by the verified peer certificate, or ANONYMOUS.

    Raises:
        Unauthenticated: a certificate that names no identity of this trust domain.
    """
    if insecure:
        return Principal(ADMIN, "insecure-plaintext", insecure=True)
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return Principal(ANONYMOUS)
    principal = principal_from_pem(bytes(pems[0]), trust_domain)
    check_unexpired(principal)
    return principal


def check_unexpired(principal: Principal) -> None:
    """Refuses a caller whose certificate has expired (wall clock, as X.509 validity is).

    The TLS handshake checks validity once per connection, and a connection (and a
    stream on it) may outlive the certificate by hours: without this, a short-lived
    certificate would stay good for as long as its holder kept one connection open.

    Raises:
        Unauthenticated: the certificate expired.
    """
    ident = principal.identity
    if ident is not None and 0 < ident.not_after_unix_ms <= time.time() * 1000:
        raise Unauthenticated(
            f"client certificate of {ident.spiffe_id} expired at {ident.not_after_unix_ms} "
            "(unix ms); renew it and connect again"
        )


def principal_from_pem(pem: bytes, trust_domain: str) -> Principal:
    """The caller named by a verified client certificate (gRPC and the console).

    Raises:
        Unauthenticated: a certificate that names no identity of this trust domain.
    """
    try:
        ident = identity_from_pem(pem, trust_domain)
    except VerificationError as err:
        raise Unauthenticated(f"client certificate refused: {err.message}") from err
    if ident.kind == "node":
        return Principal(NODE, ident.name, ident)
    assert ident.role is not None
    return Principal(ident.role.value, ident.name, ident)


class CallerNames:
    """Names the caller of a call for load shedding (`tether.grpcutil.limits`).

    The same identity authorization uses: "node:ID", "ROLE:NAME" for an
    operator, "anonymous" without a certificate (enrolment). Certificates are
    parsed once each (a bounded cache keyed by the verified certificate's bytes).
    """

    MAX_CACHED = 4096

    def __init__(self, trust_domain: str, *, insecure: bool) -> None:
        self._domain = trust_domain
        self._insecure = insecure
        self._names: dict[bytes, str] = {}

    def __call__(self, context: Any) -> str:
        """The caller's name.

        Raises:
            Unauthenticated: a certificate naming no identity of this trust domain.
        """
        if self._insecure:
            return "insecure-plaintext"
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return ANONYMOUS
        pem = bytes(pems[0])
        name = self._names.get(pem)
        if name is None:
            principal = principal_of(context, self._domain, self._insecure)
            name = f"{principal.kind}:{principal.name}"
            if len(self._names) >= self.MAX_CACHED:
                self._names.clear()
            self._names[pem] = name
        return name


def authorize(rpc: str, principal: Principal) -> None:
    """Checks the table.

    Raises:
        Unauthenticated: an anonymous caller where an identity is needed.
        Forbidden: the caller's kind or role may not call `rpc`.
    """
    if principal.insecure:
        return
    allowed = RULES.get(rpc)
    if allowed is None:
        raise Forbidden(f"{rpc} is not an RPC this control plane serves to anyone")
    if principal.kind in allowed:
        return
    if principal.kind == ANONYMOUS:
        raise Unauthenticated(
            f"{rpc} needs a client certificate of this trust domain (an operator's from "
            "`tether operators add`, or a node's from enrolment)"
        )
    who = (
        f"node {principal.name!r}" if principal.is_node else f"{principal.kind} {principal.name!r}"
    )
    need = ", ".join(sorted(allowed - {ANONYMOUS}))
    raise Forbidden(f"{who} may not call {rpc} (allowed: {need})")


class AuthzInterceptor(grpc.aio.ServerInterceptor):
    """Authorizes every ControlService call before its handler runs."""

    def __init__(self, service_prefix: str, trust_domain: str, *, insecure: bool) -> None:
        self._prefix = service_prefix
        self._domain = trust_domain
        self._insecure = insecure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        rpc = method.rsplit("/", 1)[-1] if method.startswith(self._prefix) else method
        return self._wrap(handler, rpc)

    def _check(self, rpc: str, context: Any) -> Principal:
        try:
            principal = principal_of(context, self._domain, self._insecure)
            authorize(rpc, principal)
        except TetherError as err:
            peer = context.peer() if hasattr(context, "peer") else ""
            refuse("caller", err.reason, f"refused {rpc}: {err.message}", rpc=rpc, peer=peer)
            raise
        _PRINCIPAL.set(principal)
        return principal

    def _wrap(self, handler: Any, rpc: str) -> Any:
        # Undecodable requests reach the behavior as UNDECODABLE (INVALID_ARGUMENT once
        # the caller is authorized), never as a grpcio UNKNOWN/INTERNAL with a traceback.
        handler = guard_handler(handler)
        check = self._check
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    check(rpc, context)
                except TetherError as err:
                    await abort_with(context, err)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    check(rpc, context)
                except TetherError as err:
                    await abort_with(context, err)
                async for item in inner_ss(request_iterator, context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    check(rpc, context)
                except TetherError as err:
                    await abort_with(context, err)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            # ControlService has no such RPCs; refuse rather than pass unchecked.
            async def refused(request: Any, context: Any) -> Any:
                await abort_with(context, Forbidden(f"{rpc} has no authorization rule"))

            return grpc.unary_unary_rpc_method_handler(
                refused,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
