"""Lease throughput with 1, 2 and 3 control-plane replicas on one PostgreSQL database.

Each replica is its own `tether control` process (as deployed); the workers are
spread evenly over the replicas, each looping AcquireLease(start) -> SUCCEED
until the shared queue is empty. On a machine with fewer cores than replicas
plus client the figure shows the coordination cost, not a scale-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from control_bench import QUEUE, bench_policy, drain_in_batches
from psycopg import sql

from tether.control.client import ControlClient
from tether.core.states import Event, State
from tether.store.postgres import PostgresStore
from tether.testing import endpoint, spawn_control_cli

PG_ADMIN = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def _database() -> Iterator[str]:
    name = f"tether_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _prepare(url: str, tasks: int) -> None:
    store = PostgresStore(url)
    await store.open()  # migrations, as a replica would
    await store.close()
    now = int(time.time() * 1000) - 1_000
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO tasks (task_id, queue, state, payload, max_attempts, lease_ttl_ms,"
            " created_unix_ms, updated_unix_ms, not_before_unix_ms)"
            " VALUES (%s, %s, %s, %s, 3, 60000, %s, %s, %s)",
            [
                (f"bt-{i:08d}", QUEUE, int(State.QUEUED), b"{}", now - tasks + i, now, now)
                for i in range(tasks)
            ],
        )


async def replica_lease_run(
    tmp: Path, replicas: int, tasks: int, concurrency: int, batch: int = 0
) -> float:
    """Grants per second with `replicas` processes sharing one database; with `batch`,
    workers take and end tasks in batches (control_bench.drain_in_batches)."""
    with _database() as url:
        await _prepare(url, tasks)
        procs: list[subprocess.Popen[bytes]] = []
        clients: list[ControlClient] = []
        try:
            addresses = []
            for i in range(replicas):
                proc, address = spawn_control_cli(
                    tmp, db=url, vault=False, policy=bench_policy(), log_name=f"r{i}.log"
                )
                procs.append(proc)
                addresses.append(address)
            for i, address in enumerate(addresses):
                clients.append(await endpoint(address).node_client(f"bench-node-{i}"))
            done = 0

            async def worker(i: int) -> None:
                nonlocal done
                r = i % replicas
                client, node, agent = clients[r], f"bench-node-{r}", f"agent-{i}"
                if batch:
                    finished = await drain_in_batches(client, node, agent, batch, [])
                    done += finished  # (not `done += await ...`: that reads `done` first)
                    return
                while True:
                    resp = await client.acquire_lease(QUEUE, node, agent, start=True)
                    if not resp.HasField("task"):
                        return
                    t = resp.task
                    await client.transition(t.task_id, t.fencing_token, Event.SUCCEED, node)
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - start
        finally:
            for c in clients:
                await c.close()
            for p in procs:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    if done != tasks:
        raise RuntimeError(f"replica lease run finished {done} of {tasks} tasks")
    return done / elapsed


def replicas_figures(
    tmp: Path, tasks: int, concurrency: int, batch: int = 0, batch_workers: int = 0
) -> dict[str, Any]:
    """{"lease_grants_per_s_pg_1_replica": ..., ... 3 replicas}, or a skip note; with
    `batch`, also `lease_grants_per_s_pg_batch_1_replica` (batch workers, one replica)."""
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except psycopg.Error as err:
        return {"skipped": f"PostgreSQL unreachable: {str(err).strip()[:200]}"}
    out: dict[str, Any] = {}
    for n in (1, 2, 3):
        per_s = asyncio.run(replica_lease_run(tmp / f"replicas-{n}", n, tasks, concurrency))
        out[f"lease_grants_per_s_pg_{n}_replica{'s' if n > 1 else ''}"] = round(per_s, 1)
    if batch:
        per_s = asyncio.run(
            replica_lease_run(tmp / "replicas-batch", 1, tasks, batch_workers, batch=batch)
        )
        out["lease_grants_per_s_pg_batch_1_replica"] = round(per_s, 1)
    return out
