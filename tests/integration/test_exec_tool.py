"""The exec adapter with real subprocesses: workspace confinement, env, limits, timeout."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tether.core.errors import InvalidArgument, PolicyDenied, ResourceExhausted, ToolTimeout
from tether.core.policy import parse_policy
from tether.sidecar.redaction import Redactor
from tether.sidecar.sandbox import landlock_abi
from tether.sidecar.tools import ToolContext, build_tool, run_tool

SECRET = b"db-pass-5f4e3d2c1b0a"
CANARY = "TETHER_TEST_CANARY_VALUE_31337"

needs_landlock = pytest.mark.skipif(landlock_abi() < 1, reason="kernel without Landlock")


# Fixed (policy-owned) code: a tool that holds a secret must not run the agent's code.
SECRET_TOOL_CODE = """\
import base64, json, os, sys, urllib.parse
if sys.argv[1] == "env":
    print(json.dumps(dict(os.environ)))
    print(os.getcwd())
else:
    s = os.environ["DB_PASSWORD"].encode()
    print(s.decode(), base64.b64encode(b"user:" + s).decode(), s.hex(), urllib.parse.quote(s))
    print(s.decode(), file=sys.stderr)
"""


def _tool(extra: str = "", timeout_ms: int = 10000) -> Any:
    """Runs the agent's code: no secret in its environment (policy refuses that)."""
    policy = parse_policy(f"""\
version = 1
[tools.py]
adapter = "exec"
timeout_ms = {timeout_ms}
[tools.py.exec]
argv = ["python3", "-c", "{{code}}", "{{file}}"]
params = ["code", "file"]
path_params = ["file"]
env = {{ LANG = "C.UTF-8" }}
{extra}
[queues.q]
tools = ["py"]
""")
    return build_tool(policy.tool("py"))


def _secret_tool() -> Any:
    """Runs fixed code with DB_PASSWORD in its environment; the agent picks only a mode."""
    policy = parse_policy(f"""\
version = 1
[credentials.db]
tools = ["report"]
[tools.report]
adapter = "exec"
[tools.report.exec]
argv = ["python3", "-c", {json.dumps(SECRET_TOOL_CODE)}, "{{mode}}"]
params = ["mode"]
env = {{ LANG = "C.UTF-8" }}
secret_env = {{ DB_PASSWORD = "db" }}
[queues.q]
tools = ["report"]
""")
    return build_tool(policy.tool("report"))


def _ctx(workspace: Path, **kw: Any) -> ToolContext:
    return ToolContext(
        task_id="t1",
        attempt=1,
        fencing_token=3,
        agent_id="alice",
        workspace=workspace,
        credentials={"db": SECRET},
        tool_name="py",
        **kw,
    )


def _same_dir(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _is_zombie(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


async def _run(tool: Any, ws: Path, code: str, file: str = "out.txt", **kw: Any) -> Any:
    return await run_tool(tool, _ctx(ws, **kw), {"code": code, "file": file}, Redactor())


async def test_env_holds_only_declared_vars_and_secret_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child sees only policy env + injected secrets, never the sidecar's environment."""
    monkeypatch.setenv("TETHER_CANARY", CANARY)
    result = await run_tool(_secret_tool(), _ctx(tmp_path), {"mode": "env"}, Redactor())
    assert result.status == "ok", result.value
    lines = result.value["stdout"].splitlines()
    env = json.loads(lines[0])
    assert set(env) == {"LANG", "DB_PASSWORD", "TETHER_TASK_ID", "TETHER_FENCING_TOKEN"}
    assert env["DB_PASSWORD"] == "[REDACTED]"
    assert CANARY not in result.value["stdout"]
    assert _same_dir(lines[1], tmp_path)


async def test_secret_used_by_child_but_not_returned(tmp_path: Path) -> None:
    """The child can use its secret (hash it, encode it) yet no form of it reaches the caller."""
    result = await run_tool(_secret_tool(), _ctx(tmp_path), {"mode": "encode"}, Redactor())
    assert result.status == "ok"
    assert not Redactor([SECRET]).contains_secret(result.value)
    assert result.value["stdout"].count("[REDACTED]") == 4


@needs_landlock
async def test_cannot_read_or_write_outside_workspace(tmp_path: Path) -> None:
    """Landlock confines the child: the workspace is writable, nothing else is readable."""
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    code = f"""
import os
results = {{}}
for label, path, mode in [
    ("etc_passwd", "/etc/passwd", "r"), ("outside_read", {str(outside)!r}, "r"),
    ("outside_write", {str(tmp_path / "new.txt")!r}, "w"), ("tmp_write", "/tmp/x-tether", "w"),
    ("sidecar_env", "/proc/1/environ", "r"), ("home", "/root/.bashrc", "r"),
    ("ws_write", "inside.txt", "w"),
]:
    try:
        with open(path, mode) as f:
            f.write("x") if mode == "w" else f.read(1)
        results[label] = "ok"
    except OSError as err:
        results[label] = type(err).__name__
print(results)
"""
    result = await _run(_tool(), ws, code)
    assert result.status == "ok", result.value
    seen = eval(result.value["stdout"])  # the child printed a dict literal
    assert seen.pop("ws_write") == "ok"
    assert all(v != "ok" for v in seen.values()), seen
    assert (ws / "inside.txt").read_text() == "x"
    assert not (tmp_path / "new.txt").exists()
    assert outside.read_text() == "private"


@needs_landlock
async def test_network_denied_without_allowlist(tmp_path: Path) -> None:
    """With no network grant the child cannot open a TCP connection (Landlock ABI >= 4)."""
    if landlock_abi() < 4:
        pytest.skip("Landlock network rules need ABI 4")
    code = (
        "import socket\ntry:\n socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
        " print('connected')\nexcept OSError as e:\n print(type(e).__name__, e.errno)"
    )
    result = await _run(_tool(), tmp_path, code)
    assert result.value["stdout"].strip() == "PermissionError 13"


async def test_path_params_and_undeclared_params_are_refused(tmp_path: Path) -> None:
    """Paths resolving outside the workspace and undeclared parameters are PolicyDenied."""
    tool = _tool()
    for file in ("/etc/passwd", "../x", "a/../../x", "~/x"):
        with pytest.raises(PolicyDenied, match="outside the workspace"):
            await _run(tool, tmp_path, "print(1)", file=file)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(PolicyDenied):
        await _run(tool, tmp_path, "print(1)", file="link/passwd")
    with pytest.raises(PolicyDenied, match="'shell'"):
        await run_tool(tool, _ctx(tmp_path), {"code": "1", "file": "a", "shell": "sh"})
    with pytest.raises(InvalidArgument):
        await run_tool(tool, _ctx(tmp_path), {"code": "1"})
    ok = await _run(tool, tmp_path, "import sys; print(sys.argv[1:])", file="sub/dir/f.txt")
    assert ok.value["stdout"].strip() == "['sub/dir/f.txt']"


async def test_param_is_one_argv_element_not_a_shell(tmp_path: Path) -> None:
    """Shell metacharacters in a parameter arrive verbatim as a single argument."""
    result = await _run(
        _tool(),
        tmp_path,
        "import sys; print(len(sys.argv), sys.argv[1])",
        file="a; rm -rf x $(id) `id`",
    )
    assert result.value["stdout"].strip() == "2 a; rm -rf x $(id) `id`"


async def test_killed_at_timeout_with_its_process_group(tmp_path: Path) -> None:
    """A child past its timeout is killed with its whole process group (no survivors)."""
    code = (
        "import subprocess, time, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('child.pid', 'w').write(str(p.pid))\n"
        "time.sleep(60)"
    )
    with pytest.raises(ToolTimeout):
        await _run(_tool(timeout_ms=1500), tmp_path, code)
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a killed grandchild may linger as a zombie of init until reaped
        if _is_zombie(pid):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("grandchild survived the timeout")


async def test_memory_and_file_size_limits(tmp_path: Path) -> None:
    """Allocating past memory_mb fails inside the child; writing past file_size_mb is stopped."""
    tool = _tool("memory_mb = 64\nfile_size_mb = 1")
    mem = await _run(tool, tmp_path, "x = bytearray(512 * 1024 * 1024); print('allocated')")
    assert mem.status == "error"
    assert "allocated" not in mem.value["stdout"]
    assert "MemoryError" in mem.value["stderr"] or mem.value["signal"] is not None
    big = await _run(tool, tmp_path, "open('big', 'wb').write(b'x' * (4 * 1024 * 1024))")
    assert big.status == "error"
    assert (tmp_path / "big").stat().st_size <= 1024 * 1024


async def test_cpu_limit_and_output_cap(tmp_path: Path) -> None:
    """A CPU-bound child is stopped by RLIMIT_CPU; output over the cap is ResourceExhausted."""
    tool = _tool("cpu_seconds = 1\nmax_output_bytes = 1000")
    cpu = await _run(tool, tmp_path, "while True: pass")
    assert cpu.status == "error"
    assert cpu.value["signal"] in ("SIGXCPU", "SIGKILL")
    with pytest.raises(ResourceExhausted):
        await _run(tool, tmp_path, "print('y' * 5000)")
