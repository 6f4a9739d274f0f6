"""The receipt seam: where the sidecar's signed, hash-chained receipts go.

`ReceiptSink` is the only thing the Broker and the lease keeper know about
receipts. `emit` returns only once the receipt is durable (signed and on disk),
so an action's evidence survives a crash right after it. The sidecar's sink is
the durable spool (`tether.sidecar.spool.ReceiptSpool`), which also streams
receipts to the control plane and reports acknowledgements (`wait_acked`).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from tether.core.receipts import Receipt


class Slot(Protocol):
    """Room promised for one receipt (see `ReceiptSink.reserve`)."""

    def take(self) -> bool: ...

    def release(self) -> None: ...


class ReceiptSink(Protocol):
    """Takes receipts from the sidecar and keeps them durably."""

    async def emit(
        self, receipt: Receipt, slot: Slot | None = None, tool_call_result: bytes | None = None
    ) -> int:
        """Signs, chains and stores `receipt`; durable before it returns; returns its seq.

        With a `slot` from `reserve`, the receipt is never refused for space.
        `tool_call_result`: a keyed tool call's redacted outcome, kept and
        streamed with its tool_call receipt; the control plane completes the
        call's idempotency record from it when it appends the receipt.
        """
        ...

    def reserve(self) -> Slot:
        """Promises room for one receipt before the action it records happens.

        Raises:
            ResourceExhausted: no room; the action must not happen.
        """
        ...

    def hurry(self) -> None:
        """Streams what comes next without waiting for a fuller batch, for a moment."""
        ...

    async def pending(self) -> int:
        """Receipts stored but not yet acknowledged by the control plane."""
        ...

    async def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """True once the control plane acknowledged `seq`; False after `timeout_s`."""
        ...

    acked_seq: int
    """Every receipt up to this seq is acknowledged by the control plane."""

    def outcomes(self) -> list[tuple[int, bytes, bytes]]:
        """(seq, envelope, outcome) of each unacknowledged receipt carrying a call's outcome."""
        ...

    def carried(self, seq: int) -> bytes | None:
        """The outcome stored with receipt `seq`, if it carries one and is still kept."""
        ...

    def envelopes(self, task_id: str | None = None) -> list[bytes]:
        """Envelope bytes still held locally, in seq order (optionally one task's)."""
        ...

    async def close(self) -> None:
        """Flushes and releases resources."""
        ...


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, the digest every receipt field uses."""
    return hashlib.sha256(data).hexdigest()
