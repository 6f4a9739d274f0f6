"""The SQLite store over real database files: migrations, conditional writes, durability."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tether.core.errors import (
    IdempotencyConflict,
    InvalidTransition,
    LeaseExpired,
    NotFound,
    NotOwner,
    StaleFencingToken,
)
from tether.core.states import Event, State
from tether.store.base import NewTask, SealedSecret, TaskRecord
from tether.store.sqlite import SqliteStore, backoff_ms, migration_files

NOW = 1_700_000_000_000


def _sign(task: TaskRecord) -> bytes:
    return f"lease:{task.task_id}:{task.fencing_token}".encode()


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


async def _submit(store: SqliteStore, task_id: str, queue: str = "q", **kw: int) -> TaskRecord:
    new = NewTask(
        queue=queue,
        payload=b"p",
        max_attempts=kw.get("max_attempts", 3),
        lease_ttl_ms=kw.get("ttl", 1000),
    )
    task, _ = await store.submit_task(new, task_id, kw.get("now", NOW))
    return task


async def _lease(store: SqliteStore, queue: str = "q", node: str = "n1", now: int = NOW):
    got = await store.acquire_lease(
        queue=queue, node_id=node, agent_id="a", lease_id="l", now_ms=now, sign=_sign
    )
    assert got is not None
    return got[0]


async def test_migrations_are_applied_in_order_and_recorded(store: SqliteStore) -> None:
    """Every numbered migration file is applied once and recorded in schema_migrations."""
    versions = [v for v, _, _ in migration_files()]
    assert versions == sorted(versions)
    assert await store.applied_migrations() == versions
    await store.close()
    await store.open()  # reopening applies nothing twice
    assert await store.applied_migrations() == versions


async def test_database_uses_wal(store: SqliteStore) -> None:
    """The database runs in WAL mode, which keeps commits across a process kill."""
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_acquire_takes_oldest_ready_and_bumps_token_and_attempt(store: SqliteStore) -> None:
    """A lease goes to the oldest ready task of the queue with token+1 and attempt+1."""
    await _submit(store, "t1", now=NOW)
    await _submit(store, "t2", now=NOW + 1)
    await _submit(store, "other", queue="q2", now=NOW - 5)
    task = await _lease(store, now=NOW + 2)
    assert (task.task_id, task.state, task.fencing_token, task.attempt) == (
        "t1",
        State.LEASED,
        1,
        1,
    )
    assert task.lease_expires_unix_ms == NOW + 2 + 1000
    history = await store.lease_history("t1")
    assert [(h.kind, h.outcome, h.envelope) for h in history] == [
        ("grant", "active", b"lease:t1:1")
    ]


async def test_acquire_skips_tasks_in_backoff(store: SqliteStore) -> None:
    """A task whose not_before lies in the future is not leased yet."""
    await _submit(store, "t1")
    await _lease(store)
    await store.sweep_lapsed(now_ms=NOW + 5000, backoff_base_ms=1000, backoff_cap_ms=10_000)
    none = await store.acquire_lease(
        queue="q", node_id="n", agent_id="a", lease_id="l2", now_ms=NOW + 5500, sign=_sign
    )
    assert none is None
    again = await _lease(store, now=NOW + 6000)
    assert (again.fencing_token, again.attempt) == (2, 2)


async def test_idempotent_submit_returns_the_first_task(store: SqliteStore) -> None:
    """A repeat submission with the same key returns the first task; other content conflicts."""
    new = NewTask(queue="q", payload=b"x", max_attempts=3, lease_ttl_ms=1000, idempotency_key="k")
    first, created = await store.submit_task(new, "t1", NOW)
    again, created2 = await store.submit_task(new, "t2", NOW + 1)
    assert created
    assert not created2
    assert again.task_id == first.task_id
    with pytest.raises(IdempotencyConflict):
        await store.submit_task(
            NewTask(
                queue="q", payload=b"y", max_attempts=3, lease_ttl_ms=1000, idempotency_key="k"
            ),
            "t3",
            NOW,
        )


async def test_transition_refusals_name_the_reason(store: SqliteStore) -> None:
    """Stale token, wrong node, lapsed lease, bad state and unknown task each get their error."""
    await _submit(store, "t1")
    await _lease(store)
    with pytest.raises(StaleFencingToken, match="current token is 1"):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=7, node_id="n1", now_ms=NOW
        )
    with pytest.raises(NotOwner):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n2", now_ms=NOW
        )
    with pytest.raises(InvalidTransition):
        await store.transition(
            task_id="t1", event=Event.SUCCEED, fencing_token=1, node_id="n1", now_ms=NOW
        )
    with pytest.raises(LeaseExpired):
        await store.transition(
            task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW + 1000
        )
    with pytest.raises(NotFound):
        await store.transition(
            task_id="nope", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW
        )


async def test_only_one_of_concurrent_conflicting_writers_wins(store: SqliteStore) -> None:
    """Of many concurrent SUCCEED/FAIL/RELEASE calls on one running task, exactly one wins."""
    await _submit(store, "t1")
    await _lease(store)
    await store.transition(
        task_id="t1", event=Event.START, fencing_token=1, node_id="n1", now_ms=NOW
    )
    events = [Event.SUCCEED, Event.FAIL, Event.RELEASE] * 10
    results = await asyncio.gather(
        *(
            store.transition(task_id="t1", event=e, fencing_token=1, node_id="n1", now_ms=NOW)
            for e in events
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, TaskRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, InvalidTransition) for r in results if r not in winners)


async def test_sweep_requeues_with_backoff_then_expires(store: SqliteStore) -> None:
    """A lapsed lease requeues with exponential backoff until max_attempts, then expires."""
    await _submit(store, "t1", max_attempts=2)
    await _lease(store)
    [out] = await store.sweep_lapsed(now_ms=NOW + 1000, backoff_base_ms=100, backoff_cap_ms=150)
    assert out.state is State.QUEUED
    assert out.not_before_unix_ms == NOW + 1000 + 100
    await _lease(store, now=NOW + 2000)
    [out] = await store.sweep_lapsed(now_ms=NOW + 3000, backoff_base_ms=100, backoff_cap_ms=150)
    assert out.state is State.EXPIRED
    assert [h.outcome for h in await store.lease_history("t1")] == ["lapsed", "lapsed"]


def test_backoff_doubles_and_caps() -> None:
    """Backoff is base * 2**(attempt-1), capped."""
    assert [backoff_ms(a, 100, 500) for a in (1, 2, 3, 4, 100)] == [100, 200, 400, 500, 500]


async def test_commits_survive_reopen(tmp_path: Path) -> None:
    """Acknowledged writes are in the file after the store is reopened."""
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    await _submit(s, "t1")
    await _lease(s)
    await s.close()
    s2 = SqliteStore(tmp_path / "t.db")
    await s2.open()
    task = await s2.get_task("t1")
    assert (task.state, task.fencing_token) == (State.LEASED, 1)
    await s2.close()


async def test_policies_and_sealed_secrets_are_versioned(store: SqliteStore) -> None:
    """Policies and secrets get increasing versions; the latest is returned by default."""
    p1 = await store.put_policy("a", "d1", NOW)
    p2 = await store.put_policy("b", "d2", NOW)
    assert (p1.version, p2.version) == (1, 2)
    latest = await store.get_policy()
    assert latest is not None
    assert latest.document == "b"
    sec = SealedSecret("api", 0, "kek1", b"dek", b"nonce", b"ct", NOW)
    assert await store.put_secret(sec) == 1
    assert await store.put_secret(sec) == 2
    got = await store.get_secret("api")
    assert got is not None
    assert (got.version, got.ciphertext) == (2, b"ct")
