"""A chaos-suite agent process: claims tasks and writes to the fencing sink through its sidecar.

For each task it heartbeats, starts the task, makes `--steps` keyed writes with the
mediated `sink_write` http tool (the sidecar injects the sink's bearer token and the
lease's fencing token; the key rides in the body so the sink can count side effects
per key), then completes it. It survives its sidecar restarting under it (claims are
retried), drops a task whose lease it lost (another holder owns it now), and fails a
task whose earlier write has an unknown outcome (the tool is not idempotent, so the
sidecar refuses to repeat it). One JSON line per event on stdout, for post-mortems.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from tether.agent import AgentClient, Task, retrying
from tether.core.errors import LeaseLost, NotOwner, OutcomeUnknown, TetherError

TOOL = "sink_write"
DROP = ("LEASE_LOST", "NOT_OWNER", "INVALID_TRANSITION", "STALE_FENCING_TOKEN", "LEASE_EXPIRED")


def emit(event: str, **facts: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps({"event": event, "t": round(time.time(), 3), **facts}), flush=True)


async def work_on(client: AgentClient, task: Task, steps: int, step_s: float) -> None:
    """Starts the task, writes `steps` keyed records, completes it."""
    async with client.keepalive(task, interval_s=0.5) as lost:
        await retrying(lambda: client.start(task.task_id), attempts=10)
        for step in range(steps):
            if lost.is_set():
                raise LeaseLost(f"lease lost on task {task.task_id}")
            key = f"{task.task_id}:step-{step}"
            args = {"method": "POST", "path": f"/records/{task.task_id}",
                    "body": {"key": key, "step": step}}  # fmt: skip
            try:
                out = await retrying(
                    functools.partial(
                        client.call_tool, task.task_id, TOOL, args, idempotency_key=key
                    ),
                    attempts=10,
                )
            except OutcomeUnknown as err:
                emit("outcome_unknown", task_id=task.task_id, key=key, message=err.message)
                await retrying(
                    functools.partial(
                        client.complete, task.task_id, succeeded=False,
                        error=f"outcome of {key} unknown",
                    ),
                    attempts=20,
                )  # fmt: skip
                emit("completed", task_id=task.task_id, state="failed", attempt=task.attempt)
                return
            status = out.result.get("status") if isinstance(out.result, dict) else None
            emit("write", task_id=task.task_id, key=key, replayed=out.replayed,
                 http_status=status, fencing_token=task.fencing_token)  # fmt: skip
            await asyncio.sleep(step_s)
        if lost.is_set():
            raise LeaseLost(f"lease lost on task {task.task_id}")
        state, pending = await retrying(
            lambda: client.complete(task.task_id, result=b'{"ok":true}'), attempts=20
        )
        emit("completed", task_id=task.task_id, state=state, pending=pending,
             attempt=task.attempt, fencing_token=task.fencing_token)  # fmt: skip


async def run(args: argparse.Namespace, token: str) -> int:
    async with AgentClient(args.socket, token=token, timeout_s=15.0) as client:
        while True:
            try:
                task = await client.claim(args.queue, wait_ms=1000)
            except TetherError as err:  # the sidecar restarting, or the control plane away
                emit("claim_failed", reason=err.reason)
                delay_ms = int(err.metadata.get("retry_after_ms", "300") or 300)
                await asyncio.sleep(min(delay_ms, 1000) / 1000)
                continue
            if task is None:
                continue
            emit("claimed", task_id=task.task_id, attempt=task.attempt,
                 fencing_token=task.fencing_token)  # fmt: skip
            try:
                await work_on(client, task, args.steps, args.step_ms / 1000)
            except (LeaseLost, NotOwner) as err:
                emit("lease_lost", task_id=task.task_id, message=err.message)
            except TetherError as err:
                # Dropped: the lease lapses and the task is retried by whoever claims it.
                emit("dropped", task_id=task.task_id, reason=err.reason, message=err.message,
                     expected=err.reason in DROP)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="the sidecar's shared socket")
    p.add_argument("--token-file", required=True, help="this agent's token")
    p.add_argument("--queue", required=True)
    p.add_argument("--steps", type=int, default=2, help="keyed sink writes per task")
    p.add_argument("--step-ms", type=int, default=100, help="pause after each write")
    args = p.parse_args(argv)
    token = Path(args.token_file).read_text().strip()
    try:
        return asyncio.run(run(args, token))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
