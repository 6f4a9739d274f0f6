"""The `http` adapter: the policy fixes the base URL, the agent supplies the rest.

The agent may pass `method`, `path` (appended to the base URL's path, no `..`,
no scheme or host), `query`, `headers` (never authorization or cookies) and
`body` (a string, or any JSON value sent as `application/json`). The sidecar
injects the credential through the policy's header template and adds
`X-Tether-Fencing-Token`, so the downstream service can refuse stale writers.
The host allowlist is checked on the base URL and on every redirect target;
credentials are never re-sent to another origin. Responses are capped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit

from tether.core.errors import ConfigError, InvalidArgument, PolicyDenied, ResourceExhausted
from tether.core.policy import HttpSpec, ToolSpec
from tether.sidecar.tools.base import FENCING_HEADER, ToolContext, ToolResult

MAX_REDIRECTS = 5
COST_HEADER = "X-Tether-Cost-Micros"
ARG_KEYS = ("method", "path", "query", "headers", "body")
_REDIRECTS = (301, 302, 303, 307, 308)
_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        FENCING_HEADER.lower(),
    }
)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


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


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class HttpTool:
    """Calls one policy-fixed HTTP service with the credential injected."""

    def __init__(self, spec: ToolSpec) -> None:
        if spec.http is None:
            raise ConfigError(f"tool {spec.name!r} has no http section")
        self.spec = spec
        self.http: HttpSpec = spec.http
        self.name = spec.name
        self.timeout_ms = spec.timeout_ms

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
            if lower in _RESERVED_HEADERS:
                raise InvalidArgument("args.headers", f"{name!r} is managed by the sidecar")
            if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                raise InvalidArgument("args.headers", f"{name!r} needs a single-line string")
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
        headers[FENCING_HEADER] = str(ctx.fencing_token)
        return method, url, headers, body

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Performs the request (and allowed redirects) and returns status, headers, body."""
        method, url, headers, body = self._request_parts(ctx, args)
        base = urlsplit(self.http.base_url)
        if not host_allowed(ctx.network_allowlist, self.http.host, self.http.port):
            raise self._deny(
                f"host {base.netloc!r} is not on the queue's network allowlist", host=base.netloc
            )
        limit = self.timeout_ms / 1000
        if ctx.timeout_s is not None:
            limit = min(limit, ctx.timeout_s)
        deadline = time.monotonic() + limit
        resp = await asyncio.to_thread(self._exchange, ctx, method, url, headers, body, deadline)
        value: dict[str, Any] = {
            "status": resp.status,
            "reason": resp.reason,
            "headers": resp.headers,
        }
        try:
            value["body"] = resp.body.decode("utf-8")
        except UnicodeDecodeError:
            value["body_base64"] = base64.b64encode(resp.body).decode()
        if "json" in resp.headers.get("content-type", "") and "body" in value:
            with contextlib.suppress(ValueError):
                value["json"] = json.loads(value["body"])
        cost: int | None = None
        reported = resp.headers.get(COST_HEADER.lower(), "")
        if reported.isdigit():
            cost = int(reported)
        return ToolResult(
            value=value, status="ok" if resp.status < 400 else "error", cost_micros=cost
        )

    def _exchange(
        self,
        ctx: ToolContext,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        deadline: float,
    ) -> _Response:
        origin = urlsplit(url)[:2]
        for hop in range(MAX_REDIRECTS + 1):
            resp = self._once(method, url, headers, body, deadline)
            location = resp.headers.get("location")
            if resp.status not in _REDIRECTS or location is None:
                return resp
            target = urljoin(url, location)
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise self._deny("redirect to a non-http(s) URL refused")
            port = parts.port or (443 if parts.scheme == "https" else 80)
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
                    k: v for k, v in headers.items() if k.lower() != self.http.auth_header.lower()
                }
            url = target
        raise ResourceExhausted(
            f"tool {self.name!r}: more than {MAX_REDIRECTS} redirects", metadata={"tool": self.name}
        )

    def _once(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, deadline: float
    ) -> _Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        parts = urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, parts.port, timeout=remaining, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=remaining)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        cap = self.http.max_response_bytes
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            resp_headers: dict[str, str] = {}
            for name, value in resp.getheaders():
                key = name.lower()
                resp_headers[key] = (
                    f"{resp_headers[key]}, {value}" if key in resp_headers else value
                )
            length = resp_headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise ResourceExhausted(
                    f"tool {self.name!r}: response of {length} bytes exceeds {cap}",
                    metadata={"tool": self.name},
                )
            data = resp.read(cap + 1) if method != "HEAD" else b""
            if len(data) > cap:
                raise ResourceExhausted(
                    f"tool {self.name!r}: response exceeds {cap} bytes",
                    metadata={"tool": self.name},
                )
            return _Response(resp.status, resp.reason, resp_headers, data)
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, TimeoutError):
                raise
            return _Response(502, "Bad Gateway", {}, f"{type(err).__name__}: {err}".encode())
        finally:
            conn.close()
