"""The demo's agent process: claims tasks through its sidecar and acts on them.

What it does with a task is driven by the task's payload, so the orchestrator
can stage each scenario (a normal write, an idempotent retry, a budget denial,
a slow task that gets killed). It prints one JSON line per event, including
every tool result it received, so the demo can audit that no credential ever
reached an agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tether.agent import AgentClient, Task, retrying
from tether.core.errors import BudgetExhausted, LeaseLost, NotOwner, TaskTimedOut, TetherError


def emit(event: str, **facts: Any) -> None:
    print(json.dumps({"event": event, **facts}, default=str), flush=True)


async def write(client: AgentClient, task: Task, key: str) -> Any:
    """Writes the task's record to the demo API through the sidecar's http tool."""
    out = await client.call_tool(
        task.task_id,
        "api_write",
        {"method": "POST", "path": f"/records/{task.task_id}", "body": {"from": "agent"}},
        idempotency_key=key,
    )
    emit(
        "tool",
        task_id=task.task_id,
        fencing_token=task.fencing_token,
        key=key,
        replayed=out.replayed,
        status=out.status,
        cost_micros=out.cost_micros,
        result=out.result,
    )
    return out


async def overrun(client: AgentClient, task: Task) -> None:
    """Writes once, then works past the task's deadline until the sidecar stops it."""
    await write(client, task, f"{task.task_id}:before")
    emit("overrunning", task_id=task.task_id, fencing_token=task.fencing_token)
    try:
        while True:  # a cooperative agent: its heartbeat tells it to stop
            await client.heartbeat(task.task_id)
            await asyncio.sleep(0.2)
    except TaskTimedOut as err:
        stopped = err.metadata.get("end_reason", "")
    try:  # what an uncooperative agent would do next: refused before any side effect
        await write(client, task, f"{task.task_id}:after")
        late = "accepted"
    except TetherError as err:
        late = err.reason
    emit("stopped", task_id=task.task_id, end_reason=stopped, late_write=late)


async def handle(client: AgentClient, task: Task) -> None:
    spec = task.json() or {}
    kind = spec.get("kind", "write")
    if kind == "overrun":
        await retrying(lambda: client.start(task.task_id))
        await overrun(client, task)
        return
    async with client.keepalive(task):
        await retrying(lambda: client.start(task.task_id))
        emit("started", task_id=task.task_id, kind=kind, attempt=task.attempt,
             fencing_token=task.fencing_token)  # fmt: skip
        result: dict[str, Any] = {"kind": kind}
        if kind == "budget":
            denied = 0
            for i in range(int(spec.get("calls", 4))):
                try:
                    await write(client, task, f"{task.task_id}:call-{i}")
                except BudgetExhausted as err:
                    denied += 1
                    emit("budget_denied", task_id=task.task_id, message=err.message)
            result["denied"] = denied
        elif kind == "retry":
            first = await write(client, task, f"{task.task_id}:write")
            second = await write(client, task, f"{task.task_id}:write")
            result["replayed"] = second.replayed and not first.replayed
        else:
            await write(client, task, f"{task.task_id}:write:{task.fencing_token}")
        if kind == "slow" and task.attempt == 1:
            emit("working_slowly", task_id=task.task_id, fencing_token=task.fencing_token)
            await asyncio.sleep(3600)  # the demo kills this agent here
        await client.put_artifact(task.task_id, "result.json", json.dumps(result).encode())
        state, pending = await retrying(
            lambda: client.complete(task.task_id, result=json.dumps(result).encode()),
            attempts=60,
        )
        emit("completed", task_id=task.task_id, state=state, receipts_pending=pending,
             fencing_token=task.fencing_token)  # fmt: skip


async def run(args: argparse.Namespace, token: str | None) -> int:
    async with AgentClient(args.socket, token=token) as client:
        while True:
            try:
                task = await retrying(lambda: client.claim(args.queue, wait_ms=1000))
            except TetherError as err:
                emit("claim_failed", reason=err.reason, message=err.message)
                await asyncio.sleep(0.5)
                continue
            if task is None:
                continue
            emit("claimed", task_id=task.task_id, attempt=task.attempt,
                 fencing_token=task.fencing_token, tools=list(task.tools))  # fmt: skip
            try:
                await handle(client, task)
            except (LeaseLost, NotOwner) as err:
                emit("lease_lost", task_id=task.task_id, message=err.message)
            except TetherError as err:
                emit("error", task_id=task.task_id, reason=err.reason, message=err.message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tether demo agent")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--token-file")
    parser.add_argument("--queue", default="demo")
    args = parser.parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        return asyncio.run(run(args, token))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
