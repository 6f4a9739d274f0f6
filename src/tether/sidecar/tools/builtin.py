"""Built-in python tools for tests and the demo (`tether.sidecar.tools.builtin:NAME`)."""

from __future__ import annotations

import base64
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tether.core.errors import InvalidArgument, PolicyDenied
from tether.sidecar.tools.base import ToolContext, ToolResult


def echo(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """Returns its arguments; with `reveal_credentials` it also returns every credential
    it was given (raw and base64), so leak tests can prove redaction catches them."""
    out: dict[str, Any] = {"args": dict(args), "task_id": ctx.task_id, "attempt": ctx.attempt}
    if args.get("reveal_credentials"):
        out["credentials"] = {k: v.decode("utf-8", "replace") for k, v in ctx.credentials.items()}
        out["credentials_b64"] = {
            k: base64.b64encode(v).decode() for k, v in ctx.credentials.items()
        }
    return out


async def noop(ctx: ToolContext, args: Mapping[str, Any]) -> None:
    """Does nothing and returns null.

    Async, so it runs on the event loop: a sync callable is handed to a thread
    (`tether.sidecar.tools.python`), a round trip worth more than nothing.
    """
    return None


def cost(ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
    """Reports the cost given in `args.cost_micros` (for budget settlement tests)."""
    reported = args.get("cost_micros")
    if isinstance(reported, bool) or not isinstance(reported, int) or reported < 0:
        raise InvalidArgument("args.cost_micros", "must be a non-negative integer")
    return ToolResult(value={"cost_micros": reported}, cost_micros=reported)


def append_line(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """Appends `args.line` to a file: policy `config.path` if set (shared across sidecars,
    for idempotency tests), else `args.file` (default `lines.txt`) inside the workspace."""
    line = args.get("line")
    if not isinstance(line, str) or "\n" in line:
        raise InvalidArgument("args.line", "must be a single-line string")
    configured = ctx.config.get("path")
    if isinstance(configured, str):
        target = Path(configured)
    else:
        name = args.get("file", "lines.txt")
        if not isinstance(name, str):
            raise InvalidArgument("args.file", "must be a string")
        workspace = os.path.realpath(ctx.workspace)
        real = os.path.realpath(os.path.join(workspace, name))
        if not real.startswith(workspace + os.sep):
            raise PolicyDenied(
                f"tool {ctx.tool_name or 'append_line'!r}: file {name!r} is outside the workspace",
                metadata={"tool": ctx.tool_name or "append_line"},
            )
        target = Path(real)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    with target.open(encoding="utf-8") as f:
        count = sum(1 for _ in f)
    return {"path": str(target), "lines": count}


async def sleep(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """Sleeps `args.seconds` (for timeout tests)."""
    import asyncio

    seconds = args.get("seconds", 1)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidArgument("args.seconds", "must be a number")
    await asyncio.sleep(float(seconds))
    return {"slept": seconds}
