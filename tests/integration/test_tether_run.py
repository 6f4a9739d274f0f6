"""`tether run` as a process against a real control plane and sidecar.

Plain programs and an unmodified MCP client (the official Python SDK) run as
agents: twenty tasks in a row, a hung command killed at its timeout with its
whole tree, a non-zero exit recorded as failed with the redacted stderr tail,
an artifact uploaded and on the record, a canceled task's command killed, the
stdio bridge for clients that only spawn servers, and a bundle that verifies
with a receipt for every tool call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tether.control.service import ControlConfig
from tether.core.states import State
from tether.testing import start_control, start_sidecar
from tether.verify import verify_bundle
from tether.verify.bundle import bundle_from_proto

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"tether-run-secret-7d1e"

POLICY = """
version = 1
[agents.alice]
queues = ["work", "short"]
[credentials.api_key]
tools = ["echo"]
[tools.echo]
adapter = "python"
credential = "api_key"
description = "Echo the arguments back"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.noop]
adapter = "python"
[tools.noop.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["echo"]
[queues.short]
tools = ["noop"]
lease_ttl_ms = 1500
"""


@asynccontextmanager
async def system(tmp_path: Path, **sidecar: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A control plane (sweeper on, short backoff) and a sidecar serving MCP."""
    sidecar.setdefault("mcp_listen", "127.0.0.1:0")
    async with (
        start_control(
            tmp_path, sweep_interval_ms=200, config=ControlConfig(backoff_base_ms=200)
        ) as cp,
        start_sidecar(tmp_path, cp.address, mcp=True, **sidecar) as side,
    ):
        await cp.client.put_policy(POLICY)
        await cp.client.put_secret("api_key", SECRET)
        yield cp, side


async def tether_run(
    side: Any, tmp_path: Path, *args: str, timeout_s: float = 120
) -> tuple[int, list[dict[str, Any]], str]:
    """Runs `tether run --json ...`; returns (exit code, one dict per task, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.cli", "run", "--json",
        "--socket", str(side.socket), "--token-file", str(tmp_path / "node-1" / "alice.token"),
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return proc.returncode or 0, lines, err.decode(errors="replace")


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


async def bundle_of(cp: Any, side: Any, task_ids: list[str]) -> Any:
    spool = side.sidecar._sink
    assert await spool.wait_acked(spool.last_seq, 15)
    bundle = bundle_from_proto(await cp.client.export_bundle(task_ids))
    report = verify_bundle(bundle, [cp.key.public])
    assert report.ok, [f.to_dict() for f in report.failures]
    return bundle


def predicates(bundle: Any) -> list[dict[str, Any]]:
    return [
        json.loads(base64.b64decode(json.loads(e.envelope)["payload"]))["predicate"]
        for e in bundle.entries
    ]


async def test_twenty_tasks_with_a_plain_program(tmp_path: Path) -> None:
    """A plain program (`tr`) works through 20 tasks: each succeeds with its stdout as result."""
    async with system(tmp_path) as (cp, side):
        ids = [
            (await cp.client.submit("work", f"task number {i}".encode())).task.task_id
            for i in range(20)
        ]
        code, lines, err = await tether_run(
            side, tmp_path, "--queue", "work", "--count", "20", "--", "tr", "a-z", "A-Z"
        )
        assert code == 0, err
        assert [line["state"] for line in lines] == ["succeeded"] * 20
        assert {line["task_id"] for line in lines} == set(ids)
        assert "20 tasks: 20 succeeded" in err
        for i, task_id in enumerate(ids):
            task = (await cp.client.get_task(task_id)).task
            assert task.state == int(State.SUCCEEDED)
            assert task.result == f"TASK NUMBER {i}".encode()


async def test_hung_command_is_killed_at_its_timeout_with_its_whole_tree(tmp_path: Path) -> None:
    """A command that hangs (and leaves a detached grandchild) is killed at --timeout, every
    process of its tree is gone, and the task is failed naming the timeout."""
    pids = tmp_path / "pids"
    script = f"setsid sleep 300 & echo $! > {pids}; echo $$ >> {pids}; sleep 300"
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        code, lines, err = await tether_run(
            side, tmp_path, "--queue", "work", "--timeout", "1.5", "--kill-grace", "0.5",
            "--", "sh", "-c", script,
        )  # fmt: skip
        assert code == 1, err
        [line] = lines
        assert line["stopped"] == "timeout"
        assert line["state"] == "failed"
        task = (await cp.client.get_task(task_id)).task
        assert task.state == int(State.FAILED)
        assert "timed out after 1.5 s" in task.error
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 2
    assert not any(alive(pid) for pid in recorded), recorded


async def test_nonzero_exit_is_failed_with_the_redacted_stderr_tail(tmp_path: Path) -> None:
    """Exit status 3 fails the task; its error carries the stderr tail with the MCP token
    (which the command holds) redacted."""
    script = 'echo "first line" >&2; echo "token=$TETHER_MCP_TOKEN oops" >&2; exit 3'
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        code, lines, _err = await tether_run(
            side, tmp_path, "--queue", "work", "--", "sh", "-c", script
        )
        assert code == 1
        assert lines[0]["exit_code"] == 3
        assert lines[0]["state"] == "failed"
        task = (await cp.client.get_task(task_id)).task
        assert task.state == int(State.FAILED)
        assert "exited with status 3" in task.error
        assert "token=[REDACTED] oops" in task.error
        assert "tmcp_" not in task.error


async def test_artifact_is_uploaded_and_a_missing_one_fails_the_task(tmp_path: Path) -> None:
    """A declared artifact the command writes is uploaded (signed artifact receipt); a task
    whose command did not write it fails; with --exit-when-idle the loop ends when the
    queue is empty."""
    async with system(tmp_path) as (cp, side):
        first = (await cp.client.submit("work", b"report body")).task.task_id
        second = (await cp.client.submit("work", b"")).task.task_id
        script = 'test -s "$TETHER_PAYLOAD_FILE" && cp "$TETHER_PAYLOAD_FILE" report.txt; true'
        code, lines, err = await tether_run(
            side, tmp_path, "--queue", "work", "--count", "0", "--exit-when-idle",
            "--wait-ms", "500", "--artifact", "report.txt", "--", "sh", "-c", script,
        )  # fmt: skip
        assert code == 1, err
        by_id = {line["task_id"]: line for line in lines}
        assert by_id[first]["state"] == "succeeded"
        [artifact] = by_id[first]["artifacts"]
        assert artifact["name"] == "report.txt"
        assert artifact["size"] == len(b"report body")
        assert by_id[second]["state"] == "failed"  # report.txt is from the first task: stale
        assert "declared artifacts not written: report.txt" in by_id[second]["error"]
        stored = side.state_dir / "artifacts" / first / "report.txt"
        assert stored.read_bytes() == b"report body"
        bundle = await bundle_of(cp, side, [first])
    kinds = [p["kind"] for p in predicates(bundle)]
    assert "RECEIPT_KIND_ARTIFACT" in kinds


async def test_canceled_task_kills_the_command(tmp_path: Path) -> None:
    """Canceling a running task ends its lease at the next renewal; `tether run` kills the
    command's tree and does not complete the task."""
    pids = tmp_path / "pids"
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("short", b"{}")).task.task_id
        run = asyncio.create_task(
            tether_run(
                side, tmp_path, "--queue", "short", "--kill-grace", "0.5",
                "--", "sh", "-c", f"echo $$ > {pids}; sleep 300",
            )
        )  # fmt: skip
        for _ in range(200):
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.05)
        await cp.client.cancel(task_id, reason="operator changed their mind")
        code, lines, err = await asyncio.wait_for(run, 60)
        assert code == 1, err
        [line] = lines
        assert line["stopped"] == "canceled"
        assert line["state"] == ""
        task = (await cp.client.get_task(task_id)).task
        assert task.state == int(State.CANCELED)
    assert not alive(int(pids.read_text()))


async def test_mcp_sdk_agent_under_tether_run_http_and_stdio_bridge(tmp_path: Path) -> None:
    """The official-SDK example agent, unmodified, runs under `tether run`: over loopback
    HTTP, and through `tether mcp` (stdio) when the sidecar serves only its Unix socket; it
    lists the lease's tools, its call gets the credential injected and redacted, an
    ungranted tool is refused, and the bundle has a receipt for every call."""
    request = {
        "calls": [
            {"tool": "echo", "arguments": {"text": "hi", "reveal_credentials": True}},
            {"tool": "rm_rf", "arguments": {}},
        ],
        "allow_errors": True,
    }
    agent = [sys.executable, str(ROOT / "examples" / "mcp_python_agent.py")]
    for listen in ("127.0.0.1:0", None):
        base = tmp_path / ("http" if listen else "stdio")
        base.mkdir()
        async with system(base, mcp_listen=listen) as (cp, side):
            task_id = (await cp.client.submit("work", json.dumps(request).encode())).task.task_id
            code, lines, err = await tether_run(side, base, "--queue", "work", "--", *agent)
            assert code == 0, err
            assert lines[0]["state"] == "succeeded"
            task = (await cp.client.get_task(task_id)).task
            out = json.loads(task.result)
            assert out["tools"] == ["echo"]
            echo, refused = out["results"]
            assert not echo["is_error"]
            assert echo["result"]["args"]["text"] == "hi"
            assert echo["result"]["credentials"]["api_key"] == "[REDACTED]"
            assert refused["is_error"]
            assert "rm_rf" in refused["text"]
            assert SECRET not in task.result
            bundle = await bundle_of(cp, side, [task_id])
        calls = [(p["kind"], p.get("tool")) for p in predicates(bundle)]
        assert ("RECEIPT_KIND_TOOL_CALL", "echo") in calls
        assert ("RECEIPT_KIND_TOOL_DENIED", "rm_rf") in calls
        assert calls[-1][0] == "RECEIPT_KIND_TASK_FINISHED"
        assert os.environ.get("TETHER_MCP_TOKEN") is None


async def test_control_plane_attempt_timeout_kills_a_hung_command(tmp_path: Path) -> None:
    """A task submitted with an attempt timeout that its command overruns is ended by the
    control plane; `tether run` learns it at the next heartbeat and kills the command."""
    pids = tmp_path / "pids"
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("short", b"{}", attempt_timeout_ms=1500)).task.task_id
        code, lines, err = await tether_run(
            side, tmp_path, "--queue", "short", "--kill-grace", "0.5",
            "--", "sh", "-c", f"echo $$ > {pids}; sleep 300",
        )  # fmt: skip
        assert code == 1, err
        [line] = lines
        assert line["task_id"] == task_id
        assert line["stopped"] == "attempt_timeout"
        assert line["state"] == ""  # the control plane ended it; not this agent's to complete
    assert not alive(int(pids.read_text()))


async def test_sigterm_stops_the_command_and_leaves_the_task_to_be_retried(
    tmp_path: Path,
) -> None:
    """SIGTERM to `tether run` kills the running command's tree and exits without
    completing the task, which lapses back to the queue like after a crash."""
    pids = tmp_path / "pids"
    async with system(tmp_path) as (cp, side):
        task_id = (await cp.client.submit("short", b"{}")).task.task_id
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tether.cli", "run", "--json", "--queue", "short",
            "--socket", str(side.socket), "--token-file", str(tmp_path / "node-1" / "alice.token"),
            "--kill-grace", "0.5", "--", "sh", "-c", f"echo $$ > {pids}; sleep 300",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for _ in range(200):
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.05)
        proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, err
        [line] = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
        assert line["stopped"] == "interrupted"
        assert not alive(int(pids.read_text()))
        for _ in range(100):  # the lease lapses, the task goes back to the queue
            task = (await cp.client.get_task(task_id)).task
            if task.state == int(State.QUEUED):
                break
            await asyncio.sleep(0.1)
        assert task.state == int(State.QUEUED)  # to be retried: its lease lapsed


async def test_command_environment_holds_the_task_and_never_the_agent_token(
    tmp_path: Path,
) -> None:
    """The command sees its task and lease in the environment, the MCP settings only when
    the sidecar serves MCP, and none of `tether run`'s own TETHER_* settings (the agent
    token file among them)."""
    script = "env | grep '^TETHER_' | cut -d= -f1 | sort; cat \"$TETHER_PAYLOAD_FILE\""
    for mcp in (True, False):
        base = tmp_path / ("mcp" if mcp else "plain")
        base.mkdir()
        async with (
            start_control(base) as cp,
            start_sidecar(base, cp.address, mcp=mcp) as side,
        ):
            await cp.client.put_policy(POLICY)
            task_id = (await cp.client.submit("work", b"-payload-")).task.task_id
            token_file = base / "node-1" / "alice.token"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tether.cli", "run", "--queue", "work",
                "--socket", str(side.socket), "--", "sh", "-c", script,
                env={**os.environ, "TETHER_AGENT_TOKEN_FILE": str(token_file)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err
            task = (await cp.client.get_task(task_id)).task
        names = task.result.decode().split()
        assert names[-1] == "-payload-"
        expected = {
            "TETHER_TASK_ID", "TETHER_QUEUE", "TETHER_ATTEMPT", "TETHER_FENCING_TOKEN",
            "TETHER_PAYLOAD_FILE",
        }  # fmt: skip
        if mcp:
            expected |= {"TETHER_MCP_TOKEN", "TETHER_MCP_URL", "TETHER_MCP_SOCKET"}
            expected |= {"TETHER_MCP_CONFIG"}
        assert set(names[:-1]) == expected
