"""Receipts survive SIGKILL of the sidecar or the control plane (real CLI processes).

Invariant 2: after any crash, the ledger ends up holding every receipt the
sidecar ever signed, each seq once, in per-node order; the spool file on disk
is the witness of what was signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from control_fixtures import operator_args

from tether.agent import AgentClient
from tether.core import errors as E
from tether.crypto.pki import Role
from tether.crypto.receipts import parse_receipt
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli

NODE = "node-1"
Proc = subprocess.Popen[bytes]


class Procs:
    """Every subprocess a test started; all are stopped (and resumed if paused) at the end."""

    def __init__(self) -> None:
        self.all: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.all.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.all:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop_all()


def kill(proc: Proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def spool_file(tmp_path: Path) -> Path:
    return tmp_path / NODE / "state" / "spool.db"


def spool_state(tmp_path: Path) -> tuple[int, int, dict[int, bytes]]:
    """(acked seq, last seq, seq -> envelope) as the spool file holds them."""
    with contextlib.closing(sqlite3.connect(spool_file(tmp_path))) as db:
        (acked,) = db.execute("SELECT acked_seq FROM spool_state").fetchone()
        rows = db.execute("SELECT seq, envelope FROM spool ORDER BY seq").fetchall()
    envelopes = {int(s): bytes(e) for s, e in rows}
    return int(acked), max(envelopes, default=0), envelopes


def ledger_rows(db_path: Path) -> list[tuple[int, bytes]]:
    """(seq, envelope) of the node's receipts in ledger (leaf) order."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute(
            "SELECT seq, envelope FROM ledger_leaves WHERE node_id = ? ORDER BY leaf_index",
            (NODE,),
        ).fetchall()
    return [(int(s), bytes(e)) for s, e in rows]


async def until(cond: object, what: str, timeout_s: float = 30.0) -> None:
    """Polls `cond()` (a bound, not a timed assertion: the event must happen at all)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def ledger_catches_up(tmp_path: Path, db_path: Path) -> int:
    """Waits until the ledger holds the spool's last seq; returns it."""

    def done() -> bool:
        _, last, _ = spool_state(tmp_path)
        rows = ledger_rows(db_path)
        return bool(rows) and rows[-1][0] == last

    await until(done, "the ledger holds every spooled receipt")
    return spool_state(tmp_path)[1]


def assert_ledger_holds_everything(tmp_path: Path, db_path: Path, last: int) -> None:
    """Seqs 1..last in the ledger once each, in order, byte-identical to the spool's envelopes."""
    rows = ledger_rows(db_path)
    assert [s for s, _ in rows] == list(range(1, last + 1))
    _, _, spooled = spool_state(tmp_path)
    assert set(spooled) == set(range(1, last + 1))  # nothing pruned at this size
    for seq, envelope in rows:
        assert envelope == spooled[seq], seq
        assert parse_receipt(envelope)[1].seq == seq


@contextlib.asynccontextmanager
async def agent_on(socket: Path, token_file: Path) -> AsyncIterator[AgentClient]:
    token = await asyncio.to_thread(token_file.read_text)
    async with AgentClient(socket, token=token, timeout_s=10) as agent:
        yield agent


async def run_tasks(agent: AgentClient, count: int, remembers: int = 2) -> list[str]:
    """Claims, starts, writes memory and completes `count` tasks; returns their ids."""
    done = []
    for _ in range(count):
        task = await agent.claim("work", wait_ms=2000)
        assert task is not None
        await agent.start(task.task_id)
        for i in range(remembers):
            await agent.remember(task.task_id, f"k{i}", b"v")
        state, _pending = await agent.complete(task.task_id, result=b"ok")
        assert state == "succeeded"
        done.append(task.task_id)
    return done


async def remember_forever(agent: AgentClient, task_id: str, counter: list[int]) -> None:
    """Writes memory (a receipt each, spooled locally) until the sidecar goes away."""
    try:
        while True:
            await agent.remember(task_id, f"m{counter[0]}", b"x")
            counter[0] += 1
    except E.TetherError:
        return


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *args], capture_output=True, text=True, timeout=60
    )


async def export_and_verify(tmp_path: Path, address: str, tasks: list[str], *flags: str) -> str:
    out = tmp_path / "bundle.json"
    task_args = [a for t in tasks for a in ("--task", t)]
    exported = await asyncio.to_thread(
        cli,
        "receipts",
        "export",
        *operator_args(endpoint(address), Role.AUDITOR),
        *task_args,
        "--out",
        str(out),
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    pub = tmp_path / "keys" / "control.pub"
    verified = await asyncio.to_thread(cli, "verify", str(out), "--trust", str(pub), *flags)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return verified.stdout


async def submit(address: str, n: int) -> None:
    client = endpoint(address).admin()
    try:
        for i in range(n):
            await client.submit("work", f'{{"i": {i}}}'.encode())
    finally:
        await client.close()


async def start_control(tmp_path: Path, procs: Procs, tasks: int) -> tuple[Proc, str, Path]:
    """A control plane CLI with `tasks` queued; returns (process, address, its database)."""
    control, address = await asyncio.to_thread(spawn_control_cli, tmp_path)
    procs.add(control)
    await submit(address, tasks)
    return control, address, tmp_path / "control.db"


async def start_sidecar(tmp_path: Path, procs: Procs, address: str) -> tuple[Proc, Path, Path]:
    """A sidecar CLI (the same node each time); returns (process, socket, alice's token file)."""
    side, socket, tokens = await asyncio.to_thread(spawn_sidecar_cli, tmp_path, address)
    procs.add(side)
    return side, socket, tokens["alice"]


@dataclasses.dataclass
class Writing:
    """Tasks already finished, and one started task whose memory writes keep streaming."""

    finished: list[str]
    task_id: str
    counter: list[int]
    writer: asyncio.Task[None]


async def finish_then_write(
    agent: AgentClient, finish: int, before_writing: Callable[[], None] = lambda: None
) -> Writing:
    """Finishes `finish` tasks, then starts one and writes its memory until the sidecar dies
    (`before_writing` runs once the task is started, before its first write)."""
    finished = await run_tasks(agent, finish)
    task = await agent.claim("work", wait_ms=2000)
    assert task is not None
    await agent.start(task.task_id)
    before_writing()
    counter = [0]
    writer = asyncio.create_task(remember_forever(agent, task.task_id, counter))
    return Writing(finished, task.task_id, counter, writer)


async def test_sigkill_sidecar_with_receipts_in_flight(tmp_path: Path, procs: Procs) -> None:
    """A sidecar killed with unacked receipts replays them after restart: ledger = spool, 1..N."""
    control, address, db = await start_control(tmp_path, procs, 12)
    side, socket, alice = await start_sidecar(tmp_path, procs, address)
    async with agent_on(socket, alice) as agent:
        # Pause the control plane first: receipts keep being signed and spooled, none acked.
        w = await finish_then_write(
            agent, 5, before_writing=lambda: os.kill(control.pid, signal.SIGSTOP)
        )
        await until(lambda: w.counter[0] >= 15, "the agent wrote 15 memory receipts")
        kill(side)  # mid-run: the writer's next call fails
        await w.writer
    finished = w.finished
    acked, last_before, _ = spool_state(tmp_path)
    assert acked < last_before, "receipts were in flight when the sidecar died"
    os.kill(control.pid, signal.SIGCONT)

    side, socket, alice = await start_sidecar(tmp_path, procs, address)
    async with agent_on(socket, alice) as agent:
        finished += await run_tasks(agent, 3)
    last = await ledger_catches_up(tmp_path, db)
    assert last > last_before  # the restarted sidecar continued the same chain
    assert_ledger_holds_everything(tmp_path, db, last)
    # The interrupted task never finished (its lease lapses later): hence --allow-open.
    out = await export_and_verify(tmp_path, address, finished, "--allow-open")
    assert "VALID" in out


async def test_sigkill_control_plane_loses_nothing_acked(tmp_path: Path, procs: Procs) -> None:
    """Killing the control plane keeps every acked receipt; the sidecar replays the rest."""
    control, address, db = await start_control(tmp_path, procs, 8)
    _, socket, alice = await start_sidecar(tmp_path, procs, address)
    async with agent_on(socket, alice) as agent:
        w = await finish_then_write(agent, 4)
        finished, counter, writer = w.finished, w.counter, w.writer
        await until(lambda: counter[0] >= 10, "memory receipts streamed while control is up")
        # Acks reach the spool's file within ACK_PERSIST_S of the ledger's answer.
        await until(lambda: spool_state(tmp_path)[0] >= 1, "an ack written to the spool")
        kill(control)  # while receipts stream
        seen = counter[0]
        await until(lambda: counter[0] >= seen + 10, "receipts spooled while control is down")
        acked, last_down, _ = spool_state(tmp_path)
        assert acked >= 1
        assert acked < last_down  # these wait for the restart

        enroll = endpoint(address).enroll_address  # where the sidecar was told to enrol
        control, _ = await asyncio.to_thread(
            spawn_control_cli, tmp_path, extra_args=["--listen", address, "--enroll-listen", enroll]
        )
        procs.add(control)
        # Everything acknowledged before the crash is in the ledger after it.
        assert [s for s, _ in ledger_rows(db)][:acked] == list(range(1, acked + 1))
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        for _ in range(100):  # the sidecar may still be reconnecting
            try:
                state, _ = await agent.complete(w.task_id, result=b"ok")
                break
            except E.Unavailable:
                await asyncio.sleep(0.1)
        assert state == "succeeded"
        finished.append(w.task_id)
        finished += await run_tasks(agent, 2)
    last = await ledger_catches_up(tmp_path, db)
    assert last >= last_down
    assert_ledger_holds_everything(tmp_path, db, last)
    out = await export_and_verify(tmp_path, address, finished)
    assert f"VALID: {last} receipts" in out


async def test_sigkill_sidecar_before_its_acks_reach_the_file(tmp_path: Path, procs: Procs) -> None:
    """A sidecar killed while receipts stream and are acknowledged (acks reach the spool's
    file up to ACK_PERSIST_S late) loses nothing: after restart it resends what its file
    does not record as acked, and the ledger takes each seq once, byte for byte."""
    _, address, db = await start_control(tmp_path, procs, 8)
    side, socket, alice = await start_sidecar(tmp_path, procs, address)
    async with agent_on(socket, alice) as agent:
        w = await finish_then_write(agent, 2)
        await until(lambda: spool_state(tmp_path)[0] >= 5, "acks written to the spool")

        def acked_ahead_of_file() -> bool:
            rows = ledger_rows(db)
            return bool(rows) and rows[-1][0] > spool_state(tmp_path)[0] + 3

        await until(acked_ahead_of_file, "the ledger holds receipts the spool's file calls unacked")
        kill(side)  # mid-stream, acks in memory only
        await w.writer
    finished = w.finished
    acked_file, last_before, _ = spool_state(tmp_path)
    in_ledger = ledger_rows(db)[-1][0]
    assert acked_file < in_ledger <= last_before
    side, socket, alice = await start_sidecar(tmp_path, procs, address)
    async with agent_on(socket, alice) as agent:
        finished += await run_tasks(agent, 3)
    last = await ledger_catches_up(tmp_path, db)
    assert last > last_before
    assert_ledger_holds_everything(tmp_path, db, last)
    out = await export_and_verify(tmp_path, address, finished, "--allow-open")
    assert "VALID" in out
