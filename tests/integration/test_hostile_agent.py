"""A hostile agent (and an unlucky, clock-skewed node) against the point of action.

Real control plane, real sidecars, real policy: every refusal here is one the
policy or the lease demands, checked before any side effect, and the side
effects are counted outside the sidecar (lines in a file, memory, artifacts).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tether.agent import AgentClient
from tether.core import errors as E
from tether.core.receipts import ReceiptKind
from tether.crypto.receipts import parse_receipt
from tether.testing import start_control, start_sidecar

TTL_MS = 2000


def policy(shared: Path, *, memory_scope: str = "task", fs: str = "workspace") -> str:
    """alice may claim from "work" only; bob from nothing; "other" is declared but ungranted."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[agents.bob]
queues = []
[tools.append]
adapter = "python"
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.run]
adapter = "exec"
[tools.run.exec]
argv = ["/bin/true"]
[queues.work]
tools = ["append", "run"]
memory_scope = "{memory_scope}"
filesystem_scope = "{fs}"
max_artifact_bytes = 1000
lease_ttl_ms = {TTL_MS}
max_attempts = 5
[queues.other]
"""


class SkewedClock:
    """This node's wall clock is off by `skew_ms`; its monotonic clock is the real one."""

    def __init__(self, skew_ms: int) -> None:
        self.skew_ms = skew_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.skew_ms

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_agent_the_policy_does_not_grant_is_refused_at_claim(tmp_path: Path) -> None:
    """An agent with no grant for the queue gets PERMISSION_DENIED at the sidecar and the
    control plane, and never sees the payload; the task stays queued for a granted agent."""
    shared = tmp_path / "effects.txt"
    async with start_control(tmp_path, policy=policy(shared)) as cp:
        task = (await cp.client.submit("work", b'{"secret-plan": 1}')).task
        async with start_sidecar(tmp_path, cp.address, agents=("alice", "bob")) as side:
            async with side.agent("bob") as bob:
                with pytest.raises(E.PolicyDenied, match="bob"):
                    await bob.claim("work")
                with pytest.raises(E.PolicyDenied, match="bob"):
                    await bob.claim("other")
            node = await cp.node_client("node-x")
            try:  # the control plane decides too, whatever a node asks for
                with pytest.raises(E.PolicyDenied, match="may not claim"):
                    await node.acquire_lease("work", "node-x", "bob")
                with pytest.raises(E.PolicyDenied, match="may not claim"):
                    await node.acquire_lease("other", "node-x", "alice")
            finally:
                await node.close()
            got = (await cp.client.get_task(task.task_id)).task
            assert (got.state, got.attempt) == (1, 0)  # still QUEUED, no attempt burnt
            async with side.agent("alice") as alice:
                claimed = await alice.claim("work")
                assert claimed is not None
                assert claimed.task_id == task.task_id


async def test_undeclared_queue_is_refused_at_submit_and_claim(tmp_path: Path) -> None:
    """Submitting to or claiming from a queue the policy does not declare is refused, naming it."""
    async with start_control(tmp_path, policy=policy(tmp_path / "x")) as cp:
        with pytest.raises(E.PolicyDenied, match=r"queue 'nowhere' is not declared"):
            await cp.client.submit("nowhere", b"{}")
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            with pytest.raises(E.PolicyDenied, match=r"queue 'nowhere' is not declared"):
                await alice.claim("nowhere")


async def test_memory_scope_task_refuses_agent_memory(tmp_path: Path) -> None:
    """`memory_scope = "task"` refuses agent-scoped Remember and Recall; "agent" allows both."""
    for scope, allowed in (("task", False), ("agent", True)):
        base = tmp_path / scope
        async with start_control(base, policy=policy(base / "x", memory_scope=scope)) as cp:
            await cp.client.submit("work", b"{}")
            async with start_sidecar(base, cp.address) as side, side.agent("alice") as alice:
                task = await alice.claim("work")
                assert task is not None
                await alice.remember(task.task_id, "k", b"task-value")  # task scope: always
                if allowed:
                    await alice.remember(task.task_id, "k", b"v", scope="agent")
                    assert await alice.recall(task.task_id, "k", scope="agent") == b"v"
                else:
                    with pytest.raises(E.PolicyDenied, match="memory_scope"):
                        await alice.remember(task.task_id, "k", b"v", scope="agent")
                    with pytest.raises(E.PolicyDenied, match="memory_scope"):
                        await alice.recall(task.task_id, "k", scope="agent")


async def test_filesystem_scope_and_max_artifact_bytes(tmp_path: Path) -> None:
    """A queue's max_artifact_bytes caps artifacts; filesystem_scope "none" refuses artifacts
    and workspace tools (exec) before anything runs."""
    async with start_control(tmp_path / "ws", policy=policy(tmp_path / "x")) as cp:
        await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path / "ws", cp.address) as side, side.agent("alice") as a:
            task = await a.claim("work")
            assert task is not None
            await a.put_artifact(task.task_id, "small.txt", b"x" * 1000)
            with pytest.raises(E.ResourceExhausted, match="limit of 1000 bytes"):
                await a.put_artifact(task.task_id, "big.txt", b"x" * 1001)
            assert not (side.state_dir / "artifacts" / task.task_id / "big.txt").exists()
    base = tmp_path / "none"
    async with start_control(base, policy=policy(base / "x", fs="none")) as cp:
        await cp.client.submit("work", b"{}")
        async with start_sidecar(base, cp.address) as side, side.agent("alice") as a:
            task = await a.claim("work")
            assert task is not None
            with pytest.raises(E.PolicyDenied, match="filesystem_scope"):
                await a.put_artifact(task.task_id, "f.txt", b"x")
            with pytest.raises(E.PolicyDenied, match="filesystem_scope"):
                await a.call_tool(task.task_id, "run", {})
            assert not (side.state_dir / "artifacts" / task.task_id / "f.txt").exists()


@pytest.mark.parametrize("skew_ms", [-300_000, 300_000])
async def test_skewed_stale_holder_is_refused_before_any_side_effect(
    tmp_path: Path, skew_ms: int
) -> None:
    """A node whose wall clock is 5 minutes off keeps a lease exactly as long as its own
    monotonic clock allows: usable at once, and after another node took the task over, its
    tool call, memory write, artifact and completion are refused before any side effect."""
    shared = tmp_path / "effects.txt"
    async with start_control(tmp_path, policy=policy(shared), sweep_interval_ms=50) as cp:
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        async with (
            start_sidecar(
                tmp_path, cp.address, node_id="node-skewed", clock=SkewedClock(skew_ms),
                agent_liveness_ms=100,
            ) as stale_side,
            start_sidecar(tmp_path, cp.address, node_id="node-b") as fresh_side,
            AgentClient(stale_side.socket, token=stale_side.tokens["alice"]) as stale,
            AgentClient(fresh_side.socket, token=fresh_side.tokens["alice"]) as fresh,
        ):  # fmt: skip
            task = await stale.claim("work")
            assert task is not None
            assert task.fencing_token == 1
            # The skew changes nothing: the fresh lease is usable at once.
            await stale.call_tool(task_id, "append", {"line": "first"})
            assert lines(shared) == ["first"]
            # The stale agent goes quiet, the lease lapses, another node takes over.
            taken = None
            deadline = time.monotonic() + 10
            while taken is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                taken = await fresh.claim("work")
            assert taken is not None
            assert taken.task_id == task_id
            assert taken.fencing_token == 2
            # Every act of the stale holder is refused before it happens.
            with pytest.raises(E.LeaseLost):
                await stale.call_tool(task_id, "append", {"line": "stale"})
            with pytest.raises(E.LeaseLost):
                await stale.remember(task_id, "k", b"stale")
            with pytest.raises(E.LeaseLost):
                await stale.put_artifact(task_id, "stale.txt", b"stale")
            with pytest.raises(E.LeaseLost):
                await stale.complete(task_id, result=b"stale")
            assert lines(shared) == ["first"]
            assert not (stale_side.state_dir / "artifacts" / task_id / "stale.txt").exists()
            assert await fresh.recall(task_id, "k") is None
            await fresh.call_tool(task_id, "append", {"line": "second"})
            state, _ = await fresh.complete(task_id, result=b"ok")
            assert state == "succeeded"
            assert lines(shared) == ["first", "second"]


async def test_claim_abandoned_by_its_caller_releases_the_lease(tmp_path: Path) -> None:
    """A ClaimTask whose client gave up (deadline) hands any grant back at once: the next
    claim gets the task without waiting for the lease TTL."""
    async with (
        start_control(tmp_path, policy=policy(tmp_path / "x")) as cp,
        start_sidecar(tmp_path, cp.address) as side,
        side.agent("alice") as alice,
    ):
        waiting = asyncio.ensure_future(alice.claim("work", wait_ms=5000))
        await asyncio.sleep(0.3)
        waiting.cancel()  # the agent goes away mid long-poll
        await asyncio.sleep(0.05)
        task_id = (await cp.client.submit("work", b"{}")).task.task_id
        t0 = time.monotonic()
        got = None
        while got is None and time.monotonic() - t0 < TTL_MS / 1000:
            got = await alice.claim("work", wait_ms=200)
        assert got is not None, "the abandoned grant was not handed back before its TTL"
        assert got.task_id == task_id
        # The abandoned claim's grant (token 1) went back at once; this is token 2.
        assert got.fencing_token == 2
        history = (await cp.client.get_task(task_id)).leases
        assert [h.outcome for h in history][:1] == ["released"]


def block_sync(ctx: object, args: dict[str, object]) -> dict[str, object]:
    """A sync python tool that blocks its thread (what a careless in-process tool does)."""
    time.sleep(float(str(args.get("s", 2))))
    return {"slept": True}


async def test_sync_python_tool_neither_blocks_the_node_nor_outlives_its_timeout(
    tmp_path: Path,
) -> None:
    """A blocking sync python tool is answered at its timeout, and another agent's call on
    the same sidecar meanwhile completes without waiting for it."""
    doc = (
        policy(tmp_path / "x")
        .replace(
            '[queues.work]\ntools = ["append", "run"]',
            '[tools.block]\nadapter = "python"\ntimeout_ms = 500\n[tools.block.python]\n'
            'entrypoint = "test_hostile_agent:block_sync"\n'
            '[queues.work]\ntools = ["append", "run", "block"]',
        )
        .replace("[agents.bob]\nqueues = []", '[agents.bob]\nqueues = ["work"]')
    )
    async with start_control(tmp_path, policy=doc) as cp:
        for _ in range(2):
            await cp.client.submit("work", b"{}")
        async with (
            start_sidecar(tmp_path, cp.address, agents=("alice", "bob")) as side,
            side.agent("alice") as alice,
            side.agent("bob") as bob,
        ):
            ta, tb = await alice.claim("work"), await bob.claim("work")
            assert ta is not None
            assert tb is not None
            t0 = time.monotonic()
            slow = asyncio.ensure_future(alice.call_tool(ta.task_id, "block", {"s": 3}))
            await asyncio.sleep(0.1)
            t1 = time.monotonic()
            await bob.call_tool(tb.task_id, "append", {"line": "quick"})
            quick_s = time.monotonic() - t1
            with pytest.raises(E.ToolTimeout):
                await slow
            slow_s = time.monotonic() - t0
            assert quick_s < 0.5, f"another agent's call waited {quick_s:.2f}s"
            assert slow_s < 1.5, f"the blocking tool was answered after {slow_s:.2f}s"


async def test_full_spool_refuses_a_tool_call_before_its_effect(tmp_path: Path) -> None:
    """With the receipt spool full (the ledger not acknowledging), a tool call is refused
    before it runs: every effect that happened has its receipt."""
    shared = tmp_path / "effects.txt"
    async with start_control(tmp_path, policy=policy(shared)) as cp:
        await cp.client.submit("work", b"{}")
        async with start_sidecar(tmp_path, cp.address, spool_max_unacked=10) as side:
            side.sidecar._receipts_stop.set()  # the ledger stops acknowledging
            assert side.sidecar._receipts_task is not None
            await side.sidecar._receipts_task
            async with side.agent("alice") as alice:
                task = await alice.claim("work")
                assert task is not None
                refused = None
                for i in range(20):
                    try:
                        await alice.call_tool(task.task_id, "append", {"line": f"e{i}"})
                    except E.ResourceExhausted as err:
                        refused = err
                        break
                assert refused is not None, "the spool never filled"
                assert "did not run" in refused.message
            effects = lines(shared)
            kinds = [
                parse_receipt(env)[1].kind for env in side.sidecar._sink.envelopes(task.task_id)
            ]
            tool_receipts = [k for k in kinds if k is ReceiptKind.TOOL_CALL]
            assert len(effects) == len(tool_receipts) == i
