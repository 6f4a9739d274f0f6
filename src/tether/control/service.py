"""Control-plane use cases over a `Store`, a signing key and a clock.

No gRPC here: grpc_api.py converts messages and calls these methods. Requests
reaching this module are already validated field by field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether import metrics
from tether.control.authz import (
    Principal,
    check_task_access,
    check_unexpired,
    current_principal,
    refuse,
)
from tether.control.leader import DEFAULT_LEADER_TTL_MS, default_replica_id
from tether.control.policy_sync import DEFAULT_POLICY_MAX_STALENESS_MS, PolicyInForce
from tether.core.clock import Clock, SystemClock
from tether.core.errors import (
    AlreadyExists,
    ConfigError,
    Forbidden,
    InvalidArgument,
    NotFound,
    NotOwner,
    PolicyDenied,
    TetherError,
    Unauthenticated,
    VerificationError,
)
from tether.core.leases import DEFAULT_TTL_MS
from tether.core.policy import Policy, parse_policy
from tether.core.receipts import ControlReceipt
from tether.core.states import Event, State
from tether.core.timeouts import (
    DEFAULT_BACKOFF_COEFFICIENT,
    EndReason,
    RetryPolicy,
)
from tether.crypto.certs import DEFAULT_CERT_VALIDITY_MS, issue_cert, verify_cert
from tether.crypto.enrollment import check_challenge, make_challenge, verify_statement
from tether.crypto.leases import decode_lease, sign_lease_fields
from tether.crypto.pki import (
    DEFAULT_NODE_CERT_TTL_MS,
    DEFAULT_TRUST_DOMAIN,
    CertificateAuthority,
    cert_pem,
    load_spki,
    node_spiffe_id,
)
from tether.crypto.receipts import sign_control_receipt
from tether.crypto.signing import Envelope, SigningKey, keyid_of
from tether.store.base import (
    DEFAULT_MAX_ATTEMPTS,
    BudgetState,
    EndSigner,
    GrantAsk,
    HolderTransition,
    JoinTokenRecord,
    LapseOutcome,
    LeaseHistoryEntry,
    NewTask,
    NodeRecord,
    PolicyRecord,
    SecretVersionInfo,
    Store,
    TaskRecord,
    ToolCallRecord,
    ToolCallWrite,
)
from tether.store.common import token_sha256

if TYPE_CHECKING:
    from tether.control.vault import Vault

log = logging.getLogger("tether.control")


MAX_NODE_CHECK_CACHE_MS = 1_000
"""The longest a revocation made through another replica may take to hold here."""
_NODE_CACHE_MAX_ENTRIES = 10_000
_POLICY_VIEWS_MAX = 1024


@dataclass(frozen=True)
class ControlConfig:
    """Tunables of the control plane (secrets are never held here, only in `Auth`)."""

    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Attempts a task gets when the submitter does not say."""
    default_lease_ttl_ms: int = DEFAULT_TTL_MS
    """Lease TTL when neither the submitter nor the policy says."""
    backoff_base_ms: int = 1_000
    """First requeue delay after a lapsed lease; doubles per attempt."""
    backoff_cap_ms: int = 60_000
    """Longest requeue delay."""
    long_poll_recheck_ms: int = 250
    """How often a waiting AcquireLease re-checks for tasks whose backoff ended."""
    cert_validity_ms: int = DEFAULT_CERT_VALIDITY_MS
    """Validity of node certificates."""
    log_origin: str = ""
    """The ledger's C2SP checkpoint origin (its log identity); "" means
    "<trust domain>/ledger", so each deployment names its own log."""
    policy_max_staleness_ms: int = DEFAULT_POLICY_MAX_STALENESS_MS
    """With replicas: the oldest view of the policy in force a lease may be granted
    under (a new version is normally seen at once, by LISTEN/NOTIFY)."""
    replica_id: str = ""
    """This replica's name in leader elections; "" means host:pid:random."""
    leader_ttl_ms: int = DEFAULT_LEADER_TTL_MS
    """Term of a singleton job's leader (sweeper, checkpointer); a dead or paused
    leader is replaced within about this long."""
    node_check_cache_ms: int = 1_000
    """How long a replica reuses a node's active row between node RPCs (0..1000; 0 reads
    the store on every call). The bound on how late a revocation or re-key made through
    ANOTHER replica is seen here; through this replica it holds from the next call.
    Only an active node is reused: a refusal is re-read every time."""

    def __post_init__(self) -> None:
        if not 0 <= self.node_check_cache_ms <= MAX_NODE_CHECK_CACHE_MS:
            raise ConfigError(
                f"node_check_cache_ms must be between 0 and {MAX_NODE_CHECK_CACHE_MS}, "
                f"got {self.node_check_cache_ms}"
            )


@dataclass(frozen=True)
class Auth:
    """How the control plane establishes identities (no secrets: the CA key is held by `ca`).

    `ca` issues node certificates at enrolment; without it (only with
    `insecure`) no TLS certificate is issued. `allowed_node_keys` may enrol
    without a join token, still proving possession of the key.
    """

    ca: CertificateAuthority | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    allowed_node_keys: tuple[tuple[str, bytes], ...] = ()
    """(node id glob, raw Ed25519 key) pairs: the key may enrol, without a join token,
    node ids matching the glob (e.g. "research-agent-*" for a Deployment's pods)."""
    node_cert_ttl_ms: int = DEFAULT_NODE_CERT_TTL_MS
    insecure: bool = False
    """--insecure-plaintext: no TLS, no identities; every caller is trusted (development only)."""


JOIN_TOKEN_PREFIX = "tj_"
DEFAULT_JOIN_TOKEN_TTL_MS = 3600 * 1000
MIN_JOIN_TOKEN_TTL_MS = 60 * 1000
MAX_JOIN_TOKEN_TTL_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Enrollment:
    """What RegisterNode gives a node."""

    certificate: Envelope
    tls_certificate_pem: str
    tls_expires_unix_ms: int
    spiffe_id: str


@dataclass
class _Waiters:
    """Wakes long-polling AcquireLease calls when work may be ready.

    A broadcast by replacing an Event, with no lock: an asyncio.Condition waited on
    under `wait_for` can, when its caller is cancelled (a client that hung up) just
    as the timeout fires, re-acquire its lock after the caller left, and hold it
    forever; every later notify and long poll then hangs (found by the chaos suite).
    """

    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def notify(self) -> None:
        event, self.event = self.event, asyncio.Event()
        event.set()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.event.wait()


@dataclass(frozen=True)
class PolicyView:
    """What a lease needs from the policy in force for one queue."""

    digest: str = ""
    tools: tuple[str, ...] = ()
    lease_ttl_ms: int = 0
    max_attempts: int = 0
    attempt_timeout_ms: int = 0
    deadline_ms: int = 0
    schedule_to_start_timeout_ms: int = 0
    retry: RetryPolicy | None = None


@dataclass(frozen=True)
class RetryRequest:
    """A submitter's retry policy; 0, None or empty means "the queue's default"."""

    initial_interval_ms: int = 0
    backoff_coefficient: float = 0.0
    maximum_interval_ms: int = 0
    non_retryable_reasons: tuple[str, ...] = ()
    retry_failures: bool | None = None


# The lease-history outcome of each end the control plane decides, as a holder's
# RenewLease is told it (a lapse it judged itself stays an error).
_ENDED_BY_CONTROL = {
    "attempt_timeout": EndReason.ATTEMPT_TIMEOUT,
    "deadline": EndReason.DEADLINE,
    "canceled": EndReason.CANCELED,
}


class ControlService:
    """Tasks, leases and node enrolment."""

    def __init__(
        self,
        store: Store,
        key: SigningKey,
        clock: Clock | None = None,
        *,
        config: ControlConfig | None = None,
        auth: Auth | None = None,
        vault: Vault | None = None,
    ) -> None:
        self.store = store
        self.vault = vault
        self._policies: dict[str, Policy] = {}  # digest -> parsed; leases name their digest
        self.key = key
        self.clock: Clock = clock or SystemClock()
        self.config = config or ControlConfig()
        self.auth = auth or Auth()
        self._waiters = _Waiters()
        self._node_cache: dict[str, tuple[float, NodeRecord]] = {}
        # queue -> (the policy it was read from, its view): `policy_for` per grant.
        self._policy_views: dict[str, tuple[Policy | None, PolicyView]] = {}
        self.policy_in_force = PolicyInForce(store, self.config.policy_max_staleness_ms)
        self.replica_id = self.config.replica_id or default_replica_id()

    @property
    def _policy(self) -> Policy | None:
        """The policy in force as last confirmed (see `PolicyInForce.current`)."""
        return self.policy_in_force.policy

    @property
    def log_origin(self) -> str:
        """The checkpoint origin: configured, or derived from the trust domain."""
        return self.config.log_origin or f"{self.auth.trust_domain}/ledger"

    async def start(self) -> None:
        """Loads the policy in force (if any) and follows changes; call once the store is open."""
        await self.policy_in_force.refresh()
        self.policy_in_force.start()

    async def close(self) -> None:
        """Stops following the policy."""
        await self.policy_in_force.stop()

    # -- policy ---------------------------------------------------------------------

    async def put_policy(self, document: str) -> PolicyRecord:
        """Stores a new policy version and puts it in force for new leases.

        Raises:
            ConfigError: the policy module refuses the document.
        """
        policy = parse_policy(document)  # raises ConfigError on a bad document
        rec = await self.store.put_policy(document, policy.digest, self.clock.now_ms())
        self.policy_in_force.adopt(rec, policy)  # other replicas learn of it by NOTIFY
        self._policies[policy.digest] = policy
        log.info("policy stored: version %d digest %s", rec.version, policy.digest)
        return rec

    async def get_policy(self, version: int = 0) -> PolicyRecord:
        """A stored policy version (0: the one in force).

        Raises:
            NotFound: no such version (or no policy at all).
        """
        rec = await self.store.get_policy(version)
        if rec is None:
            raise NotFound("no policy stored" if not version else f"no policy version {version}")
        return rec

    def declared_queue(self, queue: str) -> Policy:
        """The policy in force, if it declares `queue`.

        Raises:
            PolicyDenied: no policy in force, or `queue` is not one of its queues.
        """
        policy = self._policy
        if policy is None:
            raise PolicyDenied(
                f"queue {queue!r} is not declared: no policy is in force; apply one with "
                "`tether policy apply`",
                metadata={"queue": queue},
            )
        if queue not in policy.queues:
            known = ", ".join(sorted(policy.queues)) or "none"
            raise PolicyDenied(
                f"queue {queue!r} is not declared by the policy in force (declared: {known}); "
                f"add [queues.{queue}]",
                metadata={"queue": queue},
            )
        return policy

    @staticmethod
    def _grants(policy: Policy, agent: str) -> str:
        spec = policy.agents.get(agent)
        if spec is None:
            return "nothing (no [agents." + agent + "] section)"
        return "queues " + (", ".join(spec.queues) or "none")

    def policy_for(self, queue: str) -> PolicyView:
        """Tools, TTL and attempts the policy in force gives `queue`.

        Read on every grant (from the store's thread too), so the view is kept per
        queue while the policy in force is the same object, and made again when it is not.
        """
        policy = self._policy
        hit = self._policy_views.get(queue)
        if hit is not None and hit[0] is policy:
            return hit[1]
        view = self._policy_view(policy, queue)
        if len(self._policy_views) >= _POLICY_VIEWS_MAX:
            self._policy_views.clear()  # bounded: queue names come from requests
        self._policy_views[queue] = (policy, view)
        return view

    @staticmethod
    def _policy_view(policy: Policy | None, queue: str) -> PolicyView:
        if policy is None:
            return PolicyView()
        spec = policy.queues.get(queue)
        if spec is None:
            return PolicyView(digest=policy.digest)
        return PolicyView(
            digest=policy.digest,
            tools=spec.tools,
            lease_ttl_ms=spec.lease_ttl_ms,
            max_attempts=spec.max_attempts,
            attempt_timeout_ms=spec.attempt_timeout_ms,
            deadline_ms=spec.deadline_ms,
            schedule_to_start_timeout_ms=spec.schedule_to_start_timeout_ms,
            retry=spec.retry,
        )

    def _resolve_retry(self, pol: PolicyView, ask: RetryRequest, attempts: int) -> RetryPolicy:
        """Each retry field: the submitter's, else the queue's, else the control plane's.

        Raises:
            InvalidArgument: the result is inconsistent (maximum below initial).
        """
        q = pol.retry
        initial = ask.initial_interval_ms or (
            q.initial_interval_ms if q else self.config.backoff_base_ms
        )
        maximum = ask.maximum_interval_ms or (
            q.maximum_interval_ms if q else self.config.backoff_cap_ms
        )
        if ask.maximum_interval_ms and ask.maximum_interval_ms < initial:
            raise InvalidArgument(
                "retry_policy.maximum_interval_ms",
                f"must be at least the initial interval ({initial} ms)",
            )
        maximum = max(maximum, initial)
        return RetryPolicy(
            initial_interval_ms=initial,
            backoff_coefficient=ask.backoff_coefficient
            or (q.backoff_coefficient if q else DEFAULT_BACKOFF_COEFFICIENT),
            maximum_interval_ms=maximum,
            maximum_attempts=attempts,
            non_retryable_reasons=ask.non_retryable_reasons
            or (q.non_retryable_reasons if q else ()),
            retry_failures=(
                ask.retry_failures
                if ask.retry_failures is not None
                else (q.retry_failures if q else False)
            ),
        )

    # -- tasks ----------------------------------------------------------------------

    async def submit(
        self,
        *,
        queue: str,
        payload: bytes,
        idempotency_key: str = "",
        max_attempts: int = 0,
        lease_ttl_ms: int = 0,
        budget_limit_micros: int = 0,
        attempt_timeout_ms: int = 0,
        deadline_ms: int = 0,
        schedule_to_start_timeout_ms: int = 0,
        retry: RetryRequest | None = None,
        submitted_by: str = "",
    ) -> tuple[TaskRecord, bool]:
        """Queues a task; a repeat with the same idempotency key returns the first.

        `submitted_by` ("ROLE:NAME", `authz.principal_tag`) is recorded on the task:
        it decides which submitter may read or cancel it.

        Limits and retry fields not given take the queue's defaults (tether.core.timeouts).

        Raises:
            PolicyDenied: no policy is in force, or it declares no such queue.
            InvalidArgument: the retry policy is inconsistent.
        """
        await self.policy_in_force.current()
        self.declared_queue(queue)
        pol = self.policy_for(queue)
        attempts = max_attempts or pol.max_attempts or self.config.default_max_attempts
        task = NewTask(
            queue=queue,
            payload=payload,
            idempotency_key=idempotency_key,
            max_attempts=attempts,
            lease_ttl_ms=lease_ttl_ms or pol.lease_ttl_ms or self.config.default_lease_ttl_ms,
            budget_limit_micros=budget_limit_micros,
            attempt_timeout_ms=attempt_timeout_ms or pol.attempt_timeout_ms,
            deadline_ms=deadline_ms or pol.deadline_ms,
            schedule_to_start_ms=schedule_to_start_timeout_ms or pol.schedule_to_start_timeout_ms,
            retry=self._resolve_retry(pol, retry or RetryRequest(), attempts),
            submitted_by=submitted_by,
        )
        now = self.clock.now_ms()
        record, created = await self.store.submit_task(task, new_id("t", now), now)
        if created:
            await self._waiters.notify()
            log.info("task submitted", extra={"task_id": record.task_id, "queue": queue})
        return record, created

    async def get(
        self, task_id: str, *, caller: Principal
    ) -> tuple[TaskRecord, list[LeaseHistoryEntry]]:
        """A task and its lease history, if `caller` may see it (`authz.check_task_access`).

        Raises:
            NotFound: no such task, or another operator's task `caller` may not reach.
        """
        task = await self.store.get_task(task_id)
        check_task_access(caller, task_id, task.submitted_by)
        return task, await self.store.lease_history(task_id)

    async def list_tasks(
        self, *, queue: str, state: State | None, page_size: int, page_token: str
    ) -> tuple[list[TaskRecord], str]:
        """One page of tasks and the token of the next page ("" on the last)."""
        after = decode_page_token(page_token, queue, state)
        tasks = await self.store.list_tasks(
            queue=queue, state=state, after_seq=after, limit=page_size + 1
        )
        if len(tasks) <= page_size:
            return tasks, ""
        tasks = tasks[:page_size]
        return tasks, encode_page_token(tasks[-1].seq, queue, state)

    async def cancel(self, task_id: str, reason: str, *, caller: Principal) -> TaskRecord:
        """Cancels a task that has not finished; its lease (if any) dies with it.

        The submitter is never changed after submission, so checking it before the
        cancel's own transaction leaves no race.

        Raises:
            NotFound: no such task, or another operator's task `caller` may not reach.
        """
        check_task_access(caller, task_id, (await self.store.get_task(task_id)).submitted_by)
        task = await self.store.cancel_task(
            task_id, reason, self.clock.now_ms(), sign_end=self.end_signer("control-plane")
        )
        log.info("task canceled", extra={"task_id": task_id})
        return task

    def end_signer(self, clock: str) -> EndSigner:
        """Signs the control receipt of an end decided by `clock` (a lapse, a limit, ...).

        Called by the store inside the transaction that applies the change. The
        ended lease's holder comes from its last signed grant or renewal.
        """

        def sign(end: LapseOutcome, lease_envelope: bytes) -> bytes:
            lease = (
                decode_lease(Envelope.from_json_bytes(lease_envelope).payload)
                if lease_envelope
                else None
            )
            return sign_control_receipt(
                ControlReceipt(
                    end_reason=end.reason,
                    task_id=end.task_id,
                    attempt=lease.attempt if lease is not None else end.attempt,
                    fencing_token=end.fencing_token,
                    state=int(end.state),
                    time_unix_ms=end.decided_unix_ms,
                    reason=_end_text(end)[:512],
                    lease_id=lease.lease_id if lease is not None else "",
                    node_id=lease.node_id if lease is not None else "",
                    agent_id=lease.agent_id if lease is not None else "",
                    limit_unix_ms=end.limit_unix_ms,
                    clock=clock,
                ),
                self.key,
            )

        return sign

    # -- leases ---------------------------------------------------------------------

    def _signer(self, now: int, out: dict[bytes, Envelope]) -> Any:
        """A lease signer for the store; `out` maps each envelope's stored bytes to it."""

        key = self.key

        def sign(task: TaskRecord) -> bytes:
            pol = self.policy_for(task.queue)
            env = sign_lease_fields(  # = sign_lease(Lease(...)), without the record
                key,
                lease_id=task.lease_id,
                task_id=task.task_id,
                attempt=task.attempt,
                node_id=task.node_id,
                agent_id=task.agent_id,
                fencing_token=task.fencing_token,
                issued_unix_ms=now,
                expires_unix_ms=task.lease_expires_unix_ms,
                policy_digest=pol.digest,
                queue=task.queue,
                tools=pol.tools,
                attempt_deadline_unix_ms=(
                    task.attempt_started_unix_ms + task.attempt_timeout_ms
                    if task.attempt_timeout_ms
                    else 0
                ),
                task_deadline_unix_ms=task.deadline_unix_ms,
            )
            raw = env.to_json_bytes()
            out[raw] = env
            return raw

        return sign

    async def check_claim(self, queue: str, agent_id: str) -> None:
        """Raises PolicyDenied unless the policy in force lets `agent_id` claim from `queue`."""
        await self.policy_in_force.current()
        policy = self.declared_queue(queue)
        if not policy.may_claim(agent_id, queue):
            raise PolicyDenied(
                f"agent {agent_id!r} may not claim from queue {queue!r}: the policy in force "
                f"grants it {self._grants(policy, agent_id)}",
                metadata={"agent": agent_id, "queue": queue},
            )

    async def acquire_many(
        self,
        *,
        queue: str,
        node_id: str,
        agent_id: str,
        max_tasks: int,
        wait_ms: int = 0,
        start: bool = False,
        recheck: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[list[tuple[TaskRecord, Envelope]], int]:
        """Up to `max_tasks` grants for one caller in one call (one round trip).

        Waits like `acquire` until at least one task is ready; then takes as many
        ready tasks as asked in ONE store transaction (one durable commit), each its
        own conditional write with its own token and signed lease, so each is
        exactly a grant `acquire` would have made. Returns the grants (empty when
        none was ready in time) and how long the wait took (ms).

        A grant after a wait is checked again first: the claim under the policy in
        force then, and `recheck` (the servicer's caller check), so a policy change
        or a revocation during a long poll holds for the grant it would have made.

        Raises:
            PolicyDenied: as `acquire` (also when the policy changed during the wait).
            Whatever `recheck` raises (e.g. Unauthenticated: the node was revoked).
        """
        await self.check_claim(queue, agent_id)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + wait_ms / 1000
        waited = False
        while True:
            if waited:  # a long poll may outlive the policy and the node's standing
                await self.check_claim(queue, agent_id)
                if recheck is not None:
                    await recheck()
            got = await self._grant(queue, node_id, agent_id, start, max_tasks)
            if got:
                return got, int((loop.time() - began) * 1000)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return [], 0
            await self._waiters.wait(min(remaining, self.config.long_poll_recheck_ms / 1000))
            waited = True

    async def complete_then_acquire(
        self,
        *,
        node_id: str,
        items: Sequence[HolderTransition],
        queue: str,
        agent_id: str,
        max_tasks: int,
        wait_ms: int = 0,
        start: bool = False,
        recheck: Callable[[], Awaitable[None]] | None = None,
        brief: bool = False,
    ) -> tuple[list[TaskRecord], list[tuple[TaskRecord, Envelope]] | None, int]:
        """`transition_many`, then `acquire_many` for the same holder, sharing ONE store
        transaction (one durable commit) when tasks are ready at once.

        The claim is checked under the policy in force before anything is written;
        when none is ready and `wait_ms` > 0 the wait happens after the ends
        committed, as `acquire_many` waits (with `recheck`). Returns the ended tasks
        (none with `brief`: the store does not read them back), the grants (None when
        the policy stopped the claim, or `recheck` refused the caller, during that
        wait: the ends stand) and how long the wait took (ms).

        Raises:
            PolicyDenied: the agent may not claim from `queue` (nothing is ended).
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition:
                an item was refused (`metadata["index"]`); nothing is ended or granted.
        """
        await self.check_claim(queue, agent_id)
        now = self.clock.now_ms()
        signed: dict[bytes, Envelope] = {}
        tasks, got = await self.store.transitions_then_acquire(
            node_id=node_id,
            items=items,
            now_ms=now,
            then=GrantAsk(
                queue=queue,
                agent_id=agent_id,
                lease_ids=new_ids("l", now, max_tasks),
                sign=self._signer(now, signed),
                start=start,
            ),
            backoff_base_ms=self.config.backoff_base_ms,
            backoff_cap_ms=self.config.backoff_cap_ms,
            sign_end=self.end_signer("control-plane"),
            brief=brief,
        )
        # A task queued again (a retried FAIL) may be what a waiting claim waits for;
        # unread (`brief`), any end but SUCCEED may have queued one.
        if (
            any(item.event is not Event.SUCCEED for item in items)
            if brief
            else any(t.state is State.QUEUED for t in tasks)
        ):
            await self._waiters.notify()
        grants = self._granted(node_id, got, signed)
        if grants or wait_ms <= 0:
            return tasks, grants, 0
        try:
            grants, waited_ms = await self.acquire_many(
                queue=queue,
                node_id=node_id,
                agent_id=agent_id,
                max_tasks=max_tasks,
                wait_ms=wait_ms,
                start=start,
                recheck=recheck,
            )
        except (PolicyDenied, Unauthenticated):  # the ends stand; no grant follows them
            return tasks, None, 0
        return tasks, grants, waited_ms

    async def _grant(
        self, queue: str, node_id: str, agent_id: str, start: bool, count: int
    ) -> list[tuple[TaskRecord, Envelope]]:
        """Up to `count` grants of ready tasks in one store transaction (one durable
        commit), each with its own lease id, token and signed lease; policy already
        checked by the caller."""
        now = self.clock.now_ms()
        signed: dict[bytes, Envelope] = {}
        got = await self.store.acquire_leases(
            queue=queue,
            node_id=node_id,
            agent_id=agent_id,
            lease_ids=new_ids("l", now, count),
            now_ms=now,
            sign=self._signer(now, signed),
            start=start,
        )
        return self._granted(node_id, got, signed)

    def _granted(
        self, node_id: str, got: list[tuple[TaskRecord, bytes]], signed: dict[bytes, Envelope]
    ) -> list[tuple[TaskRecord, Envelope]]:
        """Counts and logs committed grants; pairs each with its signed envelope."""
        if not got:
            return []
        metrics.LEASES_GRANTED.inc(len(got))
        # One line per call, not per grant: at batch sizes the per-record cost of
        # logging was a fifth of the event loop's time. Its fields are built only when
        # the line is written.
        if not log.isEnabledFor(logging.INFO):
            pass
        elif len(got) == 1:
            log.info(
                "lease granted",
                extra={
                    "task_id": got[0][0].task_id,
                    "node_id": node_id,
                    "fencing_token": got[0][0].fencing_token,
                },
            )
        else:
            log.info(
                "leases granted",
                extra={
                    "grants": [f"{t.task_id}:{t.fencing_token}" for t, _ in got],
                    "node_id": node_id,
                },
            )
        # The envelopes the store committed with the grants: a transaction the store
        # retried signed once per attempt, and only the last one counts (matched by
        # their exact bytes, so nothing is parsed again).
        return [
            (task, signed.get(envelope) or Envelope.from_json_bytes(envelope))
            for task, envelope in got
        ]

    async def acquire(
        self, *, queue: str, node_id: str, agent_id: str, wait_ms: int = 0, start: bool = False
    ) -> tuple[TaskRecord, Envelope, int] | None:
        """Leases the oldest ready task of `queue`, waiting up to `wait_ms` for one.

        `start` grants it already RUNNING (LEASE then START in one store write).
        Returns the task, its signed lease and how long it waited (ms, monotonic).

        Raises:
            PolicyDenied: the queue is not declared, or the policy does not let
                `agent_id` claim from it ([agents.NAME].queues).
        """
        grants, waited_ms = await self.acquire_many(
            queue=queue,
            node_id=node_id,
            agent_id=agent_id,
            max_tasks=1,
            wait_ms=wait_ms,
            start=start,
        )
        if not grants:
            return None
        return grants[0][0], grants[0][1], waited_ms

    async def renew(
        self, *, task_id: str, fencing_token: int, node_id: str
    ) -> tuple[TaskRecord, Envelope]:
        """Extends a live lease by the task's TTL; same token, new expiry."""
        await self.policy_in_force.current()  # a renewal is signed under the policy in force
        now = self.clock.now_ms()
        signed: dict[bytes, Envelope] = {}
        task, stored = await self.store.renew_lease(
            task_id=task_id,
            fencing_token=fencing_token,
            node_id=node_id,
            now_ms=now,
            sign=self._signer(now, signed),
        )
        metrics.LEASES_RENEWED.inc()
        return task, Envelope.from_json_bytes(stored)  # the committed one (see acquire)

    async def ever_held(self, task_id: str, node_id: str) -> bool:
        """Whether `node_id` was ever granted a lease on the task (under any token).

        A node that never was is told nothing about the task (see the node RPCs'
        refusals); one that was may learn its current token and state, as a stale
        holder must. Without mTLS every caller counts as a holder.
        """
        if current_principal().insecure:
            return True
        for h in await self.store.lease_history(task_id):
            lease = decode_lease(Envelope.from_json_bytes(h.envelope).payload)
            if lease.node_id == node_id:
                return True
        return False

    async def lease_end(
        self, task_id: str, fencing_token: int, node_id: str
    ) -> tuple[EndReason, State] | None:
        """Why the control plane ended the lease (task, token) of `node_id`, if it did.

        A time limit or a cancel (not a lapse, which the holder judges itself);
        None when the lease is not `node_id`'s or ended otherwise.
        """
        entries = [
            h for h in await self.store.lease_history(task_id) if h.fencing_token == fencing_token
        ]
        if not entries:
            return None
        reason = _ENDED_BY_CONTROL.get(entries[-1].outcome)
        if reason is None:
            return None
        holder = decode_lease(Envelope.from_json_bytes(entries[-1].envelope).payload).node_id
        if holder != node_id and not current_principal().insecure:
            return None
        task = await self.store.get_task(task_id)
        return reason, task.state

    async def transition(
        self,
        *,
        task_id: str,
        fencing_token: int,
        node_id: str,
        event: Event,
        result: bytes = b"",
        error: str = "",
        non_retryable: bool = False,
        failure_type: str = "",
    ) -> TaskRecord:
        """Applies a holder event (START/SUCCEED/FAIL/RELEASE) under the caller's token.

        A FAIL may be retried by the task's retry policy unless `non_retryable`
        or its `failure_type` is listed as non-retryable.
        """
        task = await self.store.transition(
            task_id=task_id,
            event=event,
            fencing_token=fencing_token,
            node_id=node_id,
            now_ms=self.clock.now_ms(),
            result=result,
            error=error,
            non_retryable=non_retryable,
            failure_type=failure_type,
            backoff_base_ms=self.config.backoff_base_ms,
            backoff_cap_ms=self.config.backoff_cap_ms,
            sign_end=self.end_signer("control-plane"),
        )
        if task.state is State.QUEUED:
            await self._waiters.notify()
        return task

    async def transition_many(
        self, *, node_id: str, items: Sequence[HolderTransition]
    ) -> list[TaskRecord]:
        """Applies several of one holder's events in one store transaction, all or nothing.

        Each item is checked and applied as `transition` would; when one is refused
        none is applied and its error (with `metadata["index"]`) is raised.
        """
        tasks = await self.store.transitions(
            node_id=node_id,
            items=items,
            now_ms=self.clock.now_ms(),
            backoff_base_ms=self.config.backoff_base_ms,
            backoff_cap_ms=self.config.backoff_cap_ms,
            sign_end=self.end_signer("control-plane"),
        )
        if any(t.state is State.QUEUED for t in tasks):
            await self._waiters.notify()
        return tasks

    async def sweep_clock(self) -> tuple[int, str]:
        """Now by the clock that judges time limits, and its name.

        The database's (PostgreSQL), so replicas never compare their own clocks;
        else this service's. An injected (test) clock is always used as is.
        """
        if isinstance(self.clock, SystemClock):
            db = await self.store.database_now_ms()
            if db is not None:
                return db, "database"
        return self.clock.now_ms(), "control-plane"

    async def sweep(self) -> list[LapseOutcome]:
        """Ends what the clock ended now: lapsed leases, then the time limits.

        A lapsed or timed-out attempt goes back to queued after its retry delay
        (or expires when attempts are spent); a deadline or schedule-to-start
        timeout expires the task. One clock decides all (`sweep_clock`).
        """
        now, clock = await self.sweep_clock()
        sign_end = self.end_signer(clock)
        out = await self.store.sweep_lapsed(
            now_ms=now,
            backoff_base_ms=self.config.backoff_base_ms,
            backoff_cap_ms=self.config.backoff_cap_ms,
            sign_end=sign_end,
        )
        out += await self.store.sweep_limits(
            now_ms=now,
            backoff_base_ms=self.config.backoff_base_ms,
            backoff_cap_ms=self.config.backoff_cap_ms,
            sign_end=sign_end,
        )
        out = [dataclasses.replace(o, clock=clock) for o in out]
        for o in out:
            metrics.LEASES_EXPIRED.labels(o.state.name.lower()).inc()
            log.info(
                "lease lapsed" if o.reason is EndReason.HEARTBEAT_TIMEOUT else "time limit",
                extra={
                    "task_id": o.task_id,
                    "fencing_token": o.fencing_token,
                    "end_reason": o.reason.label,
                    "state": o.state.name.lower(),
                },
            )
        if any(o.state is State.QUEUED for o in out):
            await self._waiters.notify()
        return out

    # -- policy of a lease, credentials, budgets, tool-call records ---------------------

    async def lease_policy(self, task_id: str, fencing_token: int) -> Policy | None:
        """The policy the lease (task, token) was last signed under, or None if it had none.

        Grants follow the lease, not the newest policy: a lease carries its
        policy digest and every grant is judged by that document.
        """
        raw = await self.store.lease_envelope(task_id, fencing_token)
        if raw is None:
            return None
        digest = decode_lease(Envelope.from_json_bytes(raw).payload).policy_digest
        if not digest:
            return None
        policy = self._policies.get(digest)
        if policy is None:
            rec = await self.store.get_policy_by_digest(digest)
            if rec is None:
                return None
            policy = parse_policy(rec.document)
            self._policies[digest] = policy
        return policy

    async def lease_policy_record(
        self, task_id: str, fencing_token: int, node_id: str
    ) -> PolicyRecord:
        """The policy document a lease of `node_id` was signed under (a node's GetPolicy).

        Raises:
            NotFound: no such lease, or it carries no policy.
            NotOwner: the lease was granted to another node.
        """
        raw = await self.store.lease_envelope(task_id, fencing_token)
        if raw is None:
            raise NotFound(f"no lease on task {task_id} with fencing token {fencing_token}")
        lease = decode_lease(Envelope.from_json_bytes(raw).payload)
        if lease.node_id != node_id and not current_principal().insecure:
            raise NotOwner(f"the lease on task {task_id} was granted to another node")
        if not lease.policy_digest:
            raise NotFound(f"the lease on task {task_id} carries no policy")
        rec = await self.store.get_policy_by_digest(lease.policy_digest)
        if rec is None:
            raise NotFound(f"policy {lease.policy_digest[:12]} is not stored")
        return rec

    async def put_secret(self, name: str, value: bytes) -> int:
        """Seals and stores the next version of secret `name`; returns the version.

        Raises:
            VaultNotConfigured: the control plane has no KEK file.
        """
        vault = self._vault()
        version = await vault.put(self.store, name, value, self.clock.now_ms())
        log.info("secret %s stored as version %d (sealed)", name, version)
        return version

    async def list_secrets(self) -> list[SecretVersionInfo]:
        """Every stored secret version (name, version, KEK id, time); never a value.

        Works without a KEK file: listing opens nothing.
        """
        return await self.store.list_secret_versions()

    def _vault(self) -> Vault:
        if self.vault is None:
            from tether.control.vault import VaultNotConfigured

            raise VaultNotConfigured(
                "the credential vault is not configured: start tether control with --kek-file"
            )
        return self.vault

    async def issue_credential(
        self, *, task_id: str, fencing_token: int, node_id: str, name: str, tool: str
    ) -> tuple[bytes, int]:
        """The value of credential `name` for `tool`, valid until the lease's expiry.

        Raises:
            StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition: no live lease.
            PolicyDenied: the lease's policy does not grant `name` to `tool`, or
                `tool` to the task's queue.
            NotFound: no secret is stored under `name`.
        """
        task = await self.store.check_live_lease(
            task_id=task_id,
            fencing_token=fencing_token,
            node_id=node_id,
            now_ms=self.clock.now_ms(),
        )
        policy = await self.lease_policy(task_id, fencing_token)
        meta = {"credential": name, "tool": tool, "queue": task.queue}
        if policy is None:
            raise PolicyDenied(
                f"credential {name!r} is not granted to tool {tool!r}: the lease on task "
                f"{task_id} carries no policy",
                metadata=meta,
            )
        if tool not in policy.tools_for_queue(task.queue):
            raise PolicyDenied(
                f"credential {name!r} is not granted to tool {tool!r}: the tool is not "
                f"granted to queue {task.queue!r}",
                metadata=meta,
            )
        if not policy.credential_allowed(name, tool):
            raise PolicyDenied(
                f"credential {name!r} is not granted to tool {tool!r} by the lease's policy",
                metadata=meta,
            )
        value = await self._vault().open(self.store, name)
        log.info(
            "credential %s issued",
            name,
            extra={"task_id": task_id, "node_id": node_id, "tool": tool},
        )
        return value, task.lease_expires_unix_ms

    async def _default_budget(self, task_id: str, fencing_token: int) -> int:
        """The queue's budget_micros in the lease's policy (0 without one: only free calls)."""
        task = await self.store.get_task(task_id)
        if task.budget_limit_micros:
            return 0  # the task's own limit wins; the store uses it
        policy = await self.lease_policy(task_id, fencing_token)
        spec = policy.queues.get(task.queue) if policy is not None else None
        return spec.budget_micros if spec is not None else 0

    async def reserve_budget(
        self,
        *,
        task_id: str,
        fencing_token: int,
        node_id: str,
        reservation_id: str,
        amount_micros: int,
    ) -> BudgetState:
        """Atomically reserves spend under the live lease; idempotent on `reservation_id`.

        Raises:
            BudgetExhausted: the limit does not cover it (RESOURCE_EXHAUSTED).
            StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition: no live lease.
        """
        default = await self._default_budget(task_id, fencing_token)
        state = await self.store.reserve_budget(
            task_id=task_id,
            fencing_token=fencing_token,
            node_id=node_id,
            reservation_id=reservation_id,
            amount_micros=amount_micros,
            default_limit_micros=default,
            now_ms=self.clock.now_ms(),
        )
        return state

    async def settle_budget(
        self,
        *,
        task_id: str,
        fencing_token: int,
        node_id: str,
        reservation_id: str,
        actual_micros: int,
    ) -> BudgetState:
        """Replaces a reservation by the actual cost (also after the lease ended)."""
        default = await self._default_budget(task_id, fencing_token)
        return await self.store.settle_budget(
            task_id=task_id,
            fencing_token=fencing_token,
            node_id=node_id,
            reservation_id=reservation_id,
            actual_micros=actual_micros,
            default_limit_micros=default,
            now_ms=self.clock.now_ms(),
        )

    async def record_tool_call(self, write: ToolCallWrite) -> tuple[ToolCallRecord, bool]:
        """Records STARTED or COMPLETED for (task, key) under the live lease."""
        return await self.store.record_tool_call(write, self.clock.now_ms())

    async def start_tool_calls(
        self, writes: Sequence[ToolCallWrite]
    ) -> list[tuple[ToolCallRecord, bool] | TetherError]:
        """Records STARTED for each write, each on its own, sharing the store's commits.

        Concurrent store transactions are group-committed (SQLite: one COMMIT for
        all that wait), so a batch costs about one durable commit, and a refused
        write (its refusal in its place) does not undo the others.
        """
        now = self.clock.now_ms()
        done = await asyncio.gather(
            *(self.store.record_tool_call(w, now) for w in writes), return_exceptions=True
        )
        out: list[tuple[ToolCallRecord, bool] | TetherError] = []
        for item in done:
            if isinstance(item, TetherError):
                out.append(item)
            elif isinstance(item, BaseException):
                raise item
            else:
                out.append(item)
        return out

    async def lookup_tool_call(self, task_id: str, idempotency_key: str) -> ToolCallRecord | None:
        """The record of (task, key), whichever lease wrote it."""
        return await self.store.lookup_tool_call(task_id, idempotency_key)

    # -- nodes and auth ---------------------------------------------------------------

    def enrollment_challenge(self, node_id: str) -> Envelope:
        """A fresh challenge for `node_id`, answered by its enrolment statement."""
        return make_challenge(self.key, node_id, self.clock.now_ms())

    async def register_node(
        self,
        *,
        node_id: str,
        public_key: bytes,
        join_token: str,
        statement: Envelope,
        challenge: Envelope,
        caller: str = "",
    ) -> Enrollment:
        """Enrols or renews a node that proves possession of its key.

        A first enrolment needs a join token bound to `node_id` (or an
        allow-listed key); a re-key needs a token from `RekeyNode`; an enrolled,
        active node renews with its enrolled key and no token. `caller` is the
        node id of the client certificate the call came with, if any.

        Raises:
            Unauthenticated: bad proof, stale challenge, or no valid join token.
            Forbidden: the node id is enrolled with another key, or revoked.
        """
        try:
            return await self._register(
                node_id, public_key, join_token, statement, challenge, caller
            )
        except TetherError as err:
            refuse(
                "enrollment",
                err.reason,
                f"enrolment of node {node_id} refused: {err.message}",
                node_id=node_id,
            )
            raise

    async def _register(
        self,
        node_id: str,
        public_key: bytes,
        join_token: str,
        statement: Envelope,
        challenge: Envelope,
        caller: str,
    ) -> Enrollment:
        now = self.clock.now_ms()
        if caller and caller != node_id:
            raise Forbidden(f"node {caller!r} may not enrol or renew node {node_id!r}")
        try:
            digest = check_challenge(challenge, {self.key.keyid: self.key.public}, node_id, now)
            st = verify_statement(statement, node_id)
            if st.challenge_sha256 != digest:
                raise VerificationError("the statement answers another challenge")
            if st.public_key != public_key:
                raise VerificationError("the statement is signed by another key than public_key")
            tls_key = load_spki(st.tls_public_key)
        except VerificationError as err:
            raise Unauthenticated(f"no proof of possession: {err.message}") from err
        existing = await self.store.get_node(node_id)
        purpose = ""
        renewal = (
            existing is not None
            and existing.status == "active"
            and hmac.compare_digest(existing.public_key, public_key)
        )
        if renewal:
            pass  # the enrolled key proved possession: a token (maybe spent) is not needed
        elif join_token:
            rec = await self.store.consume_join_token(token_sha256(join_token), node_id, now)
            if rec is None:
                raise Unauthenticated(
                    f"join token refused for node {node_id!r}: unknown, used, expired or "
                    "issued for another node; ask an operator for a new one "
                    "(tether nodes token create)"
                )
            purpose = rec.purpose
            # One enrolment per token issue: any other outstanding token is moot now.
            await self.store.void_join_tokens(node_id, now)
            if purpose == "enroll" and existing is not None:
                raise Forbidden(
                    f"node {node_id!r} is already enrolled; a join token cannot re-key it "
                    "(an operator runs `tether nodes rekey`)"
                )
        elif existing is None:
            allowed = any(
                fnmatch.fnmatchcase(node_id, glob) and hmac.compare_digest(key, public_key)
                for glob, key in self.auth.allowed_node_keys
            )
            if not allowed:
                raise Unauthenticated(
                    f"node {node_id!r} is not enrolled: present a join token "
                    "(tether nodes token create) or a key allow-listed for this node id"
                )
            # A revocation holds for the key, not only for the node id it had.
            for other in await self.store.list_nodes():
                if other.status == "revoked" and hmac.compare_digest(other.public_key, public_key):
                    raise Forbidden(
                        f"the key of node {node_id!r} was revoked with node {other.node_id!r}; "
                        "an allow-listed key cannot come back under another id"
                    )
        else:
            if existing.status != "active":
                raise Forbidden(
                    f"node {node_id!r} is revoked: {existing.status_reason or 'by an operator'}"
                )
            if not hmac.compare_digest(existing.public_key, public_key):
                raise Forbidden(
                    f"node {node_id!r} is enrolled with another key; only an operator can "
                    "re-key it (tether nodes rekey)"
                )
        keyid = keyid_of(public_key)
        cert_env: Envelope | None = None
        if existing is not None and existing.public_key == public_key and purpose != "rekey":
            cert_env = Envelope.from_json_bytes(existing.certificate)
            try:  # reissued when it nears expiry or was signed by a rotated-out control key
                old = verify_cert(cert_env, {self.key.keyid: self.key.public})
                if old.expires_unix_ms <= now + self.auth.node_cert_ttl_ms:
                    cert_env = None
            except VerificationError:
                cert_env = None
        if cert_env is None or purpose == "rekey" or existing is None:
            _, cert_env = issue_cert(
                self.key, node_id, public_key, now, self.config.cert_validity_ms
            )
            await self.store.put_node(
                NodeRecord(node_id, public_key, cert_env.to_json_bytes(), now, "active", "", now)
            )
            self._node_cache.pop(node_id, None)  # a re-key refuses the earlier key at once
            log.info(
                "node enrolled",
                extra={"node_id": node_id, "keyid": keyid, "rekey": purpose == "rekey"},
            )
        pem, expires, spiffe = "", 0, ""
        if self.auth.ca is not None:
            # X.509 validity is checked by the TLS stacks against the wall clock, not
            # the service's (possibly fake) clock, so the certificate is dated by it.
            wall_ms = SystemClock().now_ms()
            x = self.auth.ca.issue_node(
                node_id, keyid, tls_key, wall_ms, self.auth.node_cert_ttl_ms
            )
            pem = cert_pem(x).decode()
            expires = int(x.not_valid_after_utc.timestamp() * 1000)
            spiffe = node_spiffe_id(self.auth.trust_domain, node_id)
        return Enrollment(cert_env, pem, expires, spiffe)

    async def check_node(self, node_id: str) -> None:
        """Checks that the caller is node `node_id`, enrolled, active, with its current key.

        Read from the store on every call, so a revocation or re-key done through
        any replica holds on every replica at once.

        Raises:
            Unauthenticated: unknown node, revoked, a certificate of an earlier key,
                or an expired certificate (on a connection opened before it expired).
            NotOwner: the certificate is another node's.
            Forbidden: the caller is not a node.
        """
        principal = current_principal()
        if principal.insecure:
            return
        if not principal.is_node or principal.identity is None:
            raise Forbidden(f"{principal.kind} {principal.name!r} is not a node")
        try:  # again here: a stream's later requests come long after its start
            check_unexpired(principal)
        except Unauthenticated as err:
            refuse("certificate", "CERT_EXPIRED", f"node certificate refused: {err.message}",
                   node_id=node_id)  # fmt: skip
            raise
        if principal.name != node_id:
            raise NotOwner(
                f"the client certificate is node {principal.name!r}'s; the request names "
                f"node {node_id!r}"
            )
        rec = await self._active_node(node_id)
        reason = ""
        if rec is None:
            reason = f"node {node_id!r} is not enrolled"
        elif rec.status != "active":
            reason = f"node {node_id!r} is revoked"
        elif keyid_of(rec.public_key) != principal.identity.node_keyid:
            reason = f"node {node_id!r} was re-keyed; this certificate is for its earlier key"
        if reason:
            refuse(
                "certificate",
                "NODE_NOT_ACTIVE",
                f"node certificate refused: {reason}",
                node_id=node_id,
            )
            raise Unauthenticated(reason)

    async def _active_node(self, node_id: str) -> NodeRecord | None:
        """The node's row: reused for `node_check_cache_ms` while active, else re-read.

        A node RPC used to read the row every time (one store round trip per call;
        a network one on PostgreSQL). Revocations and re-keys through this replica
        drop the entry at once; through another, they hold here within the bound.
        """
        ttl = self.config.node_check_cache_ms / 1000
        now = time.monotonic()
        hit = self._node_cache.get(node_id)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        rec = await self.store.get_node(node_id)
        if ttl > 0 and rec is not None and rec.status == "active":
            if len(self._node_cache) >= _NODE_CACHE_MAX_ENTRIES:
                self._node_cache.clear()  # bounded: a flood of node ids cannot grow it
            self._node_cache[node_id] = (now, rec)
        else:
            self._node_cache.pop(node_id, None)
        return rec

    def caller_node(self) -> str:
        """The node id of the caller (after `check_node`); "" in insecure mode."""
        principal = current_principal()
        return principal.name if principal.is_node else ""

    async def check_holds(self, task_id: str, node_id: str) -> TaskRecord:
        """The task, if `node_id` holds (or last held) its lease.

        Raises:
            NotFound: no such task.
            NotOwner: another node holds it.
        """
        task = await self.store.get_task(task_id)
        if current_principal().insecure:
            return task
        if task.node_id != node_id:
            raise NotOwner(f"task {task_id} is not leased to node {node_id!r}")
        return task

    async def create_join_token(
        self, node_id: str, ttl_ms: int, *, rekey: bool = False
    ) -> tuple[str, int]:
        """A single-use join token for `node_id`; only its SHA-256 is stored.

        Raises:
            AlreadyExists: `node_id` is enrolled (not `rekey`).
            NotFound: `node_id` is not enrolled (`rekey`).
        """
        existing = await self.store.get_node(node_id)
        if rekey and existing is None:
            raise NotFound(f"node {node_id!r} is not enrolled; create a join token instead")
        if not rekey and existing is not None:
            raise AlreadyExists(
                f"node {node_id!r} is already enrolled; use `tether nodes rekey {node_id}` "
                "to give it a new key"
            )
        now = self.clock.now_ms()
        if rekey:  # only the newest re-key token of a node is ever valid
            await self.store.void_join_tokens(node_id, now)
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = now + (ttl_ms or DEFAULT_JOIN_TOKEN_TTL_MS)
        await self.store.put_join_token(
            JoinTokenRecord(
                token_sha256(token), node_id, "rekey" if rekey else "enroll", now, expires
            )
        )
        log.info(
            "join token created",
            extra={"node_id": node_id, "rekey": rekey, "expires_unix_ms": expires},
        )
        return token, expires

    async def revoke_node(self, node_id: str, reason: str) -> NodeRecord:
        """Revokes a node on every replica (its certificates are refused from the next call).

        Raises:
            NotFound: no such node.
        """
        now = self.clock.now_ms()
        self._node_cache.pop(node_id, None)
        rec = await self.store.set_node_status(node_id, "revoked", reason, now)
        self._node_cache.pop(node_id, None)  # and any refill while the write ran
        if rec is None:
            raise NotFound(f"node {node_id!r} is not enrolled")
        voided = await self.store.void_join_tokens(node_id, now)  # no way back in by a token
        if voided:
            log.warning("join tokens voided by revocation", extra={"node_id": node_id})
        log.warning("node revoked", extra={"node_id": node_id, "reason": reason})
        return rec

    async def list_nodes(self) -> list[NodeRecord]:
        return await self.store.list_nodes()


def _end_text(end: LapseOutcome) -> str:
    """The words of a control receipt: which limit and when, or whose decision."""
    if end.reason is EndReason.HEARTBEAT_TIMEOUT:
        return "heartbeat timeout: the lease was not renewed before it expired"
    if end.reason is EndReason.CANCELED:
        return f"canceled: {end.note}" if end.note else "canceled"
    if end.reason is EndReason.RELEASED:
        return f"released by its holder: {end.note}" if end.note else "released by its holder"
    return f"{end.reason.label.replace('_', ' ')}: the limit fell due at {end.limit_unix_ms}"


def new_id(prefix: str, now_ms: int) -> str:
    """A time-ordered random id, e.g. t_018c2f3a1b2c_9f86d081884c7d65."""
    return f"{prefix}_{now_ms:012x}_{secrets.token_hex(8)}"


def new_ids(prefix: str, now_ms: int, count: int) -> list[str]:
    """`count` ids as `new_id` makes them, from one read of the random source."""
    raw = secrets.token_hex(8 * count)
    return [f"{prefix}_{now_ms:012x}_{raw[i : i + 16]}" for i in range(0, 16 * count, 16)]


def _page_filter(queue: str, state: State | None) -> str:
    return hashlib.sha256(f"{queue}\0{int(state or 0)}".encode()).hexdigest()[:16]


def encode_page_token(seq: int, queue: str, state: State | None) -> str:
    """An opaque cursor bound to the filters it was made for."""
    doc = json.dumps({"a": seq, "f": _page_filter(queue, state)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def decode_page_token(token: str, queue: str, state: State | None) -> int:
    """The cursor in `token` (0 for none).

    Raises:
        InvalidArgument: malformed, or made for other filters (field page_token).
    """
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        seq, filt = doc["a"], doc["f"]
        # A store column holds at most 2^63-1: a forged cursor beyond it is malformed.
        if not isinstance(seq, int) or not 0 <= seq < 1 << 63 or not isinstance(filt, str):
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidArgument("page_token", "not a token this server issued") from err
    if filt != _page_filter(queue, state):
        raise InvalidArgument("page_token", "was issued for other queue/state filters")
    return seq
