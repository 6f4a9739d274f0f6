"""The `http` adapter: the policy fixes the base URL, the agent supplies the rest.

The agent may pass `method`, `path` (appended to the base URL's path, no `..`,
no scheme or host), `query`, `headers` (only those the tool's `allowed_headers`
lists, never authorization, cookies, framing, encoding or range headers) and
`body` (a string, or any JSON value sent as `application/json`). The sidecar
injects the credential through the policy's header template and adds
`X-Tether-Fencing-Token`, so the downstream service can refuse stale writers.
The host allowlist is checked on the base URL and on every redirect target;
credentials are never re-sent to another origin.

Responses are asked for as `Accept-Encoding: identity`. A body that comes back
gzip- or deflate-encoded anyway is decoded in full (bounded by
`max_response_bytes` of decoded output, so a decompression bomb stops at the
cap) before it is returned, so redaction sees the plain text; any other coding,
a body that does not decode, and every partial response (206 or
`Content-Range`) are withheld (an error result naming why, no body). A slice
or an encoding of the credential never reaches the agent whole-but-disguised.

The call is async end to end (httpx's request and response types over an
httpcore connection pool; name lookups run on this module's own threads, never
the event loop's default executor), and one deadline, min(timeout_ms, the time
left on the lease), bounds the whole call: connect, send, every redirect and
the body. httpx's client layer is skipped on purpose: it would add a cookie jar,
proxies and netrc from the environment, basic auth from URL userinfo, automatic
decoding and request logging, none of which a mediated call should have.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import json
import logging
import re
import socket
import ssl
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit

import httpcore
import httpx

from tether.core.errors import ConfigError, InvalidArgument, PolicyDenied, ResourceExhausted
from tether.core.policy import (
    HTTP_RESERVED_HEADER_PREFIX,
    HTTP_RESERVED_HEADERS,
    HttpSpec,
    ToolSpec,
)
from tether.sidecar.redaction import Redactor
from tether.sidecar.tools.base import FENCING_HEADER, ToolContext, ToolResult

MAX_REDIRECTS = 5
MAX_CONTENT_CODINGS = 3
COST_HEADER = "X-Tether-Cost-Micros"
ARG_KEYS = ("method", "path", "query", "headers", "body")
RESOLVER_THREADS = 4
_REDIRECTS = (301, 302, 303, 307, 308)
_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_CODINGS = {"gzip": _GZIP_WBITS, "x-gzip": _GZIP_WBITS, "deflate": zlib.MAX_WBITS}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_NETWORK_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    httpx.TransportError,
    httpx.InvalidURL,  # e.g. a redirect's Location
    OSError,
)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


# httpcore's DEBUG trace logs response headers verbatim, so a server echoing the
# credential in a header would put it in the sidecar's log (the leak scan caught it).
# Its loggers are quiet by level and, should someone turn them up, by filter.
logging.getLogger("httpcore").setLevel(logging.WARNING)
for _name in ("connection", "http11", "http2", "proxy", "socks"):
    logging.getLogger(f"httpcore.{_name}").addFilter(_DropRecords())


def host_allowed(allowlist: tuple[str, ...], host: str, port: int) -> bool:
    """True when `host:port` matches an allowlist entry ("host" means any port)."""
    host = host.lower().strip("[]")
    for entry in allowlist:
        entry = entry.lower()
        if entry.startswith("["):
            name, _, rest = entry[1:].partition("]")
            want = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            name, want = entry.split(":")
        else:
            name, want = entry, ""
        if name == host and (not want or int(want) == port):
            return True
    return False


# --------------------------------------------------------------------------- transport


@functools.cache
def _resolver_pool() -> ThreadPoolExecutor:
    """Threads for getaddrinfo, so a slow resolver stalls only http calls, never the node."""
    return ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="tether-http-dns")


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The system trust store, loaded once per process (not per call, not on every loop turn)."""
    return ssl.create_default_context()


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of `host`: itself when it is an IP literal, else getaddrinfo's answer."""
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host.strip("[]")))]
    lookup = functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = await asyncio.get_running_loop().run_in_executor(_resolver_pool(), lookup)
    except OSError as err:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {err}") from err
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Backend(httpcore.AsyncNetworkBackend):
    """anyio's TCP backend, fed IP addresses resolved on `_resolver_pool` threads."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: httpcore.ConnectError | None = None
        for address in await _resolve(host, port):
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as err:
                failure = err
        raise failure or httpcore.ConnectError(f"{host!r} has no address")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("http tools reach TCP hosts only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class _Transport(httpx.AsyncBaseTransport):
    """One call's connections: HTTP/1.1, no keep-alive, no retries, no proxy, no env."""

    def __init__(self) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_keepalive_connections=0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_Backend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("the http adapter sends async request bodies only")
        url = request.url
        response = await self._pool.handle_async_request(
            httpcore.Request(
                method=request.method,
                url=httpcore.URL(
                    scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
                ),
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
        )
        if not isinstance(response.stream, AsyncIterable):
            raise TypeError("httpcore returned a sync stream to an async pool")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


# --------------------------------------------------------------------------- decoding


class _Undecodable(Exception):
    """The body's content coding is not what it claims (or ends early)."""


class _TooLarge(Exception):
    """Decoding would produce more than the response cap."""


class _Inflater:
    """Undoes one gzip/deflate coding, never holding more than `cap` bytes of output."""

    def __init__(self, coding: str, cap: int) -> None:
        self._coding = coding
        self._cap = cap
        self._produced = 0
        self._pending = b""  # deflate: bytes kept until its header can be sniffed
        self._z: Any = None  # zlib's decompress object (its type is not public)

    def _start(self, data: bytes) -> bool:
        wbits = _CODINGS[self._coding]
        if self._coding == "deflate":
            # "deflate" is meant to be zlib-wrapped; some servers send raw deflate.
            if len(data) < 2:
                return False
            zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)
        return True

    def _take(self, chunk: bytes) -> bytes:
        self._produced += len(chunk)
        if self._produced > self._cap:
            raise _TooLarge
        return chunk

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        data = self._pending + data
        self._pending = b""
        try:
            while data:
                if self._z is None and not self._start(data):
                    self._pending = data
                    break
                if self._z.eof:
                    if _CODINGS[self._coding] != _GZIP_WBITS:
                        raise _Undecodable(f"data after the end of the {self._coding} stream")
                    self._start(data)  # gzip members may follow one another
                out.append(self._take(self._z.decompress(data, self._cap - self._produced + 1)))
                data = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
        except zlib.error as err:
            raise _Undecodable(f"{self._coding}: {err}") from None
        return b"".join(out)

    def finish(self) -> bytes:
        if self._z is None:
            if self._pending:
                raise _Undecodable(f"{self._coding} body too short")
            return b""  # an empty body (e.g. a 204) with the header set
        try:
            tail = self._take(self._z.flush(self._cap - self._produced + 1))
        except zlib.error as err:
            raise _Undecodable(f"{self._coding}: {err}") from None
        if not self._z.eof:
            raise _Undecodable(f"{self._coding} body ended before its end marker")
        return tail


class _Decoder:
    """Undoes a response's content codings (last applied, first undone), each bounded."""

    def __init__(self, codings: list[str], cap: int) -> None:
        self._stages = [_Inflater(coding, cap) for coding in reversed(codings)]

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.feed(data)
        return data

    def finish(self) -> bytes:
        data = b""
        for stage in self._stages:
            data = stage.feed(data) + stage.finish()
        return data


def _codings(header: str) -> list[str] | None:
    """The non-identity content codings named by `header`; None if one is not decodable."""
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > MAX_CONTENT_CODINGS or any(c not in _CODINGS for c in codings):
        return None
    return codings


# --------------------------------------------------------------------------- the tool


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    refused: str = ""  # why the body is withheld (an error code), or ""
    detail: str = ""


class HttpTool:
    """Calls one policy-fixed HTTP service with the credential injected."""

    def __init__(self, spec: ToolSpec) -> None:
        if spec.http is None:
            raise ConfigError(f"tool {spec.name!r} has no http section")
        self.spec = spec
        self.http: HttpSpec = spec.http
        self.name = spec.name
        self.timeout_ms = spec.timeout_ms
        self._allowed_headers = frozenset(h.lower() for h in self.http.allowed_headers)

    def _deny(self, message: str, **meta: str) -> PolicyDenied:
        return PolicyDenied(f"tool {self.name!r}: {message}", metadata={"tool": self.name, **meta})

    def _request_parts(
        self, ctx: ToolContext, args: Mapping[str, Any]
    ) -> tuple[str, str, dict[str, str], bytes | None]:
        for key in args:
            if key not in ARG_KEYS:
                raise self._deny(f"argument {key!r} is not accepted", argument=key)
        method = args.get("method", "GET")
        if not isinstance(method, str) or method.upper() not in self.http.allowed_methods:
            raise self._deny(f"method {method!r} is not allowed", method=str(method))
        method = method.upper()

        path = args.get("path", "")
        if not isinstance(path, str):
            raise InvalidArgument("args.path", "must be a string")
        if any(c in path for c in "?#\\") or any(ord(c) < 33 or ord(c) == 127 for c in path):
            raise InvalidArgument("args.path", "must not hold '?', '#', '\\', spaces or controls")
        if path.startswith("//") or "://" in path:
            raise self._deny("path must not name a scheme or host")
        if ".." in unquote(path).split("/"):
            raise self._deny("path must not contain '..'")
        base = urlsplit(self.http.base_url)
        full_path = base.path.rstrip("/") + "/" + path.lstrip("/") if path else base.path or "/"
        full_path = quote(full_path, safe=_PATH_SAFE) or "/"

        query = args.get("query")
        if query is None or query == "":
            qs = ""
        elif isinstance(query, str):
            qs = query.lstrip("?")
        elif isinstance(query, Mapping):
            qs = urlencode(
                {str(k): v if isinstance(v, list) else str(v) for k, v in query.items()},
                doseq=True,
            )
        else:
            raise InvalidArgument("args.query", "must be a string or an object")
        if any(ord(c) < 33 or c == "#" for c in qs):
            raise InvalidArgument("args.query", "must not hold spaces, controls or '#'")
        url = f"{base.scheme}://{base.netloc}{full_path}" + (f"?{qs}" if qs else "")

        headers: dict[str, str] = {}
        raw_headers = args.get("headers") or {}
        if not isinstance(raw_headers, Mapping):
            raise InvalidArgument("args.headers", "must be an object")
        auth = self.http.auth_header.lower()
        for name, value in raw_headers.items():
            if not isinstance(name, str) or not _TOKEN_RE.match(name):
                raise InvalidArgument("args.headers", f"{name!r} is not a header name")
            lower = name.lower()
            if lower in _AUTH_HEADERS or lower == auth:
                raise self._deny(
                    f"header {name!r} is set by the sidecar, not the agent", header=name
                )
            if (
                lower not in self._allowed_headers
                or lower in HTTP_RESERVED_HEADERS
                or lower.startswith(HTTP_RESERVED_HEADER_PREFIX)
            ):
                raise self._deny(
                    f"header {name!r} is not in the tool's allowed_headers", header=name
                )
            if (
                not isinstance(value, str)
                or not value.isascii()
                or any(c in value for c in "\r\n\0")
            ):
                raise InvalidArgument("args.headers", f"{name!r} needs a single-line ASCII string")
            headers[name] = value

        body: bytes | None = None
        raw_body = args.get("body")
        if isinstance(raw_body, str):
            body = raw_body.encode()
        elif raw_body is not None:
            body = json.dumps(raw_body, separators=(",", ":")).encode()
            if not any(h.lower() == "content-type" for h in headers):
                headers["Content-Type"] = "application/json"

        if self.spec.credential is not None:
            secret = ctx.credential(self.spec.credential)
            try:
                secret_text = secret.decode("ascii")
            except UnicodeDecodeError:
                raise self._deny("credential is not ASCII and cannot go in a header") from None
            if any(ord(c) < 32 or ord(c) == 127 for c in secret_text):
                raise self._deny("credential holds control characters")
            headers[self.http.auth_header] = self.http.auth_template.replace(
                "{secret}", secret_text
            )
        headers["Accept-Encoding"] = "identity"  # encoded bodies hide secrets from redaction
        headers[FENCING_HEADER] = str(ctx.fencing_token)
        return method, url, headers, body

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Performs the request (and allowed redirects) and returns status, headers, body.

        Raises:
            PolicyDenied: the call leaves its grant (header, path, host, redirect target).
            ResourceExhausted: the body (raw or decoded) is larger than max_response_bytes,
                or there were more than MAX_REDIRECTS redirects.
            TimeoutError: the deadline passed (`run_tool` turns it into ToolTimeout).
        """
        method, url, headers, body = self._request_parts(ctx, args)
        base = urlsplit(self.http.base_url)
        if not host_allowed(ctx.network_allowlist, self.http.host, self.http.port):
            raise self._deny(
                f"host {base.netloc!r} is not on the queue's network allowlist", host=base.netloc
            )
        limit = self.timeout_ms / 1000
        if ctx.timeout_s is not None:
            limit = min(limit, ctx.timeout_s)
        async with asyncio.timeout(max(limit, 0.0)) as scope:
            resp = await self._exchange(ctx, method, url, headers, body, scope)
        value: dict[str, Any] = {
            "status": resp.status,
            "reason": resp.reason,
            "headers": resp.headers,
        }
        if resp.refused:
            value["error"] = resp.refused
            value["message"] = resp.detail
        else:
            try:
                value["body"] = resp.body.decode("utf-8")
            except UnicodeDecodeError:
                # Base64 would hide the hex or URL-encoded forms from the redactor: scrub first.
                scrubbed = Redactor(ctx.credentials.values()).redact_bytes(resp.body)
                value["body_base64"] = base64.b64encode(scrubbed).decode()
            if "json" in resp.headers.get("content-type", "") and "body" in value:
                with contextlib.suppress(ValueError):
                    value["json"] = json.loads(value["body"])
        cost: int | None = None
        reported = resp.headers.get(COST_HEADER.lower(), "")
        if reported.isdigit():
            cost = int(reported)
        ok = resp.status < 400 and not resp.refused
        return ToolResult(value=value, status="ok" if ok else "error", cost_micros=cost)

    async def _exchange(
        self,
        ctx: ToolContext,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        scope: asyncio.Timeout,
    ) -> _Response:
        origin = urlsplit(url)[:2]
        async with _Transport() as transport:
            for hop in range(MAX_REDIRECTS + 1):
                resp = await self._once(transport, method, url, headers, body, scope)
                location = resp.headers.get("location")
                if resp.status not in _REDIRECTS or location is None:
                    return resp
                parts = urlsplit(urljoin(url, location))
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise self._deny("redirect to a non-http(s) URL refused")
                try:
                    port = parts.port or (443 if parts.scheme == "https" else 80)
                except ValueError:
                    raise self._deny("redirect to a URL with an invalid port refused") from None
                if not host_allowed(ctx.network_allowlist, parts.hostname, port):
                    raise self._deny(
                        f"redirect to host {parts.netloc!r} is not on the network allowlist",
                        host=parts.netloc,
                    )
                if not self.http.follow_redirects:
                    return resp
                if hop == MAX_REDIRECTS:
                    break
                if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                    method, body = ("HEAD" if method == "HEAD" else "GET"), None
                    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                if (parts.scheme, parts.netloc) != origin:
                    # Never hand the credential to another origin (or over a downgraded scheme).
                    headers = {
                        k: v
                        for k, v in headers.items()
                        if k.lower() != self.http.auth_header.lower()
                    }
                netloc = parts.netloc.rpartition("@")[2]  # userinfo in a Location is dropped
                url = f"{parts.scheme}://{netloc}{parts.path or '/'}"
                url += f"?{parts.query}" if parts.query else ""
        raise ResourceExhausted(
            f"tool {self.name!r}: more than {MAX_REDIRECTS} redirects", metadata={"tool": self.name}
        )

    def _too_large(self, what: str) -> ResourceExhausted:
        cap = self.http.max_response_bytes
        return ResourceExhausted(
            f"tool {self.name!r}: {what} exceeds {cap} bytes", metadata={"tool": self.name}
        )

    async def _once(
        self,
        transport: _Transport,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        scope: asyncio.Timeout,
    ) -> _Response:
        when = scope.when()
        left = None if when is None else max(when - asyncio.get_running_loop().time(), 0.001)
        try:
            request = httpx.Request(
                method,
                url,
                headers=headers,
                content=body,
                extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), left)},
            )
            resp = await transport.handle_async_request(request)
        except (httpcore.TimeoutException, TimeoutError):
            raise TimeoutError from None
        except _NETWORK_ERRORS as err:
            return _Response(502, "Bad Gateway", {}, f"{type(err).__name__}: {err}".encode())
        try:
            return await self._receive(method, resp)
        except (httpcore.TimeoutException, TimeoutError):
            raise TimeoutError from None
        except _NETWORK_ERRORS as err:
            return _Response(502, "Bad Gateway", {}, f"{type(err).__name__}: {err}".encode())
        finally:
            await resp.aclose()

    async def _receive(self, method: str, resp: httpx.Response) -> _Response:
        """Reads the body within the cap, decoding it; withholds partial or opaque bodies."""
        headers: dict[str, str] = {}
        for name, value in resp.headers.multi_items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        out = _Response(resp.status_code, resp.reason_phrase, headers, b"")
        if resp.status_code == 206 or "content-range" in headers:
            out.refused = "partial_response_refused"
            out.detail = "partial responses are withheld: redaction needs the whole body"
            return out
        codings = _codings(headers.get("content-encoding", ""))
        if codings is None:
            out.refused = "unsupported_content_encoding"
            out.detail = (
                f"content-encoding {headers['content-encoding']!r} is not decoded "
                "(gzip, x-gzip and deflate are), so the body is withheld"
            )
            return out
        cap = self.http.max_response_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise self._too_large(f"response of {length} bytes")
        if method == "HEAD":
            return out
        decoder = _Decoder(codings, cap) if codings else None
        parts: list[bytes] = []
        received = 0
        try:
            async for chunk in resp.aiter_raw():
                received += len(chunk)
                if received > cap:
                    raise self._too_large("response body")
                parts.append(decoder.feed(chunk) if decoder else chunk)
            if decoder is not None:
                parts.append(decoder.finish())
        except _TooLarge:
            raise self._too_large("decoded response body") from None
        except _Undecodable as err:
            out.refused = "undecodable_body"
            out.detail = f"the {headers['content-encoding']!r} body does not decode: {err}"
            return out
        out.body = b"".join(parts)
        if codings:
            del headers["content-encoding"]
            headers["content-length"] = str(len(out.body))
        return out
