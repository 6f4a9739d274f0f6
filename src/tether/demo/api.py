"""A real local HTTP service standing in for a third-party API in the demo.

It requires the bearer token the sidecar injects, and it fences writers: a
write carrying an `X-Tether-Fencing-Token` lower than the highest one it has
seen for the same resource is refused with 409, so a stale lease holder cannot
overwrite a newer one even if it slips past the control plane. It records what
it saw (never the token itself: only whether it matched) for the demo's report.

Run as a process (`python -m tether.demo.api --token-file F --log W`), it is the
chaos suite's fencing sink: every write, accepted or refused, is appended to the
JSON-lines log W (resource, fencing token, the body's "key", time, verdict) and
flushed before the reply, so the log outlives the process and a harness can
check fencing and exactly-once side effects from it.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any


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
    log: IO[str] | None = None
    """Where every write is appended as a JSON line (the chaos sink), if anywhere."""

    def record(self, entry: dict[str, Any]) -> None:
        """Appends one write to the log and flushes it (call with `lock` held)."""
        if self.log is not None:
            self.log.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self.log.flush()

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
            key = _body_key(body)
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
                state.record(
                    {"resource": resource, "token": token, "key": key, "highest": highest,
                     "accepted": not stale, "unix_ms": int(time.time() * 1000)}
                )  # fmt: skip
            if stale:
                self._reply(
                    409,
                    {"error": f"stale fencing token {token} < {highest} for {resource}"},
                )
                return
            self._reply(200, {"stored": resource, "fencing_token": token})

    return Handler


def _body_key(body: bytes) -> str:
    """The "key" field of a JSON object body (what the chaos agents send), or ""."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    key = doc.get("key") if isinstance(doc, dict) else None
    return key if isinstance(key, str) else ""


class DemoApi:
    """The service on 127.0.0.1 (port 0 picks a free port)."""

    def __init__(self, token: bytes, port: int = 0, log: IO[str] | None = None) -> None:
        self.state = ApiState(token=token, log=log)
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


def main(argv: list[str] | None = None) -> int:
    """Serves until SIGTERM/SIGINT; writes its URL to --ready-file once listening."""
    p = argparse.ArgumentParser(description="A fencing HTTP sink: refuses stale fencing tokens.")
    p.add_argument("--token-file", required=True, help="the bearer token callers must present")
    p.add_argument("--log", required=True, help="JSON-lines file every write is appended to")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--ready-file", help="the URL is written here once serving")
    args = p.parse_args(argv)
    token = Path(args.token_file).read_bytes().strip()
    with open(args.log, "a", encoding="utf-8") as log:
        api = DemoApi(token, args.port, log=log).start()
        if args.ready_file:
            tmp = f"{args.ready_file}.tmp"
            Path(tmp).write_text(api.url + "\n")
            os.replace(tmp, args.ready_file)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
