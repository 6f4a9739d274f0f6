"""The signed export manifest covers control receipts, and tasks that never ran (real control
plane and sidecar, the real `tether verify` CLI).

A control receipt is the only record of how a lease ended without its holder: dropping one from
a bundle must fail (even with --allow-open, where the dropped end would make the task look
merely open), and so must adding one. A task canceled while queued or expired before any lease
has no node receipt; its per-task export verifies from the manifest (no node receipts, signed)
and the control receipt of its end, while a task with no signed end is refused by name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

from tether.core.states import State
from tether.testing import ControlHandle, start_control, start_sidecar
from tether.verify import encode_bundle
from tether.verify.bundle import Bundle, bundle_from_proto

POLICY = """
version = 1
[agents.alice]
queues = ["long"]
[queues.long]
lease_ttl_ms = 60000
"""


async def wait_state(cp: ControlHandle, task_id: str, state: State, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s * 20)):
        got = (await cp.client.get_task(task_id)).task
        if State(got.state) is state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never became {state.name}: {got}")


async def export(cp: ControlHandle, tasks: list[str]) -> Bundle:
    return bundle_from_proto(await cp.client.export_bundle(tasks))


async def verify(cp: ControlHandle, tmp_path: Path, bundle: Bundle, *flags: str) -> tuple[int, str]:
    """`tether verify` on the bundle written to a file: (exit code, output)."""
    path = tmp_path / "bundle.json"
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
    return done.returncode, done.stdout + done.stderr


async def test_dropped_or_added_control_receipt_fails_even_with_allow_open(
    tmp_path: Path,
) -> None:
    """A running task canceled by an operator: its export verifies; without its cancel receipt
    (the last lease's end) it fails the manifest check, strictly and with --allow-open; with a
    foreign task's genuine control receipt added, it fails too."""
    async with start_control(tmp_path, policy=POLICY) as cp:
        canceled = (await cp.client.submit("long", b"{}")).task.task_id
        other = (await cp.client.submit("long", b"{}")).task.task_id
        async with start_sidecar(tmp_path, cp.address) as side, side.agent("alice") as alice:
            assert await alice.claim("long") is not None
            await alice.start(canceled)
            await cp.client.cancel(canceled, "operator changed their mind")
        await cp.client.cancel(other, "not needed")
        for _ in range(200):  # until the task's receipts reached the ledger
            bundle = await export(cp, [canceled])
            if bundle.entries:
                break
            await asyncio.sleep(0.05)
        assert len(bundle.control_receipts) == 1
        code, out = await verify(cp, tmp_path, bundle)
        assert code == 0, out

        dropped = dataclasses.replace(bundle, control_receipts=[])
        for flags in ((), ("--allow-open",)):
            code, out = await verify(cp, tmp_path, dropped, *flags)
            assert code == 1, out
            assert "manifest" in out
            assert "missing from the bundle" in out

        foreign = (await export(cp, [other])).control_receipts
        assert len(foreign) == 1
        for task_ids in ([canceled], []):  # per-task and whole-chain exports alike
            full = await export(cp, task_ids)
            added = dataclasses.replace(full, control_receipts=[*full.control_receipts, *foreign])
            assert foreign[0] not in full.control_receipts  # never leased: not in a chain
            code, out = await verify(cp, tmp_path, added, "--allow-open")
            assert code == 1, out
            assert "manifest" in out


async def test_tasks_that_never_ran_verify_from_their_control_receipts(tmp_path: Path) -> None:
    """A task canceled while queued and one expired by schedule-to-start have no node receipt:
    each per-task export verifies strictly (the manifest says no node receipts, the control
    receipt records the end). A queued task with no end is refused by name, even with
    --allow-open."""
    async with start_control(tmp_path, policy=POLICY, sweep_interval_ms=100) as cp:
        queued_cancel = (await cp.client.submit("long", b"{}")).task.task_id
        unclaimed = (
            await cp.client.submit("long", b"{}", schedule_to_start_timeout_ms=1_000)
        ).task.task_id
        waiting = (await cp.client.submit("long", b"{}")).task.task_id
        await cp.client.cancel(queued_cancel, "no longer wanted")
        await wait_state(cp, unclaimed, State.EXPIRED)
        for tid, state in ((queued_cancel, "canceled"), (unclaimed, "expired")):
            bundle = await export(cp, [tid])
            assert not bundle.entries
            assert len(bundle.control_receipts) == 1
            code, out = await verify(cp, tmp_path, bundle, "--json")
            assert code == 0, out
            assert f'"final_state": "{state}"' in out

            code, out = await verify(
                cp, tmp_path, dataclasses.replace(bundle, control_receipts=[]), "--allow-open"
            )
            assert code == 1, out
            assert "nothing was run under a lease" in out

        both = await export(cp, [queued_cancel, unclaimed])
        code, out = await verify(cp, tmp_path, both)
        assert code == 0, out

        for flags in ((), ("--allow-open",)):
            code, out = await verify(cp, tmp_path, await export(cp, [waiting]), *flags)
            assert code == 1, out
            assert f"task {waiting!r} has no receipts: nothing was run under a lease" in out
