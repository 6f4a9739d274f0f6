"""Tool-call mediation: the one path from an agent's CallTool to a side effect.

`Mediator.call_tool` decides, injects, runs, redacts and records, in this order:

1. **Fencing at the point of action**: a lost, lapsed or finished lease is
   refused before anything happens (and again right before the tool runs);
   every control-plane call below carries the fencing token, and a refusal of
   it fences the task at once (FAILED_PRECONDITION "lease lost").
2. **Grant**: the tool must be in the lease's signed scope and granted by the
   exact policy the lease names; otherwise PERMISSION_DENIED naming the tool
   and a TOOL_DENIED receipt. Arguments that break the tool's declared
   `input_schema` are INVALID_ARGUMENT (naming where) with a TOOL_DENIED
   receipt. An exec or mcp tool of a task whose workspace was last measured
   over `workspace_max_bytes` is refused the same way with RESOURCE_EXHAUSTED.
   Refusal receipts are rationed per (task, agent) (`denied_receipts_per_minute`);
   past that a refusal is RESOURCE_EXHAUSTED "too many refused calls" with no
   receipt (`tether.sidecar.quotas`).
3. **Budget slice**: a priced tool's declared cost is taken from the lease's
   budget slice, spent locally. The slice is reserved at the control plane with
   `ReserveBudget` (one atomic conditional write, so overspend stays
   impossible); refills are serialised per lease and grow 1, 2, 4 ... 64 calls'
   worth, capped by what the control plane says is left, so a task making one
   call reserves one call. When the task's budget cannot cover the call the
   last refill asks for exactly the call's cost, so RESOURCE_EXHAUSTED (+
   TOOL_DENIED receipt, status BUDGET_EXHAUSTED) comes exactly when the budget
   cannot cover it. At lease end (CompleteTask, loss, release) `end_lease`
   settles every slice with its actual spend (`SettleBudget`), returning the
   unspent rest; a sidecar that dies keeps its open slices charged (never an
   overspend; at most the last refill is stranded).
4. **Credentials**: `IssueCredential` for each credential the tool declares,
   cached in the lease's memory (`HeldLease.credentials`) and dropped when the
   lease ends; never in a ToolOutcome, a log line, a receipt or an error.
   A tool without credentials makes no call at all.
5. **Idempotency** (with a key): one `RecordToolCall(STARTED)` at the control
   plane before the side effect; it returns the record when one exists. A
   COMPLETED record with the same arguments digest is returned as is
   (`replayed`, receipt status "replayed"), nothing runs and nothing is
   charged; other arguments are INVALID_ARGUMENT; a STARTED record (outcome
   unknown after a crash, a timeout or a takeover) is re-run only when the
   policy declares the tool idempotent, otherwise ABORTED (`OutcomeUnknown`)
   with a receipt. Calls with one key are serialised inside the sidecar, so a
   concurrent duplicate waits and replays. STARTED is written after the budget
   and credentials, so a refusal never leaves a marker that would block a clean
   retry; a keyed call refused there (budget, credential) first looks its key up
   (`LookupToolCall`), so a recorded outcome still replays.
6. **Run** through the policy adapter with the time left on the lease as the
   upper bound, a per-task workspace, the queue's network allowlist and the
   fencing token (the `X-Tether-Fencing-Token` header for http tools).
7. **Redact** the result and any error for every credential of the lease.
8. Settle the call's slice hold locally with the actual cost (the tool's
   report, else the declared cost, never above it), then a TOOL_CALL receipt
   (digests of the arguments and the redacted result, duration, cost, status,
   idempotency key), durably spooled before the agent gets the outcome. A keyed
   call's redacted result rides with its receipt (same spool commit, streamed
   with it): the control plane completes the STARTED record from it in the
   transaction that appends the receipt (`SpooledReceipt.tool_call_result`), so
   there is no `RecordToolCall` COMPLETED round trip. Until the ledger
   acknowledges that receipt the sidecar answers a retry of the key itself: under
   the same lease it replays the spooled outcome; under a later lease it first
   waits (bounded) for the acknowledgement, so the record it then reads is
   COMPLETED. Results over `RIDE_MAX_BYTES` are recorded with RecordToolCall
   COMPLETED as before, concurrently with the receipt.

So a keyed call on the fast path makes one control-plane round trip (STARTED;
concurrent calls share one, `Uplink.start_tool_call`) and an unkeyed call none,
plus one `ReserveBudget` per slice refill.

Control plane unreachable: before the run the agent gets UNAVAILABLE saying the
tool did not run. After the run of a keyed call the outcome is durable in the
spool with its receipt and the agent gets it; the record is completed when the
spool reaches the control plane again, and a retry under the same lease
replays it meanwhile (never a second run). A tool that timed out leaves its
STARTED record: its outcome is unknown. A sidecar that dies before its spool
reaches the control plane leaves the record STARTED until it restarts and
streams it: a takeover elsewhere meanwhile gets ABORTED for a tool not declared
idempotent (never a second effect), as after a crash mid-call.

The arguments digest is the SHA-256 of the canonical JSON of the arguments
(sorted keys, no spaces). Agents never hold credentials, so the arguments they
send carry none; the digest is stable across retries and sidecars.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tether import metrics
from tether.core import errors as E
from tether.core.clock import Clock
from tether.core.policy import Policy, ToolSpec, load_policy, parse_policy
from tether.core.receipts import ReceiptKind
from tether.core.toolschema import argument_problem
from tether.crypto.receipts import parse_statement
from tether.crypto.signing import Envelope
from tether.sidecar.leases import HeldLease, LeaseTable
from tether.sidecar.quotas import DenialLimiter, WorkspaceQuota
from tether.sidecar.receipts import ReceiptSink, Slot, sha256_hex
from tether.sidecar.redaction import Redactor
from tether.sidecar.tools import Tool, ToolContext, ToolResult, build_tool, run_tool
from tether.v1 import control_pb2 as pb

log = logging.getLogger("tether.sidecar.mediation")

MAX_ARGUMENTS_BYTES = 1024 * 1024
MAX_UNRECORDED = 1024  # outcomes kept for retries while the control plane is unreachable
MAX_SLICE_CALLS = 64  # a budget refill reserves at most this many calls' cost
RIDE_MAX_BYTES = 64 * 1024  # larger outcomes are recorded with RecordToolCall COMPLETED
RIDE_WAIT_S = 5.0  # a retry under a later lease waits this long for the outcome's ack
STARTED = pb.TOOL_CALL_PHASE_STARTED
COMPLETED = pb.TOOL_CALL_PHASE_COMPLETED
WORKSPACE_ADAPTERS = ("exec", "mcp")  # tools that run in the task's workspace
REFUSED_KEY = "tether_refused"  # marks a recorded adapter refusal, replayed as the same error
_LOST = (E.StaleFencingToken, E.LeaseExpired, E.NotOwner, E.LeaseLost)

T = TypeVar("T")
_NO_SECRETS = Redactor(())  # a lease without credentials has nothing to redact


@dataclass(frozen=True)
class ToolOutcome:
    """What CallTool returns to the agent (already redacted)."""

    result_json: str
    status: str = "ok"
    replayed: bool = False
    cost_micros: int = 0
    budget_remaining_micros: int = 0


class ToolRunner(Protocol):
    """Finds a granted tool's policy spec and runs it through its adapter."""

    async def spec(self, held: HeldLease, tool: str) -> ToolSpec:
        """The tool as the lease's policy declares it.

        Raises:
            PolicyDenied: the policy does not grant the tool to the lease's queue.
            ResourceExhausted: a quota refuses the tool now (e.g. the workspace's).
        """
        ...

    async def run(
        self,
        held: HeldLease,
        spec: ToolSpec,
        arguments: dict[str, Any],
        *,
        credentials: Mapping[str, bytes],
        redactor: Redactor,
        idempotency_key: str = "",
        deadline_s: float | None = None,
    ) -> ToolResult:
        """Runs the tool once; the result and any error are already redacted."""
        ...


class MediationControl(Protocol):
    """The control-plane calls mediation needs (`tether.sidecar.uplink.Uplink`)."""

    async def issue_credential(
        self, *, task_id: str, fencing_token: int, name: str, tool: str
    ) -> pb.IssueCredentialResponse: ...

    async def reserve_budget(
        self, *, task_id: str, fencing_token: int, reservation_id: str, amount_micros: int
    ) -> int: ...

    async def settle_budget(
        self, *, task_id: str, fencing_token: int, reservation_id: str, actual_micros: int
    ) -> int: ...

    async def lookup_tool_call(
        self, task_id: str, idempotency_key: str
    ) -> pb.ToolCallRecord | None: ...

    async def start_tool_call(
        self,
        *,
        task_id: str,
        fencing_token: int,
        idempotency_key: str,
        tool: str,
        arguments_sha256: str,
        take_over: bool = False,
    ) -> tuple[pb.ToolCallRecord, bool, bool]: ...

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
    ) -> tuple[pb.ToolCallRecord, bool]: ...


def parse_arguments(arguments_json: str) -> dict[str, Any]:
    """Parses CallTool arguments.

    Raises:
        InvalidArgument: too large, not JSON, or not a JSON object.
    """
    if len(arguments_json.encode()) > MAX_ARGUMENTS_BYTES:
        raise E.InvalidArgument("arguments_json", "larger than 1 MiB")
    try:
        value = json.loads(arguments_json or "{}")
    except ValueError as err:
        raise E.InvalidArgument("arguments_json", f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise E.InvalidArgument("arguments_json", "must be a JSON object")
    return value


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of `arguments` (key order and spacing ignored)."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_hex(canonical.encode())


@dataclass
class _Unrecorded:
    """A keyed call that ran but whose COMPLETED record did not reach the control plane."""

    tool: str
    args_digest: str
    outcome: ToolOutcome
    fencing_token: int
    actual_micros: int = 0
    held: HeldLease | None = None


@dataclass(frozen=True)
class _Riding:
    """A keyed call's outcome spooled with its receipt `seq`, until the ledger acks it."""

    tool: str
    args_digest: str
    status: str
    fencing_token: int
    seq: int


@dataclass
class _Slice:
    """Budget reserved once at the control plane (one reservation id), spent locally."""

    reservation_id: str
    amount: int
    used: int = 0  # actual costs of finished calls plus the holds of calls in flight
    holds: int = 0  # calls in flight holding part of it
    closed: bool = False  # settled (or being settled): nothing more is spent from it

    @property
    def available(self) -> int:
        return 0 if self.closed else self.amount - self.used


@dataclass
class _LeaseBudget:
    """The budget slices of one lease (task + fencing token)."""

    held: HeldLease
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slices: list[_Slice] = field(default_factory=list)
    control_remaining: int = -1  # what the control plane had left after the last refill
    next_calls: int = 1  # the next refill reserves this many calls' cost

    def take(self, amount: int) -> _Hold | None:
        for piece in reversed(self.slices):
            if piece.available >= amount:
                piece.used += amount
                piece.holds += 1
                return _Hold(self, piece, amount)
        return None

    def remaining(self) -> int:
        """The task's budget left: the control plane's rest plus the unspent slices."""
        return max(self.control_remaining, 0) + sum(p.available for p in self.slices)


@dataclass
class _Hold:
    """One call's share of a slice: its declared cost, until it settles."""

    budget: _LeaseBudget
    slice: _Slice
    amount: int


@dataclass
class _Call:
    """One call in flight (internal)."""

    held: HeldLease
    spec: ToolSpec
    arguments: dict[str, Any]
    args_digest: str
    key: str
    deadline_s: float | None = None
    """What was left of the caller's own deadline when the call arrived."""
    slot: Slot | None = None
    """The tool_call receipt's promised spool room, taken before the tool runs."""

    @property
    def tool(self) -> str:
        return self.spec.name


class Mediator:
    """Checks a tool call against its lease, runs it, and records it."""

    def __init__(
        self,
        *,
        sink: ReceiptSink,
        clock: Clock,
        runner: ToolRunner | None = None,
        control: MediationControl | None = None,
        leases: LeaseTable | None = None,
        denied_receipts_per_minute: int = 60,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._denials = DenialLimiter(denied_receipts_per_minute, clock)
        self._runner = runner
        self._control = control
        self._leases = leases
        self._key_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._unrecorded: dict[tuple[str, str], _Unrecorded] = {}
        # (task, key) -> the outcome riding with an unacknowledged receipt; kept
        # until the ledger acknowledges it (the spool bounds how many wait).
        self._riding: dict[tuple[str, str], _Riding] = self._restore_riding(sink)
        self._riding_prune_at = max(1024, 2 * len(self._riding))
        self._budgets: dict[tuple[str, int], _LeaseBudget] = {}
        # (task, fencing token, key) whose STARTED record this sidecar wrote and left
        # (timeout, unrecorded outcome): a later STARTED that finds it must not run.
        self._left_started: set[tuple[str, int, str]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._redactors: dict[tuple[str, int], tuple[frozenset[bytes], Redactor]] = {}
        if leases is not None:
            leases.end_hooks.append(self._lease_ended)

    # -- lease end: settle the budget slices ---------------------------------------------

    async def end_lease(self, held: HeldLease) -> None:
        """Settles the lease's budget slices with their actual spend (unspent budget returns).

        Idempotent and never raises: a slice that cannot be settled stays charged
        at the control plane, which can only under-spend, never overspend.
        """
        token = held.lease.fencing_token
        self._left_started = {s for s in self._left_started if s[:2] != (held.task_id, token)}
        self._redactors.pop((held.task_id, token), None)
        budget = self._budgets.pop((held.task_id, token), None)
        if budget is None or self._control is None:
            return
        for piece in budget.slices:
            piece.closed = True
        for piece in budget.slices:
            if piece.used >= piece.amount:
                continue  # fully spent: the reservation already counts exactly that
            try:
                await self._control.settle_budget(
                    task_id=held.task_id,
                    fencing_token=token,
                    reservation_id=piece.reservation_id,
                    actual_micros=piece.used,
                )
            except E.TetherError as err:
                log.warning(
                    "could not return an unspent budget slice: %s",
                    err.message,
                    extra={"task_id": held.task_id},
                )

    def _lease_ended(self, held: HeldLease) -> None:
        """LeaseTable hook (finish, loss, forget): settles the slices in the background."""
        token = held.lease.fencing_token
        if (held.task_id, token) not in self._budgets:
            self._left_started = {s for s in self._left_started if s[:2] != (held.task_id, token)}
            self._redactors.pop((held.task_id, token), None)
            return
        task = asyncio.get_running_loop().create_task(self.end_lease(held))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- budget slices ---------------------------------------------------------------

    async def _hold_budget(self, call: _Call) -> _Hold:
        """Takes the call's declared cost from the lease's slice, refilling it when short.

        Raises:
            BudgetExhausted: the task's budget cannot cover the call.
            LeaseLost, Unavailable: from the refill.
        """
        held, cost = call.held, call.spec.cost_micros
        slot = (held.task_id, held.lease.fencing_token)
        budget = self._budgets.get(slot)
        if budget is None:
            budget = self._budgets[slot] = _LeaseBudget(held)
        while True:
            hold = budget.take(cost)
            if hold is not None:
                return hold
            async with budget.lock:
                if any(p.available >= cost for p in budget.slices):
                    continue  # another call refilled while we waited
                self._fence(held, call.tool)
                await self._refill(budget, call)
                if self._budgets.get(slot) is not budget:
                    self._budgets[slot] = budget  # the lease's end raced the refill
                    if held.finished or held.lost_reason:
                        self._lease_ended(held)

    async def _refill(self, budget: _LeaseBudget, call: _Call) -> None:
        """Reserves the next slice at the control plane (exactly the call's cost at the end)."""
        held, cost = call.held, call.spec.cost_micros
        control = self._need_control()
        want = cost * budget.next_calls
        if budget.control_remaining >= 0:
            want = min(want, budget.control_remaining)
        want = max(want, cost)
        while True:
            reservation_id = f"s_{secrets.token_hex(12)}"
            try:
                remaining = await self._remote(
                    held,
                    "ReserveBudget",
                    control.reserve_budget(
                        task_id=held.task_id,
                        fencing_token=held.lease.fencing_token,
                        reservation_id=reservation_id,
                        amount_micros=want,
                    ),
                )
            except (E.BudgetExhausted, E.ResourceExhausted) as err:
                if want <= cost:
                    raise
                left = _int(err.metadata.get("remaining_micros"))
                want = left if cost <= left < want else cost
                continue
            break
        budget.control_remaining = remaining
        budget.slices = [p for p in budget.slices if p.available > 0 or p.holds]
        budget.slices.append(_Slice(reservation_id, want))
        budget.next_calls = min(budget.next_calls * 2, MAX_SLICE_CALLS)

    def _settle_hold(self, hold: _Hold | None, actual: int) -> int:
        """Replaces a call's hold by its actual cost; returns the task's budget left."""
        if hold is None:
            return 0
        piece = hold.slice
        piece.holds -= 1
        if not piece.closed:
            piece.used -= hold.amount - min(max(actual, 0), hold.amount)
        return hold.budget.remaining()

    # -- receipts and refusals ----------------------------------------------------------

    async def _deny(
        self, held: HeldLease, tool: str, args_digest: str, key: str, err: E.TetherError
    ) -> E.TetherError:
        """Records a refused call (`tool_denied`) and returns the error to raise.

        Past `denied_receipts_per_minute` for the lease's (task, agent) the call is
        refused with RESOURCE_EXHAUSTED instead and leaves no receipt, so refusals
        cannot be spammed into the spool and the ledger.
        """
        if not held.usable(self._clock):
            # A refusal decided after a remote call may come after the lease ended:
            # then it is "lease lost", with no receipt outside the lease's window.
            return self._lost(held, tool)
        metrics.DENIALS.labels(err.reason).inc()
        if not self._denials.allow(held.task_id, held.agent):
            metrics.DENIALS_UNRECORDED.inc()
            return E.ResourceExhausted(
                f"too many refused calls on task {held.task_id!r} (more than "
                f"{self._denials.per_minute} a minute); tool {tool!r} was refused "
                f"({err.reason}: {err.message[:200]}) and not recorded",
                metadata={
                    "quota": "denied_receipts_per_minute",
                    "limit": str(self._denials.per_minute),
                    "tool": tool,
                    "refusal": err.reason,
                },
            )
        await self._sink.emit(
            held.receipt(
                ReceiptKind.TOOL_DENIED,
                self._clock.now_ms(),
                tool=tool,
                arguments_sha256=args_digest,
                idempotency_key=key,
                status=err.reason,
                reason=err.message[:512],
            )
        )
        return err

    async def _tool_call_receipt(
        self,
        call: _Call,
        outcome: ToolOutcome,
        duration_ms: int,
        status: str = "",
        carried: bytes | None = None,
    ) -> int:
        """Spools the call's TOOL_CALL receipt (with `carried`, its outcome); returns its seq."""
        final = status or ("replayed" if outcome.replayed else outcome.status)
        metrics.TOOL_CALLS.labels(call.tool, final).inc()
        metrics.BUDGET_SPENT.labels(call.tool).inc(max(0, outcome.cost_micros))
        return await self._sink.emit(
            call.held.receipt(
                ReceiptKind.TOOL_CALL,
                self._clock.now_ms(),
                tool=call.tool,
                arguments_sha256=call.args_digest,
                result_sha256=sha256_hex(outcome.result_json.encode()),
                duration_ms=duration_ms,
                cost_micros=outcome.cost_micros,
                status=final,
                idempotency_key=call.key,
            ),
            call.slot,
            carried,
        )

    def _fence(self, held: HeldLease, tool: str, *, ran: str = "") -> None:
        """Refuses unless the lease is live right now (by this sidecar's monotonic clock).

        `ran`: what became of a call that already ran (else "did not run" is said).
        """
        if not held.usable(self._clock):
            held.limit_reached(self._clock)  # names a time limit that fell due
            raise self._lost(held, tool, ran=ran)

    def _lost(self, held: HeldLease, tool: str, *, ran: str = "") -> E.LeaseLost:
        return held.lost_error(
            f"lease lost on task {held.task_id!r}: "
            f"{held.lost_reason or 'finished or lapsed'}; tool {tool!r} {ran or 'did not run'}"
        )

    async def _remote(self, held: HeldLease, what: str, op: Awaitable[T]) -> T:
        """Awaits a control-plane call; a refusal of the fencing token fences the task."""
        try:
            return await op
        except _LOST as err:
            if self._leases is not None:
                await self._leases.learn_end(held)  # a time limit or cancel says so
                await self._leases.mark_lost(held, f"control plane refused {what}: {err.message}")
            else:
                held.lost_reason = held.lost_reason or f"control plane refused {what}"
                held.drop_credentials()
            raise held.lost_error(f"lease lost on task {held.task_id!r}: {err.message}") from err

    def _need_control(self) -> MediationControl:
        if self._control is None:
            raise E.PolicyDenied("this sidecar has no control-plane link for budgets or records")
        return self._control

    # -- the call -----------------------------------------------------------------------

    async def call_tool(
        self,
        agent: str,
        held: HeldLease,
        tool: str,
        arguments_json: str,
        idempotency_key: str,
        deadline_s: float | None = None,
    ) -> ToolOutcome:
        """Runs `tool` for `agent` under `held`, refusing before any side effect.

        `deadline_s`: what is left of the caller's own deadline (its gRPC deadline);
        the tool is stopped by then, as by its policy timeout.

        Raises:
            NotOwner: `agent` does not hold the lease.
            LeaseLost: the lease is lost, lapsed or refused by the control plane.
            PolicyDenied: the tool is outside the lease's scope or cannot run here.
            InvalidArgument: malformed arguments.
            IdempotencyConflict: the key was used with other arguments.
            OutcomeUnknown: an earlier run with the key has an unknown outcome and
                the tool is not idempotent.
            BudgetExhausted: the task's budget does not cover the call.
            ResourceExhausted: a quota refuses the call (the workspace's, the spool's,
                or too many refused calls of this task and agent in the last minute).
            Unavailable: the control plane is unreachable (the message says
                whether the tool ran).
        """
        if held.agent != agent:
            raise E.NotOwner(f"task {held.task_id!r} is leased to another agent")
        with held.acting():  # its receipt never follows the lease's task_finished
            return await self._call_tool(held, tool, arguments_json, idempotency_key, deadline_s)

    async def _call_tool(
        self,
        held: HeldLease,
        tool: str,
        arguments_json: str,
        idempotency_key: str,
        deadline_s: float | None,
    ) -> ToolOutcome:
        """`call_tool` for the lease's own agent, counted as acting under the lease."""
        arguments = parse_arguments(arguments_json)
        digest = arguments_digest(arguments)
        self._fence(held, tool)
        if tool not in held.lease.tools:
            raise await self._deny(
                held,
                tool,
                digest,
                idempotency_key,
                E.PolicyDenied(
                    f"tool {tool!r} is not granted by the lease on task {held.task_id!r} "
                    f"(granted: {', '.join(held.lease.tools) or 'none'})",
                    metadata={"tool": tool},
                ),
            )
        if self._runner is None:
            raise await self._deny(
                held,
                tool,
                digest,
                idempotency_key,
                E.PolicyDenied(
                    f"tool {tool!r} is granted but this sidecar has no adapter to run it",
                    metadata={"tool": tool},
                ),
            )
        try:
            spec = await self._runner.spec(held, tool)
        except (E.PolicyDenied, E.ResourceExhausted) as err:  # not granted; over a quota
            raise await self._deny(held, tool, digest, idempotency_key, err) from err
        except E.Unavailable as err:
            raise _unavailable(err, tool, ran=False) from err
        if spec.input_schema is not None:
            problem = argument_problem(spec.input_schema, arguments)
            if problem is not None:
                raise await self._deny(
                    held,
                    tool,
                    digest,
                    idempotency_key,
                    E.InvalidArgument(
                        "arguments_json",
                        f"the arguments of tool {tool!r} break its input_schema {problem}",
                    ),
                )
        call = _Call(held, spec, arguments, digest, idempotency_key, deadline_s)
        if not idempotency_key:
            return await self._execute(call)
        slot = (held.task_id, idempotency_key)
        lock = self._key_locks.get(slot)
        if lock is None:
            lock = self._key_locks[slot] = asyncio.Lock()
        async with lock:
            return await self._keyed(call)

    async def _keyed(self, call: _Call) -> ToolOutcome:
        held, key = call.held, call.key
        riding = self._riding.get((held.task_id, key))
        if riding is not None:
            replayed = await self._replay_riding(call, riding)
            if replayed is not None:
                return replayed
        pending = self._unrecorded.get((held.task_id, key))
        if pending is not None:
            if pending.tool != call.tool or pending.args_digest != call.args_digest:
                raise await self._conflict(call)
            try:
                await self._flush(held, key, pending)
            except E.Unavailable as err:
                raise _unavailable(err, call.tool, ran=True) from err
            except E.TetherError:
                self._unrecorded.pop((held.task_id, key), None)  # cannot be recorded any more
                raise
            outcome = replace(pending.outcome, replayed=True, cost_micros=0)
            self._fence(held, call.tool)  # the lookup took time: still ours before we answer
            await self._tool_call_receipt(call, outcome, 0)
            return outcome
        return await self._execute(call)

    async def _replay_riding(self, call: _Call, riding: _Riding) -> ToolOutcome | None:
        """Answers a retry whose outcome rides with a receipt not yet acknowledged.

        Under the lease it ran under, the spooled outcome is replayed here (the
        record the control plane will derive from the receipt says the same).
        Under another lease the record is the control plane's to say: wait until
        the receipt is acknowledged, then None (ask it as usual).

        Raises:
            IdempotencyConflict: the key ran with another tool or arguments.
            Unavailable: the receipt was not acknowledged in time.
        """
        held, key = call.held, call.key
        if riding.tool != call.tool or riding.args_digest != call.args_digest:
            raise await self._conflict(call)
        carried = self._sink.carried(riding.seq) if riding.seq > self._sink.acked_seq else None
        if carried is not None and riding.fencing_token == held.lease.fencing_token:
            outcome = ToolOutcome(
                result_json=carried.decode("utf-8", "replace"), status=riding.status, replayed=True
            )
            self._fence(held, call.tool)
            await self._tool_call_receipt(call, outcome, 0)
            return outcome
        if not await self._sink.wait_acked(riding.seq, RIDE_WAIT_S):
            raise E.Unavailable(
                f"tool {call.tool!r} ran with idempotency key {key!r} and its outcome is "
                "spooled but not recorded at the control plane yet; retry with the same "
                "key to get it (it will not run again)",
                metadata={"tool": call.tool, "retry_after_ms": "1000"},
            )
        self._riding.pop((held.task_id, key), None)
        return None

    def _ride(self, held: HeldLease, key: str, riding: _Riding) -> None:
        """Keeps a riding outcome until its receipt is acknowledged (pruned as acks come)."""
        self._riding[(held.task_id, key)] = riding
        if len(self._riding) >= self._riding_prune_at:
            acked = self._sink.acked_seq
            self._riding = {k: r for k, r in self._riding.items() if r.seq > acked}
            self._riding_prune_at = max(1024, 2 * len(self._riding))

    @staticmethod
    def _restore_riding(sink: ReceiptSink) -> dict[tuple[str, str], _Riding]:
        """Outcomes spooled by an earlier run whose receipts the ledger has not acked yet.

        Leases do not survive a restart, so a retry finds them under a later
        lease and waits for the acknowledgement before asking the control plane.
        """
        out: dict[tuple[str, str], _Riding] = {}
        for seq, envelope, _ in sink.outcomes():
            r = parse_statement(Envelope.from_json_bytes(envelope).payload)
            riding = _Riding(r.tool, r.arguments_sha256, r.status, r.fencing_token, seq)
            out[(r.task_id, r.idempotency_key)] = riding
        return out

    async def _conflict(self, call: _Call) -> E.TetherError:
        return await self._deny(
            call.held,
            call.tool,
            call.args_digest,
            call.key,
            E.IdempotencyConflict(
                f"idempotency key {call.key!r} was already used on task {call.held.task_id!r} "
                f"with a different tool or arguments; use a new key for a different call",
                metadata={"tool": call.tool, "idempotency_key": call.key},
            ),
        )

    async def _from_record(self, call: _Call, record: pb.ToolCallRecord) -> ToolOutcome | None:
        """Replays a COMPLETED record; for STARTED, None (re-run) or OutcomeUnknown.

        Raises:
            IdempotencyConflict: the record is for another tool or other arguments.
            OutcomeUnknown: STARTED and the tool is not declared idempotent.
        """
        if record.tool != call.tool or record.arguments_sha256 != call.args_digest:
            raise await self._conflict(call)
        if record.phase == COMPLETED:
            result_json = bytes(record.result).decode("utf-8", "replace")
            refused = _recorded_refusal(result_json)
            if refused is not None:
                raise await self._deny(call.held, call.tool, call.args_digest, call.key, refused)
            outcome = ToolOutcome(result_json=result_json, status=record.status, replayed=True)
            # A remote lookup took time: re-check the lease before the receipt and reply.
            self._fence(call.held, call.tool)
            await self._tool_call_receipt(call, outcome, 0)
            return outcome
        if call.spec.idempotent:
            log.info(
                "re-running idempotent tool %s whose earlier outcome is unknown",
                call.tool,
                extra={"task_id": call.held.task_id},
            )
            return None
        raise await self._deny(
            call.held,
            call.tool,
            call.args_digest,
            call.key,
            E.OutcomeUnknown(
                f"tool {call.tool!r} started earlier with idempotency key {call.key!r} "
                f"(fencing token {record.fencing_token}) and its outcome is unknown (the "
                "sidecar crashed or lost the lease mid-call); it is not declared idempotent, "
                "so it will not run again: check its effect and continue with a new key",
                metadata={"tool": call.tool, "idempotency_key": call.key},
            ),
        )

    async def _flush(self, held: HeldLease, key: str, pending: _Unrecorded) -> None:
        """Records an outcome the control plane has not acknowledged yet.

        Under the fencing token the call ran (and wrote STARTED) under: the
        control plane takes it from that lease's node even after the lease
        ended, unless another lease took the key over (RecordToolCall). So an
        outcome known here is recorded, not lost, when the lease is lost
        between the tool's effect and its record, or the task was re-acquired.
        A refusal for an earlier lease says nothing about the one held now.
        """
        control = self._need_control()
        op = control.record_tool_call(
            task_id=held.task_id,
            fencing_token=pending.fencing_token,
            idempotency_key=key,
            tool=pending.tool,
            arguments_sha256=pending.args_digest,
            phase=COMPLETED,
            result=pending.outcome.result_json.encode(),
            status=pending.outcome.status,
            cost_micros=pending.actual_micros,
        )
        if pending.fencing_token == held.lease.fencing_token and held.usable(self._clock):
            await self._remote(held, "RecordToolCall", op)
        else:
            await op
        self._unrecorded.pop((held.task_id, key), None)
        self._left_started.discard((held.task_id, pending.fencing_token, key))

    def _flush_later(self) -> None:
        """Records kept outcomes in the background until the control plane takes them.

        The agent may never retry through this sidecar (its lease was lost and
        another node takes over), so an outcome kept while the control plane
        was unreachable is recorded as soon as it is reachable again.
        """
        if self._flusher is not None and not self._flusher.done():
            return
        self._flusher = asyncio.get_running_loop().create_task(self._flush_kept())
        self._background.add(self._flusher)
        self._flusher.add_done_callback(self._background.discard)

    async def _flush_kept(self) -> None:
        delay = 0.1
        while self._unrecorded:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            for slot, pending in list(self._unrecorded.items()):
                held = pending.held
                if held is None:
                    continue
                lock = self._key_locks.get(slot)
                if lock is None:
                    lock = self._key_locks[slot] = asyncio.Lock()
                async with lock:  # never beside an agent's retry of the same key
                    if self._unrecorded.get(slot) is not pending:
                        continue
                    try:
                        await self._flush(held, slot[1], pending)
                    except E.Unavailable:
                        continue
                    except E.TetherError as err:
                        log.warning(
                            "a tool outcome could not be recorded: %s",
                            err.message,
                            extra={"task_id": slot[0], "idempotency_key": slot[1]},
                        )
                        self._unrecorded.pop(slot, None)

    async def _recorded_instead(self, call: _Call) -> ToolOutcome | None:
        """For a keyed call refused before it started: its recorded outcome, if any.

        Raises:
            IdempotencyConflict, OutcomeUnknown: as `_from_record`.
        """
        if not call.key or self._control is None:
            return None
        try:
            record = await self._control.lookup_tool_call(call.held.task_id, call.key)
        except E.TetherError:
            return None
        if record is None:
            return None
        return await self._from_record(call, record)

    async def _credentials(self, call: _Call) -> dict[str, bytes]:
        """The credentials the tool declares, issued once per lease and cached in its memory."""
        held, names = call.held, call.spec.credentials
        if not names:
            return {}
        control = self._need_control()
        out: dict[str, bytes] = {}
        for name in names:
            cached = held.credentials.get(name)
            if cached is not None and held.usable(self._clock):
                # Dropped when the lease ends; valid while it is (monotonic clock).
                out[name] = cached[0]
                continue
            response = await self._remote(
                held,
                "IssueCredential",
                control.issue_credential(
                    task_id=held.task_id,
                    fencing_token=held.lease.fencing_token,
                    name=name,
                    tool=call.tool,
                ),
            )
            value = bytes(response.value)
            until = int(response.expires_unix_ms) or held.lease.expires_unix_ms
            if held.lost_reason or held.finished:
                self._fence(held, call.tool)  # the lease ended while we asked: keep nothing
            held.credentials[name] = (value, until)
            out[name] = value
        return out

    async def _execute(self, call: _Call) -> ToolOutcome:
        """Reserve the receipt, then hold budget, issue, mark STARTED, run, settle, record.

        The receipt's spool room is promised first: with a full spool the call is
        refused before anything happens, and a call that ran always gets its receipt.
        """
        try:
            call.slot = self._sink.reserve()
        except E.ResourceExhausted as err:
            raise E.ResourceExhausted(
                f"tool {call.tool!r} did not run: {err.message}", metadata=err.metadata
            ) from err
        try:
            return await self._execute_reserved(call)
        finally:
            call.slot.release()  # a no-op once the receipt took it

    async def _execute_reserved(self, call: _Call) -> ToolOutcome:
        held, spec, key = call.held, call.spec, call.key
        assert self._runner is not None
        token = held.lease.fencing_token
        hold: _Hold | None = None
        if spec.cost_micros > 0:
            budget = self._budgets.get((held.task_id, token))
            hold = budget.take(spec.cost_micros) if budget is not None else None
            if hold is None and key:
                # The slice needs a refill (a round trip anyway): a recorded outcome
                # replays first, so a replay never reserves budget.
                recorded = await self._recorded_instead(call)
                if recorded is not None:
                    return recorded
            try:
                hold = hold or await self._hold_budget(call)
            except (E.BudgetExhausted, E.ResourceExhausted) as err:
                refusal = E.BudgetExhausted(
                    f"task {held.task_id!r}: budget does not cover tool {call.tool!r} "
                    f"({spec.cost_micros} micros): {err.message}",
                    metadata={"tool": call.tool, **err.metadata},
                )
                raise await self._deny(held, call.tool, call.args_digest, key, refusal) from err
            except E.Unavailable as err:
                raise _unavailable(err, call.tool, ran=False) from err
        try:
            credentials = await self._credentials(call)
        except E.TetherError as err:
            self._settle_hold(hold, 0)
            if isinstance(err, E.Unavailable):
                raise _unavailable(err, call.tool, ran=False) from err
            if isinstance(err, E.PolicyDenied | E.NotFound):
                recorded = await self._recorded_instead(call)
                if recorded is not None:
                    return recorded
                raise await self._deny(held, call.tool, call.args_digest, key, err) from err
            raise
        try:
            replay = await self._mark_started(call) if key else None
            if replay is None:
                self._fence(held, call.tool)
        except E.TetherError as err:
            self._settle_hold(hold, 0)
            if isinstance(err, E.Unavailable):
                raise _unavailable(err, call.tool, ran=False) from err
            raise
        if replay is not None:
            self._settle_hold(hold, 0)
            return replay
        if key:
            self._left_started.add((held.task_id, token, key))
        redactor = self._redactor(held, credentials)
        started = time.monotonic()
        run = asyncio.ensure_future(
            self._runner.run(
                held,
                spec,
                call.arguments,
                credentials=credentials,
                redactor=redactor,
                idempotency_key=key,
                deadline_s=call.deadline_s,
            )
        )
        held.inflight.add(run)
        try:
            try:
                result = await run
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if (current is not None and current.cancelling()) or not held.lost_reason:
                    raise  # the caller went away (its own deadline or a disconnect)
                # The lease ended under the call (a time limit, a cancel): it was stopped.
                raise self._lost(held, call.tool, ran="was stopped when the lease ended") from None
            finally:
                held.inflight.discard(run)
        except E.TetherError as err:
            final = await self._after_failure(call, err, hold, started)
            if isinstance(err, E.ToolTimeout) and held.limit_reached(self._clock):
                # Cut at the task's signed time limit, not at the tool's own timeout.
                if self._leases is not None:
                    await self._leases.lapse_locally(held)
                raise self._lost(held, call.tool, ran="was stopped at the time limit") from err
            if final is err:
                raise
            raise final from err
        duration_ms = int((time.monotonic() - started) * 1000)
        cost = spec.cost_micros if result.cost_micros is None else result.cost_micros
        if hold is not None and cost > spec.cost_micros:
            log.warning(
                "tool %s reported a cost above its reservation; charging the reservation",
                call.tool,
                extra={"task_id": held.task_id},
            )
        actual = min(cost, spec.cost_micros) if hold is not None else 0
        remaining = self._settle_hold(hold, actual)
        outcome = ToolOutcome(
            result_json=redactor.redact_text(json.dumps(result.value)),
            status=result.status,
            cost_micros=actual,
            budget_remaining_micros=remaining,
        )
        if not key:
            await self._tool_call_receipt(call, outcome, duration_ms)
            # The effect is on record; its result goes out only under a live lease.
            self._fence(held, call.tool, ran="ran (its receipt is recorded)")
            return outcome
        carried = outcome.result_json.encode()
        if len(carried) <= RIDE_MAX_BYTES:
            # The outcome rides with the receipt: durable in the same commit, and the
            # control plane completes the record when it appends the receipt.
            seq = await self._tool_call_receipt(call, outcome, duration_ms, carried=carried)
            self._ride(held, key, _Riding(call.tool, call.args_digest, outcome.status, token, seq))
            self._left_started.discard((held.task_id, token, key))
            self._fence(
                held,
                call.tool,
                ran="ran and its outcome is recorded; retry with the same idempotency key "
                "under a new lease to get it",
            )
            return outcome
        pending = _Unrecorded(call.tool, call.args_digest, outcome, token, actual)
        receipt, record = await asyncio.gather(
            self._tool_call_receipt(call, outcome, duration_ms),
            self._flush(held, key, pending),
            return_exceptions=True,
        )
        if isinstance(receipt, BaseException):
            raise receipt
        if isinstance(record, E.Unavailable):
            self._keep_unrecorded(held, key, pending)
            raise _unavailable(record, call.tool, ran=True) from record
        if isinstance(record, _LOST):  # another lease took the key over meanwhile
            raise E.LeaseLost(
                f"tool {call.tool!r} ran, but the lease on task {held.task_id!r} was lost "
                f"before its outcome was recorded ({record.message}); do not continue this task",
                metadata=record.metadata,
            ) from record
        if isinstance(record, BaseException):
            raise record
        # Recorded: a retry with the key under a new lease gets this outcome.
        self._fence(
            held,
            call.tool,
            ran="ran and its outcome is recorded; retry with the same idempotency key "
            "under a new lease to get it",
        )
        return outcome

    def _redactor(self, held: HeldLease, credentials: Mapping[str, bytes]) -> Redactor:
        """A redactor for every credential of the lease, built once per set of secrets.

        Built on the event loop: set-up is linear in the secrets' size, with no
        regular expression to compile (about 20 ms for a 64 KiB secret; see
        `tether.sidecar.redaction`).
        """
        values = frozenset(v for v, _ in held.credentials.values()) | frozenset(
            credentials.values()
        )
        if not values:
            return _NO_SECRETS
        slot = (held.task_id, held.lease.fencing_token)
        cached = self._redactors.get(slot)
        if cached is None or cached[0] != values:
            if len(self._redactors) >= MAX_UNRECORDED:
                self._redactors.clear()
            cached = self._redactors[slot] = (values, Redactor(values))
        return cached[1]

    async def _mark_started(self, call: _Call) -> ToolOutcome | None:
        """Writes the STARTED record; an existing record decides instead.

        Returns the replayed outcome of a COMPLETED record, None to run.

        Raises:
            IdempotencyConflict, OutcomeUnknown: as `_from_record`.
        """
        held = call.held
        token = held.lease.fencing_token
        record, existed, retried = await self._remote(
            held,
            "RecordToolCall",
            self._need_control().start_tool_call(
                task_id=held.task_id,
                fencing_token=token,
                idempotency_key=call.key,
                tool=call.tool,
                arguments_sha256=call.args_digest,
                # An idempotent tool re-runs a key an earlier lease left STARTED: the
                # key becomes this lease's, so the earlier holder can no longer record
                # an outcome for it after this one began.
                take_over=call.spec.idempotent,
            ),
        )
        if not existed:
            return None
        # A retried request may find the record its own first attempt wrote: that
        # one is ours (same lease, tool and arguments, still STARTED, and not left
        # by an earlier call of this sidecar). Anything else decides as a record.
        ours = (
            retried
            and record.phase == STARTED
            and record.fencing_token == token
            and record.tool == call.tool
            and record.arguments_sha256 == call.args_digest
            and (held.task_id, token, call.key) not in self._left_started
        )
        if ours:
            return None
        return await self._from_record(call, record)

    async def _after_failure(
        self, call: _Call, err: E.TetherError, hold: _Hold | None, started: float
    ) -> E.TetherError:
        """Settles, records and receipts a run that ended in a TetherError.

        Returns the error to raise: `err`, or what `_deny` makes of a refusal.
        """
        held, key = call.held, call.key
        duration_ms = int((time.monotonic() - started) * 1000)
        ran = not isinstance(err, E.PolicyDenied | E.InvalidArgument | E.ConfigError)
        actual = call.spec.cost_micros if (ran and hold is not None) else 0
        self._settle_hold(hold, actual)
        if isinstance(err, E.ToolTimeout):
            # It may have acted: the STARTED record stays, so a retry with the key is
            # re-run only when the tool is idempotent.
            outcome = ToolOutcome(
                result_json=json.dumps({"error": err.reason, "message": err.message}),
                status="error",
                cost_micros=actual,
            )
            await self._tool_call_receipt(call, outcome, duration_ms, status=err.reason)
            return err
        if key and self._control is not None and not isinstance(err, E.LeaseLost):
            refusal = json.dumps({REFUSED_KEY: {"reason": err.reason, "message": err.message}})
            try:
                await self._remote(
                    held,
                    "RecordToolCall",
                    self._control.record_tool_call(
                        task_id=held.task_id,
                        fencing_token=held.lease.fencing_token,
                        idempotency_key=key,
                        tool=call.tool,
                        arguments_sha256=call.args_digest,
                        phase=COMPLETED,
                        result=refusal.encode(),
                        status="error",
                        cost_micros=actual,
                    ),
                )
                self._left_started.discard((held.task_id, held.lease.fencing_token, key))
            except E.TetherError as rec_err:
                log.warning(
                    "could not record a refused call: %s",
                    rec_err.message,
                    extra={"task_id": held.task_id},
                )
        if ran:
            outcome = ToolOutcome(
                result_json=json.dumps({"error": err.reason, "message": err.message}),
                status="error",
                cost_micros=actual,
            )
            await self._tool_call_receipt(call, outcome, duration_ms, status=err.reason)
            return err
        return await self._deny(held, call.tool, call.args_digest, key, err)

    def _keep_unrecorded(self, held: HeldLease, key: str, pending: _Unrecorded) -> None:
        """Keeps an outcome for a retry (bounded; finished tasks need none)."""
        pending.held = held
        for slot, other in list(self._unrecorded.items()):
            if other.held is not None and other.held.finished:
                del self._unrecorded[slot]
        while len(self._unrecorded) >= MAX_UNRECORDED:
            del self._unrecorded[next(iter(self._unrecorded))]
        self._unrecorded[(held.task_id, key)] = pending
        self._flush_later()


def _int(value: str | None) -> int:
    try:
        return int(value or "")
    except ValueError:
        return -1


def _unavailable(err: E.TetherError, tool: str, *, ran: bool) -> E.Unavailable:
    if ran:
        message = (
            f"tool {tool!r} ran, but the control plane is unreachable so its outcome is not "
            f"recorded yet ({err.message}); retry with the same idempotency key to get the "
            "recorded outcome (it will not run again)"
        )
    else:
        message = f"tool {tool!r} did not run: {err.message}"
    return E.Unavailable(message, metadata={"tool": tool, **err.metadata})


def _recorded_refusal(result_json: str) -> E.TetherError | None:
    """The error a recorded adapter refusal stands for, if the record is one."""
    try:
        value = json.loads(result_json)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {REFUSED_KEY}:
        return None
    body = value[REFUSED_KEY]
    if not isinstance(body, dict):
        return None
    message = str(body.get("message", "refused"))
    if body.get("reason") == E.InvalidArgument.reason:
        return E.InvalidArgument("arguments_json", message)
    if body.get("reason") == E.ResourceExhausted.reason:
        return E.ResourceExhausted(message)
    return E.PolicyDenied(message)


class PolicySource:
    """The policy a lease names, by digest: a local copy, else the control plane's.

    A lease carries the digest of the policy it was granted under; a tool runs
    only under exactly that document, so a policy change never silently widens
    an existing lease.
    """

    def __init__(self, uplink: Any, local_file: Path | None = None) -> None:
        self._uplink = uplink
        self._by_digest: dict[str, Policy] = {}
        if local_file is not None:
            policy = load_policy(local_file)
            self._by_digest[policy.digest] = policy

    async def get(self, digest: str, task_id: str, fencing_token: int) -> Policy:
        """Returns the policy with `digest`, named by the lease (task_id, fencing_token).

        A node may read only the policy of a lease it holds, so the control plane
        is asked for that lease's policy, not for the one in force.

        Raises:
            PolicyDenied: no policy with that digest is available to this node.
        """
        if not digest:
            raise E.PolicyDenied("the lease names no policy; no tool may run")
        policy = self._by_digest.get(digest)
        if policy is None:
            try:
                response = await self._uplink.call(
                    "GetPolicy",
                    pb.GetPolicyRequest(task_id=task_id, fencing_token=fencing_token),
                )
                fetched = parse_policy(response.document)
            except (E.Unauthenticated, E.NotFound, E.ConfigError) as err:
                raise E.PolicyDenied(
                    f"policy {digest[:12]} is not available to this node ({err.message}); "
                    "give the sidecar --policy"
                ) from err
            self._by_digest[fetched.digest] = fetched
            policy = self._by_digest.get(digest)
        if policy is None:
            raise E.PolicyDenied(
                f"the lease was granted under policy {digest[:12]}, which is no longer in force"
            )
        return policy


class PolicyToolRunner:
    """Runs a granted tool through its policy adapter (`tether.sidecar.tools`).

    Tools that use the task's workspace (exec, mcp) are held to
    `workspace_max_bytes`: the workspace is measured after each of their calls,
    and a task found over the quota has the next one refused before it runs.
    """

    def __init__(
        self,
        policies: PolicySource,
        workspaces: Path,
        clock: Clock,
        *,
        workspace_max_bytes: int = 1 << 30,
    ) -> None:
        self._policies = policies
        self._workspaces = workspaces
        self._clock = clock
        self._tools: dict[tuple[str, str], Tool] = {}
        self._made: set[str] = set()  # tasks whose workspace exists (until the lease ends)
        self.workspace_quota = WorkspaceQuota(workspace_max_bytes)

    async def spec(self, held: HeldLease, tool: str) -> ToolSpec:
        policy = await self._policies.get(
            held.lease.policy_digest, held.task_id, held.lease.fencing_token
        )
        spec = policy.granted_tool(held.queue, tool)
        queue = policy.queue(held.queue)
        if queue.filesystem_scope == "none" and spec.adapter in WORKSPACE_ADAPTERS:
            raise E.PolicyDenied(
                f"tool {tool!r} needs a workspace, and queue {held.queue!r} has "
                'filesystem_scope = "none"',
                metadata={"tool": tool, "queue": held.queue},
            )
        if spec.adapter in WORKSPACE_ADAPTERS:
            quota = self.workspace_quota
            held.on_end.setdefault("workspace-quota", lambda: quota.forget(held.task_id))
            await quota.check(held.task_id, self._workspaces / held.task_id, tool)
        return spec

    async def run(
        self,
        held: HeldLease,
        spec: ToolSpec,
        arguments: dict[str, Any],
        *,
        credentials: Mapping[str, bytes],
        redactor: Redactor,
        idempotency_key: str = "",
        deadline_s: float | None = None,
    ) -> ToolResult:
        policy = await self._policies.get(
            held.lease.policy_digest, held.task_id, held.lease.fencing_token
        )
        adapter = self._tools.get((policy.digest, spec.name))
        if adapter is None:
            adapter = self._tools[(policy.digest, spec.name)] = build_tool(spec)
        release = getattr(adapter, "release_lease", None)  # adapters holding per-lease state
        if release is not None:
            token = held.lease.fencing_token
            held.on_end.setdefault(
                f"tool:{policy.digest}:{spec.name}", lambda: release(held.task_id, token)
            )
            if held.finished or held.lost_reason:  # ended before we registered
                held.drop_credentials()
        workspace = self._workspaces / held.task_id
        if spec.adapter in WORKSPACE_ADAPTERS or held.task_id not in self._made:
            # Tools that work in it find it made on every call (they may remove it);
            # for the others, once per lease (a mkdir is a failed syscall and an
            # exception on every call otherwise).
            workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
            made, task_id = self._made, held.task_id
            if task_id not in made and not (held.finished or held.lost_reason):
                made.add(task_id)
                held.on_end.setdefault("workspace-made", lambda: made.discard(task_id))
        left_s = held.remaining_ms(self._clock) / 1000
        if deadline_s is not None:  # the agent's own gRPC deadline reaches the tool
            left_s = min(left_s, deadline_s)
        queue = policy.queues.get(held.queue)
        ctx = ToolContext(
            task_id=held.task_id,
            attempt=held.lease.attempt,
            fencing_token=held.lease.fencing_token,
            agent_id=held.agent,
            workspace=workspace,
            credentials=dict(credentials),
            timeout_s=max(left_s, 0.0),
            network_allowlist=queue.network_allowlist if queue is not None else (),
            tool_name=spec.name,
            idempotency_key=idempotency_key,
        )
        try:
            return await run_tool(adapter, ctx, arguments, redactor)
        finally:
            if spec.adapter in WORKSPACE_ADAPTERS and not (held.finished or held.lost_reason):
                await self.workspace_quota.measure(held.task_id, workspace)
