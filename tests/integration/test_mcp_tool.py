"""The mcp adapter against a real stdio MCP server run confined by the sandbox."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tether.core.errors import ConfigError, InvalidArgument, PolicyDenied, ToolTimeout
from tether.core.policy import parse_policy
from tether.sidecar.sandbox import landlock_abi
from tether.sidecar.tools import ToolContext, build_tool, run_tool
from tether.sidecar.tools.mcp import McpTool
from tether.testing import start_control, start_sidecar

SECRET = b"mcp-token-9a8b7c6d5e4f"
CANARY = "TETHER_MCP_CANARY_VALUE_4242"
SERVER = Path(__file__).resolve().parent.parent / "mcp_servers" / "echo_server.py"

pytestmark = pytest.mark.skipif(landlock_abi() < 1, reason="kernel without Landlock")


def _policy(mcp_extra: str = "", tool_extra: str = "", name: str = "echo") -> str:
    return f"""\
version = 1
[credentials.mcp_token]
tools = ["{name}"]
[tools.{name}]
adapter = "mcp"
timeout_ms = 10000
{tool_extra}
[tools.{name}.mcp]
argv = ["python3", "{SERVER}"]
read_paths = ["{SERVER.parent}"]
env = {{ LANG = "C.UTF-8" }}
secret_env = {{ MCP_TOKEN = "mcp_token" }}
{mcp_extra}
[queues.q]
tools = ["{name}"]
"""


def _tool(mcp_extra: str = "", name: str = "echo") -> McpTool:
    policy = parse_policy(_policy(f"tool = {json.dumps(name)}\n{mcp_extra}", name="proxy"))
    tool = build_tool(policy.tool("proxy"))
    assert isinstance(tool, McpTool)
    return tool


def _ctx(workspace: Path, **kw: Any) -> ToolContext:
    fields: dict[str, Any] = {
        "task_id": "t1",
        "attempt": 1,
        "fencing_token": 7,
        "agent_id": "alice",
        "workspace": workspace,
        "credentials": {"mcp_token": SECRET},
        "tool_name": "proxy",
    }
    return ToolContext(**{**fields, **kw})


def _text(result_value: dict[str, Any]) -> str:
    return str(result_value["content"][0]["text"])


def _same_dir(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between open and read
        return True


async def _wait_gone(pid: int) -> bool:
    """Polls until `pid` has died (SIGKILL is asynchronous); a deadline, not a timing claim."""
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def tools() -> AsyncIterator[list[McpTool]]:
    """Collects the tools a test builds and shuts their servers down afterwards."""
    made: list[McpTool] = []
    yield made
    for tool in made:
        await tool.aclose()


async def _call(tool: McpTool, ws: Path, args: dict[str, Any], **kw: Any) -> Any:
    return await run_tool(tool, _ctx(ws, **kw), args)


async def test_call_returns_server_result(tmp_path: Path, tools: list[McpTool]) -> None:
    """A call is proxied as tools/call and returns the server's content and structuredContent."""
    tool = _tool()
    tools.append(tool)
    result = await _call(tool, tmp_path, {"x": 1, "nested": {"y": [1, "two"]}})
    assert result.status == "ok"
    assert result.value["isError"] is False
    assert json.loads(_text(result.value)) == {"x": 1, "nested": {"y": [1, "two"]}}
    assert result.value["structuredContent"] == {"args": {"x": 1, "nested": {"y": [1, "two"]}}}


async def test_one_server_per_lease_in_its_workspace(tmp_path: Path, tools: list[McpTool]) -> None:
    """Calls under one lease share one server, cwd the workspace; a new lease gets another."""
    whoami = _tool(name="whoami")
    tools.append(whoami)
    first = json.loads(_text((await _call(whoami, tmp_path, {})).value))
    second = json.loads(_text((await _call(whoami, tmp_path, {})).value))
    assert first["pid"] == second["pid"]
    assert _same_dir(first["cwd"], tmp_path)
    other = json.loads(_text((await run_tool(whoami, _ctx(tmp_path, fencing_token=8), {})).value))
    assert other["pid"] != first["pid"]


async def test_secret_reaches_server_but_is_redacted(
    tmp_path: Path, tools: list[McpTool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """secret_env reaches the server's env; raw and base64 echoes are redacted; other env is not."""
    monkeypatch.setenv("TETHER_MCP_CANARY", CANARY)
    env_tool, b64_tool, sha_tool = _tool(name="env"), _tool(name="b64env"), _tool(name="sha256env")
    tools.extend((env_tool, b64_tool, sha_tool))

    digest = _text((await _call(sha_tool, tmp_path, {"var": "MCP_TOKEN"})).value)
    assert digest == hashlib.sha256(SECRET).hexdigest()

    env_result = await _call(env_tool, tmp_path, {})
    env = json.loads(_text(env_result.value))
    assert env["MCP_TOKEN"] == "[REDACTED]"
    assert env["LANG"] == "C.UTF-8"
    assert "TETHER_MCP_CANARY" not in env
    assert set(env) <= {"MCP_TOKEN", "LANG", "LC_CTYPE"}
    dumped = json.dumps(env_result.value)
    assert SECRET.decode() not in dumped
    assert CANARY not in dumped

    b64 = await _call(b64_tool, tmp_path, {"var": "MCP_TOKEN"})
    assert base64.b64encode(SECRET).decode() not in json.dumps(b64.value)
    assert "[REDACTED]" in _text(b64.value)


async def test_timeout_kills_server_and_its_group(tmp_path: Path, tools: list[McpTool]) -> None:
    """A call past its timeout raises ToolTimeout and kills the server and its grandchildren."""
    sleep, whoami = _tool(name="sleep"), _tool(name="whoami")
    tools.extend((sleep, whoami))
    bystander = json.loads(_text((await _call(whoami, tmp_path, {})).value))["pid"]
    pids = json.loads(_text((await _call(sleep, tmp_path, {"spawn": True})).value))
    with pytest.raises(ToolTimeout):
        await _call(sleep, tmp_path, {"seconds": 60}, timeout_s=0.5)
    assert await _wait_gone(pids["server"])
    assert await _wait_gone(pids["grandchild"])
    assert sleep.running("t1", 7) is None
    assert not _gone(bystander)  # another tool's server is untouched


async def test_next_call_after_timeout_starts_fresh_server(
    tmp_path: Path, tools: list[McpTool]
) -> None:
    """After a timeout killed the server, the next call under the lease starts a new one."""
    tool = _tool(name="sleep")
    tools.append(tool)
    with pytest.raises(ToolTimeout):
        await _call(tool, tmp_path, {"seconds": 60}, timeout_s=0.3)
    result = await _call(tool, tmp_path, {"seconds": 0})
    assert result.status == "ok"
    assert _text(result.value) == "slept"


async def test_server_exit_mid_call_is_clear_error(tmp_path: Path, tools: list[McpTool]) -> None:
    """A server that exits mid-call yields an error result naming the exit, not a hang."""
    tool = _tool(name="crash")
    tools.append(tool)
    result = await _call(tool, tmp_path, {})
    assert result.status == "error"
    assert result.value["error"] == "mcp_server_exited"
    assert "status 3" in result.value["message"]
    assert "crashing on request" in result.value["message"]


async def test_malformed_reply_is_clear_error(tmp_path: Path, tools: list[McpTool]) -> None:
    """A non-JSON line on stdout is a protocol error result and the server is killed."""
    tool = _tool(name="garbage")
    tools.append(tool)
    result = await _call(tool, tmp_path, {})
    assert result.status == "error"
    assert result.value["error"] == "mcp_protocol_error"
    assert "not JSON" in result.value["message"]
    assert tool.running("t1", 7) is None


async def test_unknown_mcp_tool_is_error_result(tmp_path: Path, tools: list[McpTool]) -> None:
    """A JSON-RPC error from the server (unknown tool) becomes an error result carrying it."""
    tool = _tool(name="no_such_tool")
    tools.append(tool)
    result = await _call(tool, tmp_path, {})
    assert result.status == "error"
    assert result.value["error"]["code"] == -32602


async def test_is_error_maps_to_error_status(tmp_path: Path, tools: list[McpTool]) -> None:
    """A tools/call result with isError true is returned with status "error" and its content."""
    tool = _tool(name="fail")
    tools.append(tool)
    result = await _call(tool, tmp_path, {})
    assert result.status == "error"
    assert result.value["isError"] is True
    assert _text(result.value) == "the tool failed on purpose"


async def test_tool_name_defaults_to_tether_name(tmp_path: Path, tools: list[McpTool]) -> None:
    """Without `tool`, the MCP tool called is the one named like the Tether tool."""
    tool = build_tool(parse_policy(_policy()).tool("echo"))
    assert isinstance(tool, McpTool)
    tools.append(tool)
    result = await run_tool(tool, _ctx(tmp_path), {"a": 1})
    assert result.status == "ok"
    assert json.loads(_text(result.value)) == {"a": 1}


async def test_server_that_never_starts(tmp_path: Path, tools: list[McpTool]) -> None:
    """A server that exits before the handshake is an error result with its stderr."""
    policy = parse_policy(
        _policy().replace(f'"{SERVER}"', '"-c", "import sys; sys.exit(\\"bad config\\")"')
    )
    tool = build_tool(policy.tool("echo"))
    assert isinstance(tool, McpTool)
    tools.append(tool)
    result = await run_tool(tool, _ctx(tmp_path), {})
    assert result.status == "error"
    assert result.value["error"] == "mcp_server_exited"
    assert "bad config" in result.value["message"]


async def test_startup_timeout(tmp_path: Path, tools: list[McpTool]) -> None:
    """A server that never answers initialize fails after startup_timeout_ms, not the tool's."""
    policy = parse_policy(
        _policy("startup_timeout_ms = 300").replace(
            f'"{SERVER}"', '"-c", "import time; time.sleep(60)"'
        )
    )
    tool = build_tool(policy.tool("echo"))
    assert isinstance(tool, McpTool)
    tools.append(tool)
    result = await run_tool(tool, _ctx(tmp_path), {})
    assert result.status == "error"
    assert result.value["error"] == "mcp_startup_timeout"


async def test_release_lease_stops_server(tmp_path: Path, tools: list[McpTool]) -> None:
    """Ending the lease kills its server, and no call can restart it for that lease."""
    tool = _tool(name="whoami")
    tools.append(tool)
    pid = json.loads(_text((await _call(tool, tmp_path, {})).value))["pid"]
    tool.release_lease("t1", 7)
    assert await _wait_gone(pid)
    with pytest.raises(PolicyDenied, match="has ended"):
        await _call(tool, tmp_path, {})


async def test_aclose_stops_servers(tmp_path: Path) -> None:
    """aclose() shuts every running server down."""
    tool = _tool(name="whoami")
    pid = json.loads(_text((await _call(tool, tmp_path, {})).value))["pid"]
    await tool.aclose()
    assert await _wait_gone(pid)


async def test_non_json_arguments_rejected(tmp_path: Path, tools: list[McpTool]) -> None:
    """Arguments that are not a JSON object are INVALID_ARGUMENT before anything starts."""
    tool = _tool()
    tools.append(tool)
    with pytest.raises(InvalidArgument):
        await _call(tool, tmp_path, {"x": object()})
    assert tool.running("t1", 7) is None


@pytest.mark.parametrize(
    ("extra", "key", "needle"),
    [
        ("bogus = 1", "tools.echo.mcp.bogus", "bogus = 1"),
        ("startup_timeout_ms = 0", "tools.echo.mcp.startup_timeout_ms", "startup_timeout_ms"),
        ('tool = ""', "tools.echo.mcp.tool", 'tool = ""'),
        ("cpu_seconds = true", "tools.echo.mcp.cpu_seconds", "cpu_seconds"),
        ('read_paths = ["relative"]', "tools.echo.mcp.read_paths", "relative"),
    ],
)
def test_policy_errors_name_key_and_line(extra: str, key: str, needle: str) -> None:
    """A bad mcp key is a ConfigError naming the key path and the line it is on."""
    text = _policy(extra).replace(f'read_paths = ["{SERVER.parent}"]\n', "")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    assert info.value.metadata["key"] == key
    assert info.value.metadata["line"] == str(line)


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ('secret_env = { MCP_TOKEN = "mcp_token" }', 'secret_env = { MCP_TOKEN = "nope" }',
         "tools.echo.mcp.secret_env.MCP_TOKEN", "secret_env"),
        ('env = { LANG = "C.UTF-8" }', 'env = { "1BAD" = "x" }', "tools.echo.mcp.env.1BAD",
         "1BAD"),
        ("timeout_ms = 10000", 'timeout_ms = 10000\ncredential = "mcp_token"',
         "tools.echo.credential", "credential ="),
        (f'argv = ["python3", "{SERVER}"]', "argv = []", "tools.echo.mcp.argv", "argv = []"),
    ],
)  # fmt: skip
def test_policy_errors_replace(old: str, new: str, key: str, needle: str) -> None:
    """Wrong mcp values (grants, env names, argv, top-level credential) name key and line."""
    text = _policy().replace(old, new)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    assert info.value.metadata["key"] == key
    assert info.value.metadata["line"] == str(line)


def test_policy_mcp_defaults_and_credentials() -> None:
    """An mcp section parses with defaults, and its secret_env credentials count as the tool's."""
    spec = parse_policy(_policy()).tool("echo")
    assert spec.adapter == "mcp"
    assert spec.mcp is not None
    assert spec.mcp.tool == "echo"
    assert spec.mcp.startup_timeout_ms == 10_000
    assert spec.credentials == ("mcp_token",)


def _e2e_policy() -> str:
    tools = ""
    for name in ("whoami", "env"):
        tools += f"""
[tools.{name}]
adapter = "mcp"
[tools.{name}.mcp]
argv = ["python3", "{SERVER}"]
read_paths = ["{SERVER.parent}"]
secret_env = {{ MCP_TOKEN = "mcp_token" }}
"""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[credentials.mcp_token]
tools = ["whoami", "env"]
{tools}
[queues.work]
tools = ["whoami", "env"]
"""


async def test_end_to_end_server_lives_as_long_as_the_lease(tmp_path: Path) -> None:
    """Through a real sidecar: the vault secret reaches the server redacted; completing kills it."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(_e2e_policy())
        await control.client.put_secret("mcp_token", SECRET)
        await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=2000)
        assert task is not None
        first = await agent.call_tool(task.task_id, "whoami", {})
        second = await agent.call_tool(task.task_id, "whoami", {})
        pid = json.loads(first.result["content"][0]["text"])["pid"]
        assert json.loads(second.result["content"][0]["text"])["pid"] == pid
        env = await agent.call_tool(task.task_id, "env", {})
        assert json.loads(env.result["content"][0]["text"])["MCP_TOKEN"] == "[REDACTED]"
        assert SECRET.decode() not in json.dumps(env.result)
        assert not _gone(pid)
        await agent.complete(task.task_id)
        assert await _wait_gone(pid)
