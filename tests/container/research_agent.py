"""The agent of the container test's pod: claims tasks on its own sidecar socket.

It stands in for `registry.example.com/research-agent` in sidecar/k8s/deployment.yaml
and takes the same arguments (`--socket`, `--queue`). Each task: start, one `echo`
tool call, complete; a task whose payload is `{"hold": true}` is started and then
held (heartbeats) until the lease is lost, so a test can stop the sidecar while a
lease is live. One JSON line per event on stdout (`podman logs` shows them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from functools import partial
from typing import Any

from tether.agent import AgentClient, retrying
from tether.core.errors import LeaseLost, TetherError, Unavailable


def emit(event: str, **facts: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps({"event": event, **facts}), flush=True)


async def run(socket: str, queue: str) -> None:
    """Claims and works tasks until killed; reconnects while the sidecar is away."""
    while True:
        try:
            async with AgentClient(socket) as client:
                while True:
                    try:
                        task = await client.claim(queue, wait_ms=2000)
                    except Unavailable as err:
                        emit("unavailable", reason=err.message)
                        await asyncio.sleep(1)
                        continue
                    if task is None:
                        continue
                    emit("claimed", task_id=task.task_id, attempt=task.attempt)
                    try:
                        async with client.keepalive(task) as lost:
                            await retrying(partial(client.start, task.task_id))
                            out = await client.call_tool(task.task_id, "echo", task.json())
                            emit("tool", task_id=task.task_id, status=out.status)
                            if (task.json() or {}).get("hold"):
                                emit("holding", task_id=task.task_id)
                                await lost.wait()
                                raise LeaseLost(f"lease lost on task {task.task_id}")
                            complete = partial(client.complete, task.task_id, result=b"{}")
                            state, pending = await retrying(complete, attempts=60)
                        emit("completed", task_id=task.task_id, state=state, pending=pending)
                    except TetherError as err:
                        emit("error", task_id=task.task_id, reason=err.reason, message=err.message)
        except (TetherError, OSError) as err:
            emit("disconnected", reason=str(err))
            await asyncio.sleep(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="the sidecar's socket for this agent")
    p.add_argument("--queue", required=True, help="queue to claim from")
    args = p.parse_args()
    asyncio.run(run(args.socket, args.queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
