"""A runnable Tether agent: claim tasks in a loop, heartbeat, call a tool, complete.

    python examples/python_agent.py --socket node/tether.sock --queue work \\
        --token-file node/alice.token --count 10

It prints one JSON line per event on stdout ("claimed", "started", "tool",
"completed", "lease_lost"), so scripts and tests can follow it. When the control
plane is unreachable it waits for the sidecar's retry hint and tries again;
when its lease is lost it drops the task, because another agent owns it now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from tether.agent import AgentClient, Task, retrying
from tether.core.errors import LeaseLost, PolicyDenied, TetherError, Unauthenticated, Unavailable


def emit(event: str, **facts: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps({"event": event, **facts}), flush=True)


async def work_on(client: AgentClient, task: Task, work_seconds: float) -> None:
    """Starts the task, does the (simulated) work with a tool call, completes it."""
    async with client.keepalive(task) as lost:
        await retrying(lambda: client.start(task.task_id))
        emit("started", task_id=task.task_id, fencing_token=task.fencing_token)
        if task.tools:
            tool = task.tools[0]
            try:
                out = await client.call_tool(
                    task.task_id, tool, {"input": task.payload.decode(errors="replace")}
                )
                emit("tool", task_id=task.task_id, tool=tool, status=out.status)
            except PolicyDenied as err:
                emit("tool_denied", task_id=task.task_id, tool=tool, reason=err.message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost.wait(), timeout=work_seconds)
        if lost.is_set():
            raise LeaseLost(f"lease lost on task {task.task_id}")
        result = json.dumps({"done": task.task_id}).encode()
        state, pending = await retrying(
            lambda: client.complete(task.task_id, result=result), attempts=60
        )
        emit("completed", task_id=task.task_id, fencing_token=task.fencing_token,
             state=state, receipts_pending=pending)  # fmt: skip


def fail(message: str) -> int:
    """One line on stderr naming the problem and the fix; exit status 2."""
    print(f"python_agent: {message}", file=sys.stderr)
    return 2


async def run(args: argparse.Namespace, token: str | None) -> int:
    done = 0
    told = False
    async with AgentClient(args.socket, token=token) as client:
        while args.count == 0 or done < args.count:
            try:
                task = await client.claim(args.queue, wait_ms=args.wait_ms)
            except Unauthenticated as err:
                return fail(
                    f"the sidecar refused this agent: {err.message} (check --token-file: it "
                    "must hold the token the sidecar's --agent NAME=TOKEN_FILE names)"
                )
            except Unavailable as err:
                delay = int(err.metadata.get("retry_after_ms", "500") or 500)
                emit("unavailable", retry_after_ms=delay, reason=err.message)
                if not told and not await asyncio.to_thread(Path(args.socket).exists):
                    told = True  # say it once; keep retrying: the sidecar may be starting
                    print(
                        f"python_agent: no sidecar socket at {args.socket} yet (is the sidecar "
                        "running, and is --socket its --socket?); retrying",
                        file=sys.stderr,
                    )
                await asyncio.sleep(min(delay, 2000) / 1000)
                continue
            if task is None:
                if args.exit_when_idle:
                    break
                continue
            emit("claimed", task_id=task.task_id, attempt=task.attempt,
                 fencing_token=task.fencing_token)  # fmt: skip
            try:
                await work_on(client, task, args.work_seconds)
                done += 1
            except LeaseLost as err:
                emit("lease_lost", task_id=task.task_id, reason=err.message)
            except TetherError as err:
                emit("error", task_id=task.task_id, reason=err.reason, message=err.message)
    emit("exit", completed=done)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="the sidecar's socket")
    p.add_argument("--queue", required=True)
    p.add_argument("--token-file", help="agent token (not needed on the agent's own socket)")
    p.add_argument("--count", type=int, default=0, help="tasks to complete; 0: no limit")
    p.add_argument("--wait-ms", type=int, default=1000, help="claim long-poll wait")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit when a claim finds no task")  # fmt: skip
    p.add_argument("--work-seconds", type=float, default=0.0, help="simulated work per task")
    args = p.parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except OSError as err:
        return fail(f"--token-file: cannot read {args.token_file}: {err.strerror}")
    try:
        return asyncio.run(run(args, token))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
