"""Shared pieces of the control-plane vault/budget/idempotency tests (not a test module)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tether.control.client import ControlClient
from tether.testing import ControlHandle
from tether.v1 import control_pb2 as pb

POLICY = """\
version = 1

[agents.alice]
queues = ["work", "other"]

[credentials.api_token]
tools = ["fetch", "fetch_other"]

[credentials.missing_token]
tools = ["fetch_missing"]

[tools.fetch]
adapter = "http"
credential = "api_token"
[tools.fetch.http]
base_url = "http://127.0.0.1:9/api"

[tools.fetch_other]
adapter = "http"
credential = "api_token"
[tools.fetch_other.http]
base_url = "http://127.0.0.1:9/api"

[tools.fetch_missing]
adapter = "http"
credential = "missing_token"
[tools.fetch_missing.http]
base_url = "http://127.0.0.1:9/api"

[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"

[queues.work]
tools = ["fetch", "fetch_missing", "echo"]
network_allowlist = ["127.0.0.1:9"]
budget_micros = 1000

[queues.other]
tools = ["fetch_other"]
network_allowlist = ["127.0.0.1:9"]
"""

SHA_A = "a" * 64
SHA_B = "b" * 64


async def leased(
    cp: ControlHandle,
    node: ControlClient,
    *,
    queue: str = "work",
    node_id: str = "node-1",
    budget_limit_micros: int = 0,
) -> pb.Task:
    """Submits one task to `queue` and leases it to `node_id`."""
    await cp.client.submit(queue, b"{}", budget_limit_micros=budget_limit_micros)
    resp = await node.acquire_lease(queue, node_id, "alice")
    assert resp.HasField("task")
    return resp.task


async def run_cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Runs `python -m tether.cli ARGS` without blocking the event loop (servers run in it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def db_bytes(db: Path) -> bytes:
    """Every byte of a SQLite database, its WAL and shared-memory file."""
    out = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(str(db) + suffix)
        if path.exists():
            out += path.read_bytes()
    return out
