"""Shared pieces of the control-plane vault/budget/idempotency tests (not a test module)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from tether.control.client import ControlClient
from tether.crypto.pki import CertificateAuthority, Role, cert_pem, generate_tls_key, key_pem
from tether.grpcutil.tls import ClientTLS
from tether.testing import ControlEndpoint, ControlHandle
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


def operator_args(target: ControlHandle | ControlEndpoint, role: Role = Role.ADMIN) -> list[str]:
    """--control/--tls-ca/--tls-cert/--tls-key for an operator CLI command with `role`."""
    cert, key = target.pki.write_operator(role)
    return [
        "--control", target.address, "--tls-ca", str(target.pki.trust_bundle),
        "--tls-cert", str(cert), "--tls-key", str(key),
    ]  # fmt: skip


def unenrolled_node_tls(
    cp: ControlHandle, node_id: str, ca: CertificateAuthority | None = None
) -> ClientTLS:
    """A node certificate for `node_id` that no enrolment gave out (issued by `ca`, default
    the control plane's own CA): what a made-up node credential looks like now."""
    key = generate_tls_key()
    cert = (ca or cp.pki.ca).issue_node(
        node_id, "0" * 16, key.public_key(), int(time.time() * 1000)
    )
    return ClientTLS(cert_pem(cp.pki.ca.cert), cert_pem(cert), key_pem(key))


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


async def export_and_verify(
    control: ControlHandle, tmp_path: Path, tasks: list[str], *flags: str
) -> tuple[int, str]:
    """Exports `tasks` and runs the real `tether verify` on the file (offline); retries for
    up to 20 s while the receipts are still streaming to the ledger. (exit code, output)"""
    from tether.verify import encode_bundle
    from tether.verify.bundle import bundle_from_proto

    path = tmp_path / "bundle.json"
    pub = tmp_path / "control.pub"
    pub.write_bytes(control.key.public.pem())
    deadline = time.monotonic() + 20
    while True:
        bundle = bundle_from_proto(await control.client.export_bundle(tasks))
        path.write_bytes(encode_bundle(bundle))
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tether.cli", "verify", str(path), "--trust", str(pub), *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode == 0 or time.monotonic() > deadline:
            return done.returncode, done.stdout + done.stderr
        await asyncio.sleep(0.5)
