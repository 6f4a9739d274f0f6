"""Replicas as real processes on one PostgreSQL: a replica paused (SIGSTOP) inside a
transaction that holds the ledger's lock stalls the others only for the configured
bounds, and the singleton jobs have one leader at a time, handed over when it dies or
pauses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from contract_helpers import fresh_database

from tether.testing import SidecarHandle, spawn_control_cli, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import bundle_from_proto

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]

LOCK_TIMEOUT_MS = 5_000
IDLE_TX_TIMEOUT_MS = 2_000
LEADER_TTL_MS = 1_500


@contextlib.contextmanager
def replica_processes(
    tmp_path: Path, url: str, n: int, extra: tuple[str, ...] = ()
) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """`n` `tether control` processes on one database, sharing key, CA and KEK."""
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(n):
            procs.append(
                spawn_control_cli(
                    tmp_path,
                    db=url,
                    log_name=f"r{i}.log",
                    extra_args=["--replica-id", f"r{i}", *extra],
                )
            )
        yield procs
    finally:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


async def _claim_complete(side: SidecarHandle, n: int) -> list[str]:
    done = []
    async with side.agent("alice") as agent:
        for _ in range(n):
            task = await agent.claim("work", wait_ms=10_000)
            assert task is not None
            await agent.complete(task.task_id, result=b"ok")
            done.append(task.task_id)
    return done


async def _spool_drained(side: SidecarHandle, timeout_s: float) -> float:
    """Seconds until every receipt of the sidecar was acknowledged by the ledger."""
    began = time.monotonic()
    spool: Any = side.sidecar._sink
    while await spool.pending():
        assert time.monotonic() - began < timeout_s, "receipts not acknowledged in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def _sessions(url: str) -> list[tuple[int, str, str, str]]:
    """(pid, state, wait_event_type, query) of the control planes' pooled sessions."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state, coalesce(wait_event_type, ''), query FROM pg_stat_activity"
            " WHERE application_name LIKE 'tether-control r%' AND datname = current_database()"
        ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_replica_paused_holding_the_ledger_lock_stalls_others_only_briefly(
    tmp_path: Path,
) -> None:
    """r1 is SIGSTOPped inside its ledger append (holding the advisory lock); r2 keeps
    granting leases throughout and ingests again once idle_in_transaction_session_timeout
    ends r1's session; after SIGCONT r1's node catches up and one ledger verifies."""
    extra = (
        "--db-lock-timeout-ms", str(LOCK_TIMEOUT_MS),
        "--db-idle-in-transaction-timeout-ms", str(IDLE_TX_TIMEOUT_MS),
        "--checkpoint-interval-ms", "500",
    )  # fmt: skip
    with fresh_database() as url, replica_processes(tmp_path, url, 2, extra) as procs:
        (p1, a1), (_, a2) = procs
        async with (
            start_sidecar(tmp_path, a1, node_id="node-a") as side_a,
            start_sidecar(tmp_path, a2, node_id="node-b") as side_b,
        ):
            from tether.testing import endpoint

            async with endpoint(a2).admin() as admin:
                for _ in range(40):
                    await admin.submit("work", b"{}")
            await _claim_complete(side_a, 1)
            await _spool_drained(side_a, 30)
            # A transaction of ours makes r1's next append wait on a row lock while it
            # already holds the ledger's advisory lock.
            blocker = psycopg.connect(url)
            top = blocker.execute("SELECT coalesce(max(leaf_index), -1) FROM ledger_leaves")
            nxt = int(top.fetchone()[0]) + 1  # type: ignore[index]
            blocker.execute(
                "INSERT INTO ledger_leaves VALUES (%s, 'blocker', 1, 't', '', '', '', 0)", (nxt,)
            )
            claim_a = asyncio.create_task(_claim_complete(side_a, 1))

            def r1_waits() -> bool:
                return any(w == "Lock" and "ledger_leaves" in q for _, _, w, q in _sessions(url))

            await _until(r1_waits, 20, "r1's append to wait inside its transaction")
            os.kill(p1.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            blocker.rollback()  # r1's INSERT proceeds; its session now idles, lock held
            blocker.close()
            await _until(
                lambda: any(s == "idle in transaction" for _, s, _, _ in _sessions(url)),
                5,
                "r1's session to idle inside its transaction",
            )
            # r2 grants and ingests while r1 is frozen with the ledger's lock.
            done_b = await _claim_complete(side_b, 5)
            assert len(done_b) == 5  # no claim failed: granting never needed the lock
            drained = await _spool_drained(side_b, 60)
            stall = time.monotonic() - stopped
            assert stall < (IDLE_TX_TIMEOUT_MS + LOCK_TIMEOUT_MS) / 1000 + 15  # generous
            assert not any(s == "idle in transaction" for _, s, _, _ in _sessions(url))
            os.kill(p1.pid, signal.SIGCONT)
            await asyncio.wait_for(claim_a, 60)
            await _spool_drained(side_a, 60)
            async with endpoint(a2).admin() as admin:
                bundle = bundle_from_proto(await admin.export_bundle())
            report = verify_bundle(bundle, [side_a.sidecar.uplink.registration.control_key])
            assert report.ok, [f.to_dict() for f in report.failures]
            assert report.nodes == 2
            print(f"r2 drained its spool {drained:.2f}s after claims; stall window {stall:.2f}s")


def _signings(tmp_path: Path, n: int) -> list[tuple[str, str, int]]:
    """(timestamp, replica, epoch) of every scheduled checkpoint in the replicas' logs."""
    out = []
    for i in range(n):
        for line in (tmp_path / f"r{i}.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("msg") == "checkpoint signed":
                    out.append((doc["ts"], doc["replica"], int(doc["epoch"])))
    return sorted(out)


def _leader(url: str, job: str) -> tuple[str, int] | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT holder, epoch FROM leaders WHERE job = %s AND expires_unix_ms >"
            " (extract(epoch from clock_timestamp()) * 1000)::bigint",
            (job,),
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


async def test_one_checkpoint_signer_at_a_time_handed_over_on_kill_and_pause(
    tmp_path: Path,
) -> None:
    """Three replicas: one signs checkpoints; SIGKILL it and another takes over within the
    term; SIGSTOP that one and a third takes over; once resumed it signs nothing more.
    Signings ordered by time never go back to an earlier term."""
    extra = (
        "--checkpoint-interval-ms", "100",
        "--leader-ttl-ms", str(LEADER_TTL_MS),
        "--sweep-interval-ms", "100",
    )  # fmt: skip
    with fresh_database() as url, replica_processes(tmp_path, url, 3, extra) as procs:
        by_id = {f"r{i}": p for i, p in enumerate(procs)}
        await _until(lambda: _leader(url, "checkpointer") is not None, 10, "a leader")
        first = _leader(url, "checkpointer")
        assert first is not None
        sweeper = _leader(url, "sweeper")
        assert sweeper is not None
        # Receipts keep the tree growing (so there is something to sign), through
        # sidecars on both replicas that are not the first leader.
        others = [r for r in by_id if r != first[0]]
        from tether.testing import endpoint

        async with endpoint(by_id[others[0]][1]).admin() as admin:
            for _ in range(300):
                await admin.submit("work", b"{}")
        stop = asyncio.Event()

        async def work(side: SidecarHandle) -> None:
            async with side.agent("alice") as agent:
                while not stop.is_set():
                    try:  # a paused replica makes its sidecar's calls fail for a while
                        task = await agent.claim("work", wait_ms=1000)
                        if task is not None:
                            await agent.complete(task.task_id, result=b"ok")
                    except Exception:
                        await asyncio.sleep(0.2)

        async with (
            start_sidecar(tmp_path, by_id[others[0]][1], node_id="node-a") as side_a,
            start_sidecar(tmp_path, by_id[others[1]][1], node_id="node-b") as side_b,
        ):
            workers = [asyncio.create_task(work(s)) for s in (side_a, side_b)]
            await _until(lambda: len(_signings(tmp_path, 3)) >= 3, 30, "checkpoints")
            assert {r for _, r, _ in _signings(tmp_path, 3)} == {first[0]}

            by_id[first[0]][0].kill()  # the leader dies
            killed = time.monotonic()
            await _until(
                lambda: (_leader(url, "checkpointer") or ("", 0))[1] > first[1],
                LEADER_TTL_MS / 1000 + 15,
                "a new checkpoint leader",
            )
            second = _leader(url, "checkpointer")
            assert second is not None
            assert second[0] != first[0]
            print(f"took over {time.monotonic() - killed:.2f}s after the kill")
            await _until(
                lambda: any(r == second[0] for _, r, _ in _signings(tmp_path, 3)),
                30,
                "the new leader to sign",
            )
            paused = by_id[second[0]][0]
            os.kill(paused.pid, signal.SIGSTOP)
            await _until(
                lambda: (_leader(url, "checkpointer") or ("", 0))[1] > second[1],
                LEADER_TTL_MS / 1000 + 15,
                "a leader after the pause",
            )
            third = _leader(url, "checkpointer")
            assert third is not None
            assert third[0] not in (first[0], second[0])
            await _until(
                lambda: any(r == third[0] for _, r, _ in _signings(tmp_path, 3)),
                30,
                "the third leader to sign",
            )
            os.kill(paused.pid, signal.SIGCONT)  # wakes with its term long gone
            await asyncio.sleep(2 * LEADER_TTL_MS / 1000)
            stop.set()
            await asyncio.gather(*workers)
        signings = _signings(tmp_path, 3)
        epochs = [e for _, _, e in signings]
        assert epochs == sorted(epochs), "a signing from an earlier term came after a later one"
        holders = {e: {r for _, r, ep in signings if ep == e} for e in set(epochs)}
        assert all(len(rs) == 1 for rs in holders.values()), holders
        after_resume = [r for _, r, e in signings if e > second[1]]
        assert after_resume
        assert set(after_resume) == {third[0]}
