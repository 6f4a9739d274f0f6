"""RFC 6962 / RFC 9162 Merkle trees: hashing, proofs and their verification.

Leaf hash = SHA-256(0x00 || leaf bytes), node hash = SHA-256(0x01 || left || right);
the distinct prefixes keep a leaf from ever passing for an inner node. The tree
of n leaves splits at the largest power of two below n, which is the same as
building it level by level and promoting an odd last node unchanged; `MerkleTree`
does the latter once in O(n) and then answers proofs in O(log n).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 6962 leaf hash of the exact leaf bytes."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """A tree over fixed leaf hashes, with every level kept for fast proofs.

    Proofs can be asked for any size up to `size` (older tree heads), which is
    what consistency proofs and proofs against an older checkpoint need.
    """

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        level = list(leaf_hashes)
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [
                hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
                for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            self._levels.append(nxt)
            level = nxt

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes]) -> MerkleTree:
        """Builds the tree from raw leaf bytes."""
        return cls([leaf_hash(x) for x in leaves])

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf_hash_: bytes) -> None:
        """Adds one leaf hash, updating the levels in O(log n)."""
        self._levels[0].append(leaf_hash_)
        k = 0
        while True:
            level = self._levels[k]
            n = len(level)
            if n == 1 and k == len(self._levels) - 1:
                return
            if k + 1 == len(self._levels):
                self._levels.append([])
            parent = self._levels[k + 1]
            idx = (n - 1) // 2
            value = node_hash(level[n - 2], level[n - 1]) if n % 2 == 0 else level[n - 1]
            if idx < len(parent):
                parent[idx] = value
            else:
                parent.append(value)
            k += 1

    def root(self, size: int | None = None) -> bytes:
        """Root hash of the first `size` leaves (default: all)."""
        n = self.size if size is None else size
        self._check_size(n)
        if n == 0:
            return EMPTY_ROOT
        return self._mth(0, n)

    def _check_size(self, n: int) -> None:
        if not 0 <= n <= self.size:
            raise ValueError(f"tree size {n} out of range 0..{self.size}")

    def _mth(self, lo: int, hi: int) -> bytes:
        """Hash of leaves [lo, hi); lo is always aligned to the split boundary."""
        n = hi - lo
        if n & (n - 1) == 0:  # a perfect subtree, kept in the levels
            k = n.bit_length() - 1
            return self._levels[k][lo >> k]
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path for leaf `index` in the tree of the first `size` leaves."""
        n = self.size if size is None else size
        self._check_size(n)
        if not 0 <= index < n:
            raise ValueError(f"leaf index {index} out of range for size {n}")
        proof: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo = lo + k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 6962 §2.1.2 proof that the first `old_size` leaves prefix `new_size`."""
        n = self.size if new_size is None else new_size
        self._check_size(n)
        if not 0 <= old_size <= n:
            raise ValueError(f"old size {old_size} out of range 0..{n}")
        if old_size in (0, n):
            return []
        proof: list[bytes] = []
        lo, hi, m, whole = 0, n, old_size, True
        while True:
            size = hi - lo
            if m == size:
                if not whole:
                    proof.append(self._mth(lo, hi))
                break
            k = _split(size)
            if m <= k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        proof.reverse()
        return proof


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """Root hash of the given leaf hashes."""
    return MerkleTree(leaf_hashes).root()


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2: the root implied by an inclusion proof.

    Raises:
        ValueError: the proof does not fit the index and size.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} out of range for size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if len(p) != HASH_SIZE:
            raise ValueError("proof hash is not 32 bytes")
        if sn == 0:
            raise ValueError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion proof is too short")
    return r


def verify_inclusion(
    leaf_hash_: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when `proof` shows leaf `index` with `leaf_hash_` in the tree with `root`."""
    try:
        return root_from_inclusion(leaf_hash_, index, size, proof) == root
    except ValueError:
        return False


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """RFC 9162 §2.1.4.2: True when the old tree is a prefix of the new one."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof or any(len(p) != HASH_SIZE for p in proof):
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


# -- a tree kept in a database: its frontier and every STRIDE-th level of subtrees ------
#
# A ledger that must start in constant memory keeps, beside its leaf hashes, the
# frontier (the roots of the perfect subtrees a tree of n leaves splits into, one
# per set bit of n, largest first) and the hash of every complete perfect subtree
# whose height is a positive multiple of STRIDE. The root and appends need only
# the frontier; any perfect subtree's hash needs at most 2**(STRIDE-1) stored
# hashes, so a proof reads O(log n) of them, never every leaf.

STRIDE = 4


def frontier_levels(size: int) -> list[int]:
    """Heights of the frontier's subtrees for `size` leaves, largest first."""
    return [k for k in range(size.bit_length() - 1, -1, -1) if size >> k & 1]


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """The RFC 6962 root of a tree given its frontier (largest subtree first)."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


def frontier_extend(
    size: int, frontier: Sequence[bytes], leaf_hashes: Sequence[bytes]
) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Appends leaf hashes to a tree of `size` leaves known by its frontier.

    Returns the new frontier and the perfect subtrees completed on the way
    whose height is a positive multiple of STRIDE, as (height, index, hash).

    Raises:
        ValueError: the frontier does not fit `size`.
    """
    levels = frontier_levels(size)
    if len(levels) != len(frontier):
        raise ValueError(f"a frontier of {len(frontier)} hashes does not fit size {size}")
    stack = list(zip(levels, frontier, strict=True))
    completed: list[tuple[int, int, bytes]] = []
    for h in leaf_hashes:
        level, node = 0, h
        while stack and stack[-1][0] == level:
            node = node_hash(stack.pop()[1], node)
            level += 1
            if level % STRIDE == 0:
                completed.append((level, size >> level, node))
        stack.append((level, node))
        size += 1
    return [h for _, h in stack], completed


def perfect_parts(lo: int, hi: int) -> list[tuple[int, int]]:
    """The perfect subtrees, as (height, index), whose leaves are [lo, hi) in order.

    `lo` must be a multiple of the largest part (true of every range RFC 6962
    proofs use, which start at a split boundary).
    """
    parts: list[tuple[int, int]] = []
    while lo < hi:
        k = (hi - lo).bit_length() - 1
        while lo & ((1 << k) - 1):
            k -= 1
        parts.append((k, lo >> k))
        lo += 1 << k
    return parts


def stored_of(height: int, index: int) -> tuple[int, int, int]:
    """Where a perfect subtree's hash comes from: (stored height, first index, count)."""
    base = height - height % STRIDE
    span = height - base
    return base, index << span, 1 << span


def perfect_hash(stored: Sequence[bytes]) -> bytes:
    """The root of 2**k consecutive equal-height stored hashes."""
    level = list(stored)
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def range_hash(parts: Sequence[bytes]) -> bytes:
    """MTH of consecutive perfect subtrees (largest first), as RFC 6962 splits them."""
    return frontier_root(parts)


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make the audit path of `index` in a tree of `size`."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} out of range for size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo = lo + k
    out.reverse()
    return out


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make the RFC 6962 consistency proof old -> new."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"old size {old_size} out of range 0..{new_size}")
    if old_size in (0, new_size):
        return []
    out: list[tuple[int, int]] = []
    lo, hi, m, whole = 0, new_size, old_size, True
    while True:
        size = hi - lo
        if m == size:
            if not whole:
                out.append((lo, hi))
            break
        k = _split(size)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    out.reverse()
    return out
