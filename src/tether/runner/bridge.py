"""`tether mcp`: a stdio MCP server that relays every message to the sidecar's MCP server.

For MCP clients that can only spawn stdio servers (many desktop agents do):
the client starts `tether mcp` as its server; this process forwards each
JSON-RPC message, unchanged, to the sidecar over Streamable HTTP (its Unix
socket or loopback TCP) with the lease's bearer token, and relays the answers
back. It is a transport bridge, not a second server: the sidecar decides
everything, the `_meta` idempotency key included. The only thing it adds is
what the HTTP transport needs per message (the protocol version, and for the
current per-request revision the method and name headers), which a stdio
client never sends.

Where to connect and the token come from the environment `tether run` sets
(`TETHER_MCP_URL` or `TETHER_MCP_SOCKET`, `TETHER_MCP_TOKEN`), or from flags;
the token is never accepted on the command line (other users can read argv),
only from the environment or a file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import JSONRPCNotification, JSONRPCRequest, JSONRPCResponse
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

log = logging.getLogger("tether.mcp.bridge")

PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"


class _Stamper:
    """Adds the per-message HTTP headers a stdio client does not send.

    The current revision puts the protocol version in each request's `_meta`;
    the handshake revisions negotiate it in `initialize`, whose answer is
    watched on the way back.
    """

    def __init__(self) -> None:
        self.negotiated: str | None = None
        self._initialize_ids: set[Any] = set()

    def outgoing(self, message: SessionMessage) -> SessionMessage:
        root = message.message
        method = getattr(root, "method", None)
        if not isinstance(root, JSONRPCRequest | JSONRPCNotification) or method is None:
            return message
        params: Mapping[str, Any] = root.params or {}
        meta = params.get("_meta") if isinstance(params, Mapping) else None
        version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, Mapping) else None
        headers: dict[str, str] = {}
        if method == "initialize":
            if isinstance(root, JSONRPCRequest):
                self._initialize_ids.add(root.id)
            self.negotiated = None
        elif isinstance(version, str) and version in MODERN_PROTOCOL_VERSIONS:
            headers[MCP_PROTOCOL_VERSION_HEADER] = version
            headers[MCP_METHOD_HEADER] = method
            name_key = NAME_BEARING_METHODS.get(method)
            name = params.get(name_key) if name_key is not None else None
            if isinstance(name, str):
                headers[MCP_NAME_HEADER] = encode_header_value(name)
        elif self.negotiated is not None:
            headers[MCP_PROTOCOL_VERSION_HEADER] = self.negotiated
        if not headers:
            return message
        return SessionMessage(message=root, metadata=ClientMessageMetadata(headers=headers))

    def incoming(self, message: SessionMessage) -> None:
        root = message.message
        if isinstance(root, JSONRPCResponse) and root.id in self._initialize_ids:
            self._initialize_ids.discard(root.id)
            version = (root.result or {}).get("protocolVersion")
            if isinstance(version, str):
                self.negotiated = version


async def bridge(url: str, token: str, unix_socket: str = "") -> None:
    """Relays stdin/stdout MCP to the sidecar until stdin closes."""
    headers = {"Authorization": f"Bearer {token}"}
    transport = httpx2.AsyncHTTPTransport(uds=unix_socket) if unix_socket else None
    timeout = httpx2.Timeout(30.0, read=300.0)
    http = httpx2.AsyncClient(headers=headers, transport=transport, timeout=timeout)
    stamper = _Stamper()
    async with (
        http,
        stdio_server() as (stdin, stdout),
        streamable_http_client(url, http_client=http) as (from_sidecar, to_sidecar),
        anyio.create_task_group() as tg,
    ):

        async def up() -> None:
            async with to_sidecar:
                async for item in stdin:
                    if isinstance(item, Exception):
                        log.warning("unreadable message from the client: %s", item)
                        continue
                    await to_sidecar.send(stamper.outgoing(item))
            tg.cancel_scope.cancel()  # the client closed stdin: we are done

        async def down() -> None:
            async with stdout:
                async for item in from_sidecar:
                    if isinstance(item, Exception):
                        log.warning("error from the sidecar transport: %s", item)
                        continue
                    stamper.incoming(item)
                    await stdout.send(item)

        tg.start_soon(up)
        tg.start_soon(down)
