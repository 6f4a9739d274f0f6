"""A 64 KiB secret does not stall the sidecar: other agents keep their latency.

The redactor for a lease is set up when a tool call first uses its credentials.
Compiling every encoded form of a large secret into one regular expression took
seconds on the event loop, so every agent of the node (and its health checks)
waited; the literal matcher is built and run in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.agent import AGENT_TOKEN_HEADER
from tether.control.vault import MAX_SECRET_BYTES
from tether.testing import start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

LATENCY_LIMIT_S = 0.2

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[credentials.big]
tools = ["reveal"]
[tools.reveal]
adapter = "python"
credential = "big"
[tools.reveal.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["reveal"]
"""


def big_secret() -> bytes:
    """64 KiB of UTF-8 text with characters every encoding changes (JSON, URL, base64)."""
    unit = 'pä"ss/w+rd %\\ 0123456789-'.encode()
    cut = (unit * (MAX_SECRET_BYTES // len(unit) + 1))[:MAX_SECRET_BYTES]
    return cut.decode("utf-8", "ignore").encode()  # whole characters only


async def test_a_64_kib_secret_does_not_stall_other_agents(tmp_path: Path) -> None:
    """While one agent's tool call sets up redaction of a 64 KiB secret, another agent's
    Heartbeat and the sidecar's health check each answer within 200 ms."""
    secret = big_secret()
    async with start_control(tmp_path, policy=POLICY) as cp:
        await cp.client.put_secret("big", secret)
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path, cp.address, agents=("alice", "bob")) as side:
            channel = grpc.aio.insecure_channel(f"unix:{side.socket}")
            stub = bpb_grpc.BrokerServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            alice = ((AGENT_TOKEN_HEADER, side.tokens["alice"]),)
            bob = ((AGENT_TOKEN_HEADER, side.tokens["bob"]),)
            try:
                a_task = (
                    await stub.ClaimTask(bpb.ClaimTaskRequest(queue="work"), metadata=alice)
                ).task
                b_task = (
                    await stub.ClaimTask(bpb.ClaimTaskRequest(queue="work"), metadata=bob)
                ).task
                assert a_task.task_id
                assert b_task.task_id

                latencies: list[float] = []
                done = asyncio.Event()

                async def probe() -> None:
                    while not done.is_set():
                        t0 = time.monotonic()
                        await stub.Heartbeat(
                            bpb.HeartbeatRequest(task_id=b_task.task_id), metadata=bob, timeout=5
                        )
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        latencies.append(time.monotonic() - t0)
                        await asyncio.sleep(0.01)

                prober = asyncio.create_task(probe())
                await asyncio.sleep(0.1)
                t0 = time.monotonic()
                reply = await stub.CallTool(
                    bpb.CallToolRequest(
                        task_id=a_task.task_id,
                        tool="reveal",
                        arguments_json=json.dumps({"reveal_credentials": True}),
                    ),
                    metadata=alice,
                    timeout=30,
                )
                call_s = time.monotonic() - t0
                await asyncio.sleep(0.1)
                done.set()
                await prober
            finally:
                await channel.close()
    result = json.loads(reply.result_json)
    assert result["credentials"] == {"big": "[REDACTED]"}
    assert result["credentials_b64"] == {"big": "[REDACTED]"}
    assert secret.decode() not in reply.result_json
    print(f"tool call {call_s:.3f}s; slowest Heartbeat+health {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 3
    assert max(latencies) < LATENCY_LIMIT_S, (
        f"slowest Heartbeat+health {max(latencies):.3f}s during a {call_s:.3f}s tool call"
    )
