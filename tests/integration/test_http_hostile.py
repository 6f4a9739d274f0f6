"""The http adapter against a hostile agent: encodings, ranges, stalls (issue 12, item 4).

A real HTTP server on 127.0.0.1:0 plays a careless downstream service: it
echoes the injected credential (raw, base64, hex, URL-encoded), compresses
whether or not compression was asked for, honours `Range`, answers 206 slices
of the echo on request, and stalls or trickles on demand. The agent drives a
real control plane and sidecar over gRPC, with the credential sealed in the
vault, and keeps every byte it receives. Adapter-level tests cover what is
easier to observe in-process: memory under a decompression bomb, one deadline
across redirects, and that no call touches the event loop's default executor.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import gzip
import json
import logging
import os
import re
import statistics
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import grpc
import pytest

from tether.agent import AGENT_TOKEN_HEADER
from tether.core.errors import ConfigError, PolicyDenied, ResourceExhausted, ToolTimeout
from tether.core.policy import parse_policy
from tether.grpcutil.status import from_rpc_error
from tether.sidecar.tools import ToolContext, build_tool, run_tool
from tether.testing import start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

SECRET = b"tok_live_H0stile+Agent/9f8e7d6c5b4a"
BOMB_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------- the server


def _compress(data: bytes, coding: str) -> tuple[bytes, str]:
    """`data` under `coding` and the Content-Encoding value that names it."""
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data), coding
    if coding == "deflate":
        return zlib.compress(data), "deflate"
    if coding == "raw-deflate":
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return raw.compress(data) + raw.flush(), "deflate"
    if coding == "gzip-gzip":
        return gzip.compress(gzip.compress(data)), "gzip, gzip"
    if coding == "deflate-gzip":
        return gzip.compress(zlib.compress(data)), "deflate, gzip"
    if coding == "gzip-members":
        half = len(data) // 2
        return gzip.compress(data[:half]) + gzip.compress(data[half:]), "gzip"
    if coding == "identity-gzip":
        return gzip.compress(data), "identity, gzip"
    if coding == "br":  # not decodable here: the body is gzip, the label is a lie
        return gzip.compress(data), "br"
    if coding == "truncated":
        return gzip.compress(data)[:-12], "gzip"
    raise AssertionError(coding)


class _Hostile(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]
    stop: threading.Event
    trickles: list[tuple[float, float]]
    bomb: bytes

    def log_message(self, format: str, *args: Any) -> None:
        """Keeps test output quiet."""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _echo(self) -> bytes:
        auth = self.headers.get("Authorization", "")
        return json.dumps(
            {
                "auth": auth,
                "auth_b64": base64.b64encode(auth.encode()).decode(),
                "auth_hex": auth.encode().hex(),
                "auth_url": quote(auth, safe=""),
            }
        ).encode()

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = url.path.removeprefix("/api/")
        # Every answer is JSON and echoes the credential in a header too.
        json_type = {
            "Content-Type": "application/json",
            "X-Echo-Auth": self.headers.get("Authorization", ""),
        }
        if route == "echo":
            # A careless but ordinary server: honours Range and Accept-Encoding.
            body = self._echo()
            ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if ranged:
                lo, hi = int(ranged.group(1)), min(int(ranged.group(2)), len(body) - 1)
                extra = {"Content-Range": f"bytes {lo}-{hi}/{len(body)}", **json_type}
                self._send(206, body[lo : hi + 1], extra)
            elif "gzip" in self.headers.get("Accept-Encoding", ""):
                self._send(200, gzip.compress(body), {"Content-Encoding": "gzip", **json_type})
            else:
                self._send(200, body, json_type)
        elif route == "encoded":
            # Encodes whatever the request asked for (identity included).
            body, label = _compress(self._echo(), query["coding"])
            self._send(200, body, {"Content-Encoding": label, **json_type})
        elif route == "slice":
            # Slices by query parameter, whatever Range says; optionally labels it 200.
            body = self._echo()
            lo, hi = int(query["lo"]), min(int(query["hi"]), len(body) - 1)
            status = int(query.get("status", "206"))
            extra = {"Content-Range": f"bytes {lo}-{hi}/{len(body)}", **json_type}
            self._send(status, body[lo : hi + 1], extra)
        elif route == "binary":
            # Not UTF-8, so it travels as base64, which would hide the hex and URL forms.
            auth = self.headers.get("Authorization", "").encode()
            body = b"\xff\xfe" + auth.hex().encode() + b" " + quote(auth, safe="").encode()
            self._send(200, body, {"Content-Type": "application/octet-stream"})
        elif route == "bomb":
            self._send(200, type(self).bomb, {"Content-Encoding": "gzip"})
        elif route == "te-gzip":
            body = gzip.compress(self._echo())
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n" + body
            )
        elif route == "stall":
            type(self).stop.wait(30)  # answers only when the test ends
            self._send(200, b"late")
        elif route == "trickle":
            start = time.monotonic()
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    if type(self).stop.wait(0.05):
                        break
                    self.wfile.write(b"x")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            type(self).trickles.append((start, time.monotonic()))
        elif route == "hop":
            # /api/hop?n=3: each hop takes 0.4 s, then redirects to the next.
            n = int(query.get("n", "0"))
            time.sleep(0.4)
            if n > 0:
                self._send(302, b"", {"Location": f"/api/hop?n={n - 1}"})
            else:
                self._send(200, b"arrived")
        elif route == "fast":
            self._send(200, b"ok")
        else:
            self._send(404, b"not found")


class Server:
    """What the test needs from the running server."""

    def __init__(self, port: int, handler: type[_Hostile]) -> None:
        self.port = port
        self.seen = handler.seen
        self.trickles = handler.trickles


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """64 MiB of zeros, gzip-compressed (about 64 KiB on the wire)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1024 * 1024)
    return b"".join(out.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))) + out.flush()


@pytest.fixture
def server(bomb: bytes) -> Iterator[Server]:
    """The hostile-friendly server on 127.0.0.1:0, stopped (stalls released) at the end."""
    stop = threading.Event()
    attrs = {"seen": [], "stop": stop, "trickles": [], "bomb": bomb}
    handler: type[_Hostile] = type("Handler", (_Hostile,), attrs)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield Server(httpd.server_address[1], handler)
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


# --------------------------------------------------------------------------- what leaks


def forms(secret: bytes) -> set[bytes]:
    """The secret raw, hex, URL-encoded and base64 (std and URL-safe) at each alignment."""
    out = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for text in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        out.add(text.encode())
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + secret + b"\0\0")
        fragment = encoded[-(-8 * k // 6) : (8 * k + 8 * len(secret)) // 6]
        out.add(fragment)
        out.add(fragment.translate(bytes.maketrans(b"+/", b"-_")))
    return out


def _unwrap(data: bytes) -> list[bytes]:
    """`data` plus what an agent could decode from it: base64 blobs, then gzip/zlib/deflate."""
    blobs = [data]
    for match in re.finditer(rb"[A-Za-z0-9+/=_-]{16,}", data):
        with contextlib.suppress(ValueError):
            blobs.append(base64.b64decode(match.group(0) + b"==", altchars=b"-_"))
            blobs.append(base64.b64decode(match.group(0) + b"=="))
    out = []
    for blob in blobs:
        out.append(blob)
        for wbits in (16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS):
            with contextlib.suppress(zlib.error):
                out.append(zlib.decompressobj(wbits).decompress(blob, 1 << 20))
    return out


def leaked(received: bytes) -> list[str]:
    """Which forms of SECRET an agent holding `received` can read (never the values)."""
    found = set()
    for blob in _unwrap(received):
        for form in forms(SECRET):
            if form in blob:
                found.add(f"{len(form)}-byte form")
    return sorted(found)


class Agent:
    """A raw Broker client keeping every byte it receives, error details included."""

    def __init__(self, socket: Path, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self.stub = bpb_grpc.BrokerServiceStub(self.channel)
        self.md = ((AGENT_TOKEN_HEADER, token),)
        self.received = bytearray()

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

    async def claim(self, queue: str = "work") -> str:
        claimed = await self.call("ClaimTask", bpb.ClaimTaskRequest(queue=queue, wait_ms=2000))
        return str(claimed.task.task_id)

    async def tool(self, task_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """The tool's result (status, value) or raises the RPC error."""
        request = bpb.CallToolRequest(task_id=task_id, tool=tool, arguments_json=json.dumps(args))
        response = await self.call("CallTool", request)
        value = json.loads(response.result_json) if response.result_json else None
        return {"status": response.status, "value": value}

    async def close(self) -> None:
        await self.channel.close()


def sidecar_policy(port: int, *, timeout_ms: int = 5000, allowed: str = "") -> str:
    """alice and bob on queue work; `fetch` is http with the sealed token, `echo` is python."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[credentials.api_token]
tools = ["fetch"]
[tools.fetch]
adapter = "http"
credential = "api_token"
timeout_ms = {timeout_ms}
[tools.fetch.http]
base_url = "http://127.0.0.1:{port}/api"
max_response_bytes = 65536
{allowed}
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["fetch", "echo"]
network_allowlist = ["127.0.0.1:{port}"]
lease_ttl_ms = 60000
"""


# --------------------------------------------------------------------------- encodings


async def test_encoded_bodies_are_decoded_then_redacted_or_refused(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """gzip/deflate echoes sent unasked come back decoded and scrubbed; others are withheld."""
    caplog.set_level(logging.DEBUG)
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice",)) as side,
    ):
        await control.client.put_policy(sidecar_policy(server.port))
        await control.client.put_secret("api_token", SECRET)
        await control.client.submit("work", b"{}")
        agent = Agent(side.socket, side.tokens["alice"])
        try:
            tid = await agent.claim()
            decoded = (
                "gzip",
                "x-gzip",
                "deflate",
                "raw-deflate",
                "gzip-gzip",
                "deflate-gzip",
                "gzip-members",
                "identity-gzip",
            )
            for coding in decoded:
                out = await agent.tool(
                    tid, "fetch", {"path": "encoded", "query": {"coding": coding}}
                )
                value = out["value"]
                assert out["status"] == "ok", (coding, value)
                assert "body_base64" not in value, coding
                assert "content-encoding" not in value["headers"], coding
                assert value["json"]["auth"] == "Bearer [REDACTED]", coding
                assert "[REDACTED]" in value["json"]["auth_b64"], coding
                assert "[REDACTED]" in value["json"]["auth_hex"], coding
                assert server.seen[-1]["accept-encoding"] == "identity", coding
                assert server.seen[-1]["authorization"] == f"Bearer {SECRET.decode()}"
            for coding, error in (
                ("br", "unsupported_content_encoding"),
                ("truncated", "undecodable_body"),
            ):
                out = await agent.tool(
                    tid, "fetch", {"path": "encoded", "query": {"coding": coding}}
                )
                assert out["status"] == "error", coding
                assert out["value"]["error"] == error, out
                assert "body" not in out["value"]
                assert "body_base64" not in out["value"]
            te = await agent.tool(tid, "fetch", {"path": "te-gzip"})
            assert te["status"] == "error"
            assert te["value"]["status"] == 502
            # An ordinary server compressing only when asked never sees the agent ask.
            plain = await agent.tool(tid, "fetch", {"path": "echo"})
            assert "content-encoding" not in plain["value"]["headers"]
            assert plain["value"]["json"]["auth"] == "Bearer [REDACTED]"
        finally:
            await agent.close()
        assert leaked(bytes(agent.received)) == []
        assert leaked(caplog.text.encode()) == []  # nor did any log record carry it


@pytest.mark.parametrize(
    "header",
    ["Accept-Encoding", "accept-encoding", "Range", "If-Range", "TE", "Accept-Charset", "X-Other"],
)
async def test_agent_representation_headers_are_refused_before_sending(
    tmp_path: Path, server: Server, header: str
) -> None:
    """Headers off allowed_headers (Accept-Encoding, Range, ...) are refused, none is sent."""
    tool, allow = _tool(server.port)
    ctx = _ctx(tmp_path, allow)
    with pytest.raises(PolicyDenied, match=re.escape(header)):
        await run_tool(tool, ctx, {"path": "echo", "headers": {header: "gzip"}})
    assert server.seen == []
    listed, _ = _tool(server.port, 'allowed_headers = ["X-Request-Id", "Accept"]')
    result = await run_tool(
        listed, ctx, {"path": "echo", "headers": {"x-request-id": "r1", "Accept": "*/*"}}
    )
    assert result.status == "ok"
    assert server.seen[-1]["x-request-id"] == "r1"
    assert server.seen[-1]["accept-encoding"] == "identity"


# --------------------------------------------------------------------------- ranges


async def test_range_slices_cannot_reassemble_the_credential(
    tmp_path: Path, server: Server
) -> None:
    """Range is refused before sending and every 206/Content-Range slice is withheld."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice",)) as side,
    ):
        await control.client.put_policy(sidecar_policy(server.port))
        await control.client.put_secret("api_token", SECRET)
        await control.client.submit("work", b"{}")
        agent = Agent(side.socket, side.tokens["alice"])
        pieces: list[str] = []
        try:
            tid = await agent.claim()
            for lo in range(0, 300, 8):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await agent.tool(
                        tid, "fetch", {"path": "echo", "headers": {"Range": f"bytes={lo}-{lo + 7}"}}
                    )
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert server.seen == []
            for status in ("206", "200"):
                for lo in range(0, 300, 8):
                    query = {"lo": str(lo), "hi": str(lo + 7), "status": status}
                    out = await agent.tool(tid, "fetch", {"path": "slice", "query": query})
                    assert out["status"] == "error"
                    assert out["value"]["error"] == "partial_response_refused"
                    pieces.append(out["value"].get("body", ""))
            assert len(server.seen) == 2 * len(range(0, 300, 8))
        finally:
            await agent.close()
        assert "".join(pieces) == ""
        assert leaked(bytes(agent.received)) == []


# --------------------------------------------------------------------------- stalls


async def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def test_twelve_stalled_calls_do_not_delay_another_agents_calls(
    tmp_path: Path, server: Server
) -> None:
    """Twelve stalled/trickling calls each end at timeout_ms; bob's calls stay within 100 ms."""
    timeout_ms = 2000
    # At least twelve, and at least the default executor's size on this machine.
    slow = max(12, min(32, (os.cpu_count() or 1) + 4))
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice", "bob")) as side,
    ):
        await control.client.put_policy(sidecar_policy(server.port, timeout_ms=timeout_ms))
        await control.client.put_secret("api_token", SECRET)
        await control.client.submit("work", b"{}")
        await control.client.submit("work", b"{}")
        alice = Agent(side.socket, side.tokens["alice"])
        bob = Agent(side.socket, side.tokens["bob"])
        try:
            alice_task, bob_task = await alice.claim(), await bob.claim()

            async def quick_echo() -> None:
                assert (await bob.tool(bob_task, "echo", {"n": 1}))["status"] == "ok"

            async def quick_fetch() -> None:
                assert (await bob.tool(bob_task, "fetch", {"path": "fast"}))["status"] == "ok"

            alone_echo = [await _timed(quick_echo) for _ in range(8)]
            alone_fetch = [await _timed(quick_fetch) for _ in range(8)]

            async def slow_call(i: int) -> tuple[float, BaseException | None]:
                path = "stall" if i % 2 else "trickle"
                start = time.perf_counter()
                try:
                    await alice.tool(alice_task, "fetch", {"path": path})
                except grpc.aio.AioRpcError as err:
                    return time.perf_counter() - start, err
                return time.perf_counter() - start, None

            started = time.perf_counter()
            slow_calls = [asyncio.create_task(slow_call(i)) for i in range(slow)]
            await asyncio.sleep(0.3)  # every slow call is now in flight at the server
            busy_echo: list[float] = []
            busy_fetch: list[float] = []
            busy_thread: list[float] = []  # the sidecar runs in this loop: its default executor
            while time.perf_counter() - started < timeout_ms / 1000 - 0.4:
                busy_thread.append(await _timed(lambda: asyncio.to_thread(int)))
                busy_echo.append(await _timed(quick_echo))
                busy_fetch.append(await _timed(quick_fetch))
            in_flight = sum(not t.done() for t in slow_calls)
            outcomes = await asyncio.gather(*slow_calls)
        finally:
            await alice.close()
            await bob.close()

    figures = {
        "slow_calls": slow,
        "echo_alone_median_ms": round(statistics.median(alone_echo) * 1000, 1),
        "echo_busy_median_ms": round(statistics.median(busy_echo) * 1000, 1),
        "echo_busy_max_ms": round(max(busy_echo) * 1000, 1),
        "fetch_alone_median_ms": round(statistics.median(alone_fetch) * 1000, 1),
        "fetch_busy_median_ms": round(statistics.median(busy_fetch) * 1000, 1),
        "fetch_busy_max_ms": round(max(busy_fetch) * 1000, 1),
        "to_thread_busy_max_ms": round(max(busy_thread) * 1000, 1),
        "slow_call_ms": sorted(round(elapsed * 1000) for elapsed, _ in outcomes),
    }
    print("\nhttp stall figures:", json.dumps(figures))
    assert in_flight == slow, figures  # the quick calls were measured with all slow ones pending
    assert busy_echo, figures
    assert busy_fetch, figures
    delay_echo = statistics.median(busy_echo) - statistics.median(alone_echo)
    delay_fetch = statistics.median(busy_fetch) - statistics.median(alone_fetch)
    assert delay_echo < 0.1, figures
    assert delay_fetch < 0.1, figures
    assert max(busy_echo) < max(alone_echo) + 0.1, figures
    assert max(busy_thread) < 0.1, figures
    for elapsed, err in outcomes:
        assert isinstance(err, grpc.aio.AioRpcError), figures
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details())
        assert isinstance(from_rpc_error(err), ToolTimeout)
        assert timeout_ms / 1000 - 0.05 <= elapsed < timeout_ms / 1000 + 0.5, figures
    # The trickling connections were dropped at the deadline, not read to their end.
    for _ in range(40):
        if len(server.trickles) == (slow + 1) // 2:
            break
        await asyncio.sleep(0.05)
    assert len(server.trickles) == (slow + 1) // 2
    assert all(end - start < timeout_ms / 1000 + 0.5 for start, end in server.trickles)


# --------------------------------------------------------------------------- in-process


def _tool(port: int, extra: str = "", *, cap: int = 2000, timeout_ms: int = 5000) -> Any:
    policy = parse_policy(f"""\
version = 1
[credentials.api_token]
tools = ["fetch"]
[tools.fetch]
adapter = "http"
credential = "api_token"
timeout_ms = {timeout_ms}
[tools.fetch.http]
base_url = "http://127.0.0.1:{port}/api"
max_response_bytes = {cap}
follow_redirects = true
{extra}
[queues.q]
tools = ["fetch"]
network_allowlist = ["127.0.0.1:{port}", "localhost:{port}"]
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


async def test_decompression_bomb_is_refused_within_bounded_memory(
    tmp_path: Path, server: Server
) -> None:
    """A 64 KiB gzip of 64 MiB is RESOURCE_EXHAUSTED after at most about the cap is inflated."""
    cap = 1024 * 1024
    tool, allow = _tool(server.port, cap=cap)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceExhausted, match="exceeds"):
            await run_tool(tool, _ctx(tmp_path, allow), {"path": "bomb"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * cap, f"peak {peak} bytes while decoding a {BOMB_BYTES}-byte bomb"


async def test_binary_body_is_redacted_before_base64(tmp_path: Path, server: Server) -> None:
    """A non-UTF-8 body is scrubbed before it is base64-encoded, so hex/URL forms are caught."""
    tool, allow = _tool(server.port)
    result = await run_tool(tool, _ctx(tmp_path, allow), {"path": "binary"})
    raw = base64.b64decode(result.value["body_base64"])
    assert raw.startswith(b"\xff\xfe")
    assert raw.count(b"[REDACTED]") == 2
    assert leaked(json.dumps(result.value).encode()) == []


async def test_one_deadline_covers_every_redirect_hop(tmp_path: Path, server: Server) -> None:
    """Four 0.4 s hops under a 1 s timeout stop at 1 s: the deadline is per call, not per hop."""
    tool, allow = _tool(server.port, timeout_ms=1000)
    start = time.perf_counter()
    with pytest.raises(ToolTimeout):
        await run_tool(tool, _ctx(tmp_path, allow), {"path": "hop", "query": {"n": "3"}})
    assert 0.95 <= time.perf_counter() - start < 1.3
    done = await run_tool(tool, _ctx(tmp_path, allow), {"path": "hop", "query": {"n": "1"}})
    assert done.value["body"] == "arrived"


class _CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_calls_never_touch_the_default_executor(tmp_path: Path, server: Server) -> None:
    """Requests, name resolution included, never queue on the loop's shared default executor."""
    loop = asyncio.get_running_loop()
    counting = _CountingExecutor()
    loop.set_default_executor(counting)
    by_ip, allow = _tool(server.port)
    policy = parse_policy(f"""\
version = 1
[tools.named]
adapter = "http"
[tools.named.http]
base_url = "http://localhost:{server.port}/api"
[queues.q]
tools = ["named"]
""")
    by_name = build_tool(policy.tool("named"))
    ctx = _ctx(tmp_path, allow)
    assert (await run_tool(by_ip, ctx, {"path": "fast"})).value["body"] == "ok"
    named = await run_tool(by_name, ctx, {"path": "fast"})  # ::1 first, if so, is refused
    assert named.value["body"] == "ok"
    assert any(t.name.startswith("tether-http-dns") for t in threading.enumerate())
    with pytest.raises(ToolTimeout):
        await run_tool(by_ip, _ctx(tmp_path, allow, timeout_s=0.2), {"path": "trickle"})
    assert counting.submitted == 0


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    "name",
    [
        "Accept-Encoding",
        "range",
        "If-Range",
        "TE",
        "Authorization",
        "Cookie",
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "X-Tether-Fencing-Token",
        "X-Tether-Anything",
        "X-Api-Key",
        "bad header",
    ],
)
def test_policy_refuses_headers_that_no_agent_may_set(name: str) -> None:
    """allowed_headers may not name auth, framing, encoding or range headers (ConfigError)."""
    with pytest.raises(ConfigError, match="allowed_headers"):
        _tool(1, f'auth_header = "X-Api-Key"\nallowed_headers = [{json.dumps(name)}]')


def test_allowed_headers_default_is_content_type_only() -> None:
    """Without allowed_headers an agent may set Content-Type and nothing else."""
    tool, _ = _tool(1)
    assert tool.http.allowed_headers == ("Content-Type",)
    listed, _ = _tool(1, 'allowed_headers = ["X-Request-Id"]')
    assert listed.http.allowed_headers == ("X-Request-Id",)
    with pytest.raises(ConfigError, match="repeated"):
        _tool(1, 'allowed_headers = ["X-Request-Id", "x-request-id"]')
