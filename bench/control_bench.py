"""Control-plane figures: lease grants, claim latency vs queue depth, receipt ingest.

The control plane runs as its own process (`python -m tether.cli control`, as
deployed), so its RSS is measurable and the client's CPU is not the server's.
Queues are filled straight through the store's SQL in one transaction: the
figures are about leasing, not about submitting.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tether.control.client import ControlClient
from tether.core.states import Event, State
from tether.crypto.pki import Role
from tether.crypto.signing import SigningKey
from tether.store.sqlite import SqliteStore
from tether.testing import default_test_policy, endpoint, spawn_control_cli
from tether.v1 import control_pb2 as pb

QUEUE = "bench"


def rss_mb(pid: int) -> float:
    """Resident set size of a live process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def create_db(path: Path) -> None:
    """Creates the database with every migration applied (what the server would do)."""
    store = SqliteStore(path)
    await store.open()
    await store.close()


def fill_queue(path: Path, n: int, queue: str = QUEUE, *, ttl_ms: int = 60_000) -> None:
    """Inserts `n` queued tasks in one transaction, oldest first, ready now."""
    now = int(time.time() * 1000) - 1_000
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    chunk = 50_000
    for base in range(0, n, chunk):
        rows = [
            (f"bt-{queue}-{i:08d}", queue, int(State.QUEUED), b"{}", 3, ttl_ms, now - n + i, now)
            for i in range(base, min(n, base + chunk))
        ]
        db.executemany(
            "INSERT INTO tasks (task_id, queue, state, payload, max_attempts, lease_ttl_ms,"
            " created_unix_ms, updated_unix_ms, not_before_unix_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*r[:7], r[7], r[7]) for r in rows],
        )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def bench_policy(agents: int = 256) -> str:
    """The benchmark's queues, claimable by agent-0 .. agent-N (no tools)."""
    names = [f"agent-{i}" for i in range(agents)] + ["alice", "a", "agent"]
    return default_test_policy(queues=[QUEUE, "work", "q"], agents=names)


class Control:
    """A control plane subprocess over a prepared database."""

    def __init__(self, tmp: Path, db: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.db = db
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def __enter__(self) -> Control:
        self.proc, self.address = spawn_control_cli(
            self.tmp, db=self.db, vault=False, policy=bench_policy(), extra_args=self.extra_args
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def node(self, node_id: str, key: SigningKey | None = None) -> ControlClient:
        """A client enrolled as `node_id` (join token, proof of possession, mTLS)."""
        return await endpoint(self.address).node_client(node_id, key)


async def lease_run(
    tmp: Path,
    tasks: int,
    concurrency: int,
    max_tasks: int = 1,
    chain: bool = False,
    control_args: tuple[str, ...] = (),
    console_viewers: int = 0,
    batch: int = 0,
    stream: bool = True,
) -> dict[str, Any]:
    """`concurrency` workers each loop AcquireLease(start) -> SUCCEED until the queue is empty.

    A grant is the issue's "AcquireLease+TransitionTask to succeeded": two RPCs, because
    `start=True` grants the task already RUNNING. With `max_tasks` > 1 each AcquireLease
    asks for that many tasks (each its own signed lease) and the worker finishes them
    one after another: 1 + 1/max_tasks RPCs per task. With `chain` each SUCCEED also
    asks for the next task (TransitionTask.acquire_next): one RPC per task. The latency
    is per task. With `batch` > 0 each worker works like a pgqueuer consumer: it takes
    up to `batch` tasks (max_tasks), runs them, and ends them all in the step that also
    takes the next batch, in one store transaction: a request on its StreamLeases
    stream (`stream`), else one CompleteTasks(acquire_next) call; the latency is then
    per batch. The clock runs from the
    first grant's request to the last completion's answer (committed and durable), as
    pgqueuer's figure does. `control_args` go to `tether control` (e.g. --node-check-cache-ms 0).
    With `console_viewers` the operator console is on and that many auditors keep its
    live tasks table open (server-sent events) for the whole run.
    """
    if console_viewers:
        control_args = (*control_args, "--console-listen", "127.0.0.1:0")
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    fill_queue(db, tasks)
    with Control(tmp, db, control_args) as control:
        client = await control.node("bench-node")
        try:
            rss_before = rss_mb(control.pid)
            cpu_before = cpu_s(control.pid), time.process_time()
            done = 0
            latencies: list[float] = []

            async def worker(i: int) -> None:
                nonlocal done
                agent = f"agent-{i}"
                if batch:
                    finished = await drain_in_batches(
                        client, "bench-node", agent, batch, latencies, stream=stream
                    )
                    done += finished  # (not `done += await ...`: that reads `done` first)
                    return
                if chain:
                    t0 = time.perf_counter()
                    resp = await client.acquire_lease(QUEUE, "bench-node", agent, start=True)
                    while resp.HasField("task"):
                        task = resp.task
                        _, resp = await client.finish_and_acquire(
                            task.task_id, task.fencing_token, Event.SUCCEED, "bench-node",
                            QUEUE, agent, result=b"{}", start=True,
                        )  # fmt: skip
                        latencies.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        done += 1
                    return
                while True:
                    t0 = time.perf_counter()
                    resp = await client.acquire_lease(
                        QUEUE, "bench-node", agent, start=True, max_tasks=max_tasks
                    )
                    if not resp.HasField("task"):
                        return
                    for task in [resp.task, *(g.task for g in resp.more_grants)]:
                        await client.transition(
                            task.task_id,
                            task.fencing_token,
                            Event.SUCCEED,
                            "bench-node",
                            result=b"{}",
                        )
                        latencies.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        done += 1

            viewers = [
                asyncio.create_task(live_viewer(control.address)) for _ in range(console_viewers)
            ]
            start = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - start
            for v in viewers:
                v.cancel()
            updates = sum([u for u in await asyncio.gather(*viewers, return_exceptions=True)
                           if isinstance(u, int)])  # fmt: skip
            rss_after = rss_mb(control.pid)
            server_cpu, client_cpu = (
                cpu_s(control.pid) - cpu_before[0],
                time.process_time() - cpu_before[1],
            )
        finally:
            await client.close()
    if done != tasks:
        raise RuntimeError(f"lease run finished {done} of {tasks} tasks")
    latencies.sort()
    return {
        "per_s": done / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "rss_mb": rss_after,
        "rss_idle_mb": rss_before,
        "server_cpu_us_per_task": server_cpu / done * 1e6,
        "client_cpu_us_per_task": client_cpu / done * 1e6,
        **({"console_updates": updates} if console_viewers else {}),
    }


async def drain_in_batches(
    client: ControlClient,
    node_id: str,
    agent: str,
    batch: int,
    latencies: list[float],
    *,
    stream: bool = False,
) -> int:
    """One pgqueuer-like worker: takes up to `batch` tasks (AcquireLease max_tasks, started),
    runs them (no-ops), ends them all and takes the next batch in one step, until the
    queue is empty. A step is one CompleteTasks(acquire_next) call, or with `stream` one
    request on the worker's StreamLeases stream (`ControlClient.lease_stream`, what a
    worker that talks to the control plane itself would use), brief (the ended tasks
    are not echoed back: pgqueuer's acks carry nothing back either). Appends each batch's round
    trip to `latencies`; returns the tasks it finished."""
    done = 0
    lease_stream = client.lease_stream(node_id) if stream else None
    try:
        t0 = time.perf_counter()
        if lease_stream is not None:
            _, first = await lease_stream.step(
                queue=QUEUE, agent_id=agent, start=True, max_tasks=batch
            )
            assert first is not None
            resp = first
        else:
            resp = await client.acquire_lease(QUEUE, node_id, agent, start=True, max_tasks=batch)
        while resp.HasField("task"):
            held = [resp.task, *(g.task for g in resp.more_grants)]
            ends = [
                pb.TaskCompletion(
                    task_id=t.task_id,
                    fencing_token=t.fencing_token,
                    event=int(Event.SUCCEED),  # type: ignore[arg-type]
                    result=b"{}",
                )
                for t in held
            ]
            if lease_stream is not None:
                _, following = await lease_stream.step(
                    ends, queue=QUEUE, agent_id=agent, start=True, max_tasks=batch, brief=True
                )
            else:
                _, following = await client.complete_tasks(
                    node_id, ends, next_queue=QUEUE, next_agent_id=agent, start=True,
                    max_tasks=batch,
                )  # fmt: skip
            if following is None:
                raise RuntimeError("the batch was ended without the next grant")
            resp = following
            latencies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            done += len(held)
    finally:
        if lease_stream is not None:
            await lease_stream.close()
    return done


async def live_viewer(address: str) -> int:
    """An auditor with the console's live tasks table open (curl in its own process, so the
    viewer costs the benchmark's client nothing); returns the updates it received."""
    ep = endpoint(address)
    cert, key = ep.pki.write_operator(Role.AUDITOR, "bench-auditor")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sN", "--cacert", str(ep.pki.dir / "ca.crt"), "--cert", str(cert),
        "--key", str(key), ep.console_url + "tasks/events",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    updates = 0
    try:
        async for line in proc.stdout:
            updates += line.strip() == b"event: rows"
    except asyncio.CancelledError:
        pass
    finally:
        proc.kill()
        await proc.wait()
    return updates


async def claim_latency(tmp: Path, depth: int, claims: int) -> dict[str, float]:
    """Serial AcquireLease latency with `depth` tasks queued (claims come off the front)."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    t0 = time.perf_counter()
    fill_queue(db, depth + claims + 50)
    fill_s = time.perf_counter() - t0
    with Control(tmp, db) as control:
        client = await control.node("bench-node")
        try:
            for _ in range(50):  # warm up: connection, statement cache, page cache
                await client.acquire_lease(QUEUE, "bench-node", "agent")
            latencies = []
            for _ in range(claims):
                t = time.perf_counter()
                resp = await client.acquire_lease(QUEUE, "bench-node", "agent")
                latencies.append(time.perf_counter() - t)
                if not resp.HasField("task"):
                    raise RuntimeError("queue ran dry during the claim run")
        finally:
            await client.close()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "fill_s": fill_s,
    }


async def ingest_run(
    tmp: Path,
    envelopes: list[bytes],
    node_id: str,
    key: SigningKey,
    leases: list[bytes],
    batch: int = 500,
) -> dict[str, float]:
    """StreamReceipts of one node's chained envelopes, pipelined; timed to the last ack."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    store_leases(db, leases)
    with Control(tmp, db) as control:
        client = await control.node(node_id, key)
        try:
            batches = [envelopes[i : i + batch] for i in range(0, len(envelopes), batch)]
            window = asyncio.Semaphore(8)  # batches in flight, like the sidecar's uplink

            async def requests() -> AsyncIterator[pb.StreamReceiptsRequest]:
                seq = 1
                for b in batches:
                    await window.acquire()
                    yield pb.StreamReceiptsRequest(
                        node_id=node_id,
                        receipts=[
                            pb.SpooledReceipt(seq=seq + k, envelope=e) for k, e in enumerate(b)
                        ],
                    )
                    seq += len(b)

            start = time.perf_counter()
            call = client.stub.StreamReceipts(requests())
            acked = 0
            async for resp in call:
                acked = resp.acked_seq
                window.release()
                if acked >= len(envelopes):
                    break
            elapsed = time.perf_counter() - start
            call.cancel()
            rss = rss_mb(control.pid)
        finally:
            await client.close()
    if acked != len(envelopes):
        raise RuntimeError(f"ingest acked {acked} of {len(envelopes)}")
    return {"per_s": len(envelopes) / elapsed, "rss_mb": rss}


def receipts_for_ingest(n: int) -> tuple[list[bytes], str, SigningKey, list[bytes]]:
    """`n` real chained receipts of one node (typical task runs), with its key and the
    signed leases they were made under (the ledger takes receipts only about leases it
    granted to the node, so the benchmark stores those leases first)."""
    from tether.verify.builder import BundleBuilder

    b = BundleBuilder(seed="bench-ingest")
    i = 0
    while len(b.ledger) < n:
        b.task(f"task-{i:07d}", node_id="node-a")
        i += 1
    leases = [env.to_json_bytes() for env in b.leases]
    return b.ledger[:n], "node-a", b.node("node-a").key, leases


def store_leases(path: Path, leases: list[bytes]) -> None:
    """Writes granted leases into the lease history in one transaction (set-up, untimed)."""
    from tether.crypto.leases import decode_lease
    from tether.crypto.signing import Envelope

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for raw in leases:
        lease = decode_lease(Envelope.from_json_bytes(raw).payload)
        db.execute(
            "INSERT INTO lease_history (task_id, lease_id, fencing_token, kind, envelope,"
            " outcome, created_unix_ms) VALUES (?, ?, ?, 'grant', ?, 'finished', ?)",
            (lease.task_id, lease.lease_id, lease.fencing_token, raw, lease.issued_unix_ms),
        )
    db.execute("COMMIT")
    db.close()


def clean(path: Path) -> None:
    """Removes a benchmark database (and WAL files) to keep /tmp small."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            os.unlink(p)
