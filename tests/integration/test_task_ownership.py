"""A submitter reaches only the tasks it submitted (authz.OWN_TASKS_ONLY), attacked for real.

Real control plane, real mTLS certificates from the test CA (as
`tether operators add` issues them), real SQLite file. The column on both stores
is tested in tests/contract/test_store_contract.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest

from tether.control.client import ControlClient
from tether.core.errors import TetherError
from tether.core.states import State
from tether.crypto.pki import Role
from tether.testing import ControlHandle, start_control

pytestmark = pytest.mark.timeout(120)


async def status_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message the call failed with (fails the test if it succeeded)."""
    with pytest.raises(TetherError) as info:  # ControlClient maps statuses
        await call
    cause = info.value.__cause__  # the RpcError
    assert isinstance(cause, grpc.aio.AioRpcError), repr(info.value)
    return cause.code(), cause.details() or ""


async def attack(cp: ControlHandle) -> None:
    """Mallory (submitter) against Alice's (submitter) task; admin and auditor unchanged."""
    alice = cp.operator(Role.SUBMITTER, "alice-ci")
    mallory = cp.operator(Role.SUBMITTER, "mallory-ci")
    auditor = cp.operator(Role.AUDITOR, "audit-1")
    try:
        task = (await alice.submit("work", b'{"secret": "alice-only"}')).task
        assert task.submitted_by == "submitter:alice-ci"
        code, msg = await status_of(mallory.get_task(task.task_id))
        unknown_code, unknown_msg = await status_of(mallory.get_task("t_does_not_exist"))
        # Indistinguishable from a task that does not exist: existence does not leak.
        assert code == unknown_code == grpc.StatusCode.NOT_FOUND
        assert msg == f"no task {task.task_id!r}"
        assert unknown_msg == "no task 't_does_not_exist'"
        assert "alice-only" not in msg
        code, _ = await status_of(mallory.cancel(task.task_id, "mine now"))
        assert code == grpc.StatusCode.NOT_FOUND
        # The same idempotency key does not hand mallory alice's task either.
        keyed = (await alice.submit("work", b"k", idempotency_key="alice-key")).task
        code, msg = await status_of(mallory.submit("work", b"k", idempotency_key="alice-key"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "choose another key" in msg
        assert keyed.task_id not in msg
        assert (await cp.client.get_task(task.task_id)).task.state == State.QUEUED
        # Alice reads her own payload; the auditor reads and lists, without payloads.
        mine = (await alice.get_task(task.task_id)).task
        assert mine.payload == b'{"secret": "alice-only"}'
        seen = (await auditor.get_task(task.task_id)).task
        assert (seen.payload, seen.submitted_by) == (b"", "submitter:alice-ci")
        listed = await auditor.list_tasks(queue="work")
        assert task.task_id in {t.task_id for t in listed.tasks}
        # Alice cancels her own; the admin cancels another of hers.
        assert (await alice.cancel(task.task_id, "done")).state == State.CANCELED
        other = (await alice.submit("work", b"2")).task
        assert (await cp.client.cancel(other.task_id, "admin")).state == State.CANCELED
    finally:
        for c in (alice, mallory, auditor):
            await c.close()


async def test_a_submitter_may_not_read_or_cancel_another_submitters_task(
    tmp_path: Path,
) -> None:
    async with start_control(tmp_path) as cp:
        await attack(cp)


async def test_tasks_from_before_the_column_are_admin_only_for_submitters(
    tmp_path: Path,
) -> None:
    """A task with no recorded submitter (migrated) is NOT_FOUND to every submitter; an
    auditor still reads it without payload, and an admin reads and cancels it."""
    async with start_control(tmp_path) as cp:
        async with ControlClient(
            cp.address, tls=cp.pki.operator_tls(Role.SUBMITTER, "alice-ci")
        ) as alice:
            task = (await alice.submit("work", b"old")).task
            with contextlib.closing(sqlite3.connect(cp.db_path)) as db, db:
                db.execute("UPDATE tasks SET submitted_by = '' WHERE task_id = ?", (task.task_id,))
            code, _ = await status_of(alice.get_task(task.task_id))
            assert code == grpc.StatusCode.NOT_FOUND
            code, _ = await status_of(alice.cancel(task.task_id, "x"))
            assert code == grpc.StatusCode.NOT_FOUND
        got = (await cp.client.get_task(task.task_id)).task
        assert (got.state, got.submitted_by, got.payload) == (State.QUEUED, "", b"old")
        async with cp.operator(Role.AUDITOR) as auditor:
            seen = (await auditor.get_task(task.task_id)).task
            assert (seen.task_id, seen.payload) == (task.task_id, b"")
        assert (await cp.client.cancel(task.task_id, "admin")).state == State.CANCELED
