"""Tool mediation end to end: real control plane, real sidecar, real adapters.

Grants, budgets under concurrency, idempotent replays, outcome-unknown calls
and an unreachable control plane, each proved by counting real side effects
(lines appended to a file outside the sidecar's state dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tether.agent import AgentClient
from tether.core import errors as E
from tether.crypto.receipts import verify_receipt
from tether.sidecar.mediation import arguments_digest
from tether.testing import (
    SidecarHandle,
    endpoint,
    spawn_control_cli,
    start_control,
    start_sidecar,
)
from tether.v1 import control_pb2 as pb


def policy(shared: Path, *, budget: int = 0) -> str:
    """A policy whose append tools write to `shared` (outside every state dir)."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.echo]
adapter = "python"
[tools.echo.python]
entrypoint = "tether.sidecar.tools.builtin:echo"
[tools.append]
adapter = "python"
cost_micros = 100
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.append_free]
adapter = "python"
[tools.append_free.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.append_idem]
adapter = "python"
idempotent = true
[tools.append_idem.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.sleep]
adapter = "python"
[tools.sleep.python]
entrypoint = "tether.sidecar.tools.builtin:sleep"
[tools.launch]
adapter = "python"
[tools.launch.python]
entrypoint = "tether.sidecar.tools.builtin:noop"
[queues.work]
tools = ["echo", "append", "append_free", "append_idem", "sleep"]
budget_micros = {budget}
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def receipts(side: SidecarHandle, task_id: str) -> list[tuple[str, str]]:
    """(kind, status) of the task's verified receipts, in order."""
    deps = side.sidecar.deps
    out = []
    for env in deps.sink.envelopes(task_id):
        r = verify_receipt(env, deps.uplink._node_key.public)
        out.append((r.kind.name, r.status))
    return out


async def claim(agent: AgentClient) -> str:
    task = await agent.claim("work", wait_ms=2000)
    assert task is not None
    return task.task_id


async def test_ungranted_tool_is_permission_denied_naming_it(tmp_path: Path) -> None:
    """A tool the queue does not grant is PERMISSION_DENIED naming the tool, with a receipt."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(tmp_path / "shared.txt"))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        with pytest.raises(E.PolicyDenied, match="'launch'") as info:
            await agent.call_tool(tid, "launch", {})
        cause = info.value.__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.PERMISSION_DENIED
        assert receipts(side, tid)[-1] == ("TOOL_DENIED", "POLICY_DENIED")


async def test_budget_allows_exactly_ten_of_twenty_concurrent_calls(tmp_path: Path) -> None:
    """20 concurrent calls of a tool costing a tenth of the budget: exactly 10 run."""
    shared = tmp_path / "shared.txt"
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(shared, budget=1000))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        results = await asyncio.gather(
            *(agent.call_tool(tid, "append", {"line": f"call {i}"}) for i in range(20)),
            return_exceptions=True,
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, E.BudgetExhausted)]
        assert len(ok) == 10, results
        assert len(refused) == 10, results
        assert len(lines(shared)) == 10
        assert all(r.cost_micros == 100 for r in ok)
        cause = refused[0].__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        kinds = receipts(side, tid)
        assert kinds.count(("TOOL_CALL", "ok")) == 10
        assert kinds.count(("TOOL_DENIED", "BUDGET_EXHAUSTED")) == 10
        task = (await control.client.get_task(tid)).task
        assert task.budget_spent_micros == 1000


async def test_idempotency_key_replays_and_refuses_other_arguments(tmp_path: Path) -> None:
    """Five calls with one key (three of them concurrent) append once; other args are refused."""
    shared = tmp_path / "shared.txt"
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(shared, budget=10_000))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        args = {"line": "once"}
        first = await agent.call_tool(tid, "append", args, idempotency_key="k1")
        second = await agent.call_tool(tid, "append", args, idempotency_key="k1")
        rest = await asyncio.gather(
            *(agent.call_tool(tid, "append", args, idempotency_key="k1") for _ in range(3))
        )
        assert not first.replayed
        assert first.cost_micros == 100
        assert second.replayed
        assert all(r.replayed for r in rest)
        assert {json.dumps(r.result) for r in (first, second, *rest)} == {json.dumps(first.result)}
        assert second.cost_micros == 0
        assert lines(shared) == ["once"]
        with pytest.raises(E.IdempotencyConflict) as info:
            await agent.call_tool(tid, "append", {"line": "other"}, idempotency_key="k1")
        cause = info.value.__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert lines(shared) == ["once"]
        statuses = [s for k, s in receipts(side, tid) if k == "TOOL_CALL"]
        assert statuses == ["ok", "replayed", "replayed", "replayed", "replayed"]
        task = (await control.client.get_task(tid)).task
        assert task.budget_spent_micros == 100


async def test_started_record_reruns_only_idempotent_tools(tmp_path: Path) -> None:
    """A STARTED record (crash mid-call) is ABORTED for a plain tool and re-run if idempotent."""
    shared = tmp_path / "shared.txt"
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(shared, budget=10_000))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        held = next(iter(side.sidecar.deps.leases))
        uplink = side.sidecar.uplink
        args = {"line": "maybe"}
        for tool, key in (("append_free", "crashed"), ("append_idem", "crashed-idem")):
            # What a sidecar that died between STARTED and COMPLETED leaves behind.
            await uplink.record_tool_call(
                task_id=tid,
                fencing_token=held.lease.fencing_token,
                idempotency_key=key,
                tool=tool,
                arguments_sha256=arguments_digest(args),
                phase=pb.TOOL_CALL_PHASE_STARTED,
            )
        with pytest.raises(E.OutcomeUnknown, match="outcome is unknown") as info:
            await agent.call_tool(tid, "append_free", args, idempotency_key="crashed")
        cause = info.value.__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.ABORTED
        assert lines(shared) == []
        rerun = await agent.call_tool(tid, "append_idem", args, idempotency_key="crashed-idem")
        assert not rerun.replayed
        assert lines(shared) == ["maybe"]
        again = await agent.call_tool(tid, "append_idem", args, idempotency_key="crashed-idem")
        assert again.replayed
        assert lines(shared) == ["maybe"]
        assert ("TOOL_DENIED", "OUTCOME_UNKNOWN") in receipts(side, tid)


def _phase(db: Path, task_id: str, key: str) -> str:
    """The phase of a tool-call record, read from the control plane's database file."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        row = conn.execute(
            "SELECT phase FROM tool_calls WHERE task_id = ? AND idempotency_key = ?",
            (task_id, key),
        ).fetchone()
    return "" if row is None else {1: "STARTED", 2: "COMPLETED"}[row[0]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def control_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_unreachable_control_plane_is_unavailable_never_a_duplicate(
    tmp_path: Path, control_procs: list[subprocess.Popen[bytes]]
) -> None:
    """Control plane down: UNAVAILABLE before a run; a keyed call that ran gets its spooled
    outcome, a retry replays it (never re-runs), and the record completes once it is back."""
    shared = tmp_path / "shared.txt"
    # Fixed ports, so the restarted control plane is where the sidecar was told it is.
    listen = (
        *("--listen", f"127.0.0.1:{free_port()}"),
        *("--enroll-listen", f"127.0.0.1:{free_port()}"),
    )
    proc, address = spawn_control_cli(tmp_path, extra_args=listen)
    control_procs.append(proc)
    async with endpoint(address).admin() as client:
        await client.put_policy(policy(shared, budget=10_000))
        await client.submit("work", b"{}")
    async with (
        start_sidecar(tmp_path, address, uplink_retry_budget_ms=300) as side,
        side.agent("alice") as agent,
    ):
        tid = await claim(agent)
        # Killed while a keyed call runs: the tool ran, and its outcome rides with its
        # receipt in the spool, so the agent gets it under the lease the sidecar holds.
        call = asyncio.create_task(
            agent.call_tool(tid, "sleep", {"seconds": 0.5}, idempotency_key="nap")
        )
        await asyncio.sleep(0.2)
        proc.kill()
        proc.wait()
        first = await call
        assert not first.replayed
        assert first.result == {"slept": 0.5}
        # Before anything runs: nothing runs, and the agent is told so.
        with pytest.raises(E.Unavailable, match="did not run"):
            await agent.call_tool(tid, "append", {"line": "x"})
        with pytest.raises(E.Unavailable, match="did not run"):
            await agent.call_tool(tid, "append_free", {"line": "y"}, idempotency_key="k")
        assert lines(shared) == []
        # A keyless free tool runs under the lease the sidecar still holds.
        out = await agent.call_tool(tid, "echo", {"n": 1})
        assert out.result["args"] == {"n": 1}
        # A retry while the control plane is down replays the spooled outcome.
        again = await agent.call_tool(tid, "sleep", {"seconds": 0.5}, idempotency_key="nap")
        assert again.replayed
        assert again.result == {"slept": 0.5}

        proc2, _ = spawn_control_cli(tmp_path, extra_args=listen)
        control_procs.append(proc2)
        record = ""
        for _ in range(100):  # the spool reaches the control plane within its backoff
            record = await asyncio.to_thread(_phase, tmp_path / "control.db", tid, "nap")
            if record == "COMPLETED":
                break
            await asyncio.sleep(0.1)
        assert record == "COMPLETED"
        replay = await agent.call_tool(tid, "sleep", {"seconds": 0.5}, idempotency_key="nap")
        assert replay.replayed
        assert replay.result == {"slept": 0.5}
        statuses = [s for k, s in receipts(side, tid) if k == "TOOL_CALL"]
        assert statuses.count("ok") == 2  # the nap and the echo ran once each
