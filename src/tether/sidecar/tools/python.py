"""The `python` adapter: an in-process `module:function` called with (ctx, args).

For trusted in-process tools and tests: the callable runs inside the sidecar,
so it gets no filesystem or environment confinement beyond what it does itself.
It may be sync or async and may return a `ToolResult` or any JSON-able value.
Sync callables run on a small pool of their own threads, never on the event
loop, so a slow one cannot stall the node's other agents and its timeout is
answered on time (Python cannot kill a thread: a sync tool that ignores its
deadline keeps its thread until it returns; untrusted code belongs in `exec`).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from tether.core.errors import ConfigError
from tether.core.policy import ToolSpec
from tether.sidecar.tools.base import ToolContext, ToolResult

_SYNC_TOOLS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tether-python-tool")
"""Threads for sync python tools, apart from asyncio's default pool (spool, memory)."""


def load_entrypoint(entrypoint: str) -> Callable[..., Any]:
    """Imports `module:function` (dotted attributes allowed after the colon).

    Raises:
        ConfigError: the module or attribute is missing or not callable.
    """
    module_name, _, attr = entrypoint.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"entrypoint {entrypoint!r} cannot be loaded: {err}") from err
    if not callable(obj):
        raise ConfigError(f"entrypoint {entrypoint!r} is not callable")
    fn: Callable[..., Any] = obj
    return fn


class PythonTool:
    """Calls a Python entrypoint; `config` from policy reaches it as `ctx.config`."""

    def __init__(self, spec: ToolSpec) -> None:
        if spec.python is None:
            raise ConfigError(f"tool {spec.name!r} has no python section")
        self.spec = spec
        self.name = spec.name
        self.timeout_ms = spec.timeout_ms
        self.fn = load_entrypoint(spec.python.entrypoint)
        self.config: Mapping[str, Any] = spec.python.config

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Calls the entrypoint (awaiting it when it is a coroutine)."""
        if self.config:
            ctx = replace(ctx, config=self.config)
        if inspect.iscoroutinefunction(self.fn):
            out = await self.fn(ctx, args)
        else:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(_SYNC_TOOLS, functools.partial(self.fn, ctx, args))
            if inspect.isawaitable(out):
                out = await out
        return out if isinstance(out, ToolResult) else ToolResult(value=out)
