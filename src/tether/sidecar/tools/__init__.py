"""Tool adapters behind one interface (`Tool`), built from policy `ToolSpec`s.

Use `build_tool(spec)` to get an adapter and `run_tool(tool, ctx, args, redactor)`
to call it with the timeout enforced and every secret redacted from the result.
"""

from __future__ import annotations

from tether.core.errors import ConfigError
from tether.core.policy import ToolSpec
from tether.sidecar.tools.base import FENCING_HEADER, Tool, ToolContext, ToolResult, run_tool

__all__ = [
    "FENCING_HEADER",
    "Tool",
    "ToolContext",
    "ToolResult",
    "build_tool",
    "run_tool",
]


def build_tool(spec: ToolSpec, *, require_confinement: bool = True) -> Tool:
    """The adapter for `spec`.

    Args:
        spec: the tool as declared in policy.
        require_confinement: exec and mcp tools refuse to run when Landlock is unavailable
            (set False only where the kernel lacks it and the risk is accepted).

    Raises:
        ConfigError: the adapter is unknown or its entrypoint cannot be loaded.
    """
    if spec.adapter == "http":
        from tether.sidecar.tools.http import HttpTool

        return HttpTool(spec)
    if spec.adapter == "exec":
        from tether.sidecar.tools.exec import ExecTool

        return ExecTool(spec, require_confinement=require_confinement)
    if spec.adapter == "python":
        from tether.sidecar.tools.python import PythonTool

        return PythonTool(spec)
    if spec.adapter == "mcp":
        from tether.sidecar.tools.mcp import McpTool

        return McpTool(spec, require_confinement=require_confinement)
    raise ConfigError(f"tool {spec.name!r}: unknown adapter {spec.adapter!r}")
