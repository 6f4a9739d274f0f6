"""What every store decides the same way, whatever its SQL dialect.

`tether.store.sqlite` and `tether.store.postgres` keep their own SQL (their
placeholders, RETURNING and locking differ) and call this module for the rest:
what a row means, which error explains a conditional write that matched no row,
what a lapsed lease becomes, whether a budget reservation or settlement may go
ahead, whether a tool-call record answers a repeat. One copy of each rule keeps
the two stores from drifting apart; the contract suite runs both against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tether.core.errors import (
    AlreadyExists,
    BudgetExhausted,
    IdempotencyConflict,
    InvalidArgument,
    InvalidTransition,
    LeaseExpired,
    NotFound,
    NotOwner,
    StaleFencingToken,
    StorageError,
    TetherError,
)
from tether.core.states import LEASED_STATES, TERMINAL, Event, State, next_state, sources
from tether.core.timeouts import EndReason, RetryPolicy, decode_reasons, encode_reasons
from tether.crypto.merkle import HASH_SIZE, frontier_extend
from tether.store.base import (
    NODE_STATUSES,
    BudgetState,
    JoinTokenRecord,
    LapseOutcome,
    LeaseHistoryEntry,
    LedgerFrontier,
    LedgerHead,
    LedgerLeaf,
    NewTask,
    NodeRecord,
    PolicyRecord,
    SealedSecret,
    StoredCheckpoint,
    TaskRecord,
    ToolCallPhase,
    ToolCallRecord,
    ToolCallWrite,
)

T = TypeVar("T")

# A fetched row: a tuple from either driver (sqlite3 or psycopg).
Row = Sequence[Any]

# Column lists whose order the row converters below rely on.
TASK_COLS = (
    "task_id, queue, state, payload, attempt, max_attempts, fencing_token, node_id, agent_id,"
    " lease_id, lease_expires_unix_ms, lease_ttl_ms, result, error, created_unix_ms,"
    " updated_unix_ms, not_before_unix_ms, idempotency_key, budget_limit_micros,"
    " budget_spent_micros, seq, attempt_timeout_ms, deadline_unix_ms, schedule_to_start_ms,"
    " retry_initial_ms, retry_coefficient, retry_max_interval_ms, retry_failures, non_retryable,"
    " attempt_started_unix_ms, end_reason, submitted_by"
)
# The columns a SubmitTask inserts, in `new_task_row` order.
NEW_TASK_COLS = (
    "task_id, queue, state, payload, max_attempts, lease_ttl_ms, created_unix_ms,"
    " updated_unix_ms, not_before_unix_ms, idempotency_key, budget_limit_micros,"
    " attempt_timeout_ms, deadline_unix_ms, schedule_to_start_ms, retry_initial_ms,"
    " retry_coefficient, retry_max_interval_ms, retry_failures, non_retryable, submitted_by"
)
NEW_TASK_ARITY = NEW_TASK_COLS.count(",") + 1
NODE_COLS = (
    "node_id, public_key, certificate, registered_unix_ms, status, status_reason, updated_unix_ms"
)
# nodes.token_sha256 (bearer tokens, before 0006) is still a NOT NULL column: writes put ''.
NODE_WRITE_COLS = f"{NODE_COLS}, token_sha256"
JOIN_TOKEN_COLS = "token_sha256, node_id, purpose, created_unix_ms, expires_unix_ms, used_unix_ms"
POLICY_COLS = "version, document, digest, created_unix_ms"
SECRET_COLS = "name, version, kek_id, wrapped_dek, nonce, ciphertext, created_unix_ms"
SQL_LIST_SECRET_VERSIONS = (
    "SELECT name, version, kek_id, created_unix_ms FROM secrets ORDER BY name, version"
)
TOOL_CALL_COLS = (
    "task_id, idempotency_key, tool, arguments_sha256, phase, result, status,"
    " fencing_token, cost_micros, updated_unix_ms, node_id"
)
LEASE_HISTORY_COLS = "task_id, lease_id, fencing_token, kind, envelope, outcome, created_unix_ms"
LAPSED_COLS = (
    "task_id, state, attempt, max_attempts, fencing_token, retry_initial_ms, retry_coefficient,"
    " retry_max_interval_ms, node_id, agent_id, lease_id"
)
# History outcomes of a lease the control plane ended on its clock while the task
# went on (or expired): a later call under its token is told the lease expired.
LAPSED_OUTCOMES = ("lapsed", "attempt_timeout", "deadline")
CONTROL_ENDED_OUTCOMES = (*LAPSED_OUTCOMES, "canceled")
"""Lease outcomes the control plane decided (no holder's transition ended the lease)."""
CHECKPOINT_COLS = "tree_size, root_hash, timestamp_unix_ms, note"
LEDGER_HEAD_COLS = "seq, digest, leaf_index"
# Budget columns of a task, in the order `budget_state` reads them.
TASK_BUDGET_COLS = "budget_spent_micros, budget_limit_micros"

# The events a lease holder may send (`Store.transition`); LAPSE and CANCEL are not.
HOLDER_EVENTS = (Event.START, Event.SUCCEED, Event.FAIL, Event.RELEASE)


# -- the transition table, as SQL needs it ----------------------------------------------


def in_states(states: frozenset[State]) -> str:
    """SQL list of state values, e.g. "(2,3)"; built from the transition table."""
    return "(" + ",".join(str(int(s)) for s in sorted(states)) + ")"


def target_state(event: Event) -> State:
    """The one state `event` leads to from every source (LAPSE excepted)."""
    targets = {next_state(s, event) for s in sources(event)}
    if len(targets) != 1:  # pragma: no cover - guards a future table change
        raise AssertionError(f"{event.name} has several targets; handle it explicitly")
    return targets.pop()


def grant_state(start: bool) -> State:
    """The state an acquire writes: LEASE, then START too when `start` (claim-and-run)."""
    state = target_state(Event.LEASE)
    return next_state(state, Event.START) if start else state


def holder_outcome(target: State) -> str | None:
    """The lease outcome a holder event into `target` records (None: the lease goes on)."""
    if target in LEASED_STATES:
        return None
    return "released" if target is State.QUEUED else "finished"


def holder_entry(table: Mapping[Event, T], event: Event) -> T:
    """A store's prepared entry for a holder event; other events are refused."""
    entry = table.get(event)
    if entry is None:
        raise InvalidTransition(
            f"{event.name.lower()} is not an event a lease holder may send",
            metadata={"event": event.name},
        )
    return entry


# -- rows <-> records -------------------------------------------------------------------


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskRecord))
if tuple(c.strip() for c in TASK_COLS.split(",")) != _TASK_FIELDS:  # pragma: no cover
    raise ImportError("TASK_COLS must name TaskRecord's fields, in their order")
# Columns whose stored form is not the record's: (position, conversion).
_TASK_CONVERSIONS = tuple(
    (_TASK_FIELDS.index(name), convert)
    for name, convert in (
        ("state", State),
        ("payload", bytes),
        ("result", bytes),
        ("retry_coefficient", float),
        ("retry_failures", bool),
        ("non_retryable", decode_reasons),
    )
)
_new_object = object.__new__


def row_to_task(row: Row) -> TaskRecord:
    """A `TASK_COLS` row as a record.

    TASK_COLS names the record's fields in order (checked on import), so the row's
    values go straight into the frozen record, without its `__init__`'s one
    `object.__setattr__` per field: two thirds of the cost, paid for every grant and
    every end.
    """
    values = list(row)
    for i, convert in _TASK_CONVERSIONS:
        values[i] = convert(values[i])
    task = _new_object(TaskRecord)
    task.__dict__.update(zip(_TASK_FIELDS, values, strict=True))
    return task


def new_task_row(task: NewTask, task_id: str, now_ms: int) -> tuple[Any, ...]:
    """Values of a newly queued task, in `NEW_TASK_COLS` order."""
    retry = task.retry
    return (
        task_id,
        task.queue,
        int(State.QUEUED),
        task.payload,
        task.max_attempts,
        task.lease_ttl_ms,
        now_ms,
        now_ms,
        now_ms,
        task.idempotency_key,
        task.budget_limit_micros,
        task.attempt_timeout_ms,
        now_ms + task.deadline_ms if task.deadline_ms else 0,
        task.schedule_to_start_ms,
        retry.initial_interval_ms if retry else 0,
        retry.backoff_coefficient if retry else 0.0,
        retry.maximum_interval_ms if retry else 0,
        int(retry.retry_failures) if retry else 0,
        encode_reasons(retry.non_retryable_reasons) if retry else "",
        task.submitted_by,
    )


def row_to_lease_history(r: Row) -> LeaseHistoryEntry:
    """A `LEASE_HISTORY_COLS` row as a record."""
    return LeaseHistoryEntry(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6])


def row_to_node(r: Row) -> NodeRecord:
    """A `NODE_COLS` row as a record."""
    return NodeRecord(
        node_id=r[0],
        public_key=bytes(r[1]),
        certificate=bytes(r[2]),
        registered_unix_ms=r[3],
        status=r[4],
        status_reason=r[5],
        updated_unix_ms=r[6],
    )


def node_row(node: NodeRecord) -> tuple[Any, ...]:
    """Values for `NODE_WRITE_COLS` (the retired token column gets '')."""
    return (
        node.node_id,
        node.public_key,
        node.certificate,
        node.registered_unix_ms,
        node.status,
        node.status_reason,
        node.updated_unix_ms,
        "",
    )


def check_node_status(status: str) -> None:
    """Refuses a node status that is not one of `NODE_STATUSES`."""
    if status not in NODE_STATUSES:
        raise InvalidArgument(
            "status", f"{status!r} is not a node status (one of {sorted(NODE_STATUSES)})"
        )


def row_to_join_token(r: Row) -> JoinTokenRecord:
    """A `JOIN_TOKEN_COLS` row as a record."""
    return JoinTokenRecord(r[0], r[1], r[2], r[3], r[4], r[5])


def join_token_row(token: JoinTokenRecord) -> tuple[Any, ...]:
    """Values for `JOIN_TOKEN_COLS`."""
    return (
        token.token_sha256,
        token.node_id,
        token.purpose,
        token.created_unix_ms,
        token.expires_unix_ms,
        token.used_unix_ms,
    )


def join_token_exists(token: JoinTokenRecord) -> AlreadyExists:
    """The refusal of a join token whose SHA-256 is already stored."""
    return AlreadyExists(
        f"join token for node {token.node_id!r}: a token with this SHA-256 is already stored",
        metadata={"node_id": token.node_id},
    )


def row_to_policy(r: Row) -> PolicyRecord:
    """A `POLICY_COLS` row as a record."""
    return PolicyRecord(r[0], r[1], r[2], r[3])


def row_to_secret(r: Row) -> SealedSecret:
    """A `SECRET_COLS` row as a record."""
    return SealedSecret(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), bytes(r[5]), r[6])


def secret_row(sec: SealedSecret, name: str, version: int) -> tuple[Any, ...]:
    """Values for `SECRET_COLS` of `sec` stored as (name, version)."""
    return (
        name,
        version,
        sec.kek_id,
        sec.wrapped_dek,
        sec.nonce,
        sec.ciphertext,
        sec.created_unix_ms,
    )


def check_sealed(sec: SealedSecret, name: str, version: int) -> None:
    """A sealer must seal for the (name, version) the store assigned: the AEAD binds them."""
    if sec.name != name or sec.version != version:
        raise StorageError("sealed secret does not match the name/version it was given")


def rewrap_row(new: SealedSecret, old: SealedSecret) -> tuple[Any, ...]:
    """Values for SET (kek_id, wrapped_dek, nonce, ciphertext) WHERE (name, version)."""
    return (new.kek_id, new.wrapped_dek, new.nonce, new.ciphertext, old.name, old.version)


def row_to_tool_call(row: Row) -> ToolCallRecord:
    """A `TOOL_CALL_COLS` row as a record."""
    return ToolCallRecord(
        task_id=row[0],
        idempotency_key=row[1],
        tool=row[2],
        arguments_sha256=row[3],
        phase=ToolCallPhase(row[4]),
        result=bytes(row[5]),
        status=row[6],
        fencing_token=row[7],
        cost_micros=row[8],
        updated_unix_ms=row[9],
        node_id=row[10],
    )


def tool_call_row(w: ToolCallWrite, now_ms: int) -> tuple[Any, ...]:
    """Values for `TOOL_CALL_COLS` of a first record of `w`."""
    return (
        w.task_id,
        w.idempotency_key,
        w.tool,
        w.arguments_sha256,
        int(w.phase),
        w.result,
        w.status,
        w.fencing_token,
        w.cost_micros,
        now_ms,
        w.node_id,
    )


def tool_call_completion(w: ToolCallWrite, now_ms: int) -> tuple[Any, ...]:
    """Values that complete a STARTED record with `w`'s outcome.

    SET (phase, result, status, fencing_token, cost_micros, updated_unix_ms)
    WHERE (task_id, idempotency_key, phase).
    """
    return (
        int(ToolCallPhase.COMPLETED),
        w.result,
        w.status,
        w.fencing_token,
        w.cost_micros,
        now_ms,
        w.task_id,
        w.idempotency_key,
        int(ToolCallPhase.STARTED),
    )


def row_to_ledger_head(r: Row) -> LedgerHead:
    """A `LEDGER_HEAD_COLS` row as a record."""
    return LedgerHead(r[0], r[1], r[2])


def row_to_checkpoint(r: Row) -> StoredCheckpoint:
    """A `CHECKPOINT_COLS` row as a record."""
    return StoredCheckpoint(r[0], bytes(r[1]), r[2], r[3])


def checkpoint_row(cp: StoredCheckpoint) -> tuple[Any, ...]:
    """Values for `CHECKPOINT_COLS`."""
    return (cp.tree_size, cp.root_hash, cp.timestamp_unix_ms, cp.note)


def frontier_from_row(row: Row | None, leaves: int) -> LedgerFrontier:
    """The frontier of a (tree_size, hashes) row (absent: the empty tree)."""
    if row is None:
        return LedgerFrontier(0, (), leaves)
    blob = bytes(row[1])
    hashes = tuple(blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE))
    return LedgerFrontier(int(row[0]), hashes, leaves)


def frontier_after_append(
    row: Row | None, top: int, leaves: Sequence[LedgerLeaf]
) -> tuple[LedgerFrontier, list[tuple[int, int, bytes]]] | None:
    """The frontier after appending `leaves` at index top+1, or None if it is behind.

    A frontier behind the leaves (a ledger from before it existed) is left for
    the ledger to catch up; appends then leave it alone.
    """
    current = frontier_from_row(row, top + 1)
    if current.tree_size != top + 1:
        return None
    hashes, done = frontier_extend(current.tree_size, current.hashes, [x.leaf_hash for x in leaves])
    size = current.tree_size + len(leaves)
    return LedgerFrontier(size, tuple(hashes), size), done


def contiguous_leaf_hashes(start: int, rows: Sequence[Row]) -> list[bytes]:
    """The hashes of (leaf_index, leaf_hash) rows, which must number start, start+1, ..."""
    for k, row in enumerate(rows):
        if row[0] != start + k:
            raise StorageError(f"ledger leaf {start + k} is missing (found {row[0]})")
    return [bytes(r[1]) for r in rows]


# -- tasks and leases ---------------------------------------------------------------------


def task_not_found(task_id: str) -> NotFound:
    """The error for a task id no row has."""
    return NotFound(f"no task {task_id!r}", metadata={"task_id": task_id})


def idempotent_submit(existing: TaskRecord, task: NewTask) -> TaskRecord:
    """`existing` if it is what `task` (same idempotency key) asks for, else a conflict."""
    if (
        existing.queue != task.queue
        or existing.payload != task.payload
        or existing.submitted_by != task.submitted_by  # another operator's key: not theirs
    ):
        # The other task's id is not told: whoever chose the same key need not own it.
        raise IdempotencyConflict(
            f"idempotency key {task.idempotency_key!r} already names a task with another "
            "queue, payload or submitter; choose another key"
        )
    return existing


def cancel_refused(task_id: str, state: int | None) -> NoReturn:
    """Raises why a cancel matched no row: no such task, or its `state` cannot be canceled."""
    if state is None:
        raise task_not_found(task_id)
    next_state(State(state), Event.CANCEL)  # raises InvalidTransition
    raise StorageError("cancel lost a race it cannot lose")  # pragma: no cover


def backoff_ms(attempt: int, base_ms: int, cap_ms: int) -> int:
    """Delay before a lapsed attempt's task may be leased again: min(base*2**(attempt-1), cap)."""
    return int(min(base_ms * (2 ** max(min(attempt - 1, 62), 0)), cap_ms))


def lapse_outcome(
    row: Row,
    now_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
    *,
    reason: EndReason = EndReason.HEARTBEAT_TIMEOUT,
    due_ms: int = 0,
) -> LapseOutcome:
    """What a lapsed lease or timed-out attempt (a `LAPSED_COLS` row) makes of its task.

    Queued again after the task's retry delay, or expired when its attempts are
    spent. Rows stored without a retry policy (0s) back off min(base*2**(n-1), cap).
    """
    task_id, state, attempt, max_attempts, token = row[:5]
    initial, coefficient, maximum, node_id, agent_id, lease_id = row[5:11]
    target = next_state(State(state), Event.LAPSE, attempt=attempt, max_attempts=max_attempts)
    not_before = now_ms
    if target is State.QUEUED:
        not_before += retry_delay_ms(
            attempt, initial, coefficient, maximum, backoff_base_ms, backoff_cap_ms
        )
    return LapseOutcome(
        task_id,
        token,
        target,
        not_before,
        reason=reason,
        limit_unix_ms=due_ms,
        decided_unix_ms=now_ms,
        attempt=attempt,
        node_id=node_id,
        agent_id=agent_id,
        lease_id=lease_id,
    )


def retry_delay_ms(
    attempt: int,
    initial_ms: int,
    coefficient: float,
    maximum_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
) -> int:
    """The task's retry delay after `attempt`; a row without a retry policy uses base/cap."""
    if not initial_ms:
        return backoff_ms(attempt, backoff_base_ms, backoff_cap_ms)
    policy = RetryPolicy(
        initial_interval_ms=initial_ms,
        backoff_coefficient=float(coefficient) or 2.0,
        maximum_interval_ms=max(maximum_ms, initial_ms),
    )
    return policy.delay_ms(attempt)


def timeout_outcome(task: TaskRecord, reason: EndReason, now_ms: int) -> LapseOutcome:
    """A task a TIME_OUT (deadline, schedule-to-start) ends: expired, lease fenced."""
    due = {
        EndReason.DEADLINE: task.deadline_unix_ms,
        EndReason.SCHEDULE_TO_START_TIMEOUT: task.not_before_unix_ms + task.schedule_to_start_ms,
    }[reason]
    return LapseOutcome(
        task.task_id,
        task.fencing_token,
        next_state(task.state, Event.TIME_OUT),
        now_ms,
        reason=reason,
        limit_unix_ms=due,
        decided_unix_ms=now_ms,
        attempt=task.attempt,
        node_id=task.node_id if task.state in LEASED_STATES else "",
        agent_id=task.agent_id if task.state in LEASED_STATES else "",
        lease_id=task.lease_id if task.state in LEASED_STATES else "",
    )


def timeout_error(reason: EndReason, due_ms: int) -> str:
    """The error text a limit leaves on a task."""
    return f"{reason.label.replace('_', ' ')}: the limit fell due at {due_ms} (Unix ms)"


def fail_plan(
    task: TaskRecord,
    now_ms: int,
    *,
    non_retryable: bool,
    failure_type: str,
    backoff_base_ms: int,
    backoff_cap_ms: int,
) -> tuple[State, int, EndReason]:
    """Where a holder's FAIL takes `task`: (state, not_before, end reason).

    Queued again after the retry delay when the retry policy retries this
    failure and attempts remain; otherwise failed (NON_RETRYABLE when the
    failure is marked so or its type is listed, else FAILED).
    """
    policy = task.retry_policy(backoff_base_ms, backoff_cap_ms)
    retry = policy.retries_failure(failure_type, non_retryable)
    target = next_state(
        task.state, Event.FAIL, attempt=task.attempt, max_attempts=task.max_attempts, retry=retry
    )
    if target is State.QUEUED:
        return target, now_ms + policy.delay_ms(task.attempt), EndReason.FAILED
    listed = non_retryable or failure_type in policy.non_retryable_reasons
    return target, now_ms, EndReason.NON_RETRYABLE if listed else EndReason.FAILED


def holder_end_reason(event: Event) -> int:
    """The end reason a holder event records (0 for START: the attempt goes on).

    FAIL's is FAILED unless `fail_plan` says NON_RETRYABLE.
    """
    return {
        Event.SUCCEED: int(EndReason.SUCCEEDED),
        Event.FAIL: int(EndReason.FAILED),
        Event.RELEASE: int(EndReason.RELEASED),
    }.get(event, 0)


def released_outcome(task: TaskRecord, fencing_token: int, why: str, now_ms: int) -> LapseOutcome:
    """The end of a released lease (`task` as it is after the release), for its receipt."""
    return LapseOutcome(
        task.task_id,
        fencing_token,
        task.state,
        task.not_before_unix_ms,
        reason=EndReason.RELEASED,
        decided_unix_ms=now_ms,
        attempt=task.attempt,
        note=why,
    )


def canceled_outcome(task: TaskRecord, reason: str, now_ms: int) -> LapseOutcome:
    """The end of a canceled task (`task` as it is after the cancel), for its receipt."""
    return LapseOutcome(
        task.task_id,
        task.fencing_token,
        task.state,
        now_ms,
        reason=EndReason.CANCELED,
        limit_unix_ms=now_ms,
        decided_unix_ms=now_ms,
        attempt=task.attempt,
        note=reason,
    )


def _token_meta(task_id: str, task: TaskRecord) -> dict[str, str]:
    return {"task_id": task_id, "current_fencing_token": str(task.fencing_token)}


def diagnose_lease(
    task_id: str, task: TaskRecord, fencing_token: int, node_id: str, now_ms: int
) -> TetherError | None:
    """Why a conditional write on a leased task matched no row, as far as its row tells.

    None when only its lease history can tell: the store then asks whether the
    lease under `fencing_token` lapsed and calls `diagnose_unleased`.
    """
    if fencing_token != task.fencing_token:
        return StaleFencingToken(
            f"fencing token {fencing_token} is stale for task {task_id}; "
            f"the current token is {task.fencing_token}",
            metadata=_token_meta(task_id, task),
        )
    if task.state in LEASED_STATES:
        if task.node_id != node_id:
            return NotOwner(
                f"task {task_id} is leased to node {task.node_id!r}, not {node_id!r}",
                metadata=_token_meta(task_id, task),
            )
        if task.lease_expires_unix_ms <= now_ms:
            return LeaseExpired(
                f"the lease on task {task_id} (token {fencing_token}) lapsed at "
                f"{task.lease_expires_unix_ms}",
                metadata=_token_meta(task_id, task),
            )
    return None


def diagnose_unleased(
    task_id: str, task: TaskRecord, fencing_token: int, event: Event | None, lapsed: bool
) -> TetherError:
    """The rest of `diagnose_lease`: `lapsed` says the lease under the token lapsed.

    `event` None stands for a lease renewal (or a check of a live lease).
    """
    meta = _token_meta(task_id, task)
    if lapsed and task.state not in LEASED_STATES:
        return LeaseExpired(
            f"the lease on task {task_id} (token {fencing_token}) lapsed; the task is "
            f"{task.state.name.lower()}",
            metadata=meta,
        )
    if event is None:
        what = "terminal" if task.state in TERMINAL else task.state.name.lower()
        return InvalidTransition(
            f"cannot renew a lease on task {task_id}: it is {what}",
            metadata={**meta, "state": task.state.name},
        )
    try:
        next_state(task.state, event)
    except InvalidTransition as err:
        err.metadata.update(meta)
        return err
    return StorageError(f"transition of task {task_id} matched no row")  # pragma: no cover


def no_live_lease(err: TetherError, task_id: str, action: str) -> TetherError:
    """The diagnosis `err` of a missing live lease, reworded for `action` if state is why."""
    if isinstance(err, InvalidTransition):
        state = err.metadata.get("state", "").lower()
        return InvalidTransition(
            f"cannot {action} on task {task_id}: it is {state} and has no live lease",
            metadata=err.metadata,
        )
    return err


# -- budgets --------------------------------------------------------------------------------


def budget_limit(task: TaskRecord, default_limit_micros: int) -> int:
    """The task's own limit, or the default when it set none (0)."""
    return task.budget_limit_micros or default_limit_micros


def repeated_reservation(
    existing: Row,
    task: TaskRecord,
    limit: int,
    *,
    reservation_id: str,
    amount_micros: int,
    fencing_token: int,
    node_id: str,
) -> BudgetState:
    """The budget for a repeat of a stored reservation; a conflict if it differs.

    `existing` is the stored (amount_micros, fencing_token, node_id) row.
    """
    if tuple(existing) != (amount_micros, fencing_token, node_id):
        raise IdempotencyConflict(
            f"reservation id {reservation_id!r} of task {task.task_id} was already used "
            "with another amount or lease",
            metadata={"task_id": task.task_id, "reservation_id": reservation_id},
        )
    return BudgetState(limit, task.budget_spent_micros, existed=True)


def budget_exhausted(task: TaskRecord, limit: int, amount_micros: int) -> BudgetExhausted:
    """The refusal of a reservation the limit does not cover."""
    remaining = BudgetState(limit, task.budget_spent_micros).remaining_micros
    return BudgetExhausted(
        f"budget of task {task.task_id} is exhausted: {amount_micros} micros requested, "
        f"{remaining} of {limit} remaining",
        metadata={
            "task_id": task.task_id,
            "remaining_micros": str(remaining),
            "limit_micros": str(limit),
            "requested_micros": str(amount_micros),
        },
    )


def check_settlement(
    res: Row | None,
    *,
    task_id: str,
    reservation_id: str,
    fencing_token: int,
    node_id: str,
    actual_micros: int,
) -> tuple[int, bool]:
    """(reserved amount, settled before) of a reservation that `actual_micros` may settle.

    `res` is its (amount_micros, actual_micros, settled, fencing_token, node_id) row.

    Raises:
        NotFound, StaleFencingToken, NotOwner, InvalidArgument, IdempotencyConflict:
        see `Store.settle_budget`.
    """
    meta = {"task_id": task_id, "reservation_id": reservation_id}
    if res is None:
        raise NotFound(f"no reservation {reservation_id!r} for task {task_id!r}", metadata=meta)
    amount, actual, settled, token, owner = res
    if token != fencing_token:
        raise StaleFencingToken(
            f"reservation {reservation_id!r} of task {task_id} was made under fencing "
            f"token {token}, not {fencing_token}",
            metadata=meta,
        )
    if owner != node_id:
        raise NotOwner(
            f"reservation {reservation_id!r} of task {task_id} belongs to node "
            f"{owner!r}, not {node_id!r}",
            metadata=meta,
        )
    if actual_micros > amount:
        raise InvalidArgument("actual_micros", f"{actual_micros} exceeds the reserved {amount}")
    if settled and actual != actual_micros:
        raise IdempotencyConflict(
            f"reservation {reservation_id!r} of task {task_id} was already settled "
            f"at {actual} micros",
            metadata=meta,
        )
    return amount, bool(settled)


def budget_state(row: Row | None, default_limit_micros: int, *, existed: bool) -> BudgetState:
    """The budget from a task's `TASK_BUDGET_COLS` row."""
    if row is None:  # pragma: no cover - the reservation's task row always exists
        raise StorageError("budget of a reserved task has no task row")
    spent, limit = row
    return BudgetState(limit or default_limit_micros, spent, existed=existed)


# -- idempotency records --------------------------------------------------------------------


def tool_call_repeat(existing: ToolCallRecord, w: ToolCallWrite) -> bool:
    """Whether `existing` answers `w` as is (a repeat, or a late STARTED after COMPLETED).

    Raises:
        IdempotencyConflict: the key was recorded with another tool or arguments.
    """
    if existing.tool != w.tool or existing.arguments_sha256 != w.arguments_sha256:
        raise IdempotencyConflict(
            f"idempotency key {w.idempotency_key!r} of task {w.task_id} was used for "
            f"tool {existing.tool!r} with other arguments",
            metadata={
                "task_id": w.task_id,
                "idempotency_key": w.idempotency_key,
                "tool": existing.tool,
            },
        )
    return w.phase is ToolCallPhase.STARTED or existing.phase is ToolCallPhase.COMPLETED


def late_completion(existing: ToolCallRecord | None, w: ToolCallWrite) -> bool:
    """Whether a holder without a live lease may still record `w` (its known outcome).

    Only a COMPLETED write for a record that the same lease started (same
    fencing token and node, same tool and arguments): the effect happened under
    that lease, so its outcome is recorded rather than lost. A record another
    lease took over (`take_over`) carries the new token, so a stale holder can
    never write an outcome after a new holder began running the key.
    """
    return (
        existing is not None
        and w.phase is ToolCallPhase.COMPLETED
        and existing.fencing_token == w.fencing_token
        and existing.node_id == w.node_id != ""
        and existing.tool == w.tool
        and existing.arguments_sha256 == w.arguments_sha256
    )


# A keyed call's outcome that rode with its tool_call receipt completes the
# record only as `late_completion` allows one: the STARTED record the same lease
# wrote (same fencing token and node, same tool and arguments). A COMPLETED
# record, or one a later lease took over, is left as it is. `{p}` is the
# dialect's placeholder.
RECEIPT_COMPLETES = (
    "UPDATE tool_calls SET phase = {p}, result = {p}, status = {p}, cost_micros = {p},"
    " updated_unix_ms = {p}"
    " WHERE task_id = {p} AND idempotency_key = {p} AND phase = {p} AND fencing_token = {p}"
    " AND node_id = {p} AND tool = {p} AND arguments_sha256 = {p}"
)


def receipt_completion(w: ToolCallWrite, now_ms: int) -> tuple[Any, ...]:
    """Values for `RECEIPT_COMPLETES` from the outcome a receipt carried."""
    return (
        int(ToolCallPhase.COMPLETED),
        w.result,
        w.status,
        w.cost_micros,
        now_ms,
        w.task_id,
        w.idempotency_key,
        int(ToolCallPhase.STARTED),
        w.fencing_token,
        w.node_id,
        w.tool,
        w.arguments_sha256,
    )


def takes_over(existing: ToolCallRecord, w: ToolCallWrite) -> bool:
    """Whether STARTED `w` re-stamps `existing` (an earlier lease's STARTED record)."""
    return (
        w.take_over
        and w.phase is ToolCallPhase.STARTED
        and existing.phase is ToolCallPhase.STARTED
        and existing.fencing_token != w.fencing_token
    )


# -- plumbing -------------------------------------------------------------------------------


def numbered_migrations(directory: Path) -> list[tuple[int, str, Path]]:
    """(version, name, path) of every NNNN_name.sql file in `directory`, in order."""
    out = []
    for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        out.append((int(path.name[:4]), path.stem[5:], path))
    return out


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a secret token (e.g. a join token), the only form the store keeps."""
    return hashlib.sha256(token.encode()).hexdigest()
