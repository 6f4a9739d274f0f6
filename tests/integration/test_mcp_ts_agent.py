"""An unmodified MCP client on the official TypeScript SDK against a real sidecar.

examples/mcp-ts-agent/agent.mjs (`@modelcontextprotocol/sdk`) reads a standard
`mcpServers` config, as any MCP host does. It runs under `tether run`, and on
its own with a config written from a claim, so the test can end the lease
between two runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tether.control.service import ControlConfig
from tether.core.states import State
from tether.runner.run import mcp_config
from tether.testing import start_control, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import bundle_from_proto

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "examples" / "mcp-ts-agent"
SECRET = b"ts-agent-secret-0c5a77"

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[credentials.api_key]
tools = ["echo"]
[tools.echo]
adapter = "python"
credential = "api_key"
description = "Echo the arguments back"
input_schema = '{"type": "object", "properties": {"text": {"type": "string"}}}'
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.noop]
adapter = "python"
[tools.noop.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["echo", "noop"]
"""


def _node_missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed"
    if not (AGENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json").exists():
        return (
            "@modelcontextprotocol/sdk not installed (run `npm install` in examples/mcp-ts-agent)"
        )
    return None


pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_node_missing() is not None, reason=str(_node_missing())),
]


async def run(
    *argv: str, stdin: bytes = b"", env: dict[str, str] | None = None, cwd: Path = ROOT
) -> tuple[int, str, str]:
    """Runs a process without blocking the event loop (the servers live in it)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    return proc.returncode or 0, out.decode(), err.decode(errors="replace")


def predicates(bundle: Any) -> list[dict[str, Any]]:
    import base64

    return [
        json.loads(base64.b64decode(json.loads(e.envelope)["payload"]))["predicate"]
        for e in bundle.entries
    ]


async def test_typescript_sdk_client_lists_calls_is_refused_and_receipted(
    tmp_path: Path,
) -> None:
    """The TypeScript SDK client, under `tether run` and on its own, lists exactly the
    lease's tools (with the policy's description and schema), calls one (credential
    injected, redacted, receipted), is refused an ungranted tool and every call after
    the lease ends; the bundle verifies with a receipt for every call."""
    agent = ["node", str(AGENT_DIR / "agent.mjs")]
    request = {
        "calls": [
            {"tool": "echo", "arguments": {"text": "hi", "reveal_credentials": True}},
            {"tool": "drop_tables", "arguments": {}},
        ],
        "allow_errors": True,
    }
    async with (
        start_control(
            tmp_path, sweep_interval_ms=200, config=ControlConfig(backoff_base_ms=200)
        ) as cp,
        start_sidecar(tmp_path, cp.address, mcp=True, mcp_listen="127.0.0.1:0") as side,
    ):
        await cp.client.put_policy(POLICY)
        await cp.client.put_secret("api_key", SECRET)
        under_run = (await cp.client.submit("work", json.dumps(request).encode())).task.task_id
        code, out, err = await run(
            sys.executable, "-m", "tether.cli", "run", "--queue", "work",
            "--socket", str(side.socket), "--token-file", str(tmp_path / "node-1" / "alice.token"),
            "--", *agent,
        )  # fmt: skip
        assert code == 0, err
        task = (await cp.client.get_task(under_run)).task
        assert task.state == int(State.SUCCEEDED)
        result = json.loads(task.result)
        tools = {t["name"]: t for t in result["tools"]}
        assert set(tools) == {"echo", "noop"}
        assert tools["echo"]["description"] == "Echo the arguments back"
        assert tools["echo"]["inputSchema"]["properties"]["text"] == {"type": "string"}
        echo, refused = result["results"]
        assert not echo["is_error"]
        assert echo["result"]["args"]["text"] == "hi"
        assert echo["result"]["credentials"]["api_key"] == "[REDACTED]"
        assert refused["is_error"]
        assert "drop_tables" in refused["text"]
        assert SECRET not in task.result

        # On its own: the lease ends between two runs of the same client and config.
        alone = (await cp.client.submit("work", b"{}")).task.task_id
        async with side.agent("alice") as client:
            claimed = await client.claim("work", wait_ms=5000)
            assert claimed is not None
            assert claimed.task_id == alone
            config = tmp_path / "mcp.json"
            config.write_text(json.dumps(mcp_config(claimed)))
            config.chmod(0o600)
            env = {"TETHER_MCP_CONFIG": str(config)}
            calls = {"calls": [{"tool": "noop", "arguments": {}, "key": "k-1"}]}
            code, out, err = await run(*agent, stdin=json.dumps(calls).encode(), env=env)
            assert code == 0, err
            live = json.loads(out)
            assert [t["name"] for t in live["tools"]] == ["echo", "noop"]
            assert live["results"][0]["meta"]["tether/replayed"] is False
            await client.complete(alone, result=b"done")
        code, out, err = await run(*agent, stdin=json.dumps(calls).encode(), env=env)
        assert code == 1, err
        ended = json.loads(out)
        assert ended["tools"] == []
        assert ended["results"][0]["is_error"]
        assert "LEASE_LOST" in ended["results"][0]["text"]

        spool = side.sidecar._sink
        assert await spool.wait_acked(spool.last_seq, 15)
        bundle = bundle_from_proto(await cp.client.export_bundle([under_run, alone]))
    report = verify_bundle(bundle, [cp.key.public])
    assert report.ok, [f.to_dict() for f in report.failures]
    calls_on_record = [
        (p["taskId"], p["kind"], p.get("tool"))
        for p in predicates(bundle)
        if p["kind"] in ("RECEIPT_KIND_TOOL_CALL", "RECEIPT_KIND_TOOL_DENIED")
    ]
    assert sorted(calls_on_record) == sorted(
        [
            (under_run, "RECEIPT_KIND_TOOL_CALL", "echo"),
            (under_run, "RECEIPT_KIND_TOOL_DENIED", "drop_tables"),
            (alone, "RECEIPT_KIND_TOOL_CALL", "noop"),
        ]
    )


async def test_typescript_sdk_client_through_the_stdio_bridge(tmp_path: Path) -> None:
    """With MCP on the Unix socket only, `tether run` hands the TypeScript client a stdio
    config running `tether mcp`; the client (handshake revision) lists, calls and is
    refused through the bridge."""
    request = {
        "calls": [
            {"tool": "echo", "arguments": {"text": "via stdio"}, "key": "k-1"},
            {"tool": "echo", "arguments": {"text": "via stdio"}, "key": "k-1"},
            {"tool": "drop_tables", "arguments": {}},
        ],
        "allow_errors": True,
    }
    async with (
        start_control(tmp_path) as cp,
        start_sidecar(tmp_path, cp.address, mcp=True) as side,
    ):
        await cp.client.put_policy(POLICY)
        await cp.client.put_secret("api_key", SECRET)
        task_id = (await cp.client.submit("work", json.dumps(request).encode())).task.task_id
        code, _out, err = await run(
            sys.executable, "-m", "tether.cli", "run", "--queue", "work",
            "--socket", str(side.socket), "--token-file", str(tmp_path / "node-1" / "alice.token"),
            "--", "node", str(AGENT_DIR / "agent.mjs"),
        )  # fmt: skip
        assert code == 0, err
        task = (await cp.client.get_task(task_id)).task
    result = json.loads(task.result)
    assert [t["name"] for t in result["tools"]] == ["echo", "noop"]
    first, again, refused = result["results"]
    assert first["result"]["args"] == {"text": "via stdio"}
    assert first["meta"]["tether/replayed"] is False
    assert again["meta"]["tether/replayed"] is True  # the _meta key crossed the bridge
    assert refused["is_error"]
    assert "drop_tables" in refused["text"]
