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


async def pgqueuer_run(jobs: int) -> dict[str, Any]:
    """No-op jobs drained by one pgqueuer 1.x QueueManager on a fresh database.

    pgqueuer as its users run it: the current release, `QueueManager.run()` with
    its documented defaults (continuous mode, batch_size 10, 30 s dequeue timeout).
    Like the lease figure, the queue is filled first (untimed) and the clock runs
    from the worker's start to the last completion: the entrypoint that finishes
    the last job sets `shutdown`, and `run()` returns once its buffered status
    log is flushed, i.e. once every completion is recorded in the database.

    Returns {"per_s": ..., "version": ...} or {"skipped": reason}.
    """
    try:
        import asyncpg
        import pgqueuer
        from pgqueuer import AsyncpgDriver, Queries, QueueManager
    except ImportError as err:
        return {
            "skipped": f"pgqueuer/asyncpg not installed ({err.name}); pip install -e '.[bench]'"
        }
    version = getattr(pgqueuer, "__version__", "?")
    if not version.startswith("1."):
        return {"skipped": f"pgqueuer {version} installed; the benchmark measures 1.x"}
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
            qm = QueueManager(Queries(AsyncpgDriver(conn)))
            done = 0

            @qm.entrypoint("noop")
            async def noop(job: Any) -> None:
                nonlocal done
                done += 1
                if done == jobs:
                    qm.shutdown.set()

            backend = await conn.fetchval("SELECT pg_backend_pid()")
            cpu0 = time.process_time(), _cpu_s(backend)
            start = time.perf_counter()
            await asyncio.wait_for(qm.run(), 600)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0[0], _cpu_s(backend) - cpu0[1]
            left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    if done != jobs or left:
        return {"skipped": f"pgqueuer ran {done} of {jobs} jobs ({left} left queued)"}
    return {
        "per_s": jobs / elapsed,
        "version": version,
        # CPU per job: pgqueuer's Python process plus its PostgreSQL backend (the
        # server's shared background writers are not counted; 0 when /proc is unreadable).
        "cpu_us_per_job": (cpu[0] + cpu[1]) / jobs * 1e6,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds a local process has used (user + system), 0.0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
