"""Fuzzing BrokerService: no generated request gets UNKNOWN or INTERNAL; health answers.

Every RPC of the sidecar's agent API is called on its Unix socket as each agent
(by the `x-tether-agent-token` metadata), with a wrong or missing token, with
junk metadata, and with structured, extreme, mutated, raw, invalid-UTF-8 and
wire-confused requests; PutArtifact also gets streams in the wrong order.
TETHER_FUZZ_REQUESTS sets the count (default 2,000; `make fuzz` runs 20,000)
and TETHER_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protofuzz import (
    Caller,
    Generator,
    Method,
    Pool,
    TracebackCounter,
    fuzz_requests,
    fuzz_seed,
    methods_of,
    run_fuzz,
)

from tether.agent import AGENT_TOKEN_HEADER
from tether.core.errors import TetherError
from tether.testing import start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb

SERVICE = bpb.DESCRIPTOR.services_by_name["BrokerService"]
AGENTS = ("alice", "bob")

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[credentials.api_token]
tools = ["echo"]
[tools.echo]
adapter = "python"
credential = "api_token"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.noop]
adapter = "python"
[tools.noop.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["echo", "noop"]
memory_scope = "agent"
"""


def _put_artifact(gen: Generator, method: Method) -> tuple[str, list[bytes]]:
    """PutArtifact streams out of order: chunk first, two headers, empty, oversized."""
    rng = gen.rng
    task_ids = gen.pool.strings.get("task_id") or ["t"]
    header = bpb.PutArtifactRequest(
        header=bpb.ArtifactHeader(
            task_id=rng.choice(task_ids),
            name=rng.choice(("out.txt", "..", ".", "a/b", "x" * 201, "", "ok-1.bin")),
        )
    ).SerializeToString()
    chunk = bpb.PutArtifactRequest(
        chunk=rng.randbytes(rng.choice((0, 10, 1000)))
    ).SerializeToString()
    shapes = (
        [header, chunk, chunk],
        [chunk, header],
        [header, header],
        [header],
        [],
        [header, bpb.PutArtifactRequest(chunk=b"x" * ((1 << 20) + 1)).SerializeToString()],
        [header, chunk, gen.mutate(chunk)],
    )
    return "stream-order", list(rng.choice(shapes))


async def test_broker_service_fuzz(tmp_path: Path) -> None:
    """Generated requests to every BrokerService RPC get no UNKNOWN/INTERNAL; health answers."""
    seed, count = fuzz_seed(), fuzz_requests()
    print(f"fuzz seed {seed} (TETHER_FUZZ_SEED={seed} replays), {count} requests")
    tracebacks = TracebackCounter()
    logging.getLogger().addHandler(tracebacks)
    try:
        async with start_control(tmp_path, policy=POLICY) as cp:
            await cp.client.put_secret("api_token", b"fuzz-secret-value-0123456789")
            async with start_sidecar(tmp_path, cp.address, agents=AGENTS) as side:
                target = f"unix:{side.socket}"
                channel = grpc.aio.insecure_channel(target)
                blocking = grpc.insecure_channel(target)
                pool = Pool()
                for name, value in (
                    ("queue", "work"),
                    ("tool", "echo"),
                    ("tool", "noop"),
                    ("key", "k1"),
                    ("arguments_json", "{}"),
                    ("arguments_json", json.dumps({"reveal_credentials": True})),
                    ("idempotency_key", "idem-1"),
                    ("name", "out.txt"),
                ):
                    pool.add(name, value)
                pool.add("wait_ms", 0)
                agents = {name: side.agent(name) for name in AGENTS}

                async def refresh(i: int) -> None:
                    """New tasks claimed by the agents, so calls find live leases."""
                    for _ in range(4):
                        await cp.client.submit("work", b"{}")
                    for agent in [*agents.values()] * 2:
                        try:
                            task = await agent.claim("work")
                        except TetherError:
                            continue
                        if task is not None:
                            pool.add("task_id", task.task_id)

                await refresh(0)
                callers = [
                    Caller(
                        name, channel, blocking, metadata=((AGENT_TOKEN_HEADER, side.tokens[name]),)
                    )
                    for name in AGENTS
                ]
                callers += [
                    Caller("no-token", channel, blocking, weight=0.25),
                    Caller(
                        "bad-token",
                        channel,
                        blocking,
                        metadata=((AGENT_TOKEN_HEADER, "nope"),),
                        weight=0.25,
                    ),
                ]
                try:
                    outcome = await run_fuzz(
                        seed=seed,
                        requests=count,
                        methods=methods_of(SERVICE),
                        callers=callers,
                        pool=pool,
                        health=channel,
                        metadata_keys=(AGENT_TOKEN_HEADER,),
                        stream_builder=_put_artifact,
                        refresh=refresh,
                        refresh_every=50,
                    )
                    after = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                finally:
                    await channel.close()
                    blocking.close()
                    for agent in agents.values():
                        await agent.close()
    finally:
        logging.getLogger().removeHandler(tracebacks)
    print(f"BrokerService: {outcome.summary()}; {tracebacks.count} tracebacks logged")
    replay = f"(seed {seed}; rerun with TETHER_FUZZ_SEED={seed})"
    assert outcome.sent == count
    assert not outcome.forbidden, f"{len(outcome.forbidden)} UNKNOWN/INTERNAL {replay}: " + (
        "; ".join(outcome.forbidden[:20])
    )
    assert not outcome.health_failures, f"health failed {replay}: {outcome.health_failures[:5]}"
    assert after.status == health_pb2.HealthCheckResponse.SERVING
    assert tracebacks.count == 0, f"tracebacks logged {replay}: {tracebacks.examples}"
