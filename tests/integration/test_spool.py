"""The sidecar's durable receipt spool: durability, bounds, restart and replay to the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tether.core.errors import ResourceExhausted
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.receipts import envelope_digest, parse_receipt
from tether.sidecar import spool as spool_module
from tether.sidecar.spool import ReceiptSpool, stream_receipts
from tether.verify.builder import T0, seeded_key

KEY = seeded_key("spool/n1")


def _receipt(i: int) -> Receipt:
    return Receipt(
        kind=ReceiptKind.TOOL_CALL,
        node_id="n1",
        task_id="t",
        attempt=1,
        fencing_token=1,
        agent_id="a",
        lease_id="L",
        lease_issued_unix_ms=T0,
        lease_expires_unix_ms=T0 + 30_000,
        time_unix_ms=T0 + i,
        tool="x",
        status="ok",
    )


def _check_chain(envelopes: list[bytes], first_seq: int = 1) -> None:
    prev = None
    for k, data in enumerate(envelopes):
        _, r = parse_receipt(data)
        assert r.seq == first_seq + k
        if prev is not None:
            assert r.prev == envelope_digest(prev)
        prev = data


async def test_append_ack_and_restart(tmp_path: Path) -> None:
    """Seqs run from 1, acks free space, and a reopened spool continues the same chain."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    assert [await spool.append(_receipt(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    assert await spool.pending() == 5
    await spool.ack(3)
    assert [s for s, _ in spool.unacked()] == [4, 5]
    await spool.close()
    again = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    assert (again.acked_seq, await again.pending()) == (3, 2)
    assert await again.append(_receipt(9)) == 6
    _check_chain([e for _, e in again.unacked()], first_seq=4)
    await again.ack(6)
    assert await again.pending() == 0
    await again.close()
    with pytest.raises(Exception, match="belongs to node"):
        ReceiptSpool(tmp_path / "spool.db", "n2", KEY)


async def test_close_commits_the_appends_that_came_while_it_wrote_the_acks(
    tmp_path: Path,
) -> None:
    """Appends that start while `close` writes the acked seq are committed before the
    file closes: the first goes as a batch of its own and the rest queue behind it,
    so close waits for both batches (it once closed the file in between, and the 199
    queued callers got "Cannot operate on a closed database")."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    appends = [asyncio.ensure_future(spool.append(_receipt(i))) for i in range(200)]
    await spool.close()  # the appends first run during its await
    assert all(a.done() for a in appends)
    assert sorted(a.result() for a in appends) == list(range(1, 201))
    again = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    assert [s for s, _ in again.unacked(limit=1000)] == list(range(1, 201))
    await again.close()


async def test_bounded_spool_refuses_instead_of_dropping(tmp_path: Path) -> None:
    """A full spool raises ResourceExhausted and keeps every stored envelope."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY, max_unacked=3)
    for i in range(3):
        await spool.append(_receipt(i))
    with pytest.raises(ResourceExhausted, match="full"):
        await spool.append(_receipt(3))
    await spool.ack(1)
    assert await spool.append(_receipt(3)) == 4
    await spool.close()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from tether.sidecar.spool import ReceiptSpool
    sys.path.insert(0, sys.argv[2])
    from test_spool import KEY, _receipt

    async def main():
        spool = ReceiptSpool(Path(sys.argv[1]), "n1", KEY)
        i = 0
        while True:
            seq = await spool.append(_receipt(i))
            print(seq, flush=True)
            i += 1

    asyncio.run(main())
    """
)


def test_sigkill_of_writer_loses_nothing(tmp_path: Path) -> None:
    """Every seq a killed writer reported as appended is in the spool, chained, no gaps."""
    path = tmp_path / "spool.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    reported = [int(proc.stdout.readline()) for _ in range(60)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    rest = proc.stdout.read().split()
    reported += [int(x) for x in rest]
    spool = ReceiptSpool(path, "n1", KEY)
    stored = spool.unacked(limit=10_000)
    assert [s for s, _ in stored][: len(reported)] == reported
    _check_chain([e for _, e in stored])
    assert asyncio.run(spool.append(_receipt(0))) == len(stored) + 1


class _FlakyStream:
    """A ReceiptStream into a real Ledger that breaks after a number of batches."""

    def __init__(self, ledger: object, breaks_after: int) -> None:
        self.ledger = ledger
        self.left = breaks_after

    async def send(self, batch: list[tuple[int, bytes, bytes | None]]) -> int:
        if self.left == 0:
            raise ConnectionError("link down")
        self.left -= 1
        acked, _ = await self.ledger.ingest(  # type: ignore[attr-defined]
            "n1", [(s, e) for s, e, _ in batch]
        )
        return int(acked)

    async def close(self) -> None:
        return None


async def test_stream_replays_into_ledger_without_duplicates(tmp_path: Path) -> None:
    """After broken streams and a spool restart, the ledger holds each receipt once, in order."""
    from tether.control.ledger import Ledger
    from tether.core.leases import Lease
    from tether.crypto.certs import issue_cert
    from tether.crypto.leases import sign_lease
    from tether.store.base import NewTask, NodeRecord, TaskRecord
    from tether.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "control.db")
    await store.open()
    control = seeded_key("spool/control")
    _, cert = issue_cert(control, "n1", KEY.public.raw, T0 - 1)
    await store.put_node(NodeRecord("n1", KEY.public.raw, cert.to_json_bytes(), T0))

    def sign(task: TaskRecord) -> bytes:
        lease = Lease(
            lease_id=task.lease_id,
            task_id=task.task_id,
            attempt=task.attempt,
            node_id=task.node_id,
            agent_id=task.agent_id,
            fencing_token=task.fencing_token,
            issued_unix_ms=T0,
            expires_unix_ms=task.lease_expires_unix_ms,
            queue=task.queue,
        )
        return sign_lease(lease, control).to_json_bytes()

    # The lease the receipts are about: task t, token 1, held by n1 (the ledger checks it).
    await store.submit_task(NewTask("q", b"{}", max_attempts=1, lease_ttl_ms=30_000), "t", T0)
    got = await store.acquire_lease(
        queue="q", node_id="n1", agent_id="a", lease_id="L", now_ms=T0, sign=sign
    )
    assert got is not None
    assert (got[0].task_id, got[0].fencing_token, got[0].lease_expires_unix_ms) == (
        "t",
        1,
        T0 + 30_000,
    )
    ledger = Ledger(store, control)
    await ledger.open()
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    for i in range(50):
        await spool.append(_receipt(i))
    opened = 0

    async def open_stream() -> _FlakyStream:
        nonlocal opened
        opened += 1
        return _FlakyStream(ledger, breaks_after=2)

    stop = asyncio.Event()
    task = asyncio.create_task(stream_receipts(spool, open_stream, stop, batch=7, retry_s=0.01))
    for _ in range(500):
        if await spool.pending() == 0:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert opened > 1
    assert ledger.size == 50
    await spool.close()
    # A restarted spool has nothing to replay; a stale resend is de-duplicated.
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    assert await spool.pending() == 0
    assert await spool.append(_receipt(99)) == 51
    assert await ledger.ingest("n1", spool.unacked()) == (51, 50)
    assert await ledger.ingest("n1", spool.unacked()) == (51, 50)
    bundle = await ledger.export()
    _check_chain([e.envelope for e in bundle.entries])
    await spool.close()
    await store.close()


async def test_wait_acked_and_retention(tmp_path: Path) -> None:
    """wait_acked answers False on timeout and True once acked; acked envelopes stay readable."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY, retain_acked=2)
    for i in range(5):
        await spool.append(_receipt(i))
    assert await spool.wait_acked(3, 0.01) is False
    waiter = asyncio.create_task(spool.wait_acked(3, 30))
    await asyncio.sleep(0)
    await spool.ack(4)
    assert await waiter is True
    assert await spool.wait_acked(1, 0) is True
    assert len(spool.envelopes()) == 5  # the ack is written (and pruned) a moment later
    await spool.write_acks()
    # seq 1 and 2 pruned (only 2 acked retained), 3..5 kept; the task filter works too.
    _check_chain(spool.envelopes(), first_seq=3)
    assert spool.envelopes("t") == spool.envelopes()
    assert spool.envelopes("other") == []
    await spool.close()


async def test_acks_are_written_in_the_background(tmp_path: Path) -> None:
    """An ack counts at once and reaches the file within ACK_PERSIST_S, many acks in one write."""
    path = tmp_path / "spool.db"
    spool = ReceiptSpool(path, "n1", KEY)
    for i in range(4):
        await spool.append(_receipt(i))

    def on_file() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT acked_seq FROM spool_state").fetchone()[0])

    for seq in (1, 2, 3):
        await spool.ack(seq)
    assert (spool.acked_seq, await spool.pending(), on_file()) == (3, 1, 0)
    for _ in range(200):
        if on_file() == 3:
            break
        await asyncio.sleep(spool_module.ACK_PERSIST_S / 10)
    assert on_file() == 3
    await spool.ack(4)
    await spool.close()  # a pending ack is written on close
    assert on_file() == 4


async def test_stream_lingers_for_more_unless_an_ack_is_awaited(tmp_path: Path) -> None:
    """A receipt after a quiet spell is streamed at once; receipts that keep coming linger for
    a fuller batch, until a caller waits for an ack (wait_acked) or a lease end hurries it."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    sent: list[list[int]] = []

    class Stream:
        async def send(self, batch: list[tuple[int, bytes, bytes | None]]) -> int:
            sent.append([s for s, _, _ in batch])
            return batch[-1][0]

        async def close(self) -> None:
            pass

    async def open_stream() -> Stream:
        return Stream()

    async def sent_becomes(want: list[list[int]]) -> None:
        for _ in range(500):
            if sent == want:
                return
            await asyncio.sleep(0.01)
        assert sent == want

    stop = asyncio.Event()
    runner = asyncio.create_task(stream_receipts(spool, open_stream, stop, linger_s=30))
    await spool.append(_receipt(0))
    await sent_becomes([[1]])  # the first after a quiet spell: at once
    for i in (1, 2):
        await spool.append(_receipt(i))
    await asyncio.sleep(0.3)
    assert sent == [[1]]  # these linger (up to 30 s) for more
    assert await spool.wait_acked(3, 10)  # an awaited ack sends them now
    assert sent == [[1], [2, 3]]
    spool.hurry()  # a lease ended: what comes next goes at once
    await spool.append(_receipt(3))
    await sent_becomes([[1], [2, 3], [4]])
    stop.set()
    await runner
    await spool.close()


async def test_cancelled_appends_never_break_the_chain(tmp_path: Path) -> None:
    """An append cancelled mid-write either stores its receipt or not; seqs stay contiguous."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    for i in range(40):
        task = asyncio.create_task(spool.append(_receipt(i)))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    last = await spool.append(_receipt(99))
    stored = spool.unacked(limit=1000)
    assert [s for s, _ in stored] == list(range(1, last + 1))
    _check_chain([e for _, e in stored])
    await spool.close()


async def test_writer_thread_batches_ends_when_idle_and_close_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends meanwhile share the next commit, the writer thread ends when idle and
    starts again, and close answers every accepted append before the file closes."""
    monkeypatch.setattr(spool_module._Worker, "IDLE_S", 0.05)
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    commits: list[int] = []
    store = spool._store

    def counted(receipts: list[tuple[Receipt, bool, bytes | None]]) -> list[int | BaseException]:
        commits.append(len(receipts))
        return store(receipts)

    monkeypatch.setattr(spool, "_store", counted)
    assert await asyncio.gather(*(spool.append(_receipt(i)) for i in range(5))) == [1, 2, 3, 4, 5]
    assert commits == [1, 4]  # the first goes at once; the four behind it share one commit

    thread = spool._worker._thread
    assert thread is not None
    assert thread.name == "tether-spool"
    assert thread.is_alive()
    thread.join(5)
    assert not thread.is_alive()
    assert spool._worker._thread is None
    assert await spool.append(_receipt(5)) == 6  # and comes back with the next job
    late = [asyncio.create_task(spool.append(_receipt(i))) for i in range(6, 9)]
    await asyncio.sleep(0)
    await spool.close()
    assert [t.result() for t in late] == [7, 8, 9]
    again = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    assert [s for s, _ in again.unacked(limit=100)] == list(range(1, 10))
    await again.close()


async def test_appenders_coming_straight_back_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appenders answered by one commit that append again at once go together in the
    next one, not the first of them alone and the rest after it."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    commits: list[int] = []
    store = spool._store

    def counted(receipts: list[tuple[Receipt, bool, bytes | None]]) -> list[int | BaseException]:
        commits.append(len(receipts))
        return store(receipts)

    monkeypatch.setattr(spool, "_store", counted)

    async def appender(k: int) -> None:
        for i in range(10):
            await spool.append(_receipt(k * 100 + i))

    await asyncio.gather(*(appender(k) for k in range(8)))
    await spool.close()
    assert sum(commits) == 80
    assert len(commits) <= 12, commits  # about one commit a round (the first goes alone)


async def test_carried_outcomes_are_stored_streamed_and_survive_a_restart(tmp_path: Path) -> None:
    """A tool call's outcome is committed with its receipt, streamed with it in batches
    bounded by bytes, listed while unacknowledged (also after a restart), and a spool file
    from before outcomes rode along is upgraded in place."""
    path = tmp_path / "spool.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute(  # the table as spools created it before tool_call_result
            "CREATE TABLE spool (seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL,"
            " task_id TEXT NOT NULL)"
        )
        old.commit()
    spool = ReceiptSpool(path, "n1", KEY)
    big = b"x" * 1500
    assert await spool.append(_receipt(0)) == 1
    assert await spool.append(_receipt(1), tool_call_result=big) == 2
    assert await spool.append(_receipt(2), tool_call_result=b"{}") == 3
    got = spool.outgoing()
    assert [(s, o) for s, _, o in got] == [(1, None), (2, big), (3, b"{}")]
    assert [e for _, e, _ in got] == [e for _, e in spool.unacked()]
    first = len(got[0][1])
    assert [s for s, _, _ in spool.outgoing(max_bytes=first + 1)] == [1]
    assert [s for s, _, _ in spool.outgoing(max_bytes=1)] == [1]  # always one
    assert [s for s, _, _ in spool.outcomes()] == [2, 3]
    assert spool.carried(2) == big
    assert spool.carried(1) is None
    await spool.close()
    spool = ReceiptSpool(path, "n1", KEY)
    assert [(s, o) for s, _, o in spool.outcomes()] == [(2, big), (3, b"{}")]
    await spool.ack(2)
    assert [s for s, _, _ in spool.outcomes()] == [3]
    assert [s for s, _, _ in spool.outgoing()] == [3]
    await spool.close()


async def test_page_cache_is_bounded(tmp_path: Path) -> None:
    """Both spool connections hold at most CACHE_KIB of pages, not SQLite's 2,000 KiB default."""
    spool = ReceiptSpool(tmp_path / "spool.db", "n1", KEY)
    try:
        await spool.append(_receipt(0))
        for db in (spool._db, spool._rdb):
            assert db.execute("PRAGMA cache_size").fetchone()[0] == -spool_module.CACHE_KIB
        assert spool_module.CACHE_KIB < 2000
    finally:
        await spool.close()
