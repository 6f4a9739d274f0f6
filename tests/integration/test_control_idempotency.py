"""Idempotency records (RecordToolCall / LookupToolCall) over real gRPC and real SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from control_fixtures import POLICY, SHA_A, SHA_B, leased, unenrolled_node_tls

from tether.control.client import ControlClient
from tether.core.clock import FakeClock
from tether.core.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidArgument,
    LeaseExpired,
    NotOwner,
    StaleFencingToken,
    Unauthenticated,
)
from tether.grpcutil.status import error_of, from_rpc_error, status_code
from tether.testing import ControlHandle, start_control
from tether.v1 import control_pb2 as pb

STARTED = pb.TOOL_CALL_PHASE_STARTED
COMPLETED = pb.TOOL_CALL_PHASE_COMPLETED


@pytest.fixture
async def cp(tmp_path: Path) -> Any:
    async with start_control(tmp_path, clock=FakeClock()) as handle:
        await handle.client.put_policy(POLICY)
        yield handle


@pytest.fixture
async def node(cp: ControlHandle) -> Any:
    client = await cp.node_client("node-1")
    yield client
    await client.close()


async def test_started_inserts_once_and_conflicts_on_other_arguments(
    cp: ControlHandle, node: ControlClient
) -> None:
    """STARTED creates the record, a repeat returns it, other arguments are INVALID_ARGUMENT."""
    task = await leased(cp, node)
    tid, tok = task.task_id, task.fencing_token
    rec, existed = await node.record_tool_call(tid, tok, "k1", "echo", SHA_A, STARTED, "node-1")
    assert not existed
    assert (rec.phase, rec.fencing_token, rec.arguments_sha256) == (STARTED, tok, SHA_A)
    rec, existed = await node.record_tool_call(tid, tok, "k1", "echo", SHA_A, STARTED, "node-1")
    assert existed
    assert rec.phase == STARTED
    with pytest.raises(IdempotencyConflict) as info:
        await node.record_tool_call(tid, tok, "k1", "echo", SHA_B, STARTED, "node-1")
    assert info.value.metadata["idempotency_key"] == "k1"
    with pytest.raises(IdempotencyConflict):
        await node.record_tool_call(
            tid, tok, "k1", "fetch", SHA_A, COMPLETED, "node-1", status="ok"
        )


async def test_completed_is_never_overwritten(cp: ControlHandle, node: ControlClient) -> None:
    """COMPLETED stores the outcome; a later COMPLETED for the key gets the first one back."""
    task = await leased(cp, node)
    tid, tok = task.task_id, task.fencing_token
    await node.record_tool_call(tid, tok, "k1", "echo", SHA_A, STARTED, "node-1")
    rec, existed = await node.record_tool_call(
        tid, tok, "k1", "echo", SHA_A, COMPLETED, "node-1", result=b"first", status="ok",
        cost_micros=7,
    )  # fmt: skip
    assert existed
    assert (rec.phase, rec.result, rec.status, rec.cost_micros) == (COMPLETED, b"first", "ok", 7)
    rec, existed = await node.record_tool_call(
        tid, tok, "k1", "echo", SHA_A, COMPLETED, "node-1", result=b"second", status="error"
    )
    assert existed
    assert (rec.result, rec.status) == (b"first", "ok")
    rec, existed = await node.record_tool_call(tid, tok, "k1", "echo", SHA_A, STARTED, "node-1")
    assert (existed, rec.phase, rec.result) == (True, COMPLETED, b"first")
    # COMPLETED without a STARTED first is inserted directly.
    rec, existed = await node.record_tool_call(
        tid, tok, "k2", "echo", SHA_B, COMPLETED, "node-1", result=b"r", status="ok"
    )
    assert not existed
    found = await node.lookup_tool_call(tid, "k2")
    assert found is not None
    assert found.result == b"r"
    assert await node.lookup_tool_call(tid, "absent") is None


async def test_records_survive_a_lease_takeover(cp: ControlHandle, node: ControlClient) -> None:
    """The next holder sees a lapsed lease's STARTED record and completes it; old token fails."""
    task = await leased(cp, node)
    tid, old = task.task_id, task.fencing_token
    await node.record_tool_call(tid, old, "k1", "echo", SHA_A, STARTED, "node-1")
    clock = cp.service.clock
    assert isinstance(clock, FakeClock)
    clock.advance(task.lease_ttl_ms)
    with pytest.raises(LeaseExpired):
        await node.record_tool_call(tid, old, "k2", "echo", SHA_A, STARTED, "node-1")
    await cp.service.sweep()
    clock.advance(120_000)
    other = await cp.node_client("node-2")
    try:
        new = (await other.acquire_lease("work", "node-2", "alice")).task
        assert new.fencing_token == old + 1
        seen = await other.lookup_tool_call(tid, "k1")
        assert seen is not None
        assert (seen.phase, seen.fencing_token) == (STARTED, old)
        rec, existed = await other.record_tool_call(
            tid, new.fencing_token, "k1", "echo", SHA_A, COMPLETED, "node-2", result=b"x",
            status="ok",
        )  # fmt: skip
        assert existed
        assert (rec.phase, rec.fencing_token) == (COMPLETED, new.fencing_token)
        with pytest.raises(StaleFencingToken):
            await node.record_tool_call(
                tid, old, "k1", "echo", SHA_A, COMPLETED, "node-1", result=b"late", status="ok"
            )
        final = await other.lookup_tool_call(tid, "k1")
        assert final is not None
        assert final.result == b"x"
        with pytest.raises(NotOwner):  # only the node holding the task may look it up
            await node.lookup_tool_call(tid, "k1")
    finally:
        await other.close()


async def test_lookup_needs_a_node_certificate(cp: ControlHandle) -> None:
    """LookupToolCall without a node certificate, or with one no enrolment gave out, is
    UNAUTHENTICATED; an operator certificate is PERMISSION_DENIED."""
    for client in (
        ControlClient(cp.enroll_address, tls=cp.pki.anonymous_tls),
        ControlClient(cp.address, tls=unenrolled_node_tls(cp, "node-9")),
    ):
        try:
            with pytest.raises(Unauthenticated):
                await client.lookup_tool_call("t", "k")
        finally:
            await client.close()
    with pytest.raises(Forbidden):
        await cp.client.lookup_tool_call("t", "k")


async def test_record_tool_call_edge_validation(cp: ControlHandle, node: ControlClient) -> None:
    """Bad digests, phases, keys and phase-mismatched fields are INVALID_ARGUMENT naming it."""
    base: dict[str, Any] = {
        "task_id": "t",
        "fencing_token": 1,
        "idempotency_key": "k",
        "tool": "echo",
        "arguments_sha256": SHA_A,
        "phase": STARTED,
        "node_id": "node-1",
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"arguments_sha256": "A" * 64}, "arguments_sha256"),
        ({"arguments_sha256": "abc"}, "arguments_sha256"),
        ({"phase": 0}, "phase"),
        ({"phase": 9}, "phase"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 257}, "idempotency_key"),
        ({"idempotency_key": "a\nb"}, "idempotency_key"),
        ({"result": b"x"}, "result"),
        ({"status": "ok"}, "status"),
        ({"cost_micros": 3}, "cost_micros"),
        ({"phase": COMPLETED}, "status"),
        ({"phase": COMPLETED, "status": "ok", "cost_micros": -1}, "cost_micros"),
        ({"tool": ""}, "tool"),
        ({"node_id": ""}, "node_id"),
    ]
    for override, field in cases:
        args = {**base, **override}
        with pytest.raises(InvalidArgument) as info:
            await node.record_tool_call(
                args["task_id"],
                args["fencing_token"],
                args["idempotency_key"],
                args["tool"],
                args["arguments_sha256"],
                args["phase"],
                args["node_id"],
                result=args.get("result", b""),
                status=args.get("status", ""),
                cost_micros=args.get("cost_micros", 0),
            )
        assert info.value.field == field, override
    with pytest.raises(InvalidArgument) as info:
        await node.lookup_tool_call("t", "")
    assert info.value.field == "idempotency_key"
    assert await cp.client.health() == 1


def _start(task_id: str, token: int, key: str, node_id: str = "node-1", **kw: Any) -> Any:
    return pb.RecordToolCallRequest(
        task_id=task_id, fencing_token=token, idempotency_key=key, tool="echo",
        arguments_sha256=SHA_A, phase=STARTED, node_id=node_id, **kw,
    )  # fmt: skip


async def test_start_tool_calls_records_each_on_its_own(
    cp: ControlHandle, node: ControlClient
) -> None:
    """StartToolCalls writes every STARTED record it can, answers a refused one with the
    error RecordToolCall gives (the others stand), and reports records that existed."""
    a = await leased(cp, node)
    b = await leased(cp, node)
    await node.record_tool_call(a.task_id, a.fencing_token, "old", "echo", SHA_A, STARTED, "node-1")
    resp = await node.stub.StartToolCalls(
        pb.StartToolCallsRequest(
            node_id="node-1",
            calls=[
                _start(a.task_id, a.fencing_token, "k1"),
                _start(b.task_id, b.fencing_token + 5, "k1"),  # not this lease's token
                _start(a.task_id, a.fencing_token, "old"),
                _start(b.task_id, b.fencing_token, "k2"),
            ],
        )
    )
    kinds = [r.WhichOneof("outcome") for r in resp.results]
    assert kinds == ["recorded", "refused", "recorded", "recorded"]
    assert [r.recorded.existed for r in resp.results if r.HasField("recorded")] == [
        False, True, False,
    ]  # fmt: skip
    refused = resp.results[1].refused
    err = error_of(
        status_code(refused.code), refused.message, refused.reason, dict(refused.metadata)
    )
    assert isinstance(err, StaleFencingToken), refused
    for tid, key in ((a.task_id, "k1"), (b.task_id, "k2")):
        seen = await node.lookup_tool_call(tid, key)
        assert seen is not None
        assert seen.phase == STARTED
    assert await node.lookup_tool_call(b.task_id, "k1") is None


async def test_start_tool_calls_validation(cp: ControlHandle, node: ControlClient) -> None:
    """A bad StartToolCalls record is refused in its place with the INVALID_ARGUMENT
    RecordToolCall gives it alone, and the good records beside it are written; only a
    bad count fails the whole call."""
    a = await leased(cp, node)
    for calls in ([], [_start(a.task_id, a.fencing_token, "k0")] * 257):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.stub.StartToolCalls(pb.StartToolCallsRequest(node_id="node-1", calls=calls))
        err = from_rpc_error(info.value)
        assert isinstance(err, InvalidArgument), len(calls)
        assert err.field == "calls"
    completed = _start(a.task_id, a.fencing_token, "k4")
    completed.phase, completed.status = COMPLETED, "ok"
    cases: list[tuple[Any, str]] = [
        (_start(a.task_id, a.fencing_token, "k1"), "idempotency_key"),  # repeats calls[0]
        (_start(a.task_id, a.fencing_token, "k2", node_id="node-2"), "node_id"),
        (_start(a.task_id, a.fencing_token, "k3", status="ok"), "status"),
        (_start(a.task_id, a.fencing_token, "bad\nkey"), "idempotency_key"),
        (completed, "phase"),
    ]
    for i, (bad, field) in enumerate(cases):
        ok = _start(a.task_id, a.fencing_token, f"k1-{i}" if i else "k1")
        resp = await node.stub.StartToolCalls(
            pb.StartToolCallsRequest(node_id="node-1", calls=[ok, bad])
        )
        assert [r.WhichOneof("outcome") for r in resp.results] == ["recorded", "refused"], field
        refused = resp.results[1].refused
        err = error_of(
            status_code(refused.code), refused.message, refused.reason, dict(refused.metadata)
        )
        assert isinstance(err, InvalidArgument), field
        assert err.field == field
        assert await node.lookup_tool_call(a.task_id, ok.idempotency_key) is not None
    for key in ("k2", "k3", "k4"):
        assert await node.lookup_tool_call(a.task_id, key) is None, key
    with pytest.raises(grpc.aio.AioRpcError) as info:  # only as itself
        await node.stub.StartToolCalls(
            pb.StartToolCallsRequest(
                node_id="node-2", calls=[_start(a.task_id, a.fencing_token, "k1", node_id="node-2")]
            )
        )
    assert isinstance(from_rpc_error(info.value), NotOwner | Unauthenticated)
