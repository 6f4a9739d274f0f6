"""PostgreSQL store: several control-plane replicas over one database.

Same contract as `tether.store.sqlite`: every task state change is ONE
conditional UPDATE on (task id, source states from `tether.core.states`,
fencing token), so two writers, in one process or in two replicas, never both
win. Transactions run at READ COMMITTED: a blocked UPDATE re-checks its WHERE
clause on the row version that won, which is exactly the compare-and-set we
need. AcquireLease picks its row with `FOR UPDATE SKIP LOCKED`, so replicas
leasing from one queue never wait on each other's candidate rows. Migrations
run under a session advisory lock, so replicas may start at the same time.

Cross-replica long-poll wake-ups rely on the control service's periodic
re-check (`ControlConfig.long_poll_recheck_ms`); a replica wakes its own
waiters at once.

Every session runs with `lock_timeout`, `statement_timeout` and
`idle_in_transaction_session_timeout` (`PostgresSettings`), so a replica paused
or partitioned inside a transaction (holding the ledger's advisory lock, or a
task row) stalls the others for at most those bounds: the server ends its
session and the locks go with it. A statement refused by those timeouts, or a
lost connection, is `Unavailable` (retry), never an internal error; a pooled
connection found dead before its transaction began is replaced and the
transaction run on another one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from tether.core.errors import StorageError, TetherError, Unavailable
from tether.core.states import LEASED_STATES, Event, State, sources
from tether.core.timeouts import EndReason
from tether.store import is_postgres_url
from tether.store.base import (
    POLICY_CHANNEL,
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
from tether.store.postgres_settings import PostgresSettings

MIGRATIONS_DIR = Path(__file__).parent / "migrations" / "postgres"

# pg_advisory_lock keys ("tether" + a small number); any constant bigint would do.
_LOCK_MIGRATIONS = 0x7465746865720001
_LOCK_POLICIES = 0x7465746865720002
_LOCK_LEDGER = 0x7465746865720003
LEDGER_LOCK_KEY = _LOCK_LEDGER
"""The advisory lock every ledger append takes (chaos tests hold it to pause a replica
inside its append transaction)."""
_LOCK_SECRETS = 0x74650003  # int4 class; hashtext(name) is the second key

_DB_NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"

# Takes the job if free or lapsed, renews it if ours; a new term gets epoch + 1.
_SQL_LEAD = f"""
INSERT INTO leaders AS l (job, holder, epoch, expires_unix_ms)
VALUES (%(job)s, %(holder)s, 1, {_DB_NOW_MS} + %(ttl)s)
ON CONFLICT (job) DO UPDATE SET holder = EXCLUDED.holder,
    epoch = l.epoch + CASE WHEN l.holder = EXCLUDED.holder AND l.expires_unix_ms > {_DB_NOW_MS}
        THEN 0 ELSE 1 END,
    expires_unix_ms = EXCLUDED.expires_unix_ms
WHERE l.holder = EXCLUDED.holder OR l.expires_unix_ms <= {_DB_NOW_MS}
RETURNING epoch
"""


def sql_listen(channel: str) -> str:
    """LISTEN on a fixed identifier (channels here are constants, never user input)."""
    if not channel.replace("_", "").isalnum():
        raise ValueError(f"bad channel name {channel!r}")
    return f"LISTEN {channel}"


# Deadlocks and serialization failures are retried this many times in all.
_TX_ATTEMPTS = 3

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]
Row = tuple[Any, ...]


# SQLSTATE classes a retry (maybe on another connection) may cure: connection
# exceptions (08), operator intervention such as pg_terminate_backend (57P01-3),
# a canceled statement (57014: statement_timeout), a lock not granted in time (55P03).
_TRANSIENT = (
    pg_errors.LockNotAvailable,
    pg_errors.QueryCanceled,
    pg_errors.AdminShutdown,
    pg_errors.CrashShutdown,
    pg_errors.CannotConnectNow,
    pg_errors.IdleInTransactionSessionTimeout,
)


def _transient(err: psycopg.Error) -> bool:
    """True for errors that say "busy or unreachable", not "wrong"."""
    if isinstance(err, _TRANSIENT):
        return True
    return isinstance(err, psycopg.OperationalError) and (
        err.sqlstate is None or err.sqlstate.startswith("08")
    )


def _unavailable(err: psycopg.Error) -> Unavailable:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return Unavailable(
        f"database busy or unreachable ({first}); retry", metadata={"retry_after_ms": "500"}
    )


def redact_url(url: str) -> str:
    """The URL without user or password, safe for logs and error messages."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://<unparsable URL>"
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"postgresql://{host}{':' + str(port) if port else ''}/{db}"


# One conditional write per grant state: plain LEASE, or LEASE+START (`start=True`).
# Up to %(n)s grants at once: the k-th ready task (queue order, 0-based) gets the k-th
# lease id of %(lease_ids)s; rows another replica holds locked are skipped.
_SQL_ACQUIRE_MANY = {
    start: f"""
WITH pick AS (
    SELECT seq AS pseq,
        row_number() OVER (ORDER BY not_before_unix_ms, created_unix_ms, seq) - 1 AS k
    FROM (SELECT seq, not_before_unix_ms, created_unix_ms FROM tasks
          WHERE queue = %(queue)s AND state IN {in_states(sources(Event.LEASE))}
            AND not_before_unix_ms <= %(now)s
          ORDER BY not_before_unix_ms, created_unix_ms, seq
          LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS ready)
UPDATE tasks SET state = {int(grant_state(start))},
    attempt = attempt + 1, fencing_token = fencing_token + 1,
    node_id = %(node_id)s, agent_id = %(agent_id)s,
    lease_id = (%(lease_ids)s::text[])[pick.k + 1],
    lease_expires_unix_ms = %(now)s + lease_ttl_ms, updated_unix_ms = %(now)s,
    attempt_started_unix_ms = %(now)s
FROM pick
WHERE tasks.seq = pick.pseq AND tasks.state IN {in_states(sources(Event.LEASE))}
RETURNING {", ".join("tasks." + c.strip() for c in TASK_COLS.split(","))}
"""
    for start in (False, True)
}

_SQL_RENEW = f"""
UPDATE tasks SET lease_expires_unix_ms = %(now)s + lease_ttl_ms, updated_unix_ms = %(now)s
WHERE task_id = %(task_id)s AND state IN {in_states(LEASED_STATES)} AND fencing_token = %(token)s
  AND node_id = %(node_id)s AND lease_expires_unix_ms > %(now)s
RETURNING {TASK_COLS}
"""

_SQL_HISTORY_INSERT = """
INSERT INTO lease_history (task_id, lease_id, fencing_token, kind, envelope, outcome,
    created_unix_ms) VALUES (%s, %s, %s, %s, %s, 'active', %s)
"""

_SQL_HISTORY_CLOSE = """
UPDATE lease_history SET outcome = %s WHERE task_id = %s AND fencing_token = %s
  AND outcome = 'active'
"""

_SQL_TOOL_CALL_COMPLETE = """
UPDATE tool_calls SET phase = %s, result = %s, status = %s, fencing_token = %s,
    cost_micros = %s, updated_unix_ms = %s
WHERE task_id = %s AND idempotency_key = %s AND phase = %s
"""

_SQL_RECEIPT_COMPLETES = RECEIPT_COMPLETES.format(p="%s")

_SQL_LAST_LEASE = """
SELECT envelope FROM lease_history WHERE task_id = %s AND fencing_token = %s
ORDER BY id DESC LIMIT 1
"""

_SQL_CONTROL_RECEIPT = """
INSERT INTO control_receipts (task_id, fencing_token, end_reason, envelope, created_unix_ms)
VALUES (%s, %s, %s, %s, %s)
"""


def _transition_sql(event: Event, retry: bool = False) -> tuple[str, str | None]:
    """The conditional UPDATE for a holder event and the lease outcome it records.

    `retry`: the FAIL the retry policy retries (queued again at not_before).
    """
    target = State.QUEUED if retry else target_state(event)
    outcome = holder_outcome(target)
    src = in_states(sources(event))
    where = (
        f"WHERE task_id = %(task_id)s AND state IN {src} AND fencing_token = %(token)s"
        " AND node_id = %(node_id)s AND lease_expires_unix_ms > %(now)s"
    )
    if outcome is None:
        sets = ""
    elif outcome == "released":
        sets = (
            ", node_id = '', agent_id = '', lease_id = '', lease_expires_unix_ms = 0,"
            " not_before_unix_ms = %(not_before)s, error = %(error)s,"
            " end_reason = %(end_reason)s"
        )
    else:
        sets = (
            ", lease_expires_unix_ms = 0, result = %(result)s, error = %(error)s,"
            " end_reason = %(end_reason)s"
        )
    state = str(int(target))
    if outcome == "released" and not retry:  # a released attempt counts against max_attempts
        state = f"CASE WHEN attempt >= max_attempts THEN {int(State.EXPIRED)} ELSE {state} END"
    sql = (
        f"UPDATE tasks SET state = {state}, updated_unix_ms = %(now)s{sets} {where}"
        f" RETURNING {TASK_COLS}"
    )
    return sql, "failed" if retry else outcome


_SQL_TRANSITION = {e: _transition_sql(e) for e in HOLDER_EVENTS}
_SQL_FAIL_RETRY = _transition_sql(Event.FAIL, retry=True)

# SUCCEED for a batch of held tasks in one UPDATE: per row the conditions and writes of
# `_transition_sql(Event.SUCCEED)`, the tasks' fields as parallel arrays.
_SQL_SUCCEED_MANY = f"""
UPDATE tasks SET state = {int(target_state(Event.SUCCEED))}, updated_unix_ms = %(now)s,
    lease_expires_unix_ms = 0, result = v.result, error = v.error,
    end_reason = {holder_end_reason(Event.SUCCEED)}
FROM unnest(%(task_ids)s::text[], %(tokens)s::bigint[], %(results)s::bytea[],
            %(errors)s::text[]) AS v(task_id, token, result, error)
WHERE tasks.task_id = v.task_id AND tasks.state IN {in_states(sources(Event.SUCCEED))}
  AND tasks.fencing_token = v.token AND tasks.node_id = %(node_id)s
  AND tasks.lease_expires_unix_ms > %(now)s
RETURNING {", ".join("tasks." + c.strip() for c in TASK_COLS.split(","))}
"""

# The same writes without reading the rows back (a brief answer counts them instead).
_SQL_SUCCEED_MANY_BRIEF = _SQL_SUCCEED_MANY[: _SQL_SUCCEED_MANY.index("RETURNING")]

_SQL_HISTORY_CLOSE_MANY = """
UPDATE lease_history SET outcome = %(outcome)s
WHERE (task_id, fencing_token) IN (
    SELECT * FROM unnest(%(task_ids)s::text[], %(tokens)s::bigint[]))
  AND outcome = 'active'
"""
_SUCCEEDED_OUTCOME = holder_outcome(target_state(Event.SUCCEED))


async def _succeed_many(
    conn: Conn,
    node_id: str,
    items: Sequence[HolderTransition],
    now_ms: int,
    *,
    brief: bool = False,
) -> list[TaskRecord] | None:
    """All-SUCCEED batches in two statements (two round trips) instead of two per task;
    None (nothing written) when any item would be refused, so the caller goes item by
    item and names it. `brief`: the same writes, answered with [] (no row read back)."""
    ids = [item.task_id for item in items]
    tokens = [item.fencing_token for item in items]
    params = {
        "now": now_ms,
        "node_id": node_id,
        "task_ids": ids,
        "tokens": tokens,
        "results": [item.result for item in items],
        "errors": [item.error for item in items],
    }
    await conn.execute("SAVEPOINT ends")
    rows: list[Any] = []
    if brief:  # the tasks' ids are distinct (the callers check): one changed row each
        ended = await _exec(conn, _SQL_SUCCEED_MANY_BRIEF, params)
    else:
        rows = await _all(conn, _SQL_SUCCEED_MANY, params)
        ended = len(rows)
    if ended != len(items):
        await conn.execute("ROLLBACK TO SAVEPOINT ends")
        await conn.execute("RELEASE SAVEPOINT ends")
        return None
    await conn.execute(
        _SQL_HISTORY_CLOSE_MANY, {"outcome": _SUCCEEDED_OUTCOME, "task_ids": ids, "tokens": tokens}
    )
    await conn.execute("RELEASE SAVEPOINT ends")
    if brief:
        return []
    by_id = {t.task_id: t for t in map(row_to_task, rows)}
    return [by_id[item.task_id] for item in items]


_CANCELED = target_state(Event.CANCEL)
_SQL_CANCEL = f"""
UPDATE tasks SET state = {int(_CANCELED)}, error = %(reason)s, updated_unix_ms = %(now)s,
    lease_expires_unix_ms = 0, end_reason = {int(EndReason.CANCELED)}
WHERE task_id = %(task_id)s AND state IN {in_states(sources(Event.CANCEL))}
RETURNING {TASK_COLS}
"""

# SKIP LOCKED: two replicas' sweepers split the lapsed leases between them.
_SQL_LAPSED = f"""
SELECT {LAPSED_COLS} FROM tasks
WHERE state IN {in_states(sources(Event.LAPSE))} AND lease_expires_unix_ms <= %s
ORDER BY lease_expires_unix_ms LIMIT %s FOR UPDATE SKIP LOCKED
"""

_SQL_LAPSE = f"""
UPDATE tasks SET state = %(state)s, not_before_unix_ms = %(not_before)s, node_id = '',
    agent_id = '', lease_id = '', lease_expires_unix_ms = 0, updated_unix_ms = %(now)s,
    error = 'lease lapsed', end_reason = {int(EndReason.HEARTBEAT_TIMEOUT)}
WHERE task_id = %(task_id)s AND state IN {in_states(sources(Event.LAPSE))}
  AND fencing_token = %(token)s AND lease_expires_unix_ms <= %(now)s
"""

# -- time limits (tether.core.timeouts), enforced by the sweeper ---------------------
# SKIP LOCKED as for lapses: replicas' sweepers split the work.
_SQL_DEADLINE_DUE = f"""
SELECT {TASK_COLS} FROM tasks
WHERE deadline_unix_ms > 0 AND deadline_unix_ms <= %s
  AND state IN {in_states(sources(Event.TIME_OUT))}
ORDER BY deadline_unix_ms LIMIT %s FOR UPDATE SKIP LOCKED
"""

_SQL_SCHEDULE_TO_START_DUE = f"""
SELECT {TASK_COLS} FROM tasks
WHERE schedule_to_start_ms > 0 AND state = {int(State.QUEUED)}
  AND not_before_unix_ms + schedule_to_start_ms <= %s
ORDER BY not_before_unix_ms LIMIT %s FOR UPDATE SKIP LOCKED
"""

# The re-checked condition of each TIME_OUT, so a task changed since the select
# (leased, finished, canceled) is left alone.
_TIME_OUT_DUE = {
    EndReason.DEADLINE: "deadline_unix_ms > 0 AND deadline_unix_ms <= %(now)s",
    EndReason.SCHEDULE_TO_START_TIMEOUT: (
        f"state = {int(State.QUEUED)} AND schedule_to_start_ms > 0"
        " AND not_before_unix_ms + schedule_to_start_ms <= %(now)s"
    ),
}

_SQL_TIME_OUT = {
    reason: f"""
UPDATE tasks SET state = {int(State.EXPIRED)}, end_reason = %(reason)s, error = %(error)s,
    lease_expires_unix_ms = 0, updated_unix_ms = %(now)s
WHERE task_id = %(task_id)s AND fencing_token = %(token)s
  AND state IN {in_states(sources(Event.TIME_OUT))} AND {due}
"""
    for reason, due in _TIME_OUT_DUE.items()
}

_SQL_ATTEMPT_DUE = f"""
SELECT {LAPSED_COLS}, attempt_started_unix_ms + attempt_timeout_ms FROM tasks
WHERE attempt_timeout_ms > 0 AND state IN {in_states(sources(Event.LAPSE))}
  AND attempt_started_unix_ms + attempt_timeout_ms <= %s
ORDER BY attempt_started_unix_ms LIMIT %s FOR UPDATE SKIP LOCKED
"""

_SQL_ATTEMPT_TIME_OUT = f"""
UPDATE tasks SET state = %(state)s, not_before_unix_ms = %(not_before)s, node_id = '',
    agent_id = '', lease_id = '', lease_expires_unix_ms = 0, updated_unix_ms = %(now)s,
    error = 'attempt timeout', end_reason = {int(EndReason.ATTEMPT_TIMEOUT)}
WHERE task_id = %(task_id)s AND state IN {in_states(sources(Event.LAPSE))}
  AND fencing_token = %(token)s AND attempt_timeout_ms > 0
  AND attempt_started_unix_ms + attempt_timeout_ms <= %(now)s
"""


def conn_broken(err: psycopg.Error) -> bool:
    """True when the error came from a connection that is gone (not a refused statement)."""
    return isinstance(err, psycopg.OperationalError) and (
        err.sqlstate is None
        or err.sqlstate.startswith("08")
        or isinstance(err, pg_errors.AdminShutdown)
    )


async def _one(conn: Conn, sql: str, params: Any = None) -> Row | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def _all(conn: Conn, sql: str, params: Any = None) -> list[Row]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def _exec(conn: Conn, sql: str, params: Any = None) -> int:
    """Runs a statement; returns its row count."""
    cur = await conn.execute(sql, params)
    return cur.rowcount


async def _record_end(
    conn: Conn, sign_end: EndSigner | None, end: LapseOutcome, *, closed: bool
) -> None:
    """Stores the control receipt of `end`; `closed`: a live lease ended with it."""
    if sign_end is None:
        return
    lease = b""
    if closed:
        row = await _one(conn, _SQL_LAST_LEASE, (end.task_id, end.fencing_token))
        lease = b"" if row is None else bytes(row[0])
    await conn.execute(
        _SQL_CONTROL_RECEIPT,
        (
            end.task_id,
            end.fencing_token,
            int(end.reason),
            sign_end(end, lease),
            end.decided_unix_ms,
        ),
    )


def _transition_fn(
    item: HolderTransition,
    node_id: str,
    now_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
    sign_end: EndSigner | None,
) -> Callable[[Conn], Awaitable[TaskRecord]]:
    """One holder transition as a transaction body (see `Store.transition`)."""
    task_id, event, fencing_token = item.task_id, item.event, item.fencing_token
    entry = holder_entry(_SQL_TRANSITION, event)

    async def fn(conn: Conn) -> TaskRecord:
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
            current = await _one(
                conn, f"SELECT {TASK_COLS} FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,)
            )
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
        row = await _one(conn, sql, params)
        if row is None:
            raise await _diagnose(conn, task_id, fencing_token, node_id, now_ms, event)
        task = row_to_task(row)
        if outcome is not None:
            closed = await _exec(conn, _SQL_HISTORY_CLOSE, (outcome, task_id, fencing_token))
            if outcome == "released":
                end = released_outcome(task, fencing_token, item.error, now_ms)
                await _record_end(conn, sign_end, end, closed=closed > 0)
        return task

    return fn


async def _acquire_body(
    conn: Conn, *, node_id: str, now_ms: int, ask: GrantAsk
) -> list[tuple[TaskRecord, bytes]]:
    """Up to `len(ask.lease_ids)` grants as one transaction body (see `Store.acquire_leases`):
    one multi-row UPDATE (each row its own conditional write, token and lease id), one
    signed lease per grant, the history rows in one executemany."""
    if not ask.lease_ids:
        return []
    params = {
        "node_id": node_id,
        "agent_id": ask.agent_id,
        "lease_ids": list(ask.lease_ids),
        "now": now_ms,
        "queue": ask.queue,
        "n": len(ask.lease_ids),
    }
    rows = await _all(conn, _SQL_ACQUIRE_MANY[ask.start], params)
    tasks = sorted(
        map(row_to_task, rows), key=lambda t: (t.not_before_unix_ms, t.created_unix_ms, t.seq)
    )
    out = [(task, ask.sign(task)) for task in tasks]
    if out:
        async with conn.cursor() as cur:
            await cur.executemany(
                _SQL_HISTORY_INSERT,
                [(t.task_id, t.lease_id, t.fencing_token, "grant", env, now_ms) for t, env in out],
            )
    return out


def _transitions_body(
    node_id: str,
    items: Sequence[HolderTransition],
    now_ms: int,
    backoff_base_ms: int,
    backoff_cap_ms: int,
    sign_end: EndSigner | None,
    brief: bool = False,
) -> Callable[[Conn], Awaitable[list[TaskRecord]]]:
    """Several holder transitions as one transaction body, all or nothing (see
    `Store.transitions`): the first refused raises with `metadata["index"]`.

    An all-SUCCEED batch takes the batch path; the per-item bodies are made only when
    it does not (or declines: then they name the refused item). `brief`: the same
    writes, answered with [] (see `Store.transitions_then_acquire`)."""
    all_succeed = len(items) > 1 and all(item.event is Event.SUCCEED for item in items)

    async def fn(conn: Conn) -> list[TaskRecord]:
        if all_succeed:
            done = await _succeed_many(conn, node_id, items, now_ms, brief=brief)
            if done is not None:
                return done
        out: list[TaskRecord] = []
        for index, item in enumerate(items):
            one = _transition_fn(item, node_id, now_ms, backoff_base_ms, backoff_cap_ms, sign_end)
            try:
                out.append(await one(conn))
            except TetherError as err:
                err.metadata["index"] = str(index)
                raise
        return [] if brief else out

    return fn


class PostgresStore:
    """The `Store` for several control-plane replicas sharing one PostgreSQL database."""

    def __init__(self, url: str, settings: PostgresSettings | None = None) -> None:
        if not is_postgres_url(url):
            raise ValueError("a PostgreSQL store needs a postgresql:// URL")
        self.url = url  # may hold a password: never log it (see `redact_url`)
        self.settings = settings or PostgresSettings()
        self._pool: AsyncConnectionPool[Conn] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    # -- plumbing -----------------------------------------------------------------

    async def open(self) -> None:
        where = redact_url(self.url)
        cfg = self.settings
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.url,
            min_size=cfg.pool_min,
            max_size=cfg.pool_max,
            kwargs=self.connect_kwargs(),
            timeout=cfg.connect_timeout_s,
            open=False,
            name="tether-store",
        )
        try:
            await pool.open(wait=True, timeout=cfg.connect_timeout_s)
            async with pool.connection() as conn:
                await self._migrate(conn)
        except psycopg.Error as err:
            await pool.close()
            raise StorageError(f"cannot open database {where}: {err}") from err
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def connect_kwargs(self) -> dict[str, Any]:
        """Connection arguments beside the URL: autocommit, timeouts, keepalives."""
        cfg = self.settings
        return {
            "autocommit": True,
            "connect_timeout": cfg.connect_timeout_s,
            "options": cfg.session_options(),
            "application_name": cfg.application_name(),
            # A peer that vanished (host down, cable cut) is noticed in ~20 s, not hours.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 2,
        }

    async def connect(self, purpose: str) -> Conn:
        """A dedicated connection outside the pool (e.g. a listener); caller closes.

        Its application_name is "tether-control-<purpose> <replica id>" (pg_stat_activity).

        Raises:
            Unavailable: the database cannot be reached.
        """
        kwargs = self.connect_kwargs() | {
            "application_name": self.settings.application_name(purpose)
        }
        try:
            return await psycopg.AsyncConnection.connect(self.url, **kwargs)
        except psycopg.Error as err:
            raise _unavailable(err) from err

    def _require_pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise StorageError("store is not open")
        return self._pool

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Runs `fn(conn)` in one transaction (rolled back on error; retried on deadlock).

        `fn` may run again after a deadlock or serialization failure, so callbacks
        it calls (lease signers, sealers) must have no effect outside the database.
        """
        pool = self._require_pool()
        attempt = stale = 0
        while True:
            began = False
            try:
                async with pool.connection() as conn, conn.transaction():
                    began = True
                    return await fn(conn)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as err:
                attempt += 1
                if attempt == _TX_ATTEMPTS:
                    raise StorageError(f"database error after {attempt} tries: {err}") from err
            except TetherError:
                raise
            except psycopg.Error as err:
                # A pooled connection the server ended (pg_terminate_backend, restart,
                # idle timeout) fails at BEGIN, before `fn` ran: run it on another one.
                if not began and _transient(err) and stale < self.settings.pool_max:
                    stale += 1
                    continue
                if _transient(err):
                    raise _unavailable(err) from err
                raise StorageError(f"database error: {err}") from err

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Runs `fn(conn)` in autocommit mode (each statement sees the latest commits)."""
        pool = self._require_pool()
        for stale in range(self.settings.pool_max + 1):
            try:
                async with pool.connection() as conn:
                    return await fn(conn)
            except TetherError:
                raise
            except psycopg.Error as err:
                # Reads change nothing: one that met a dead pooled connection is repeated.
                if _transient(err) and stale < self.settings.pool_max and conn_broken(err):
                    continue
                if _transient(err):
                    raise _unavailable(err) from err
                raise StorageError(f"database error: {err}") from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _migrate(self, conn: Conn) -> None:
        """Applies pending migrations, one transaction each, under an advisory lock."""
        # Migrations may run long and wait for another replica's: no timeouts here.
        await conn.execute("SET statement_timeout = 0; SET lock_timeout = 0")
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_MIGRATIONS,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_unix_ms BIGINT NOT NULL)"
            )
            done = {r[0] for r in await _all(conn, "SELECT version FROM schema_migrations")}
            for version, name, path in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    # No parameters: psycopg sends the file as one multi-statement query.
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                        (version, name, time.time_ns() // 1_000_000),
                    )
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_MIGRATIONS,))
            await conn.execute("RESET statement_timeout; RESET lock_timeout")

    async def applied_migrations(self) -> list[int]:
        """Versions recorded in schema_migrations, ascending."""
        rows = await self._read(
            lambda c: _all(c, "SELECT version FROM schema_migrations ORDER BY version")
        )
        return [r[0] for r in rows]

    # -- tasks --------------------------------------------------------------------

    async def submit_task(
        self, task: NewTask, task_id: str, now_ms: int
    ) -> tuple[TaskRecord, bool]:
        async def existing(conn: Conn) -> TaskRecord:
            row = await _one(
                conn,
                f"SELECT {TASK_COLS} FROM tasks WHERE idempotency_key = %s",
                (task.idempotency_key,),
            )
            if row is None:  # pragma: no cover - the conflicting row is committed
                raise StorageError("idempotent submit lost its conflicting row")
            return idempotent_submit(row_to_task(row), task)

        async def fn(conn: Conn) -> tuple[TaskRecord, bool]:
            if task.idempotency_key:
                row = await _one(
                    conn, "SELECT 1 FROM tasks WHERE idempotency_key = %s", (task.idempotency_key,)
                )
                if row is not None:
                    return await existing(conn), False
            # ON CONFLICT: a concurrent submit with the same key (maybe on another
            # replica) waits for that one to commit, then inserts nothing.
            row = await _one(
                conn,
                f"INSERT INTO tasks ({NEW_TASK_COLS}) VALUES ({', '.join(['%s'] * NEW_TASK_ARITY)})"
                " ON CONFLICT (idempotency_key) WHERE idempotency_key <> '' DO NOTHING"
                f" RETURNING {TASK_COLS}",
                new_task_row(task, task_id, now_ms),
            )
            if row is None:
                return await existing(conn), False
            return row_to_task(row), True

        return await self._tx(fn)

    async def get_task(self, task_id: str) -> TaskRecord:
        row = await self._read(
            lambda c: _one(c, f"SELECT {TASK_COLS} FROM tasks WHERE task_id = %s", (task_id,))
        )
        if row is None:
            raise task_not_found(task_id)
        return row_to_task(row)

    async def list_tasks(
        self, *, queue: str, state: State | None, after_seq: int, limit: int
    ) -> list[TaskRecord]:
        clauses, params = ["seq > %s"], [after_seq]
        if queue:
            clauses.append("queue = %s")
            params.append(queue)  # type: ignore[arg-type]
        if state is not None:
            clauses.append("state = %s")
            params.append(int(state))
        sql = f"SELECT {TASK_COLS} FROM tasks WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT %s"
        params.append(limit)
        rows = await self._read(lambda c: _all(c, sql, params))
        return [row_to_task(r) for r in rows]

    async def count_tasks_by_state(self) -> dict[State, int]:
        rows = await self._read(
            lambda c: _all(c, "SELECT state, COUNT(*) FROM tasks GROUP BY state")
        )
        return {State(r[0]): int(r[1]) for r in rows}

    async def lease_history(self, task_id: str) -> list[LeaseHistoryEntry]:
        rows = await self._read(
            lambda c: _all(
                c,
                f"SELECT {LEASE_HISTORY_COLS} FROM lease_history WHERE task_id = %s ORDER BY id",
                (task_id,),
            )
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
        params = {"now": now_ms, "task_id": task_id, "token": fencing_token, "node_id": node_id}

        async def fn(conn: Conn) -> tuple[TaskRecord, bytes]:
            row = await _one(conn, _SQL_RENEW, params)
            if row is None:
                raise await _diagnose(conn, task_id, fencing_token, node_id, now_ms, None)
            task = row_to_task(row)
            envelope = sign(task)
            await conn.execute(
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

        async def fn(conn: Conn) -> tuple[list[TaskRecord], list[tuple[TaskRecord, bytes]]]:
            tasks = await ends(conn)  # raises (nothing granted, nothing ended) when one is refused
            return tasks, await _acquire_body(conn, node_id=node_id, now_ms=now_ms, ask=then)

        return await self._tx(fn)

    async def cancel_task(
        self, task_id: str, reason: str, now_ms: int, sign_end: EndSigner | None = None
    ) -> TaskRecord:
        params = {"reason": reason, "now": now_ms, "task_id": task_id}

        async def fn(conn: Conn) -> TaskRecord:
            row = await _one(conn, _SQL_CANCEL, params)
            if row is None:
                current = await _one(conn, "SELECT state FROM tasks WHERE task_id = %s", (task_id,))
                cancel_refused(task_id, None if current is None else current[0])
            task = row_to_task(row)
            closed = await _exec(
                conn, _SQL_HISTORY_CLOSE, ("canceled", task_id, task.fencing_token)
            )
            end = canceled_outcome(task, reason, now_ms)
            await _record_end(conn, sign_end, end, closed=closed > 0)
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
        async def fn(conn: Conn) -> list[LapseOutcome]:
            out: list[LapseOutcome] = []
            for row in await _all(conn, _SQL_LAPSED, (now_ms, limit)):
                lapse = lapse_outcome(row, now_ms, backoff_base_ms, backoff_cap_ms)
                task_id, token = lapse.task_id, lapse.fencing_token
                changed = await _exec(
                    conn,
                    _SQL_LAPSE,
                    {
                        "state": int(lapse.state),
                        "not_before": lapse.not_before_unix_ms,
                        "now": now_ms,
                        "task_id": task_id,
                        "token": token,
                    },
                )
                if changed == 1:
                    await conn.execute(_SQL_HISTORY_CLOSE, ("lapsed", task_id, token))
                    await _record_end(conn, sign_end, lapse, closed=True)
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
        async def fn(conn: Conn) -> list[LapseOutcome]:
            out: list[LapseOutcome] = []
            for reason, select in (
                (EndReason.DEADLINE, _SQL_DEADLINE_DUE),
                (EndReason.SCHEDULE_TO_START_TIMEOUT, _SQL_SCHEDULE_TO_START_DUE),
            ):
                for row in await _all(conn, select, (now_ms, limit)):
                    task = row_to_task(row)
                    end = timeout_outcome(task, reason, now_ms)
                    changed = await _exec(
                        conn,
                        _SQL_TIME_OUT[reason],
                        {
                            "reason": int(reason),
                            "error": timeout_error(reason, end.limit_unix_ms),
                            "now": now_ms,
                            "task_id": task.task_id,
                            "token": task.fencing_token,
                        },
                    )
                    if changed == 1:
                        closed = await _exec(
                            conn,
                            _SQL_HISTORY_CLOSE,
                            (reason.label, task.task_id, task.fencing_token),
                        )
                        await _record_end(conn, sign_end, end, closed=closed > 0)
                        out.append(end)
            for row in await _all(conn, _SQL_ATTEMPT_DUE, (now_ms, limit)):
                lapse = lapse_outcome(
                    row[:-1],
                    now_ms,
                    backoff_base_ms,
                    backoff_cap_ms,
                    reason=EndReason.ATTEMPT_TIMEOUT,
                    due_ms=row[-1],
                )
                task_id, token = lapse.task_id, lapse.fencing_token
                changed = await _exec(
                    conn,
                    _SQL_ATTEMPT_TIME_OUT,
                    {
                        "state": int(lapse.state),
                        "not_before": lapse.not_before_unix_ms,
                        "now": now_ms,
                        "task_id": task_id,
                        "token": token,
                    },
                )
                if changed == 1:
                    await conn.execute(_SQL_HISTORY_CLOSE, ("attempt_timeout", task_id, token))
                    await _record_end(conn, sign_end, lapse, closed=True)
                    out.append(lapse)
            return out

        return await self._tx(fn)

    async def database_now_ms(self) -> int | None:
        row = await self._read(lambda c: _one(c, f"SELECT {_DB_NOW_MS}"))
        if row is None:  # pragma: no cover - SELECT of an expression always returns a row
            raise StorageError("the database did not tell its time")
        return int(row[0])

    async def control_receipts(self, task_id: str) -> list[bytes]:
        rows = await self._read(
            lambda c: _all(
                c,
                "SELECT envelope FROM control_receipts WHERE task_id = %s ORDER BY id",
                (task_id,),
            )
        )
        return [bytes(r[0]) for r in rows]

    async def next_lease_expiry(self) -> int | None:
        row = await self._read(
            lambda c: _one(
                c,
                "SELECT min(lease_expires_unix_ms) FROM tasks WHERE state IN "
                f"{in_states(sources(Event.LAPSE))}",
            )
        )
        return None if row is None or row[0] is None else int(row[0])

    # -- nodes, policies, secrets ----------------------------------------------------

    async def put_node(self, node: NodeRecord) -> None:
        async def fn(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO nodes ({NODE_WRITE_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (node_id) DO UPDATE SET public_key = EXCLUDED.public_key,"
                " certificate = EXCLUDED.certificate,"
                " registered_unix_ms = EXCLUDED.registered_unix_ms, status = EXCLUDED.status,"
                " status_reason = EXCLUDED.status_reason,"
                " updated_unix_ms = EXCLUDED.updated_unix_ms, token_sha256 = ''",
                node_row(node),
            )

        await self._tx(fn)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        row = await self._read(
            lambda c: _one(c, f"SELECT {NODE_COLS} FROM nodes WHERE node_id = %s", (node_id,))
        )
        return None if row is None else row_to_node(row)

    async def list_nodes(self) -> list[NodeRecord]:
        # COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        rows = await self._read(
            lambda c: _all(c, f'SELECT {NODE_COLS} FROM nodes ORDER BY node_id COLLATE "C"')
        )
        return [row_to_node(r) for r in rows]

    async def set_node_status(
        self, node_id: str, status: str, reason: str, now_ms: int
    ) -> NodeRecord | None:
        check_node_status(status)

        async def fn(conn: Conn) -> Row | None:
            return await _one(
                conn,
                "UPDATE nodes SET status = %s, status_reason = %s, updated_unix_ms = %s"
                f" WHERE node_id = %s RETURNING {NODE_COLS}",
                (status, reason, now_ms, node_id),
            )

        row = await self._tx(fn)
        return None if row is None else row_to_node(row)

    async def put_join_token(self, token: JoinTokenRecord) -> None:
        async def fn(conn: Conn) -> Row | None:
            return await _one(
                conn,
                f"INSERT INTO join_tokens ({JOIN_TOKEN_COLS}) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (token_sha256) DO NOTHING RETURNING 1",
                join_token_row(token),
            )

        if await self._tx(fn) is None:
            raise join_token_exists(token)

    async def consume_join_token(
        self, token_sha256: str, node_id: str, now_ms: int
    ) -> JoinTokenRecord | None:
        # One conditional UPDATE: at READ COMMITTED a concurrent consumer (on any
        # replica) blocks on the row, then re-checks `used_unix_ms IS NULL` on the
        # winner's version and matches nothing.
        async def fn(conn: Conn) -> Row | None:
            return await _one(
                conn,
                "UPDATE join_tokens SET used_unix_ms = %(now)s WHERE token_sha256 = %(sha)s"
                " AND node_id = %(node_id)s AND used_unix_ms IS NULL"
                " AND expires_unix_ms > %(now)s"
                f" RETURNING {JOIN_TOKEN_COLS}",
                {"now": now_ms, "sha": token_sha256, "node_id": node_id},
            )

        row = await self._tx(fn)
        return None if row is None else row_to_join_token(row)

    async def void_join_tokens(self, node_id: str, now_ms: int) -> int:
        async def fn(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE join_tokens SET used_unix_ms = %s WHERE node_id = %s"
                " AND used_unix_ms IS NULL",
                (now_ms, node_id),
            )
            return int(cur.rowcount)

        return await self._tx(fn)

    async def put_policy(self, document: str, digest: str, now_ms: int) -> PolicyRecord:
        async def fn(conn: Conn) -> PolicyRecord:
            # Serializes version assignment across replicas (max()+1 would race).
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_POLICIES,))
            row = await _one(
                conn,
                "INSERT INTO policies (version, document, digest, created_unix_ms)"
                " SELECT coalesce(max(version), 0) + 1, %s, %s, %s FROM policies"
                " RETURNING version",
                (document, digest, now_ms),
            )
            assert row is not None
            # Delivered at COMMIT to every replica LISTENing (see `notifications`).
            await conn.execute("SELECT pg_notify(%s, %s)", (POLICY_CHANNEL, str(row[0])))
            return PolicyRecord(row[0], document, digest, now_ms)

        return await self._tx(fn)

    async def get_policy(self, version: int = 0) -> PolicyRecord | None:
        if version:
            sql = f"SELECT {POLICY_COLS} FROM policies WHERE version = %s"
            params: tuple[int, ...] = (version,)
        else:
            sql = f"SELECT {POLICY_COLS} FROM policies ORDER BY version DESC LIMIT 1"
            params = ()
        row = await self._read(lambda c: _one(c, sql, params))
        return None if row is None else row_to_policy(row)

    async def get_policy_by_digest(self, digest: str) -> PolicyRecord | None:
        row = await self._read(
            lambda c: _one(
                c,
                f"SELECT {POLICY_COLS} FROM policies WHERE digest = %s ORDER BY version DESC"
                " LIMIT 1",
                (digest,),
            )
        )
        return None if row is None else row_to_policy(row)

    async def notifications(self, channel: str) -> AsyncIterator[str]:
        """Payloads NOTIFYed on `channel`, on a dedicated LISTEN connection.

        Yields "" once the LISTEN is in place (a caller re-reads what it follows
        then, since changes before that moment were not announced to it).

        Raises:
            Unavailable: the connection could not be made or was lost.
        """
        conn = await self.connect("listen")
        try:
            await conn.execute(sql_listen(channel))
            yield ""
            async for note in conn.notifies():
                yield note.payload
        except psycopg.Error as err:
            raise _unavailable(err) from err
        finally:
            await conn.close()

    async def try_lead(self, job: str, holder: str, ttl_ms: int, now_ms: int) -> int | None:
        # The database's clock judges expiry (`now_ms`, the caller's, is not used):
        # replicas never compare their own clocks.
        async def fn(conn: Conn) -> Row | None:
            return await _one(
                conn,
                _SQL_LEAD,
                {"job": job, "holder": holder, "ttl": ttl_ms},
            )

        row = await self._tx(fn)
        return None if row is None else int(row[0])

    async def resign(self, job: str, holder: str) -> None:
        async def fn(conn: Conn) -> None:
            await conn.execute(
                "UPDATE leaders SET expires_unix_ms = 0 WHERE job = %s AND holder = %s",
                (job, holder),
            )

        await self._tx(fn)

    async def leader(self, job: str) -> tuple[str, int, int] | None:
        row = await self._read(
            lambda c: _one(
                c,
                f"SELECT holder, epoch, expires_unix_ms FROM leaders WHERE job = %s"
                f" AND expires_unix_ms > {_DB_NOW_MS}",
                (job,),
            )
        )
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    @staticmethod
    async def _next_secret_version(conn: Conn, name: str) -> int:
        """Locks `name` for this transaction and returns its next version."""
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SECRETS, name))
        row = await _one(
            conn, "SELECT coalesce(max(version), 0) + 1 FROM secrets WHERE name = %s", (name,)
        )
        assert row is not None
        return int(row[0])

    async def put_secret(self, secret: SealedSecret) -> int:
        async def fn(conn: Conn) -> int:
            version = await self._next_secret_version(conn, secret.name)
            await conn.execute(
                f"INSERT INTO secrets ({SECRET_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                secret_row(secret, secret.name, version),
            )
            return version

        return await self._tx(fn)

    async def get_secret(self, name: str, version: int = 0) -> SealedSecret | None:
        if version:
            sql = f"SELECT {SECRET_COLS} FROM secrets WHERE name = %s AND version = %s"
            params: tuple[Any, ...] = (name, version)
        else:
            sql = f"SELECT {SECRET_COLS} FROM secrets WHERE name = %s ORDER BY version DESC LIMIT 1"
            params = (name,)
        row = await self._read(lambda c: _one(c, sql, params))
        return None if row is None else row_to_secret(row)

    async def list_secret_versions(self) -> list[SecretVersionInfo]:
        rows = await self._read(lambda c: _all(c, SQL_LIST_SECRET_VERSIONS))
        return [SecretVersionInfo(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def put_sealed_secret(self, name: str, seal: SecretSealFn) -> int:
        async def fn(conn: Conn) -> int:
            version = await self._next_secret_version(conn, name)
            sec = seal(version)
            check_sealed(sec, name, version)
            await conn.execute(
                f"INSERT INTO secrets ({SECRET_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                secret_row(sec, name, version),
            )
            return version

        return await self._tx(fn)

    async def rewrap_secrets(self, rewrap: SecretRewrapFn) -> int:
        async def fn(conn: Conn) -> int:
            rows = await _all(
                conn, f"SELECT {SECRET_COLS} FROM secrets ORDER BY name, version FOR UPDATE"
            )
            changed = 0
            for r in rows:
                old = row_to_secret(r)
                new = rewrap(old)
                if new is None:
                    continue
                await conn.execute(
                    "UPDATE secrets SET kek_id = %s, wrapped_dek = %s, nonce = %s,"
                    " ciphertext = %s WHERE name = %s AND version = %s",
                    rewrap_row(new, old),
                )
                changed += 1
            return changed

        return await self._tx(fn)

    async def lease_envelope(self, task_id: str, fencing_token: int) -> bytes | None:
        row = await self._read(
            lambda c: _one(
                c,
                "SELECT envelope FROM lease_history WHERE task_id = %s AND fencing_token = %s"
                " ORDER BY id DESC LIMIT 1",
                (task_id, fencing_token),
            )
        )
        return None if row is None else bytes(row[0])

    async def check_live_lease(
        self, *, task_id: str, fencing_token: int, node_id: str, now_ms: int
    ) -> TaskRecord:
        return await self._read(
            lambda c: _live_task(
                c, task_id, fencing_token, node_id, now_ms, "use a credential", lock=False
            )
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
        async def fn(conn: Conn) -> BudgetState:
            # Locks the task row: a repeat of this reservation id on another replica
            # waits here and then finds the first one's row.
            task = await _live_task(
                conn, task_id, fencing_token, node_id, now_ms, "reserve budget", lock=True
            )
            limit = budget_limit(task, default_limit_micros)
            existing = await _one(
                conn,
                "SELECT amount_micros, fencing_token, node_id FROM budget_reservations"
                " WHERE task_id = %s AND reservation_id = %s",
                (task_id, reservation_id),
            )
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
            row = await _one(
                conn,
                "UPDATE tasks SET budget_spent_micros = budget_spent_micros + %(amount)s"
                f" WHERE task_id = %(task_id)s AND state IN {in_states(LEASED_STATES)}"
                " AND fencing_token = %(token)s AND node_id = %(node_id)s"
                " AND lease_expires_unix_ms > %(now)s"
                " AND budget_spent_micros + %(amount)s <= %(limit)s"
                " RETURNING budget_spent_micros",
                {
                    "amount": amount_micros,
                    "task_id": task_id,
                    "token": fencing_token,
                    "node_id": node_id,
                    "now": now_ms,
                    "limit": limit,
                },
            )
            if row is None:
                raise budget_exhausted(task, limit, amount_micros)
            await conn.execute(
                "INSERT INTO budget_reservations (task_id, reservation_id, amount_micros,"
                " fencing_token, created_unix_ms, node_id) VALUES (%s, %s, %s, %s, %s, %s)",
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
        async def fn(conn: Conn) -> BudgetState:
            res = await _one(
                conn,
                "SELECT amount_micros, actual_micros, settled, fencing_token, node_id"
                " FROM budget_reservations WHERE task_id = %s AND reservation_id = %s"
                " FOR UPDATE",
                (task_id, reservation_id),
            )
            amount, settled = check_settlement(
                res,
                task_id=task_id,
                reservation_id=reservation_id,
                fencing_token=fencing_token,
                node_id=node_id,
                actual_micros=actual_micros,
            )
            if settled:
                row = await _one(
                    conn, f"SELECT {TASK_BUDGET_COLS} FROM tasks WHERE task_id = %s", (task_id,)
                )
                return budget_state(row, default_limit_micros, existed=True)
            await conn.execute(
                "UPDATE budget_reservations SET settled = 1, actual_micros = %s"
                " WHERE task_id = %s AND reservation_id = %s",
                (actual_micros, task_id, reservation_id),
            )
            row = await _one(
                conn,
                "UPDATE tasks SET budget_spent_micros = budget_spent_micros - %s"
                f" WHERE task_id = %s RETURNING {TASK_BUDGET_COLS}",
                (amount - actual_micros, task_id),
            )
            return budget_state(row, default_limit_micros, existed=False)

        return await self._tx(fn)

    # -- idempotency records ------------------------------------------------------------

    async def record_tool_call(
        self, write: ToolCallWrite, now_ms: int
    ) -> tuple[ToolCallRecord, bool]:
        w = write

        async def fn(conn: Conn) -> tuple[ToolCallRecord, bool]:
            # Locking the task row serializes records of one task across replicas.
            await _one(conn, "SELECT 1 FROM tasks WHERE task_id = %s FOR UPDATE", (w.task_id,))
            existing = await _select_tool_call(conn, w.task_id, w.idempotency_key)
            try:
                await _live_task(
                    conn,
                    w.task_id,
                    w.fencing_token,
                    w.node_id,
                    now_ms,
                    "record a tool call",
                    lock=False,
                )
            except TetherError:
                if not late_completion(existing, w):
                    raise
                assert existing is not None
                if existing.phase is ToolCallPhase.STARTED:  # else: its own, already recorded
                    await conn.execute(_SQL_TOOL_CALL_COMPLETE, tool_call_completion(w, now_ms))
                    existing = await _select_tool_call(conn, w.task_id, w.idempotency_key)
                    assert existing is not None
                return existing, True
            if existing is not None and tool_call_repeat(existing, w):
                if takes_over(existing, w):
                    await conn.execute(
                        "UPDATE tool_calls SET fencing_token = %s, node_id = %s,"
                        " updated_unix_ms = %s"
                        " WHERE task_id = %s AND idempotency_key = %s AND phase = %s",
                        (
                            w.fencing_token,
                            w.node_id,
                            now_ms,
                            w.task_id,
                            w.idempotency_key,
                            int(ToolCallPhase.STARTED),
                        ),
                    )
                    existing = await _select_tool_call(conn, w.task_id, w.idempotency_key)
                    assert existing is not None
                return existing, True
            if existing is None:
                await conn.execute(
                    f"INSERT INTO tool_calls ({TOOL_CALL_COLS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    tool_call_row(w, now_ms),
                )
            else:  # STARTED -> COMPLETED under the live holder's token (the key is its now)
                await conn.execute(_SQL_TOOL_CALL_COMPLETE, tool_call_completion(w, now_ms))
            rec = await _select_tool_call(conn, w.task_id, w.idempotency_key)
            assert rec is not None
            return rec, existing is not None

        return await self._tx(fn)

    async def lookup_tool_call(self, task_id: str, idempotency_key: str) -> ToolCallRecord | None:
        return await self._read(lambda c: _select_tool_call(c, task_id, idempotency_key))

    # -- receipt ledger ------------------------------------------------------------

    async def ledger_head(self, node_id: str) -> LedgerHead | None:
        return await self._read(lambda c: _ledger_head(c, node_id))

    async def ledger_envelopes(self, node_id: str, seqs: list[int]) -> dict[int, tuple[bytes, int]]:
        rows = await self._read(
            lambda c: _all(
                c,
                "SELECT seq, envelope, leaf_index FROM ledger_leaves"
                " WHERE node_id = %s AND seq = ANY(%s::bigint[])",
                (node_id, seqs),
            )
        )
        return {r[0]: (bytes(r[1]), r[2]) for r in rows}

    async def ledger_append(
        self, node_id: str, expect: LedgerHead | None, leaves: list[LedgerLeaf], now_ms: int
    ) -> list[int] | None:
        async def fn(conn: Conn) -> list[int] | None:
            # One appender at a time across every replica: the head check and the
            # index assignment below see every earlier append committed.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_LEDGER,))
            if await _ledger_head(conn, node_id) != expect:
                return None
            row = await _one(conn, "SELECT COALESCE(MAX(leaf_index), -1) FROM ledger_leaves")
            top = int(row[0]) if row is not None else -1
            await conn.execute(
                "INSERT INTO ledger_leaves (leaf_index, node_id, seq, task_id, envelope,"
                " leaf_hash, digest, stored_unix_ms)"
                " SELECT %(top)s + u.ord, %(node)s, u.seq, u.task_id, u.envelope, u.leaf_hash,"
                " u.digest, %(now)s FROM unnest(%(seqs)s::bigint[], %(tasks)s::text[],"
                " %(envs)s::bytea[], %(hashes)s::bytea[], %(digests)s::text[])"
                " WITH ORDINALITY AS u(seq, task_id, envelope, leaf_hash, digest, ord)",
                {
                    "top": top,
                    "node": node_id,
                    "now": now_ms,
                    "seqs": [x.seq for x in leaves],
                    "tasks": [x.task_id for x in leaves],
                    "envs": [x.envelope for x in leaves],
                    "hashes": [x.leaf_hash for x in leaves],
                    "digests": [x.digest for x in leaves],
                },
            )
            completions = [receipt_completion(x.tool_call, now_ms) for x in leaves if x.tool_call]
            if completions:
                async with conn.cursor() as cur:
                    await cur.executemany(_SQL_RECEIPT_COMPLETES, completions)
            row = await _one(conn, "SELECT tree_size, hashes FROM ledger_frontier WHERE id = 1")
            after = frontier_after_append(row, top, leaves)
            if after is not None:
                await _put_frontier(conn, *after)
            return list(range(top + 1, top + 1 + len(leaves)))

        return await self._tx(fn)

    async def ledger_leaf_hashes(self, start: int, limit: int | None = None) -> list[bytes]:
        rows = await self._read(
            lambda c: _all(
                c,
                "SELECT leaf_index, leaf_hash FROM ledger_leaves WHERE leaf_index >= %s"
                " ORDER BY leaf_index LIMIT %s",
                (start, limit),
            )
        )
        return contiguous_leaf_hashes(start, rows)

    async def ledger_frontier(self) -> LedgerFrontier:
        async def fn(conn: Conn) -> LedgerFrontier:
            # One statement: the frontier and the leaf count from one snapshot.
            row = await _one(
                conn,
                "SELECT f.tree_size, f.hashes, (SELECT COALESCE(MAX(leaf_index), -1) + 1"
                " FROM ledger_leaves) FROM (SELECT 1) AS one"
                " LEFT JOIN ledger_frontier f ON f.id = 1",
            )
            assert row is not None
            leaves = int(row[2])
            return frontier_from_row(None if row[0] is None else row[:2], leaves)

        return await self._read(fn)

    async def ledger_advance_frontier(
        self,
        expect_size: int,
        frontier: LedgerFrontier,
        subtrees: list[tuple[int, int, bytes]],
    ) -> bool:
        async def fn(conn: Conn) -> bool:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_LEDGER,))
            row = await _one(conn, "SELECT tree_size FROM ledger_frontier WHERE id = 1")
            if (0 if row is None else int(row[0])) != expect_size:
                return False
            await _put_frontier(conn, frontier, subtrees)
            return True

        return await self._tx(fn)

    async def ledger_nodes(self, height: int, indexes: list[int]) -> dict[int, bytes]:
        if height == 0:
            sql = (
                "SELECT leaf_index, leaf_hash FROM ledger_leaves"
                " WHERE leaf_index = ANY(%s::bigint[])"
            )
            params: tuple[Any, ...] = (indexes,)
        else:
            sql = (
                "SELECT idx, hash FROM ledger_subtrees"
                " WHERE height = %s AND idx = ANY(%s::bigint[])"
            )
            params = (height, indexes)
        rows = await self._read(lambda c: _all(c, sql, params))
        return {int(r[0]): bytes(r[1]) for r in rows}

    async def ledger_export_heads(self, since_unix_ms: int, below: int) -> dict[str, int]:
        rows = await self._read(
            lambda c: _all(
                c,
                "SELECT node_id, MAX(seq) FROM ledger_leaves"
                " WHERE stored_unix_ms >= %s AND leaf_index < %s GROUP BY node_id",
                (since_unix_ms, below),
            )
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def ledger_export_page(
        self, task_ids: list[str], after: int, below: int, limit: int
    ) -> list[LedgerEntry]:
        cols = "SELECT leaf_index, node_id, seq, task_id, envelope FROM ledger_leaves"
        if task_ids:
            sql = (
                f"{cols} WHERE task_id = ANY(%s::text[]) AND leaf_index > %s AND leaf_index < %s"
                " ORDER BY leaf_index LIMIT %s"
            )
            params: tuple[Any, ...] = (task_ids, after, below, limit)
        else:
            sql = f"{cols} WHERE leaf_index > %s AND leaf_index < %s ORDER BY leaf_index LIMIT %s"
            params = (after, below, limit)
        rows = await self._read(lambda c: _all(c, sql, params))
        return [LedgerEntry(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    async def put_checkpoint(self, cp: StoredCheckpoint) -> None:
        async def fn(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO ledger_checkpoints VALUES (%s, %s, %s, %s) ON CONFLICT (tree_size)"
                " DO UPDATE SET root_hash = EXCLUDED.root_hash,"
                " timestamp_unix_ms = EXCLUDED.timestamp_unix_ms, note = EXCLUDED.note",
                checkpoint_row(cp),
            )

        await self._tx(fn)

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = await self._read(
            lambda c: _one(
                c,
                f"SELECT {CHECKPOINT_COLS} FROM ledger_checkpoints ORDER BY tree_size DESC LIMIT 1",
            )
        )
        return None if row is None else row_to_checkpoint(row)

    async def put_node_certificate(
        self, node_id: str, cert_sha256: str, certificate: bytes, now_ms: int
    ) -> None:
        async def fn(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO ledger_node_certificates VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (cert_sha256) DO NOTHING",
                (cert_sha256, node_id, now_ms, certificate),
            )

        await self._tx(fn)

    async def node_certificates(self, node_id: str) -> list[bytes]:
        rows = await self._read(
            lambda c: _all(
                c,
                "SELECT certificate FROM ledger_node_certificates WHERE node_id = %s"
                " ORDER BY recorded_unix_ms, cert_sha256",
                (node_id,),
            )
        )
        return [bytes(r[0]) for r in rows]


async def _put_frontier(
    conn: Conn, frontier: LedgerFrontier, subtrees: list[tuple[int, int, bytes]]
) -> None:
    await conn.execute(
        "INSERT INTO ledger_frontier VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE"
        " SET tree_size = EXCLUDED.tree_size, hashes = EXCLUDED.hashes",
        (frontier.tree_size, b"".join(frontier.hashes)),
    )
    if subtrees:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO ledger_subtrees VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                subtrees,
            )


async def _ledger_head(conn: Conn, node_id: str) -> LedgerHead | None:
    row = await _one(
        conn,
        f"SELECT {LEDGER_HEAD_COLS} FROM ledger_leaves WHERE node_id = %s"
        " ORDER BY seq DESC LIMIT 1",
        (node_id,),
    )
    return None if row is None else row_to_ledger_head(row)


async def _select_tool_call(
    conn: Conn, task_id: str, idempotency_key: str
) -> ToolCallRecord | None:
    row = await _one(
        conn,
        f"SELECT {TOOL_CALL_COLS} FROM tool_calls WHERE task_id = %s AND idempotency_key = %s",
        (task_id, idempotency_key),
    )
    return None if row is None else row_to_tool_call(row)


async def _live_task(
    conn: Conn,
    task_id: str,
    fencing_token: int,
    node_id: str,
    now_ms: int,
    action: str,
    *,
    lock: bool,
) -> TaskRecord:
    """The task if `node_id` holds its live lease under `fencing_token`, else the reason why not.

    With `lock`, the row stays locked (FOR UPDATE) until the transaction ends.
    """
    row = await _one(
        conn,
        f"SELECT {TASK_COLS} FROM tasks WHERE task_id = %s AND state IN {in_states(LEASED_STATES)}"
        " AND fencing_token = %s AND node_id = %s AND lease_expires_unix_ms > %s"
        + (" FOR UPDATE" if lock else ""),
        (task_id, fencing_token, node_id, now_ms),
    )
    if row is not None:
        return row_to_task(row)
    err = await _diagnose(conn, task_id, fencing_token, node_id, now_ms, None)
    raise no_live_lease(err, task_id, action)


async def _diagnose(
    conn: Conn,
    task_id: str,
    fencing_token: int,
    node_id: str,
    now_ms: int,
    event: Event | None,
) -> TetherError:
    """Explains why a conditional write on a leased task matched no row."""
    row = await _one(conn, f"SELECT {TASK_COLS} FROM tasks WHERE task_id = %s", (task_id,))
    if row is None:
        return task_not_found(task_id)
    task = row_to_task(row)
    err = diagnose_lease(task_id, task, fencing_token, node_id, now_ms)
    if err is not None:
        return err
    lapsed = await _one(
        conn,
        "SELECT 1 FROM lease_history WHERE task_id = %s AND fencing_token = %s"
        f" AND outcome IN ({', '.join(repr(o) for o in LAPSED_OUTCOMES)})",
        (task_id, fencing_token),
    )
    return diagnose_unleased(task_id, task, fencing_token, event, lapsed is not None)


def migration_files() -> list[tuple[int, str, Path]]:
    """(version, name, path) of every NNNN_name.sql PostgreSQL migration, in order."""
    return numbered_migrations(MIGRATIONS_DIR)
