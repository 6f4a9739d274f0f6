"""Undecodable requests and out-of-range integers get INVALID_ARGUMENT naming the field.

gRPC decodes a request before any servicer code runs: without the decode guard
such a request got UNKNOWN (unary) or INTERNAL (streams) and a logged
traceback; uint64 values above 2^63-1 reached SQLite and came back INTERNAL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from protofuzz import TracebackCounter

from tether.agent import AGENT_TOKEN_HEADER
from tether.crypto.pki import Role
from tether.testing import ControlHandle, start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import control_pb2 as pb

CONTROL = "/tether.v1.ControlService/"
BROKER = "/tether.v1.BrokerService/"
GARBAGE = (b"\xff", b"\x0a\x02\xc3\x28", b"\x12\x05abc")  # corrupt, bad UTF-8, truncated


def rich(err: grpc.RpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest fields) of a failed call's status."""
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status"
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return reason, fields


def _call_blocking(
    channel: grpc.Channel, method: str, messages: list[bytes], stream: str, kw: dict[str, Any]
) -> grpc.RpcError:
    none: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if stream == "stream_stream":
            list(channel.stream_stream(method, **none)(iter(messages), timeout=10, **kw))
        elif stream == "stream_unary":
            channel.stream_unary(method, **none)(iter(messages), timeout=10, **kw)
        else:
            channel.unary_unary(method, **none)(messages[0], timeout=10, **kw)
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"{method} succeeded")


async def call(
    channel: grpc.Channel, method: str, messages: list[bytes], *, stream: str = "", **kw: Any
) -> grpc.RpcError:
    """Sends raw bytes on a blocking channel (in a thread: the servers share this event
    loop); returns the error the call must end with. Blocking, because grpcio's asyncio
    client reports its own INTERNAL when a server answers a stream early."""
    return await asyncio.to_thread(_call_blocking, channel, method, messages, stream, kw)


def assert_invalid(err: grpc.RpcError, field: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert rich(err) == ("INVALID_ARGUMENT", [field])


@pytest.fixture
def tracebacks() -> Iterator[TracebackCounter]:
    counter = TracebackCounter()
    logging.getLogger().addHandler(counter)
    try:
        yield counter
    finally:
        logging.getLogger().removeHandler(counter)


def blocking(cp: ControlHandle, role: Role = Role.ADMIN) -> grpc.Channel:
    return grpc.secure_channel(cp.address, cp.pki.operator_tls(role).credentials())


async def test_control_undecodable_unary_and_stream(
    tmp_path: Path, tracebacks: TracebackCounter
) -> None:
    """ControlService answers undecodable unary and stream requests INVALID_ARGUMENT on
    field "request", after authorization, and logs no traceback."""
    async with start_control(tmp_path) as cp:
        node = await cp.node_client("node-u")
        with (
            blocking(cp) as admin,
            grpc.secure_channel(cp.address, node.tls.credentials()) as node_channel,
        ):
            for garbage in GARBAGE:
                for rpc in ("GetTask", "ListTasks", "PutPolicy", "CancelTask"):
                    assert_invalid(await call(admin, CONTROL + rpc, [garbage]), "request")
                err = await call(
                    node_channel, CONTROL + "StreamReceipts", [garbage], stream="stream_stream"
                )
                assert_invalid(err, "request")
            # Authorization still comes first: garbage from a caller without the right
            # gets the refusal, not a hint about decoding.
            err = await call(admin, CONTROL + "RenewLease", [b"\xff"])
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        await node.close()
    assert tracebacks.count == 0, tracebacks.examples


async def test_broker_undecodable_unary_and_stream(
    tmp_path: Path, tracebacks: TracebackCounter
) -> None:
    """BrokerService answers undecodable unary and stream requests INVALID_ARGUMENT on
    field "request" and logs no traceback."""
    async with (
        start_control(tmp_path) as cp,
        start_sidecar(tmp_path, cp.address, agents=("alice",)) as side,
    ):
        md = ((AGENT_TOKEN_HEADER, side.tokens["alice"]),)
        await cp.client.submit("work", b"{}")
        async with side.agent("alice") as alice:
            task = await alice.claim("work")
        assert task is not None
        with grpc.insecure_channel(f"unix:{side.socket}") as channel:
            for garbage in GARBAGE:
                for rpc in ("ClaimTask", "Heartbeat", "CallTool", "CompleteTask"):
                    assert_invalid(
                        await call(channel, BROKER + rpc, [garbage], metadata=md), "request"
                    )
                err = await call(
                    channel, BROKER + "PutArtifact", [garbage], stream="stream_unary", metadata=md
                )
                assert_invalid(err, "request")
                # A later message of the stream: the header is good, the chunk is not.
                header = bpb.PutArtifactRequest(
                    header=bpb.ArtifactHeader(task_id=task.task_id, name="out.txt")
                ).SerializeToString()
                err = await call(
                    channel,
                    BROKER + "PutArtifact",
                    [header, garbage],
                    stream="stream_unary",
                    metadata=md,
                )
                assert_invalid(err, "request")
            # The health service is guarded too.
            err = await call(channel, "/grpc.health.v1.Health/Check", [b"\xff"])
            assert_invalid(err, "request")
    assert tracebacks.count == 0, tracebacks.examples


def _forged_page_token(seq: int) -> str:
    doc = json.dumps({"a": seq, "f": ""}).encode()
    return base64.urlsafe_b64encode(doc).decode().rstrip("=")


U64_MAX = 2**64 - 1
NODE = "node-r"
TOO_BIG: list[tuple[str, Any, str]] = [  # (rpc, request, the field it must name)
    ("RenewLease", pb.RenewLeaseRequest(task_id="t", fencing_token=U64_MAX), "fencing_token"),
    ("RenewLease", pb.RenewLeaseRequest(task_id="t", fencing_token=2**63), "fencing_token"),
    (
        "TransitionTask",
        pb.TransitionTaskRequest(task_id="t", fencing_token=2**63, event=pb.TASK_EVENT_START),
        "fencing_token",
    ),
    (
        "IssueCredential",
        pb.IssueCredentialRequest(task_id="t", fencing_token=U64_MAX, name="n", tool="t"),
        "fencing_token",
    ),
    (
        "ReserveBudget",
        pb.ReserveBudgetRequest(
            task_id="t", fencing_token=1, reservation_id="r", amount_micros=2**63 - 1
        ),
        "amount_micros",
    ),
    (
        "SettleBudget",
        pb.SettleBudgetRequest(
            task_id="t", fencing_token=1, reservation_id="r", actual_micros=2**62
        ),
        "actual_micros",
    ),
    ("GetPolicy", pb.GetPolicyRequest(task_id="t", fencing_token=U64_MAX), "fencing_token"),
]
TOO_BIG_OPERATOR: list[tuple[str, Any, str]] = [
    ("GetPolicy", pb.GetPolicyRequest(version=2**63), "version"),
    ("GetPolicy", pb.GetPolicyRequest(version=U64_MAX), "version"),
    (
        "SubmitTask",
        pb.SubmitTaskRequest(queue="work", budget_limit_micros=2**63 - 1),
        "budget_limit_micros",
    ),
    ("ListTasks", pb.ListTasksRequest(page_token=_forged_page_token(2**63)), "page_token"),
    ("ListTasks", pb.ListTasksRequest(page_token=_forged_page_token(2**70)), "page_token"),
    ("GetInclusionProof", pb.GetInclusionProofRequest(leaf_index=U64_MAX), "leaf_index"),
    ("GetInclusionProof", pb.GetInclusionProofRequest(tree_size=2**63), "tree_size"),
    (
        "GetConsistencyProof",
        pb.GetConsistencyProofRequest(first_size=1, second_size=U64_MAX),
        "second_size",
    ),
    ("ExportBundle", pb.ExportBundleRequest(since_unix_ms=-1), "since_unix_ms"),
]


async def test_out_of_range_integers_are_invalid_argument(tmp_path: Path) -> None:
    """An integer a store column cannot hold (uint64 above 2^63-1, a huge amount, a forged
    page cursor, a negative time) is refused at the edge with INVALID_ARGUMENT naming it."""
    async with start_control(tmp_path) as cp:
        node = await cp.node_client(NODE)
        try:
            with (
                grpc.secure_channel(cp.address, node.tls.credentials()) as as_node,
                blocking(cp) as as_admin,
            ):
                for rpc, request, field in TOO_BIG:
                    if "node_id" in request.DESCRIPTOR.fields_by_name:
                        request.node_id = NODE
                    err = await call(as_node, CONTROL + rpc, [request.SerializeToString()])
                    assert_invalid(err, field)
                for rpc, request, field in TOO_BIG_OPERATOR:
                    err = await call(as_admin, CONTROL + rpc, [request.SerializeToString()])
                    assert_invalid(err, field)
        finally:
            await node.close()
