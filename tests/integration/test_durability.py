"""Acknowledged means durable: the control plane's SQLite and the sidecar's spool.

The control plane's store runs synchronous=FULL by default (group-committed),
and the spool's readers see committed rows only, so an envelope whose commit
fails is never streamed and its seq never forks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.receipts import parse_receipt
from tether.sidecar.spool import ReceiptSpool
from tether.store.sqlite import SqliteStore
from tether.testing import start_control
from tether.verify.builder import T0, seeded_key

KEY = seeded_key("durability/n1")


def _receipt(i: int) -> Receipt:
    return Receipt(
        kind=ReceiptKind.TOOL_CALL, node_id="n1", task_id="t", attempt=1, fencing_token=1,
        agent_id="a", lease_id="L", lease_issued_unix_ms=T0, lease_expires_unix_ms=T0 + 30_000,
        time_unix_ms=T0 + i, tool=f"tool{i}", status="ok",
    )  # fmt: skip


async def test_control_plane_store_is_durable_by_default(tmp_path: Path) -> None:
    """The control plane opens SQLite with synchronous=FULL unless told otherwise, and
    --sqlite-synchronous normal is the explicit opt-out."""
    async with start_control(tmp_path) as cp:
        store = cp.running.store
        assert isinstance(store, SqliteStore)
        assert store.synchronous == "FULL"
        level = await store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 2  # FULL
    relaxed = SqliteStore(tmp_path / "relaxed.db", synchronous="NORMAL")
    await relaxed.open()
    try:
        assert await relaxed._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 1
    finally:
        await relaxed.close()


async def test_group_commit_keeps_each_transaction_atomic(tmp_path: Path) -> None:
    """Concurrent submissions share commits, every one is durable when answered, and a
    failing transaction in a group rolls back alone."""
    async with start_control(tmp_path) as cp:
        results = await asyncio.gather(
            *(cp.client.submit("work", b"{}", idempotency_key=f"k{i}") for i in range(50)),
            cp.client.submit("work", b"{}", idempotency_key="k0"),  # same key, same task
            cp.client.submit("work", b"{1}", idempotency_key="k1"),  # conflict: refused
            return_exceptions=True,
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 51
        assert len(failed) == 1
        db_path = cp.db_path
    # Reopened from the file: every acknowledged submission is there, once.
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 50
    finally:
        conn.close()


class _CommitGate:
    """Wraps the spool's writer connection: pauses at COMMIT, then makes it fail."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.at_commit = threading.Event()
        self.go = threading.Event()
        self.armed = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            self.at_commit.set()
            self.go.wait(10)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_spool_never_streams_an_uncommitted_receipt_and_a_failed_commit_forks_nothing(
    tmp_path: Path,
) -> None:
    """While the writer's transaction is open the uplink's reader sees none of it; when
    that COMMIT fails the seq is reused for the next receipt, and no other bytes for it
    were ever readable."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    await spool.append(_receipt(0))
    gate = _CommitGate(spool._db)
    spool._db = gate  # type: ignore[assignment]
    pending = asyncio.ensure_future(spool.append(_receipt(1)))
    assert await asyncio.to_thread(gate.at_commit.wait, 10)
    # The row for seq 2 is inserted but not committed: readers must not see it.
    seen_during = spool.unacked()
    assert [seq for seq, _ in seen_during] == [1]
    gate.go.set()
    with pytest.raises(Exception, match="injected"):
        await pending
    spool._db = gate._conn
    assert await spool.append(_receipt(2)) == 2  # the seq is reused, never skipped
    rows = spool.unacked()
    assert [seq for seq, _ in rows] == [1, 2]
    _, second = parse_receipt(rows[1][1])
    assert second.tool == "tool2"  # the failed envelope (tool1) never existed for readers
    await spool.close()
