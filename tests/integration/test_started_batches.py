"""Concurrent keyed calls share their STARTED round trip (StartToolCalls): real control plane
and sidecar in one process, so the tool can read the control plane's store before it acts."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tether.core import errors as E
from tether.sidecar import uplink as uplink_module
from tether.sidecar.tools.base import ToolContext
from tether.testing import ControlHandle, start_control, start_sidecar

AGENTS = [f"a{i}" for i in range(6)]
CONTROL: list[ControlHandle] = []


async def check_started(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """Reports the control plane's record of this call as the tool runs (the effect's instant)."""
    record = await CONTROL[0].service.lookup_tool_call(ctx.task_id, ctx.idempotency_key)
    return {"phase": None if record is None else record.phase.name, "token": ctx.fencing_token}


def policy() -> str:
    lines = ["version = 1"]
    for a in AGENTS:
        lines += [f"[agents.{a}]", 'queues = ["work"]']
    lines += [
        "[tools.check]",
        'adapter = "python"',
        "[tools.check.python]",
        f'entrypoint = "{__name__}:check_started"',
        "[queues.work]",
        'tools = ["check"]',
    ]
    return "\n".join(lines) + "\n"


async def _one_batch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    keys: list[str],
    cancel_last: bool = False,
) -> tuple[list[Any], list[list[str]], list[Any]]:
    """Every agent claims a task; the first agent's keyed call holds the only STARTED slot
    while the others call (agent i+1 with `keys[i]`) and wait for it; then the slot opens.
    With `cancel_last`, the last agent's task is canceled under it first (the sidecar does
    not know yet). Returns the tasks, the task ids of each StartToolCalls batch, and each
    call's answer or error."""
    monkeypatch.setattr(uplink_module, "STARTS_IN_FLIGHT", 1)
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=AGENTS) as side,
    ):
        CONTROL[:] = [control]
        await control.client.put_policy(policy())
        clients = [side.agent(a) for a in AGENTS]
        try:
            tasks = []
            for c in clients:
                await control.client.submit("work", b"{}")
                task = await c.claim("work", wait_ms=2000)
                assert task is not None
                tasks.append(task)
            uplink = side.sidecar.uplink
            gate, holding = asyncio.Event(), asyncio.Event()
            batches: list[list[str]] = []
            one, many = uplink._start_one, uplink._start_many

            async def held_one(request: Any) -> Any:
                holding.set()
                await gate.wait()  # the first call holds the only request slot
                return await one(request)

            async def counted_many(requests: list[Any]) -> Any:
                batches.append([r.task_id for r in requests])
                return await many(requests)

            monkeypatch.setattr(uplink, "_start_one", held_one)
            monkeypatch.setattr(uplink, "_start_many", counted_many)
            if cancel_last:
                await control.client.cancel(tasks[-1].task_id)
            calls = [
                asyncio.ensure_future(
                    clients[0].call_tool(tasks[0].task_id, "check", {}, idempotency_key="k")
                )
            ]
            await asyncio.wait_for(holding.wait(), 10)
            calls += [
                asyncio.ensure_future(c.call_tool(t.task_id, "check", {}, idempotency_key=k))
                for c, t, k in zip(clients[1:], tasks[1:], keys, strict=True)
            ]
            for _ in range(1000):  # until every other call waits for the slot
                if len(uplink._starts) == len(AGENTS) - 1:
                    break
                await asyncio.sleep(0.01)
            gate.set()
            done = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for c in clients:
                await c.close()
    return tasks, batches, list(done)


async def test_waiting_started_records_go_in_one_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that find the STARTED requests busy are recorded together in one StartToolCalls,
    each durable before its tool runs and each answered on its own (a refused one included)."""
    # The last agent's task is canceled under it: the control plane refuses its record.
    keys = ["k"] * (len(AGENTS) - 1)
    tasks, batches, done = await _one_batch(tmp_path, monkeypatch, keys, cancel_last=True)
    assert [sorted(b) for b in batches] == [sorted(t.task_id for t in tasks[1:])]
    for task, got in zip(tasks[:-1], done[:-1], strict=True):
        assert not isinstance(got, BaseException), got
        assert got.result == {"phase": "STARTED", "token": task.fencing_token}
    # Refused as RecordToolCall refuses it (the task is canceled); its tool never ran.
    assert isinstance(done[-1], E.InvalidTransition), done[-1]
    assert "canceled" in done[-1].message


async def test_one_agents_malformed_key_does_not_refuse_the_others_in_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile agent's idempotency key that the control plane refuses (a control
    character) is refused alone: the honest agents whose STARTED records share its
    StartToolCalls are recorded and their tools run, as if each had been sent alone."""
    keys = ["k"] * (len(AGENTS) - 2) + ["bad\nkey"]  # the last agent is hostile
    tasks, batches, done = await _one_batch(tmp_path, monkeypatch, keys)
    assert [sorted(b) for b in batches] == [sorted(t.task_id for t in tasks[1:])]
    for task, got in zip(tasks[:-1], done[:-1], strict=True):
        assert not isinstance(got, BaseException), got
        assert got.result == {"phase": "STARTED", "token": task.fencing_token}
    assert isinstance(done[-1], E.InvalidArgument), done[-1]
    assert "control characters" in done[-1].message
