"""The sidecar's only way to the control plane: ControlService calls with retries.

Outage behaviour (documented, not accidental):

* Every call retries on UNAVAILABLE (and on a lost deadline for calls that are
  safe to repeat) with exponential backoff and full jitter, within a bounded
  retry budget (`uplink_retry_budget_ms`). When the budget is spent the caller
  gets `Unavailable` whose message says to retry and whose metadata carries
  `retry_after_ms`; agents see it as gRPC UNAVAILABLE with that ErrorInfo, never
  a hang.
* While the control plane is known to be down, each call makes one quick
  attempt instead of spending its whole budget, so new claims are refused at
  once with UNAVAILABLE.
* The node token is kept in memory and sent as "x-tether-node-token" on every
  node call; if the control plane no longer knows it (UNAUTHENTICATED after a
  restart that lost it), the node registers again once and repeats the call.
* Calls under a lease the sidecar still holds keep working locally until that
  lease's expiry (never past it); that rule lives in `tether.sidecar.leases`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from tether.core import errors as E
from tether.crypto.envelopes import from_proto
from tether.crypto.signing import Envelope, SigningKey, VerifyKey
from tether.grpcutil.status import from_rpc_error
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc

NODE_TOKEN_HEADER = "x-tether-node-token"
log = logging.getLogger("tether.sidecar.uplink")

T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
_RETRYABLE_IF_SAFE = {grpc.StatusCode.DEADLINE_EXCEEDED}

CHANNEL_OPTIONS = [
    # Reconnect quickly after a control-plane restart instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


@dataclass(frozen=True)
class Registration:
    """What RegisterNode gave this node."""

    node_token: str
    certificate: Envelope
    control_key: VerifyKey


class Uplink:
    """ControlService client for one node: auth metadata, retries, outage state."""

    def __init__(
        self,
        address: str,
        node_id: str,
        node_key: SigningKey,
        *,
        enrollment_token: str = "",
        retry_budget_ms: int = 3_000,
        timeout_ms: int = 5_000,
    ) -> None:
        self.address = address
        self.node_id = node_id
        self._node_key = node_key
        self._enrollment_token = enrollment_token
        self.retry_budget_ms = retry_budget_ms
        self.timeout_ms = timeout_ms
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.ControlServiceStub(self._channel)
        self.registration: Registration | None = None
        self._down_since: float | None = None
        self._register_lock = asyncio.Lock()

    @property
    def reachable(self) -> bool:
        """False since the last call that found the control plane unreachable."""
        return self._down_since is None

    async def close(self) -> None:
        await self._channel.close()

    async def register(self) -> Registration:
        """Enrols the node key and keeps the node token and certificate.

        Raises:
            Unauthenticated: the control plane refuses this node.
            Unavailable: the control plane could not be reached in time.
        """
        request = pb.RegisterNodeRequest(
            node_id=self.node_id,
            public_key=self._node_key.public.raw,
            enrollment_token=self._enrollment_token,
        )
        response: pb.RegisterNodeResponse = await self._call(
            "RegisterNode",
            lambda md, t: self.stub.RegisterNode(request, timeout=t),
            authed=False,
        )
        try:
            control_key = VerifyKey.from_raw(bytes(response.control_public_key))
        except E.VerificationError as err:
            raise E.Unauthenticated(f"control plane sent a bad public key: {err}") from err
        self.registration = Registration(
            node_token=response.node_token,
            certificate=from_proto(response.certificate),
            control_key=control_key,
        )
        return self.registration

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.registration is None:
            return ()
        return ((NODE_TOKEN_HEADER, self.registration.node_token),)

    async def call(
        self,
        name: str,
        request: Any,
        *,
        safe_to_repeat: bool = True,
        extra_timeout_ms: int = 0,
        retry_budget_ms: int | None = None,
    ) -> Any:
        """Calls ControlService.`name` as this node, with retries.

        Raises:
            TetherError: the control plane's refusal, mapped back to its class.
            Unavailable: unreachable within the retry budget (carries retry_after_ms).
        """
        method = getattr(self.stub, name)

        def attempt(md: tuple[tuple[str, str], ...], timeout: float) -> Awaitable[Any]:
            return method(request, metadata=md, timeout=timeout)  # type: ignore[no-any-return]

        return await self._call(
            name,
            attempt,
            safe_to_repeat=safe_to_repeat,
            extra_timeout_ms=extra_timeout_ms,
            retry_budget_ms=retry_budget_ms,
        )

    async def _call(
        self,
        name: str,
        attempt: Callable[[tuple[tuple[str, str], ...], float], Awaitable[T]],
        *,
        authed: bool = True,
        safe_to_repeat: bool = True,
        extra_timeout_ms: int = 0,
        retry_budget_ms: int | None = None,
    ) -> T:
        budget_ms = self.retry_budget_ms if retry_budget_ms is None else retry_budget_ms
        if self._down_since is not None:
            budget_ms = 0  # known down: one quick attempt, then tell the caller to retry
        deadline = time.monotonic() + budget_ms / 1000
        delay = 0.05
        reregistered = False
        timeout = (self.timeout_ms + extra_timeout_ms) / 1000
        while True:
            try:
                result = await attempt(self._metadata() if authed else (), timeout)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
                retryable = code in _RETRYABLE or (safe_to_repeat and code in _RETRYABLE_IF_SAFE)
                if code == grpc.StatusCode.UNAUTHENTICATED and authed and not reregistered:
                    reregistered = True
                    log.warning("control plane does not know our node token; registering again")
                    await self._reregister()
                    continue
                if not retryable:
                    self._mark_up()
                    raise from_rpc_error(err) from err
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._mark_down(name)
                    retry_ms = 1000
                    raise E.Unavailable(
                        f"control plane unreachable ({name}); retry in {retry_ms} ms",
                        metadata={"retry_after_ms": str(retry_ms)},
                    ) from err
                await asyncio.sleep(min(remaining, random.uniform(0, delay)))
                delay = min(delay * 2, 1.0)
                continue
            self._mark_up()
            return result

    async def _reregister(self) -> None:
        async with self._register_lock:
            old = self.registration
            await self.register()
            new = self.registration
            if old is not None and new is not None and old.control_key.raw != new.control_key.raw:
                raise E.Unauthenticated("control plane key changed on re-registration")

    def _mark_down(self, name: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("control plane unreachable (during %s); refusing new claims", name)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.info(
                "control plane reachable again after %.1f s", time.monotonic() - self._down_since
            )
            self._down_since = None

    # -- mediation calls (tool calls: credentials, budgets, idempotency records) ----------

    async def issue_credential(
        self, *, task_id: str, fencing_token: int, name: str, tool: str
    ) -> pb.IssueCredentialResponse:
        """Asks for credential `name` for `tool` under a live lease (memory use only).

        Raises:
            PolicyDenied: the lease's policy does not grant it.
            NotFound: no secret is stored under `name`.
            StaleFencingToken, LeaseExpired: the lease is no longer live.
            Unavailable: unreachable within the retry budget.
        """
        response: pb.IssueCredentialResponse = await self.call(
            "IssueCredential",
            pb.IssueCredentialRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                name=name,
                tool=tool,
                node_id=self.node_id,
            ),
        )
        return response

    async def reserve_budget(
        self, *, task_id: str, fencing_token: int, reservation_id: str, amount_micros: int
    ) -> int:
        """Reserves `amount_micros` atomically; returns the budget left.

        Safe to repeat: the reservation id makes a retried reservation count once.

        Raises:
            BudgetExhausted: the task's limit does not cover it.
            StaleFencingToken, LeaseExpired: the lease is no longer live.
            Unavailable: unreachable within the retry budget.
        """
        response: pb.ReserveBudgetResponse = await self.call(
            "ReserveBudget",
            pb.ReserveBudgetRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                reservation_id=reservation_id,
                amount_micros=amount_micros,
                node_id=self.node_id,
            ),
        )
        return int(response.remaining_micros)

    async def settle_budget(
        self, *, task_id: str, fencing_token: int, reservation_id: str, actual_micros: int
    ) -> int:
        """Settles a reservation with the actual cost; returns the budget left."""
        response: pb.SettleBudgetResponse = await self.call(
            "SettleBudget",
            pb.SettleBudgetRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                reservation_id=reservation_id,
                actual_micros=actual_micros,
                node_id=self.node_id,
            ),
        )
        return int(response.remaining_micros)

    async def lookup_tool_call(
        self, task_id: str, idempotency_key: str
    ) -> pb.ToolCallRecord | None:
        """The recorded (task, key) outcome or STARTED marker, if any."""
        response: pb.LookupToolCallResponse = await self.call(
            "LookupToolCall",
            pb.LookupToolCallRequest(task_id=task_id, idempotency_key=idempotency_key),
        )
        return response.record if response.found else None

    async def start_tool_call(
        self,
        *,
        task_id: str,
        fencing_token: int,
        idempotency_key: str,
        tool: str,
        arguments_sha256: str,
    ) -> tuple[pb.ToolCallRecord, bool, bool]:
        """Records STARTED: (the record now, whether one existed, whether the request was resent).

        A resent request may find the record its own first attempt wrote, so
        `existed` after a resend is ambiguous; the caller resolves it.
        """
        request = pb.RecordToolCallRequest(
            task_id=task_id,
            fencing_token=fencing_token,
            idempotency_key=idempotency_key,
            tool=tool,
            arguments_sha256=arguments_sha256,
            phase=pb.TOOL_CALL_PHASE_STARTED,
            node_id=self.node_id,
        )
        attempts = 0

        def attempt(md: tuple[tuple[str, str], ...], timeout: float) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return self.stub.RecordToolCall(request, metadata=md, timeout=timeout)

        response: pb.RecordToolCallResponse = await self._call("RecordToolCall", attempt)
        return response.record, response.existed, attempts > 1

    async def record_tool_call(
        self,
        *,
        task_id: str,
        fencing_token: int,
        idempotency_key: str,
        tool: str,
        arguments_sha256: str,
        phase: int,
        result: bytes = b"",
        status: str = "",
        cost_micros: int = 0,
    ) -> tuple[pb.ToolCallRecord, bool]:
        """Records STARTED or COMPLETED; returns (the record now, whether one existed)."""
        response: pb.RecordToolCallResponse = await self.call(
            "RecordToolCall",
            pb.RecordToolCallRequest(
                task_id=task_id,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                tool=tool,
                arguments_sha256=arguments_sha256,
                phase=phase,  # type: ignore[arg-type]
                result=result,
                status=status,
                node_id=self.node_id,
                cost_micros=cost_micros,
            ),
        )
        return response.record, response.existed
