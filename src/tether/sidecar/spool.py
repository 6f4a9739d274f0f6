"""The durable receipt spool: signed envelopes on local disk until the ledger acks them.

`append` signs and chains a receipt and returns only after the envelope is committed to
SQLite (WAL, synchronous=FULL), so an action's evidence survives a SIGKILL right after
it; concurrent appends share one commit (group commit). A keyed tool call's outcome is
committed and streamed with its receipt (`tool_call_result`), so the control plane
completes the call's idempotency record when it appends the receipt. The chain state (last seq,
digest of the last envelope) is restored from the spool on restart, so seq never repeats
or skips. The spool is bounded: when `max_unacked` envelopes wait for an ack, `append`
raises `ResourceExhausted` rather than dropping anything. `stream_receipts` replays
every unacked envelope to the control plane, after any reconnect or restart,
reconnecting with exponential backoff and full jitter. `wait_acked` lets a caller
(CompleteTask) wait, within a bound, until the ledger holds a receipt. Acknowledged
envelopes are kept for a while (`retain_acked`, newest first) so operators and tests can
read what the node signed; older ones are pruned. Implements the sidecar's `ReceiptSink`
protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import queue
import random
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tether.core.errors import ResourceExhausted, TetherError
from tether.core.receipts import Receipt
from tether.crypto.receipts import ReceiptChain, envelope_digest
from tether.crypto.signing import SigningKey
from tether.sidecar.receipts import Slot

log = logging.getLogger("tether.sidecar.spool")

T = TypeVar("T")

DEFAULT_MAX_UNACKED = 100_000
DEFAULT_BATCH = 256
DEFAULT_RETAIN_ACKED = 10_000
CACHE_KIB = 512
"""SQLite's page cache per spool connection (its default: 2,000 KiB). The writer only
appends at the end of the table and prunes its start, so its hot pages are a handful, and
a reader's cache is dropped whenever it sees the file changed (WAL); the default filled up
with cold pages over a few thousand receipts: 1.8 MB of the sidecar's RSS after the
mediation benchmark (docs/performance.md)."""
ACK_PERSIST_S = 0.2
"""An ack is written to the spool's file at most this long after it came (see `ack`)."""
LINGER_S = 0.01
"""While receipts keep coming (the last batch went out less than this long ago), a batch
that is not full waits this long for more before it is streamed, unless someone waits
for an ack (`wait_acked`): fewer, larger batches for the ledger. A receipt after a
quiet spell goes at once."""
HURRY_S = 0.5
"""After a lease ends, receipts stream without lingering this long (`hurry`)."""
# A streamed batch stops growing at this many bytes of envelopes and carried
# outcomes (at least one receipt), well under the control plane's 8 MiB message limit.
BATCH_MAX_BYTES = 2 * 1024 * 1024

Outgoing = tuple[int, bytes, bytes | None]
"""(seq, envelope, the keyed tool call's outcome riding with it or None)."""


class _Worker:
    """The spool's own thread for its file work: a job in, its answer out by a callback.

    A receipt's commit used to go through `asyncio.to_thread` (the default executor,
    a concurrent future chained to an asyncio one) from a writer task, two loop
    passes and an executor round trip more than this: `submit` puts the job on a
    queue the thread reads, and the thread hands the result to `done` on the
    caller's loop. The thread ends after `IDLE_S` without work and starts again
    with the next job, so a spool that is never closed leaves no thread behind.
    """

    IDLE_S = 5.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], Callable[[Any], None], asyncio.AbstractEventLoop]
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Runs `fn()` on the thread; `done(result, or the exception it raised)` runs
        on the running loop afterwards."""
        job = (fn, done, asyncio.get_running_loop())
        with self._lock:
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the thread, awaited."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def done(result: Any) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.submit(fn, done)
        return await future

    def _serve(self) -> None:
        while True:
            try:
                fn, done, loop = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                result = fn()
            except BaseException as err:  # the caller gets it
                result = err
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(done, result)


class ReceiptSlot:
    """Room promised for one receipt; `take` it when appending, `release` it otherwise."""

    def __init__(self, spool: ReceiptSpool) -> None:
        self._spool: ReceiptSpool | None = spool

    def take(self) -> bool:
        """Uses the slot (once); True if it was still promised."""
        spool, self._spool = self._spool, None
        if spool is None:
            return False
        spool._reserved -= 1
        return True

    def release(self) -> None:
        """Gives the room back (the action did not happen); idempotent."""
        self.take()


class ReceiptSpool:
    """A bounded, durable, ordered queue of this node's signed receipt envelopes."""

    def __init__(
        self,
        path: Path,
        node_id: str,
        key: SigningKey,
        *,
        max_unacked: int = DEFAULT_MAX_UNACKED,
        retain_acked: int = DEFAULT_RETAIN_ACKED,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.max_unacked = max_unacked
        self.retain_acked = retain_acked
        # Chain state, counters and the connection change only under this
        # thread lock, inside the worker thread that writes SQLite: a caller
        # cancelled mid-write can then never leave the chain and the file
        # disagreeing (the write finishes, and the chain with it).
        self._tlock = threading.Lock()
        self._new = asyncio.Event()
        self._queue: list[tuple[Receipt, asyncio.Future[int], bool, bytes | None]] = []
        self._worker = _Worker("tether-spool")
        self._writing = False  # a batch is on the worker thread
        self._drained: list[asyncio.Future[None]] = []  # `close` waiting for the last batch
        self._acked = asyncio.Condition()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool ("
            " seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL, task_id TEXT NOT NULL,"
            " tool_call_result BLOB)"
        )
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(spool)")}
        if "tool_call_result" not in columns:  # a spool written before outcomes rode along
            self._db.execute("ALTER TABLE spool ADD COLUMN tool_call_result BLOB")
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
        # Readers (the uplink, exports) use their own connection: under WAL it sees
        # only committed rows, never those of the writer's open transaction, so an
        # envelope whose commit then fails is never streamed (no fork of a seq).
        self._rdb = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._rdb.execute("PRAGMA query_only=ON")
        self._rdb.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._reserved = 0  # slots promised to calls about to act (receipt before effect)
        self._persisted_ack = self.acked_seq  # the acked seq the file holds
        self._ack_waiters = 0
        self._hurry = asyncio.Event()  # wakes a lingering stream (see `linger`)
        self._hurry_until = -math.inf  # loop time until which nothing lingers
        self._ack_writer: asyncio.Task[None] | None = None

    def reserve(self) -> ReceiptSlot:
        """Promises room for one receipt, before the action it will record.

        A tool call reserves its receipt's slot before it runs, so a full spool
        refuses the call *before* its side effect rather than after it (an
        effect with no receipt). Release the slot if the action does not happen.

        Raises:
            ResourceExhausted: the spool (counting promised slots) is full.
        """
        if self._count + self._reserved >= self.max_unacked:
            raise ResourceExhausted(
                f"receipt spool is full ({self._count} unacknowledged envelopes, "
                f"{self._reserved} promised); the control plane is not acknowledging "
                "receipts, so nothing that needs a receipt may run"
            )
        self._reserved += 1
        return ReceiptSlot(self)

    @property
    def last_seq(self) -> int:
        """Seq of the last envelope signed (and stored)."""
        return self._chain.last_seq

    async def append(
        self, receipt: Receipt, slot: Slot | None = None, tool_call_result: bytes | None = None
    ) -> int:
        """Signs, chains and durably stores `receipt`; returns its seq.

        `tool_call_result`: a keyed tool call's redacted outcome, stored in the
        same commit and streamed with the receipt, from which the control plane
        completes the call's idempotency record (`SpooledReceipt.tool_call_result`).

        Group commit: receipts appended while a write is in progress are signed
        and committed together in the next transaction (one fsync for the
        batch), so concurrent callers share the cost of durability and each
        still returns only after its envelope is committed.

        With `slot` (from `reserve`) the receipt uses the promised room and is
        never refused for space.

        Raises:
            ResourceExhausted: the spool holds `max_unacked` unacknowledged envelopes.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        promised = slot is not None and slot.take()
        self._queue.append((receipt, future, promised, tool_call_result))
        if not self._writing:
            self._write_next()
        return await future

    def _write_next(self) -> None:
        """Hands the queued receipts to the worker thread: one batch, one transaction."""
        batch, self._queue = self._queue, []
        self._writing = True
        self._worker.submit(
            functools.partial(self._store, [(r, p, o) for r, _, p, o in batch]),
            functools.partial(self._stored, batch),
        )

    def _stored(
        self,
        batch: list[tuple[Receipt, asyncio.Future[int], bool, bytes | None]],
        results: list[int | BaseException] | BaseException,
    ) -> None:
        """Answers a written batch (on the loop), then hands over the next one."""
        if isinstance(results, BaseException):  # the whole batch failed; tell every caller
            results = [results] * len(batch)
        # Counted here, on the loop, as `ack` uncounts there (never two threads).
        self._count += sum(1 for r in results if not isinstance(r, BaseException))
        for (_, future, _, _), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled; the envelope is stored anyway
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._new.set()
        # The next batch goes after the callers just answered have run (their
        # wake-ups are queued before this): one of them appending straight away
        # would otherwise be written alone, the rest in a batch after it.
        asyncio.get_running_loop().call_soon(self._after_answers)

    def _after_answers(self) -> None:
        """Writes what was queued meanwhile, or goes idle (waking `close`)."""
        if self._queue:
            self._write_next()
            return
        self._writing = False
        drained, self._drained = self._drained, []
        for waiter in drained:
            if not waiter.done():
                waiter.set_result(None)

    def _store(
        self, receipts: list[tuple[Receipt, bool, bytes | None]]
    ) -> list[int | BaseException]:
        """Signs and commits `receipts` in one transaction (worker thread).

        A receipt whose room was promised (`reserve`) is never refused; others
        are refused when the stored, batched and promised ones fill the spool.
        """
        out: list[int | BaseException] = []
        with self._tlock:
            before = (self._chain.last_seq, self._chain.last_digest)
            rows: list[tuple[int, bytes, str, bytes | None]] = []
            promised_now = self._reserved
            for receipt, promised, outcome in receipts:
                if not promised and self._count + len(rows) + promised_now >= self.max_unacked:
                    out.append(
                        ResourceExhausted(
                            f"receipt spool is full ({self._count} unacknowledged envelopes); "
                            "the control plane is not acknowledging receipts"
                        )
                    )
                    continue
                envelope = self._chain.sign(receipt)
                rows.append((self._chain.last_seq, envelope, receipt.task_id, outcome))
                out.append(self._chain.last_seq)
            if not rows:
                return out
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO spool (seq, envelope, task_id, tool_call_result)"
                        " VALUES (?, ?, ?, ?)",
                        rows,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except BaseException as err:
                self._chain.last_seq, self._chain.last_digest = before  # never skip a seq
                return [err if isinstance(r, int) else r for r in out]
            return out

    async def emit(
        self, receipt: Receipt, slot: Slot | None = None, tool_call_result: bytes | None = None
    ) -> int:
        """`ReceiptSink.emit`: append, durable before returning; returns the seq."""
        return await self.append(receipt, slot, tool_call_result)

    async def pending(self) -> int:
        """Envelopes stored but not acknowledged."""
        return int(self._count)

    def unacked(
        self, after: int | None = None, limit: int = DEFAULT_BATCH
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, envelope) pairs after `after` (default: the acked seq)."""
        start = self.acked_seq if after is None else max(after, self.acked_seq)
        rows = self._rdb.execute(
            "SELECT seq, envelope FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (start, limit)
        ).fetchall()
        return [(int(s), bytes(e)) for s, e in rows]

    def outgoing(
        self, limit: int = DEFAULT_BATCH, max_bytes: int = BATCH_MAX_BYTES
    ) -> list[Outgoing]:
        """The next unacked receipts to stream, with their carried outcomes.

        At most `limit`, and no more than `max_bytes` of envelopes and outcomes
        (but always the first one).
        """
        rows = self._rdb.execute(
            "SELECT seq, envelope, tool_call_result FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
            (self.acked_seq, limit),
        ).fetchall()
        out: list[Outgoing] = []
        size = 0
        for seq, envelope, outcome in rows:
            size += len(envelope) + (len(outcome) if outcome is not None else 0)
            if out and size > max_bytes:
                break
            out.append((int(seq), bytes(envelope), None if outcome is None else bytes(outcome)))
        return out

    def outcomes(self) -> list[tuple[int, bytes, bytes]]:
        """(seq, envelope, outcome) of every unacked receipt carrying a tool call's outcome."""
        rows = self._rdb.execute(
            "SELECT seq, envelope, tool_call_result FROM spool"
            " WHERE seq > ? AND tool_call_result IS NOT NULL ORDER BY seq",
            (self.acked_seq,),
        ).fetchall()
        return [(int(s), bytes(e), bytes(o)) for s, e, o in rows]

    def carried(self, seq: int) -> bytes | None:
        """The tool call outcome stored with receipt `seq`, if it carries one and is kept."""
        row = self._rdb.execute(
            "SELECT tool_call_result FROM spool WHERE seq = ?", (seq,)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def envelopes(self, task_id: str | None = None) -> list[bytes]:
        """Stored envelopes in seq order (optionally one task's): unacked plus retained acked."""
        if task_id is None:
            rows = self._rdb.execute("SELECT envelope FROM spool ORDER BY seq").fetchall()
        else:
            rows = self._rdb.execute(
                "SELECT envelope FROM spool WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    async def ack(self, upto_seq: int) -> None:
        """Marks every envelope up to `upto_seq` acknowledged and frees their space.

        The ack takes effect at once (`acked_seq`, `pending`, `wait_acked`); it
        is written to the file within `ACK_PERSIST_S`, one write for every ack
        that came meanwhile, not one per streamed batch. An ack need not be
        durable: a lost one only resends receipts the ledger de-duplicates.
        The newest `retain_acked` acked envelopes, and always the last one (the
        chain is restored from it), are kept; older ones are deleted then.
        """
        upto = min(upto_seq, self._chain.last_seq)
        if upto <= self.acked_seq:
            return
        self._count -= upto - self.acked_seq
        self.acked_seq = upto
        if self._ack_writer is None or self._ack_writer.done():
            self._ack_writer = asyncio.create_task(self._persist_acks(), name="spool-acks")
        async with self._acked:
            self._acked.notify_all()

    async def _persist_acks(self) -> None:
        """Writes the acked seq (and prunes) after `ACK_PERSIST_S`, until it is current."""
        while self._persisted_ack < self.acked_seq:
            await asyncio.sleep(ACK_PERSIST_S)
            await self._worker.run(functools.partial(self._write_ack, self.acked_seq))

    async def write_acks(self) -> None:
        """Writes the acked seq to the file now, without waiting for `ACK_PERSIST_S`."""
        if self._ack_writer is not None:
            self._ack_writer.cancel()
            with contextlib.suppress(BaseException):
                await self._ack_writer
        await self._worker.run(functools.partial(self._write_ack, self.acked_seq))

    def _write_ack(self, upto: int) -> None:
        """Stores `upto` as the acked seq and prunes old acked envelopes (worker thread)."""
        with self._tlock:
            if upto <= self._persisted_ack:
                return
            prune_below = min(upto - self.retain_acked, self._chain.last_seq) + 1
            # It survives a crash of the process, and the next receipt's FULL commit
            # syncs it along; no fsync of its own, leaving the disk to the receipts.
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("UPDATE spool_state SET acked_seq = ? WHERE id = 1", (upto,))
                    self._db.execute(
                        "DELETE FROM spool WHERE seq < ? AND seq < ?",
                        (prune_below, self._chain.last_seq),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            self._persisted_ack = upto

    async def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Waits until the control plane acknowledged `seq`; False if `timeout_s` passed first.

        The envelope stays durable in the spool either way; a False answer only
        means the ledger does not hold it yet (the uplink keeps replaying it).
        """
        if self.acked_seq >= seq:
            return True
        self._ack_waiters += 1
        self._hurry.set()  # the stream sends what it holds now instead of lingering
        try:
            async with self._acked:
                await asyncio.wait_for(
                    self._acked.wait_for(lambda: self.acked_seq >= seq), timeout_s
                )
        except TimeoutError:
            return self.acked_seq >= seq
        finally:
            self._ack_waiters -= 1
        return True

    def hurry(self, window_s: float = HURRY_S) -> None:
        """Streams without lingering for `window_s` (a lease ended: its last receipts
        are what an operator looks for next)."""
        self._hurry_until = asyncio.get_running_loop().time() + window_s
        self._hurry.set()

    async def linger(self, timeout_s: float) -> None:
        """Waits `timeout_s` for more receipts to stream together, unless an ack is
        awaited or `hurry` was asked."""
        if self._ack_waiters or asyncio.get_running_loop().time() < self._hurry_until:
            return
        self._hurry.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._hurry.wait()

    async def wait_new(self, timeout_s: float) -> None:
        """Waits until something is appended (or the timeout passes)."""
        self._new.clear()
        if self._count and self.unacked(limit=1):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # no task per wait, unlike wait_for
                await self._new.wait()

    async def _written(self) -> None:
        """Returns once no batch is on the worker thread and none is queued."""
        while self._writing:
            drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drained.append(drained)
            await drained

    async def close(self) -> None:
        await self._written()  # queued receipts are committed before the file closes
        with contextlib.suppress(sqlite3.Error):  # unwritten, the acked receipts resend
            await self.write_acks()
        # Appends that came while the acks were written: the first went as a batch of
        # its own, the rest queued behind it; the file closes after both (no await
        # between this and the close job, which goes after any batch on the thread).
        await self._written()

        def close() -> None:
            with self._tlock:
                self._db.close()
                self._rdb.close()

        await self._worker.run(close)


class ReceiptStream(Protocol):
    """One open StreamReceipts call: send a batch, get the acked seq back."""

    async def send(self, batch: list[Outgoing]) -> int:
        """Sends (seq, envelope, carried outcome) in order; returns the acked seq."""
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
    linger_s: float = LINGER_S,
    retry_s: float = 0.1,
    max_retry_s: float = 5.0,
    ack_timeout_s: float = 30.0,
    on_error: Callable[[BaseException], Awaitable[None]] | None = None,
) -> None:
    """Streams unacked envelopes until `stop` is set, replaying after every failure.

    Each batch waits for its ack (at most `ack_timeout_s`) before the next is
    sent, so after a reconnect the spool's acked seq says exactly where to
    resume; the control plane de-duplicates anything sent twice. Between
    attempts it sleeps a random time in [0, backoff] (full jitter), the backoff
    doubling from `retry_s` up to `max_retry_s` and resetting after an ack, so
    many nodes coming back at once do not reconnect in lockstep. `on_error`
    sees each failure (the sidecar re-registers on UNAUTHENTICATED). While
    receipts keep coming, a batch short of `batch` receipts waits `linger_s`
    for more (not when an ack is awaited), so a node making a call at a time
    does not cost the ledger a commit per receipt; the receipts are durable in
    the spool meanwhile. The first batch after a quiet spell goes at once.
    """
    backoff = retry_s
    clock = asyncio.get_running_loop().time
    last_sent = -math.inf
    while not stop.is_set():
        stream: ReceiptStream | None = None
        try:
            stream = await open_stream()
            while not stop.is_set():
                pending = spool.outgoing(limit=batch)
                if not pending:
                    await spool.wait_new(idle_s)
                    continue
                if len(pending) < batch and clock() - last_sent < linger_s:
                    await spool.linger(linger_s)
                    pending = spool.outgoing(limit=batch)
                last_sent = clock()
                async with asyncio.timeout(ack_timeout_s):  # no task per batch
                    acked = await stream.send(pending)
                await spool.ack(acked)
                backoff = retry_s
        except (TetherError, OSError, ConnectionError, TimeoutError) as err:
            log.warning("receipt stream failed, will replay: %s", err)
            await _report(on_error, err)
        except Exception as err:  # grpc errors and the like: retry, never drop
            log.warning("receipt stream failed, will replay: %r", err)
            await _report(on_error, err)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), random.uniform(0, backoff))
            backoff = min(backoff * 2, max_retry_s)


async def _report(
    on_error: Callable[[BaseException], Awaitable[None]] | None, err: BaseException
) -> None:
    if on_error is None:
        return
    try:
        await on_error(err)
    except Exception as hook_err:  # the hook must never stop the uplink
        log.warning("receipt stream error hook failed: %r", hook_err)


class GrpcReceiptStream:
    """A `ReceiptStream` over ControlService.StreamReceipts (bidi)."""

    def __init__(self, call: Any, node_id: str) -> None:
        self._call = call
        self._node_id = node_id

    @classmethod
    async def open(cls, stub: Any, node_id: str, metadata: Any = None) -> GrpcReceiptStream:
        """Starts a StreamReceipts call on a ControlService stub."""
        return cls(stub.StreamReceipts(metadata=metadata), node_id)

    async def send(self, batch: list[Outgoing]) -> int:
        from tether.v1 import control_pb2 as pb

        await self._call.write(
            pb.StreamReceiptsRequest(
                node_id=self._node_id,
                receipts=[
                    pb.SpooledReceipt(seq=s, envelope=e, tool_call_result=o or b"")
                    for s, e, o in batch
                ],
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
