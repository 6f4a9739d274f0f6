"""RFC 6962/9162 Merkle trees against an independent, naive recursive implementation."""

from __future__ import annotations

import hashlib

import pytest

from tether.crypto import merkle

SIZES = range(1, 71)


def _leaves(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def _mth(d: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written straight from the text."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < len(d):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(d[:k]) + _mth(d[k:])).digest()


def _path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n])."""
    if len(d) == 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m < k:
        return [*_path(m, d[:k]), _mth(d[k:])]
    return [*_path(m - k, d[k:]), _mth(d[:k])]


def _subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    """RFC 6962 §2.1.2 SUBPROOF(m, D[n], b)."""
    n = len(d)
    if m == n:
        return [] if b else [_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*_subproof(m, d[:k], b), _mth(d[k:])]
    return [*_subproof(m - k, d[k:], False), _mth(d[:k])]


@pytest.fixture(scope="module")
def trees() -> dict[int, merkle.MerkleTree]:
    return {n: merkle.MerkleTree.from_leaves(_leaves(n)) for n in SIZES}


def test_hash_prefixes() -> None:
    """Leaf and node hashes use the 0x00 and 0x01 domain prefixes."""
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert merkle.node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert merkle.MerkleTree([]).root() == hashlib.sha256(b"").digest()


def test_roots_match_rfc(trees: dict[int, merkle.MerkleTree]) -> None:
    """The level-built root equals RFC 6962's recursive MTH for sizes 1..70, at every prefix."""
    for n in SIZES:
        d = _leaves(n)
        assert trees[n].root() == _mth(d)
        for m in range(n + 1):
            assert trees[n].root(m) == _mth(d[:m])


def test_inclusion_proofs_match_rfc_and_verify(trees: dict[int, merkle.MerkleTree]) -> None:
    """Every inclusion proof for every index equals PATH(m, D[n]) and verifies; tampering fails."""
    for n in SIZES:
        d = _leaves(n)
        root = _mth(d)
        for i in range(n):
            proof = trees[n].inclusion_proof(i)
            assert proof == _path(i, d)
            lh = merkle.leaf_hash(d[i])
            assert merkle.verify_inclusion(lh, i, n, proof, root)
            assert not merkle.verify_inclusion(lh, i, 2 * n + 2, proof, root)
            if n > 1:
                assert not merkle.verify_inclusion(lh, (i + 1) % n, n, proof, root)
                bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
                assert not merkle.verify_inclusion(lh, i, n, bad, root)
                assert not merkle.verify_inclusion(lh, i, n, proof[:-1], root)
            assert not merkle.verify_inclusion(lh, i, n, [*proof, root], root)


def test_inclusion_against_older_sizes(trees: dict[int, merkle.MerkleTree]) -> None:
    """Proofs against an older tree head come out of the grown tree unchanged."""
    big = trees[70]
    d = _leaves(70)
    for m in (1, 5, 16, 33, 64):
        for i in range(m):
            assert big.inclusion_proof(i, m) == _path(i, d[:m])


def test_consistency_proofs_match_rfc_and_verify(trees: dict[int, merkle.MerkleTree]) -> None:
    """Every consistency proof equals PROOF(m, D[n]) and verifies; wrong roots fail."""
    for n in SIZES:
        d = _leaves(n)
        new_root = _mth(d)
        for m in range(0, n + 1):
            proof = trees[n].consistency_proof(m)
            expected = [] if m in (0, n) else _subproof(m, d, True)
            assert proof == expected
            old_root = _mth(d[:m])
            assert merkle.verify_consistency(m, n, old_root, new_root, proof)
            if 0 < m < n:
                assert not merkle.verify_consistency(m, n, new_root, new_root, proof)
                assert not merkle.verify_consistency(m, n, old_root, old_root, proof)
                assert not merkle.verify_consistency(m, n, old_root, new_root, proof[:-1])


def test_append_matches_bulk_build() -> None:
    """Appending leaves one by one gives the same root and proofs as building at once."""
    t = merkle.MerkleTree([])
    d = _leaves(70)
    for i, leaf in enumerate(d):
        t.append(merkle.leaf_hash(leaf))
        assert t.root() == _mth(d[: i + 1])
    assert t.inclusion_proof(37) == _path(37, d)


def test_bad_arguments() -> None:
    """Out-of-range indexes and sizes are refused."""
    t = merkle.MerkleTree.from_leaves(_leaves(3))
    with pytest.raises(ValueError, match="out of range"):
        t.inclusion_proof(3)
    with pytest.raises(ValueError, match="out of range"):
        t.root(4)
    assert not merkle.verify_inclusion(b"\x00" * 32, 5, 3, [], b"")


def _stored_tree(n: int) -> tuple[list[bytes], dict[tuple[int, int], bytes]]:
    """A frontier built in two uneven appends, and what a store would keep beside it."""
    leaves = [merkle.leaf_hash(x) for x in _leaves(n)]
    frontier, done = merkle.frontier_extend(0, [], leaves[: n // 3])
    frontier, more = merkle.frontier_extend(n // 3, frontier, leaves[n // 3 :])
    kept = {(0, i): h for i, h in enumerate(leaves)}
    kept.update(((height, index), h) for height, index, h in done + more)
    return frontier, kept


def _range(kept: dict[tuple[int, int], bytes], lo: int, hi: int) -> bytes:
    parts = []
    for height, index in merkle.perfect_parts(lo, hi):
        base, first, count = merkle.stored_of(height, index)
        assert base % merkle.STRIDE == 0
        assert count <= 2 ** (merkle.STRIDE - 1)
        parts.append(merkle.perfect_hash([kept[(base, i)] for i in range(first, first + count)]))
    return merkle.range_hash(parts)


@pytest.mark.parametrize("n", [*SIZES, 255, 256, 257, 1000])
def test_stored_frontier_and_subtrees_give_the_same_root_and_proofs(n: int) -> None:
    """A tree known only by its frontier and every 4th level of subtrees answers exactly
    as the naive RFC 6962 definitions do (root, every audit path, consistency proofs)."""
    d = _leaves(n)
    frontier, kept = _stored_tree(n)
    assert merkle.frontier_root(frontier) == _mth(d)
    assert len(frontier) == bin(n).count("1")
    assert {h for h, _ in kept if h} <= set(range(merkle.STRIDE, 64, merkle.STRIDE))
    for size in {1, n // 2 or 1, n}:
        for m in range(0, size, max(1, size // 7)):
            got = [_range(kept, *r) for r in merkle.inclusion_ranges(m, size)]
            assert got == _path(m, d[:size])
        for old in range(1, size, max(1, size // 7)):
            got = [_range(kept, *r) for r in merkle.consistency_ranges(old, size)]
            assert got == _subproof(old, d[:size], True)


def test_a_frontier_that_does_not_fit_its_size_is_refused() -> None:
    """Extending from a frontier of the wrong length is an error, not a wrong tree."""
    with pytest.raises(ValueError, match="does not fit"):
        merkle.frontier_extend(3, [b"x" * 32], [b"y" * 32])
