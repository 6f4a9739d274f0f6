"""Nothing is emitted or answered under a lease that ended meanwhile (real control plane and
sidecar; the sidecar's monotonic clock jumps, as after a pause, between its first lease check
and the reply)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tether.core import errors as E
from tether.core.receipts import ReceiptKind
from tether.core.states import State
from tether.crypto.receipts import parse_receipt
from tether.sidecar.tools.base import ToolContext
from tether.testing import SidecarHandle, start_control, start_sidecar

TTL_MS = 30_000
PAUSE_MS = 10 * TTL_MS


class PausingClock:
    """Real clocks, except that the monotonic one can jump forward as after a SIGSTOP.

    `pause_after(fn)`: the next monotonic read made inside function `fn` returns the
    real time, and every later read is `PAUSE_MS` later: the process "slept" right
    after that check.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.armed = ""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        now = time.monotonic_ns() // 1_000_000 + self.offset
        if self.armed and _called_from(self.armed):
            self.armed = ""
            self.offset += PAUSE_MS
        return now

    def pause_after(self, function: str) -> None:
        self.armed = function

    def pause_now(self) -> None:
        self.offset += PAUSE_MS


def _called_from(name: str) -> bool:
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


CLOCK: list[PausingClock] = []


def pausing_tool(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """A tool during whose run the sidecar "sleeps" past its lease."""
    CLOCK[0].pause_now()
    return {"done": True}


def policy() -> str:
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.pause]
adapter = "python"
[tools.pause.python]
entrypoint = "{__name__}:pausing_tool"
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["pause"]
lease_ttl_ms = {TTL_MS}
memory_scope = "task"
"""


def kinds(side: SidecarHandle, task_id: str) -> list[ReceiptKind]:
    return [parse_receipt(env)[1].kind for env in side.sidecar._sink.envelopes(task_id)]


@pytest.fixture
def clock() -> PausingClock:
    CLOCK[:] = [PausingClock()]
    return CLOCK[0]


async def test_remember_and_recall_after_a_pause_are_lease_lost(
    tmp_path: Path, clock: PausingClock
) -> None:
    """A pause after the first check: Remember writes nothing and emits no memory_write;
    Recall answers nothing; both are FAILED_PRECONDITION "lease lost"."""
    async with start_control(tmp_path, policy=policy()) as cp:
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, clock=clock) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            clock.pause_after("for_agent")
            with pytest.raises(E.LeaseLost, match="lapsed"):
                await alice.remember(task.task_id, "k", b"v")
            assert kinds(side, task.task_id) == [
                ReceiptKind.LEASE_GRANTED,
                ReceiptKind.LEASE_LOST,
            ]
            other = await alice.claim("work")
            assert other is not None
            await alice.remember(other.task_id, "k", b"v")
            clock.pause_after("for_agent")
            with pytest.raises(E.LeaseLost, match="lapsed"):
                await alice.recall(other.task_id, "k")


async def test_start_and_complete_after_a_pause_are_lease_lost(
    tmp_path: Path, clock: PausingClock
) -> None:
    """StartTask emits no task_started after a pause during its transition; CompleteTask
    never sends the final transition under a lease that lapsed here (the task stays
    running at the control plane)."""
    async with start_control(tmp_path, policy=policy()) as cp:
        first = (await cp.client.submit("work", b"{}")).task.task_id
        second = (await cp.client.submit("work", b"{}")).task.task_id
        async with (
            start_sidecar(tmp_path, cp.address, clock=clock) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            assert task.task_id == first
            clock.pause_after("for_agent")
            with pytest.raises(E.LeaseLost):
                await alice.start(first)
            assert ReceiptKind.TASK_STARTED not in kinds(side, first)

            task = await alice.claim("work")
            assert task is not None
            assert task.task_id == second
            await alice.start(second)
            clock.pause_after("for_agent")
            with pytest.raises(E.LeaseLost):
                await alice.complete(second)
            assert ReceiptKind.TASK_FINISHED not in kinds(side, second)
            got = (await cp.client.get_task(second)).task
            assert State(got.state) is State.RUNNING


async def test_tool_refusal_after_a_pause_leaves_no_receipt(
    tmp_path: Path, clock: PausingClock
) -> None:
    """A refusal decided after the lease lapsed is "lease lost" with no tool_denied receipt
    stamped outside the lease's window."""
    async with start_control(tmp_path, policy=policy()) as cp:
        await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, clock=clock) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            clock.pause_after("_fence")
            with pytest.raises(E.LeaseLost):
                await alice.call_tool(task.task_id, "echo", {})  # not granted
            assert ReceiptKind.TOOL_DENIED not in kinds(side, task.task_id)


async def test_tool_result_is_not_returned_after_the_lease_lapsed_mid_call(
    tmp_path: Path, clock: PausingClock
) -> None:
    """A keyed tool during whose run the sidecar sleeps past the lease: its effect is on
    record (receipt and COMPLETED record) but the agent gets "lease lost", not the result."""
    async with start_control(tmp_path, policy=policy()) as cp:
        await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, clock=clock) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("work")
            assert task is not None
            with pytest.raises(E.LeaseLost, match="outcome is recorded"):
                await alice.call_tool(task.task_id, "pause", {}, idempotency_key="k1")
            assert ReceiptKind.TOOL_CALL in kinds(side, task.task_id)
            # The COMPLETED record rides the receipt stream: on record once it is ingested.
            deadline = time.monotonic() + 10
            while True:
                record = await cp.service.lookup_tool_call(task.task_id, "k1")
                assert record is not None
                if record.phase.name == "COMPLETED" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert record.phase.name == "COMPLETED"


async def test_claim_whose_lease_lapsed_before_the_reply_is_handed_back(
    tmp_path: Path, clock: PausingClock
) -> None:
    """A pause after the grant was checked (while the claim is still being answered): the
    agent is told to claim again, not handed a lapsed lease, and the task goes back."""
    async with start_control(tmp_path, policy=policy()) as cp:
        tid = (await cp.client.submit("work", b"{}")).task.task_id
        async with (
            start_sidecar(tmp_path, cp.address, clock=clock) as side,
            side.agent("alice") as alice,
        ):
            clock.pause_after("add")
            with pytest.raises(E.Unavailable, match="claim again"):
                await alice.claim("work")
            got = (await cp.client.get_task(tid)).task
            assert State(got.state) is State.QUEUED
