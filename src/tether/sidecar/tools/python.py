"""The `python` adapter: an in-process `module:function` called with (ctx, args).

For trusted in-process tools and tests: the callable runs inside the sidecar,
so it gets no filesystem or environment confinement beyond what it does itself.
It may be sync or async and may return a `ToolResult` or any JSON-able value.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tether.core.errors import ConfigError
from tether.core.policy import ToolSpec
from tether.sidecar.tools.base import ToolContext, ToolResult


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
        out = self.fn(ctx, args)
        if inspect.isawaitable(out):
            out = await out
        return out if isinstance(out, ToolResult) else ToolResult(value=out)
