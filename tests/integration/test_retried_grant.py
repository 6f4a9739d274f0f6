"""A store transaction that is retried signs once per attempt; only the committed
envelope may be handed out (the PostgreSQL store retries on serialization failures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tether.crypto.leases import decode_lease
from tether.crypto.signing import Envelope
from tether.store.sqlite import SqliteStore
from tether.testing import start_control


class RetryingStore(SqliteStore):
    """Runs the signer for a rolled-back first attempt (a different issue time) each time."""

    async def acquire_leases(self, **kw: Any) -> Any:
        sign = kw["sign"]

        def twice(task: Any) -> bytes:
            sign(dataclasses.replace(task, lease_id="l_discarded"))  # the rolled-back attempt
            return bytes(sign(task))

        kw["sign"] = twice
        return await super().acquire_leases(**kw)


async def test_the_committed_lease_envelope_is_the_one_returned(tmp_path: Path) -> None:
    """AcquireLease answers with the envelope the store committed, not one signed for an
    attempt that was rolled back."""
    store = RetryingStore(tmp_path / "control.db")
    async with start_control(tmp_path, store=store) as cp:
        await cp.client.submit("work", b"{}")
        node = await cp.node_client("node-1")
        async with node:
            got = await node.acquire_lease("work", "node-1", "alice")
        lease = decode_lease(got.lease.payload)
        assert lease.lease_id != "l_discarded"
        stored = await store.lease_envelope(lease.task_id, lease.fencing_token)
        assert stored is not None
        assert Envelope.from_json_bytes(stored).payload == got.lease.payload
