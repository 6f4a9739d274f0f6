"""Policy fields no other test shows enforced, each proved at the point of action.

Real control plane, real sidecar, real confined processes: every field here either
stops a call, refuses a grant or decides what runs, and the effect is observed
outside the sidecar (the task's state, files, what a tool was given). The map from
schema fields to these tests is tests/unit/test_policy_coverage.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tether.agent import AgentClient, Task
from tether.core import errors as E
from tether.core.states import State
from tether.sidecar.sandbox import landlock_abi
from tether.testing import ControlHandle, SidecarHandle, start_control, start_sidecar

needs_sandbox = pytest.mark.skipif(landlock_abi() < 1, reason="kernel without Landlock")

SECRET = b"tok-policy-enforcement-7c1d9e"

# A small stdio MCP server (stdlib only) whose tools push against one limit each.
MCP_SERVER = r"""
import errno, json, os, sys, time

def text(value, error=False):
    value = value if isinstance(value, str) else json.dumps(value)
    return {"content": [{"type": "text", "text": value}], "isError": error}

def call(name, args):
    if name == "echo":
        return text({"called": name, "args": args})
    if name == "burn":
        while True:
            pass
    if name == "alloc":
        try:
            block = bytearray(args["mb"] * 1024 * 1024)
        except MemoryError:
            return text("MemoryError", error=True)
        return text(f"allocated {len(block)}")
    if name == "write":
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (args["mb"] * 1024 * 1024))
        except OSError as err:
            return text(errno.errorcode[err.errno], error=True)
        return text("written")
    if name == "big":
        return text("y" * args["n"])
    if name == "fork":
        pids, code = [], ""
        try:
            for _ in range(1000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                pids.append(pid)
        except OSError as err:
            code = errno.errorcode[err.errno]
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        return text({"forked": len(pids), "errno": code})
    return text(f"unknown tool {name}", error=True)

for line in sys.stdin:
    if not line.strip():
        continue
    msg = json.loads(line)
    rid, params = msg.get("id"), msg.get("params") or {}
    if rid is None:
        continue
    if msg.get("method") == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "limits", "version": "1"},
        }
    else:
        result = call(params.get("name"), params.get("arguments") or {})
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}) + "\n")
    sys.stdout.flush()
"""


def mcp_server(tmp_path: Path) -> Path:
    """Writes the limits MCP server under tmp_path/mcp and returns its path."""
    path = tmp_path / "mcp" / "server.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MCP_SERVER)
    return path


def document(tools: str, *, queue: str = "", tool_names: tuple[str, ...] = ()) -> str:
    """A policy where alice may claim from "work", which grants `tool_names`."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
{tools}
[queues.work]
tools = {json.dumps(list(tool_names))}
{queue}
"""


def mcp_tool(name: str, server: Path, mcp_tool_name: str, extra: str = "") -> str:
    """An mcp tool `name` running `server`, proxying `mcp_tool_name`, with `extra` keys."""
    return f"""
[tools.{name}]
adapter = "mcp"
timeout_ms = 20000
[tools.{name}.mcp]
argv = ["python3", "{server}"]
tool = "{mcp_tool_name}"
read_paths = ["{server.parent}"]
{extra}
"""


@dataclass
class Session:
    """A control plane and sidecar under one policy, and alice holding one task of "work"."""

    control: ControlHandle
    side: SidecarHandle
    agent: AgentClient
    task: Task
    claim_sent_ms: int
    """Wall-clock time just before the claim was sent (same clock as the control plane's)."""

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def workspace(self) -> Path:
        return self.side.state_dir / "workspaces" / self.task_id

    async def call(self, tool: str, args: dict[str, Any] | None = None) -> Any:
        return await self.agent.call_tool(self.task_id, tool, args or {})


@contextlib.asynccontextmanager
async def session(tmp_path: Path, policy: str, **sidecar: Any) -> AsyncIterator[Session]:
    """Starts both servers under `policy`, submits one task and has alice claim it."""
    async with (
        start_control(tmp_path, policy=policy, sweep_interval_ms=100) as control,
        start_sidecar(tmp_path, control.address, **sidecar) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_secret("tok", SECRET)
        await control.client.submit("work", b"{}")
        before_ms = time.time_ns() // 1_000_000
        task = await agent.claim("work", wait_ms=2000)
        assert task is not None
        yield Session(control, side, agent, task, before_ms)


def mcp_text(out: Any) -> str:
    return str(out.result["content"][0]["text"])


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Polls `predicate` until true; fails after `timeout_s` (a hang guard, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def task_of(control: ControlHandle, task_id: str) -> Any:
    return (await control.client.get_task(task_id)).task


async def settled(control: ControlHandle, task_id: str) -> Any:
    """The task once it has left LEASED and RUNNING (its lease lapsed and was swept)."""

    async def left() -> bool:
        return (await task_of(control, task_id)).state not in (State.LEASED, State.RUNNING)

    await until(left)
    return await task_of(control, task_id)


# --------------------------------------------------------------------------- document


async def test_policy_of_another_version_is_refused_and_the_old_one_stays(
    tmp_path: Path,
) -> None:
    """A document whose `version` is not 1 (or absent) is refused at apply; the policy in
    force is unchanged."""
    doc = document("", tool_names=())
    async with start_control(tmp_path, policy=doc) as cp:
        before = await cp.client.get_policy()
        for bad in (doc.replace("version = 1", "version = 2"), doc.replace("version = 1", "")):
            with pytest.raises(E.InvalidArgument, match="version"):
                await cp.client.put_policy(bad)
        after = await cp.client.get_policy()
        assert (after.version, after.digest) == (before.version, before.digest)


# --------------------------------------------------------------------------- credentials

CREDENTIAL_TOOLS = """
[credentials.tok]
tools = ["holder", "bystander"]
[tools.holder]
adapter = "python"
credential = "tok"
[tools.holder.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.bystander]
adapter = "python"
[tools.bystander.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
"""


async def test_credential_reaches_only_the_tool_that_declares_it(tmp_path: Path) -> None:
    """A tool gets a credential only when its own `credential` names it: being listed in
    the credential's `tools` is not enough."""
    policy = document(CREDENTIAL_TOOLS, tool_names=("holder", "bystander"))
    async with session(tmp_path, policy) as s:
        holder = await s.call("holder", {"reveal_credentials": True})
        bystander = await s.call("bystander", {"reveal_credentials": True})
        assert set(holder.result["credentials"]) == {"tok"}
        assert bystander.result["credentials"] == {}
        for out in (holder, bystander):
            assert SECRET.decode() not in json.dumps(out.result)


async def test_credential_not_listing_the_tool_is_refused_at_apply_and_at_issue(
    tmp_path: Path,
) -> None:
    """A tool naming a credential whose `tools` omit it is refused at apply, and the vault
    issues a credential only for a tool its `tools` list."""
    outsider = '[tools.outsider]\nadapter = "python"\n[tools.outsider.python]\n'
    outsider += 'entrypoint = "tether.sidecar.tools.builtin:echo"\n'
    good = document(CREDENTIAL_TOOLS + outsider, tool_names=("holder", "bystander", "outsider"))
    bad = good.replace('tools = ["holder", "bystander"]', 'tools = ["bystander"]')
    async with start_control(tmp_path, policy=good) as cp:
        before = await cp.client.get_policy()
        with pytest.raises(E.InvalidArgument, match=r"does not list tool 'holder'"):
            await cp.client.put_policy(bad)
        assert (await cp.client.get_policy()).digest == before.digest
        await cp.client.put_secret("tok", SECRET)
        await cp.client.submit("work", b"{}")
        node = await cp.node_client("node-x")
        try:
            task = (await node.acquire_lease("work", "node-x", "alice")).task
            tid, token = task.task_id, task.fencing_token
            issued = await node.issue_credential(tid, token, "tok", "holder", "node-x")
            assert issued.value == SECRET
            with pytest.raises(E.PolicyDenied, match="'outsider'"):
                await node.issue_credential(tid, token, "tok", "outsider", "node-x")
        finally:
            await node.close()


# --------------------------------------------------------------------------- python


async def test_python_config_comes_from_policy_not_from_the_agent(tmp_path: Path) -> None:
    """A python tool's `config` reaches it from policy and the agent's arguments cannot
    override it: append_line writes to the configured path, not the file the agent names."""
    shared = tmp_path / "configured.txt"
    tools = f"""
[tools.pinned]
adapter = "python"
[tools.pinned.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.free]
adapter = "python"
[tools.free.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
"""
    async with session(tmp_path, document(tools, tool_names=("pinned", "free"))) as s:
        await s.call("pinned", {"line": "policy-path", "file": "chosen.txt"})
        await s.call("free", {"line": "agent-path", "file": "chosen.txt"})
        assert shared.read_text().splitlines() == ["policy-path"]
        assert (s.workspace / "chosen.txt").read_text().splitlines() == ["agent-path"]


# --------------------------------------------------------------------------- queue limits

ECHO_TOOL = """
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
"""


async def test_queue_lease_ttl_ms_bounds_a_silent_holder(tmp_path: Path) -> None:
    """A task submitted without a TTL gets the queue's `lease_ttl_ms`: the grant ends that
    long after the claim, and a holder that goes quiet loses it then, not at 30 s."""
    queue = "lease_ttl_ms = 1000\nmax_attempts = 3"
    policy = document(ECHO_TOOL, queue=queue, tool_names=("echo",))
    async with session(tmp_path, policy, agent_liveness_ms=200) as s:
        assert (await s.control.client.get_task(s.task_id)).task.lease_ttl_ms == 1000
        assert s.task.lease_expires_unix_ms - s.claim_sent_ms < 5000
        held = next(iter(s.side.sidecar.deps.leases))

        async def lost() -> bool:
            return bool(held.lost_reason)

        await until(lost)  # 10 s at most: well before the 30 s default TTL
        with pytest.raises(E.LeaseLost):
            await s.call("echo")
        got = await settled(s.control, s.task_id)
        assert got.state == State.QUEUED  # lapsed, with attempts left


async def test_queue_max_attempts_expires_the_task(tmp_path: Path) -> None:
    """With the queue's `max_attempts = 1` a lapsed lease ends the task EXPIRED instead of
    requeueing it, and no agent can claim it again."""
    queue = "lease_ttl_ms = 1000\nmax_attempts = 1"
    policy = document(ECHO_TOOL, queue=queue, tool_names=("echo",))
    async with session(tmp_path, policy, agent_liveness_ms=200) as s:
        assert (await s.control.client.get_task(s.task_id)).task.max_attempts == 1
        got = await settled(s.control, s.task_id)
        assert (got.state, got.attempt) == (State.EXPIRED, 1)
        assert await s.agent.claim("work", wait_ms=300) is None


# --------------------------------------------------------------------------- exec


@needs_sandbox
async def test_exec_read_paths_are_the_only_extra_readable_paths(tmp_path: Path) -> None:
    """An exec tool reads a file outside its workspace only through `read_paths`, and even
    then cannot write there."""
    data = tmp_path / "ro"
    data.mkdir()
    (data / "fact.txt").write_text("granted-fact\n")
    cat = shutil.which("cat") or "/bin/cat"
    touch = shutil.which("touch") or "/usr/bin/touch"
    tools = f"""
[tools.cat_granted]
adapter = "exec"
[tools.cat_granted.exec]
argv = ["{cat}", "{data / "fact.txt"}"]
read_paths = ["{data}"]
[tools.cat_plain]
adapter = "exec"
[tools.cat_plain.exec]
argv = ["{cat}", "{data / "fact.txt"}"]
[tools.touch_granted]
adapter = "exec"
[tools.touch_granted.exec]
argv = ["{touch}", "{data / "new.txt"}"]
read_paths = ["{data}"]
"""
    names = ("cat_granted", "cat_plain", "touch_granted")
    async with session(tmp_path, document(tools, tool_names=names)) as s:
        granted = await s.call("cat_granted")
        assert (granted.status, granted.result["stdout"]) == ("ok", "granted-fact\n")
        plain = await s.call("cat_plain")
        assert plain.status == "error"
        assert "No such file" in plain.result["stderr"]  # not even there to be refused
        assert "granted-fact" not in json.dumps(plain.result)
        touched = await s.call("touch_granted")
        assert touched.status == "error"
        assert not (data / "new.txt").exists()


# --------------------------------------------------------------------------- mcp


@needs_sandbox
async def test_mcp_read_paths_decide_whether_the_server_can_be_read(tmp_path: Path) -> None:
    """An MCP server outside the system tree runs only when `read_paths` grants its
    directory; without the grant it cannot even be read."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("granted", server, "echo") + mcp_tool("plain", server, "echo").replace(
        f'read_paths = ["{server.parent}"]\n', ""
    )
    async with session(tmp_path, document(tools, tool_names=("granted", "plain"))) as s:
        ok = await s.call("granted", {"x": 1})
        assert json.loads(mcp_text(ok)) == {"called": "echo", "args": {"x": 1}}
        refused = await s.call("plain", {"x": 1})
        assert refused.status == "error"
        assert refused.result["error"] == "mcp_server_exited"
        assert "No such file" in refused.result["message"]


@needs_sandbox
async def test_mcp_tool_is_fixed_by_policy_not_by_the_agent(tmp_path: Path) -> None:
    """The MCP tool called is the policy's `tool`: an agent naming another server tool in
    its arguments still reaches only that one."""
    server = mcp_server(tmp_path)
    async with session(tmp_path, document(mcp_tool("m", server, "echo"), tool_names=("m",))) as s:
        args = {"name": "burn", "tool": "burn", "method": "tools/call"}
        out = await s.call("m", args)
        assert out.status == "ok"
        assert json.loads(mcp_text(out)) == {"called": "echo", "args": args}


@needs_sandbox
async def test_mcp_cpu_seconds_stops_the_server(tmp_path: Path) -> None:
    """A server that spins past its `cpu_seconds` is killed by RLIMIT_CPU and the call is an
    error result naming the exit."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("m", server, "burn", "cpu_seconds = 1")
    async with session(tmp_path, document(tools, tool_names=("m",))) as s:
        started = time.monotonic()
        out = await s.call("m")
        assert out.status == "error"
        assert out.result["error"] == "mcp_server_exited"
        assert "SIGXCPU" in out.result["message"] or "SIGKILL" in out.result["message"]
        # The limit, not the 20 s call timeout, ended it (a loaded CI machine may take a while
        # to spend one CPU second, so the bound is the timeout, not a guess at the load).
        assert time.monotonic() - started < 19


@needs_sandbox
async def test_mcp_memory_mb_caps_the_servers_address_space(tmp_path: Path) -> None:
    """Under `memory_mb = 64` a server can allocate 8 MiB but not 256 MiB."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("m", server, "alloc", "memory_mb = 64")
    async with session(tmp_path, document(tools, tool_names=("m",))) as s:
        small = await s.call("m", {"mb": 8})
        assert mcp_text(small) == f"allocated {8 * 1024 * 1024}"
        big = await s.call("m", {"mb": 256})
        assert big.status == "error"
        assert "MemoryError" in json.dumps(big.result)


@needs_sandbox
async def test_mcp_file_size_mb_stops_a_large_write(tmp_path: Path) -> None:
    """Under `file_size_mb = 1` a server's 4 MiB write fails with EFBIG and leaves at most
    1 MiB in the workspace."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("m", server, "write", "file_size_mb = 1")
    async with session(tmp_path, document(tools, tool_names=("m",))) as s:
        out = await s.call("m", {"mb": 4})
        assert out.status == "error"
        assert mcp_text(out) == "EFBIG"
        assert (s.workspace / "big.bin").stat().st_size <= 1024 * 1024


@needs_sandbox
async def test_mcp_max_output_bytes_refuses_a_larger_message(tmp_path: Path) -> None:
    """A server reply longer than `max_output_bytes` is RESOURCE_EXHAUSTED; a shorter one
    passes."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("m", server, "big", "max_output_bytes = 4096")
    async with session(tmp_path, document(tools, tool_names=("m",))) as s:
        assert mcp_text(await s.call("m", {"n": 1000})) == "y" * 1000
        with pytest.raises(E.ResourceExhausted, match="max_output_bytes"):
            await s.call("m", {"n": 10_000})


@needs_sandbox
async def test_mcp_max_processes_stops_a_fork_bomb(tmp_path: Path) -> None:
    """Under `max_processes = 16` a server's fork loop gets EAGAIN before 16 children."""
    server = mcp_server(tmp_path)
    tools = mcp_tool("m", server, "fork", "max_processes = 16")
    async with session(tmp_path, document(tools, tool_names=("m",))) as s:
        seen = json.loads(mcp_text(await s.call("m")))
        assert seen["errno"] == "EAGAIN", seen
        assert 0 < seen["forked"] < 16
