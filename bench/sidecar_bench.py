"""Mediated tool calls: a no-op python tool through a real sidecar to a real control plane.

Both servers run as their own processes (the CLI, as deployed). Two shapes:
`full` is what the issue asks for (policy check, a budget reservation and
settlement, an idempotency record, a signed receipt spooled and streamed);
`plain` is a free tool called without an idempotency key (policy + receipt).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from control_bench import Control, create_db, rss_mb

from tether.agent import AgentClient
from tether.testing import endpoint, spawn_sidecar_cli

QUEUE = "bench"


def policy(agents: list[str]) -> str:
    """Every agent may work the bench queue; two no-op tools, one priced."""
    lines = ["version = 1"]
    for a in agents:
        lines += [f"[agents.{a}]", f'queues = ["{QUEUE}"]']
    lines += [
        "[tools.noop]",
        'adapter = "python"',
        "[tools.noop.python]",
        'entrypoint = "tether.sidecar.tools.builtin:noop"',
        "[tools.noop_paid]",
        'adapter = "python"',
        "cost_micros = 1",
        "[tools.noop_paid.python]",
        'entrypoint = "tether.sidecar.tools.builtin:noop"',
        f"[queues.{QUEUE}]",
        'tools = ["noop", "noop_paid"]',
        "budget_micros = 1000000000",
    ]
    return "\n".join(lines) + "\n"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _call(agent: AgentClient, task_id: str, full: bool, i: int) -> None:
    if full:
        await agent.call_tool(task_id, "noop_paid", {"i": i}, idempotency_key=f"k{i}")
    else:
        await agent.call_tool(task_id, "noop", {"i": i})


async def mediation_run(
    tmp: Path, serial_calls: int, agents: int, calls_per_agent: int
) -> dict[str, Any]:
    """Serial latency (one agent) of both shapes, then `agents` agents calling at once."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    names = [f"a{i}" for i in range(agents)]
    out: dict[str, Any] = {}
    with Control(tmp, db) as control:
        op = endpoint(control.address).admin()
        await op.put_policy(policy(names))
        for _ in range(agents):
            await op.submit(QUEUE, b"{}")
        await op.close()
        proc, sock, token_files = spawn_sidecar_cli(
            tmp, control.address, node_id="bench-side", agents=names
        )
        try:
            clients = [AgentClient(sock, token_files[n].read_text().strip()) for n in names]
            try:
                tasks = []
                for c in clients:
                    t = await c.claim(QUEUE, wait_ms=5000)
                    if t is None:
                        raise RuntimeError("an agent got no task")
                    await c.start(t.task_id)
                    tasks.append(t.task_id)
                first, tid = clients[0], tasks[0]
                for full in (False, True):
                    for i in range(50):  # warm up
                        await _call(first, tid, full, -1 - i if full else i)
                    lat = []
                    for i in range(serial_calls):
                        t0 = time.perf_counter()
                        await _call(first, tid, full, i + (10**6 if full else 0))
                        lat.append(time.perf_counter() - t0)
                    lat.sort()
                    shape = "full" if full else "plain"
                    out[f"{shape}_p50_ms"] = statistics.median(lat) * 1000
                    out[f"{shape}_p99_ms"] = lat[int(len(lat) * 0.99) - 1] * 1000
                out["sidecar_rss_idle_mb"] = rss_mb(proc.pid)

                for full in (True, False):

                    async def agent_loop(k: int, full: bool = full) -> None:
                        base = 2 * 10**6 + k * calls_per_agent if full else 0
                        for i in range(calls_per_agent):
                            await _call(clients[k], tasks[k], full, base + i)

                    start = time.perf_counter()
                    await asyncio.gather(*(agent_loop(k) for k in range(agents)))
                    elapsed = time.perf_counter() - start
                    shape = "full" if full else "plain"
                    out[f"{shape}_per_s"] = agents * calls_per_agent / elapsed
                out["sidecar_rss_mb"] = rss_mb(proc.pid)
                out["control_rss_mb"] = rss_mb(control.pid)
            finally:
                for c in clients:
                    await c.close()
        finally:
            _stop(proc)
    return out
