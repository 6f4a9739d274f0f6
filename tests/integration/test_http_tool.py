"""The http adapter against a real local HTTP server: injection, fencing, allowlist, caps."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tether.core.errors import PolicyDenied, ResourceExhausted, ToolTimeout
from tether.core.policy import parse_policy
from tether.sidecar.redaction import Redactor
from tether.sidecar.tools import ToolContext, build_tool, run_tool

SECRET = b"tok_live_9f8e7d6c5b4a3210"


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        """Keeps test output quiet."""

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        record = {
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers),
            "body": body,
        }
        type(self).seen.append(record)
        port = self.server.server_address[1]
        if self.path.startswith("/api/echo"):
            # Echo every header back, raw and encoded, like a careless debug endpoint.
            auth = self.headers.get("Authorization", "")
            payload = {
                "headers": dict(self.headers),
                "auth_b64": base64.b64encode(auth.encode()).decode(),
                "auth_url": quote(auth, safe=""),
                "auth_hex": auth.encode().hex(),
                "body": body,
            }
            self._reply(
                200,
                json.dumps(payload).encode(),
                {"Content-Type": "application/json", "X-Echo-Auth": auth},
            )
        elif self.path == "/api/redirect-off":
            self._reply(302, b"", {"Location": "http://evil.example.invalid:8443/steal"})
        elif self.path == "/api/redirect-on":
            self._reply(302, b"", {"Location": f"http://127.0.0.1:{port}/api/echo?hop=1"})
        elif self.path == "/api/redirect-loop":
            self._reply(302, b"", {"Location": "/api/redirect-loop"})
        elif self.path == "/api/big":
            self._reply(200, b"x" * 5000)
        elif self.path == "/api/cost":
            self._reply(200, b"{}", {"X-Tether-Cost-Micros": "42"})
        elif self.path == "/api/slow":
            time.sleep(1.5)
            self._reply(200, b"late")
        else:
            self._reply(404, b"not found")

    do_GET = _handle
    do_POST = _handle


@pytest.fixture
def server() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A real HTTP server on 127.0.0.1:0 recording every request it sees."""
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _tool(port: int, extra: str = "", follow: bool = True) -> Any:
    policy = parse_policy(f"""\
version = 1
[credentials.api_token]
tools = ["fetch"]
[tools.fetch]
adapter = "http"
credential = "api_token"
timeout_ms = 5000
[tools.fetch.http]
base_url = "http://127.0.0.1:{port}/api"
allowed_methods = ["GET", "POST"]
max_response_bytes = 2000
follow_redirects = {"true" if follow else "false"}
allowed_headers = ["Content-Type", "X-Trace"]
{extra}
[queues.q]
tools = ["fetch"]
network_allowlist = ["127.0.0.1:{port}"]
""")
    return build_tool(policy.tool("fetch")), policy.queue("q").network_allowlist


def _ctx(tmp_path: Path, allowlist: tuple[str, ...], **kw: Any) -> ToolContext:
    return ToolContext(
        task_id="t1",
        attempt=1,
        fencing_token=7,
        agent_id="alice",
        workspace=tmp_path,
        credentials={"api_token": SECRET},
        network_allowlist=allowlist,
        tool_name="fetch",
        **kw,
    )


async def test_server_sees_credential_and_fencing_agent_never_does(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The server gets the injected bearer token and fencing token; the result is scrubbed."""
    port, seen = server
    tool, allow = _tool(port)
    result = await run_tool(
        tool,
        _ctx(tmp_path, allow),
        {
            "method": "POST",
            "path": "echo",
            "query": {"a": "1"},
            "headers": {"X-Trace": "abc"},
            "body": {"hello": "world"},
        },
        Redactor(),
    )
    assert seen[0]["headers"]["Authorization"] == f"Bearer {SECRET.decode()}"
    assert seen[0]["headers"]["X-Tether-Fencing-Token"] == "7"
    assert seen[0]["headers"]["X-Trace"] == "abc"
    assert seen[0]["path"] == "/api/echo?a=1"
    assert json.loads(seen[0]["body"]) == {"hello": "world"}
    assert result.status == "ok"
    assert result.value["status"] == 200
    received = json.dumps(result.value).encode()
    assert not Redactor([SECRET]).contains_secret(received)
    for form in (SECRET, base64.b64encode(SECRET), quote(SECRET).encode(), SECRET.hex().encode()):
        assert form not in received
    assert result.value["json"]["headers"]["X-Tether-Fencing-Token"] == "7"
    assert "[REDACTED]" in result.value["json"]["headers"]["Authorization"]


@pytest.mark.parametrize("header", ["Authorization", "proxy-authorization", "Cookie"])
async def test_agent_cannot_supply_auth_headers(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path, header: str
) -> None:
    """Auth and cookie headers from the agent are refused before any request is sent."""
    port, seen = server
    tool, allow = _tool(port)
    with pytest.raises(PolicyDenied, match=header):
        await run_tool(tool, _ctx(tmp_path, allow), {"path": "echo", "headers": {header: "x"}})
    assert seen == []


async def test_custom_auth_header_is_protected_too(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The policy's configured auth header is injected and may not be set by the agent."""
    port, seen = server
    tool, allow = _tool(port, 'auth_header = "X-Api-Key"\nauth_template = "{secret}"')
    with pytest.raises(PolicyDenied):
        await run_tool(tool, _ctx(tmp_path, allow), {"path": "echo", "headers": {"x-api-key": "1"}})
    await run_tool(tool, _ctx(tmp_path, allow), {"path": "echo"})
    assert seen[0]["headers"]["X-Api-Key"] == SECRET.decode()
    assert "Authorization" not in seen[0]["headers"]


async def test_redirect_to_off_list_host_is_refused(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A redirect to a host off the allowlist is a PolicyDenied, followed or not."""
    port, _ = server
    for follow in (True, False):
        tool, allow = _tool(port, follow=follow)
        with pytest.raises(PolicyDenied, match=r"evil\.example\.invalid"):
            await run_tool(tool, _ctx(tmp_path, allow), {"path": "redirect-off"})


async def test_on_list_redirect_followed_and_loops_bounded(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """On-list redirects are followed (same origin keeps the credential); loops stop at 5."""
    port, seen = server
    tool, allow = _tool(port)
    result = await run_tool(tool, _ctx(tmp_path, allow), {"path": "redirect-on"})
    assert result.value["status"] == 200
    assert seen[-1]["path"] == "/api/echo?hop=1"
    assert seen[-1]["headers"]["Authorization"].startswith("Bearer ")
    with pytest.raises(ResourceExhausted, match="redirects"):
        await run_tool(tool, _ctx(tmp_path, allow), {"path": "redirect-loop"})
    no_follow, _ = _tool(port, follow=False)
    result = await run_tool(no_follow, _ctx(tmp_path, allow), {"path": "redirect-on"})
    assert result.value["status"] == 302


async def test_base_host_must_be_allowlisted(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A queue whose allowlist lacks the base host gets PolicyDenied and no request is sent."""
    port, seen = server
    tool, _ = _tool(port)
    for allow in ((), ("127.0.0.1:1",), ("localhost",)):
        with pytest.raises(PolicyDenied, match="allowlist"):
            await run_tool(tool, _ctx(tmp_path, allow), {"path": "echo"})
    assert seen == []
    assert (await run_tool(tool, _ctx(tmp_path, ("127.0.0.1",)), {"path": "echo"})).status == "ok"


async def test_request_shape_is_policed(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Path traversal, other hosts, unlisted methods and unknown arguments are refused."""
    port, seen = server
    tool, allow = _tool(port)
    ctx = _ctx(tmp_path, allow)
    for args in (
        {"path": "../secret"},
        {"path": "a/%2e%2e/b"},
        {"path": "//evil.example/x"},
        {"method": "DELETE", "path": "echo"},
        {"path": "echo", "url": "http://evil.example/"},
    ):
        with pytest.raises(PolicyDenied):
            await run_tool(tool, ctx, args)
    assert seen == []


async def test_response_cap_timeout_and_reported_cost(
    server: tuple[int, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Oversized responses are ResourceExhausted, slow ones ToolTimeout; cost is reported."""
    port, _ = server
    tool, allow = _tool(port)
    with pytest.raises(ResourceExhausted):
        await run_tool(tool, _ctx(tmp_path, allow), {"path": "big"})
    with pytest.raises(ToolTimeout):
        await run_tool(tool, _ctx(tmp_path, allow, timeout_s=0.3), {"path": "slow"})
    result = await run_tool(tool, _ctx(tmp_path, allow), {"path": "cost"})
    assert result.cost_micros == 42
    missing = await run_tool(tool, _ctx(tmp_path, allow), {"path": "nothing-here"})
    assert missing.status == "error"
    assert missing.value["status"] == 404
