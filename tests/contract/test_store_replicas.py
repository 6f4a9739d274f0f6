"""Store features replicas rely on: leader terms, change notifications, dead connections."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from contract_helpers import NOW, empty_tables, submit

from tether.core.errors import Unavailable
from tether.store import open_store
from tether.store.base import POLICY_CHANNEL, Store
from tether.store.postgres import PostgresStore
from tether.store.postgres_settings import PostgresSettings


def _now(store: Store, offset_ms: int = 0) -> int:
    """The clock a store judges terms by: SQLite the caller's, PostgreSQL its own."""
    return time.time_ns() // 1_000_000 + offset_ms


async def test_one_leader_per_job_and_takeover_after_lapse(store: Store) -> None:
    """A term is exclusive, renewable by its holder, taken over once lapsed, with a new epoch."""
    first = await store.try_lead("job", "r1", 400, _now(store))
    assert first == 1
    assert await store.try_lead("job", "r2", 400, _now(store)) is None
    assert await store.try_lead("job", "r1", 400, _now(store)) == 1  # renewal: same term
    assert await store.try_lead("other", "r2", 400, _now(store)) == 1  # jobs are independent
    held = await store.leader("job")
    assert held is not None
    assert held[:2] == ("r1", 1)
    await asyncio.sleep(0.6)  # r1 stops renewing: its term lapses
    assert await store.leader("job") is None
    assert await store.try_lead("job", "r2", 400, _now(store)) == 2
    assert await store.try_lead("job", "r1", 400, _now(store)) is None


async def test_resign_hands_over_at_once(store: Store) -> None:
    """A resigned term is free for another candidate immediately; epochs keep growing."""
    assert await store.try_lead("job", "r1", 60_000, _now(store)) == 1
    await store.resign("job", "r2")  # not the holder: no effect
    assert await store.try_lead("job", "r2", 60_000, _now(store)) is None
    await store.resign("job", "r1")
    assert await store.try_lead("job", "r2", 60_000, _now(store)) == 2


@pytest.mark.postgres
async def test_concurrent_candidates_elect_exactly_one(pg_url: str) -> None:
    """Ten replicas campaigning at the same instant: exactly one gets the term."""
    empty_tables(pg_url)
    stores = [await open_store(pg_url) for _ in range(3)]
    try:
        got = await asyncio.gather(
            *(stores[i % 3].try_lead("sweeper", f"r{i}", 10_000, NOW) for i in range(10))
        )
        assert sorted(got, key=lambda e: e or 0) == [None] * 9 + [1]
    finally:
        for s in stores:
            await s.close()


@pytest.mark.postgres
async def test_a_stored_policy_is_announced_to_other_replicas(pg_url: str) -> None:
    """PutPolicy through one store NOTIFYs its version to a LISTENing store at commit."""
    empty_tables(pg_url)
    a, b = await open_store(pg_url), await open_store(pg_url)
    assert isinstance(b, PostgresStore)
    try:
        feed = b.notifications(POLICY_CHANNEL)
        assert await anext(feed) == ""  # listening
        rec = await a.put_policy("version = 1", "d1", NOW)
        assert await asyncio.wait_for(anext(feed), 10) == str(rec.version)
        await feed.aclose()
    finally:
        await a.close()
        await b.close()


def _terminate_backends(url: str, app: str = "tether-control") -> int:
    """pg_terminate_backend on every session of the store (as a database restart would)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (app,),
        ).fetchall()
    return len(rows)


@pytest.mark.postgres
async def test_terminated_connections_are_replaced_transparently(pg_url: str) -> None:
    """After pg_terminate_backend on every pooled session, the next writes and reads succeed."""
    empty_tables(pg_url)
    store = PostgresStore(pg_url, PostgresSettings(pool_min=3, pool_max=3))
    await store.open()
    try:
        await submit(store, "t1")
        for _ in range(3):
            assert _terminate_backends(pg_url) >= 1
            await submit(store, f"t-{time.monotonic_ns()}")  # a transaction
            assert (await store.get_task("t1")).task_id == "t1"  # a read
    finally:
        await store.close()


@pytest.mark.postgres
async def test_lock_wait_is_bounded_and_unavailable(pg_url: str) -> None:
    """A writer blocked by another session's lock gives up after lock_timeout with Unavailable."""
    empty_tables(pg_url)
    store = PostgresStore(pg_url, PostgresSettings(lock_timeout_ms=300))
    await store.open()
    try:
        await submit(store, "t1")
        with psycopg.connect(pg_url) as holder:  # a transaction that keeps the row locked
            holder.execute("SELECT 1 FROM tasks WHERE task_id = 't1' FOR UPDATE")
            began = time.monotonic()
            with pytest.raises(Unavailable) as exc:
                await store.cancel_task("t1", "test", NOW)
            waited = time.monotonic() - began
            holder.rollback()
        assert "retry" in exc.value.message
        assert exc.value.metadata["retry_after_ms"]
        assert waited < 5  # the bound is lock_timeout, not forever (generous under load)
        assert (await store.cancel_task("t1", "test", NOW)).state.name == "CANCELED"
    finally:
        await store.close()


def test_settings_refuse_unbounded_or_inverted_values() -> None:
    """Timeouts of 0 (none) and a pool with min > max are refused at load."""
    from tether.core.errors import ConfigError

    for bad in (
        {"lock_timeout_ms": 0},
        {"statement_timeout_ms": 0},
        {"idle_in_transaction_timeout_ms": 0},
        {"pool_min": 5, "pool_max": 2},
        {"connect_timeout_s": 0},
    ):
        with pytest.raises(ConfigError):
            PostgresSettings(**bad)  # type: ignore[arg-type]
    opts = PostgresSettings().session_options()
    assert "lock_timeout=3000" in opts
    assert "idle_in_transaction_session_timeout=5000" in opts


def test_a_password_in_the_db_url_is_warned_about_without_showing_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`tether control --db` with a password warns (PGPASSWORD/.pgpass advice), never echoing it."""
    from tether.store.postgres_settings import url_has_password, warn_password_in_url

    assert url_has_password("postgresql://u:hunter2@h/db")
    assert url_has_password("postgresql://u@h/db?password=hunter2")
    assert not url_has_password("postgresql://u@h:5432/db?sslmode=require")
    with caplog.at_level("WARNING"):
        warn_password_in_url("postgresql://u@h/db")
        assert not caplog.records
        warn_password_in_url("postgresql://u:hunter2@h/db")
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "PGPASSWORD" in text
    assert ".pgpass" in text
    assert "hunter2" not in text


def test_sessions_name_their_replica() -> None:
    """pg_stat_activity shows which replica (and which purpose) a session belongs to."""
    assert PostgresSettings().application_name() == "tether-control"
    named = PostgresSettings(replica_id="r1")
    assert named.application_name() == "tether-control r1"
    assert named.application_name("listen") == "tether-control-listen r1"
    assert len(PostgresSettings(replica_id="x" * 100).application_name().encode()) == 63
