"""The sidecar's receipt uplink and the control plane's checkpoint schedule, in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tether.sidecar.spool import ReceiptSpool
from tether.testing import start_control, start_sidecar
from tether.v1 import control_pb2 as pb


async def until(cond: object, what: str, timeout_s: float = 20.0) -> None:
    """Polls `cond()` within a generous bound (the event must happen at all)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def test_complete_reports_pending_when_receipts_are_not_acknowledged(
    tmp_path: Path,
) -> None:
    """With the receipt stream down, CompleteTask says receipts_pending and keeps them spooled."""
    async with (
        start_control(tmp_path, vault=False) as control,
        start_sidecar(tmp_path, control.address, receipt_ack_timeout_ms=200) as side,
        side.agent("alice") as agent,
    ):
        for _ in range(2):
            await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=2000)
        assert task is not None
        state, pending = await agent.complete(task.task_id, result=b"ok")
        assert (state, pending) == ("succeeded", False)
        # Cut the uplink's receipt stream (as if the ledger stopped answering).
        sidecar = side.sidecar
        spool = sidecar.deps.sink
        assert isinstance(spool, ReceiptSpool)
        sidecar._receipts_stop.set()
        assert sidecar._receipts_task is not None
        await sidecar._receipts_task
        task = await agent.claim("work", wait_ms=2000)
        assert task is not None
        state, pending = await agent.complete(task.task_id, result=b"ok")
        assert (state, pending) == ("succeeded", True)
        assert await spool.pending() == 3  # granted, started, finished: durable, unacked
        assert len(spool.envelopes(task.task_id)) == 3
        # The stream comes back: the receipts replay and the ledger holds them.
        sidecar._receipts_stop.clear()
        sidecar._receipts_task = asyncio.create_task(
            sidecar._stream_receipts(spool, sidecar.deps.uplink)
        )
        assert await spool.wait_acked(spool.last_seq, 20)


async def test_checkpointer_signs_on_schedule(tmp_path: Path) -> None:
    """The control plane signs a checkpoint covering new receipts without being asked."""
    async with (
        start_control(tmp_path, vault=False, checkpoint_interval_ms=50) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        client = control.operator()
        try:
            first = await client.stub.GetCheckpoint(pb.GetCheckpointRequest(fresh=False))
            await client.submit("work", b"{}")
            task = await agent.claim("work", wait_ms=2000)
            assert task is not None
            _, pending = await agent.complete(task.task_id, result=b"ok")
            assert not pending
            size = first.checkpoint.tree_size + 3  # granted, started, finished

            latest = [first]

            async def poll() -> None:
                while latest[0].checkpoint.tree_size < size:
                    latest[0] = await client.stub.GetCheckpoint(
                        pb.GetCheckpointRequest(fresh=False)
                    )
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(poll(), 20)
            assert latest[0].checkpoint.tree_size == size
        finally:
            await client.close()
