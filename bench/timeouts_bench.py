"""How fast a cancel reaches a running tool call, and when a deadline stops one.

Control plane and sidecar run as their own processes (the CLI, as deployed; the
sweeper every 100 ms). One agent holds a task and is inside a 60 s tool call (the
builtin `sleep`) when the task ends:

- cancel: an operator's CancelTask; measured from its return to the agent's
  CallTool returning CANCELLED. The sidecar learns it at its next renewal (every
  third of the heartbeat timeout), so the figure is bounded by TTL/3 plus a sweep.
- deadline: the task's deadline_ms; measured from the signed deadline (the control
  plane's clock; same host, so wall time is comparable here) to CallTool returning
  DEADLINE_EXCEEDED. The sidecar stops at the signed time by its own clock, 100 ms
  early, so the figure is about -100 ms whatever the renewal period.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from control_bench import create_db

from tether.agent import AgentClient
from tether.core.errors import TaskCanceled, TaskTimedOut
from tether.testing import endpoint, spawn_control_cli, spawn_sidecar_cli

QUEUE = "timeouts"
TTL_MS = 3_000
DEADLINE_MS = 2_000


def policy() -> str:
    return f"""version = 1
[agents.a0]
queues = ["{QUEUE}"]
[tools.sleep]
adapter = "python"
timeout_ms = 60000
[tools.sleep.python]
entrypoint = "tether.sidecar.tools.builtin:sleep"
[queues.{QUEUE}]
tools = ["sleep"]
lease_ttl_ms = {TTL_MS}
"""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def timeouts_run(tmp: Path, rounds: int) -> dict[str, Any]:
    """p50/max of cancel-to-stop and of deadline-to-stop over `rounds` tasks each."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    control, address = spawn_control_cli(
        tmp, db=db, vault=False, policy=policy(), extra_args=["--sweep-interval-ms", "100"]
    )
    side = None
    try:
        op = endpoint(address).admin()
        side, sock, tokens = spawn_sidecar_cli(tmp, address, node_id="bench-t", agents=["a0"])
        cancel_ms: list[float] = []
        deadline_ms: list[float] = []
        async with AgentClient(sock, tokens["a0"].read_text().strip()) as agent:
            for _ in range(rounds):
                await op.submit(QUEUE, b"{}")
                task = await agent.claim(QUEUE, wait_ms=5000)
                assert task is not None
                call = asyncio.ensure_future(
                    agent.call_tool(task.task_id, "sleep", {"seconds": 60})
                )
                await asyncio.sleep(0.2)
                await op.cancel(task.task_id, "bench")
                t0 = time.monotonic()
                try:
                    await call
                except TaskCanceled:
                    cancel_ms.append((time.monotonic() - t0) * 1000)
            for _ in range(rounds):
                sub = (await op.submit(QUEUE, b"{}", deadline_ms=DEADLINE_MS)).task
                task = await agent.claim(QUEUE, wait_ms=5000)
                assert task is not None
                try:
                    await agent.call_tool(task.task_id, "sleep", {"seconds": 60})
                except TaskTimedOut:
                    deadline_ms.append(time.time() * 1000 - sub.deadline_unix_ms)
        await op.close()
    finally:
        if side is not None:
            _stop(side)
        _stop(control)
    return {
        "cancel_to_stop_p50_ms": statistics.median(cancel_ms),
        "cancel_to_stop_max_ms": max(cancel_ms),
        "deadline_stop_vs_due_p50_ms": statistics.median(deadline_ms),
        "deadline_stop_vs_due_max_ms": max(deadline_ms),
        "timeouts_rounds": rounds,
        "timeouts_ttl_ms": TTL_MS,
    }
