"""A python tool whose effect happens at once and whose answer waits for the test.

Tests that need a tool call caught between its effect and its outcome (a lease lost
meanwhile, a CompleteTask racing it) share this one tool and its policy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.sidecar.tools.base import ToolContext

GATE = threading.Event()
"""Set by the test to let every waiting `append_then_wait` report; clear it first."""


def append_then_wait(ctx: ToolContext, args: Mapping[str, Any]) -> dict[str, Any]:
    """Appends a line (the effect), then waits for the test before it reports."""
    with Path(str(ctx.config["path"])).open("a") as out:
        out.write(f"{args['line']}\n")
    GATE.wait(60)
    return {"wrote": args["line"]}


def append_policy(effects: Path, agents: Sequence[str] = ("alice",), queue: str = "") -> str:
    """A policy where `agents` work queue "work" with the `append` tool writing to `effects`;
    `queue` adds lines to the queue's table."""
    agent_tables = "".join(f'[agents.{a}]\nqueues = ["work"]\n' for a in agents)
    return f"""
version = 1
{agent_tables}[tools.append]
adapter = "python"
[tools.append.python]
entrypoint = "{__name__}:append_then_wait"
config = {{ path = "{effects}" }}
[queues.work]
tools = ["append"]
{queue}"""
