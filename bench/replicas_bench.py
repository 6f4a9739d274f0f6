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
from control_bench import QUEUE, bench_policy, cpu_s, drain_in_batches
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


def _postgres_cpu_s() -> float:
    """CPU seconds used so far by every `postgres` process on the machine (postmaster,
    backends, background writers): the database's whole share, not one backend's."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            total += cpu_s(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@contextlib.contextmanager
def _cpu_capped(pids: list[int], cores: float | None) -> Iterator[None]:
    """Each pid in its own cgroup (v1 `cpu`) limited to `cores` of CPU, for the run.

    A model of one small machine per replica on a box with too few cores to give each
    replica its own: it asks whether the database lets replicas add throughput when each
    has CPU of its own, which the uncapped figure on 2 cores cannot answer."""
    if cores is None:
        yield
        return
    made: list[tuple[int, Path]] = []
    try:
        for pid in pids:
            group = CGROUP_CPU / f"tether-bench-{pid}"
            group.mkdir()
            made.append((pid, group))
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(int(cores * 100_000)))
            (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for pid, group in made:
            with contextlib.suppress(OSError):  # back to the root group (if still alive)
                (CGROUP_CPU / "cgroup.procs").write_text(str(pid))
            with contextlib.suppress(OSError):
                group.rmdir()


def cpu_caps_available() -> bool:
    """True when this process may create cgroup v1 `cpu` groups (root, v1 mounted)."""
    probe = CGROUP_CPU / f"tether-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return False
    return True


async def replica_lease_run(
    tmp: Path,
    replicas: int,
    tasks: int,
    concurrency: int,
    batch: int = 0,
    cpu_cap: float | None = None,
) -> dict[str, float]:
    """Grants per second with `replicas` processes sharing one database; with `batch`,
    workers take and end tasks in batches (control_bench.drain_in_batches).

    Also where the CPU went, per task (the replicas, every PostgreSQL process, this
    client), and how busy the whole machine was: on a machine whose cores are all busy
    with one replica, a second cannot add throughput, and these figures show it. With
    `cpu_cap`, each replica process is held to that many cores (`_cpu_capped`)."""
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

            with _cpu_capped([p.pid for p in procs], cpu_cap):
                cpu0 = (
                    sum(cpu_s(p.pid) for p in procs),
                    _postgres_cpu_s(),
                    time.process_time(),
                    _machine_ticks(),
                )
                start = time.perf_counter()
                await asyncio.gather(*(worker(i) for i in range(concurrency)))
                elapsed = time.perf_counter() - start
                busy1, total1 = _machine_ticks()
                used = (
                    sum(cpu_s(p.pid) for p in procs) - cpu0[0],
                    _postgres_cpu_s() - cpu0[1],
                    time.process_time() - cpu0[2],
                )
            busy = (busy1 - cpu0[3][0]) / max(1, total1 - cpu0[3][1])
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
    return {
        "per_s": done / elapsed,
        "cpu_us_per_task_replicas": used[0] / done * 1e6,
        "cpu_us_per_task_postgres": used[1] / done * 1e6,
        "cpu_us_per_task_client": used[2] / done * 1e6,
        "machine_busy_pct": busy * 100,
        "cores": float(os.cpu_count() or 1),
    }


REPLICA_CPU_CAP = 0.4
"""Cores each replica gets in the capped runs: small enough that two replicas, the client
and PostgreSQL fit in this machine's 2 cores with room to spare."""


def replicas_figures(
    tmp: Path, tasks: int, concurrency: int, batch: int = 0, batch_workers: int = 0
) -> dict[str, Any]:
    """{"lease_grants_per_s_pg_1_replica": ..., ... 3 replicas}, or a skip note; with
    `batch`, also `lease_grants_per_s_pg_batch_{1,2,3}_replica(s)` (batch workers). Each
    run also reports its CPU per task by process group and the machine's busy share."""
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except psycopg.Error as err:
        return {"skipped": f"PostgreSQL unreachable: {str(err).strip()[:200]}"}
    out: dict[str, Any] = {}
    shapes = [("", 0, concurrency)] + ([("batch_", batch, batch_workers)] if batch else [])
    for prefix, size, workers in shapes:
        for n in (1, 2, 3):
            run = asyncio.run(
                replica_lease_run(tmp / f"replicas-{prefix}{n}", n, tasks, workers, batch=size)
            )
            out[f"lease_grants_per_s_pg_{prefix}{n}_replica{'s' if n > 1 else ''}"] = round(
                run["per_s"], 1
            )
            for key in (
                "cpu_us_per_task_replicas",
                "cpu_us_per_task_postgres",
                "cpu_us_per_task_client",
                "machine_busy_pct",
            ):
                out[f"replicas_pg_{prefix}{n}_{key}"] = round(run[key], 1)
    out["replicas_machine_cores"] = os.cpu_count() or 1
    # The same with each replica held to REPLICA_CPU_CAP cores (a model of a core per
    # replica; needs root and cgroup v1 `cpu`, else left out with a note).
    if not cpu_caps_available():
        out["replicas_capped_skipped"] = "cannot create cgroup v1 cpu groups (needs root)"
        return out
    out["replicas_capped_cores_each"] = REPLICA_CPU_CAP
    for prefix, size, workers in shapes:
        for n in (1, 2):
            run = asyncio.run(
                replica_lease_run(
                    tmp / f"replicas-capped-{prefix}{n}",
                    n,
                    tasks,
                    workers,
                    batch=size,
                    cpu_cap=REPLICA_CPU_CAP,
                )
            )
            out[f"lease_grants_per_s_pg_{prefix}{n}_replica{'s' if n > 1 else ''}_capped"] = round(
                run["per_s"], 1
            )
            out[f"replicas_pg_{prefix}{n}_capped_machine_busy_pct"] = round(
                run["machine_busy_pct"], 1
            )
        out[f"lease_grants_pg_{prefix}2_vs_1_replica_capped"] = round(
            out[f"lease_grants_per_s_pg_{prefix}2_replicas_capped"]
            / out[f"lease_grants_per_s_pg_{prefix}1_replica_capped"],
            3,
        )
    return out
