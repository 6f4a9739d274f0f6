"""Complete stories verify strictly, open ones do not (real control plane and sidecar, the
real `tether verify` CLI): a lapse, an expiry, a release and a cancel each leave a control
receipt signed by the control plane, carried in the export."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tether.control.service import ControlConfig
from tether.core.states import State
from tether.testing import ControlHandle, start_control, start_sidecar
from tether.verify import encode_bundle
from tether.verify.bundle import bundle_from_proto

TTL_MS = 1_500


def policy() -> str:
    return f"""
version = 1
[agents.alice]
queues = ["once", "twice", "long"]
[queues.once]
lease_ttl_ms = {TTL_MS}
max_attempts = 1
[queues.twice]
lease_ttl_ms = {TTL_MS}
max_attempts = 2
[queues.long]
lease_ttl_ms = 60000
"""


async def wait_state(cp: ControlHandle, task_id: str, state: State, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s * 20)):
        got = (await cp.client.get_task(task_id)).task
        if State(got.state) is state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never became {state.name}: {got}")


async def export_verify(
    cp: ControlHandle, tmp_path: Path, tasks: list[str], *flags: str
) -> tuple[int, str, int]:
    """Exports `tasks`, runs `tether verify` on the file; (exit code, output, control receipts)."""
    for _ in range(200):  # until the tasks' first receipts reached the ledger
        bundle = bundle_from_proto(await cp.client.export_bundle(tasks))
        if bundle.entries:
            break
        await asyncio.sleep(0.05)
    path = tmp_path / f"bundle-{'-'.join(tasks)}.json"
    path.write_bytes(encode_bundle(bundle))
    pub = tmp_path / "control.pub"
    pub.write_bytes(cp.key.public.pem())
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tether.cli", "verify", str(path), "--trust", str(pub), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr, len(bundle.control_receipts)


async def test_expired_task_verifies_strictly_and_a_running_one_does_not(tmp_path: Path) -> None:
    """An agent that goes silent on a one-attempt task: the lease lapses, the task expires, and
    strict `tether verify` passes on its export; a task still running fails strict verification
    (task.final) and passes only with --allow-open."""
    config = ControlConfig(backoff_base_ms=50, backoff_cap_ms=50)
    async with start_control(tmp_path, policy=policy(), sweep_interval_ms=100, config=config) as cp:
        expiring = (await cp.client.submit("once", b"{}")).task.task_id
        running = (await cp.client.submit("long", b"{}")).task.task_id
        async with (
            start_sidecar(tmp_path, cp.address, agent_liveness_ms=200) as side,
            side.agent("alice") as alice,
        ):
            task = await alice.claim("once")
            assert task is not None
            await alice.start(expiring)
            await wait_state(cp, expiring, State.EXPIRED)  # the agent said nothing more
            code, out, ends = await export_verify(cp, tmp_path, [expiring], "--json")
            assert code == 0, out
            assert ends == 1
            assert '"final_state": "expired"' in out

            task = await alice.claim("long")
            assert task is not None
            await alice.start(running)
            code, out, _ = await export_verify(cp, tmp_path, [expiring, running])
            assert code == 1, out
            assert "task.final" in out
            assert running in out
            code, out, _ = await export_verify(cp, tmp_path, [expiring, running], "--allow-open")
            assert code == 0, out


async def test_lapsed_then_succeeded_verifies_with_its_lapse_receipt(tmp_path: Path) -> None:
    """Attempt 1 lapses (re-queued, a control receipt), attempt 2 succeeds: strict passes."""
    config = ControlConfig(backoff_base_ms=50, backoff_cap_ms=50)
    async with start_control(tmp_path, policy=policy(), sweep_interval_ms=100, config=config) as cp:
        tid = (await cp.client.submit("twice", b"{}")).task.task_id
        async with (
            start_sidecar(tmp_path, cp.address, agent_liveness_ms=200) as side,
            side.agent("alice") as alice,
        ):
            first = await alice.claim("twice")
            assert first is not None
            assert first.attempt == 1
            second = await alice.claim("twice", wait_ms=20_000)
            assert second is not None
            assert (second.task_id, second.attempt) == (tid, 2)
            assert (await alice.complete(tid))[0] == "succeeded"
        code, out, ends = await export_verify(cp, tmp_path, [tid])
        assert code == 0, out
        assert ends == 1


async def test_canceled_and_released_tasks_verify(tmp_path: Path) -> None:
    """A running task canceled by an operator, and a one-attempt task whose sidecar shut
    down gracefully (its lease released, so the task expired): both verify strictly."""
    async with start_control(tmp_path, policy=policy()) as cp:
        canceled = (await cp.client.submit("long", b"{}")).task.task_id
        released = (await cp.client.submit("once", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            assert await alice.claim("long") is not None
            await alice.start(canceled)
            await cp.client.cancel(canceled, "operator changed their mind")
            assert await alice.claim("once") is not None
            await alice.start(released)
        await wait_state(cp, released, State.EXPIRED)
        for tid in (canceled, released):
            code, out, ends = await export_verify(cp, tmp_path, [tid])
            assert code == 0, out
            assert ends >= 1  # the node's chain may carry the other task too
        code, out, _ = await export_verify(cp, tmp_path, [canceled, released], "--json")
        assert code == 0, out
        assert "operator changed their mind" in out
        assert '"kind": "canceled"' in out
        assert '"kind": "released"' in out


async def test_time_limits_end_stories_that_verify(tmp_path: Path) -> None:
    """A deadline and an attempt timeout, decided by the sweeper while the agent still holds its
    lease: each leaves a control receipt naming the limit and the clock, and the exports verify
    strictly."""
    async with start_control(tmp_path, policy=policy(), sweep_interval_ms=100) as cp:
        late = (await cp.client.submit("long", b"{}", deadline_ms=1_500)).task.task_id
        slow = (
            await cp.client.submit("long", b"{}", attempt_timeout_ms=1_000, max_attempts=1)
        ).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            for tid in (late, slow):
                task = await alice.claim("long")
                assert task is not None
                assert task.task_id == tid
                await alice.start(tid)
            await wait_state(cp, late, State.EXPIRED)
            await wait_state(cp, slow, State.EXPIRED)
        code, out, ends = await export_verify(cp, tmp_path, [late, slow], "--json")
        assert code == 0, out
        assert ends == 2
        assert '"kind": "deadline"' in out
        assert '"kind": "attempt_timeout"' in out
        assert "clock=control-plane" in out
