"""The sidecar's Broker in-process against the real control plane (fast checks)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.agent import AgentClient
from tether.core import errors as E
from tether.core.states import State
from tether.crypto.receipts import verify_receipt
from tether.sidecar.config import AgentSpec, SidecarConfig
from tether.sidecar.server import Sidecar, prepare_socket
from tether.testing import start_control, start_sidecar, write_agent_token
from tether.v1 import broker_pb2 as bpb

POLICY = """
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = ["work"]
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[queues.work]
tools = ["echo"]
"""


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Polls `predicate` until true; fails after `timeout_s` (a hang guard, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_claim_start_heartbeat_complete_succeeds(tmp_path: Path) -> None:
    """An agent claims, starts, heartbeats and completes; the control plane shows succeeded."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice",)) as side,
    ):
        submitted = await control.client.submit("work", b'{"n": 1}')
        async with side.agent("alice") as agent:
            task = await agent.claim("work", wait_ms=1000)
            assert task is not None
            assert task.task_id == submitted.task.task_id
            assert task.json() == {"n": 1}
            assert task.state == "leased"
            assert (await agent.start(task.task_id)).state == "running"
            assert await agent.heartbeat(task.task_id) >= task.lease_expires_unix_ms
            state, pending = await agent.complete(task.task_id, result=b"ok")
            assert state == "succeeded"
            assert not pending  # the control plane acknowledged the task's receipts
        got = await control.client.get_task(task.task_id)
        assert got.task.state == State.SUCCEEDED
        assert got.task.result == b"ok"


async def test_empty_queue_returns_no_task(tmp_path: Path) -> None:
    """A claim on an empty queue returns None after its wait instead of an error."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        assert await agent.claim("work", wait_ms=50) is None


async def test_other_agent_is_refused_on_every_rpc(tmp_path: Path) -> None:
    """Agent B gets PERMISSION_DENIED on every RPC for agent A's task, with a clear message."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice", "bob")) as side,
        side.agent("alice") as alice,
        side.agent("bob") as bob,
    ):
        await control.client.submit("work", b"{}")
        task = await alice.claim("work", wait_ms=1000)
        assert task is not None
        tid = task.task_id
        calls = [
            bob.start(tid),
            bob.heartbeat(tid),
            bob.call_tool(tid, "echo", {}),
            bob.remember(tid, "k", b"v"),
            bob.recall(tid, "k"),
            bob.put_artifact(tid, "a.txt", b"x"),
            bob.complete(tid, result=b"stolen"),
        ]
        for call in calls:
            with pytest.raises(E.NotOwner, match="leased to another agent"):
                await call
        assert (await alice.complete(tid))[0] == "succeeded"


async def test_unknown_agent_token_is_unauthenticated(tmp_path: Path) -> None:
    """A token no agent has, or none at all, is refused with UNAUTHENTICATED."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
    ):
        for token in ("not-a-real-token-at-all", None):
            async with AgentClient(side.socket, token=token) as stranger:
                with pytest.raises(E.Unauthenticated):
                    await stranger.claim("work")


async def test_unknown_node_cannot_register(tmp_path: Path) -> None:
    """A sidecar with a join token the control plane never issued is refused (UNAUTHENTICATED)."""
    async with start_control(tmp_path) as control:
        with pytest.raises(E.Unauthenticated):
            async with start_sidecar(
                tmp_path, control.address, enrollment_token="wrong-enrollment-token-xyz"
            ):
                pass


async def test_memory_is_scoped_to_task_holder_and_agent(tmp_path: Path) -> None:
    """Task memory follows the lease holder; agent memory is never readable by another agent."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, agents=("alice", "bob")) as side,
        side.agent("alice") as alice,
        side.agent("bob") as bob,
    ):
        await control.client.submit("work", b"{}")
        await control.client.submit("work", b"{}")
        ta = await alice.claim("work", wait_ms=1000)
        tb = await bob.claim("work", wait_ms=1000)
        assert ta is not None
        assert tb is not None
        await alice.remember(ta.task_id, "notes", b"task-secret")
        await alice.remember(ta.task_id, "pref", b"alice-only", scope="agent")
        assert await alice.recall(ta.task_id, "notes") == b"task-secret"
        assert await alice.recall(ta.task_id, "pref", scope="agent") == b"alice-only"
        assert await bob.recall(tb.task_id, "pref", scope="agent") is None
        assert await bob.recall(tb.task_id, "notes") is None
        with pytest.raises(E.NotOwner):
            await bob.recall(ta.task_id, "notes")


async def test_put_artifact_hashes_and_stores(tmp_path: Path) -> None:
    """An artifact is stored under the task with its sha256; bad names and oversize are refused."""
    import hashlib

    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, max_artifact_bytes=1_000_000) as side,
        side.agent("alice") as agent,
    ):
        await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
        data = b"abc" * 200_000
        digest, size = await agent.put_artifact(task.task_id, "out.bin", data)
        assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
        stored = side.state_dir / "artifacts" / task.task_id / "out.bin"
        assert stored.read_bytes() == data
        with pytest.raises(E.InvalidArgument, match="name"):
            await agent.put_artifact(task.task_id, "../escape", b"x")
        with pytest.raises(E.ResourceExhausted):
            await agent.put_artifact(task.task_id, "big.bin", b"x" * 1_000_001)
        assert not (side.state_dir / "artifacts" / task.task_id / "big.bin").exists()


async def test_tool_outside_lease_scope_is_denied_with_receipt(tmp_path: Path) -> None:
    """A tool the lease does not grant is PERMISSION_DENIED before anything runs, and recorded."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
        with pytest.raises(E.PolicyDenied, match="not granted"):
            await agent.call_tool(task.task_id, "rm_rf", {"path": "/"})
        sink = side.sidecar.deps.sink
        kinds = [
            verify_receipt(env, side.sidecar.deps.uplink._node_key.public).kind.name
            for env in sink.envelopes(task.task_id)
        ]
        assert kinds == ["LEASE_GRANTED", "TOOL_DENIED"]


async def test_granted_python_tool_runs_with_receipt(tmp_path: Path) -> None:
    """A tool the policy grants runs through its adapter; the call is recorded as TOOL_CALL."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(POLICY)
        await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
        assert task.tools == ("echo",)
        out = await agent.call_tool(task.task_id, "echo", {"text": "hi"})
        assert out.status == "ok"
        assert out.result["args"] == {"text": "hi"}
        deps = side.sidecar.deps
        kinds = [
            verify_receipt(env, deps.uplink._node_key.public).kind.name
            for env in deps.sink.envelopes(task.task_id)
        ]
        assert kinds == ["LEASE_GRANTED", "TOOL_CALL"]


async def test_silent_agent_loses_lease_loudly(tmp_path: Path) -> None:
    """A silent agent's lease lapses; later calls get FAILED_PRECONDITION "lease lost"."""
    async with (
        start_control(tmp_path, sweep_interval_ms=100) as control,
        start_sidecar(tmp_path, control.address, agent_liveness_ms=200) as side,
        side.agent("alice") as agent,
    ):
        await control.client.submit("work", b"{}", lease_ttl_ms=1000)
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
        deps = side.sidecar.deps
        held = next(iter(deps.leases))
        await until(lambda: bool(held.lost_reason))
        with pytest.raises(E.LeaseLost, match="lease lost"):
            await agent.complete(task.task_id)
        with pytest.raises(E.LeaseLost):
            await agent.call_tool(task.task_id, "echo", {})
        kinds = [
            verify_receipt(env, deps.uplink._node_key.public).kind.name
            for env in deps.sink.envelopes(task.task_id)
        ]
        assert kinds[-1] == "LEASE_LOST"


async def test_sidecar_keeps_lease_alive_for_live_agent(tmp_path: Path) -> None:
    """While the agent keeps calling, the sidecar renews past the original expiry."""
    async with (
        start_control(tmp_path, sweep_interval_ms=100) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.submit("work", b"{}", lease_ttl_ms=1000)
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
        await agent.start(task.task_id)
        held = next(iter(side.sidecar.deps.leases))
        while held.lease.expires_unix_ms <= task.lease_expires_unix_ms + 1000:
            await agent.recall(task.task_id, "x")  # any call counts as alive
            await asyncio.sleep(0.1)
        assert (await agent.complete(task.task_id))[0] == "succeeded"


async def test_control_plane_outage_keeps_held_lease_and_refuses_claims(tmp_path: Path) -> None:
    """Control plane down: calls under the held lease still work; claims get UNAVAILABLE + hint."""
    async with start_control(tmp_path) as control:
        side_cm = start_sidecar(tmp_path, control.address, uplink_retry_budget_ms=300)
        side = await side_cm.__aenter__()
        agent = side.agent("alice")
        await control.client.submit("work", b"{}")
        task = await agent.claim("work", wait_ms=1000)
        assert task is not None
    try:
        assert await agent.remember(task.task_id, "k", b"v")
        assert await agent.recall(task.task_id, "k") == b"v"
        assert await agent.heartbeat(task.task_id) == task.lease_expires_unix_ms
        with pytest.raises(E.Unavailable, match="retry") as info:
            await agent.claim("work")
        assert int(info.value.metadata["retry_after_ms"]) > 0
        with pytest.raises(E.Unavailable, match="retry"):
            await agent.complete(task.task_id)
    finally:
        await agent.close()
        await side_cm.__aexit__(None, None, None)


async def test_health_tcp_and_socket_mode(tmp_path: Path) -> None:
    """The socket is 0660 and serves health, TCP serves agents too, a live socket is refused."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address, listen_tcp="127.0.0.1:0") as side,
    ):
        async with AgentClient(f"127.0.0.1:{side.sidecar.tcp_port}", side.tokens["alice"]) as a:
            assert await a.claim("work") is None
        assert side.socket.stat().st_mode & 0o777 == 0o660
        async with grpc.aio.insecure_channel(f"unix:{side.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(E.ConfigError, match="live"):
            prepare_socket(side.socket)


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A leftover socket file nobody serves is removed at start."""
    import socket as so

    path = tmp_path / "stale.sock"
    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    prepare_socket(path)
    assert not path.exists()


async def test_per_agent_socket_binds_identity(tmp_path: Path) -> None:
    """An agent on its own socket needs no token and is that agent."""
    async with start_control(tmp_path) as control:
        key = tmp_path / "n.key"
        from tether.crypto.signing import SigningKey

        SigningKey.generate().save(key)
        enroll = tmp_path / "enroll"
        enroll.write_text(await control.join_token("n1"))
        enroll.chmod(0o600)  # a join token file others can read is refused
        write_agent_token(tmp_path / "bob.token")
        cfg = SidecarConfig(
            control_address=control.address,
            node_id="n1",
            node_key_path=key,
            trust_bundle_path=control.trust_bundle,
            enroll_address=control.enroll_address,
            enrollment_token_file=enroll,
            state_dir=tmp_path / "st",
            socket_path=tmp_path / "shared.sock",
            agents=(
                AgentSpec("alice", socket_path=tmp_path / "alice.sock"),
                AgentSpec("bob", token_file=tmp_path / "bob.token"),
            ),
        )
        sidecar = Sidecar(cfg)
        await sidecar.start()
        try:
            await control.client.submit("work", b"{}")
            async with AgentClient(tmp_path / "alice.sock") as alice:
                task = await alice.claim("work", wait_ms=1000)
                assert task is not None
                held = next(iter(sidecar.deps.leases))
                assert held.agent == "alice"
                assert (await alice.complete(task.task_id))[0] == "succeeded"
        finally:
            await sidecar.stop(0)


async def test_graceful_stop_releases_leases(tmp_path: Path) -> None:
    """Stopping the sidecar hands held leases back: the task is queued again at once."""
    async with start_control(tmp_path) as control:
        async with start_sidecar(tmp_path, control.address) as side, side.agent("alice") as a:
            await control.client.submit("work", b"{}")
            task = await a.claim("work", wait_ms=1000)
            assert task is not None
        got = await control.client.get_task(task.task_id)
        assert got.task.state == State.QUEUED


def test_task_view_cannot_carry_a_credential() -> None:
    """TaskView's schema is exactly the known non-secret fields; none can hold a credential."""
    fields = {f.name: f.type for f in bpb.TaskView.DESCRIPTOR.fields}
    assert set(fields) == {
        "task_id", "queue", "payload", "attempt", "fencing_token",
        "lease_expires_unix_ms", "tools", "state",
    }  # fmt: skip
    for name in fields:
        assert not any(w in name for w in ("secret", "credential", "password", "key"))
    assert json.dumps(sorted(fields))
