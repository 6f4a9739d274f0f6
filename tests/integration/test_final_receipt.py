"""A task the control plane ended always gets its holder's `task_finished` receipt.

The control plane commits a final transition; the sidecar signs the receipt after the
answer. Chaos found the gap between them (seed 667509): an agent killed while its
CompleteTask waited, or a sidecar killed there, left a succeeded task with no end on
its node's chain, so the untampered export failed `lease.closed` and `task.final`.
Here the control plane's answer is held back after its commit (a real control plane
whose store sleeps after the transition), and the agent hangs up or the sidecar
process is SIGKILLed in that window. The export must then verify strictly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import export_and_verify
from gated_tools import GATE, append_policy

from tether.agent import AgentClient
from tether.core import errors as E
from tether.core.receipts import ReceiptKind
from tether.core.states import Event, State
from tether.crypto.receipts import parse_receipt
from tether.sidecar.finishing import PendingFinish
from tether.store.sqlite import SqliteStore
from tether.testing import spawn_sidecar_cli, start_control, start_sidecar


class SlowAnswerStore(SqliteStore):
    """Commits SUCCEED/FAIL like any store, then holds the answer back `delay_s`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.delay_s = 0.0
        self.committed = asyncio.Event()
        self.finals = 0

    async def transition(self, **kw: Any) -> Any:
        record = await super().transition(**kw)
        if kw["event"] in (Event.SUCCEED, Event.FAIL):
            self.finals += 1
            self.committed.set()
            await asyncio.sleep(self.delay_s)
        return record


def finished_receipts(spool: Path, task_id: str) -> list[Any]:
    """The task_finished receipts of `task_id` the node's spool file holds."""
    with contextlib.closing(sqlite3.connect(spool)) as db:
        rows = db.execute("SELECT envelope FROM spool WHERE task_id = ?", (task_id,)).fetchall()
    receipts = [parse_receipt(bytes(r[0]))[1] for r in rows]
    return [r for r in receipts if r.kind == ReceiptKind.TASK_FINISHED]


def journal_rows(state_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / "finishing.db")) as db:
        return int(db.execute("SELECT COUNT(*) FROM finishing").fetchone()[0])


async def wait_for(check: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


async def test_agent_hanging_up_after_the_commit_still_gets_the_final_receipt(
    tmp_path: Path,
) -> None:
    """The agent's CompleteTask is cancelled after the control plane committed SUCCEED
    and before its answer came back: the sidecar still signs task_finished (timed
    inside the lease) and the task's export verifies strictly."""
    store = SlowAnswerStore(tmp_path / "control.db")
    async with start_control(tmp_path, store=store) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side:
            agent = side.agent("alice")
            task = await agent.claim("work")
            assert task is not None
            assert task.task_id == task_id
            store.delay_s = 1.5
            call = asyncio.create_task(agent.complete(task_id, result=b"done"))
            await asyncio.wait_for(store.committed.wait(), 10)
            call.cancel()  # the agent is gone: its call is cancelled on the wire
            with contextlib.suppress(asyncio.CancelledError):
                await call
            spool = side.state_dir / "spool.db"
            ends = await wait_for(lambda: finished_receipts(spool, task_id))
            assert len(ends) == 1, "exactly one end on the node's chain"
            end = ends[0]
            assert end.final_state == int(State.SUCCEEDED)
            assert end.status == "ok"
            assert end.lease_issued_unix_ms <= end.time_unix_ms <= end.lease_expires_unix_ms
            assert await wait_for(lambda: journal_rows(side.state_dir) == 0)
            # The agent asks again: it learns the end instead of a second transition.
            again = await agent.complete(task_id, result=b"done")
            assert again[0] == "succeeded"
            assert store.finals == 1
            await agent.close()
        code, out = await export_and_verify(cp, tmp_path, [task_id])
        assert code == 0, out
        assert (await cp.client.get_task(task_id)).task.state == State.SUCCEEDED


async def test_sidecar_killed_after_the_commit_signs_the_end_when_it_restarts(
    tmp_path: Path,
) -> None:
    """The sidecar process is SIGKILLed after the control plane committed SUCCEED and
    before it answered: the journaled end is asked again at restart, the same fencing
    token proves it applied, task_finished is signed, and the export verifies."""
    store = SlowAnswerStore(tmp_path / "control.db")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with start_control(tmp_path, store=store) as cp:
            task_id = (await cp.client.submit("work", b"{}")).task.task_id
            sidecar, sock, tokens = await asyncio.to_thread(spawn_sidecar_cli, tmp_path, cp.address)
            procs.append(sidecar)
            agent = AgentClient(sock, tokens["alice"].read_text().strip())
            task = await agent.claim("work")
            assert task is not None
            assert task.task_id == task_id
            store.delay_s = 30.0
            call = asyncio.create_task(agent.complete(task_id, result=b"done"))
            await asyncio.wait_for(store.committed.wait(), 10)
            state_dir = tmp_path / "node-1" / "state"
            assert journal_rows(state_dir) == 1, "the end is journaled before it leaves"
            sidecar.send_signal(signal.SIGKILL)
            sidecar.wait(10)
            with contextlib.suppress(Exception):
                await call  # the agent sees its sidecar go away
            await agent.close()
            spool = state_dir / "spool.db"
            assert finished_receipts(spool, task_id) == [], "killed before it could sign"

            store.delay_s = 0.0
            restarted, _, _ = await asyncio.to_thread(spawn_sidecar_cli, tmp_path, cp.address)
            procs.append(restarted)
            ends = await wait_for(lambda: finished_receipts(spool, task_id))
            assert len(ends) == 1, "the restart signed the end, once"
            end = ends[0]
            assert end.final_state == int(State.SUCCEEDED)
            assert end.status == "ok"
            assert end.lease_issued_unix_ms <= end.time_unix_ms <= end.lease_expires_unix_ms
            assert await wait_for(lambda: journal_rows(state_dir) == 0)
            code, out = await export_and_verify(cp, tmp_path, [task_id])
            assert code == 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def test_end_refused_after_a_restart_signs_nothing(tmp_path: Path) -> None:
    """A journaled end whose transition never reached the control plane, asked again
    after the lease was taken over by another holder: refused, so no receipt is signed
    and the journal entry is dropped (the control plane's lapse receipt ends the lease)."""
    store = SlowAnswerStore(tmp_path / "control.db")
    async with start_control(tmp_path, store=store) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side:
            agent = side.agent("alice")
            task = await agent.claim("work")
            assert task is not None
            await agent.close()
            finisher = side.sidecar.deps.finisher
            held = side.sidecar.deps.leases.get(task_id)
            stale = PendingFinish(  # an older token's end: not this lease's to end
                receipt=dataclasses.replace(
                    held.receipt(ReceiptKind.TASK_FINISHED, 0, status="ok"),
                    fencing_token=task.fencing_token - 1,
                ),
                event=Event.SUCCEED,
                result=b"",
                error="",
                non_retryable=False,
                failure_type="",
            )
            await finisher.journal.record(stale)
            assert finisher.resume() == 1
            assert await wait_for(lambda: journal_rows(side.state_dir) == 0)
            assert finished_receipts(side.state_dir / "spool.db", task_id) == []
            assert store.finals == 0


async def test_crash_after_signing_before_the_journal_cleared_signs_no_second_end(
    tmp_path: Path,
) -> None:
    """The sidecar dies after task_finished is spooled and before its journal entry is
    dropped (the entry is put back as that crash leaves it): the restart's repeat is
    answered "applied under your token", but the end is already on the node's chain,
    so no second task_finished is signed for the lease and the export still verifies."""
    async with start_control(tmp_path) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side:
            agent = side.agent("alice")
            task = await agent.claim("work")
            assert task is not None
            assert (await agent.complete(task_id, result=b"done"))[0] == "succeeded"
            await agent.close()
            spool = side.state_dir / "spool.db"
            ends = finished_receipts(spool, task_id)
            assert len(ends) == 1
            finisher = side.sidecar.deps.finisher
            assert finisher is not None
            left = PendingFinish(  # the journal row as the crash left it
                receipt=dataclasses.replace(ends[0], final_state=0, seq=0, prev=""),
                event=Event.SUCCEED,
                result=b"done",
                error="",
                non_retryable=False,
                failure_type="",
            )
            await finisher.journal.record(left)
            assert finisher.resume() == 1
            assert await wait_for(lambda: journal_rows(side.state_dir) == 0)
            await asyncio.sleep(0.5)
            assert len(finished_receipts(spool, task_id)) == 1, "one end per lease"
        code, out = await export_and_verify(cp, tmp_path, [task_id])
        assert code == 0, out


async def test_complete_racing_a_running_tool_call_keeps_the_chain_ordered(
    tmp_path: Path,
) -> None:
    """A hostile agent calls CompleteTask while its own tool call still runs under the
    same lease: no receipt of that lease may follow its task_finished on the node's
    chain, and the task's export verifies strictly."""
    GATE.clear()
    effects = tmp_path / "effects.txt"
    async with start_control(tmp_path, policy=append_policy(effects)) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side:
            agent = side.agent("alice")
            task = await agent.claim("work")
            assert task is not None
            call = asyncio.create_task(
                agent.call_tool(task_id, "append", {"line": "x"}, idempotency_key="k")
            )
            assert await wait_for(lambda: effects.exists() and effects.read_text())
            done = asyncio.create_task(agent.complete(task_id, result=b"done"))
            await asyncio.sleep(1.0)
            GATE.set()
            raced = await asyncio.gather(call, done, return_exceptions=True)
            assert not isinstance(raced[0], BaseException), raced[0]
            if isinstance(raced[1], BaseException):  # refused while the call ran: ask again
                assert "under way" in str(raced[1]), raced[1]
                assert (await agent.complete(task_id, result=b"done"))[0] == "succeeded"
            await agent.close()
            spool = side.state_dir / "spool.db"
            with contextlib.closing(sqlite3.connect(spool)) as db:
                rows = db.execute(
                    "SELECT envelope FROM spool WHERE task_id = ? ORDER BY seq", (task_id,)
                ).fetchall()
            kinds = [parse_receipt(bytes(r[0]))[1].kind for r in rows]
            assert kinds.count(ReceiptKind.TASK_FINISHED) == 1, kinds
            assert kinds[-1] == ReceiptKind.TASK_FINISHED, kinds
        code, out = await export_and_verify(cp, tmp_path, [task_id])
        assert code == 0, out


async def test_another_agent_cannot_join_an_in_flight_completion(tmp_path: Path) -> None:
    """While alice's CompleteTask waits for the control plane, bob (another agent of the
    same sidecar) calls CompleteTask on her task, with her outcome and with another:
    refused as not his, never answered with her end, and her end is signed once."""
    store = SlowAnswerStore(tmp_path / "control.db")
    async with start_control(tmp_path, store=store) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address, agents=("alice", "bob")) as side:
            alice, bob = side.agent("alice"), side.agent("bob")
            task = await alice.claim("work")
            assert task is not None
            store.delay_s = 1.5
            mine = asyncio.create_task(alice.complete(task_id, result=b"done"))
            await asyncio.wait_for(store.committed.wait(), 10)
            for succeeded in (True, False):
                with pytest.raises(E.NotOwner):
                    await bob.complete(task_id, result=b"bob", succeeded=succeeded)
            assert (await mine)[0] == "succeeded"
            with pytest.raises(E.NotOwner):  # nor once it ended
                await bob.complete(task_id, result=b"bob")
            await asyncio.gather(alice.close(), bob.close())
            ends = finished_receipts(side.state_dir / "spool.db", task_id)
            assert [e.agent_id for e in ends] == ["alice"]
            assert store.finals == 1
