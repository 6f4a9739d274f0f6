"""Ledger start-up: time and memory of `Ledger.open` at two ledger sizes.

The store keeps the Merkle frontier, so opening reads O(log n) hashes whatever
the ledger's length; the two figures should be about equal.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tether.control.ledger import Ledger
from tether.crypto.merkle import leaf_hash
from tether.crypto.signing import SigningKey
from tether.store.base import LedgerHead, LedgerLeaf
from tether.store.sqlite import SqliteStore

BATCH = 1000


async def _fill(store: SqliteStore, n: int) -> None:
    head: LedgerHead | None = None
    for start in range(0, n, BATCH):
        leaves = []
        for k in range(start, min(n, start + BATCH)):
            env = f"bench-envelope-{k:09d}".encode() * 8
            leaves.append(
                LedgerLeaf(k + 1, "t", env, leaf_hash(env), hashlib.sha256(env).hexdigest())
            )
        got = await store.ledger_append("bench-node", head, leaves, 0)
        assert got is not None
        head = LedgerHead(leaves[-1].seq, leaves[-1].digest, got[-1])


async def open_run(tmp: Path, n: int) -> dict[str, Any]:
    """Fills an SQLite ledger with `n` leaves, then times a fresh `Ledger.open`."""
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before timing
    store = SqliteStore(tmp / "ledger.db", synchronous="NORMAL")
    await store.open()
    try:
        await _fill(store, n)
        ledger = Ledger(store, SigningKey.generate(), workers=1)
        tracemalloc.start()
        t0 = time.perf_counter()
        await ledger.open()
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert ledger.size == n
        t1 = time.perf_counter()
        await ledger.inclusion_proof(n // 2, n)
        proof_ms = (time.perf_counter() - t1) * 1000
    finally:
        await store.close()
    return {"open_ms": elapsed * 1000, "peak_kib": peak / 1024, "proof_ms": proof_ms}


def ledger_figures(tmp: Path, small: int, large: int) -> dict[str, Any]:
    """Open time and peak memory at `small` and `large` leaves."""
    out: dict[str, Any] = {}
    for label, n in (("small", small), ("large", large)):
        r = asyncio.run(open_run(tmp / f"ledger-{label}", n))
        out[f"ledger_open_ms_{label}"] = round(r["open_ms"], 2)
        out[f"ledger_open_peak_kib_{label}"] = round(r["peak_kib"], 1)
        out[f"ledger_inclusion_proof_ms_{label}"] = round(r["proof_ms"], 2)
    out["ledger_open_sizes"] = [small, large]
    return out
