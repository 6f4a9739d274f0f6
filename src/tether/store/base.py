"""The `Store` interface: everything the control plane persists.

Stores know nothing of gRPC or protobuf. Every task state change is one
conditional write on (task id, allowed source states from
`tether.core.states.sources`, fencing token), so two writers never both win.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

from tether.core.states import Event, State
from tether.core.timeouts import (
    DEFAULT_BACKOFF_COEFFICIENT,
    DEFAULT_INITIAL_INTERVAL_MS,
    DEFAULT_MAXIMUM_INTERVAL_MS,
    EndReason,
    RetryPolicy,
)

DEFAULT_MAX_ATTEMPTS = 3

# What a shared store announces a new policy version on (see `Notifier`).
POLICY_CHANNEL = "tether_policy"


@dataclass(frozen=True)
class NewTask:
    """What a submitter supplies; defaults are resolved before it gets here."""

    queue: str
    payload: bytes
    max_attempts: int
    lease_ttl_ms: int
    idempotency_key: str = ""
    budget_limit_micros: int = 0
    attempt_timeout_ms: int = 0
    """Start-to-close; 0: none."""
    deadline_ms: int = 0
    """Schedule-to-close, counted from submission; 0: none."""
    schedule_to_start_ms: int = 0
    """How long the task may wait ready for a lease; 0: none."""
    retry: RetryPolicy | None = None
    """None: the control plane's defaults (lapses retried, failures not)."""
    submitted_by: str = ""
    """"ROLE:NAME" of the submitting operator (`tether.control.authz.principal_tag`)."""


@dataclass(frozen=True)
class TaskRecord:
    """A stored task (fields mirror `tether.v1.Task`)."""

    task_id: str
    queue: str
    state: State
    payload: bytes
    attempt: int
    max_attempts: int
    fencing_token: int
    node_id: str
    agent_id: str
    lease_id: str
    lease_expires_unix_ms: int
    lease_ttl_ms: int
    result: bytes
    error: str
    created_unix_ms: int
    updated_unix_ms: int
    not_before_unix_ms: int
    idempotency_key: str
    budget_limit_micros: int
    budget_spent_micros: int
    seq: int = 0
    attempt_timeout_ms: int = 0
    deadline_unix_ms: int = 0
    schedule_to_start_ms: int = 0
    retry_initial_ms: int = 0
    retry_coefficient: float = 0.0
    retry_max_interval_ms: int = 0
    retry_failures: bool = False
    non_retryable: tuple[str, ...] = ()
    attempt_started_unix_ms: int = 0
    end_reason: int = 0
    """A `tether.core.timeouts.EndReason` value; 0 while no attempt has ended."""
    submitted_by: str = ""
    """"ROLE:NAME" of the submitting operator; "" for tasks from before migration 0011."""

    def retry_policy(
        self,
        base_ms: int = DEFAULT_INITIAL_INTERVAL_MS,
        cap_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS,
    ) -> RetryPolicy:
        """The task's retry policy; fields stored as 0 (older rows) take the defaults given."""
        return stored_retry_policy(
            self.retry_initial_ms,
            self.retry_coefficient,
            self.retry_max_interval_ms,
            self.max_attempts,
            self.non_retryable,
            self.retry_failures,
            base_ms,
            cap_ms,
        )


def stored_retry_policy(
    initial_ms: int,
    coefficient: float,
    max_interval_ms: int,
    max_attempts: int,
    non_retryable: tuple[str, ...],
    retry_failures: bool,
    base_ms: int = DEFAULT_INITIAL_INTERVAL_MS,
    cap_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS,
) -> RetryPolicy:
    """A task's retry policy from its stored retry fields (`TaskRecord.retry_policy`); a
    function of those values alone, so callers may cache it by them."""
    initial = initial_ms or base_ms
    return RetryPolicy(
        initial_interval_ms=initial,
        backoff_coefficient=coefficient or DEFAULT_BACKOFF_COEFFICIENT,
        maximum_interval_ms=max(max_interval_ms or cap_ms, initial),
        maximum_attempts=max(max_attempts, 1),
        non_retryable_reasons=non_retryable,
        retry_failures=retry_failures,
    )


@dataclass(frozen=True)
class HolderTransition:
    """One lease holder's event on one task, as `Store.transition` takes it."""

    task_id: str
    """The task."""
    event: Event
    """START, SUCCEED, FAIL or RELEASE."""
    fencing_token: int
    """The holder's lease token; any other is refused."""
    result: bytes = b""
    """SUCCEED/FAIL: the task's result."""
    error: str = ""
    """FAIL/RELEASE: why."""
    non_retryable: bool = False
    """FAIL: never retried, whatever the retry policy says."""
    failure_type: str = ""
    """FAIL: the failure's type, checked against the retry policy's non-retryable list."""


@dataclass(frozen=True)
class LeaseHistoryEntry:
    """One signed lease grant or renewal and how that lease ended."""

    task_id: str
    lease_id: str
    fencing_token: int
    kind: str  # "grant" or "renew"
    envelope: bytes  # DSSE JSON bytes exactly as signed
    outcome: str  # active, released, lapsed, finished, canceled
    created_unix_ms: int


# What a node's `status` may be: "active" nodes are served, "revoked" ones are not.
NODE_STATUSES = frozenset({"active", "revoked"})

# What a join token may be used for: a first enrolment, or a new key for a known node.
JOIN_TOKEN_PURPOSES = frozenset({"enroll", "rekey"})


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node; its identity is proven by its mTLS client certificate.

    `status` is "active" or "revoked" (`NODE_STATUSES`); `status_reason` says why
    it was last set, and `updated_unix_ms` when (0: never since enrolment).
    """

    node_id: str
    public_key: bytes
    certificate: bytes
    registered_unix_ms: int
    status: str = "active"
    status_reason: str = ""
    updated_unix_ms: int = 0

    def __post_init__(self) -> None:
        if self.status not in NODE_STATUSES:
            raise ValueError(f"node status must be one of {sorted(NODE_STATUSES)}")


@dataclass(frozen=True)
class JoinTokenRecord:
    """A per-node, single-use, expiring join token; only its SHA-256 is kept.

    `purpose` is "enroll" or "rekey" (`JOIN_TOKEN_PURPOSES`); `used_unix_ms` is
    None until the token is consumed.
    """

    token_sha256: str
    node_id: str
    purpose: str
    created_unix_ms: int
    expires_unix_ms: int
    used_unix_ms: int | None = None

    def __post_init__(self) -> None:
        if self.purpose not in JOIN_TOKEN_PURPOSES:
            raise ValueError(f"join token purpose must be one of {sorted(JOIN_TOKEN_PURPOSES)}")
        if self.expires_unix_ms <= self.created_unix_ms:
            raise ValueError("a join token must expire after it is created")


@dataclass(frozen=True)
class PolicyRecord:
    """One stored policy document version."""

    version: int
    document: str
    digest: str
    created_unix_ms: int


@dataclass(frozen=True)
class SecretVersionInfo:
    """One stored secret version without its sealed bytes (for listings and KEK reports)."""

    name: str
    version: int
    kek_id: str
    created_unix_ms: int


@dataclass(frozen=True)
class SealedSecret:
    """Opaque sealed secret bytes (tether.crypto.sealing decides their meaning)."""

    name: str
    version: int
    kek_id: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes
    created_unix_ms: int


@dataclass(frozen=True)
class LapseOutcome:
    """A lease or task the sweeper ended: the task went back to queued or expired.

    `reason` says which limit: the heartbeat timeout (a lapsed lease), the
    attempt timeout, the schedule-to-start timeout or the deadline.
    """

    task_id: str
    fencing_token: int
    state: State
    not_before_unix_ms: int
    reason: EndReason = EndReason.HEARTBEAT_TIMEOUT
    limit_unix_ms: int = 0
    """When the limit fell due (by the deciding clock)."""
    decided_unix_ms: int = 0
    """When the sweeper ended it (by the same clock)."""
    attempt: int = 0
    node_id: str = ""
    agent_id: str = ""
    lease_id: str = ""
    clock: str = ""
    """Which clock decided: "database" (PostgreSQL's) or "control-plane"."""
    note: str = ""
    """Words of whoever ended it (an operator's cancel reason, a holder's release
    reason), for its control receipt."""


class ToolCallPhase(IntEnum):
    """Stage of an idempotent tool call (values match `tether.v1.ToolCallPhase`)."""

    STARTED = 1
    COMPLETED = 2


@dataclass(frozen=True)
class ToolCallRecord:
    """The recorded (task, idempotency key) of a tool call; keyed by task, not lease."""

    task_id: str
    idempotency_key: str
    tool: str
    arguments_sha256: str
    phase: ToolCallPhase
    result: bytes
    status: str
    fencing_token: int
    cost_micros: int
    updated_unix_ms: int
    node_id: str = ""
    """Node of the lease that wrote (or took over) the record; '' for records
    written before it was kept."""


@dataclass(frozen=True)
class ToolCallWrite:
    """One RecordToolCall: STARTED (no outcome) or COMPLETED (redacted outcome)."""

    task_id: str
    fencing_token: int
    node_id: str
    idempotency_key: str
    tool: str
    arguments_sha256: str
    phase: ToolCallPhase
    result: bytes = b""
    status: str = ""
    cost_micros: int = 0
    take_over: bool = False
    """STARTED only: re-stamp an earlier lease's STARTED record with this lease
    (the caller runs the call again); see `Store.record_tool_call`."""


@dataclass(frozen=True)
class BudgetState:
    """A task's budget after a reservation or settlement.

    `spent_micros` counts settled costs plus open reservations.
    """

    limit_micros: int
    spent_micros: int
    existed: bool = False  # an idempotent repeat of an earlier reserve/settle

    @property
    def remaining_micros(self) -> int:
        """What may still be reserved (never negative, even if the limit shrank)."""
        return max(self.limit_micros - self.spent_micros, 0)


@dataclass(frozen=True)
class LedgerHead:
    """A node's last stored receipt in the ledger."""

    seq: int
    digest: str  # hex SHA-256 of its envelope: the next receipt's prev
    leaf_index: int


@dataclass(frozen=True)
class LedgerLeaf:
    """One verified receipt to append (the store assigns its leaf index)."""

    seq: int
    task_id: str
    envelope: bytes  # DSSE JSON bytes exactly as the node signed them
    leaf_hash: bytes  # RFC 6962 SHA-256(0x00 || envelope)
    digest: str  # hex SHA-256(envelope)
    tool_call: ToolCallWrite | None = None
    """A keyed tool call's outcome that rode with its receipt (phase COMPLETED):
    `ledger_append` completes the key's STARTED record with it in the same
    transaction, under the rule of `tether.store.common.RECEIPT_COMPLETES`."""


@dataclass(frozen=True)
class LedgerFrontier:
    """The Merkle frontier of the first `tree_size` leaves (see `tether.crypto.merkle`)."""

    tree_size: int
    hashes: tuple[bytes, ...]
    leaves: int = 0
    """How many leaves are stored (> tree_size while the frontier is behind)."""


@dataclass(frozen=True)
class LedgerEntry:
    """A stored receipt as an export needs it."""

    leaf_index: int
    node_id: str
    seq: int
    task_id: str
    envelope: bytes


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed tree head (C2SP signed note) as stored."""

    tree_size: int
    root_hash: bytes
    timestamp_unix_ms: int
    note: str


# Seals a secret value for the version the store assigns; called inside the
# store's transaction so the version in the AEAD's associated data is the one
# the row gets.
SecretSealFn = Callable[[int], SealedSecret]

# Re-wraps one stored secret (returns None when it needs nothing).
SecretRewrapFn = Callable[[SealedSecret], SealedSecret | None]


# Signs a lease for the task as it is after the grant/renewal; returns the
# envelope bytes to store. Called inside the store's transaction so the grant
# and its signed record commit together.
LeaseSigner = Callable[[TaskRecord], bytes]


# Signs an end the control plane decided (a lapse, a time limit, a release, a
# cancel) as a control receipt: (the end, the last signed grant or renewal of
# the lease it ended, b"" when none was live) -> DSSE JSON bytes. Called inside
# the store's transaction, so the receipt commits with the change or not at all.
EndSigner = Callable[["LapseOutcome", bytes], bytes]


@dataclass(frozen=True)
class GrantAsk:
    """Grants asked for by one caller (`Store.acquire_leases` fields, the node apart)."""

    queue: str
    """The queue to take ready tasks from, oldest first."""
    agent_id: str
    """The agent the leases are for."""
    lease_ids: Sequence[str]
    """One fresh lease id per grant asked for (so also how many, at most)."""
    sign: LeaseSigner
    """Signs each granted lease inside the transaction."""
    start: bool = False
    """Grant the tasks already RUNNING (LEASE then START in one write)."""


class Store(Protocol):
    """Persistence for the control plane. All times are Unix milliseconds."""

    async def open(self) -> None:
        """Connects and applies pending migrations."""
        ...

    async def close(self) -> None:
        """Closes the connection; pending writes are durable."""
        ...

    async def submit_task(
        self, task: NewTask, task_id: str, now_ms: int
    ) -> tuple[TaskRecord, bool]:
        """Inserts a queued task, or returns the one with the same idempotency key.

        Returns:
            (task, created).

        Raises:
            IdempotencyConflict: the key names a task with another queue or payload.
        """
        ...

    async def get_task(self, task_id: str) -> TaskRecord:
        """Raises NotFound if there is no such task."""
        ...

    async def list_tasks(
        self, *, queue: str, state: State | None, after_seq: int, limit: int
    ) -> list[TaskRecord]:
        """Tasks with seq > after_seq in creation order, filtered; at most `limit`."""
        ...

    async def count_tasks_by_state(self) -> dict[State, int]:
        """Number of tasks in each state (one aggregate query, for metrics)."""
        ...

    async def lease_history(self, task_id: str) -> list[LeaseHistoryEntry]:
        """Every lease grant and renewal of a task, oldest first."""
        ...

    async def acquire_lease(
        self,
        *,
        queue: str,
        node_id: str,
        agent_id: str,
        lease_id: str,
        now_ms: int,
        sign: LeaseSigner,
        start: bool = False,
    ) -> tuple[TaskRecord, bytes] | None:
        """Leases the oldest ready task of `queue` (fencing token +1, attempt +1).

        With `start`, the same conditional write also applies START, so the task is
        granted RUNNING (claim-and-run workers save a round trip); nothing else changes.
        Returns the leased task and the signed envelope, or None when none is ready.
        """
        ...

    async def acquire_leases(
        self,
        *,
        queue: str,
        node_id: str,
        agent_id: str,
        lease_ids: Sequence[str],
        now_ms: int,
        sign: LeaseSigner,
        start: bool = False,
    ) -> list[tuple[TaskRecord, bytes]]:
        """Up to `len(lease_ids)` grants as `acquire_lease` makes them, in ONE transaction.

        Each grant is its own conditional write with its own token, lease id (in
        order) and signed envelope, exactly what `acquire_lease` would have made;
        they commit together (one durable commit for all). Returns the grants in
        queue order; fewer (or none) when fewer tasks are ready.
        """
        ...

    async def renew_lease(
        self, *, task_id: str, fencing_token: int, node_id: str, now_ms: int, sign: LeaseSigner
    ) -> tuple[TaskRecord, bytes]:
        """Moves a live lease's expiry to now + the task's TTL, same token.

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def transition(
        self,
        *,
        task_id: str,
        event: Event,
        fencing_token: int,
        node_id: str,
        now_ms: int,
        result: bytes = b"",
        error: str = "",
        non_retryable: bool = False,
        failure_type: str = "",
        backoff_base_ms: int = DEFAULT_INITIAL_INTERVAL_MS,
        backoff_cap_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS,
        sign_end: EndSigner | None = None,
    ) -> TaskRecord:
        """Applies a lease holder's event under its fencing token.

        A FAIL the task's retry policy retries (`RetryPolicy.retries_failure`,
        attempts permitting) sends the task back to queued after the policy's
        delay (end reason FAILED), else to failed (FAILED or NON_RETRYABLE).
        A RELEASE stores the control receipt `sign_end` makes of it (if given).

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def transitions(
        self,
        *,
        node_id: str,
        items: Sequence[HolderTransition],
        now_ms: int,
        backoff_base_ms: int = DEFAULT_INITIAL_INTERVAL_MS,
        backoff_cap_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS,
        sign_end: EndSigner | None = None,
    ) -> list[TaskRecord]:
        """Applies several of one holder's events, each as `transition` would, in ONE transaction.

        All or nothing: when any item is refused, none is applied and the item's own
        error is raised with `metadata["index"]` naming it (0-based). Returns the
        tasks after their transitions, in item order.

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def transitions_then_acquire(
        self,
        *,
        node_id: str,
        items: Sequence[HolderTransition],
        now_ms: int,
        then: GrantAsk,
        backoff_base_ms: int = DEFAULT_INITIAL_INTERVAL_MS,
        backoff_cap_ms: int = DEFAULT_MAXIMUM_INTERVAL_MS,
        sign_end: EndSigner | None = None,
        brief: bool = False,
    ) -> tuple[list[TaskRecord], list[tuple[TaskRecord, bytes]]]:
        """`transitions`, then `acquire_leases` for the same node, in ONE transaction.

        A worker that ends a batch and takes the next pays one durable commit, not
        two. All or nothing as `transitions`: when an item is refused its error is
        raised (with `metadata["index"]`) and nothing is ended or granted. Returns
        the ended tasks in item order and the grants in queue order (possibly none).
        `brief`: the same writes and refusals, but the ended tasks are not read back
        (the first list is empty), for a caller that answers with the grants only.

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def cancel_task(
        self, task_id: str, reason: str, now_ms: int, sign_end: EndSigner | None = None
    ) -> TaskRecord:
        """Cancels a queued, leased or running task, with its control receipt (if `sign_end`).

        Raises:
            NotFound, InvalidTransition.
        """
        ...

    async def sweep_lapsed(
        self,
        *,
        now_ms: int,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        limit: int = 1000,
        sign_end: EndSigner | None = None,
    ) -> list[LapseOutcome]:
        """Ends every lease that lapsed at `now_ms` (LAPSE event), at most `limit`.

        The backoff is the task's retry policy (base/cap stand in for fields
        stored as 0). Each lapse stores the control receipt `sign_end` makes of
        it (if given), in the same write.
        """
        ...

    async def sweep_limits(
        self,
        *,
        now_ms: int,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        limit: int = 1000,
        sign_end: EndSigner | None = None,
    ) -> list[LapseOutcome]:
        """Ends what a time limit ended at `now_ms`, at most `limit` of each kind.

        Deadline (TIME_OUT: expired from queued, leased or running), then the
        schedule-to-start timeout (TIME_OUT from queued), then the attempt timeout
        (LAPSE: queued again after the retry delay, or expired). Each is one
        conditional write; the lease (if any) is fenced at once and its history
        row records the reason; each stores the control receipt `sign_end` makes
        of it (if given).
        """
        ...

    async def database_now_ms(self) -> int | None:
        """The database server's own clock, Unix ms; None for an embedded store.

        With several replicas this one clock judges the time limits, so no
        replica's clock (or skew between them) decides when a task ends.
        """
        ...

    async def control_receipts(self, task_id: str) -> list[bytes]:
        """The task's control receipts (DSSE JSON bytes), oldest first."""
        ...

    async def next_lease_expiry(self) -> int | None:
        """Earliest expiry of a live lease, or None."""
        ...

    async def put_node(self, node: NodeRecord) -> None:
        """Adds or replaces (by node id) a node's enrolment, status included."""
        ...

    async def get_node(self, node_id: str) -> NodeRecord | None:
        """The node, or None."""
        ...

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node, ordered by node id."""
        ...

    async def set_node_status(
        self, node_id: str, status: str, reason: str, now_ms: int
    ) -> NodeRecord | None:
        """Sets a node's status and reason (updated at `now_ms`); returns the node after.

        Returns None, changing nothing, when there is no such node.

        Raises:
            InvalidArgument: `status` is not one of `NODE_STATUSES`.
        """
        ...

    async def put_join_token(self, token: JoinTokenRecord) -> None:
        """Stores a newly issued join token (by its SHA-256).

        Raises:
            AlreadyExists: a token with this SHA-256 is already stored.
        """
        ...

    async def consume_join_token(
        self, token_sha256: str, node_id: str, now_ms: int
    ) -> JoinTokenRecord | None:
        """Marks a join token used at `now_ms` and returns it, as ONE conditional write.

        Only a token that exists, belongs to `node_id`, is unused and has
        `expires_unix_ms > now_ms` is consumed; otherwise this returns None and
        changes nothing. Of concurrent consumers (several replicas included),
        exactly one wins. The caller checks the returned record's `purpose`.
        """
        ...

    async def void_join_tokens(self, node_id: str, now_ms: int) -> int:
        """Marks every unused join token of `node_id` used (a revocation, a new re-key
        token, or a completed enrolment makes them moot); returns how many."""
        ...

    async def put_policy(self, document: str, digest: str, now_ms: int) -> PolicyRecord:
        """Stores the next policy version."""
        ...

    async def get_policy(self, version: int = 0) -> PolicyRecord | None:
        """A version (0: the latest), or None."""
        ...

    async def put_secret(self, secret: SealedSecret) -> int:
        """Stores the next version of a sealed secret; returns that version.

        `secret.version` is ignored; the store assigns it.
        """
        ...

    async def get_secret(self, name: str, version: int = 0) -> SealedSecret | None:
        """A sealed secret version (0: the latest), or None."""
        ...

    async def list_secret_versions(self) -> list[SecretVersionInfo]:
        """Every stored secret version, by name then version; never the sealed bytes."""
        ...

    async def put_sealed_secret(self, name: str, seal: SecretSealFn) -> int:
        """Stores the next version of secret `name` as `seal(version)`; returns the version.

        `seal` runs inside the transaction that assigns the version, so concurrent
        puts never seal for a version they do not get.
        """
        ...

    async def rewrap_secrets(self, rewrap: SecretRewrapFn) -> int:
        """Replaces every secret row `rewrap` returns a new form for, in ONE transaction.

        Returns how many rows changed. If `rewrap` raises, nothing changes.
        """
        ...

    async def get_policy_by_digest(self, digest: str) -> PolicyRecord | None:
        """The latest stored version with this digest, or None."""
        ...

    async def lease_envelope(self, task_id: str, fencing_token: int) -> bytes | None:
        """The latest signed lease (grant or renewal) for (task, token), or None."""
        ...

    async def check_live_lease(
        self, *, task_id: str, fencing_token: int, node_id: str, now_ms: int
    ) -> TaskRecord:
        """The task if `node_id` holds its live lease under `fencing_token`.

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def reserve_budget(
        self,
        *,
        task_id: str,
        fencing_token: int,
        node_id: str,
        reservation_id: str,
        amount_micros: int,
        default_limit_micros: int,
        now_ms: int,
    ) -> BudgetState:
        """Reserves `amount_micros` iff spent + amount <= limit, as one conditional write.

        The limit is the task's `budget_limit_micros`, or `default_limit_micros`
        when that is 0. A repeat of the same reservation id returns the budget
        without reserving again.

        Raises:
            BudgetExhausted: the limit does not cover it (metadata remaining_micros).
            IdempotencyConflict: the id was used with another amount or lease.
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def settle_budget(
        self,
        *,
        task_id: str,
        fencing_token: int,
        node_id: str,
        reservation_id: str,
        actual_micros: int,
        default_limit_micros: int,
        now_ms: int,
    ) -> BudgetState:
        """Replaces a reservation by its actual cost (allowed after the lease ended).

        Raises:
            NotFound: no such reservation.
            InvalidArgument: actual exceeds the reserved amount (field actual_micros).
            StaleFencingToken / NotOwner: it was reserved under another token / node.
            IdempotencyConflict: settled before with another actual cost.
        """
        ...

    async def record_tool_call(
        self, write: ToolCallWrite, now_ms: int
    ) -> tuple[ToolCallRecord, bool]:
        """Records STARTED (insert if absent) or COMPLETED (never overwrites a COMPLETED).

        Needs the live lease under the current fencing token. Returns (record now,
        existed before).

        Raises:
            IdempotencyConflict: the key was recorded with another tool or arguments.
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def lookup_tool_call(self, task_id: str, idempotency_key: str) -> ToolCallRecord | None:
        """The record of (task, key), or None."""
        ...

    # -- receipt ledger (tether.control.ledger decides; the store only keeps) --------

    async def ledger_head(self, node_id: str) -> LedgerHead | None:
        """The node's highest-seq stored receipt, or None."""
        ...

    async def ledger_envelopes(self, node_id: str, seqs: list[int]) -> dict[int, tuple[bytes, int]]:
        """{seq: (envelope, leaf index)} for those of `seqs` the node has stored."""
        ...

    async def ledger_append(
        self, node_id: str, expect: LedgerHead | None, leaves: list[LedgerLeaf], now_ms: int
    ) -> list[int] | None:
        """Appends `leaves` (the node's next seqs, in order) in ONE transaction.

        Leaf indexes are assigned after the highest stored one, serialized across
        every writer (several replicas included), so the leaves stay contiguous.
        Returns the assigned indexes, or None (nothing written) when the node's
        stored head is no longer `expect` (another writer appended meanwhile).
        A leaf carrying a `tool_call` completes that key's STARTED record in the
        same transaction (`tether.store.common.RECEIPT_COMPLETES`), so a receipt is
        never acknowledged without the record it carries.
        """
        ...

    async def ledger_leaf_hashes(self, start: int, limit: int | None = None) -> list[bytes]:
        """Leaf hashes with index >= `start` (at most `limit`), in index order."""
        ...

    async def ledger_frontier(self) -> LedgerFrontier:
        """The stored Merkle frontier and how many leaves are stored.

        Every append keeps the frontier current; a ledger stored before the
        frontier existed has it behind (`tree_size < leaves`) until caught up
        with `ledger_advance_frontier`.
        """
        ...

    async def ledger_advance_frontier(
        self,
        expect_size: int,
        frontier: LedgerFrontier,
        subtrees: list[tuple[int, int, bytes]],
    ) -> bool:
        """Stores a frontier computed from `expect_size` onwards, and its completed subtrees.

        A compare-and-set: False (and nothing written) if the stored frontier is
        no longer at `expect_size` (another writer advanced it).
        """
        ...

    async def ledger_nodes(self, height: int, indexes: list[int]) -> dict[int, bytes]:
        """Stored hashes of perfect subtrees of `height` (0: leaf hashes) by index."""
        ...

    async def ledger_export_heads(self, since_unix_ms: int, below: int) -> dict[str, int]:
        """{node_id: highest seq stored at or after `since_unix_ms`}, over leaf index < `below`.

        A whole-chain export's selection: each of these nodes contributes seq 1
        to its head.
        """
        ...

    async def ledger_export_page(
        self, task_ids: list[str], after: int, below: int, limit: int
    ) -> list[LedgerEntry]:
        """At most `limit` leaves with `after` < leaf index < `below`, in index order.

        With `task_ids`, only those tasks' leaves (a per-task export); else every
        leaf in the range. Exports read the ledger page by page with this (keyset
        pagination on the leaf index), so memory never grows with the ledger.
        """
        ...

    async def put_checkpoint(self, cp: StoredCheckpoint) -> None:
        """Stores a signed checkpoint (replacing one of the same tree size)."""
        ...

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint with the largest tree size, or None."""
        ...

    async def put_node_certificate(
        self, node_id: str, cert_sha256: str, certificate: bytes, now_ms: int
    ) -> None:
        """Keeps a certificate issued to a node (idempotent on its SHA-256)."""
        ...

    async def node_certificates(self, node_id: str) -> list[bytes]:
        """Every kept certificate of the node, oldest first."""
        ...

    # -- singleton jobs (one leader among replicas) ------------------------------------

    async def try_lead(self, job: str, holder: str, ttl_ms: int, now_ms: int) -> int | None:
        """Takes or renews the leadership of `job` for `ttl_ms`; its epoch, or None.

        Succeeds when `holder` leads already or the last term lapsed; each new
        term gets a larger epoch. Expiry is judged by the database's clock where
        the store has one shared by replicas (PostgreSQL); `now_ms` otherwise.
        """
        ...

    async def resign(self, job: str, holder: str) -> None:
        """Ends `holder`'s term of `job` now (a graceful stop hands over at once)."""
        ...

    async def leader(self, job: str) -> tuple[str, int, int] | None:
        """(holder, epoch, expires_unix_ms) of the live term of `job`, or None."""
        ...


@runtime_checkable
class Notifier(Protocol):
    """A store that announces changes to other processes (PostgreSQL LISTEN/NOTIFY)."""

    def notifications(self, channel: str) -> AsyncIterator[str]:
        """Payloads announced on `channel`; "" first, once listening."""
        ...
