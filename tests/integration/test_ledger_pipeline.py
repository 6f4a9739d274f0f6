"""Ledger ingest with signature checks in worker processes, pipelined over a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from tether.control.client import ControlClient
from tether.control.ledger import Ledger
from tether.core.errors import VerificationError
from tether.core.receipts import ReceiptKind
from tether.crypto.envelopes import from_proto
from tether.crypto.leases import verify_lease
from tether.testing import ControlHandle, start_control
from tether.verify.builder import BundleBuilder

PER_TASK = 10  # receipts about each leased task


async def _receipts(
    cp: ControlHandle, node: ControlClient, b: BundleBuilder, n: int
) -> list[bytes]:
    """`n` chained receipts of node-a, PER_TASK about each task it leased from `cp`."""
    while len(b.ledger) < n:
        await cp.client.submit("work", b"{}")
        resp = await node.acquire_lease("work", "node-a", "alice")
        assert resp.HasField("task")
        lease = verify_lease(from_proto(resp.lease), {cp.key.keyid: cp.key.public})
        t = lease.issued_unix_ms
        b.receipt(ReceiptKind.LEASE_GRANTED, lease, t)
        b.receipt(ReceiptKind.TASK_STARTED, lease, t + 1)
        for i in range(PER_TASK - 2):
            b.receipt(ReceiptKind.TOOL_CALL, lease, t + 10 + i, tool="http.get", status="ok")
    return b.ledger[:n]


async def _batches(
    envelopes: Sequence[bytes], size: int
) -> AsyncIterator[tuple[str, list[tuple[int, bytes]], dict[int, bytes]]]:
    for i in range(0, len(envelopes), size):
        yield "node-a", [(i + k + 1, e) for k, e in enumerate(envelopes[i : i + size])], {}


async def test_pooled_pipelined_ingest_acks_in_order_and_refuses_a_bad_signature(
    tmp_path: Path,
) -> None:
    """Large batches checked in worker processes are acked in order, each after its commit,
    and a bad signature in a later batch is refused only after the earlier batches' acks."""
    b = BundleBuilder(seed="ledger-pipeline")
    async with start_control(tmp_path) as cp:
        node = await cp.node_client("node-a", key=b.node("node-a").key)
        try:  # the receipts are about real leases granted to node-a
            envelopes = await _receipts(cp, node, b, 400)
        finally:
            await node.close()
        ledger = Ledger(cp.service.store, cp.key, workers=2)
        await ledger.open()
        try:
            ledger._pool()  # the workers start in the background; wait for them here
            await asyncio.gather(*(asyncio.wrap_future(f) for f in ledger._ready))
            assert ledger._pool() is not None
            acks = [a async for a in ledger.ingest_stream(_batches(envelopes[:300], 100))]
            assert [seq for seq, _ in acks] == [100, 200, 300]
            assert [idx for _, idx in acks] == [99, 199, 299]
            bad = bytearray(envelopes[349])
            bad[-10] ^= 1
            tampered = [*envelopes[300:349], bytes(bad), *envelopes[350:400]]
            got: list[tuple[int, int]] = []

            async def consume() -> None:
                async for a in ledger.ingest_stream(
                    _batches_from(301, [tampered[:20], tampered[20:]])
                ):
                    got.append(a)

            with pytest.raises(VerificationError, match="seq 350"):
                await consume()
            assert got == [(320, 319)]
            # An identical resend of stored receipts is de-duplicated, not refused.
            assert await ledger.ingest("node-a", [(s, envelopes[s - 1]) for s in range(1, 101)])
        finally:
            ledger.close()


async def _batches_from(
    first: int, parts: list[list[bytes]]
) -> AsyncIterator[tuple[str, list[tuple[int, bytes]], dict[int, bytes]]]:
    seq = first
    for part in parts:
        yield "node-a", [(seq + k, e) for k, e in enumerate(part)], {}
        seq += len(part)
