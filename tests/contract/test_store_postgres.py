"""PostgreSQL-only store properties: URLs, concurrent startup, several replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from contract_helpers import NOW, empty_tables, fresh_database, sign

from tether.control.client import ControlClient
from tether.core.clock import FakeClock
from tether.core.errors import StorageError
from tether.core.states import State
from tether.crypto.signing import SigningKey
from tether.store import open_store, store_from_url
from tether.store.base import NewTask, TaskRecord
from tether.store.postgres import PostgresStore, migration_files, redact_url
from tether.store.postgres_settings import PostgresSettings
from tether.testing import start_control

pytestmark = pytest.mark.postgres


def test_a_postgres_url_selects_postgres() -> None:
    """postgresql:// and postgres:// URLs select the PostgreSQL store."""
    for url in ("postgresql://u@h:5432/db", "postgres://u@h/db"):
        assert isinstance(store_from_url(url), PostgresStore)


def test_urls_are_redacted_in_messages() -> None:
    """A password in the URL never appears in the store's repr."""
    store = PostgresStore("postgresql://u:hunter2@db.example:5433/tether")
    assert "hunter2" not in repr(store)
    assert redact_url(store.url) == "postgresql://db.example:5433/tether"


async def test_unreachable_server_is_a_storage_error() -> None:
    """Opening a store whose server does not answer fails with StorageError, no password shown."""
    store = PostgresStore(
        "postgresql://u:hunter2@127.0.0.1:1/x", PostgresSettings(connect_timeout_s=1)
    )
    with pytest.raises(StorageError) as exc:
        await store.open()
    assert "hunter2" not in str(exc.value)


async def test_replicas_starting_together_migrate_once() -> None:
    """Several stores opening a fresh database at once apply each migration exactly once."""
    with fresh_database() as url:
        stores = [PostgresStore(url, PostgresSettings(pool_min=1, pool_max=2)) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            expected = [v for v, _, _ in migration_files()]
            for s in stores:
                assert await s.applied_migrations() == expected
        finally:
            for s in stores:
                await s.close()


async def test_two_store_replicas_lease_each_task_once(pg_url: str) -> None:
    """Two stores on one database, leasing concurrently, lease every task exactly once."""
    empty_tables(pg_url)
    a, b = await open_store(pg_url), await open_store(pg_url)
    try:
        new = NewTask(queue="q", payload=b"p", max_attempts=3, lease_ttl_ms=60_000)
        for i in range(200):
            await a.submit_task(new, f"t{i:03}", NOW)

        async def drain(store: Any, node: str) -> list[str]:
            got: list[str] = []
            while True:
                out: tuple[TaskRecord, bytes] | None = await store.acquire_lease(
                    queue="q", node_id=node, agent_id="x", lease_id=node, now_ms=NOW, sign=sign
                )
                if out is None:
                    return got
                got.append(out[0].task_id)

        results = await asyncio.gather(*(drain(s, f"n{i}") for i, s in enumerate([a, b] * 8)))
        leased = [t for r in results for t in r]
        assert sorted(leased) == [f"t{i:03}" for i in range(200)]
        tasks = await a.list_tasks(queue="q", state=None, after_seq=0, limit=1000)
        assert {(t.state, t.fencing_token) for t in tasks} == {(State.LEASED, 1)}
    finally:
        await a.close()
        await b.close()


async def test_two_control_plane_servers_lease_each_task_once(pg_url: str, tmp_path: Path) -> None:
    """Two control-plane servers on one database, 50 clients: each of 500 tasks leased once."""
    empty_tables(pg_url)
    key = SigningKey.generate()
    clock = FakeClock()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pki = tmp_path / "pki"  # replicas share the control key and the CA, as deployed
    async with (
        start_control(
            tmp_path / "a", db=pg_url, key=key, clock=clock, vault=False, pki_dir=pki
        ) as cp_a,
        start_control(
            tmp_path / "b", db=pg_url, key=key, clock=clock, vault=False, pki_dir=pki
        ) as cp_b,
    ):
        submitted: list[str] = []
        for start in range(0, 500, 100):
            resps = await asyncio.gather(
                *(
                    (cp_a if i % 2 else cp_b).client.submit("work", f"{i}".encode())
                    for i in range(start, start + 100)
                )
            )
            submitted += [r.task.task_id for r in resps]
        replicas = [cp_a, cp_b]
        clients = []
        for i in range(50):
            # Enrolled on one replica, calling the other with the certificate it got.
            enrolled = await replicas[i % 2].node_client(f"node-{i}")
            await enrolled.close()
            clients.append(ControlClient(replicas[(i + 1) % 2].address, tls=enrolled.tls))

        async def drain(i: int, client: ControlClient) -> list[str]:
            got = []
            while True:
                resp = await client.acquire_lease("work", f"node-{i}", "agent")
                if not resp.HasField("task"):
                    return got
                got.append(resp.task.task_id)

        try:
            results = await asyncio.gather(*(drain(i, c) for i, c in enumerate(clients)))
        finally:
            for c in clients:
                await c.close()
        leased = [t for r in results for t in r]
        assert len(leased) == 500
        assert sorted(leased) == sorted(submitted)
        assert any(results[0::2])  # replica B granted leases
        assert any(results[1::2])  # and so did replica A
        tasks = await cp_b.client.list_all_tasks(queue="work")
        assert len(tasks) == 500
        assert {(t.state, t.fencing_token, t.attempt) for t in tasks} == {(State.LEASED, 1, 1)}
