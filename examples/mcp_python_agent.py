"""An agent built on the official MCP Python SDK, knowing nothing of Tether.

It reads the MCP server to use from a standard `{"mcpServers": {...}}` config
file (the one `tether run` writes and names in $TETHER_MCP_CONFIG; any other
MCP host reads the same shape), lists the tools, makes the calls its input
asks for and prints what came back as one JSON object. Run it under Tether:

    tether run --queue research --socket node-1/tether.sock \
        --token-file node-1/alice.token -- python examples/mcp_python_agent.py

with a task payload such as
`{"calls": [{"tool": "echo", "arguments": {"text": "hi"}}]}`. A call may carry
`"key"`, sent as the `tether/idempotencyKey` in `_meta` (a retried call with the
same key replays its first outcome instead of running again). It exits 1 when a
call came back as a tool error, unless the input says `"allow_errors": true`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from contextlib import AsyncExitStack
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client


async def connect(stack: AsyncExitStack, server: dict[str, Any]) -> Client:
    """An MCP client for one `mcpServers` entry (Streamable HTTP or a stdio command)."""
    if server.get("type", "stdio") == "stdio" or "command" in server:
        params = StdioServerParameters(
            command=server["command"],
            args=server.get("args", []),
            env={**os.environ, **server.get("env", {})},
        )
        return await stack.enter_async_context(Client(params))
    http = await stack.enter_async_context(httpx2.AsyncClient(headers=server.get("headers", {})))
    transport = streamable_http_client(server["url"], http_client=http)
    return await stack.enter_async_context(Client(transport))


async def main(servers: dict[str, Any], request: dict[str, Any]) -> int:
    results = []
    async with AsyncExitStack() as stack:
        client = await connect(stack, next(iter(servers.values())))
        tools = (await client.list_tools()).tools
        for call in request.get("calls", []):
            meta = {"tether/idempotencyKey": call["key"]} if "key" in call else None
            out = await client.call_tool(call["tool"], call.get("arguments", {}), meta=meta)
            results.append(
                {
                    "tool": call["tool"],
                    "is_error": bool(out.is_error),
                    "text": out.content[0].text if out.content else "",
                    "result": out.structured_content,
                }
            )
    print(json.dumps({"tools": sorted(t.name for t in tools), "results": results}))
    failed = any(r["is_error"] for r in results)
    return 1 if failed and not request.get("allow_errors") else 0


if __name__ == "__main__":
    with open(os.environ["TETHER_MCP_CONFIG"]) as f:
        config = json.load(f)["mcpServers"]
    sys.exit(asyncio.run(main(config, json.loads(sys.stdin.read() or "{}"))))
