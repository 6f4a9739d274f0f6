"""A tool outcome the sidecar knows is recorded even when the lease is lost between the tool's
effect and its COMPLETED record, so the next attempt replays it instead of ABORTED (real
control plane and two real sidecars; the control plane's clock is moved past the lease)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gated_tools import GATE, append_policy

from tether.control.service import ControlConfig
from tether.core import errors as E
from tether.core.clock import FakeClock
from tether.core.states import State
from tether.store.base import LedgerHead, LedgerLeaf
from tether.store.sqlite import SqliteStore
from tether.testing import endpoint, spawn_control_cli, start_control, start_sidecar

TTL_MS = 30_000


def policy(effects: Path) -> str:
    return append_policy(effects, ("alice", "bob"), f"lease_ttl_ms = {TTL_MS}\nmax_attempts = 2\n")


async def test_outcome_known_after_the_lease_was_lost_is_replayed_next_attempt(
    tmp_path: Path,
) -> None:
    """The lease lapses at the control plane while the tool runs; its outcome, riding with its
    receipt (same node, same token, the key not taken over), still completes the record, and
    attempt 2 on another node gets the recorded result with the same key: the effect happened
    once, nothing ABORTED."""
    GATE.clear()
    effects = tmp_path / "effects.txt"
    clock = FakeClock(time.time_ns() // 1_000_000)
    config = ControlConfig(backoff_base_ms=1, backoff_cap_ms=1)
    async with start_control(tmp_path, clock=clock, policy=policy(effects), config=config) as cp:
        tid = (await cp.client.submit("work", b"{}")).task.task_id
        async with (
            start_sidecar(tmp_path, cp.address, node_id="node-a") as side_a,
            start_sidecar(tmp_path, cp.address, node_id="node-b", agents=("bob",)) as side_b,
            side_a.agent("alice") as alice,
            side_b.agent("bob") as bob,
        ):
            task = await alice.claim("work")
            assert task is not None
            assert task.attempt == 1
            call = asyncio.create_task(
                alice.call_tool(tid, "append", {"line": "once"}, idempotency_key="k")
            )
            for _ in range(600):  # until the effect happened (the tool now waits)
                if effects.exists() and effects.read_text():
                    break
                await asyncio.sleep(0.05)
            clock.advance(TTL_MS + 1_000)  # the lease lapses by the control plane's clock
            assert [o.state for o in await cp.service.sweep()] == [State.QUEUED]
            GATE.set()
            await asyncio.gather(call, return_exceptions=True)  # its lease is gone either way
            record = None
            for _ in range(200):  # the outcome rides with its receipt to the ledger
                record = await cp.service.lookup_tool_call(tid, "k")
                if record is not None and record.phase.name == "COMPLETED":
                    break
                await asyncio.sleep(0.05)
            assert record is not None
            assert (record.phase.name, record.fencing_token) == ("COMPLETED", 1)

            clock.advance(10)
            task = await bob.claim("work", wait_ms=5_000)
            assert task is not None
            assert (task.task_id, task.attempt) == (tid, 2)
            again = await bob.call_tool(tid, "append", {"line": "once"}, idempotency_key="k")
            assert again.replayed
            assert again.result == {"wrote": "once"}
        assert effects.read_text().splitlines() == ["once"]


def phase(db: Path, task_id: str, key: str) -> str:
    """The phase of a tool-call record, read from the control plane's database file."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        row = conn.execute(
            "SELECT phase FROM tool_calls WHERE task_id = ? AND idempotency_key = ?",
            (task_id, key),
        ).fetchone()
    return "" if row is None else {1: "STARTED", 2: "COMPLETED"}[row[0]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def control_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_outcome_kept_during_an_outage_is_recorded_without_a_retry(
    tmp_path: Path, control_procs: list[subprocess.Popen[bytes]]
) -> None:
    """The control plane dies while a keyed tool runs: the agent gets the outcome (durable in
    the spool with its receipt) and never retries here; once the control plane is back, the
    spooled receipt completes the record, so whoever runs the task next finds it."""
    GATE.set()  # this tool does not wait
    effects = tmp_path / "effects.txt"
    listen = (
        *("--listen", f"127.0.0.1:{free_port()}"),
        *("--enroll-listen", f"127.0.0.1:{free_port()}"),
    )
    proc, address = spawn_control_cli(tmp_path, extra_args=listen)
    control_procs.append(proc)
    async with endpoint(address).admin() as client:
        await client.put_policy(policy(effects))
        tid = (await client.submit("work", b"{}")).task.task_id
    async with (
        start_sidecar(tmp_path, address, uplink_retry_budget_ms=300) as side,
        side.agent("alice") as agent,
    ):
        assert await agent.claim("work") is not None
        GATE.clear()
        call = asyncio.create_task(
            agent.call_tool(tid, "append", {"line": "kept"}, idempotency_key="k")
        )
        for _ in range(600):  # until the effect happened (the tool now waits)
            if effects.exists() and effects.read_text():
                break
            await asyncio.sleep(0.05)
        proc.kill()
        proc.wait()
        GATE.set()
        assert (await call).result == {"wrote": "kept"}
        proc2, _ = spawn_control_cli(tmp_path, extra_args=listen)
        control_procs.append(proc2)
        recorded = ""
        for _ in range(300):  # the sidecar's background retry: no agent call
            recorded = await asyncio.to_thread(phase, tmp_path / "control.db", tid, "k")
            if recorded == "COMPLETED":
                break
            await asyncio.sleep(0.1)
        assert recorded == "COMPLETED"
    assert effects.read_text().splitlines() == ["kept"]


class HeldOutcomeStore(SqliteStore):
    """Appends receipts like any store, but holds back every batch carrying a tool call's
    outcome until `release` is set (the ledger has not acknowledged it yet)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = asyncio.Event()

    async def ledger_append(
        self, node_id: str, expect: LedgerHead | None, leaves: list[LedgerLeaf], now_ms: int
    ) -> list[int] | None:
        if any(leaf.tool_call is not None for leaf in leaves):
            await self.release.wait()
        return await super().ledger_append(node_id, expect, leaves, now_ms)


async def test_sidecar_restart_before_the_ack_never_runs_an_idempotent_tool_again(
    tmp_path: Path,
) -> None:
    """A keyed call of an idempotent tool ran and its outcome is in the spool, unacked; the
    sidecar restarts, the lease lapses and the same node claims the task again. Its retry
    with the key must not re-stamp the STARTED record and re-run the tool: it waits for
    the spooled outcome's ack, then gets that outcome, replayed. The effect happens once."""
    effects = tmp_path / "effects.txt"
    rules = f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.append]
adapter = "python"
idempotent = true
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{effects}" }}
[queues.work]
tools = ["append"]
lease_ttl_ms = {TTL_MS}
max_attempts = 2
"""
    store = HeldOutcomeStore(tmp_path / "control.db")
    clock = FakeClock(time.time_ns() // 1_000_000)
    config = ControlConfig(backoff_base_ms=1, backoff_cap_ms=1)
    async with start_control(tmp_path, clock=clock, policy=rules, config=config, store=store) as cp:
        tid = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            task = await alice.claim("work")
            assert task is not None
            first = await alice.call_tool(tid, "append", {"line": "once"}, idempotency_key="k")
            assert not first.replayed
        record = await cp.service.lookup_tool_call(tid, "k")
        assert record is not None
        assert record.phase.name == "STARTED"
        clock.advance(TTL_MS + 1_000)
        await cp.service.sweep()  # a stop gives its leases back; else they lapse here
        assert (await cp.client.get_task(tid)).task.state == State.QUEUED
        clock.advance(10)
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            again_task = await alice.claim("work", wait_ms=5_000)
            assert again_task is not None
            assert again_task.fencing_token > task.fencing_token
            with pytest.raises(E.Unavailable, match="will not run again"):
                await alice.call_tool(tid, "append", {"line": "once"}, idempotency_key="k")
            store.release.set()
            again = await alice.call_tool(tid, "append", {"line": "once"}, idempotency_key="k")
            assert again.replayed
            assert again.result == first.result
    assert effects.read_text().splitlines() == ["once"]
