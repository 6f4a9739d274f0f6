"""Helpers shared by the store contract tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from tether.core.leases import Lease
from tether.crypto.leases import decode_lease, sign_lease
from tether.crypto.signing import Envelope, SigningKey
from tether.store import postgres as postgres_store
from tether.store import sqlite as sqlite_store
from tether.store.base import LeaseSigner, NewTask, Store, TaskRecord
from tether.store.postgres import PostgresStore, redact_url
from tether.store.sqlite import SqliteStore

NOW = 1_700_000_000_000


def sign(task: TaskRecord) -> bytes:
    """A stand-in lease signer: deterministic bytes naming the task and token."""
    return f"lease:{task.task_id}:{task.fencing_token}".encode()


async def submit(
    store: Store,
    task_id: str,
    queue: str = "q",
    *,
    max_attempts: int = 3,
    ttl: int = 1000,
    now: int = NOW,
) -> TaskRecord:
    """Submits a task with a fixed payload."""
    new = NewTask(queue=queue, payload=b"p", max_attempts=max_attempts, lease_ttl_ms=ttl)
    task, _ = await store.submit_task(new, task_id, now)
    return task


async def lease(store: Store, queue: str = "q", node: str = "n1", now: int = NOW) -> TaskRecord:
    """Leases the next task of `queue` (which must exist)."""
    got = await store.acquire_lease(
        queue=queue, node_id=node, agent_id="a", lease_id="l", now_ms=now, sign=sign
    )
    assert got is not None
    return got[0]


def lease_signer(control: SigningKey, now: int = NOW) -> LeaseSigner:
    """A lease signer like the control plane's: the task's real Lease, signed by `control`."""

    def sign_task(task: TaskRecord) -> bytes:
        lease = Lease(
            lease_id=task.lease_id,
            task_id=task.task_id,
            attempt=task.attempt,
            node_id=task.node_id,
            agent_id=task.agent_id,
            fencing_token=task.fencing_token,
            issued_unix_ms=now,
            expires_unix_ms=task.lease_expires_unix_ms,
            queue=task.queue,
        )
        return sign_lease(lease, control).to_json_bytes()

    return sign_task


async def grant_lease(
    store: Store,
    control: SigningKey,
    task_id: str,
    node_id: str,
    *,
    agent_id: str = "a",
    now: int = NOW,
    ttl: int = 30_000,
) -> Lease:
    """Submits `task_id` (in a queue of its own) and leases it to `node_id` through the store.

    The lease is signed by `control` as the control plane would; returns it as stored.
    """
    queue = f"queue-{task_id}"
    await submit(store, task_id, queue, ttl=ttl, now=now)
    got = await store.acquire_lease(
        queue=queue,
        node_id=node_id,
        agent_id=agent_id,
        lease_id=f"lease-{task_id}",
        now_ms=now,
        sign=lease_signer(control, now),
    )
    assert got is not None
    assert got[0].task_id == task_id
    return decode_lease(Envelope.from_json_bytes(got[1]).payload)


ADMIN_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@functools.cache
def postgres_unreachable() -> str | None:
    """Why the test server cannot be used, or None when it can."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as err:
        return f"PostgreSQL server {redact_url(ADMIN_URL)} cannot be reached: {err}".strip()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """Creates `tether_test_<random>`, yields its URL, then drops it."""
    reason = postgres_unreachable()
    if reason is not None:
        pytest.skip(reason)
    name = f"tether_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def empty_tables(url: str) -> None:
    """Truncates every table but schema_migrations, so each test starts empty."""
    with psycopg.connect(url, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'schema_migrations'"
            )
        ]
        if names:
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY").format(
                    sql.SQL(", ").join(sql.Identifier(n) for n in names)
                )
            )


def same_database(store: Store) -> Store:
    """A second, unopened store over the same database (a restart or another replica)."""
    if isinstance(store, PostgresStore):
        return PostgresStore(store.url)
    assert isinstance(store, SqliteStore)
    return SqliteStore(store.path)


AnyStore = SqliteStore | PostgresStore


@contextlib.contextmanager
def new_database(kind: str, tmp_path: Path) -> Iterator[Callable[[], AnyStore]]:
    """A new, unmigrated database of `kind`; yields a maker of (unopened) stores over it."""
    if kind == "sqlite":
        path = tmp_path / "new.db"
        yield lambda: SqliteStore(path)
    else:
        with fresh_database() as url:
            yield lambda: PostgresStore(url)


def only_migrations_up_to(monkeypatch: pytest.MonkeyPatch, version: int) -> None:
    """Makes stores opened under `monkeypatch` apply migrations <= `version` only."""
    for module in (sqlite_store, postgres_store):
        files = [m for m in module.migration_files() if m[0] <= version]
        monkeypatch.setattr(module, "migration_files", lambda files=files: files)


def execute_outside(store: AnyStore, statement: str, params: tuple[Any, ...]) -> None:
    """Runs one statement (with ? placeholders) on the store's database, not through it."""
    if isinstance(store, SqliteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as lite, lite:
            lite.execute(statement, params)
    else:
        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(statement.replace("?", "%s"), params)
