"""Secret leak scan: credentials go through every adapter and come out nowhere.

The control plane runs as the real CLI (its log is a file), secrets are put with
`tether secrets put` reading stdin, the policy with `tether policy apply`, and the
sidecar runs in-process with every log record captured at DEBUG. A real HTTP
server echoes its request headers back (raw and encoded), an exec tool prints its
environment, and the python echo tool reveals its credentials. Then every byte the
agent received (responses and error statuses), every log line, the control-plane
database (with -wal/-shm) and every file under the test's directory are searched
for each secret in raw, base64 and URL-encoded form: zero hits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import grpc
import pytest
from control_fixtures import operator_args

from tether.agent import AGENT_TOKEN_HEADER
from tether.testing import endpoint, spawn_control_cli, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

FORBIDDEN_ENV = "TETHER_LEAK_SCAN_SIDECAR_ENV"


def forms(secret: bytes) -> set[bytes]:
    """The secret raw, URL-encoded, hex and base64 (alone or inside a larger blob)."""
    out = {secret, secret.hex().encode()}
    for text in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        out.add(text.encode())
    n = len(secret)
    for k in range(3):  # every byte alignment, only chars fully determined by the secret
        encoded = base64.b64encode(b"\0" * k + secret + b"\0\0")
        fragment = encoded[-(-8 * k // 6) : (8 * k + 8 * n) // 6]
        out.add(fragment)
        out.add(fragment.translate(bytes.maketrans(b"+/", b"-_")))
    return out


def hits(data: bytes, secrets_: list[bytes]) -> list[str]:
    """Which forms of which secrets occur in `data` (names only, never the values)."""
    found = []
    for i, secret in enumerate(secrets_):
        for form in forms(secret):
            if form in data:
                found.append(f"secret #{i} as {len(form)}-byte form")
    return found


class _Echo(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path.startswith("/api/redirect-off"):
            self._reply(302, b"", {"Location": "http://evil.example.invalid:8443/steal"})
            return
        auth = self.headers.get("Authorization", "")
        body = json.dumps(
            {
                "headers": dict(self.headers),
                "auth_b64": base64.b64encode(auth.encode()).decode(),
                "auth_url": quote(auth, safe=""),
            }
        ).encode()
        self._reply(
            200,
            body,
            {"Content-Type": "application/json", "X-Echo-Auth": auth, "X-Url": quote(auth)},
        )


@pytest.fixture
def echo_server() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A real HTTP server on 127.0.0.1:0 that echoes every request header back."""
    seen: list[dict[str, str]] = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Echo,), {"seen": seen}))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1], seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def policy(port: int) -> str:
    code = (
        "import base64, json, os, sys, urllib.parse\n"
        "v = os.environ['DB_PASSWORD']\n"
        "print(json.dumps(dict(os.environ)))\n"
        "print(base64.b64encode(v.encode()).decode(), urllib.parse.quote(v, safe=''))\n"
        "sys.stderr.write('failed with password ' + v)\n"
        "sys.exit(3)\n"
    )
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[credentials.api_token]
tools = ["fetch", "reveal"]
[credentials.db_password]
tools = ["printenv"]
[tools.fetch]
adapter = "http"
credential = "api_token"
[tools.fetch.http]
base_url = "http://127.0.0.1:{port}/api"
follow_redirects = true
[tools.printenv]
adapter = "exec"
[tools.printenv.exec]
argv = ["python3", "-c", {json.dumps(code)}]
secret_env = {{ DB_PASSWORD = "db_password" }}
[tools.reveal]
adapter = "python"
credential = "api_token"
[tools.reveal.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["fetch", "printenv", "reveal"]
network_allowlist = ["127.0.0.1:{port}"]
"""


def cli(*args: str, stdin: bytes = b"") -> bytes:
    """Runs `tether ARGS`; returns stdout+stderr (scanned too)."""
    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout + done.stderr


class Agent:
    """A raw Broker client that keeps every byte it receives, errors included."""

    def __init__(self, socket: Path, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self.stub = bpb_grpc.BrokerServiceStub(self.channel)
        self.md = ((AGENT_TOKEN_HEADER, token),)
        self.received = bytearray()
        self.calls = 0

    async def call(self, method: str, request: Any) -> Any:
        try:
            response = await getattr(self.stub, method)(request, metadata=self.md, timeout=30)
        except grpc.aio.AioRpcError as err:
            self.received += (err.details() or "").encode()
            for key, value in (*(err.trailing_metadata() or ()), *(err.initial_metadata() or ())):
                self.received += key.encode() + (
                    value if isinstance(value, bytes) else value.encode()
                )
            raise
        self.received += response.SerializeToString()
        return response

    async def tool(self, task_id: str, tool: str, args: dict[str, Any]) -> Any:
        # Keyed, so each outcome is also kept where keyed outcomes go (the spool, with
        # its receipt, and the control plane's idempotency records) and scanned there.
        self.calls += 1
        request = bpb.CallToolRequest(
            task_id=task_id,
            tool=tool,
            arguments_json=json.dumps(args),
            idempotency_key=f"leak-{self.calls}",
        )
        return await self.call("CallTool", request)


def scan_files(root: Path, secrets_: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            problems = hits(path.read_bytes(), secrets_)
            if problems:
                found[str(path.relative_to(root))] = problems
    return found


async def test_no_secret_reaches_agent_logs_database_or_files(
    tmp_path: Path,
    echo_server: tuple[int, list[dict[str, str]]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets used by http, exec and python tools appear in no response, log, db or file."""
    caplog.set_level(logging.DEBUG)
    port, seen = echo_server
    api_token = f"tok-{secrets.token_hex(12)}/+=?&".encode()
    db_password = f"pw {secrets.token_hex(12)}%$#".encode()
    all_secrets = [api_token, db_password]
    # The sidecar's own environment must not reach exec tools either.
    monkeypatch.setenv(FORBIDDEN_ENV, "sidecar-only-value-4f2a")

    proc, address = spawn_control_cli(tmp_path)
    outputs = bytearray()
    try:
        admin = operator_args(endpoint(address))
        outputs += cli("secrets", "put", "api_token", *admin, stdin=api_token)
        outputs += cli("secrets", "put", "db_password", *admin, stdin=db_password)
        policy_file = tmp_path / "policy.toml"
        policy_file.write_text(policy(port))
        outputs += cli("policy", "apply", str(policy_file), *admin)
        async with endpoint(address).admin() as client:
            submitted = await client.submit("work", b"{}")
        tid = submitted.task.task_id

        async with start_sidecar(tmp_path, address) as side:
            agent = Agent(side.socket, side.tokens["alice"])
            try:
                claimed = await agent.call("ClaimTask", bpb.ClaimTaskRequest(queue="work"))
                assert claimed.task.task_id == tid
                token = claimed.task.fencing_token

                fetched = await agent.tool(tid, "fetch", {"path": "echo"})
                result = json.loads(fetched.result_json)
                assert result["status"] == 200
                assert "[REDACTED]" in result["body"]
                # The downstream service saw the credential and the fencing token.
                assert seen[-1]["authorization"] == f"Bearer {api_token.decode()}"
                assert seen[-1]["x-tether-fencing-token"] == str(token)

                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await agent.tool(tid, "fetch", {"path": "redirect-off"})
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "not on the network allowlist" in (refused.value.details() or "")
                assert all(h.get("host", "").startswith("127.0.0.1") for h in seen)

                printed = await agent.tool(tid, "printenv", {})
                env_out = json.loads(printed.result_json)
                assert printed.status == "error"
                assert env_out["exit_code"] == 3
                assert "DB_PASSWORD" in env_out["stdout"]
                assert FORBIDDEN_ENV not in env_out["stdout"]
                assert "failed with password [REDACTED]" in env_out["stderr"]

                revealed = await agent.tool(tid, "reveal", {"reveal_credentials": True})
                creds = json.loads(revealed.result_json)
                assert creds["credentials"] == {"api_token": "[REDACTED]"}

                held = next(iter(side.sidecar.deps.leases))
                assert set(held.credentials) == {"api_token", "db_password"}
                files_live = scan_files(tmp_path, all_secrets)  # -wal present while running
                await agent.call(
                    "CompleteTask",
                    bpb.CompleteTaskRequest(
                        task_id=tid, outcome=bpb.TASK_OUTCOME_SUCCEEDED, result=b"done"
                    ),
                )
                assert held.credentials == {}  # dropped when the lease ended
            finally:
                await agent.channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    assert len(seen) >= 2
    assert hits(bytes(agent.received), all_secrets) == []
    assert hits(bytes(outputs), all_secrets) == []
    log_text = "\n".join(
        f"{r.getMessage()} {r.__dict__} {r.exc_text or ''}" for r in caplog.records
    ).encode()
    assert hits(log_text, all_secrets) == []
    assert (tmp_path / "control.log").stat().st_size > 0
    assert files_live == {}
    assert scan_files(tmp_path, all_secrets) == {}
    # Sanity: the scan would have found a planted secret (base64 inside a blob).
    planted = tmp_path / "planted.txt"
    planted.write_bytes(base64.b64encode(b"Bearer " + api_token))
    assert list(scan_files(tmp_path, all_secrets)) == ["planted.txt"]
    os.unlink(planted)
