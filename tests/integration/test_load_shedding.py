"""Load shedding of both servers (tether.grpcutil.limits) against real servers.

Limits are set low so one held call fills them; each test proves a refusal is
RESOURCE_EXHAUSTED with reason OVERLOADED and a retry hint (ErrorInfo metadata,
google.rpc.RetryInfo and the grpc-retry-pushback-ms trailer), that health
checks are never shed, that one caller's flood leaves another's calls alone,
and that slots come back when calls end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tether.agent import AGENT_TOKEN_HEADER
from tether.control import cmd as control_cmd
from tether.core.errors import ConfigError, Overloaded, Unavailable
from tether.grpcutil.limits import (
    CONTROL_LIMITS,
    SIDECAR_LIMITS,
    LoadShedder,
    ServerLimits,
    limit_values,
)
from tether.grpcutil.status import from_rpc_error, to_status
from tether.metrics import COUNTERS
from tether.sidecar import cmd as sidecar_cmd
from tether.sidecar.config import load as load_sidecar_config
from tether.testing import start_control, start_sidecar
from tether.v1 import broker_pb2 as bpb
from tether.v1 import broker_pb2_grpc as bpb_grpc

AGENTS = ("alice", "bob")


def shed_count(server: str, reason: str) -> float:
    """tether_shed_total{server,reason} as the metrics endpoint would serve it."""
    value = COUNTERS.get_sample_value("tether_shed_total", {"server": server, "reason": reason})
    return value or 0.0


def overload_details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, int, str]:
    """The ErrorInfo, the RetryInfo delay (ms) and the pushback trailer of a shed call."""
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            detail.Unpack(retry)
    delay_ms = retry.retry_delay.seconds * 1000 + retry.retry_delay.nanos // 1_000_000
    trailers = dict(err.trailing_metadata() or ())
    return info, delay_ms, str(trailers.get("grpc-retry-pushback-ms", ""))


class Broker:
    """Raw BrokerService calls on the sidecar's socket, as any agent (or none)."""

    def __init__(self, sock: Path, tokens: dict[str, str]) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"unix:{sock}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = bpb_grpc.BrokerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.tokens = tokens

    def md(self, agent: str) -> tuple[tuple[str, str], ...]:
        return ((AGENT_TOKEN_HEADER, self.tokens[agent]),)

    async def claim(self, agent: str) -> bpb.ClaimTaskResponse:
        response: bpb.ClaimTaskResponse = await self.stub.ClaimTask(
            bpb.ClaimTaskRequest(queue="work"), metadata=self.md(agent), timeout=10
        )
        return response

    def hold(self, agent: str) -> Any:
        """An upload that never sends a chunk: a call that stays in flight until cancelled."""
        return self.stub.PutArtifact(metadata=self.md(agent))

    async def serving(self) -> bool:
        resp = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Polls `predicate()` until true; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def broker(tmp_path: Path, **limits: int) -> AsyncIterator[tuple[Any, Broker]]:
    """A control plane and a sidecar whose Broker has `limits`; yields (sidecar, client)."""
    async with (
        start_control(tmp_path) as cp,
        start_sidecar(tmp_path, cp.address, agents=AGENTS, limits=ServerLimits(**limits)) as side,
    ):
        client = Broker(side.socket, side.tokens)
        try:
            yield side, client
        finally:
            await client.channel.close()


async def test_per_agent_limit_sheds_with_retry_hint_and_spares_others(tmp_path: Path) -> None:
    """With alice's one slot taken, her next call is RESOURCE_EXHAUSTED (OVERLOADED) with a
    retry hint in ErrorInfo, RetryInfo and the pushback trailer; bob and health are served;
    once her call ends, her slot is free again."""
    async with broker(tmp_path, max_rpcs_per_caller=1) as (side, client):
        before = shed_count("sidecar", "caller_concurrency")
        held = client.hold("alice")
        await until(lambda: side.sidecar.shedder.in_flight == 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.claim("alice")
        info, delay_ms, pushback = overload_details(caught.value)
        assert info.reason == "OVERLOADED"
        assert info.domain == "tether.dev"
        assert info.metadata["reason"] == "caller_concurrency"
        hint = int(info.metadata["retry_after_ms"])
        assert hint == delay_ms == int(pushback)
        assert SIDECAR_LIMITS.retry_after_ms <= hint <= 2 * SIDECAR_LIMITS.retry_after_ms
        assert "max_rpcs_per_caller = 1" in (caught.value.details() or "")
        err = from_rpc_error(caught.value)
        assert isinstance(err, Overloaded)
        assert shed_count("sidecar", "caller_concurrency") == before + 1

        assert not (await client.claim("bob")).HasField("task")  # another agent: served
        assert await client.serving()
        held.cancel()
        await until(lambda: side.sidecar.shedder.in_flight == 0)
        assert not (await client.claim("alice")).HasField("task")


async def test_server_limit_sheds_every_caller_but_not_health(tmp_path: Path) -> None:
    """With the server's calls in flight at max_concurrent_rpcs, every agent's new call is
    shed (reason concurrency) while health checks keep answering SERVING."""
    async with broker(tmp_path, max_concurrent_rpcs=2) as (side, client):
        held = [client.hold("alice"), client.hold("alice")]
        await until(lambda: side.sidecar.shedder.in_flight == 2)
        for agent in AGENTS:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.claim(agent)
            info, _, _ = overload_details(caught.value)
            assert info.metadata["reason"] == "concurrency"
        for _ in range(20):
            assert await client.serving()
        assert side.sidecar.shedder.in_flight == 2  # health checks are not counted
        for call in held:
            call.cancel()
        await until(lambda: side.sidecar.shedder.in_flight == 0)
        assert not (await client.claim("bob")).HasField("task")


async def test_header_only_unary_call_is_shed_as_idle(tmp_path: Path) -> None:
    """A unary call whose request never follows its headers is shed after
    request_read_timeout_ms (reason idle) and frees its slot."""
    async with broker(tmp_path, request_read_timeout_ms=300, max_rpcs_per_caller=1) as (
        side,
        client,
    ):
        before = shed_count("sidecar", "idle")
        headers_only = client.channel.stream_unary("/tether.v1.BrokerService/ClaimTask")
        call = headers_only(metadata=client.md("alice"))
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert time.monotonic() - t0 >= 0.25
        info, delay_ms, _ = overload_details(caught.value)
        assert info.metadata["reason"] == "idle"
        assert delay_ms > 0
        assert shed_count("sidecar", "idle") == before + 1
        assert side.sidecar.shedder.in_flight == 0
        assert not (await client.claim("alice")).HasField("task")


async def test_per_agent_rate_limit(tmp_path: Path) -> None:
    """An agent past its token bucket is shed (reason rate) with a hint of when its next
    token is due; another agent's bucket is its own."""
    async with broker(tmp_path, caller_rate_per_s=1, caller_burst=3) as (_, client):
        refusal: grpc.aio.AioRpcError | None = None
        served = 0
        for _ in range(30):  # the burst of 3, plus one a second while the calls run
            try:
                await client.claim("alice")
            except grpc.aio.AioRpcError as err:
                refusal = err
                break
            served += 1
        assert refusal is not None
        assert served >= 3
        info, delay_ms, _ = overload_details(refusal)
        assert info.metadata["reason"] == "rate"
        assert 0 < delay_ms <= 1000
        for _ in range(3):
            await client.claim("bob")


async def test_unauthenticated_callers_share_one_slot(tmp_path: Path) -> None:
    """Calls naming no known agent all count as one caller: one held call of a stranger
    sheds the next stranger, never a known agent."""
    async with broker(tmp_path, max_rpcs_per_caller=1) as (side, client):
        stranger = ((AGENT_TOKEN_HEADER, "not-a-token-of-any-agent"),)
        headers_only = client.channel.stream_unary("/tether.v1.BrokerService/ClaimTask")
        held = headers_only(metadata=stranger)
        await until(lambda: side.sidecar.shedder.in_flight == 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ClaimTask(bpb.ClaimTaskRequest(queue="work"), timeout=5)
        info, _, _ = overload_details(caught.value)
        assert "(unauthenticated)" in (caught.value.details() or "")
        assert info.metadata["reason"] == "caller_concurrency"
        assert not (await client.claim("alice")).HasField("task")
        held.cancel()


async def test_idle_stream_ends_with_its_connection_age(tmp_path: Path) -> None:
    """A stream held open forever is ended once its connection passes
    max_connection_age_ms plus the grace, and its slot is freed."""
    async with broker(tmp_path, max_connection_age_ms=500, max_connection_age_grace_ms=500) as (
        side,
        client,
    ):
        held = client.hold("alice")
        await until(lambda: side.sidecar.shedder.in_flight == 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(held, 10)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await until(lambda: side.sidecar.shedder.in_flight == 0)
        assert not (await client.claim("alice")).HasField("task")  # the client reconnects


def h2_frame(kind: int, flags: int, payload: bytes, stream: int = 0) -> bytes:
    """One HTTP/2 frame (RFC 9113 section 4.1)."""
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


async def test_client_pinging_too_often_is_sent_away(tmp_path: Path) -> None:
    """A raw HTTP/2 client pinging every 50 ms (min_ping_interval_ms is 1 s) is sent
    GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and its connection closed."""
    async with broker(tmp_path, min_ping_interval_ms=1000, max_ping_strikes=2) as (side, _):
        reader, writer = await asyncio.open_unix_connection(str(side.socket))
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, b""))
        goaway: tuple[int, bytes] | None = None

        async def ping() -> None:
            for n in range(200):
                writer.write(h2_frame(6, 0, n.to_bytes(8, "big")))
                await writer.drain()
                await asyncio.sleep(0.05)

        pinger = asyncio.create_task(ping())
        try:
            while goaway is None:
                header = await asyncio.wait_for(reader.readexactly(9), 10)
                length, kind = int.from_bytes(header[:3], "big"), header[3]
                payload = await reader.readexactly(length)
                if kind == 4 and not header[4] & 1:  # the server's SETTINGS: acknowledge
                    writer.write(h2_frame(4, 1, b""))
                if kind == 7:
                    goaway = int.from_bytes(payload[4:8], "big"), payload[8:]
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pinger
            writer.close()
        assert goaway[0] == 0xB  # ENHANCE_YOUR_CALM
        assert b"too_many_pings" in goaway[1]


async def test_control_plane_sheds_per_node_and_spares_health(tmp_path: Path) -> None:
    """At the control plane the caller is the node its certificate names: a node with its
    one slot held (an idle receipt stream) is shed, another node and an operator are
    served, and health answers."""
    async with start_control(tmp_path, limits=ServerLimits(max_rpcs_per_caller=1)) as cp:
        a = await cp.node_client("node-a")
        b = await cp.node_client("node-b")
        try:
            stream = a.stub.StreamReceipts()
            shedder = cp.running.shedder
            assert shedder is not None
            await until(lambda: shedder.in_flight == 1)
            with pytest.raises(Overloaded) as caught:
                await a.acquire_lease("work", "node-a", "alice")
            assert "'node:node-a'" in caught.value.message
            assert int(caught.value.metadata["retry_after_ms"]) > 0
            await b.acquire_lease("work", "node-b", "alice")
            await cp.client.list_tasks()
            tls = cp.pki.operator_tls()
            creds = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
            async with grpc.aio.secure_channel(
                cp.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                resp = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stream.cancel()
            await until(lambda: shedder.in_flight == 0)
            await a.acquire_lease("work", "node-a", "alice")
        finally:
            await a.close()
            await b.close()


def test_limits_are_validated_and_configurable(tmp_path: Path) -> None:
    """Sidecar limits come from TOML, TETHER_* env and flags (in that rising precedence),
    the control plane's from flags; out-of-range values name the limit."""
    base = {"control": "127.0.0.1:1", "node_id": "n", "key": "k", "agent_tokens": {"a": "t"}}
    toml = tmp_path / "sidecar.toml"
    toml.write_text("max_concurrent_rpcs = 16\ncaller_rate_per_s = 5\nmax_connections = 9\n")
    env = {"TETHER_MAX_CONCURRENT_RPCS": "64", "TETHER_CALLER_RATE_PER_S": "0"}
    cfg = load_sidecar_config({**base, "max_concurrent_rpcs": 32}, env, toml)
    assert cfg.limits.max_concurrent_rpcs == 32
    assert cfg.limits.caller_rate_per_s == 0
    assert cfg.limits.max_connections == 9
    assert cfg.limits.max_rpcs_per_caller == SIDECAR_LIMITS.max_rpcs_per_caller
    with pytest.raises(ConfigError, match="max_streams_per_connection"):
        load_sidecar_config(base, {"TETHER_MAX_STREAMS_PER_CONNECTION": "0"})
    with pytest.raises(ConfigError, match="request_read_timeout_ms"):
        ServerLimits(request_read_timeout_ms=10)

    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sidecar_cmd.register(sub)
    control_cmd.register(sub)
    required = ["--control", "127.0.0.1:1", "--node-id", "n", "--key", "k", "--agent", "a=t"]
    args = parser.parse_args(["sidecar", *required, "--max-rpcs-per-caller", "7"])
    assert sidecar_cmd.config_from_args(args).limits.max_rpcs_per_caller == 7
    args = parser.parse_args(["control", "--db", "x", "--key", "k", "--max-connection-age-ms", "0"])
    limits = CONTROL_LIMITS.replace(limit_values(args))
    assert limits.max_connection_age_ms == 0
    assert ("grpc.max_connection_age_ms", 0) not in limits.grpc_options()
    assert limits.max_concurrent_rpcs == CONTROL_LIMITS.max_concurrent_rpcs


def test_token_bucket_refills_at_the_configured_rate() -> None:
    """The per-caller bucket holds caller_burst tokens and refills caller_rate_per_s a
    second; its hint is when the next token is due."""
    now = [0.0]
    shedder = LoadShedder(
        ServerLimits(caller_rate_per_s=10, caller_burst=2), "test", clock=lambda: now[0]
    )
    for _ in range(2):
        assert shedder.admit("c") is None
        shedder.release("c")
    refusal = shedder.admit("c")
    assert refusal is not None
    assert refusal.metadata["retry_after_ms"] == "100"
    now[0] += 0.1
    assert shedder.admit("c") is None
    assert shedder.in_flight == 1
    shedder.release("c")
    assert shedder.in_flight == 0


def test_every_retry_hint_travels_three_ways() -> None:
    """Any error with a retry hint (an unreachable control plane's UNAVAILABLE too) carries
    it as ErrorInfo metadata, a RetryInfo and the grpc-retry-pushback-ms trailer; an error
    without one carries neither of the last two."""
    hinted = to_status(
        Unavailable("control plane unreachable", metadata={"retry_after_ms": "1500"})
    )
    status = status_pb2.Status.FromString(dict(hinted.trailing_metadata)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 500_000_000)
    assert dict(hinted.trailing_metadata)["grpc-retry-pushback-ms"] == "1500"
    plain = to_status(Unavailable("control plane unreachable"))
    assert [k for k, _ in plain.trailing_metadata] == ["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(plain.trailing_metadata[0][1])
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def test_lease_stream_steps_are_paced_by_the_callers_rate(tmp_path: Path) -> None:
    """Each StreamLeases step is a call's worth of work: after the first, every step waits
    for a token from the node's rate bucket, so one long stream cannot outrun
    caller_rate_per_s (the stream is paced, not ended)."""
    limits = ServerLimits(caller_rate_per_s=4, caller_burst=2)
    async with start_control(tmp_path, limits=limits) as cp:
        node = await cp.node_client("node-a")
        try:
            async with node.lease_stream("node-a") as stream:
                start = time.monotonic()
                for _ in range(6):  # the call's admission and step 2 take the burst
                    _, answer = await stream.step(queue="work", agent_id="alice")
                    assert answer is not None
                    assert not answer.HasField("task")  # nothing queued: only the pace counts
                elapsed = time.monotonic() - start
            # Steps 3-6 each waited for a token at 4 per second: at least ~1 s in all.
            assert elapsed >= 0.9, elapsed
        finally:
            await node.close()
