"""The durable receipt spool: signed envelopes on local disk until the ledger acks them.

`append` signs and chains a receipt and returns only after the envelope is
committed to SQLite (WAL, synchronous=FULL), so an action's evidence survives a
SIGKILL right after it. The chain state (last seq, digest of the last envelope)
is restored from the spool on restart, so seq never repeats or skips. The spool
is bounded: when `max_unacked` envelopes wait for an ack, `append` raises
`ResourceExhausted` rather than dropping anything. `stream_receipts` replays
every unacked envelope to the control plane, after any reconnect or restart.
Implements the sidecar's `ReceiptSink` protocol (`emit`, `pending`, `close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from tether.core.errors import ResourceExhausted, TetherError
from tether.core.receipts import Receipt
from tether.crypto.receipts import ReceiptChain, envelope_digest
from tether.crypto.signing import SigningKey

log = logging.getLogger("tether.sidecar.spool")

DEFAULT_MAX_UNACKED = 100_000
DEFAULT_BATCH = 256


class ReceiptSpool:
    """A bounded, durable, ordered queue of this node's signed receipt envelopes."""

    def __init__(
        self,
        path: Path,
        node_id: str,
        key: SigningKey,
        *,
        max_unacked: int = DEFAULT_MAX_UNACKED,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.max_unacked = max_unacked
        self._lock = asyncio.Lock()
        self._new = asyncio.Event()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool ("
            " seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL, task_id TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool_state ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), node_id TEXT NOT NULL,"
            " acked_seq INTEGER NOT NULL)"
        )
        row = self._db.execute("SELECT node_id, acked_seq FROM spool_state").fetchone()
        if row is None:
            self._db.execute("INSERT INTO spool_state VALUES (1, ?, 0)", (node_id,))
            self.acked_seq = 0
        elif row[0] != node_id:
            raise TetherError(f"spool {path} belongs to node {row[0]!r}, not {node_id!r}")
        else:
            self.acked_seq = int(row[1])
        last = self._db.execute(
            "SELECT seq, envelope FROM spool ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if last is None:
            self._chain = ReceiptChain(node_id, key)
        else:
            self._chain = ReceiptChain(node_id, key, int(last[0]), envelope_digest(bytes(last[1])))
        self._count = self._db.execute(
            "SELECT COUNT(*) FROM spool WHERE seq > ?", (self.acked_seq,)
        ).fetchone()[0]

    @property
    def last_seq(self) -> int:
        """Seq of the last envelope signed (and stored)."""
        return self._chain.last_seq

    async def append(self, receipt: Receipt) -> int:
        """Signs, chains and durably stores `receipt`; returns its seq.

        Raises:
            ResourceExhausted: the spool holds `max_unacked` unacknowledged envelopes.
        """
        async with self._lock:
            if self._count >= self.max_unacked:
                raise ResourceExhausted(
                    f"receipt spool is full ({self._count} unacknowledged envelopes); "
                    "the control plane is not acknowledging receipts"
                )
            before = (self._chain.last_seq, self._chain.last_digest)
            envelope = self._chain.sign(receipt)
            seq = self._chain.last_seq
            try:
                await asyncio.to_thread(
                    self._db.execute,
                    "INSERT INTO spool (seq, envelope, task_id) VALUES (?, ?, ?)",
                    (seq, envelope, receipt.task_id),
                )
            except BaseException:
                self._chain.last_seq, self._chain.last_digest = before  # never skip a seq
                raise
            self._count += 1
        self._new.set()
        return seq

    async def emit(self, receipt: Receipt) -> None:
        """`ReceiptSink.emit`: append, durable before returning."""
        await self.append(receipt)

    async def pending(self) -> int:
        """Envelopes stored but not acknowledged."""
        return int(self._count)

    def unacked(
        self, after: int | None = None, limit: int = DEFAULT_BATCH
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, envelope) pairs after `after` (default: the acked seq)."""
        start = self.acked_seq if after is None else max(after, self.acked_seq)
        rows = self._db.execute(
            "SELECT seq, envelope FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (start, limit)
        ).fetchall()
        return [(int(s), bytes(e)) for s, e in rows]

    async def ack(self, upto_seq: int) -> None:
        """Marks every envelope up to `upto_seq` acknowledged and frees their space.

        The last envelope is kept so the chain can be restored from it.
        """
        async with self._lock:
            upto = min(upto_seq, self._chain.last_seq)
            if upto <= self.acked_seq:
                return

            def tx() -> None:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("UPDATE spool_state SET acked_seq = ? WHERE id = 1", (upto,))
                    self._db.execute(
                        "DELETE FROM spool WHERE seq <= ? AND seq < ?", (upto, self._chain.last_seq)
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

            await asyncio.to_thread(tx)
            self._count -= upto - self.acked_seq
            self.acked_seq = upto

    async def wait_new(self, timeout_s: float) -> None:
        """Waits until something is appended (or the timeout passes)."""
        self._new.clear()
        if self._count and self.unacked(limit=1):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), timeout_s)

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


class ReceiptStream(Protocol):
    """One open StreamReceipts call: send a batch, get the acked seq back."""

    async def send(self, batch: list[tuple[int, bytes]]) -> int:
        """Sends (seq, envelope) pairs in order; returns the acked seq."""
        ...

    async def close(self) -> None: ...


OpenStream = Callable[[], Awaitable[ReceiptStream]]


async def stream_receipts(
    spool: ReceiptSpool,
    open_stream: OpenStream,
    stop: asyncio.Event,
    *,
    batch: int = DEFAULT_BATCH,
    idle_s: float = 0.2,
    retry_s: float = 0.5,
) -> None:
    """Streams unacked envelopes until `stop` is set, replaying after every failure.

    Each batch waits for its ack before the next is sent, so after a reconnect
    the spool's acked seq says exactly where to resume; the control plane
    de-duplicates anything sent twice.
    """
    while not stop.is_set():
        stream: ReceiptStream | None = None
        try:
            stream = await open_stream()
            while not stop.is_set():
                pending = spool.unacked(limit=batch)
                if not pending:
                    await spool.wait_new(idle_s)
                    continue
                acked = await stream.send(pending)
                await spool.ack(acked)
        except (TetherError, OSError, ConnectionError) as err:
            log.warning("receipt stream failed, will replay: %s", err)
        except Exception as err:  # grpc errors and the like: retry, never drop
            log.warning("receipt stream failed, will replay: %r", err)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)


class GrpcReceiptStream:
    """A `ReceiptStream` over ControlService.StreamReceipts (bidi)."""

    def __init__(self, call: Any, node_id: str) -> None:
        self._call = call
        self._node_id = node_id

    @classmethod
    async def open(cls, stub: Any, node_id: str, metadata: Any = None) -> GrpcReceiptStream:
        """Starts a StreamReceipts call on a ControlService stub."""
        return cls(stub.StreamReceipts(metadata=metadata), node_id)

    async def send(self, batch: list[tuple[int, bytes]]) -> int:
        from tether.v1 import control_pb2 as pb

        await self._call.write(
            pb.StreamReceiptsRequest(
                node_id=self._node_id,
                receipts=[pb.SpooledReceipt(seq=s, envelope=e) for s, e in batch],
            )
        )
        resp = await self._call.read()
        if resp is None or not hasattr(resp, "acked_seq"):
            raise ConnectionError("receipt stream closed before acknowledging")
        return int(resp.acked_seq)

    async def close(self) -> None:
        try:
            await self._call.done_writing()
        finally:
            self._call.cancel()
