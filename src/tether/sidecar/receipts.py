"""The receipt seam: where the sidecar's signed, hash-chained receipts go.

`ReceiptSink` is the only thing the Broker and the lease keeper know about
receipts. `emit` returns only once the receipt is durable (signed and on disk),
so an action's evidence survives a crash right after it. The durable spool
(`tether.sidecar.spool`) replaces `SqliteReceiptSink` once it streams to the
control plane; both satisfy the same Protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Protocol

from tether.core.receipts import Receipt
from tether.crypto.receipts import ReceiptChain, envelope_digest
from tether.crypto.signing import SigningKey

log = logging.getLogger("tether.sidecar.receipts")


class ReceiptSink(Protocol):
    """Takes receipts from the sidecar and keeps them durably."""

    async def emit(self, receipt: Receipt) -> None:
        """Signs, chains and stores `receipt`; durable before it returns."""
        ...

    async def pending(self) -> int:
        """Receipts stored but not yet acknowledged by the control plane."""
        ...

    async def close(self) -> None:
        """Flushes and releases resources."""
        ...


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, the digest every receipt field uses."""
    return hashlib.sha256(data).hexdigest()


class SqliteReceiptSink:
    """Signs receipts with the node key into a hash chain, in one SQLite table.

    A stopgap until the streaming spool lands: receipts are durable here (WAL,
    synchronous=FULL) and counted as pending because nothing acknowledges them
    yet. Signing and chaining use `tether.crypto.receipts.ReceiptChain`, so the
    envelope bytes are the ones the spool and verifier expect; the chain resumes
    from the last stored envelope after a restart.
    """

    def __init__(self, path: Path, node_id: str, node_key: SigningKey) -> None:
        self._path = path
        self._key = node_key
        self._lock = asyncio.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS receipts ("
            " seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL, task_id TEXT NOT NULL,"
            " kind INTEGER NOT NULL, acked INTEGER NOT NULL DEFAULT 0)"
        )
        last = self._db.execute(
            "SELECT seq, envelope FROM receipts ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if last is None:
            self._chain = ReceiptChain(node_id, node_key)
        else:
            self._chain = ReceiptChain(
                node_id, node_key, int(last[0]), envelope_digest(bytes(last[1]))
            )

    async def emit(self, receipt: Receipt) -> None:
        async with self._lock:
            before = (self._chain.last_seq, self._chain.last_digest)
            envelope = self._chain.sign(receipt)
            seq = self._chain.last_seq
            try:
                await asyncio.to_thread(
                    self._db.execute,
                    "INSERT INTO receipts (seq, envelope, task_id, kind) VALUES (?, ?, ?, ?)",
                    (seq, envelope, receipt.task_id, int(receipt.kind)),
                )
            except BaseException:
                # Not stored: rewind so the chain never skips a seq.
                self._chain.last_seq, self._chain.last_digest = before
                raise
            log.debug(
                "receipt %s seq=%d", receipt.kind.name, seq, extra={"task_id": receipt.task_id}
            )

    async def pending(self) -> int:
        async with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM receipts WHERE acked = 0").fetchone()
        return int(row[0])

    def envelopes(self, task_id: str | None = None) -> list[bytes]:
        """Stored envelope bytes in seq order (optionally one task's); for tests and tools."""
        if task_id is None:
            rows = self._db.execute("SELECT envelope FROM receipts ORDER BY seq").fetchall()
        else:
            rows = self._db.execute(
                "SELECT envelope FROM receipts WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    async def close(self) -> None:
        async with self._lock:
            self._db.close()
