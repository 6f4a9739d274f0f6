"""The sidecar's MCP server, driven by the official MCP Python SDK client against real servers.

A real control plane and sidecar (MCP on loopback TCP and on its Unix socket);
the client is `mcp.Client` (both protocol eras: the current per-request one and
the initialize handshake), speaking Streamable HTTP with a per-lease token. It
lists exactly the lease's tools, calls one (credential injected, result
redacted, receipt written), is refused an ungranted tool, arguments that break
the schema and any call after the lease ends; tokens are bound to one lease.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tether.agent import McpAccess, Task
from tether.control.service import ControlConfig
from tether.testing import start_control, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import Bundle, bundle_from_proto

SECRET = b"mcp-front-secret-4242-xyz"

POLICY = """
version = 1
[agents.alice]
queues = ["work", "other"]
[agents.bob]
queues = ["work"]
[credentials.api_key]
tools = ["echo"]
[tools.echo]
adapter = "python"
credential = "api_key"
description = "Echo the arguments back"
[tools.echo.input_schema]
type = "object"
additionalProperties = true
[tools.echo.input_schema.properties.text]
type = "string"
description = "what to echo"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.noop]
adapter = "python"
[tools.noop.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[tools.append]
adapter = "python"
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = { path = "%(lines)s" }
[queues.work]
tools = ["echo", "noop", "append"]
[queues.other]
tools = ["noop"]
lease_ttl_ms = 1000
"""


@asynccontextmanager
async def mcp_client(
    access: McpAccess, *, mode: str = "auto", unix: bool = False, token: str | None = None
) -> AsyncIterator[Client]:
    """An official-SDK MCP client on the lease's endpoint (TCP, or the Unix socket)."""
    headers = {"Authorization": f"Bearer {access.token if token is None else token}"}
    if unix:
        transport = httpx2.AsyncHTTPTransport(uds=access.unix_socket)
        http = httpx2.AsyncClient(headers=headers, transport=transport)
        url = "http://localhost/mcp"
    else:
        http = httpx2.AsyncClient(headers=headers)
        url = access.url
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


def socket_mode(path: str) -> int:
    """The permission bits of a Unix socket (fails if `path` is not one)."""
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return st.st_mode & 0o777


def receipts(bundle: Bundle) -> list[dict[str, Any]]:
    """The receipts (predicates) in a bundle, in order."""
    out = []
    for entry in bundle.entries:
        envelope = json.loads(entry.envelope)
        statement = json.loads(base64.b64decode(envelope["payload"]))
        out.append(statement["predicate"])
    return out


@asynccontextmanager
async def system(tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """A control plane with the test policy and the API key, and a sidecar serving MCP."""
    async with (
        start_control(
            tmp_path, sweep_interval_ms=200, config=ControlConfig(backoff_base_ms=200)
        ) as cp,
        start_sidecar(
            tmp_path, cp.address, agents=("alice", "bob"), mcp=True, mcp_listen="127.0.0.1:0"
        ) as side,
    ):
        await cp.client.put_policy(POLICY % {"lines": tmp_path / "lines.txt"})
        await cp.client.put_secret("api_key", SECRET)
        yield cp, side


async def claim(side: Any, agent: str, queue: str = "work") -> Task:
    async with side.agent(agent) as client:
        task = await client.claim(queue, wait_ms=5000)
    assert task is not None
    assert task.mcp is not None
    return task


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sdk_client_lists_calls_and_is_refused_with_receipts(
    tmp_path: Path, mode: str
) -> None:
    """The official client sees exactly the lease's tools, calls one (credential injected,
    redacted, receipted), is refused an ungranted tool and bad arguments, and every call
    after the lease ends; the exported bundle verifies with a receipt for every call."""
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("work", b'{"n": 1}')).task.task_id
        task = await claim(side, "alice")
        assert task.task_id == task_id
        assert task.mcp is not None
        assert task.mcp.url.startswith("http://127.0.0.1:")
        assert "tmcp_" not in repr(task)  # the token is never in a repr
        async with mcp_client(task.mcp, mode=mode) as client:
            listed = await client.list_tools()
            tools = {t.name: t for t in listed.tools}
            assert set(tools) == {"echo", "noop", "append"}
            assert tools["echo"].description == "Echo the arguments back"
            assert tools["echo"].input_schema["properties"]["text"]["type"] == "string"
            assert tools["noop"].input_schema == {"type": "object"}

            result = await client.call_tool("echo", {"text": "hi", "reveal_credentials": True})
            assert not result.is_error, result
            body = result.structured_content
            assert body is not None
            assert body["args"]["text"] == "hi"
            assert body["credentials"]["api_key"] == "[REDACTED]"  # injected, then redacted
            assert SECRET.decode() not in json.dumps(result.model_dump(mode="json"))
            assert base64.b64encode(SECRET).decode()[:20] not in json.dumps(body)

            refused = await client.call_tool("delete_everything", {})
            assert refused.is_error
            assert "PERMISSION_DENIED" in refused.content[0].text or (
                "POLICY_DENIED" in refused.content[0].text
            )
            assert "delete_everything" in refused.content[0].text

            bad = await client.call_tool("echo", {"text": 3})
            assert bad.is_error
            assert "input_schema" in bad.content[0].text
            assert "at /text" in bad.content[0].text

            async with side.agent("alice") as agent:
                state, _ = await agent.complete(task_id, result=b"done")
            assert state == "succeeded"
            late = await client.call_tool("noop", {})
            assert late.is_error
            assert "LEASE_LOST" in late.content[0].text
            assert (await client.list_tools()).tools == []
        spool = side.sidecar._sink
        assert await spool.wait_acked(spool.last_seq, 15)
        bundle = bundle_from_proto(await cp.client.export_bundle([task_id]))
    report = verify_bundle(bundle, [cp.key.public])
    assert report.ok, [f.to_dict() for f in report.failures]
    kinds = [(r["kind"], r.get("tool", "")) for r in receipts(bundle)]
    assert kinds.count(("RECEIPT_KIND_TOOL_CALL", "echo")) == 1
    denied = [t for k, t in kinds if k == "RECEIPT_KIND_TOOL_DENIED"]
    assert denied == ["delete_everything", "echo"]  # ungranted, then the schema refusal
    assert SECRET not in bundle.entries[0].envelope


async def test_unix_socket_and_idempotency_key_through_meta(tmp_path: Path) -> None:
    """Over the MCP Unix socket a keyed call replays instead of running twice."""
    async with system(tmp_path) as (cp, side):
        await cp.client.submit("work", b"{}")
        task = await claim(side, "alice")
        assert task.mcp is not None
        assert socket_mode(task.mcp.unix_socket) == 0o660
        async with mcp_client(task.mcp, unix=True) as client:
            meta = {"tether/idempotencyKey": "line-1"}
            first = await client.call_tool("append", {"line": "once"}, meta=meta)
            again = await client.call_tool("append", {"line": "once"}, meta=meta)
        assert not first.is_error
        assert not again.is_error
        assert first.meta is not None
        assert first.meta["tether/replayed"] is False
        assert again.meta is not None
        assert again.meta["tether/replayed"] is True
        assert (tmp_path / "lines.txt").read_text() == "once\n"  # one side effect


async def test_token_is_bound_to_its_lease(tmp_path: Path) -> None:
    """A token acts only under its own lease: bob's token never reaches alice's task, a
    guessed or altered token is refused, and after a new lease on the task the old
    token is unknown."""
    async with system(tmp_path) as (cp, side):
        first = (await cp.client.submit("work", b"{}")).task.task_id
        await cp.client.submit("work", b"{}")
        alice = await claim(side, "alice")
        bob = await claim(side, "bob")
        assert alice.mcp is not None
        assert bob.mcp is not None
        assert alice.mcp.token != bob.mcp.token
        # Bob's token works for bob's lease only: his call lands on his task.
        async with mcp_client(bob.mcp) as client:
            out = await client.call_tool("echo", {"text": "b"})
        assert out.structured_content is not None
        assert out.structured_content["task_id"] == bob.task_id != alice.task_id
        # Forged and altered tokens: 401 before any MCP message is handled.
        for forged in ("tmcp_" + "A" * 43, alice.mcp.token[:-1] + "x", "tmcp_", bob.task_id):
            async with httpx2.AsyncClient() as http:
                response = await http.post(
                    alice.mcp.url,
                    headers={
                        "Authorization": f"Bearer {forged}",
                        "Accept": "application/json, text/event-stream",
                        "Content-Type": "application/json",
                    },
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                )
            assert response.status_code == 401, forged
        # After the lease ends the token still names it: every call is refused.
        async with side.agent("alice") as agent:
            await agent.complete(first, succeeded=False, error="done with it")
        async with mcp_client(alice.mcp) as client:
            late = await client.call_tool("echo", {"text": "late"})
        assert late.is_error
        assert "LEASE_LOST" in late.content[0].text


async def test_token_of_a_lapsed_lease_is_unknown_once_the_task_is_leased_again(
    tmp_path: Path,
) -> None:
    """A lease that lapses and is granted again gets a new token; the old one is 401."""
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("other", b"{}")).task.task_id
        old = await claim(side, "alice", "other")
        assert old.mcp is not None
        # alice goes silent: the 1 s lease lapses, the task is queued again.
        again = None
        async with side.agent("alice") as agent:
            for _ in range(20):
                again = await agent.claim("other", wait_ms=1000)
                if again is not None:
                    break
        assert again is not None
        assert again.task_id == task_id
        assert again.mcp is not None
        assert again.fencing_token > old.fencing_token
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                old.mcp.url,
                headers={
                    "Authorization": f"Bearer {old.mcp.token}",
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                },
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            )
        assert response.status_code == 401
        async with mcp_client(again.mcp) as client:
            assert [t.name for t in (await client.list_tools()).tools] == ["noop"]


async def test_mcp_listener_refuses_non_loopback_and_foreign_hosts(tmp_path: Path) -> None:
    """The MCP listener binds loopback only (config refuses anything wider), and a request
    whose Host header is not loopback (DNS rebinding) is refused."""
    from tether.core.errors import ConfigError
    from tether.sidecar.config import load

    base = {"control": "127.0.0.1:1", "node_id": "n", "key": "k", "agent_tokens": {"a": "t"}}
    for address in ("0.0.0.0:7801", "10.0.0.1:7801", "example.com:80"):
        with pytest.raises(ConfigError, match="mcp_listen"):
            load({**base, "mcp_listen": address}, {})
    cfg = load({**base, "mcp": True, "socket": str(tmp_path / "t.sock")}, {})
    assert cfg.mcp_socket == tmp_path / "t-mcp.sock"
    async with system(tmp_path) as (cp, side):
        await cp.client.submit("work", b"{}")
        task = await claim(side, "alice")
        assert task.mcp is not None
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                task.mcp.url,
                headers={
                    "Authorization": f"Bearer {task.mcp.token}",
                    "Host": "attacker.example:80",
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                    "Mcp-Protocol-Version": "2025-11-25",
                },
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            )
        assert response.status_code in (400, 403, 421), response.text


async def test_a_session_opened_with_one_lease_token_refuses_another(tmp_path: Path) -> None:
    """A handshake-era session belongs to the lease whose token opened it: the same session
    id with another lease's token is answered as if it did not exist (404)."""
    async with system(tmp_path) as (cp, side):
        await cp.client.submit("work", b"{}")
        await cp.client.submit("work", b"{}")
        alice = await claim(side, "alice")
        bob = await claim(side, "bob")
        assert alice.mcp is not None
        assert bob.mcp is not None
        base = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        async with httpx2.AsyncClient(timeout=30) as http:
            opened = await http.post(
                alice.mcp.url,
                headers={**base, "Authorization": f"Bearer {alice.mcp.token}"},
                json={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {},
                        "clientInfo": {"name": "raw", "version": "1"},
                    },
                },
            )
            assert opened.status_code == 200, opened.text
            session = opened.headers["mcp-session-id"]
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            in_session = {**base, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"}
            await http.post(
                alice.mcp.url,
                headers={**in_session, "Authorization": f"Bearer {alice.mcp.token}"},
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            )
            hijack = await http.post(
                alice.mcp.url,
                headers={**in_session, "Authorization": f"Bearer {bob.mcp.token}"},
                json=listing,
            )
            assert hijack.status_code == 404, hijack.text
            own = await http.post(
                alice.mcp.url,
                headers={**in_session, "Authorization": f"Bearer {alice.mcp.token}"},
                json=listing,
            )
            assert own.status_code == 200, own.text
            assert '"echo"' in own.text


def test_sidecar_cli_refuses_a_non_loopback_mcp_listener(tmp_path: Path) -> None:
    """`tether sidecar --mcp-listen 0.0.0.0:PORT` exits 2 naming the key before serving."""
    import subprocess
    import sys

    token = tmp_path / "a.token"
    token.write_text("x" * 32)
    proc = subprocess.run(
        [
            sys.executable, "-m", "tether.cli", "sidecar", "--control", "127.0.0.1:1",
            "--node-id", "n", "--key", str(tmp_path / "k"), "--agent", f"a={token}",
            "--socket", str(tmp_path / "t.sock"), "--mcp-listen", "0.0.0.0:7801",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert b"mcp_listen" in proc.stderr
    assert b"not a loopback address" in proc.stderr
    assert not (tmp_path / "t-mcp.sock").exists()
