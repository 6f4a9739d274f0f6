"""The one small interface every tool adapter implements, and `run_tool` around it.

The sidecar decides (policy), then hands an adapter a `ToolContext` (who, which
lease, which workspace, which credentials in memory) and the agent's arguments.
`run_tool` is the single place that enforces the timeout and redacts every
secret the call could see from the result and from error messages, so nothing
an adapter returns can carry a credential to the agent or a receipt.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from tether.core.errors import PolicyDenied, TetherError, ToolTimeout
from tether.sidecar.redaction import Redactor

FENCING_HEADER = "X-Tether-Fencing-Token"


@dataclass(frozen=True)
class ToolContext:
    """What a tool call may know about the task it runs for.

    Attributes:
        task_id: the task the call belongs to.
        attempt: the task attempt (a takeover increments it).
        fencing_token: the lease's token; passed downstream so stale writers are refused.
        agent_id: the agent on whose behalf the call runs.
        workspace: the task's private directory (exec cwd; the only writable place).
        credentials: credential name -> value, held in memory only; never repr'd.
        timeout_s: upper bound for this call (e.g. the time left on the lease); the
            effective timeout is min(tool timeout, timeout_s).
        network_allowlist: "host" or "host:port" entries granted by the queue.
        tool_name: the policy name of the tool being called.
        idempotency_key: the agent's key for the call, if any.
        config: adapter-specific settings from policy (python tools).
    """

    task_id: str
    attempt: int
    fencing_token: int
    agent_id: str
    workspace: Path
    credentials: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    timeout_s: float | None = None
    network_allowlist: tuple[str, ...] = ()
    tool_name: str = ""
    idempotency_key: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)

    def credential(self, name: str) -> bytes:
        """The issued value of credential `name`.

        Raises:
            PolicyDenied: the credential was not issued for this call.
        """
        value = self.credentials.get(name)
        if value is None:
            raise PolicyDenied(
                f"credential {name!r} was not issued for this call",
                metadata={"credential": name},
            )
        return value


@dataclass(frozen=True)
class ToolResult:
    """A tool's outcome: a JSON-able value, ok/error, and the cost the tool reports."""

    value: Any = None
    status: Literal["ok", "error"] = "ok"
    cost_micros: int | None = None


@runtime_checkable
class Tool(Protocol):
    """A tool adapter instance built from a policy `ToolSpec`."""

    name: str
    timeout_ms: int

    async def call(self, ctx: ToolContext, args: Mapping[str, Any]) -> ToolResult:
        """Runs the tool once.

        Raises:
            PolicyDenied: the call would leave its grant (host, path, parameter, header).
            ResourceExhausted: the output is larger than the policy allows.
            InvalidArgument: the arguments are malformed.
        """
        ...


def _redact_error(err: TetherError, redactor: Redactor) -> TetherError:
    """Scrubs an error's message and metadata in place, dropping its cause chain."""
    message = redactor.redact_text(err.message)
    err.message = message
    err.args = (message, *err.args[1:]) if err.args else (message,)
    err.args = tuple(redactor.redact(a) if isinstance(a, str) else a for a in err.args)
    err.metadata = {k: redactor.redact_text(v) for k, v in err.metadata.items()}
    for attr in ("description",):
        value = getattr(err, attr, None)
        if isinstance(value, str):
            setattr(err, attr, redactor.redact_text(value))
    err.__cause__ = None
    err.__context__ = None
    err.__suppress_context__ = True
    return err


async def run_tool(
    tool: Tool,
    ctx: ToolContext,
    args: Mapping[str, Any],
    redactor: Redactor | None = None,
) -> ToolResult:
    """Runs `tool` with the timeout enforced and every visible secret redacted.

    The redactor used is `redactor` (e.g. all secrets of the lease) plus every
    credential in `ctx`. A crash inside the tool becomes an error result (with a
    redacted message), not an exception, because it is the tool's outcome.

    Raises:
        ToolTimeout: the call ran past min(tool timeout, ctx.timeout_s).
        TetherError: a denial or limit from the adapter, its message redacted.
    """
    scrub = (redactor or Redactor()).with_secrets(ctx.credentials.values())
    limit = tool.timeout_ms / 1000
    if ctx.timeout_s is not None:
        limit = min(limit, ctx.timeout_s)
    limit = max(limit, 0.0)
    try:
        async with asyncio.timeout(limit if math.isfinite(limit) else None):
            result = await tool.call(ctx, args)
    except TimeoutError:
        raise ToolTimeout(
            f"tool {tool.name!r} ran past its {round(limit * 1000)} ms timeout and was stopped",
            metadata={"tool": tool.name},
        ) from None
    except TetherError as err:
        raise _redact_error(err, scrub) from None
    except asyncio.CancelledError:
        raise
    except Exception as err:  # a tool crash is the tool's error outcome, not ours
        return ToolResult(
            value={"error": type(err).__name__, "message": scrub.redact_text(str(err))},
            status="error",
        )
    if not isinstance(result, ToolResult):
        result = ToolResult(value=result)
    return ToolResult(
        value=scrub.redact(result.value), status=result.status, cost_micros=result.cost_micros
    )
