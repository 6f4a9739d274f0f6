"""The Merkle tree kept in the store (each store): a ledger opens from the stored frontier
without reading leaf hashes, proofs from stored subtrees equal a full tree's, and a ledger
stored before the frontier existed is caught up in bounded chunks."""

from __future__ import annotations

import hashlib
import random

import pytest
from contract_helpers import execute_outside

from tether.control import ledger as ledger_module
from tether.control.ledger import Ledger
from tether.core.clock import FakeClock
from tether.crypto import merkle
from tether.store.base import LedgerHead, LedgerLeaf, Store
from tether.verify.builder import T0, seeded_key

CONTROL = seeded_key("frontier/control")
N = 300


async def _fill(store: Store, n: int, start: int = 0, seed: int = 7) -> list[bytes]:
    """Appends leaves start..start+n-1 for node "n" in batches of random sizes."""
    rng = random.Random(seed)
    head = await store.ledger_head("n")
    hashes = []
    i = start
    while i < start + n:
        size = min(rng.randint(1, 40), start + n - i)
        leaves = []
        for k in range(i, i + size):
            env = f"envelope-{k}".encode()
            leaves.append(
                LedgerLeaf(k + 1, "t", env, merkle.leaf_hash(env), hashlib.sha256(env).hexdigest())
            )
        got = await store.ledger_append("n", head, leaves, T0)
        assert got is not None
        head = LedgerHead(leaves[-1].seq, leaves[-1].digest, got[-1])
        hashes += [x.leaf_hash for x in leaves]
        i += size
    return hashes


async def _open(store: Store) -> Ledger:
    ledger = Ledger(store, CONTROL, FakeClock(T0 + 10_000), origin="test/ledger")
    await ledger.open()
    return ledger


async def _check_proofs(ledger: Ledger, full: merkle.MerkleTree) -> None:
    rng = random.Random(1)
    for size in sorted(
        {1, 2, 15, 16, 17, 255, 256, 257, full.size, *rng.sample(range(1, full.size), 8)}
    ):
        if size > full.size:
            continue
        for index in {0, size - 1, size // 2, rng.randrange(size)}:
            got_size, path = await ledger.inclusion_proof(index, size)
            assert (got_size, path) == (size, full.inclusion_proof(index, size))
        for old in {1, size // 3 or 1, size}:
            assert await ledger.consistency_proof(old, size) == full.consistency_proof(old, size)


async def test_stored_tree_proofs_equal_a_full_trees(store: Store) -> None:
    """Appends in random batches keep the stored frontier current; proofs and root match."""
    hashes = await _fill(store, N)
    f = await store.ledger_frontier()
    assert (f.tree_size, f.leaves) == (N, N)
    assert len(f.hashes) == bin(N).count("1")
    ledger = await _open(store)
    full = merkle.MerkleTree(hashes)
    assert ledger.size == N
    assert (await ledger.checkpoint(fresh=True)).root_hash == full.root()
    await _check_proofs(ledger, full)


async def test_open_reads_the_frontier_not_the_leaves(store: Store) -> None:
    """With every stored leaf hash overwritten, a new ledger still opens at the true root."""
    hashes = await _fill(store, N)
    execute_outside(store, "UPDATE ledger_leaves SET leaf_hash = ?", (b"\0" * 32,))
    ledger = await _open(store)
    assert ledger.size == N
    assert (await ledger.checkpoint(fresh=True)).root_hash == merkle.MerkleTree(hashes).root()


async def test_a_ledger_stored_before_the_frontier_is_caught_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frontier behind the leaves (an upgraded database) is rebuilt at open in chunks;
    appends then keep it current."""
    hashes = await _fill(store, N)
    execute_outside(store, "UPDATE ledger_frontier SET tree_size = 0, hashes = ?", (b"",))
    execute_outside(store, "DELETE FROM ledger_subtrees", ())
    more = await _fill(store, 20, start=N, seed=8)  # appended while behind: left alone
    assert (await store.ledger_frontier()).tree_size == 0
    monkeypatch.setattr(ledger_module, "_FRONTIER_CHUNK", 37)
    ledger = await _open(store)
    full = merkle.MerkleTree(hashes + more)
    assert ledger.size == N + 20
    assert (await ledger.checkpoint(fresh=True)).root_hash == full.root()
    await _check_proofs(ledger, full)
    later = await _fill(store, 5, start=N + 20, seed=9)
    f = await store.ledger_frontier()
    assert f.tree_size == N + 25
    assert merkle.frontier_root(f.hashes) == merkle.MerkleTree(hashes + more + later).root()
