"""Python tools, the builtin tools and run_tool's timeout and redaction guarantees."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tether.core.errors import ConfigError, PolicyDenied, ToolTimeout
from tether.core.policy import parse_policy
from tether.sidecar.redaction import Redactor
from tether.sidecar.tools import Tool, ToolContext, build_tool, run_tool

SECRET = b"py-secret-abcdef123456"


def _policy(shared: Path) -> Any:
    return parse_policy(f"""\
version = 1
[credentials.key]
tools = ["echo"]
[tools.echo]
adapter = "python"
credential = "key"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.append]
adapter = "python"
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.local_append]
adapter = "python"
[tools.local_append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
[tools.sleep]
adapter = "python"
timeout_ms = 200
[tools.sleep.python]
entrypoint = "tether.sidecar.tools.builtin:sleep"
[tools.crash]
adapter = "python"
[tools.crash.python]
entrypoint = "{__name__}:crash"
[queues.q]
tools = ["echo", "append", "local_append", "sleep"]
""")


def crash(ctx: ToolContext, args: Any) -> None:
    """A tool that fails with its secret in the exception message."""
    raise RuntimeError(f"boom with {ctx.credentials['key'].decode()}")


def _ctx(ws: Path) -> ToolContext:
    return ToolContext(
        task_id="t",
        attempt=1,
        fencing_token=1,
        agent_id="a",
        workspace=ws,
        credentials={"key": SECRET},
    )


async def test_echo_revealing_credentials_is_redacted(tmp_path: Path) -> None:
    """Even a tool that returns its credentials raw and base64 hands the caller no secret."""
    tool = build_tool(_policy(tmp_path / "s").tool("echo"))
    assert isinstance(tool, Tool)
    result = await run_tool(tool, _ctx(tmp_path), {"reveal_credentials": True, "x": 1})
    assert result.value["args"] == {"reveal_credentials": True, "x": 1}
    assert result.value["credentials"] == {"key": "[REDACTED]"}
    assert not Redactor([SECRET]).contains_secret(result.value)
    assert base64.b64encode(SECRET).decode() not in str(result.value)
    assert "py-secret" not in repr(_ctx(tmp_path))


async def test_crash_becomes_redacted_error_result(tmp_path: Path) -> None:
    """A tool exception is an error result whose message has the secret redacted."""
    tool = build_tool(_policy(tmp_path / "s").tool("crash"))
    result = await run_tool(tool, _ctx(tmp_path), {})
    assert result.status == "error"
    assert result.value == {"error": "RuntimeError", "message": "boom with [REDACTED]"}


async def test_timeout_is_tool_timeout(tmp_path: Path) -> None:
    """A tool running past its policy timeout raises ToolTimeout naming the tool."""
    tool = build_tool(_policy(tmp_path / "s").tool("sleep"))
    with pytest.raises(ToolTimeout, match="'sleep'"):
        await run_tool(tool, _ctx(tmp_path), {"seconds": 5})


async def test_append_line_uses_policy_path_or_workspace(tmp_path: Path) -> None:
    """append_line writes to the policy-configured file, or inside the workspace only."""
    shared = tmp_path / "shared" / "log.txt"
    policy = _policy(shared)
    append = build_tool(policy.tool("append"))
    out = await run_tool(append, _ctx(tmp_path / "ws1"), {"line": "hello"})
    out = await run_tool(append, _ctx(tmp_path / "ws2"), {"line": "again"})
    assert out.value["lines"] == 2
    assert shared.read_text() == "hello\nagain\n"
    local = build_tool(policy.tool("local_append"))
    ws = tmp_path / "ws3"
    ws.mkdir()
    await run_tool(local, _ctx(ws), {"line": "x", "file": "a.txt"})
    assert (ws / "a.txt").read_text() == "x\n"
    with pytest.raises(PolicyDenied):
        await run_tool(local, _ctx(ws), {"line": "x", "file": "../escape.txt"})


def test_bad_entrypoint_is_config_error(tmp_path: Path) -> None:
    """An entrypoint that cannot be imported fails when the tool is built."""
    policy = parse_policy(
        'version = 1\n[tools.t]\nadapter = "python"\n[tools.t.python]\n'
        'entrypoint = "tether.nope:fn"\n[queues.q]\ntools = ["t"]\n'
    )
    with pytest.raises(ConfigError):
        build_tool(policy.tool("t"))
