"""The same tool call through the Broker's CallTool and through the sidecar's MCP server.

Control plane and sidecar run as their own processes (the CLI, as deployed); one
agent holds one lease and calls a free no-op python tool serially, first with
CallTool (gRPC over the Unix socket), then with `tools/call` from the official
MCP Python SDK client over loopback HTTP, in the current protocol revision
(one POST per call) and the handshake revision (a session). The difference is
what speaking MCP costs per call; mediation is the same code path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
from control_bench import Control, create_db
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from sidecar_bench import QUEUE, _stop, policy

from tether.agent import AgentClient
from tether.testing import endpoint, spawn_sidecar_cli


async def _serial(call: Callable[[int], Awaitable[Any]], n: int) -> dict[str, float]:
    for i in range(30):  # warm up
        await call(-1 - i)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"p50_ms": statistics.median(lat) * 1000, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000}


async def mcp_run(tmp: Path, serial_calls: int) -> dict[str, Any]:
    """Serial p50/p99 of one no-op call: CallTool, MCP (current revision), MCP (handshake)."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    db = tmp / "control.db"
    await create_db(db)
    out: dict[str, Any] = {}
    with Control(tmp, db) as control:
        op = endpoint(control.address).admin()
        await op.put_policy(policy(["a0"]))
        await op.submit(QUEUE, b"{}")
        await op.close()
        proc, sock, token_files = spawn_sidecar_cli(
            tmp,
            control.address,
            node_id="bench-mcp",
            agents=["a0"],
            extra_args=["--mcp-listen", "127.0.0.1:0"],
        )
        try:
            async with AgentClient(sock, token_files["a0"].read_text().strip()) as agent:
                task = await agent.claim(QUEUE, wait_ms=5000)
                if task is None or task.mcp is None:
                    raise RuntimeError("no task, or the sidecar serves no MCP")
                await agent.start(task.task_id)
                grpc = await _serial(
                    lambda i: agent.call_tool(task.task_id, "noop", {"i": i}), serial_calls
                )
                out["grpc_calltool_p50_ms"] = grpc["p50_ms"]
                out["grpc_calltool_p99_ms"] = grpc["p99_ms"]
                headers = {"Authorization": f"Bearer {task.mcp.token}"}
                for mode in ("auto", "legacy"):
                    async with (
                        httpx2.AsyncClient(headers=headers) as http,
                        Client(
                            streamable_http_client(task.mcp.url, http_client=http), mode=mode
                        ) as client,
                    ):
                        figures = await _serial(
                            lambda i, c=client: c.call_tool("noop", {"i": i}), serial_calls
                        )
                    era = "current" if mode == "auto" else "handshake"
                    out[f"mcp_{era}_p50_ms"] = figures["p50_ms"]
                    out[f"mcp_{era}_p99_ms"] = figures["p99_ms"]
        finally:
            _stop(proc)
    return out
