"""CPU per task of the batch lease path below gRPC: `ControlService.complete_then_acquire`
in one process over a SQLite store (synchronous=FULL), 8 workers, batch 10, brief steps
when the code has them. No network, no TLS, no protobuf: the store, signing, policy and
the service's own work only, so a change there shows without grpc's share and its noise.
Alternate it with a `git worktree add --detach` of the base on PYTHONPATH to compare:

    PYTHONPATH=/path/to/base/src .venv/bin/python bench/lease_service_cpu.py --tasks 10000
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import control_bench

from tether.control.service import ControlService
from tether.core.states import Event
from tether.crypto.signing import SigningKey
from tether.store.base import HolderTransition
from tether.store.sqlite import SqliteStore


async def run(tasks: int, workers: int, batch: int) -> tuple[float, float]:
    """(CPU microseconds a task, tasks a second) for draining `tasks` queued tasks."""
    with tempfile.TemporaryDirectory(prefix="lease-service-") as tmp:
        db = Path(tmp) / "control.db"
        await control_bench.create_db(db)
        control_bench.fill_queue(db, tasks)
        store = SqliteStore(db)
        await store.open()
        service = ControlService(store, SigningKey.generate())
        await service.start()
        await service.put_policy(control_bench.bench_policy())
        brief = "brief" in inspect.signature(service.complete_then_acquire).parameters
        done = 0

        async def worker(i: int) -> None:
            nonlocal done
            agent, queue = f"agent-{i}", control_bench.QUEUE
            grants, _ = await service.acquire_many(
                queue=queue, node_id="n", agent_id=agent, max_tasks=batch, start=True
            )
            while grants:
                items = [
                    HolderTransition(
                        task_id=t.task_id,
                        event=Event.SUCCEED,
                        fencing_token=t.fencing_token,
                        result=b"{}",
                    )
                    for t, _ in grants
                ]
                _, more, _ = await service.complete_then_acquire(
                    node_id="n", items=items, queue=queue, agent_id=agent, max_tasks=batch,
                    start=True, **({"brief": True} if brief else {}),
                )  # fmt: skip
                grants = more or []
                done += len(items)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(workers)))
        cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
        await service.close()
        await store.close()
    if done != tasks:
        raise RuntimeError(f"finished {done} of {tasks} tasks")
    return cpu / tasks * 1e6, tasks / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks to drain")
    parser.add_argument("--workers", type=int, default=8, help="concurrent workers")
    parser.add_argument("--batch", type=int, default=10, help="tasks a step")
    args = parser.parse_args(argv)
    cpu, rate = asyncio.run(run(args.tasks, args.workers, args.batch))
    print(f"{cpu:.1f} us CPU a task, {rate:.0f} tasks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
