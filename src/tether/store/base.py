"""The `Store` interface: everything the control plane persists.

Stores know nothing of gRPC or protobuf. Every task state change is one
conditional write on (task id, allowed source states from
`tether.core.states.sources`, fencing token), so two writers never both win.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tether.core.states import Event, State

DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class NewTask:
    """What a submitter supplies; defaults are resolved before it gets here."""

    queue: str
    payload: bytes
    max_attempts: int
    lease_ttl_ms: int
    idempotency_key: str = ""
    budget_limit_micros: int = 0


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


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node; only the SHA-256 of its token is kept."""

    node_id: str
    public_key: bytes
    certificate: bytes
    token_sha256: str
    registered_unix_ms: int


@dataclass(frozen=True)
class PolicyRecord:
    """One stored policy document version."""

    version: int
    document: str
    digest: str
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
    """A lease the sweeper ended: the task went back to queued or expired."""

    task_id: str
    fencing_token: int
    state: State
    not_before_unix_ms: int


# Signs a lease for the task as it is after the grant/renewal; returns the
# envelope bytes to store. Called inside the store's transaction so the grant
# and its signed record commit together.
LeaseSigner = Callable[[TaskRecord], bytes]


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
    ) -> tuple[TaskRecord, bytes] | None:
        """Leases the oldest ready task of `queue` (fencing token +1, attempt +1).

        Returns the leased task and the signed envelope, or None when none is ready.
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
    ) -> TaskRecord:
        """Applies a lease holder's event under its fencing token.

        Raises:
            NotFound, StaleFencingToken, LeaseExpired, NotOwner, InvalidTransition.
        """
        ...

    async def cancel_task(self, task_id: str, reason: str, now_ms: int) -> TaskRecord:
        """Cancels a queued, leased or running task.

        Raises:
            NotFound, InvalidTransition.
        """
        ...

    async def sweep_lapsed(
        self, *, now_ms: int, backoff_base_ms: int, backoff_cap_ms: int, limit: int = 1000
    ) -> list[LapseOutcome]:
        """Ends every lease that lapsed at `now_ms` (LAPSE event), at most `limit`."""
        ...

    async def next_lease_expiry(self) -> int | None:
        """Earliest expiry of a live lease, or None."""
        ...

    async def put_node(self, node: NodeRecord) -> None:
        """Adds or replaces a node's enrolment (re-registration rotates its token)."""
        ...

    async def get_node(self, node_id: str) -> NodeRecord | None:
        """The node, or None."""
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
