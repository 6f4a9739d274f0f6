"""The MCP front door is behind the sidecar's load shedding and bounds request bodies.

Real control plane and sidecar (MCP on loopback TCP); raw HTTP requests as a
hostile agent holding a lease's MCP token would send them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tether.core.errors import Overloaded
from tether.grpcutil.limits import ServerLimits
from tether.sidecar.mcp_front import MAX_BODY_BYTES, MAX_SESSIONS_PER_TOKEN
from tether.testing import start_control, start_sidecar

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[tools.noop]
adapter = "python"
[tools.noop.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["noop"]
lease_ttl_ms = 60000
"""

HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "Mcp-Protocol-Version": "2025-11-25",
}
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


@asynccontextmanager
async def system(tmp_path: Path, limits: ServerLimits) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A sidecar serving MCP with `limits`, and alice's claimed task (with its MCP grant)."""
    async with (
        start_control(tmp_path) as cp,
        start_sidecar(
            tmp_path,
            cp.address,
            agents=("alice", "bob"),
            mcp=True,
            mcp_listen="127.0.0.1:0",
            limits=limits,
        ) as side,
    ):
        await cp.client.put_policy(POLICY)
        await cp.client.submit("work", b"{}")
        async with side.agent("alice") as client:
            task = await client.claim("work", wait_ms=5000)
        assert task is not None
        assert task.mcp is not None
        yield cp, side, task


async def test_mcp_calls_are_shed_per_agent_with_a_retry_hint(tmp_path: Path) -> None:
    """An agent flooding MCP is refused 429 with Retry-After and a JSON-RPC error carrying
    retry_after_ms; the refusal spends the same per-agent budget as its Broker calls (its
    next gRPC call is shed too), while another agent is untouched."""
    limits = ServerLimits(caller_rate_per_s=1, caller_burst=4, retry_after_ms=1000)
    async with system(tmp_path, limits) as (_cp, side, task):
        headers = {**HEADERS, "Authorization": f"Bearer {task.mcp.token}"}
        async with httpx2.AsyncClient(timeout=30) as http:
            answers = [await http.post(task.mcp.url, headers=headers, json=LIST) for _ in range(12)]
        shed = [a for a in answers if a.status_code == 429]
        assert shed, [a.status_code for a in answers]
        first = shed[0]
        assert int(first.headers["retry-after"]) >= 1
        error = first.json()["error"]
        assert error["code"] == -32000
        assert error["data"]["reason"] == "OVERLOADED"
        assert error["data"]["why"] == "rate"
        assert error["data"]["retry_after_ms"] >= 1
        assert "alice" in error["message"]
        async with side.agent("alice") as alice:
            with pytest.raises(Overloaded):
                await alice.claim("work", wait_ms=0)
        async with side.agent("bob") as bob:
            assert await bob.claim("work", wait_ms=0) is None  # admitted: bob's own budget


async def test_guessed_tokens_are_shed_as_one_unauthenticated_caller(tmp_path: Path) -> None:
    """Brute-forcing tokens is rate limited: requests with unknown tokens share one bucket
    and are shed 429 once it is empty, instead of each costing a lookup and a 401."""
    limits = ServerLimits(caller_rate_per_s=1, caller_burst=3, retry_after_ms=1000)
    async with system(tmp_path, limits) as (_cp, _side, task):
        async with httpx2.AsyncClient(timeout=30) as http:
            codes = [
                (
                    await http.post(
                        task.mcp.url,
                        headers={**HEADERS, "Authorization": f"Bearer tmcp_guess{i}"},
                        json=LIST,
                    )
                ).status_code
                for i in range(10)
            ]
        assert 401 in codes, codes
        assert 429 in codes, codes
        assert set(codes) <= {401, 429}, codes


async def test_a_body_over_the_limit_is_refused_before_it_is_buffered(tmp_path: Path) -> None:
    """A request body over MAX_BODY_BYTES is 413, whether it declares its length or streams
    it chunked; the server keeps serving the same token afterwards."""
    async with system(tmp_path, ServerLimits()) as (_cp, _side, task):
        headers = {**HEADERS, "Authorization": f"Bearer {task.mcp.token}"}
        big = (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"x":"'
            + b"a" * (MAX_BODY_BYTES + 10)
            + b'"}}'
        )

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]

        async with httpx2.AsyncClient(timeout=60) as http:
            declared = await http.post(task.mcp.url, headers=headers, content=big)
            assert declared.status_code == 413, declared.text
            streamed = await http.post(task.mcp.url, headers=headers, content=chunks())
            assert streamed.status_code == 413, streamed.text
            ok = await http.post(task.mcp.url, headers=headers, json=LIST)
            assert ok.status_code != 413
            assert ok.status_code < 500, ok.text


async def test_one_token_cannot_fill_the_session_table(tmp_path: Path) -> None:
    """A lease's token opens at most MAX_SESSIONS_PER_TOKEN handshake-era sessions (then
    429); ending one (DELETE) makes room, and another agent's token still opens one."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "flood", "version": "1"},
        },
    }
    async with system(tmp_path, ServerLimits()) as (cp, side, task):
        headers = {**HEADERS, "Authorization": f"Bearer {task.mcp.token}"}
        async with httpx2.AsyncClient(timeout=30) as http:
            opened = []
            for _ in range(MAX_SESSIONS_PER_TOKEN):
                answer = await http.post(task.mcp.url, headers=headers, json=init)
                assert answer.status_code == 200, answer.text
                opened.append(answer.headers["mcp-session-id"])
            refused = await http.post(task.mcp.url, headers=headers, json=init)
            assert refused.status_code == 429, refused.text
            assert "sessions open" in refused.text
            ended = await http.delete(
                task.mcp.url, headers={**headers, "Mcp-Session-Id": opened[0]}
            )
            assert ended.status_code < 300, ended.text
            again = await http.post(task.mcp.url, headers=headers, json=init)
            assert again.status_code == 200, again.text
            await cp.client.submit("work", b"{}")
            async with side.agent("bob") as bob:
                other = await bob.claim("work", wait_ms=5000)
            assert other is not None
            assert other.mcp is not None
            answer = await http.post(
                other.mcp.url,
                headers={**HEADERS, "Authorization": f"Bearer {other.mcp.token}"},
                json=init,
            )
            assert answer.status_code == 200, answer.text
