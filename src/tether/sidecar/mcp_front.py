"""The sidecar's MCP server: an unmodified MCP client is an agent, under the same rules.

Agents that speak MCP (the Model Context Protocol, current revision, and the
earlier handshake revisions the official SDK still serves) reach the sidecar
over Streamable HTTP, on a Unix socket beside the Broker socket and optionally
on loopback TCP; `tether mcp` bridges stdio clients to it. Built on the
official MCP Python SDK's low-level server.

Binding: every request carries `Authorization: Bearer <token>`, a per-lease
token minted at `ClaimTask` for the claiming agent and handed back once
(`McpAccess`). The sidecar keeps only its SHA-256. A token names exactly one
lease of one agent: `tools/list` shows what that lease grants (descriptions and
input schemas from the lease's policy), `tools/call` runs through
`Mediator.call_tool` exactly as `CallTool` does (fencing, grant, schema,
budget, credentials, idempotency through `_meta["tether/idempotencyKey"]`,
redaction, receipts), and a refusal comes back as an MCP tool error
(`isError`) naming the reason. Once the lease ends, lists are empty and calls
are refused; once the sidecar forgets the lease (a new lease on the task, or
ten minutes later) the token is unknown and the request is 401. The SDK binds
a stateful session to the principal (agent, task, fencing token) that opened
it, so one session never serves two leases.

Listeners are loopback or Unix only (`check_loopback_listen`), with the SDK's
Host/Origin checks against DNS rebinding.

Every HTTP request passes the sidecar's `LoadShedder` first, under the same
caller key as the agent's Broker calls (its name; an unknown token shares
UNAUTHENTICATED_CALLER), so MCP and gRPC draw on one per-agent budget of calls
in flight and rate. A shed request is HTTP 429 with `Retry-After` (seconds,
rounded up) and a JSON-RPC error (code -32000, `data.reason` OVERLOADED,
`data.retry_after_ms`); nothing ran. A body over MAX_BODY_BYTES (the Broker's
message limit) is 413 before it is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mcp_types as types
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyHttpUrl

from tether.core import errors as E
from tether.grpcutil.limits import UNAUTHENTICATED_CALLER, LoadShedder
from tether.grpcutil.status import RETRY_AFTER_KEY
from tether.sidecar.leases import HeldLease

if TYPE_CHECKING:
    from tether.sidecar.grpc_api import BrokerDeps

log = logging.getLogger("tether.sidecar.mcp")

TOKEN_PREFIX = "tmcp_"
IDEMPOTENCY_META_KEY = "tether/idempotencyKey"
MCP_PATH = "/mcp"
SOCKET_MODE = 0o660
MAX_TOOL_NAME = 128
MAX_KEY = 256
MAX_SESSIONS_PER_TOKEN = 32
"""Handshake-era sessions one lease's token may hold open (the SDK's own cap, 10,000, is
shared by every agent of the node: one agent must not fill it)."""
MAX_BODY_BYTES = 2 * 1024 * 1024
"""A request body's limit, the Broker's gRPC message limit: the SDK buffers bodies whole."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class McpGrant:
    """One lease's way in: the token (secret) and where to send it."""

    token: str = field(repr=False)
    url: str = ""
    unix_socket: str = ""


class _QuietServer(uvicorn.Server):
    """uvicorn inside the sidecar's loop: the sidecar owns SIGTERM/SIGINT, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _tcp_socket(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as err:
        sock.close()
        raise E.ConfigError(f"mcp_listen: cannot listen on {address}: {err.strerror}") from err
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _unix_socket(path: Path) -> socket.socket:
    from tether.sidecar.server import prepare_socket

    prepare_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # born 0660, never briefly wider
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise E.ConfigError(f"mcp_socket: cannot bind {path}: {err.strerror}") from err
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class McpFront:
    """Serves MCP for the sidecar's leases; `start()`, then `grant()` per claim, `stop()`."""

    def __init__(
        self,
        deps: BrokerDeps,
        *,
        socket_path: Path | None,
        listen: str | None = None,
        shedder: LoadShedder | None = None,
    ) -> None:
        self.d = deps
        self.shedder = shedder
        self.socket_path = socket_path.resolve() if socket_path is not None else None
        self.listen = listen
        self.url = ""
        self._tokens: dict[str, HeldLease] = {}
        self._sessions: dict[str, set[str]] = {}
        """Session ids each token (by digest) opened and has not ended (DELETE)."""
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._mcp: Server[Any] = Server(
            "tether",
            version="0.1.0",
            title="Tether sidecar",
            instructions=(
                "Tools of your current Tether task. Calls are mediated: credentials are "
                "injected, results redacted, every call is on the record."
            ),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Binds the listeners and starts serving.

        Raises:
            ConfigError: a listener cannot be bound (a live socket, a taken port).
        """
        sockets: list[socket.socket] = []
        if self.listen:
            tcp = _tcp_socket(self.listen)
            sockets.append(tcp)
            host, port = tcp.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{port}{MCP_PATH}"
        if self.socket_path is not None:
            sockets.append(_unix_socket(self.socket_path))
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
        app = self._mcp.streamable_http_app(
            streamable_http_path=MCP_PATH,
            json_response=True,  # one JSON body per call: no progress stream is ever sent
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=hosts,
                allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
            ),
            # The SDK's bearer middleware, with our per-lease tokens; the issuer is
            # this sidecar (no OAuth endpoints are served).
            auth=AuthSettings(issuer_url=AnyHttpUrl("http://127.0.0.1"), resource_server_url=None),
            token_verifier=self,
        )
        config = uvicorn.Config(
            _Admission(app, self),
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        server = self._server = _QuietServer(config)
        self._task = asyncio.create_task(server.serve(sockets=sockets), name="tether-mcp")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise E.ConfigError("the MCP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info(
            "MCP serving",
            extra={"mcp_url": self.url, "mcp_socket": str(self.socket_path or "")},
        )

    async def stop(self) -> None:
        """Stops serving (in-flight calls get the server's grace) and removes the socket."""
        server, task = self._server, self._task
        if server is not None and task is not None:
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:
                log.exception("MCP server stopped with an error")
        self._tokens.clear()
        self._sessions.clear()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    # -- tokens ----------------------------------------------------------------------------

    def grant(self, held: HeldLease) -> McpGrant:
        """Mints the lease's token (kept as its SHA-256 only) and says where to use it."""
        self._prune()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = held
        return McpGrant(
            token=token,
            url=self.url,
            unix_socket=str(self.socket_path) if self.socket_path is not None else "",
        )

    def resolve(self, token: str) -> HeldLease | None:
        """The lease a token was minted for, while this sidecar still knows that lease."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            return None
        digest = _digest(token)  # looked up by a hash the caller cannot aim
        held = self._tokens.get(digest)
        if held is None:
            return None
        if self.d.leases.get(held.task_id) is not held:  # replaced or forgotten
            self._tokens.pop(digest, None)
            self._sessions.pop(digest, None)
            return None
        return held

    def caller_of(self, authorization: bytes) -> str:
        """The load-shedding key of a request: its token's agent, as the Broker names it."""
        header = authorization.decode("latin-1")
        held = self.resolve(header[7:]) if header[:7].lower() == "bearer " else None
        return held.agent if held is not None else UNAUTHENTICATED_CALLER

    def _prune(self) -> None:
        for digest, held in list(self._tokens.items()):
            if self.d.leases.get(held.task_id) is not held:
                del self._tokens[digest]
                self._sessions.pop(digest, None)

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's TokenVerifier: the principal is (agent, task, fencing token)."""
        held = self.resolve(token)
        if held is None:
            return None
        return AccessToken(
            token="",  # the SDK keeps this object per request; it needs no secret
            client_id=held.agent,
            scopes=[],
            subject=f"{held.task_id}#{held.lease.fencing_token}",
        )

    def _held(self, ctx: ServerRequestContext[Any, Any]) -> HeldLease:
        request = ctx.request
        header = request.headers.get("authorization", "") if request is not None else ""
        held = self.resolve(header[7:]) if header[:7].lower() == "bearer " else None
        if held is None:  # the bearer middleware refused it already; never reached
            raise E.Unauthenticated("unknown or expired MCP token")
        return held

    # -- the protocol ----------------------------------------------------------------------

    async def _live(self, held: HeldLease) -> HeldLease:
        """Checks the lease as the Broker does (owner, lapse, finish) and marks the agent alive.

        Raises:
            LeaseLost: the lease ended (finished, lost, lapsed or replaced).
        """
        try:
            current = await self.d.leases.for_agent(held.agent, held.task_id)
        except (E.InvalidTransition, E.NotFound, E.NotOwner) as err:
            raise E.LeaseLost(
                f"the lease on task {held.task_id!r} has ended ({err.message}); "
                "nothing runs under it any more",
                metadata={"task_id": held.task_id},
            ) from err
        if current is not held:
            raise E.LeaseLost(
                f"the lease on task {held.task_id!r} this token was issued for has ended",
                metadata={"task_id": held.task_id},
            )
        return held

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        held = self._held(ctx)
        try:
            await self._live(held)
        except E.LeaseLost:
            return types.ListToolsResult(tools=[])
        policy = None
        if self.d.policies is not None:
            with contextlib.suppress(E.TetherError):
                policy = await self.d.policies.get(
                    held.lease.policy_digest, held.task_id, held.lease.fencing_token
                )
        tools = []
        for name in held.lease.tools:
            spec = None
            if policy is not None:
                if name not in policy.tools_for_queue(held.queue):
                    continue  # the signed scope and the policy must both grant it
                spec = policy.tools.get(name)
            schema = dict(spec.input_schema) if spec and spec.input_schema else {"type": "object"}
            tools.append(
                types.Tool(
                    name=name,
                    description=(spec.description if spec else "") or None,
                    input_schema=schema,
                )
            )
        return types.ListToolsResult(tools=tools)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        held = self._held(ctx)
        key = _meta_value(params.meta, IDEMPOTENCY_META_KEY)
        try:
            if not params.name or len(params.name) > MAX_TOOL_NAME:
                raise E.InvalidArgument("name", f"must be 1..{MAX_TOOL_NAME} characters")
            if not isinstance(key, str) or len(key) > MAX_KEY:
                raise E.InvalidArgument(
                    f"_meta.{IDEMPOTENCY_META_KEY}", f"must be a string of at most {MAX_KEY}"
                )
            await self._live(held)
            outcome = await self.d.mediator.call_tool(
                held.agent, held, params.name, json.dumps(params.arguments or {}), key
            )
        except E.TetherError as err:
            return _refusal(err)
        try:
            value = json.loads(outcome.result_json)
        except ValueError:
            value = outcome.result_json
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=outcome.result_json)],
            structured_content=value if isinstance(value, dict) else {"result": value},
            is_error=outcome.status != "ok",
            _meta={
                "tether/status": outcome.status,
                "tether/replayed": outcome.replayed,
                "tether/costMicros": outcome.cost_micros,
                "tether/budgetRemainingMicros": outcome.budget_remaining_micros,
            },
        )


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Admission:
    """ASGI middleware before the SDK: load shedding per agent, and a bounded body.

    Runs before authentication, so a flood of guessed tokens is shed too (under
    UNAUTHENTICATED_CALLER) instead of costing a hash and a 401 each without limit.
    """

    def __init__(self, app: Any, front: McpFront) -> None:
        self.app = app
        self.front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length", b"")
        if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _plain(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        shedder = self.front.shedder
        if shedder is None:
            await self._bounded(scope, receive, send)
            return
        caller = self.front.caller_of(headers.get(b"authorization", b""))
        refusal = shedder.admit(caller)
        if refusal is not None:
            await _shed(send, refusal)
            return
        try:
            await self._bounded(scope, receive, send)
        finally:
            shedder.release(caller)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Reads the body (at most MAX_BODY_BYTES, chunked or not), then runs the app on it.

        The SDK buffers a body whole anyway; reading it here lets an oversized one be
        refused 413 before the app has started an answer.
        """
        if scope.get("method") != "POST":
            if scope.get("method") == "DELETE":  # a session ended by its client
                sid = dict(scope.get("headers", [])).get(b"mcp-session-id", b"")
                digest = _bearer_digest(scope)
                if sid and digest:
                    self.front._sessions.get(digest, set()).discard(sid.decode("latin-1"))
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > MAX_BODY_BYTES:
                await _plain(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        digest = _bearer_digest(scope)
        opens = b"mcp-session-id" not in dict(scope.get("headers", [])) and b'"initialize"' in body
        sessions = self.front._sessions.get(digest, set()) if digest else set()
        if opens and len(sessions) >= MAX_SESSIONS_PER_TOKEN:
            await _plain(
                send,
                429,
                f"this lease's token has {MAX_SESSIONS_PER_TOKEN} MCP sessions open (the "
                "limit); end one (DELETE with its Mcp-Session-Id) before opening another",
            )
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and opens and digest:
                sid = dict(message.get("headers", [])).get(b"mcp-session-id")
                if sid and digest in self.front._tokens:
                    self.front._sessions.setdefault(digest, set()).add(sid.decode("latin-1"))
            await send(message)

        await self.app(scope, replay, watched)


def _bearer_digest(scope: Scope) -> str:
    """The SHA-256 of the request's bearer token ("" without one)."""
    header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
    return _digest(header[7:]) if header[:7].lower() == "bearer " else ""


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _shed(send: Send, refusal: E.Overloaded) -> None:
    """HTTP 429 with Retry-After and a JSON-RPC error that carries the millisecond hint."""
    retry_ms = int(refusal.metadata[RETRY_AFTER_KEY])
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32000,
                "message": refusal.message,
                "data": {
                    "reason": refusal.reason,
                    "why": refusal.metadata.get("reason", ""),
                    RETRY_AFTER_KEY: retry_ms,
                },
            },
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, -(-retry_ms // 1000))).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _meta_value(meta: Any, key: str) -> Any:
    """`_meta[key]` from the SDK's params meta (a mapping or a model with extras); "" if absent."""
    if meta is None:
        return ""
    if isinstance(meta, dict):
        return meta.get(key, "")
    extra = getattr(meta, "model_extra", None) or {}
    return extra.get(key, getattr(meta, key, ""))


def _refusal(err: E.TetherError) -> types.CallToolResult:
    """A refusal as an MCP tool error: the model reads why; nothing secret is in it."""
    body = {"error": err.reason, "message": err.message}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"{err.reason}: {err.message}")],
        structured_content=body,
        is_error=True,
        _meta={"tether/status": err.reason},
    )
