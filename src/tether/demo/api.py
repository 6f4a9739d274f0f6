"""A real local HTTP service standing in for a third-party API in the demo.

It requires the bearer token the sidecar injects, and it fences writers: a
write carrying an `X-Tether-Fencing-Token` lower than the highest one it has
seen for the same resource is refused with 409, so a stale lease holder cannot
overwrite a newer one even if it slips past the control plane. It records what
it saw (never the token itself: only whether it matched) for the demo's report.
"""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ApiState:
    """What the service has seen, guarded by a lock (requests arrive on threads)."""

    token: bytes
    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[dict[str, Any]] = field(default_factory=list)
    refused_stale: list[dict[str, Any]] = field(default_factory=list)
    unauthorized: int = 0
    highest_token: dict[str, int] = field(default_factory=dict)
    fencing_tokens_seen: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "writes": list(self.writes),
                "refused_stale": list(self.refused_stale),
                "unauthorized": self.unauthorized,
                "fencing_tokens_seen": list(self.fencing_tokens_seen),
            }


def _handler(state: ApiState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "DemoAPI/1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            got = self.headers.get("Authorization", "").encode()
            ok = hmac.compare_digest(got, b"Bearer " + state.token)
            if not ok:
                with state.lock:
                    state.unauthorized += 1
            return ok

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"ok": True})
                return
            if not self._authorized():
                self._reply(401, {"error": "missing or wrong bearer token"})
                return
            self._reply(200, {"path": self.path, "ok": True})

        def do_POST(self) -> None:
            if not self._authorized():
                self._reply(401, {"error": "missing or wrong bearer token"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                token = int(self.headers.get("X-Tether-Fencing-Token", ""))
            except ValueError:
                self._reply(400, {"error": "X-Tether-Fencing-Token header required"})
                return
            resource = self.path.split("?")[0]
            with state.lock:
                state.fencing_tokens_seen.append(token)
                highest = state.highest_token.get(resource, 0)
                if token < highest:
                    state.refused_stale.append({"resource": resource, "token": token})
                    stale = True
                else:
                    state.highest_token[resource] = token
                    state.writes.append({"resource": resource, "token": token, "bytes": len(body)})
                    stale = False
            if stale:
                self._reply(
                    409,
                    {"error": f"stale fencing token {token} < {highest} for {resource}"},
                )
                return
            self._reply(200, {"stored": resource, "fencing_token": token})

    return Handler


class DemoApi:
    """The service on 127.0.0.1 (port 0 picks a free port)."""

    def __init__(self, token: bytes, port: int = 0) -> None:
        self.state = ApiState(token=token)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.state))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> DemoApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
