"""The Node.js example agent against a real control plane and a real sidecar.

The agent (examples/node-agent/agent.js) loads BrokerService from protos/ at
run time with @grpc/proto-loader, so this test also proves that the wire
contract works for a client that never saw our generated Python code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from control_fixtures import operator_args

from tether.core.states import State
from tether.crypto.pki import Role
from tether.testing import start_control, start_sidecar
from tether.verify.bundle import decode_bundle

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "examples" / "node-agent"

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[tools.echo]
adapter = "python"
cost_micros = 10
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["echo"]
budget_micros = 1000
"""


def _node_missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed"
    for dep in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (AGENT_DIR / "node_modules" / dep / "package.json").exists():
            return f"{dep} not installed (run `npm install` in examples/node-agent)"
    return None


pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_node_missing() is not None, reason=str(_node_missing())),
]


async def _run(*argv: str, cwd: Path = ROOT, timeout_s: float = 60) -> tuple[int, str, str]:
    """Runs a process without blocking the event loop (the servers live in it)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


def _events(stdout: str) -> dict[str, dict[str, Any]]:
    """The agent's JSON events by name (last one wins)."""
    return {e["event"]: e for e in map(json.loads, stdout.splitlines()) if e}


async def test_node_agent_claims_calls_uploads_completes_and_receipts_verify(
    tmp_path: Path,
) -> None:
    """A Node.js agent completes a task end to end, its artifact digest is right and the
    task's exported receipts verify offline."""
    artifact = tmp_path / "report.bin"
    artifact.write_bytes(os.urandom(700_000))  # several PutArtifact chunks
    want = hashlib.sha256(artifact.read_bytes()).hexdigest()
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
    ):
        await control.client.put_policy(POLICY)
        task_id = (await control.client.submit("work", b'{"n": 1}')).task.task_id
        token_file = tmp_path / "node-1" / "alice.token"
        code, out, err = await _run(
            "node", str(AGENT_DIR / "agent.js"),
            "--socket", str(side.socket), "--token-file", str(token_file),
            "--queue", "work", "--wait-ms", "5000",
            "--tool", "echo", "--tool-args", '{"hello": "node"}',
            "--artifact-name", "report.bin", "--artifact-file", str(artifact),
        )  # fmt: skip
        assert code == 0, (out, err)
        events = _events(out)
        assert events["claimed"]["task_id"] == task_id
        assert events["tool"]["status"] == "ok"
        assert events["tool"]["result"]["args"] == {"hello": "node"}
        assert events["artifact"]["sha256"] == want
        assert int(events["artifact"]["size"]) == artifact.stat().st_size
        assert events["completed"]["state"] == "TASK_STATE_SUCCEEDED"
        task = (await control.client.get_task(task_id)).task
        assert task.state == int(State.SUCCEEDED)

        pub = tmp_path / "control.pub"
        pub.write_bytes(control.key.public.pem())
        bundle = tmp_path / "bundle.json"
        code, out, err = await _run(
            sys.executable, "-m", "tether.cli", "receipts", "export",
            *operator_args(control, Role.AUDITOR), "--task", task_id, "--out", str(bundle),
        )  # fmt: skip
        assert code == 0, err
        code, out, err = await _run(
            sys.executable, "-m", "tether.cli", "verify", str(bundle), "--trust", str(pub),
        )  # fmt: skip
    assert code == 0, out + err
    assert "VALID" in out
    digests = {
        subject["digest"]["sha256"]
        for entry in decode_bundle(bundle.read_bytes()).entries
        for subject in json.loads(base64.b64decode(json.loads(entry.envelope)["payload"])).get(
            "subject", []
        )
    }
    assert want in digests  # the signed artifact receipt names the uploaded bytes
