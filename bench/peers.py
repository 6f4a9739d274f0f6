"""Peers measured in the same run: pgqueuer on the local PostgreSQL.

A peer that is not installed or not reachable is skipped with a note, never
an error: `make bench-quick` runs in CI where PostgreSQL may be absent.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

PG_DSN = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def pgqueuer_run(jobs: int, batch_size: int = 10) -> dict[str, Any]:
    """No-op jobs drained by one pgqueuer QueueManager on a fresh database.

    Returns {"per_s": ...} or {"skipped": reason}.
    """
    try:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries, QueueManager
        from pgqueuer.types import QueueExecutionMode
    except ImportError as err:
        return {
            "skipped": f"pgqueuer/asyncpg not installed ({err.name}); pip install -e '.[bench]'"
        }
    try:
        admin = await asyncio.wait_for(asyncpg.connect(PG_DSN), 3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as err:
        return {"skipped": f"PostgreSQL unreachable at {PG_DSN}: {err}"}
    name = f"tether_bench_pgq_{os.getpid()}"
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = PG_DSN.rsplit("/", 1)[0] + "/" + name
        conn = await asyncpg.connect(dsn)
        try:
            queries = Queries(AsyncpgDriver(conn))
            await queries.install()
            chunk = 1_000
            for base in range(0, jobs, chunk):
                k = min(chunk, jobs - base)
                await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        finally:
            await conn.close()
        conn = await asyncpg.connect(dsn)
        try:
            qm = QueueManager(AsyncpgDriver(conn))
            done = 0

            @qm.entrypoint("noop")
            async def noop(job: Any) -> None:
                nonlocal done
                done += 1

            start = time.perf_counter()
            await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
            elapsed = time.perf_counter() - start
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    if done != jobs:
        return {"skipped": f"pgqueuer ran {done} of {jobs} jobs"}
    return {"per_s": jobs / elapsed, "batch_size": batch_size}
