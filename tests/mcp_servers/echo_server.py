"""A tiny, real stdio MCP server for tests (stdlib only; runs under the sandbox).

JSON-RPC 2.0, one message per line on stdin/stdout, per the MCP stdio
transport: `initialize` -> protocolVersion/capabilities/serverInfo,
`notifications/initialized`, `ping`, `tools/list`, `tools/call`. Its tools
misbehave on request so the adapter's failure paths can be tested for real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

TOOLS = (
    "echo",
    "env",
    "b64env",
    "sha256env",
    "whoami",
    "sleep",
    "fail",
    "crash",
    "garbage",
    "meta",
)


def _text(value: Any, *, error: bool = False) -> dict[str, Any]:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {"content": [{"type": "text", "text": text}], "isError": error}


def _call(name: str, args: dict[str, Any], meta: Any = None) -> dict[str, Any]:
    if name == "meta":  # what the client sent in the request's _meta
        return _text(meta)
    if name == "echo":
        return {**_text(args), "structuredContent": {"args": args}}
    if name == "env":
        return _text(dict(os.environ))
    if name == "b64env":
        return _text(base64.b64encode(os.environb.get(args["var"].encode(), b"")).decode())
    if name == "sha256env":
        return _text(hashlib.sha256(os.environb.get(args["var"].encode(), b"")).hexdigest())
    if name == "whoami":
        return _text({"pid": os.getpid(), "cwd": os.getcwd()})
    if name == "sleep":
        if args.get("spawn"):  # leave a grandchild in the server's process group
            child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
            return _text({"server": os.getpid(), "grandchild": child.pid})
        time.sleep(float(args.get("seconds", 60)))
        return _text("slept")
    if name == "fail":
        return _text("the tool failed on purpose", error=True)
    if name == "crash":
        sys.stderr.write("echo_server: crashing on request\n")
        sys.stderr.flush()
        os._exit(3)
    if name == "garbage":
        sys.stdout.write("this is not json\n")
        sys.stdout.flush()
        time.sleep(60)
    return _text(f"unknown tool {name}", error=True)


def _handle(msg: dict[str, Any]) -> dict[str, Any] | None:
    method, rid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
    if rid is None:  # a notification (notifications/initialized, cancelled, ...)
        return None
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "tether-echo", "version": "1.0"},
        }
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": [{"name": t, "inputSchema": {"type": "object"}} for t in TOOLS]}
    elif method == "tools/call":
        if params.get("name") not in TOOLS:
            return {
                "jsonrpc": "2.0",
                "id": rid,
                "error": {"code": -32602, "message": f"Unknown tool: {params.get('name')}"},
            }
        result = _call(params["name"], params.get("arguments") or {}, params.get("_meta"))
    else:
        return {
            "jsonrpc": "2.0",
            "id": rid,
            "error": {"code": -32601, "message": "Method not found"},
        }
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def main() -> None:
    """Serves requests until stdin closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = _handle(json.loads(line))
        if reply is not None:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
