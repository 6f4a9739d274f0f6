"""Leases the sidecar holds for its agents, and the keeper that renews them.

Rules:

* A lease is trusted only after its envelope verifies against the control
  plane's key and names this node, the claiming agent and the task's current
  fencing token.
* Validity is judged by this sidecar's own monotonic clock, never by comparing
  its wall clock with the control plane's: a lease is usable until (monotonic
  time when the acquire or renew request was *sent*) + TTL - a safety margin,
  which is always earlier than the control plane's expiry of that grant. Every
  call checks it before any side effect; at or past it the task is fenced
  locally. A wall-clock step or skew on either side changes nothing.
* The keeper renews a lease every TTL / `renew_divisor` while its agent is
  alive (made a Broker call within the liveness window, default one TTL). Once
  the agent goes silent the keeper stops renewing and the lease lapses.
* Lease loss is loud: a refused renewal or a lapse fences the task at once
  (every later call gets FAILED_PRECONDITION "lease lost ..."), emits a
  LEASE_LOST receipt and logs it.
* While the control plane is unreachable, calls under a held lease keep
  working until its expiry (never past it); the keeper keeps trying to renew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tether.core import errors as E
from tether.core.clock import Clock
from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.core.states import State
from tether.core.timeouts import ENFORCED, EndReason
from tether.crypto.envelopes import from_proto
from tether.crypto.signing import Envelope
from tether.sidecar.receipts import ReceiptSink, Slot
from tether.sidecar.uplink import Uplink
from tether.v1 import control_pb2 as pb

log = logging.getLogger("tether.sidecar.leases")

LeaseVerifier = Callable[[Envelope], Lease]
FORGET_MS = 10 * 60_000  # finished/lost leases answer "finished"/"lease lost" this long


def safety_margin_ms(ttl_ms: int) -> int:
    """How much earlier than TTL the sidecar stops using a grant (a tenth, 100 ms..2 s).

    Covers the request's time in flight to the control plane and scheduling
    delays between the check and the side effect.
    """
    return max(100, min(2_000, ttl_ms // 10))


# How much before a signed time limit the sidecar stops (the check-to-side-effect gap;
# counting from the request's sending already puts it before the control plane's time).
LIMIT_MARGIN_MS = 100

# Refusals after which a lease is gone for good (anything else is retried until expiry).
_FATAL = (
    E.StaleFencingToken,
    E.LeaseExpired,
    E.NotOwner,
    E.NotFound,
    E.InvalidTransition,
    E.LeaseLost,
)


@dataclass
class HeldLease:
    """One task leased through this sidecar, as the sidecar knows it."""

    lease: Lease
    envelope: Envelope
    agent: str
    queue: str
    payload: bytes
    state: State
    renewed_local_ms: int
    """Monotonic ms of the last successful grant or renewal (schedules renewals)."""
    last_agent_call_ms: int
    """Monotonic ms of the agent's last Broker call (liveness)."""
    valid_until_mono_ms: int = 0
    """Monotonic ms after which this sidecar no longer acts under the lease."""
    limit_mono_ms: int | None = None
    """Monotonic ms at which the signed lease's attempt timeout or task deadline
    falls due (less the safety margin); validity never extends past it."""
    limit_reason: EndReason | None = None
    lost_reason: str = ""
    end_reason: EndReason | None = None
    """Set when the control plane ended the lease (a time limit or a cancel)."""
    finished: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keeper: asyncio.Task[None] | None = None
    # Credentials issued under this lease: name -> (value, valid until Unix ms).
    # Memory only, never repr'd; dropped the moment the lease ends.
    credentials: dict[str, tuple[bytes, int]] = field(default_factory=dict, repr=False)
    # Run when the credentials are dropped: whatever still holds one (e.g. an MCP
    # server with a secret in its env) is stopped. Keyed so a tool registers once.
    on_end: dict[str, Callable[[], None]] = field(default_factory=dict, repr=False)
    # Spool room promised at grant for the lease's closing receipt (task_finished or
    # lease_lost), so a full spool can never leave a lease without its end on record.
    end_slot: Slot | None = field(default=None, repr=False)
    # Tool calls running under this lease: cancelled the moment it is lost, so a
    # timeout or a cancel stops them (exec trees are killed by their adapter).
    inflight: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    # The agent's CompleteTask, run apart from its caller (tether.sidecar.finishing):
    # once asked, the end is seen through even if the agent hangs up; a retry joins it.
    finishing: asyncio.Task[Any] | None = field(default=None, repr=False)
    finishing_outcome: int = 0
    # The final transition has left (journaled): nothing else acts under the lease, and
    # a lapse meanwhile is not the lease's end on record; the control plane's answer is.
    final_in_flight: bool = False
    # Actions under way under the lease (`acting`): CompleteTask stops them and waits
    # for their receipts before it ends the lease (none may follow task_finished).
    acting_count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()  # nothing under way yet

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """Around an action that signs a receipt under the lease (a tool call, a
        memory write, an artifact): refused once CompleteTask was asked, which in
        turn stops those under way and waits for them, so nothing of the lease
        follows its task_finished on the node's chain.

        Raises:
            InvalidTransition: the task is being completed.
        """
        if self.finishing is not None or self.final_in_flight:
            raise E.InvalidTransition(f"task {self.task_id!r} is being completed")
        self.acting_count += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.acting_count -= 1
            if not self.acting_count:
                self.idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no action is under way under the lease; False after `timeout_s`."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def task_id(self) -> str:
        return self.lease.task_id

    @property
    def ttl_ms(self) -> int:
        return self.lease.expires_unix_ms - self.lease.issued_unix_ms

    def remaining_ms(self, clock: Clock) -> int:
        """Milliseconds this sidecar may still act under the lease (by its monotonic clock)."""
        return self.valid_until_mono_ms - clock.monotonic_ms()

    def limit_reached(self, clock: Clock) -> bool:
        """True once the signed attempt timeout or deadline has fallen due here;
        then `end_reason` names it (calls are refused DEADLINE_EXCEEDED)."""
        if self.limit_mono_ms is None or clock.monotonic_ms() < self.limit_mono_ms:
            return False
        self.end_reason = self.end_reason or self.limit_reason
        return True

    def usable(self, clock: Clock) -> bool:
        """Neither lost nor finished, and still valid by the monotonic clock."""
        return not self.lost_reason and not self.finished and self.remaining_ms(clock) > 0

    def lost_error(self, message: str) -> E.LeaseLost:
        """The refusal of anything under a lost lease: DEADLINE_EXCEEDED for a time
        limit, CANCELLED for a cancel, else FAILED_PRECONDITION (lease lost)."""
        meta = {"task_id": self.task_id, "fencing_token": str(self.lease.fencing_token)}
        reason = self.end_reason
        if reason is EndReason.CANCELED:
            return E.TaskCanceled(message, metadata={**meta, "end_reason": reason.label})
        if reason is not None and reason in ENFORCED:
            return E.TaskTimedOut(message, metadata={**meta, "end_reason": reason.label})
        return E.LeaseLost(message, metadata=meta)

    def drop_credentials(self) -> None:
        """Forgets every credential issued under this lease (the lease has ended)."""
        self.credentials.clear()
        callbacks, self.on_end = list(self.on_end.values()), {}
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("lease-end cleanup failed", extra={"task_id": self.task_id})

    def receipt(self, kind: ReceiptKind, now_ms: int, **facts: Any) -> Receipt:
        """A receipt with every lease fact filled in."""
        lease = self.lease
        return Receipt(
            kind=kind,
            node_id=lease.node_id,
            task_id=lease.task_id,
            attempt=lease.attempt,
            fencing_token=lease.fencing_token,
            agent_id=self.agent,
            lease_id=lease.lease_id,
            lease_issued_unix_ms=lease.issued_unix_ms,
            lease_expires_unix_ms=lease.expires_unix_ms,
            time_unix_ms=now_ms,
            policy_digest=lease.policy_digest,
            **facts,
        )


class LeaseTable:
    """The sidecar's leases: lookup with ownership checks, renewal, fencing."""

    def __init__(
        self,
        *,
        uplink: Uplink,
        verify: LeaseVerifier,
        sink: ReceiptSink,
        clock: Clock,
        node_id: str,
        agent_liveness_ms: int = 0,
        renew_divisor: int = 3,
    ) -> None:
        self._uplink = uplink
        self._verify = verify
        self._sink = sink
        self._clock = clock
        self._node_id = node_id
        self._liveness_ms = agent_liveness_ms
        self._divisor = renew_divisor
        self._held: dict[str, HeldLease] = {}
        # Called once a lease ends (finished, lost, forgotten), e.g. to return the
        # unspent budget slice; hooks must not block (schedule work instead).
        self.end_hooks: list[Callable[[HeldLease], None]] = []

    def _ended(self, held: HeldLease) -> None:
        for hook in self.end_hooks:
            try:
                hook(held)
            except Exception:
                log.exception("lease-end hook failed", extra={"task_id": held.task_id})

    def __iter__(self) -> Iterator[HeldLease]:
        return iter(list(self._held.values()))

    def get(self, task_id: str) -> HeldLease | None:
        """The lease this sidecar holds (or held, until forgotten) on `task_id`, if any."""
        return self._held.get(task_id)

    def active(self) -> list[HeldLease]:
        """Leases neither finished nor lost, nor ending (a final transition in flight)."""
        return [
            h
            for h in self._held.values()
            if not h.finished and not h.lost_reason and h.finishing is None
        ]

    def trust(self, envelope: Envelope, *, task_id: str, agent: str, fencing_token: int) -> Lease:
        """Verifies a lease envelope and that it is the one we asked for.

        Raises:
            VerificationError: bad signature, or the lease names another task,
                node, agent or fencing token.
        """
        lease = self._verify(envelope)
        for what, got, want in (
            ("task", lease.task_id, task_id),
            ("node", lease.node_id, self._node_id),
            ("agent", lease.agent_id, agent),
            ("fencing token", lease.fencing_token, fencing_token),
        ):
            if got != want:
                raise E.VerificationError(f"lease names {what} {got!r}, expected {want!r}")
        return lease

    def limit_until(self, sent_mono_ms: int, lease: Lease) -> tuple[int, EndReason] | None:
        """Monotonic time at which the lease's earliest signed limit falls due, and which.

        Both due times and `issued_unix_ms` are the control plane's clock, so their
        difference counts from the request's sending, never comparing clocks.
        """
        due = [
            (t, r)
            for t, r in (
                (lease.task_deadline_unix_ms, EndReason.DEADLINE),
                (lease.attempt_deadline_unix_ms, EndReason.ATTEMPT_TIMEOUT),
            )
            if t
        ]
        if not due:
            return None
        at, reason = min(due)
        return sent_mono_ms + (at - lease.issued_unix_ms) - LIMIT_MARGIN_MS, reason

    def valid_until(self, sent_mono_ms: int, lease: Lease) -> int:
        """Monotonic deadline of a grant whose request left at `sent_mono_ms`."""
        ttl = lease.expires_unix_ms - lease.issued_unix_ms
        return sent_mono_ms + ttl - safety_margin_ms(ttl)

    async def add(
        self, task: pb.Task, envelope: Envelope, agent: str, sent_mono_ms: int | None = None
    ) -> HeldLease:
        """Starts holding a freshly acquired lease and keeping it alive.

        `sent_mono_ms` is when the AcquireLease request was sent (monotonic);
        the lease is valid from there for its TTL minus the safety margin.

        Raises:
            VerificationError: the lease does not verify or is not the one asked for.
            LeaseExpired: the grant arrived after its validity ended (a slow or
                paused claim); it is not used.
        """
        lease = self.trust(
            envelope, task_id=task.task_id, agent=agent, fencing_token=task.fencing_token
        )
        mono = self._clock.monotonic_ms()
        sent = mono if sent_mono_ms is None else sent_mono_ms
        valid_until = self.valid_until(sent, lease)
        limit = self.limit_until(sent, lease)
        if limit is not None:
            valid_until = min(valid_until, limit[0])
        if valid_until <= mono:
            raise E.LeaseExpired(
                f"the lease on task {task.task_id!r} arrived after its validity ended "
                f"({mono - sent} ms after the claim was sent); it is not used"
            )
        now = self._clock.now_ms()
        # Room for the grant's receipt and for the lease's closing one, promised
        # now: a full spool refuses the claim rather than an action later.
        grant_slot = self._sink.reserve()
        try:
            end_slot = self._sink.reserve()
        except E.ResourceExhausted:
            grant_slot.release()
            raise
        held = HeldLease(
            lease=lease,
            envelope=envelope,
            agent=agent,
            # The signed lease names the queue; the unsigned task message does not count.
            queue=lease.queue,
            payload=bytes(task.payload),
            state=State.LEASED,
            renewed_local_ms=sent,
            last_agent_call_ms=mono,
            valid_until_mono_ms=valid_until,
            limit_mono_ms=limit[0] if limit is not None else None,
            limit_reason=limit[1] if limit is not None else None,
            end_slot=end_slot,
        )
        old = self._held.get(task.task_id)
        if old is not None:
            await self.forget(old)
        self._prune(mono)
        self._held[task.task_id] = held
        await self._sink.emit(held.receipt(ReceiptKind.LEASE_GRANTED, now), grant_slot)
        held.keeper = asyncio.create_task(self._keep(held), name=f"keep-{task.task_id}")
        log.info(
            "lease granted",
            extra={
                "task_id": task.task_id,
                "agent_id": agent,
                "fencing_token": lease.fencing_token,
            },
        )
        return held

    async def for_agent(self, agent: str, task_id: str) -> HeldLease:
        """The live lease of `task_id`, if `agent` holds it; marks the agent alive.

        Raises:
            NotFound: this sidecar holds no lease on the task.
            NotOwner: another agent holds it.
            LeaseLost: the lease was lost or has lapsed (fenced now if it just did).
            InvalidTransition: the task is already finished.
        """
        held = self._held.get(task_id)
        if held is None:
            raise E.NotFound(f"task {task_id!r} is not leased through this sidecar")
        if held.agent != agent:
            raise E.NotOwner(
                f"task {task_id!r} is leased to another agent; agent {agent!r} may not touch it"
            )
        await self.check_live(held)
        held.last_agent_call_ms = self._clock.monotonic_ms()
        return held

    async def check_live(self, held: HeldLease) -> None:
        """Raises unless the lease is usable right now, by this sidecar's monotonic clock.

        Every Broker path calls it after its last await and before it emits a
        receipt or answers success under the lease: a pause or a slow remote
        call between the first check and the reply must not let a receipt or a
        reply out after the lease ended. A lease found lapsed is fenced here.

        Raises:
            InvalidTransition: the task is already finished.
            LeaseLost: the lease was lost or has lapsed.
        """
        task_id = held.task_id
        if held.finished:
            raise E.InvalidTransition(f"task {task_id!r} is already finished")
        if held.final_in_flight:
            raise E.InvalidTransition(f"task {task_id!r} is being completed")
        if not held.lost_reason and self._clock.monotonic_ms() >= held.valid_until_mono_ms:
            await self.lapse_locally(held)
        if held.lost_reason:
            raise held.lost_error(
                f"lease lost on task {task_id!r}: {held.lost_reason}; do not continue this task"
            )

    async def lapse_locally(
        self,
        held: HeldLease,
        why: str = "its validity by this sidecar's monotonic clock has ended",
    ) -> None:
        """Fences a lease whose validity ran out here: at a signed time limit
        (then `end_reason` names it), or a plain lapse."""
        if held.limit_reached(self._clock) and held.limit_reason is not None:
            await self.mark_lost(
                held, f"the task's {held.limit_reason.label.replace('_', ' ')} fell due"
            )
        else:
            await self.mark_lost(held, f"lease lapsed ({why})")

    async def mark_lost(self, held: HeldLease, reason: str) -> None:
        """Fences the task locally, once: receipt, log, keeper stopped."""
        if held.lost_reason or held.finished:
            return
        if held.final_in_flight:
            # Its answer, not this lapse, ends the lease on record (task_finished if it
            # applied; lease_lost if refused).
            return
        held.lost_reason = reason
        self._sink.hurry()  # the lease's last receipts go to the ledger at once
        for call in list(held.inflight):  # stop what runs under the lease, now
            call.cancel()
        held.drop_credentials()
        log.warning(
            "LEASE LOST: %s",
            reason,
            extra={
                "task_id": held.task_id,
                "agent_id": held.agent,
                "fencing_token": held.lease.fencing_token,
            },
        )
        await self._sink.emit(
            held.receipt(ReceiptKind.LEASE_LOST, self._clock.now_ms(), reason=reason),
            held.end_slot,
        )
        self._stop_keeper(held)
        self._ended(held)

    async def finish(self, held: HeldLease) -> None:
        """Marks a task finished through this sidecar; stops renewing it."""
        held.finished = True
        held.drop_credentials()
        self._stop_keeper(held)
        self._ended(held)

    async def forget(self, held: HeldLease) -> None:
        """Drops a lease from the table (finished or lost long ago)."""
        if held.end_slot is not None:
            held.end_slot.release()  # a no-op when its closing receipt took it
        held.drop_credentials()
        self._stop_keeper(held)
        self._held.pop(held.task_id, None)
        self._ended(held)

    def _prune(self, now: int) -> None:
        """Forgets leases finished or lost long ago (they only answer late callers)."""
        for held in list(self._held.values()):
            if (held.finished or held.lost_reason) and now - held.last_agent_call_ms > FORGET_MS:
                self._held.pop(held.task_id, None)

    def _stop_keeper(self, held: HeldLease) -> None:
        task = held.keeper
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def adopt(self, held: HeldLease, envelope: Envelope, lease: Lease, sent_mono_ms: int) -> None:
        """Replaces a held lease with its renewal, whose request left at `sent_mono_ms`."""
        held.lease = lease
        held.envelope = envelope
        held.renewed_local_ms = sent_mono_ms
        held.valid_until_mono_ms = max(
            held.valid_until_mono_ms, self.valid_until(sent_mono_ms, lease)
        )
        if held.limit_mono_ms is not None:  # a renewal never extends a time limit
            held.valid_until_mono_ms = min(held.valid_until_mono_ms, held.limit_mono_ms)

    def renew_due(self, held: HeldLease) -> bool:
        """True when a renewal is due (a third of the TTL, by default, since the last)."""
        elapsed = self._clock.monotonic_ms() - held.renewed_local_ms
        return elapsed >= held.ttl_ms // self._divisor

    async def renew(self, held: HeldLease, *, retry_budget_ms: int | None = None) -> None:
        """Renews at the control plane; a refusal fences the task.

        Raises:
            LeaseLost: the control plane refused (the task is fenced now).
            Unavailable: unreachable; the lease is still held until its expiry.
        """
        async with held.lock:
            if held.finished or held.lost_reason:
                return
            request = pb.RenewLeaseRequest(
                task_id=held.task_id, fencing_token=held.lease.fencing_token, node_id=self._node_id
            )
            sent = self._clock.monotonic_ms()
            try:
                response: pb.RenewLeaseResponse = await self._uplink.call(
                    "RenewLease", request, retry_budget_ms=retry_budget_ms
                )
                if response.end_reason:
                    await self._ended_by_control(held, response.end_reason)
                envelope = from_proto(response.lease)
                lease = self.trust(
                    envelope,
                    task_id=held.task_id,
                    agent=held.agent,
                    fencing_token=held.lease.fencing_token,
                )
            except (E.Unavailable, E.TaskTimedOut, E.TaskCanceled):
                raise
            except (*_FATAL, E.VerificationError) as err:
                await self.mark_lost(held, f"renewal refused: {err.message}")
                raise E.LeaseLost(f"lease lost on task {held.task_id!r}: {err.message}") from err
            self.adopt(held, envelope, lease, sent)

    async def _ended_by_control(self, held: HeldLease, value: int) -> None:
        """The control plane ended the lease (RenewLease said why): fence and raise.

        Raises:
            TaskTimedOut: a time limit ended it.
            TaskCanceled: an operator canceled the task.
            LeaseLost: a reason this sidecar does not know.
        """
        try:
            reason: EndReason | None = EndReason(value)
        except ValueError:
            reason = None
        held.end_reason = reason
        label = reason.label if reason is not None else f"reason {value}"
        await self.mark_lost(held, f"the control plane ended the task ({label})")
        raise held.lost_error(
            f"task {held.task_id!r} ended at the control plane ({label}); stop working on it"
        )

    async def learn_end(self, held: HeldLease) -> None:
        """After a refusal under the lease, asks the control plane why (one renewal).

        Sets `end_reason` and fences when a time limit or a cancel ended it;
        never raises (the caller fences with its own reason otherwise).
        """
        if held.lost_reason or held.finished:
            return
        with contextlib.suppress(E.TetherError):
            await self.renew(held, retry_budget_ms=0)

    def _alive(self, held: HeldLease, now: int) -> bool:
        window = self._liveness_ms or held.ttl_ms
        return now - held.last_agent_call_ms <= window

    async def _keep(self, held: HeldLease) -> None:
        """Renews while the agent is alive; fences at expiry otherwise."""
        try:
            while not held.finished and not held.lost_reason:
                now = self._clock.monotonic_ms()
                expires = held.valid_until_mono_ms
                if now >= expires:
                    await self.lapse_locally(held, "not renewed before its expiry")
                    return
                interval = max(held.ttl_ms // self._divisor, 50)
                due_at = held.renewed_local_ms + interval
                if now >= due_at and self._alive(held, now):
                    try:
                        await self.renew(held, retry_budget_ms=0)
                    except E.Unavailable:
                        await asyncio.sleep(min(interval / 2, max(expires - now, 0)) / 1000)
                    except E.LeaseLost:
                        return
                    except E.TetherError as err:
                        log.warning(
                            "renewal failed, retrying: %s",
                            err.message,
                            extra={"task_id": held.task_id},
                        )
                        await asyncio.sleep(min(interval / 2, max(expires - now, 0)) / 1000)
                    continue
                wake = min(due_at if now < due_at else now + interval // 2, expires)
                await asyncio.sleep(max(wake - now, 10) / 1000)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease keeper crashed", extra={"task_id": held.task_id})

    async def close(self) -> None:
        """Stops every keeper (without releasing; see the server's shutdown)."""
        for held in list(self._held.values()):
            held.drop_credentials()
            self._stop_keeper(held)
            if held.keeper is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await held.keeper
