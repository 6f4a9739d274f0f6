"""The sidecar's receipt uplink and the control plane's checkpoint schedule, in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tether.control.client import ControlClient
from tether.control.server import RunningControl, start_server
from tether.control.service import Auth
from tether.crypto.signing import SigningKey
from tether.sidecar.spool import ReceiptSpool
from tether.testing import TEST_ENROLLMENT_TOKEN, start_sidecar
from tether.v1 import control_pb2 as pb


@contextlib.asynccontextmanager
async def control_with(tmp_path: Path, **kw: object) -> AsyncIterator[RunningControl]:
    running = await start_server(
        db=tmp_path / "control.db",
        listen="127.0.0.1:0",
        key=SigningKey.generate(),
        auth=Auth.from_tokens(enrollment_tokens=[TEST_ENROLLMENT_TOKEN]),
        sweep_interval_ms=None,
        **kw,  # type: ignore[arg-type]
    )
    try:
        yield running
    finally:
        await running.stop(grace_s=0.5)


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
        control_with(tmp_path) as control,
        start_sidecar(tmp_path, control.address, receipt_ack_timeout_ms=200) as side,
        side.agent("alice") as agent,
    ):
        client = ControlClient(control.address)
        try:
            for _ in range(2):
                await client.submit("work", b"{}")
        finally:
            await client.close()
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
        control_with(tmp_path, checkpoint_interval_ms=50) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        client = ControlClient(control.address)
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
