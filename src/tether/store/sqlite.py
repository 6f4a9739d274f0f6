"""SQLite store: one aiosqlite connection, WAL, numbered migrations.

Each transaction runs as ONE synchronous function, so it never interleaves with
another coroutine's statements and needs no asyncio lock.

Durable by default: synchronous=FULL, so an acknowledged write (a lease grant,
a tool call's STARTED record, a budget reservation, a ledger append) survives
power loss or an OS crash. Every commit fsyncs, so transactions run on
aiosqlite's worker thread and are **group-committed**: the transactions that
arrive while a commit is in flight run together in the next one, each inside
its own SAVEPOINT (a failing one rolls back alone), and share one fsync; each
caller is answered only after that COMMIT. Throughput holds because concurrent
callers share the cost of durability.

The opt-out, synchronous=NORMAL (`tether control --sqlite-synchronous normal`),
runs each transaction inline on the event loop with no fsync per commit: it
keeps every committed write across a process kill (SIGKILL), but an OS crash or
power loss may roll back the last acknowledged writes, so a fencing token may be
handed out twice, a non-idempotent tool may run again, a budget may be
overspent, and a node's receipt stream may be stuck on a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from tether.core.errors import StorageError, TetherError
from tether.core.states import LEASED_STATES, Event, State, sources
from tether.core.timeouts import EndReason
from tether.store.base import (
    BudgetState,
    EndSigner,
    GrantAsk,
    HolderTransition,
    JoinTokenRecord,
    LapseOutcome,
    LeaseHistoryEntry,
    LeaseSigner,
    LedgerEntry,
    LedgerFrontier,
    LedgerHead,
    LedgerLeaf,
    NewTask,
    NodeRecord,
    PolicyRecord,
    SealedSecret,
    SecretRewrapFn,
    SecretSealFn,
    SecretVersionInfo,
    StoredCheckpoint,
    TaskRecord,
    ToolCallPhase,
    ToolCallRecord,
    ToolCallWrite,
)
from tether.store.common import (
    CHECKPOINT_COLS,
    HOLDER_EVENTS,
    JOIN_TOKEN_COLS,
    LAPSED_COLS,
    LAPSED_OUTCOMES,
    LEASE_HISTORY_COLS,
    LEDGER_HEAD_COLS,
    NEW_TASK_ARITY,
    NEW_TASK_COLS,
    NODE_COLS,
    NODE_WRITE_COLS,
    POLICY_COLS,
    RECEIPT_COMPLETES,
    SECRET_COLS,
    SQL_LIST_SECRET_VERSIONS,
    TASK_BUDGET_COLS,
    TASK_COLS,
    TOOL_CALL_COLS,
    budget_exhausted,
    budget_limit,
    budget_state,
    cancel_refused,
    canceled_outcome,
    check_node_status,
    check_sealed,
    check_settlement,
    checkpoint_row,
    contiguous_leaf_hashes,
    diagnose_lease,
    diagnose_unleased,
    fail_plan,
    frontier_after_append,
    frontier_from_row,
    grant_state,
    holder_end_reason,
    holder_entry,
    holder_outcome,
    idempotent_submit,
    in_states,
    join_token_exists,
    join_token_row,
    lapse_outcome,
    late_completion,
    new_task_row,
    no_live_lease,
    node_row,
    numbered_migrations,
    receipt_completion,
    released_outcome,
    repeated_reservation,
    rewrap_row,
    row_to_checkpoint,
    row_to_join_token,
    row_to_lease_history,
    row_to_ledger_head,
    row_to_node,
    row_to_policy,
    row_to_secret,
    row_to_task,
    row_to_tool_call,
    secret_row,
    takes_over,
    target_state,
    task_not_found,
    timeout_error,
    timeout_outcome,
    tool_call_completion,
    tool_call_repeat,
    tool_call_row,
)

# Re-exported: older callers import these from here.
from tether.store.common import backoff_ms as backoff_ms
from tether.store.common import token_sha256 as token_sha256

MIGRATIONS_DIR = Path(__file__).parent / "migrations" / "sqlite"

T = TypeVar("T")

# Up to ?6 grants at once: the k-th ready task (queue order, 0-based) gets the k-th lease
# id of the JSON array ?3. The state is re-checked on each row it writes.
_SQL_ACQUIRE_MANY = {
    start: f"""
WITH pick AS (
    SELECT seq AS pseq,
        row_number() OVER (ORDER BY not_before_unix_ms, created_unix_ms, seq) - 1 AS k
    FROM (SELECT seq, not_before_unix_ms, created_unix_ms FROM tasks
          WHERE queue = ?5 AND state IN {in_states(sources(Event.LEASE))}
            AND not_before_unix_ms <= ?4
          ORDER BY not_before_unix_ms, created_unix_ms, seq LIMIT ?6))
UPDATE tasks SET state = {int(grant_state(start))},
    attempt = attempt + 1, fencing_token = fencing_token + 1,
    node_id = ?1, agent_id = ?2, lease_id = json_extract(?3, '$[' || pick.k || ']'),
    lease_expires_unix_ms = ?4 + lease_ttl_ms, updated_unix_ms = ?4, attempt_started_unix_ms = ?4
FROM pick
WHERE tasks.seq = pick.pseq AND tasks.state IN {in_states(sources(Event.LEASE))}
RETURNING {TASK_COLS}
"""
    for start in (False, True)
}

_SQL_RENEW = f"""
UPDATE tasks SET lease_expires_unix_ms = ?1 + lease_ttl_ms, updated_unix_ms = ?1
WHERE task_id = ?2 AND state IN {in_states(LEASED_STATES)} AND fencing_token = ?3 AND node_id = ?4
  AND lease_expires_unix_ms > ?1
RETURNING {TASK_COLS}
"""

_SQL_HISTORY_INSERT = """
INSERT INTO lease_history (task_id, lease_id, fencing_token, kind, envelope, outcome,
    created_unix_ms) VALUES (?, ?, ?, ?, ?, 'active', ?)
"""


@functools.lru_cache(maxsize=64)
def _history_insert_many_sql(n: int) -> str:
    """`_SQL_HISTORY_INSERT` for `n` rows in one statement (parameters: its six per row,
    row after row): one statement step for a batch's grants, not one per row."""
    values = ", ".join(["(?, ?, ?, ?, ?, 'active', ?)"] * n)
    return (
        "INSERT INTO lease_history (task_id, lease_id, fencing_token, kind, envelope, outcome,"
        f" created_unix_ms) VALUES {values}"
    )


_SQL_HISTORY_CLOSE = """
UPDATE lease_history SET outcome = ?1 WHERE task_id = ?2 AND fencing_token = ?3
  AND outcome = 'active'
"""

_SQL_TOOL_CALL_COMPLETE = """
UPDATE tool_calls SET phase = ?, result = ?, status = ?, fencing_token = ?, cost_micros = ?,
    updated_unix_ms = ?
WHERE task_id = ? AND idempotency_key = ? AND phase = ?
"""

_SQL_RECEIPT_COMPLETES = RECEIPT_COMPLETES.format(p="?")

_SQL_LAST_LEASE = """
SELECT envelope FROM lease_history WHERE task_id = ? AND fencing_token = ? ORDER BY id DESC LIMIT 1
"""

_SQL_CONTROL_RECEIPT = """
INSERT INTO control_receipts (task_id, fencing_token, end_reason, envelope, created_unix_ms)
VALUES (?, ?, ?, ?, ?)
"""


def _record_end(
    conn: sqlite3.Connection,
    sign_end: EndSigner | None,
    end: LapseOutcome,
    *,
    closed: bool,
) -> None:
    """Stores the control receipt of `end`; `closed`: a live lease ended with it."""
    if sign_end is None:
        return
    lease = b""
    if closed:
        row = conn.execute(_SQL_LAST_LEASE, (end.task_id, end.fencing_token)).fetchone()
        lease = b"" if row is None else bytes(row[0])
    conn.execute(
        _SQL_CONTROL_RECEIPT,
        (
            end.task_id,
            end.fencing_token,
            int(end.reason),
            sign_end(end, lease),
            end.decided_unix_ms,
        ),
    )


def _transition_sql(event: Event, retry: bool = False) -> tuple[str, str | None]:
    """The conditional UPDATE for a holder event and the lease outcome it records.

    `retry`: the FAIL the retry policy retries (queued again at :not_before).
    """
    target = State.QUEUED if retry else target_state(event)
    outcome = holder_outcome(target)
    src = in_states(sources(event))
    where = (
        f"WHERE task_id = :task_id AND state IN {src} AND fencing_token = :token"
        " AND node_id = :node_id AND lease_expires_unix_ms > :now"
    )
    if outcome is None:
        sets = ""
    elif outcome == "released":
        sets = (
            ", node_id = '', agent_id = '', lease_id = '', lease_expires_unix_ms = 0,"
            " not_before_unix_ms = :not_before, error = :error, end_reason = :end_reason"
        )
    else:
        sets = (
            ", lease_expires_unix_ms = 0, result = :result, error = :error,"
            " end_reason = :end_reason"
        )
    state = str(int(target))
    if outcome == "released" and not retry:  # a released attempt counts against max_attempts
        state = f"CASE WHEN attempt >= max_attempts THEN {int(State.EXPIRED)} ELSE {state} END"
    sql = (
        f"UPDATE tasks SET state = {state}, updated_unix_ms = :now{sets} {where}"
        f" RETURNING {TASK_COLS}"
    )
    return sql, "failed" if retry else outcome


_SQL_TRANSITION = {e: _transition_sql(e) for e in HOLDER_EVENTS}
_SUCCEEDED_OUTCOME = holder_outcome(target_state(Event.SUCCEED))


@functools.lru_cache(maxsize=128)
def _succeed_many_sql(n: int, brief: bool = False) -> str:
    """SUCCEED for `n` held tasks in one UPDATE: per row the conditions and writes of
    `_transition_sql(Event.SUCCEED)`; parameters: now, then (task_id, token, result,
    error) per task, then node_id, now. `brief`: without RETURNING (the caller counts
    the changed rows instead of reading them)."""
    values = ",".join(["(?,?,?,?)"] * n)
    return (
        f"UPDATE tasks SET state = {int(target_state(Event.SUCCEED))}, updated_unix_ms = ?,"
        " lease_expires_unix_ms = 0, result = v.column3, error = v.column4,"
        f" end_reason = {holder_end_reason(Event.SUCCEED)}"
        f" FROM (VALUES {values}) AS v"
        f" WHERE tasks.task_id = v.column1 AND tasks.state IN {in_states(sources(Event.SUCCEED))}"
        " AND tasks.fencing_token = v.column2 AND tasks.node_id = ?"
        " AND tasks.lease_expires_unix_ms > ?" + ("" if brief else f" RETURNING {TASK_COLS}")
    )


def _succeed_many(
    conn: sqlite3.Connection,
    node_id: str,
    items: Sequence[HolderTransition],
    now_ms: int,
    *,
    brief: bool = False,
) -> list[TaskRecord] | None:
    """All-SUCCEED batches in two statements instead of two per task; None (nothing
    written) when any item would be refused, so the caller goes item by item and
    names it. `brief`: the same writes, answered with [] (no row read back)."""
    params: list[Any] = [now_ms]
    for item in items:
        params += (item.task_id, item.fencing_token, item.result, item.error)
    params += (node_id, now_ms)
    conn.execute("SAVEPOINT ends")
    rows: list[Any] = []
    if brief:  # the tasks' ids are distinct (the callers check): one changed row each
        ended = conn.execute(_succeed_many_sql(len(items), True), params).rowcount
    else:
        rows = conn.execute(_succeed_many_sql(len(items)), params).fetchall()
        ended = len(rows)
    if ended != len(items):
        conn.execute("ROLLBACK TO ends")
        conn.execute("RELEASE ends")
        return None
    conn.executemany(
        _SQL_HISTORY_CLOSE,
        [(_SUCCEEDED_OUTCOME, item.task_id, item.fencing_token) for item in items],
    )
    conn.execute("RELEASE ends")
    if brief:
        return []
    by_id = {t.task_id: t for t in map(row_to_task, rows)}
    return [by_id[item.task_id] for item in items]


_SQL_FAIL_RETRY = _transition_sql(Event.FAIL, retry=True)

_CANCELED = target_state(Event.CANCEL)
_SQL_CANCEL = f"""
UPDATE tasks SET state = {int(_CANCELED)}, error = ?1, updated_unix_ms = ?2,
    lease_expires_unix_ms = 0, end_reason = {int(EndReason.CANCELED)}
WHERE task_id = ?3 AND state IN {in_states(sources(Event.CANCEL))}
RETURNING {TASK_COLS}
"""

_SQL_LAPSED = f"""
SELECT {LAPSED_COLS} FROM tasks
WHERE state IN {in_states(sources(Event.LAPSE))} AND lease_expires_unix_ms <= ?1
ORDER BY lease_expires_unix_ms LIMIT ?2
"""

_SQL_LAPSE = f"""
UPDATE tasks SET state = ?1, not_before_unix_ms = ?2, node_id = '', agent_id = '',
    lease_id = '', lease_expires_unix_ms = 0, updated_unix_ms = ?3, error = 'lease lapsed',
    end_reason = {int(EndReason.HEARTBEAT_TIMEOUT)}
WHERE task_id = ?4 AND state IN {in_states(sources(Event.LAPSE))} AND fencing_token = ?5
  AND lease_expires_unix_ms <= ?3
"""

# -- time limits (tether.core.timeouts), enforced by the sweeper ---------------------
_SQL_DEADLINE_DUE = f"""
SELECT {TASK_COLS} FROM tasks
WHERE deadline_unix_ms > 0 AND deadline_unix_ms <= ?1
  AND state IN {in_states(sources(Event.TIME_OUT))}
ORDER BY deadline_unix_ms LIMIT ?2
"""

_SQL_SCHEDULE_TO_START_DUE = f"""
SELECT {TASK_COLS} FROM tasks
WHERE schedule_to_start_ms > 0 AND state = {int(State.QUEUED)}
  AND not_before_unix_ms + schedule_to_start_ms <= ?1
ORDER BY not_before_unix_ms LIMIT ?2
"""

# The re-checked condition of each TIME_OUT, so a task changed since the select
# (leased, finished, canceled) is left alone.
_TIME_OUT_DUE = {
    EndReason.DEADLINE: "deadline_unix_ms > 0 AND deadline_unix_ms <= ?3",
    EndReason.SCHEDULE_TO_START_TIMEOUT: (
        f"state = {int(State.QUEUED)} AND schedule_to_start_ms > 0"
        " AND not_before_unix_ms + schedule_to_start_ms <= ?3"
    ),
}

_SQL_TIME_OUT = {
    reason: f"""
UPDATE tasks SET state = {int(State.EXPIRED)}, end_reason = ?1, error = ?2,
    lease_expires_unix_ms = 0, updated_unix_ms = ?3
WHERE task_id = ?4 AND fencing_token = ?5 AND state IN {in_states(sources(Event.TIME_OUT))}
  AND {due}
"""
    for reason, due in _TIME_OUT_DUE.items()
}

_SQL_ATTEMPT_DUE = f"""
SELECT {LAPSED_COLS}, attempt_started_unix_ms + attempt_timeout_ms FROM tasks
WHERE attempt_timeout_ms > 0 AND state IN {in_states(sources(Event.LAPSE))}
  AND attempt_started_unix_ms + attempt_timeout_ms <= ?1
ORDER BY attempt_started_unix_ms LIMIT ?2
"""

_SQL_ATTEMPT_TIME_OUT = f"""
UPDATE tasks SET state = ?1, not_before_unix_ms = ?2, node_id = '', agent_id = '',
    lease_id = '', lease_expires_unix_ms = 0, updated_unix_ms = ?3,
    error = 'attempt timeout', end_reason = {int(EndReason.ATTEMPT_TIMEOUT)}
WHERE task_id = ?4 AND state IN {in_states(sources(Event.LAPSE))} AND fencing_token = ?5
  AND attempt_timeout_ms > 0 AND attempt_started_unix_ms + attempt_timeout_ms <= ?3
"""


class _Failed:
    """One transaction of a group that raised (and was rolled back to its savepoint)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _run_group(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    """Runs each function in its own SAVEPOINT of one transaction; one COMMIT (one fsync).

    A function that raises is rolled back alone (its result is a `_Failed`);
    the others commit. If the COMMIT fails the caller tells every function's
    caller, since none of them is durable.
    """
    out: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for fn in fns:
            conn.execute("SAVEPOINT tx")
            try:
                out.append(fn(conn))
            except BaseException as err:
                conn.execute("ROLLBACK TO tx")
                conn.execute("RELEASE tx")
                if isinstance(err, sqlite3.Error):
                    err = StorageError(f"database error: {err}")
                out.append(_Failed(err))
                continue
            conn.execute("RELEASE tx")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


def _put_frontier(
    conn: sqlite3.Connection, frontier: LedgerFrontier, subtrees: list[tuple[int, int, bytes]]
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO ledger_frontier VALUES (1, ?, ?)",
        (frontier.tree_size, b"".join(frontier.hashes)),
    )
    conn.executemany("INSERT OR IGNORE INTO ledger_subtrees VALUES (?, ?, ?)", subtrees)


def _transition_fn(
    item: HolderTransition,
    node_id: str,
    now_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
    sign_end: EndSigner | None,
) -> Callable[[sqlite3.Connection], TaskRecord]:
    """One holder transition as a transaction body (see `Store.transition`)."""
    task_id, event, fencing_token = item.task_id, item.event, item.fencing_token
    entry = holder_entry(_SQL_TRANSITION, event)

    def fn(conn: sqlite3.Connection) -> TaskRecord:
        sql, outcome = entry
        params = {
            "now": now_ms,
            "task_id": task_id,
            "token": fencing_token,
            "node_id": node_id,
            "result": item.result,
            "error": item.error,
            "not_before": now_ms,
            "end_reason": holder_end_reason(event),
        }
        if event is Event.FAIL:
            current = conn.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if current is not None and row_to_task(current).state in sources(Event.FAIL):
                target, not_before, reason = fail_plan(
                    row_to_task(current),
                    now_ms,
                    non_retryable=item.non_retryable,
                    failure_type=item.failure_type,
                    backoff_base_ms=backoff_base_ms,
                    backoff_cap_ms=backoff_cap_ms,
                )
                if target is State.QUEUED:
                    sql, outcome = _SQL_FAIL_RETRY
                params.update(not_before=not_before, end_reason=int(reason))
        row = conn.execute(sql, params).fetchone()
        if row is None:
            raise _diagnose(conn, task_id, fencing_token, node_id, now_ms, event)
        task = row_to_task(row)
        if outcome is not None:
            closed = conn.execute(_SQL_HISTORY_CLOSE, (outcome, task_id, fencing_token))
            if outcome == "released":
                end = released_outcome(task, fencing_token, item.error, now_ms)
                _record_end(conn, sign_end, end, closed=closed.rowcount > 0)
        return task

    return fn


def _acquire_body(
    conn: sqlite3.Connection, *, node_id: str, now_ms: int, ask: GrantAsk
) -> list[tuple[TaskRecord, bytes]]:
    """Up to `len(ask.lease_ids)` grants as one transaction body (see `Store.acquire_leases`).

    One multi-row UPDATE claims the oldest ready tasks and gives the k-th of them (in
    queue order) the k-th lease id; each is still its own conditional write (state
    re-checked, token and attempt bumped on its row) with its own signed lease; the
    history rows go in with one multi-row INSERT.
    """
    if not ask.lease_ids:
        return []
    rows = conn.execute(
        _SQL_ACQUIRE_MANY[ask.start],
        (
            node_id,
            ask.agent_id,
            json.dumps(list(ask.lease_ids)),
            now_ms,
            ask.queue,
            len(ask.lease_ids),
        ),
    ).fetchall()
    tasks = sorted(
        map(row_to_task, rows), key=lambda t: (t.not_before_unix_ms, t.created_unix_ms, t.seq)
    )
    out = [(task, ask.sign(task)) for task in tasks]
    if out:
        params: list[Any] = []
        for t, env in out:
            params += (t.task_id, t.lease_id, t.fencing_token, "grant", env, now_ms)
        conn.execute(_history_insert_many_sql(len(out)), params)
    return out


def _transitions_body(
    node_id: str,
    items: Sequence[HolderTransition],
    now_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
    sign_end: EndSigner | None,
    brief: bool = False,
) -> Callable[[sqlite3.Connection], list[TaskRecord]]:
    """Several holder transitions as one transaction body, all or nothing (see
    `Store.transitions`): the first refused raises with `metadata["index"]`.

    An all-SUCCEED batch takes the batch path; the per-item bodies are made only when
    it does not (or declines: then they name the refused item). `brief`: the same
    writes, answered with [] (see `Store.transitions_then_acquire`)."""
    all_succeed = len(items) > 1 and all(item.event is Event.SUCCEED for item in items)

    def fn(conn: sqlite3.Connection) -> list[TaskRecord]:
        if all_succeed:
            done = _succeed_many(conn, node_id, items, now_ms, brief=brief)
            if done is not None:
                return done
        out: list[TaskRecord] = []
        for index, item in enumerate(items):
            one = _transition_fn(item, node_id, now_ms, backoff_base_ms, backoff_cap_ms, sign_end)
            try:
                out.append(one(conn))
            except TetherError as err:
                err.metadata["index"] = str(index)
                raise
        return [] if brief else out

    return fn


class SqliteStore:
    """The embedded default `Store`, for one control-plane process."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self._synchronous = synchronous
        self._inline = synchronous == "NORMAL"  # no fsync per commit: run on the loop
        self._db: aiosqlite.Connection | None = None
        # Group commit (FULL): transactions waiting for the next COMMIT.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._committing = False  # a group is on the worker thread
        self._idle: list[asyncio.Future[None]] = []  # `close` waiting for the last group

    @property
    def synchronous(self) -> str:
        """The durability setting in force: "FULL" (default) or "NORMAL"."""
        return self._synchronous

    # -- plumbing -----------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A store it cannot write would open, serve reads and fail every write: refuse it
        # here, so the process exits at once instead of looking alive (the journal files
        # need the directory writable too).
        for where in (self.path, self.path.parent):
            if where.exists() and not os.access(where, os.W_OK):
                raise StorageError(
                    f"cannot open database {self.path}: {where} is not writable by this user "
                    "(the control plane writes the database and its journal beside it)"
                )
        # The connection is used from the loop thread too (see _run), never concurrently.
        connection = aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db = await connection
            await self._run(self._setup)
        except (sqlite3.Error, StorageError) as err:
            # Stop the connection's worker thread before the loop closes: a live one
            # keeps the process from exiting, a late one prints "Event loop is closed".
            if self._db is not None:
                self._db = None
                with contextlib.suppress(sqlite3.Error):
                    await connection.close()
            await asyncio.to_thread(connection._thread.join, 5.0)
            why = err.message if isinstance(err, StorageError) else str(err)
            raise StorageError(
                f"cannot open database {self.path}: {why.removeprefix('database error: ')} "
                "(is it a Tether SQLite database, writable by this user? --db names the file)"
            ) from err

    async def close(self) -> None:
        if self._committing:  # answer every transaction already accepted
            idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(idle)
            await idle
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn(conn)` on the connection's worker thread (one round trip)."""
        if self._db is None:
            raise StorageError("store is not open")
        db = self._db
        try:
            if self._inline:
                return fn(db._conn)
            # aiosqlite's queue of functions for its worker thread; running a whole
            # transaction there keeps it atomic (see the module docstring).
            return await db._execute(fn, db._conn)  # type: ignore[no-any-return,no-untyped-call]
        except TetherError:
            raise
        except sqlite3.Error as err:
            raise StorageError(f"database error: {err}") from err

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn(conn)` as one transaction: all of it commits, or none (on error).

        FULL: group-committed with whatever else is waiting (see the module
        docstring); answered only after the COMMIT that made it durable.
        """
        if not self._inline:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._pending.append((fn, future))
            if not self._committing:
                self._commit_next()
            return await future
        return await self._tx_inline(fn)

    def _commit_next(self) -> None:
        """Hands the waiting transactions to the worker thread as one group (one COMMIT).

        Straight onto aiosqlite's queue, answered by one callback on the loop
        (`_committed`), which hands over the next group: no task and no future of
        its own between a caller and its COMMIT (each was a loop pass; see
        docs/performance.md, 2026-12-08).
        """
        group, self._pending = self._pending, []
        db = self._db
        if db is None:
            self._committing = False
            for _, future in group:
                if not future.done():
                    future.set_exception(StorageError("store is not open"))
            self._wake_idle()
            return
        self._committing = True
        loop = asyncio.get_running_loop()
        conn = db._conn
        fns = [f for f, _ in group]

        def work() -> None:  # on the worker thread
            results: list[Any] | BaseException
            try:
                results = _run_group(conn, fns)
            except sqlite3.Error as err:  # the COMMIT itself failed: nothing is durable
                results = StorageError(f"database error: {err}")
            except BaseException as err:
                results = err
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._committed, group, results)

        db._tx.put_nowait((None, work))

    def _committed(
        self,
        group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
        results: list[Any] | BaseException,
    ) -> None:
        """Answers a committed (or failed) group, then sends the next one (on the loop)."""
        if isinstance(results, BaseException):
            results = [results] * len(group)
        for (_, future), result in zip(group, results, strict=True):
            if future.done():
                continue
            if isinstance(result, _Failed):
                future.set_exception(result.error)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        # The next group goes after the callers just answered have run: one of them
        # coming straight back would otherwise go alone, the rest in the group
        # after it (two COMMITs where one would do). The callers' wake-ups are
        # already queued, so this runs after them, in the same loop pass.
        asyncio.get_running_loop().call_soon(self._after_answers)

    def _after_answers(self) -> None:
        """Sends what the answered callers (or anyone) queued meanwhile, or goes idle."""
        if self._pending:
            self._commit_next()
        else:
            self._committing = False
            self._wake_idle()

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, []
        for future in idle:
            if not future.done():
                future.set_result(None)

    async def _tx_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn(conn)` inside BEGIN IMMEDIATE ... COMMIT (rolled back on error)."""

        def body(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

        return await self._run(body)

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_unix_ms INTEGER NOT NULL)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, path in migration_files():
            if version in done:
                continue
            sql = path.read_text()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (version, name, time.time_ns() // 1_000_000),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def applied_migrations(self) -> list[int]:
        """Versions recorded in schema_migrations, ascending."""
        rows = await self._run(
            lambda c: c.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        )
        return [r[0] for r in rows]

    # -- tasks --------------------------------------------------------------------

    async def submit_task(
        self, task: NewTask, task_id: str, now_ms: int
    ) -> tuple[TaskRecord, bool]:
        def fn(conn: sqlite3.Connection) -> tuple[TaskRecord, bool]:
            if task.idempotency_key:
                row = conn.execute(
                    f"SELECT {TASK_COLS} FROM tasks WHERE idempotency_key = ?",
                    (task.idempotency_key,),
                ).fetchone()
                if row is not None:
                    return idempotent_submit(row_to_task(row), task), False
            row = conn.execute(
                f"INSERT INTO tasks ({NEW_TASK_COLS})"
                f" VALUES ({', '.join('?' * NEW_TASK_ARITY)}) RETURNING {TASK_COLS}",
                new_task_row(task, task_id, now_ms),
            ).fetchone()
            return row_to_task(row), True

        return await self._tx(fn)

    async def get_task(self, task_id: str) -> TaskRecord:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
        )
        if row is None:
            raise task_not_found(task_id)
        return row_to_task(row)

    async def list_tasks(
        self, *, queue: str, state: State | None, after_seq: int, limit: int
    ) -> list[TaskRecord]:
        clauses, params = ["seq > ?"], [after_seq]
        if queue:
            clauses.append("queue = ?")
            params.append(queue)  # type: ignore[arg-type]
        if state is not None:
            clauses.append("state = ?")
            params.append(int(state))
        sql = f"SELECT {TASK_COLS} FROM tasks WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?"
        params.append(limit)
        rows = await self._run(lambda c: c.execute(sql, params).fetchall())
        return [row_to_task(r) for r in rows]

    async def count_tasks_by_state(self) -> dict[State, int]:
        rows = await self._run(
            lambda c: c.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()
        )
        return {State(r[0]): int(r[1]) for r in rows}

    async def lease_history(self, task_id: str) -> list[LeaseHistoryEntry]:
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT {LEASE_HISTORY_COLS} FROM lease_history WHERE task_id = ? ORDER BY id",
                (task_id,),
            ).fetchall()
        )
        return [row_to_lease_history(r) for r in rows]

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
        got = await self.acquire_leases(
            queue=queue,
            node_id=node_id,
            agent_id=agent_id,
            lease_ids=[lease_id],
            now_ms=now_ms,
            sign=sign,
            start=start,
        )
        return got[0] if got else None

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
        ask = GrantAsk(queue=queue, agent_id=agent_id, lease_ids=lease_ids, sign=sign, start=start)
        return await self._tx(
            functools.partial(_acquire_body, node_id=node_id, now_ms=now_ms, ask=ask)
        )

    async def renew_lease(
        self, *, task_id: str, fencing_token: int, node_id: str, now_ms: int, sign: LeaseSigner
    ) -> tuple[TaskRecord, bytes]:
        def fn(conn: sqlite3.Connection) -> tuple[TaskRecord, bytes]:
            row = conn.execute(_SQL_RENEW, (now_ms, task_id, fencing_token, node_id)).fetchone()
            if row is None:
                raise _diagnose(conn, task_id, fencing_token, node_id, now_ms, None)
            task = row_to_task(row)
            envelope = sign(task)
            conn.execute(
                _SQL_HISTORY_INSERT,
                (task.task_id, task.lease_id, task.fencing_token, "renew", envelope, now_ms),
            )
            return task, envelope

        return await self._tx(fn)

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
        backoff_base_ms: int = 1_000,
        backoff_cap_ms: int = 60_000,
        sign_end: EndSigner | None = None,
    ) -> TaskRecord:
        item = HolderTransition(
            task_id=task_id,
            event=event,
            fencing_token=fencing_token,
            result=result,
            error=error,
            non_retryable=non_retryable,
            failure_type=failure_type,
        )
        return await self._tx(
            _transition_fn(item, node_id, now_ms, backoff_base_ms, backoff_cap_ms, sign_end)
        )

    async def transitions(
        self,
        *,
        node_id: str,
        items: Sequence[HolderTransition],
        now_ms: int,
        backoff_base_ms: int = 1_000,
        backoff_cap_ms: int = 60_000,
        sign_end: EndSigner | None = None,
    ) -> list[TaskRecord]:
        return await self._tx(
            _transitions_body(node_id, items, now_ms, backoff_base_ms, backoff_cap_ms, sign_end)
        )

    async def transitions_then_acquire(
        self,
        *,
        node_id: str,
        items: Sequence[HolderTransition],
        now_ms: int,
        then: GrantAsk,
        backoff_base_ms: int = 1_000,
        backoff_cap_ms: int = 60_000,
        sign_end: EndSigner | None = None,
        brief: bool = False,
    ) -> tuple[list[TaskRecord], list[tuple[TaskRecord, bytes]]]:
        ends = _transitions_body(
            node_id, items, now_ms, backoff_base_ms, backoff_cap_ms, sign_end, brief
        )

        def fn(conn: sqlite3.Connection) -> tuple[list[TaskRecord], list[tuple[TaskRecord, bytes]]]:
            tasks = ends(conn)  # raises (nothing granted, nothing ended) when one is refused
            return tasks, _acquire_body(conn, node_id=node_id, now_ms=now_ms, ask=then)

        return await self._tx(fn)

    async def cancel_task(
        self, task_id: str, reason: str, now_ms: int, sign_end: EndSigner | None = None
    ) -> TaskRecord:
        def fn(conn: sqlite3.Connection) -> TaskRecord:
            row = conn.execute(_SQL_CANCEL, (reason, now_ms, task_id)).fetchone()
            if row is None:
                current = conn.execute(
                    "SELECT state FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                cancel_refused(task_id, None if current is None else current[0])
            task = row_to_task(row)
            closed = conn.execute(_SQL_HISTORY_CLOSE, ("canceled", task_id, task.fencing_token))
            end = canceled_outcome(task, reason, now_ms)
            _record_end(conn, sign_end, end, closed=closed.rowcount > 0)
            return task

        return await self._tx(fn)

    async def sweep_lapsed(
        self,
        *,
        now_ms: int,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        limit: int = 1000,
        sign_end: EndSigner | None = None,
    ) -> list[LapseOutcome]:
        def fn(conn: sqlite3.Connection) -> list[LapseOutcome]:
            out: list[LapseOutcome] = []
            for row in conn.execute(_SQL_LAPSED, (now_ms, limit)).fetchall():
                lapse = lapse_outcome(row, now_ms, backoff_base_ms, backoff_cap_ms)
                task_id, token = lapse.task_id, lapse.fencing_token
                cur = conn.execute(
                    _SQL_LAPSE,
                    (int(lapse.state), lapse.not_before_unix_ms, now_ms, task_id, token),
                )
                if cur.rowcount == 1:
                    conn.execute(_SQL_HISTORY_CLOSE, ("lapsed", task_id, token))
                    _record_end(conn, sign_end, lapse, closed=True)
                    out.append(lapse)
            return out

        return await self._tx(fn)

    async def sweep_limits(
        self,
        *,
        now_ms: int,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        limit: int = 1000,
        sign_end: EndSigner | None = None,
    ) -> list[LapseOutcome]:
        def fn(conn: sqlite3.Connection) -> list[LapseOutcome]:
            out: list[LapseOutcome] = []
            for reason, select in (
                (EndReason.DEADLINE, _SQL_DEADLINE_DUE),
                (EndReason.SCHEDULE_TO_START_TIMEOUT, _SQL_SCHEDULE_TO_START_DUE),
            ):
                for row in conn.execute(select, (now_ms, limit)).fetchall():
                    task = row_to_task(row)
                    end = timeout_outcome(task, reason, now_ms)
                    cur = conn.execute(
                        _SQL_TIME_OUT[reason],
                        (
                            int(reason),
                            timeout_error(reason, end.limit_unix_ms),
                            now_ms,
                            task.task_id,
                            task.fencing_token,
                        ),
                    )
                    if cur.rowcount == 1:
                        closed = conn.execute(
                            _SQL_HISTORY_CLOSE, (reason.label, task.task_id, task.fencing_token)
                        )
                        _record_end(conn, sign_end, end, closed=closed.rowcount > 0)
                        out.append(end)
            for row in conn.execute(_SQL_ATTEMPT_DUE, (now_ms, limit)).fetchall():
                lapse = lapse_outcome(
                    row[:-1],
                    now_ms,
                    backoff_base_ms,
                    backoff_cap_ms,
                    reason=EndReason.ATTEMPT_TIMEOUT,
                    due_ms=row[-1],
                )
                task_id, token = lapse.task_id, lapse.fencing_token
                cur = conn.execute(
                    _SQL_ATTEMPT_TIME_OUT,
                    (int(lapse.state), lapse.not_before_unix_ms, now_ms, task_id, token),
                )
                if cur.rowcount == 1:
                    conn.execute(_SQL_HISTORY_CLOSE, ("attempt_timeout", task_id, token))
                    _record_end(conn, sign_end, lapse, closed=True)
                    out.append(lapse)
            return out

        return await self._tx(fn)

    async def database_now_ms(self) -> int | None:
        return None  # one process owns the file: the control plane's clock is the only one

    async def control_receipts(self, task_id: str) -> list[bytes]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT envelope FROM control_receipts WHERE task_id = ? ORDER BY id", (task_id,)
            ).fetchall()
        )
        return [bytes(r[0]) for r in rows]

    async def next_lease_expiry(self) -> int | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT min(lease_expires_unix_ms) FROM tasks WHERE state IN "
                f"{in_states(sources(Event.LAPSE))}"
            ).fetchone()
        )
        return None if row is None or row[0] is None else int(row[0])

    # -- nodes, policies, secrets ----------------------------------------------------

    async def put_node(self, node: NodeRecord) -> None:
        await self._tx(
            lambda c: c.execute(
                f"INSERT OR REPLACE INTO nodes ({NODE_WRITE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                node_row(node),
            )
        )

    async def get_node(self, node_id: str) -> NodeRecord | None:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {NODE_COLS} FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
        )
        return None if row is None else row_to_node(row)

    async def list_nodes(self) -> list[NodeRecord]:
        rows = await self._run(
            lambda c: c.execute(f"SELECT {NODE_COLS} FROM nodes ORDER BY node_id").fetchall()
        )
        return [row_to_node(r) for r in rows]

    async def set_node_status(
        self, node_id: str, status: str, reason: str, now_ms: int
    ) -> NodeRecord | None:
        check_node_status(status)
        row = await self._tx(
            lambda c: c.execute(
                "UPDATE nodes SET status = ?, status_reason = ?, updated_unix_ms = ?"
                f" WHERE node_id = ? RETURNING {NODE_COLS}",
                (status, reason, now_ms, node_id),
            ).fetchone()
        )
        return None if row is None else row_to_node(row)

    async def put_join_token(self, token: JoinTokenRecord) -> None:
        row = await self._tx(
            lambda c: c.execute(
                f"INSERT INTO join_tokens ({JOIN_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (token_sha256) DO NOTHING RETURNING 1",
                join_token_row(token),
            ).fetchone()
        )
        if row is None:
            raise join_token_exists(token)

    async def consume_join_token(
        self, token_sha256: str, node_id: str, now_ms: int
    ) -> JoinTokenRecord | None:
        row = await self._tx(
            lambda c: c.execute(
                "UPDATE join_tokens SET used_unix_ms = :now WHERE token_sha256 = :sha"
                " AND node_id = :node_id AND used_unix_ms IS NULL AND expires_unix_ms > :now"
                f" RETURNING {JOIN_TOKEN_COLS}",
                {"now": now_ms, "sha": token_sha256, "node_id": node_id},
            ).fetchone()
        )
        return None if row is None else row_to_join_token(row)

    async def void_join_tokens(self, node_id: str, now_ms: int) -> int:
        count: int = await self._tx(
            lambda c: (
                c.execute(
                    "UPDATE join_tokens SET used_unix_ms = ?"
                    " WHERE node_id = ? AND used_unix_ms IS NULL",
                    (now_ms, node_id),
                ).rowcount
            )
        )
        return count

    async def put_policy(self, document: str, digest: str, now_ms: int) -> PolicyRecord:
        def fn(conn: sqlite3.Connection) -> PolicyRecord:
            row = conn.execute(
                "INSERT INTO policies (version, document, digest, created_unix_ms)"
                " SELECT coalesce(max(version), 0) + 1, ?, ?, ? FROM policies RETURNING version",
                (document, digest, now_ms),
            ).fetchone()
            return PolicyRecord(row[0], document, digest, now_ms)

        return await self._tx(fn)

    async def get_policy(self, version: int = 0) -> PolicyRecord | None:
        params: tuple[int, ...] = (version,) if version else ()
        if version:
            sql = "SELECT * FROM policies WHERE version = ?"
        else:
            sql = "SELECT * FROM policies ORDER BY version DESC LIMIT 1"
        row = await self._run(lambda c: c.execute(sql, params).fetchone())
        return None if row is None else row_to_policy(row)

    async def put_secret(self, secret: SealedSecret) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO secrets (name, version, kek_id, wrapped_dek, nonce, ciphertext,"
                " created_unix_ms) SELECT ?1, coalesce(max(version), 0) + 1, ?2, ?3, ?4, ?5, ?6"
                " FROM secrets WHERE name = ?1 RETURNING version",
                (
                    secret.name,
                    secret.kek_id,
                    secret.wrapped_dek,
                    secret.nonce,
                    secret.ciphertext,
                    secret.created_unix_ms,
                ),
            ).fetchone()
            return int(row[0])

        return await self._tx(fn)

    async def get_secret(self, name: str, version: int = 0) -> SealedSecret | None:
        if version:
            sql = f"SELECT {SECRET_COLS} FROM secrets WHERE name = ? AND version = ?"
            params: tuple[Any, ...] = (name, version)
        else:
            sql = f"SELECT {SECRET_COLS} FROM secrets WHERE name = ? ORDER BY version DESC LIMIT 1"
            params = (name,)
        row = await self._run(lambda c: c.execute(sql, params).fetchone())
        return None if row is None else row_to_secret(row)

    async def list_secret_versions(self) -> list[SecretVersionInfo]:
        rows = await self._run(lambda c: c.execute(SQL_LIST_SECRET_VERSIONS).fetchall())
        return [SecretVersionInfo(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def put_sealed_secret(self, name: str, seal: SecretSealFn) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM secrets WHERE name = ?", (name,)
            ).fetchone()
            version = int(row[0])
            sec = seal(version)
            check_sealed(sec, name, version)
            conn.execute(
                f"INSERT INTO secrets ({SECRET_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                secret_row(sec, name, version),
            )
            return version

        return await self._tx(fn)

    async def rewrap_secrets(self, rewrap: SecretRewrapFn) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                f"SELECT {SECRET_COLS} FROM secrets ORDER BY name, version"
            ).fetchall()
            changed = 0
            for r in rows:
                old = row_to_secret(r)
                new = rewrap(old)
                if new is None:
                    continue
                conn.execute(
                    "UPDATE secrets SET kek_id = ?, wrapped_dek = ?, nonce = ?, ciphertext = ?"
                    " WHERE name = ? AND version = ?",
                    rewrap_row(new, old),
                )
                changed += 1
            return changed

        return await self._tx(fn)

    async def get_policy_by_digest(self, digest: str) -> PolicyRecord | None:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {POLICY_COLS} FROM policies WHERE digest = ? ORDER BY version DESC"
                " LIMIT 1",
                (digest,),
            ).fetchone()
        )
        return None if row is None else row_to_policy(row)

    async def lease_envelope(self, task_id: str, fencing_token: int) -> bytes | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT envelope FROM lease_history WHERE task_id = ? AND fencing_token = ?"
                " ORDER BY id DESC LIMIT 1",
                (task_id, fencing_token),
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def check_live_lease(
        self, *, task_id: str, fencing_token: int, node_id: str, now_ms: int
    ) -> TaskRecord:
        return await self._run(
            lambda c: _live_task(c, task_id, fencing_token, node_id, now_ms, "use a credential")
        )

    # -- budgets ----------------------------------------------------------------------

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
        def fn(conn: sqlite3.Connection) -> BudgetState:
            task = _live_task(conn, task_id, fencing_token, node_id, now_ms, "reserve budget")
            limit = budget_limit(task, default_limit_micros)
            existing = conn.execute(
                "SELECT amount_micros, fencing_token, node_id FROM budget_reservations"
                " WHERE task_id = ? AND reservation_id = ?",
                (task_id, reservation_id),
            ).fetchone()
            if existing is not None:
                return repeated_reservation(
                    existing,
                    task,
                    limit,
                    reservation_id=reservation_id,
                    amount_micros=amount_micros,
                    fencing_token=fencing_token,
                    node_id=node_id,
                )
            # The one conditional write: the limit check and the increment are the
            # same statement, so concurrent reservations can never overspend.
            row = conn.execute(
                f"UPDATE tasks SET budget_spent_micros = budget_spent_micros + :amount"
                f" WHERE task_id = :task_id AND state IN {in_states(LEASED_STATES)}"
                " AND fencing_token = :token AND node_id = :node_id"
                " AND lease_expires_unix_ms > :now"
                " AND budget_spent_micros + :amount <= :limit"
                " RETURNING budget_spent_micros",
                {
                    "amount": amount_micros,
                    "task_id": task_id,
                    "token": fencing_token,
                    "node_id": node_id,
                    "now": now_ms,
                    "limit": limit,
                },
            ).fetchone()
            if row is None:
                raise budget_exhausted(task, limit, amount_micros)
            conn.execute(
                "INSERT INTO budget_reservations (task_id, reservation_id, amount_micros,"
                " fencing_token, created_unix_ms, node_id) VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, reservation_id, amount_micros, fencing_token, now_ms, node_id),
            )
            return BudgetState(limit, int(row[0]))

        return await self._tx(fn)

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
        def fn(conn: sqlite3.Connection) -> BudgetState:
            res = conn.execute(
                "SELECT amount_micros, actual_micros, settled, fencing_token, node_id"
                " FROM budget_reservations WHERE task_id = ? AND reservation_id = ?",
                (task_id, reservation_id),
            ).fetchone()
            amount, settled = check_settlement(
                res,
                task_id=task_id,
                reservation_id=reservation_id,
                fencing_token=fencing_token,
                node_id=node_id,
                actual_micros=actual_micros,
            )
            if settled:
                row = conn.execute(
                    f"SELECT {TASK_BUDGET_COLS} FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                return budget_state(row, default_limit_micros, existed=True)
            conn.execute(
                "UPDATE budget_reservations SET settled = 1, actual_micros = ?"
                " WHERE task_id = ? AND reservation_id = ?",
                (actual_micros, task_id, reservation_id),
            )
            row = conn.execute(
                "UPDATE tasks SET budget_spent_micros = budget_spent_micros - ?"
                f" WHERE task_id = ? RETURNING {TASK_BUDGET_COLS}",
                (amount - actual_micros, task_id),
            ).fetchone()
            return budget_state(row, default_limit_micros, existed=False)

        return await self._tx(fn)

    # -- idempotency records ------------------------------------------------------------

    async def record_tool_call(
        self, write: ToolCallWrite, now_ms: int
    ) -> tuple[ToolCallRecord, bool]:
        w = write

        def fn(conn: sqlite3.Connection) -> tuple[ToolCallRecord, bool]:
            existing = _select_tool_call(conn, w.task_id, w.idempotency_key)
            try:
                _check_live(
                    conn, w.task_id, w.fencing_token, w.node_id, now_ms, "record a tool call"
                )
            except TetherError:
                if not late_completion(existing, w):
                    raise
                assert existing is not None
                if existing.phase is ToolCallPhase.STARTED:  # else: its own, already recorded
                    conn.execute(_SQL_TOOL_CALL_COMPLETE, tool_call_completion(w, now_ms))
                    existing = _select_tool_call(conn, w.task_id, w.idempotency_key)
                    assert existing is not None
                return existing, True
            if existing is not None and tool_call_repeat(existing, w):
                if takes_over(existing, w):
                    conn.execute(
                        "UPDATE tool_calls SET fencing_token = ?, node_id = ?, updated_unix_ms = ?"
                        " WHERE task_id = ? AND idempotency_key = ? AND phase = ?",
                        (
                            w.fencing_token,
                            w.node_id,
                            now_ms,
                            w.task_id,
                            w.idempotency_key,
                            int(ToolCallPhase.STARTED),
                        ),
                    )
                    existing = _select_tool_call(conn, w.task_id, w.idempotency_key)
                    assert existing is not None
                return existing, True
            if existing is None:
                row = tool_call_row(w, now_ms)
                conn.execute(
                    f"INSERT INTO tool_calls ({TOOL_CALL_COLS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                return row_to_tool_call(row), False  # what a read would give back
            # STARTED -> COMPLETED under the live holder's token (the key is its now)
            conn.execute(_SQL_TOOL_CALL_COMPLETE, tool_call_completion(w, now_ms))
            rec = _select_tool_call(conn, w.task_id, w.idempotency_key)
            assert rec is not None
            return rec, True

        return await self._tx(fn)

    async def lookup_tool_call(self, task_id: str, idempotency_key: str) -> ToolCallRecord | None:
        return await self._run(lambda c: _select_tool_call(c, task_id, idempotency_key))

    # -- receipt ledger ------------------------------------------------------------

    async def ledger_head(self, node_id: str) -> LedgerHead | None:
        return await self._run(lambda c: _ledger_head(c, node_id))

    async def ledger_envelopes(self, node_id: str, seqs: list[int]) -> dict[int, tuple[bytes, int]]:
        def fn(conn: sqlite3.Connection) -> dict[int, tuple[bytes, int]]:
            out: dict[int, tuple[bytes, int]] = {}
            for s in seqs:
                row = conn.execute(
                    "SELECT envelope, leaf_index FROM ledger_leaves WHERE node_id = ? AND seq = ?",
                    (node_id, s),
                ).fetchone()
                if row is not None:
                    out[s] = (bytes(row[0]), row[1])
            return out

        return await self._run(fn)

    async def ledger_append(
        self, node_id: str, expect: LedgerHead | None, leaves: list[LedgerLeaf], now_ms: int
    ) -> list[int] | None:
        def fn(conn: sqlite3.Connection) -> list[int] | None:
            if _ledger_head(conn, node_id) != expect:
                return None
            (top,) = conn.execute(
                "SELECT COALESCE(MAX(leaf_index), -1) FROM ledger_leaves"
            ).fetchone()
            indexes = list(range(top + 1, top + 1 + len(leaves)))
            conn.executemany(
                "INSERT INTO ledger_leaves VALUES (?,?,?,?,?,?,?,?)",
                [
                    (i, node_id, x.seq, x.task_id, x.envelope, x.leaf_hash, x.digest, now_ms)
                    for i, x in zip(indexes, leaves, strict=True)
                ],
            )
            completions = [receipt_completion(x.tool_call, now_ms) for x in leaves if x.tool_call]
            if completions:
                conn.executemany(_SQL_RECEIPT_COMPLETES, completions)
            row = conn.execute("SELECT tree_size, hashes FROM ledger_frontier WHERE id = 1")
            after = frontier_after_append(row.fetchone(), top, leaves)
            if after is not None:
                _put_frontier(conn, *after)
            return indexes

        return await self._tx(fn)

    async def ledger_leaf_hashes(self, start: int, limit: int | None = None) -> list[bytes]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT leaf_index, leaf_hash FROM ledger_leaves WHERE leaf_index >= ?"
                " ORDER BY leaf_index LIMIT ?",
                (start, -1 if limit is None else limit),
            ).fetchall()
        )
        return contiguous_leaf_hashes(start, rows)

    async def ledger_frontier(self) -> LedgerFrontier:
        def fn(conn: sqlite3.Connection) -> LedgerFrontier:
            row = conn.execute("SELECT tree_size, hashes FROM ledger_frontier WHERE id = 1")
            got = row.fetchone()
            (top,) = conn.execute(
                "SELECT COALESCE(MAX(leaf_index), -1) FROM ledger_leaves"
            ).fetchone()
            return frontier_from_row(got, int(top) + 1)

        return await self._run(fn)

    async def ledger_advance_frontier(
        self,
        expect_size: int,
        frontier: LedgerFrontier,
        subtrees: list[tuple[int, int, bytes]],
    ) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT tree_size FROM ledger_frontier WHERE id = 1").fetchone()
            if (0 if row is None else int(row[0])) != expect_size:
                return False
            _put_frontier(conn, frontier, subtrees)
            return True

        return await self._tx(fn)

    async def ledger_nodes(self, height: int, indexes: list[int]) -> dict[int, bytes]:
        def fn(conn: sqlite3.Connection) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            for i in range(0, len(indexes), 500):
                part = indexes[i : i + 500]
                marks = ",".join("?" * len(part))
                if height == 0:
                    rows = conn.execute(
                        "SELECT leaf_index, leaf_hash FROM ledger_leaves"
                        f" WHERE leaf_index IN ({marks})",
                        part,
                    )
                else:
                    rows = conn.execute(
                        "SELECT idx, hash FROM ledger_subtrees"
                        f" WHERE height = ? AND idx IN ({marks})",
                        [height, *part],
                    )
                out.update((int(r[0]), bytes(r[1])) for r in rows)
            return out

        return await self._run(fn)

    async def ledger_export_heads(self, since_unix_ms: int, below: int) -> dict[str, int]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT node_id, MAX(seq) FROM ledger_leaves"
                " WHERE stored_unix_ms >= ? AND leaf_index < ? GROUP BY node_id",
                (since_unix_ms, below),
            ).fetchall()
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def ledger_export_page(
        self, task_ids: list[str], after: int, below: int, limit: int
    ) -> list[LedgerEntry]:
        def fn(conn: sqlite3.Connection) -> list[LedgerEntry]:
            cols = "SELECT leaf_index, node_id, seq, task_id, envelope FROM ledger_leaves"
            if task_ids:
                marks = ",".join("?" * len(task_ids))
                cur = conn.execute(
                    f"{cols} WHERE task_id IN ({marks}) AND leaf_index > ? AND leaf_index < ?"
                    " ORDER BY leaf_index LIMIT ?",
                    (*task_ids, after, below, limit),
                )
            else:
                cur = conn.execute(
                    f"{cols} WHERE leaf_index > ? AND leaf_index < ? ORDER BY leaf_index LIMIT ?",
                    (after, below, limit),
                )
            return [LedgerEntry(r[0], r[1], r[2], r[3], bytes(r[4])) for r in cur]

        return await self._run(fn)

    async def put_checkpoint(self, cp: StoredCheckpoint) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO ledger_checkpoints VALUES (?, ?, ?, ?)",
                checkpoint_row(cp),
            )
        )

    async def try_lead(self, job: str, holder: str, ttl_ms: int, now_ms: int) -> int | None:
        # One process owns an SQLite database: its own clock is the only one.
        def fn(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "INSERT INTO leaders AS l (job, holder, epoch, expires_unix_ms)"
                " VALUES (:job, :holder, 1, :now + :ttl)"
                " ON CONFLICT (job) DO UPDATE SET holder = excluded.holder,"
                " epoch = l.epoch + CASE WHEN l.holder = excluded.holder"
                " AND l.expires_unix_ms > :now THEN 0 ELSE 1 END,"
                " expires_unix_ms = excluded.expires_unix_ms"
                " WHERE l.holder = excluded.holder OR l.expires_unix_ms <= :now"
                " RETURNING epoch",
                {"job": job, "holder": holder, "now": now_ms, "ttl": ttl_ms},
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._tx(fn)

    async def resign(self, job: str, holder: str) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE leaders SET expires_unix_ms = 0 WHERE job = ? AND holder = ?",
                (job, holder),
            )
        )

    async def leader(self, job: str) -> tuple[str, int, int] | None:
        now = time.time_ns() // 1_000_000
        row = await self._run(
            lambda c: c.execute(
                "SELECT holder, epoch, expires_unix_ms FROM leaders WHERE job = ?"
                " AND expires_unix_ms > ?",
                (job, now),
            ).fetchone()
        )
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {CHECKPOINT_COLS} FROM ledger_checkpoints ORDER BY tree_size DESC LIMIT 1"
            ).fetchone()
        )
        return None if row is None else row_to_checkpoint(row)

    async def put_node_certificate(
        self, node_id: str, cert_sha256: str, certificate: bytes, now_ms: int
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO ledger_node_certificates VALUES (?, ?, ?, ?)",
                (cert_sha256, node_id, now_ms, certificate),
            )
        )

    async def node_certificates(self, node_id: str) -> list[bytes]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT certificate FROM ledger_node_certificates WHERE node_id = ?"
                " ORDER BY recorded_unix_ms, cert_sha256",
                (node_id,),
            ).fetchall()
        )
        return [bytes(r[0]) for r in rows]


def _ledger_head(conn: sqlite3.Connection, node_id: str) -> LedgerHead | None:
    row = conn.execute(
        f"SELECT {LEDGER_HEAD_COLS} FROM ledger_leaves WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
        (node_id,),
    ).fetchone()
    return None if row is None else row_to_ledger_head(row)


def _select_tool_call(
    conn: sqlite3.Connection, task_id: str, idempotency_key: str
) -> ToolCallRecord | None:
    row = conn.execute(
        f"SELECT {TOOL_CALL_COLS} FROM tool_calls WHERE task_id = ? AND idempotency_key = ?",
        (task_id, idempotency_key),
    ).fetchone()
    return None if row is None else row_to_tool_call(row)


_SQL_LIVE = (
    f"SELECT 1 FROM tasks WHERE task_id = ? AND state IN {in_states(LEASED_STATES)}"
    " AND fencing_token = ? AND node_id = ? AND lease_expires_unix_ms > ?"
)
_SQL_LIVE_TASK = _SQL_LIVE.replace("SELECT 1 ", f"SELECT {TASK_COLS} ", 1)


def _check_live(
    conn: sqlite3.Connection,
    task_id: str,
    fencing_token: int,
    node_id: str,
    now_ms: int,
    action: str,
) -> None:
    """`_live_task` without reading the task: one indexed probe, no row to decode (a
    tool call's record needs only the yes or no; the task row was most of its cost)."""
    row = conn.execute(_SQL_LIVE, (task_id, fencing_token, node_id, now_ms)).fetchone()
    if row is None:
        raise no_live_lease(
            _diagnose(conn, task_id, fencing_token, node_id, now_ms, None), task_id, action
        )


def _live_task(
    conn: sqlite3.Connection,
    task_id: str,
    fencing_token: int,
    node_id: str,
    now_ms: int,
    action: str,
) -> TaskRecord:
    """The task if `node_id` holds its live lease under `fencing_token`, else the reason why not."""
    row = conn.execute(_SQL_LIVE_TASK, (task_id, fencing_token, node_id, now_ms)).fetchone()
    if row is not None:
        return row_to_task(row)
    raise no_live_lease(
        _diagnose(conn, task_id, fencing_token, node_id, now_ms, None), task_id, action
    )


def _diagnose(
    conn: sqlite3.Connection,
    task_id: str,
    fencing_token: int,
    node_id: str,
    now_ms: int,
    event: Event | None,
) -> TetherError:
    """Explains why a conditional write on a leased task matched no row."""
    row = conn.execute(f"SELECT {TASK_COLS} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    if row is None:
        return task_not_found(task_id)
    task = row_to_task(row)
    err = diagnose_lease(task_id, task, fencing_token, node_id, now_ms)
    if err is not None:
        return err
    lapsed = conn.execute(
        "SELECT 1 FROM lease_history WHERE task_id = ? AND fencing_token = ?"
        f" AND outcome IN ({', '.join(repr(o) for o in LAPSED_OUTCOMES)})",
        (task_id, fencing_token),
    ).fetchone()
    return diagnose_unleased(task_id, task, fencing_token, event, lapsed is not None)


def migration_files() -> list[tuple[int, str, Path]]:
    """(version, name, path) of every NNNN_name.sql migration, in order."""
    return numbered_migrations(MIGRATIONS_DIR)


def _split_sql(script: str) -> list[str]:
    """Splits a migration into statements (sqlite3.complete_statement aware)."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        statements.append(buf.strip())
    return statements
