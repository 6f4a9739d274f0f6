"""Replay safety across a sidecar SIGKILL and a takeover by another sidecar (real CLIs)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.agent import AgentClient
from tether.control.service import ControlConfig
from tether.core import errors as E
from tether.testing import spawn_sidecar_cli, start_control


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sidecar subprocesses, killed at the end of the test whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def policy(shared: Path) -> str:
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.append]
adapter = "python"
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.sleep]
adapter = "python"
[tools.sleep.python]
entrypoint = "tether.sidecar.tools.builtin:sleep"
[queues.work]
tools = ["append", "sleep"]
lease_ttl_ms = 2000
"""


async def test_side_effect_happens_once_across_sigkill_and_takeover(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Five calls with one key, split by a SIGKILL and a takeover: the line is written once.

    A call killed mid-run (STARTED, outcome unknown) is ABORTED after the takeover,
    not run again.
    """
    shared = tmp_path / "outside" / "shared.txt"
    config = ControlConfig(backoff_base_ms=100, backoff_cap_ms=100)
    async with start_control(tmp_path, sweep_interval_ms=200, config=config) as control:
        await control.client.put_policy(policy(shared))
        submitted = await control.client.submit("work", b"{}")
        tid = submitted.task.task_id
        args = {"line": "exactly once"}

        # spawn_* polls synchronously: off the loop, so the in-process control plane answers.
        proc_a, sock_a, tokens_a = await asyncio.to_thread(
            spawn_sidecar_cli, tmp_path, control.address, node_id="node-a"
        )
        procs.append(proc_a)
        async with AgentClient(sock_a, tokens_a["alice"].read_text()) as agent:
            task = await agent.claim("work", wait_ms=2000)
            assert task is not None
            assert task.task_id == tid
            first = await agent.call_tool(tid, "append", args, idempotency_key="write-1")
            second = await agent.call_tool(tid, "append", args, idempotency_key="write-1")
            assert not first.replayed
            assert second.replayed
            napping = asyncio.create_task(
                agent.call_tool(tid, "sleep", {"seconds": 30}, idempotency_key="nap")
            )
            for _ in range(500):  # until the STARTED record lands (a hang guard)
                if await control.service.lookup_tool_call(tid, "nap") is not None:
                    break
                await asyncio.sleep(0.02)
            proc_a.send_signal(signal.SIGKILL)
            with pytest.raises(E.Unavailable):
                await napping  # the connection to the killed sidecar drops
        assert proc_a.wait(timeout=10) == -signal.SIGKILL

        proc_b, sock_b, tokens_b = await asyncio.to_thread(
            spawn_sidecar_cli, tmp_path, control.address, node_id="node-b"
        )
        procs.append(proc_b)
        async with AgentClient(sock_b, tokens_b["alice"].read_text()) as agent:
            # The lease held by the killed sidecar lapses (TTL 2 s), then node-b takes over.
            task = await agent.claim("work", wait_ms=10_000)
            assert task is not None
            assert task.task_id == tid
            assert task.attempt == 2
            later = [
                await agent.call_tool(tid, "append", args, idempotency_key="write-1")
                for _ in range(3)
            ]
            assert all(r.replayed for r in later)
            assert all(r.result == first.result for r in later)
            with pytest.raises(E.OutcomeUnknown, match="outcome is unknown"):
                await agent.call_tool(tid, "sleep", {"seconds": 30}, idempotency_key="nap")
            assert (await agent.complete(tid))[0] == "succeeded"
        assert shared.read_text().splitlines() == ["exactly once"]
