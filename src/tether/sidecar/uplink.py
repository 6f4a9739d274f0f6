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
* The node's identity is an mTLS client certificate from enrolment (its key
  and certificate live in memory only). The node enrols on the control plane's
  enrolment address (TLS, no client certificate) by proving possession of its
  Ed25519 key, then calls over mTLS; it renews the certificate at two thirds of
  its lifetime on a fresh channel, while calls and receipt streams already open
  on the old channel finish there. If a call is refused as UNAUTHENTICATED the
  node enrols again once and repeats the call.
* Calls under a lease the sidecar still holds keep working locally until that
  lease's expiry (never past it); that rule lives in `tether.sidecar.leases`.
* Several replicas (`--control a,b,c`): every replica serves the same state, so
  the node's certificate (issued by the shared CA) works on all of them. When a
  call finds its replica unreachable (UNAVAILABLE, or a lost deadline: a paused
  replica answers nothing), the uplink asks the others' health service (on
  their enrolment addresses, which need no client certificate) in order and
  moves to the first SERVING one, then repeats the call there if it is safe to
  repeat. Leases held and spooled receipts are not tied to a replica: renewals
  and the receipt stream simply continue on the new one. The control plane
  counts as down only when no replica answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.control.client import enroll, node_client_tls
from tether.core import errors as E
from tether.crypto.envelopes import from_proto
from tether.crypto.pki import generate_tls_key
from tether.crypto.signing import Envelope, SigningKey, VerifyKey
from tether.grpcutil.status import error_of, from_rpc_error, status_code
from tether.grpcutil.tls import ClientTLS, open_channel
from tether.v1 import control_pb2 as pb
from tether.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger("tether.sidecar.uplink")

T = TypeVar("T")
MAX_STARTS_PER_CALL = 256  # STARTED records in one StartToolCalls (the control plane's limit)
STARTS_IN_FLIGHT = 2  # STARTED requests on the wire at once; calls arriving meanwhile batch up

_Started = tuple[pb.RecordToolCallResponse, bool]  # (the answer, whether it was resent)


class _Unimplemented(Exception):
    """The control plane predates StartToolCalls (records are then sent one by one)."""


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

    certificate: Envelope
    control_key: VerifyKey
    tls_expires_unix_ms: int
    spiffe_id: str


HEALTH_PROBE_TIMEOUT_S = 1.0


class Uplink:
    """ControlService client for one node: auth metadata, retries, failover, outage state."""

    def __init__(
        self,
        address: str | tuple[str, ...],
        node_id: str,
        node_key: SigningKey,
        *,
        enroll_address: str | tuple[str, ...],
        ca_pem: bytes,
        enrollment_token: str = "",
        retry_budget_ms: int = 3_000,
        timeout_ms: int = 5_000,
    ) -> None:
        """`address`/`enroll_address`: one replica, or several (same order) to fail over."""
        self.addresses = (address,) if isinstance(address, str) else tuple(address)
        enrolls = (enroll_address,) if isinstance(enroll_address, str) else tuple(enroll_address)
        if not self.addresses or len(enrolls) != len(self.addresses):
            raise E.ConfigError("one enrolment address per control-plane address is needed")
        self.enroll_addresses = enrolls
        self._index = 0
        self.generation = 0
        """Counts moves to another replica (callers that saw an older one retry)."""
        self.failovers = 0
        self._failover_lock = asyncio.Lock()
        self.address = self.addresses[0]
        self.enroll_address = enrolls[0]
        self.node_id = node_id
        self._node_key = node_key
        self._enrollment_token = enrollment_token
        self._ca_pem = ca_pem
        self.retry_budget_ms = retry_budget_ms
        self.timeout_ms = timeout_ms
        self._enroll_channels = [
            open_channel(a, ClientTLS(ca_pem), CHANNEL_OPTIONS) for a in enrolls
        ]
        self._enroll_channel = self._enroll_channels[0]
        self._enroll_stub = pb_grpc.ControlServiceStub(self._enroll_channel)
        self._tls: ClientTLS | None = None
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[tuple[float, grpc.aio.Channel]] = []
        self.stub: pb_grpc.ControlServiceAsyncStub = self._enroll_stub  # until enrolled
        self.registration: Registration | None = None
        self._down_since: float | None = None
        self._register_lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        # STARTED records waiting for a free request (see `start_tool_call`).
        self._starts: list[tuple[pb.RecordToolCallRequest, asyncio.Future[_Started]]] = []
        self._starts_in_flight = 0
        self._start_senders: set[asyncio.Task[None]] = set()
        self._batch_starts = True  # False once the control plane lacks StartToolCalls

    @property
    def reachable(self) -> bool:
        """False since the last call that found the control plane unreachable."""
        return self._down_since is None

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for _, ch in self._retired:
            await ch.close()
        if self._channel is not None:
            await self._channel.close()
        for ch in self._enroll_channels:
            await ch.close()

    async def register(self) -> Registration:
        """Enrols (or renews) the node: proof of possession, then a fresh mTLS channel.

        Raises:
            Unauthenticated / Forbidden: the control plane refuses this node.
            Unavailable: the control plane could not be reached in time.
        """
        tls_key = generate_tls_key()

        async def enrol(token: str) -> pb.RegisterNodeResponse:
            def attempt(md: tuple[tuple[str, str], ...], t: float) -> Awaitable[Any]:
                return enroll(self._enroll_stub, self.node_id, self._node_key, tls_key, token, t)

            return await self._call("RegisterNode", attempt, authed=False)

        try:
            response = await enrol(self._enrollment_token)
        except E.Unauthenticated as refused:
            if not self._enrollment_token:
                raise
            # A join token is single-use: after a restart it was spent by an earlier
            # run, and an enrolled node renews by proof of possession alone.
            try:
                response = await enrol("")
            except E.Unauthenticated:
                # Not enrolled either: the token's refusal says why.
                raise refused from refused.__cause__
        # Renewals prove possession of the enrolled key; the spent token is never resent.
        self._enrollment_token = ""
        try:
            control_key = VerifyKey.from_raw(bytes(response.control_public_key))
        except E.VerificationError as err:
            raise E.Unauthenticated(f"control plane sent a bad public key: {err}") from err
        if not response.tls_certificate_pem:
            raise E.Unauthenticated("the control plane issued no client certificate (is it TLS?)")
        self.registration = Registration(
            certificate=from_proto(response.certificate),
            control_key=control_key,
            tls_expires_unix_ms=response.tls_expires_unix_ms,
            spiffe_id=response.spiffe_id,
        )
        self._tls = node_client_tls(self._ca_pem, response, tls_key)
        await self._open_node_channel()
        log.info(
            "node certificate issued",
            extra={
                "spiffe_id": response.spiffe_id,
                "expires_unix_ms": response.tls_expires_unix_ms,
            },
        )
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="tether-cert-renewal")
        return self.registration

    async def _open_node_channel(self) -> None:
        """An mTLS channel to the current replica with the node's certificate."""
        assert self._tls is not None
        channel = open_channel(self.address, self._tls, CHANNEL_OPTIONS)
        old, self._channel = self._channel, channel
        self.stub = pb_grpc.ControlServiceStub(channel)
        now = time.monotonic()
        if old is not None:
            # Streams and calls open on the old channel finish there; close it later.
            self._retired.append((now, old))
        keep: list[tuple[float, grpc.aio.Channel]] = []
        for since, ch in self._retired:
            if now - since > 600:
                await ch.close()
            else:
                keep.append((since, ch))
        self._retired = keep

    async def healthy(self, index: int) -> bool:
        """Whether replica `index` answers its health check SERVING (within a second)."""
        stub = health_pb2_grpc.HealthStub(self._enroll_channels[index])
        check = stub.Check  # type: ignore[attr-defined]
        try:
            resp = await check(health_pb2.HealthCheckRequest(), timeout=HEALTH_PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def failover(self, seen_generation: int | None = None) -> bool:
        """Moves to the next replica that reports SERVING; True if the uplink moved.

        `seen_generation`: the generation the caller's failed attempt ran on; if
        another caller moved since, this one does not move again (True: retry).
        """
        if len(self.addresses) < 2:
            return False
        async with self._failover_lock:
            if seen_generation is not None and seen_generation != self.generation:
                return True
            n = len(self.addresses)
            candidates = [(self._index + k) % n for k in range(1, n)]
            healthy = await asyncio.gather(*(self.healthy(i) for i in candidates))
            for index, ok in zip(candidates, healthy, strict=True):
                if ok:
                    await self._switch(index)
                    return True
            return False

    async def _switch(self, index: int) -> None:
        old = self.address
        self._index = index
        self.address = self.addresses[index]
        self.enroll_address = self.enroll_addresses[index]
        self._enroll_channel = self._enroll_channels[index]
        self._enroll_stub = pb_grpc.ControlServiceStub(self._enroll_channel)
        if self._tls is not None:
            await self._open_node_channel()
        else:
            self.stub = self._enroll_stub
        self.generation += 1
        self.failovers += 1
        log.warning("control plane %s unreachable: failed over to %s", old, self.address)

    async def _renew_forever(self) -> None:
        """Renews the client certificate at two thirds of its remaining life."""
        while True:
            reg = self.registration
            left_ms = (reg.tls_expires_unix_ms if reg else 0) - int(time.time() * 1000)
            await asyncio.sleep(max(1.0, left_ms * 2 / 3 / 1000))
            try:
                async with self._register_lock:
                    await self.register()
            except E.TetherError as err:
                log.warning("certificate renewal failed (%s); retrying in 5 s", err.message)
                await asyncio.sleep(5)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

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

        def attempt(md: tuple[tuple[str, str], ...], timeout: float) -> Awaitable[Any]:
            method = getattr(self.stub, name)  # the current replica's (failover moves it)
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
        moves = 0  # replicas tried after the first, this call
        timeout = (self.timeout_ms + extra_timeout_ms) / 1000
        while True:
            generation = self.generation
            try:
                result = await attempt(self._metadata() if authed else (), timeout)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
                retryable = code in _RETRYABLE or (safe_to_repeat and code in _RETRYABLE_IF_SAFE)
                if code == grpc.StatusCode.UNAUTHENTICATED and authed and not reregistered:
                    reregistered = True
                    log.warning("control plane refused our certificate; enrolling again")
                    await self._reregister()
                    continue
                unreachable = code in _RETRYABLE or code in _RETRYABLE_IF_SAFE
                # A replica gone or paused: move on (the next calls go there too) and
                # repeat this one there if that is safe.
                if (
                    unreachable
                    and moves < len(self.addresses) - 1
                    and await self.failover(generation)
                ):
                    moves += 1
                    if retryable:
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
            await self.register()

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
        take_over: bool = False,
    ) -> tuple[pb.ToolCallRecord, bool, bool]:
        """Records STARTED: (the record now, whether one existed, whether the request was resent).

        A resent request may find the record its own first attempt wrote, so
        `existed` after a resend is ambiguous; the caller resolves it.
        `take_over`: an earlier lease's STARTED record becomes this lease's (the
        caller will run the call again; see RecordToolCallRequest.take_over).

        At most `STARTS_IN_FLIGHT` requests are on the wire at once: a call
        that finds them busy waits, and the calls that waited go together in
        one StartToolCalls (one round trip, one commit at the control plane),
        each answered (or refused) on its own. A lone call goes as it came.
        """
        request = pb.RecordToolCallRequest(
            task_id=task_id,
            fencing_token=fencing_token,
            idempotency_key=idempotency_key,
            tool=tool,
            arguments_sha256=arguments_sha256,
            phase=pb.TOOL_CALL_PHASE_STARTED,
            node_id=self.node_id,
            take_over=take_over,
        )
        if self._starts_in_flight < STARTS_IN_FLIGHT and not self._starts:
            self._starts_in_flight += 1
            try:
                response, retried = await self._start_one(request)
            finally:
                self._starts_in_flight -= 1
                self._send_waiting_starts()
        else:
            future: asyncio.Future[_Started] = asyncio.get_running_loop().create_future()
            self._starts.append((request, future))
            self._send_waiting_starts()
            response, retried = await future
        return response.record, response.existed, retried

    def _send_waiting_starts(self) -> None:
        """Starts a sender for the waiting STARTED records, if a request is free."""
        if self._starts and self._starts_in_flight < STARTS_IN_FLIGHT:
            self._starts_in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send_starts())
            self._start_senders.add(task)
            task.add_done_callback(self._start_senders.discard)

    async def _send_starts(self) -> None:
        """Sends waiting STARTED records, a batch per request, until none wait."""
        batch: list[tuple[pb.RecordToolCallRequest, asyncio.Future[_Started]]] = []
        try:
            while self._starts:
                batch = self._starts[:MAX_STARTS_PER_CALL]
                del self._starts[:MAX_STARTS_PER_CALL]
                batch = [(r, f) for r, f in batch if not f.done()]  # callers gone: skip
                if len(batch) == 1 or (batch and not self._batch_starts):
                    await asyncio.gather(*(self._answer_one(r, f) for r, f in batch))
                elif batch:
                    await self._answer_many(batch)
                batch = []
        except BaseException as err:  # cancelled (shutdown): nobody may wait forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(E.Unavailable(f"sidecar stopping: {err!r}"))
            raise
        finally:
            self._starts_in_flight -= 1

    async def _answer_one(
        self, request: pb.RecordToolCallRequest, future: asyncio.Future[_Started]
    ) -> None:
        try:
            answer = await self._start_one(request)
        except Exception as err:
            if not future.done():
                future.set_exception(err)
            return
        if not future.done():
            future.set_result(answer)

    async def _answer_many(
        self, batch: list[tuple[pb.RecordToolCallRequest, asyncio.Future[_Started]]]
    ) -> None:
        try:
            results, retried = await self._start_many([r for r, _ in batch])
        except _Unimplemented:
            log.warning("the control plane has no StartToolCalls; STARTED records go one by one")
            self._batch_starts = False
            await asyncio.gather(*(self._answer_one(r, f) for r, f in batch))
            return
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if result.HasField("refused"):
                r = result.refused
                future.set_exception(
                    error_of(status_code(r.code), r.message, r.reason, dict(r.metadata))
                )
            else:
                future.set_result((result.recorded, retried))

    async def _start_one(self, request: pb.RecordToolCallRequest) -> _Started:
        attempts = 0

        def attempt(md: tuple[tuple[str, str], ...], timeout: float) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return self.stub.RecordToolCall(request, metadata=md, timeout=timeout)

        response: pb.RecordToolCallResponse = await self._call("RecordToolCall", attempt)
        return response, attempts > 1

    async def _start_many(
        self, requests: list[pb.RecordToolCallRequest]
    ) -> tuple[list[pb.StartToolCallResult], bool]:
        """One StartToolCalls: (the answer of each, whether the request was resent)."""
        request = pb.StartToolCallsRequest(node_id=self.node_id, calls=requests)
        attempts = 0

        async def attempt(md: tuple[tuple[str, str], ...], timeout: float) -> Any:
            nonlocal attempts
            attempts += 1
            try:
                return await self.stub.StartToolCalls(request, metadata=md, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _Unimplemented() from err
                raise

        response: pb.StartToolCallsResponse = await self._call("StartToolCalls", attempt)
        if len(response.results) != len(requests):
            raise E.TetherError(
                f"StartToolCalls answered {len(response.results)} of {len(requests)} records"
            )
        return list(response.results), attempts > 1

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
