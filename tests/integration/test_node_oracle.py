"""A node learns nothing about tasks it never held from the control plane's refusals.

Real control plane with mTLS; node-2 (a hostile or compromised node) probes a task
that node-1 holds, then the same task once it is canceled, and a task id that does
not exist: every answer is the same NotOwner, naming neither the holder, the
current fencing token, the task's state, nor whether the task exists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tether.core.errors import NotOwner, TetherError
from tether.core.states import Event, State
from tether.core.timeouts import EndReason
from tether.testing import ControlHandle, start_control
from tether.v1 import control_pb2 as pb

SUCCEED = pb.TASK_EVENT_SUCCEED


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlHandle]:
    async with start_control(tmp_path) as handle:
        yield handle


def _said(err: TetherError) -> str:
    return err.message + " " + " ".join(f"{k}={v}" for k, v in err.metadata.items())


async def _probe(other: Any, task_id: str, token: int) -> list[TetherError]:
    """node-2 renews, transitions, completes and asks a credential for (task_id, token)."""
    errors: list[TetherError] = []
    for call in (
        other.renew_lease(task_id, token, "node-2"),
        other.transition(task_id, token, Event.SUCCEED, "node-2"),
        other.issue_credential(task_id, token, "api_key", "echo", "node-2"),
        other.complete_tasks(
            "node-2", [pb.TaskCompletion(task_id=task_id, fencing_token=token, event=SUCCEED)]
        ),
    ):
        with pytest.raises(TetherError) as info:
            await call
        errors.append(info.value)
    return errors


async def test_a_node_cannot_probe_another_nodes_task(cp: ControlHandle) -> None:
    """Renew, transition, complete and credential calls of node-2 on node-1's task (right or wrong
    token, live or canceled) and on an unknown task all get one NotOwner that leaks no
    holder, token or state; node-1 itself is still told why its lease ended (canceled)."""
    task_id = (await cp.client.submit("q", b"{}")).task.task_id
    node = await cp.node_client("node-1")
    other = await cp.node_client("node-2")
    try:
        await node.acquire_lease("q", "node-1", "a")
        seen: list[TetherError] = []
        seen += await _probe(other, task_id, 1)  # the holder's real token
        seen += await _probe(other, task_id, 7)  # a wrong token
        seen += await _probe(other, "no-such-task", 1)
        await cp.client.cancel(task_id, "test")
        seen += await _probe(other, task_id, 1)
        for err in seen:
            assert isinstance(err, NotOwner), (type(err), err.message)
            said = _said(err)
            assert "node-1" not in said, said
            assert "current_fencing_token" not in said, said
            for word in ("canceled", "terminal", "running", "leased to", "not found", "lapsed"):
                assert word not in said.lower(), said
        assert len({e.message.replace("no-such-task", task_id) for e in seen[:8]}) <= 4
        told = await node.renew_lease(task_id, 1, "node-1")  # the holder is still told why
        assert told.end_reason == EndReason.CANCELED
    finally:
        await other.close()
        await node.close()


async def test_a_stale_holder_cannot_end_a_canceled_lease_on_the_ledger(
    cp: ControlHandle,
) -> None:
    """After a cancel, the former holder's task_finished receipt under its old token is
    refused at ingest (the lease already has the control plane's end: two ends on the
    append-only ledger would leave the task's export unverifiable for good)."""
    from tether.core.receipts import Receipt, ReceiptKind
    from tether.crypto.receipts import sign_receipt
    from tether.crypto.signing import SigningKey
    from tether.v1 import control_pb2 as pb

    key = SigningKey.generate()
    node = await cp.node_client("node-1", key)
    try:
        task_id = (await cp.client.submit("q", b"{}")).task.task_id
        got = await node.acquire_lease("q", "node-1", "a")
        assert got.task.task_id == task_id
        await cp.client.cancel(task_id, "operator")

        def receipt(seq: int, kind: ReceiptKind, prev: str) -> bytes:
            r = Receipt(
                kind=kind, node_id="node-1", task_id=task_id, attempt=1, fencing_token=1,
                agent_id="a", lease_id="l_x",
                lease_issued_unix_ms=1, lease_expires_unix_ms=2, time_unix_ms=1, seq=seq,
                prev=prev, final_state=int(State.SUCCEEDED),
                status="ok",
            )  # fmt: skip
            return sign_receipt(r, key)

        first = receipt(1, ReceiptKind.TASK_FINISHED, "")
        stream = node.stub.StreamReceipts(
            iter(
                [
                    pb.StreamReceiptsRequest(
                        node_id="node-1", receipts=[pb.SpooledReceipt(seq=1, envelope=first)]
                    )
                ]
            ),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a lease the control plane ended (canceled)" in (info.value.details() or "")
        bundle = await cp.client.export_bundle([task_id])
        assert not bundle.entries  # nothing of the stale holder's reached the ledger
        assert len(bundle.control_receipts) == 1
    finally:
        await node.close()
