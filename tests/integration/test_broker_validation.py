"""Bad input at the Broker edge: INVALID_ARGUMENT naming the field; the sidecar stays healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tether.testing import start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["echo"]
"""

BIG = b"x" * (1024 * 1024 + 1)

# (rpc, request) pairs that must each be refused with INVALID_ARGUMENT.
BAD: list[tuple[str, Any]] = [
    ("ClaimTask", bpb.ClaimTaskRequest(queue="")),
    ("ClaimTask", bpb.ClaimTaskRequest(queue="bad queue!")),
    ("ClaimTask", bpb.ClaimTaskRequest(queue="work", wait_ms=10_000_000)),
    ("StartTask", bpb.StartTaskRequest(task_id="")),
    ("Heartbeat", bpb.HeartbeatRequest(task_id="")),
    ("CallTool", bpb.CallToolRequest(task_id="", tool="echo")),
    ("CallTool", bpb.CallToolRequest(task_id="{task}", tool="echo", arguments_json="{nope")),
    ("CallTool", bpb.CallToolRequest(task_id="{task}", tool="echo", arguments_json="[1, 2]")),
    ("CallTool", bpb.CallToolRequest(task_id="{task}", tool="echo", idempotency_key="k" * 300)),
    ("Remember", bpb.RememberRequest(task_id="{task}", scope=0, key="k", value=b"v")),
    ("Remember", bpb.RememberRequest(task_id="{task}", scope=99, key="k", value=b"v")),
    ("Remember", bpb.RememberRequest(task_id="{task}", scope=1, key="", value=b"v")),
    ("Remember", bpb.RememberRequest(task_id="{task}", scope=1, key="k", value=BIG)),
    ("Recall", bpb.RecallRequest(task_id="{task}", scope=0, key="k")),
    ("CompleteTask", bpb.CompleteTaskRequest(task_id="{task}", outcome=0)),
    ("CompleteTask", bpb.CompleteTaskRequest(task_id="{task}", outcome=7)),
    ("CompleteTask", bpb.CompleteTaskRequest(task_id="{task}", outcome=1, result=BIG)),
]


def _with_task(request: Any, task_id: str) -> Any:
    if getattr(request, "task_id", None) == "{task}":
        request = type(request).FromString(request.SerializeToString())
        request.task_id = task_id
    return request


@pytest.mark.parametrize(("rpc", "request_"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
async def test_bad_broker_request_is_invalid_argument_naming_the_field(
    tmp_path: Path, rpc: str, request_: Any
) -> None:
    """Each malformed Broker request gets INVALID_ARGUMENT naming a field; health stays SERVING."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice",)) as side,
    ):
        await control.client.put_policy(POLICY)
        await control.client.submit("work", b"{}")
        metadata = (("x-tether-agent-token", side.tokens["alice"]),)
        async with grpc.aio.insecure_channel(f"unix:{side.socket}") as channel:
            stub = bpb_grpc.BrokerServiceStub(channel)
            claimed = await stub.ClaimTask(
                bpb.ClaimTaskRequest(queue="work", wait_ms=2000), metadata=metadata
            )
            assert claimed.HasField("task")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, rpc)(
                    _with_task(request_, claimed.task.task_id), metadata=metadata, timeout=10
                )
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            status = rpc_status.from_call(err)
            assert status is not None
            fields = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields += [v.field for v in bad.field_violations]
            assert fields, status
            assert all(fields), status
            assert any(f.split(".")[0] in err.details() for f in fields)
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            again = await stub.Heartbeat(
                bpb.HeartbeatRequest(task_id=claimed.task.task_id), metadata=metadata
            )
            assert again.lease_expires_unix_ms > 0


async def test_put_artifact_without_header_is_invalid_argument(tmp_path: Path) -> None:
    """An artifact stream that starts with a chunk, not a header, is refused naming `header`."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice",)) as side,
    ):
        metadata = (("x-tether-agent-token", side.tokens["alice"]),)

        async def parts() -> AsyncIterator[bpb.PutArtifactRequest]:
            yield bpb.PutArtifactRequest(chunk=b"data")

        async with grpc.aio.insecure_channel(f"unix:{side.socket}") as channel:
            stub = bpb_grpc.BrokerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.PutArtifact(parts(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "header" in (info.value.details() or "")
