"""The receipt ledger: per-node chains checked on ingest, one RFC 6962 Merkle tree.

Ingest verifies each envelope with the node's enrolled key and requires
seq == last + 1 and prev == digest(last). An identical resend of a stored
(node, seq) is de-duplicated (replays after a reconnect are normal); the same
seq with different bytes is a fork and a gap is a lost receipt: both are
refused loudly, never papered over. A batch is appended in one transaction and
acknowledged only after it commits. Checkpoints (C2SP signed notes) are signed
by the control key on a schedule and on demand. Every certificate a node was
issued is kept, and an export carries all of them plus a signed export
manifest (where each chain ends; see `tether.crypto.manifest`). No grpc here:
`grpc_api` converts messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tether.core.clock import Clock, SystemClock
from tether.core.errors import AlreadyExists, InvalidArgument, NotFound, VerificationError
from tether.core.receipts import Receipt
from tether.crypto.manifest import manifest_for, sign_manifest
from tether.crypto.merkle import MerkleTree, leaf_hash
from tether.crypto.note import CheckpointBody, sign_checkpoint
from tether.crypto.receipts import envelope_digest, verify_receipt
from tether.crypto.signing import Envelope, SigningKey, VerifyKey
from tether.store.base import LeaseHistoryEntry, NodeRecord
from tether.verify.bundle import Bundle, CheckpointInfo, Entry

log = logging.getLogger("tether.control.ledger")

DEFAULT_ORIGIN = "tether.local/ledger"
MAX_BATCH = 1000


class LedgerStore(Protocol):
    """What the ledger needs of the control-plane store (SqliteStore has it)."""

    async def transaction(self, fn: Any) -> Any: ...

    async def read(self, fn: Any) -> Any: ...

    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    async def lease_history(self, task_id: str) -> list[LeaseHistoryEntry]: ...


@dataclass(frozen=True)
class Head:
    """A node's last stored receipt."""

    seq: int
    digest: str
    leaf_index: int


_NO_HEAD = Head(0, "", -1)


class Ledger:
    """Append-only, verified receipt ledger over the control plane's store."""

    def __init__(
        self,
        store: LedgerStore,
        key: SigningKey,
        clock: Clock | None = None,
        origin: str = DEFAULT_ORIGIN,
    ) -> None:
        self.store = store
        self.key = key
        self.clock: Clock = clock or SystemClock()
        self.origin = origin
        self._lock = asyncio.Lock()
        self._tree = MerkleTree([])
        self._heads: dict[str, Head] = {}
        self._latest: CheckpointInfo | None = None
        self._recorded_certs: set[str] = set()

    async def open(self) -> None:
        """Loads the leaf hashes (O(n)) and the latest checkpoint."""

        def load(conn: sqlite3.Connection) -> tuple[list[bytes], Any]:
            leaves = [
                bytes(r[0])
                for r in conn.execute("SELECT leaf_hash FROM ledger_leaves ORDER BY leaf_index")
            ]
            cp = conn.execute(
                "SELECT tree_size, root_hash, timestamp_unix_ms, note FROM ledger_checkpoints"
                " ORDER BY tree_size DESC LIMIT 1"
            ).fetchone()
            return leaves, cp

        leaves, cp = await self.store.read(load)
        self._tree = MerkleTree(leaves)
        if cp is not None:
            self._latest = CheckpointInfo(self.origin, cp[0], bytes(cp[1]), cp[2], cp[3])

    @property
    def size(self) -> int:
        return self._tree.size

    async def record_certificate(self, node_id: str, certificate: Envelope | bytes) -> None:
        """Keeps a certificate issued to `node_id` (idempotent), for later exports."""
        data = certificate if isinstance(certificate, bytes) else certificate.to_json_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._recorded_certs:
            return
        now = self.clock.now_ms()
        await self.store.transaction(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO ledger_node_certificates VALUES (?, ?, ?, ?)",
                (digest, node_id, now, data),
            )
        )
        self._recorded_certs.add(digest)

    async def _certificates(self, node_id: str) -> list[Envelope]:
        """Every certificate the node had, oldest first (the current one included)."""
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT certificate FROM ledger_node_certificates WHERE node_id = ?"
                " ORDER BY recorded_unix_ms, cert_sha256",
                (node_id,),
            ).fetchall()
        )
        datas = [bytes(r[0]) for r in rows]
        rec = await self.store.get_node(node_id)
        if rec is not None and rec.certificate not in datas:
            datas.append(rec.certificate)
        return [Envelope.from_json_bytes(d) for d in datas]

    async def _head(self, node_id: str) -> Head:
        head = self._heads.get(node_id)
        if head is None:
            row = await self.store.read(
                lambda c: c.execute(
                    "SELECT seq, digest, leaf_index FROM ledger_leaves WHERE node_id = ?"
                    " ORDER BY seq DESC LIMIT 1",
                    (node_id,),
                ).fetchone()
            )
            head = _NO_HEAD if row is None else Head(row[0], row[1], row[2])
            self._heads[node_id] = head
        return head

    async def _stored(self, node_id: str, seqs: list[int]) -> dict[int, tuple[bytes, int]]:
        def q(conn: sqlite3.Connection) -> dict[int, tuple[bytes, int]]:
            out: dict[int, tuple[bytes, int]] = {}
            for s in seqs:
                row = conn.execute(
                    "SELECT envelope, leaf_index FROM ledger_leaves WHERE node_id = ? AND seq = ?",
                    (node_id, s),
                ).fetchone()
                if row is not None:
                    out[s] = (bytes(row[0]), row[1])
            return out

        return dict(await self.store.read(q))

    async def ingest(self, node_id: str, batch: Sequence[tuple[int, bytes]]) -> tuple[int, int]:
        """Verifies and appends one batch of a node's envelopes (in seq order).

        Returns (acked_seq, ledger_index of that receipt): every receipt of the
        node up to acked_seq is durable when this returns.

        Raises:
            NotFound: the node is not enrolled.
            VerificationError: a bad signature, or a receipt naming another node or seq.
            AlreadyExists: a fork (a stored seq with different bytes).
            InvalidArgument: a gap or a broken prev link, or an oversized batch.
        """
        if not batch:
            raise InvalidArgument("receipts", "batch is empty")
        if len(batch) > MAX_BATCH:
            raise InvalidArgument("receipts", f"at most {MAX_BATCH} receipts per batch")
        rec = await self.store.get_node(node_id)
        if rec is None:
            raise NotFound(f"node {node_id!r} is not enrolled")
        key = VerifyKey.from_raw(rec.public_key)
        await self.record_certificate(node_id, rec.certificate)
        parsed: list[tuple[int, bytes, Receipt]] = []
        for seq, data in batch:
            try:
                r = verify_receipt(data, key)
            except VerificationError as err:
                raise VerificationError(f"node {node_id} seq {seq}: {err.message}") from err
            if r.node_id != node_id or r.seq != seq:
                raise VerificationError(
                    f"envelope for seq {seq} is receipt {r.node_id}/{r.seq}",
                    metadata={"seq": str(seq)},
                )
            parsed.append((seq, data, r))
        async with self._lock:
            head = await self._head(node_id)
            old = await self._stored(node_id, [s for s, _, _ in parsed if s <= head.seq])
            last_seq, last_digest = head.seq, head.digest
            new: list[tuple[int, bytes, Receipt]] = []
            ack_index = head.leaf_index
            for seq, data, r in parsed:
                if seq <= last_seq:
                    have = old.get(seq)
                    if have is None:  # repeated inside this batch
                        have = next(((d, -1) for s, d, _ in new if s == seq), (b"", -1))
                    if have[0] != data:
                        log.error(
                            "receipt fork refused",
                            extra={"node_id": node_id, "seq": seq, "task_id": r.task_id},
                        )
                        raise AlreadyExists(
                            f"fork: node {node_id} seq {seq} is already stored with different "
                            "bytes",
                            metadata={"node_id": node_id, "seq": str(seq)},
                        )
                    continue  # identical resend: de-duplicated
                if seq != last_seq + 1:
                    log.error(
                        "receipt gap refused",
                        extra={"node_id": node_id, "seq": seq, "expected": last_seq + 1},
                    )
                    raise InvalidArgument(
                        "receipts", f"gap: node {node_id} sent seq {seq}, expected {last_seq + 1}"
                    )
                if r.prev != last_digest:
                    log.error("receipt chain break refused", extra={"node_id": node_id, "seq": seq})
                    raise InvalidArgument(
                        "receipts", f"node {node_id} seq {seq}: prev is not the previous envelope"
                    )
                new.append((seq, data, r))
                last_seq, last_digest = seq, envelope_digest(data)
            if new:
                start = self._tree.size
                now = self.clock.now_ms()
                rows = [
                    (
                        start + k,
                        node_id,
                        seq,
                        r.task_id,
                        data,
                        leaf_hash(data),
                        envelope_digest(data),
                        now,
                    )
                    for k, (seq, data, r) in enumerate(new)
                ]

                def tx(conn: sqlite3.Connection) -> None:
                    (top,) = conn.execute(
                        "SELECT COALESCE(MAX(leaf_index), -1) FROM ledger_leaves"
                    ).fetchone()
                    if top != start - 1:
                        raise InvalidArgument("ledger", "ledger changed underneath this process")
                    conn.executemany("INSERT INTO ledger_leaves VALUES (?,?,?,?,?,?,?,?)", rows)

                await self.store.transaction(tx)
                for row in rows:
                    self._tree.append(row[5])
                ack_index = rows[-1][0]
                self._heads[node_id] = Head(last_seq, last_digest, ack_index)
            max_seq = max(s for s, _, _ in parsed)
            if max_seq != last_seq or not new:
                # The ack names the highest seq of the batch, all of it durable.
                got = await self._stored(node_id, [max_seq])
                ack_index = got[max_seq][1] if max_seq in got else ack_index
            return max_seq, ack_index

    async def checkpoint(self, fresh: bool = False) -> CheckpointInfo:
        """The latest signed checkpoint; signs a new one if asked or if none covers the tree."""
        async with self._lock:
            cp = self._latest
            if cp is not None and not fresh:
                return cp
            if cp is not None and cp.tree_size == self._tree.size:
                return cp
            return await self._sign()

    async def _sign(self) -> CheckpointInfo:
        size = self._tree.size
        root = self._tree.root()
        now = self.clock.now_ms()
        note = sign_checkpoint(CheckpointBody(self.origin, size, root), self.key)
        cp = CheckpointInfo(self.origin, size, root, now, note)
        await self.store.transaction(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO ledger_checkpoints VALUES (?, ?, ?, ?)",
                (size, root, now, note),
            )
        )
        self._latest = cp
        return cp

    async def run_checkpointer(self, stop: asyncio.Event, interval_s: float = 10.0) -> None:
        """Signs a checkpoint every `interval_s` while the tree grew, until `stop`.

        A failed signing is logged and retried at the next tick, never fatal.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return
            latest = self._latest
            if latest is None or latest.tree_size != self._tree.size:
                try:
                    cp = await self.checkpoint(fresh=True)
                except Exception as err:
                    log.error("scheduled checkpoint failed: %r", err)
                    continue
                log.debug("checkpoint signed", extra={"tree_size": cp.tree_size})

    def inclusion_proof(self, leaf_index: int, tree_size: int = 0) -> tuple[int, list[bytes]]:
        """(tree size, audit path) for a leaf; size 0 means the latest checkpoint's.

        Raises:
            InvalidArgument: the index or size is out of range.
        """
        size = tree_size or (self._latest.tree_size if self._latest else self._tree.size)
        if not 0 <= leaf_index < size <= self._tree.size:
            raise InvalidArgument("leaf_index", f"{leaf_index} is not in a tree of size {size}")
        return size, self._tree.inclusion_proof(leaf_index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between two tree sizes.

        Raises:
            InvalidArgument: sizes out of order or beyond the tree.
        """
        if not 0 < first <= second <= self._tree.size:
            raise InvalidArgument(
                "first_size", f"need 0 < {first} <= {second} <= {self._tree.size}"
            )
        return self._tree.consistency_proof(first, second)

    async def export(self, task_ids: Sequence[str] = (), since_unix_ms: int = 0) -> Bundle:
        """A self-contained bundle: full node chains for the selected receipts.

        Selection: receipts of `task_ids`, else those stored since
        `since_unix_ms`, else everything. Every node that signed a selected
        receipt contributes its chain from seq 1 to its last selected receipt.
        """
        tasks = list(task_ids)

        def select(conn: sqlite3.Connection) -> list[tuple[int, bytes, str, str, int]]:
            if tasks:
                marks = ",".join("?" * len(tasks))
                heads = conn.execute(
                    "SELECT node_id, MAX(seq) FROM ledger_leaves"
                    f" WHERE task_id IN ({marks}) GROUP BY node_id",
                    tasks,
                ).fetchall()
            else:
                heads = conn.execute(
                    "SELECT node_id, MAX(seq) FROM ledger_leaves WHERE stored_unix_ms >= ?"
                    " GROUP BY node_id",
                    (since_unix_ms,),
                ).fetchall()
            rows: list[tuple[int, bytes, str, str, int]] = []
            for node, top in heads:
                rows += [
                    (r[0], bytes(r[1]), r[2], node, r[3])
                    for r in conn.execute(
                        "SELECT leaf_index, envelope, task_id, seq FROM ledger_leaves"
                        " WHERE node_id = ? AND seq <= ?",
                        (node, top),
                    )
                ]
            rows.sort()
            return rows

        rows = await self.store.read(select)
        cp = await self.checkpoint(fresh=True)
        entries = [
            Entry.of(env, i, i, cp.tree_size, self._tree.inclusion_proof(i, cp.tree_size))
            for i, env, _, _, _ in rows
        ]
        certs: list[Envelope] = []
        for node in sorted({n for _, _, _, n, _ in rows}):
            certs += await self._certificates(node)
        leases: list[Envelope] = []
        for task in sorted({t for _, _, t, _, _ in rows}):
            leases += [
                Envelope.from_json_bytes(h.envelope) for h in await self.store.lease_history(task)
            ]
        now = self.clock.now_ms()
        manifest = manifest_for(
            cp.origin,
            cp.tree_size,
            cp.root_hash,
            now,
            ((node, seq, task, envelope_digest(env)) for _, env, task, node, seq in rows),
        )
        return Bundle(
            entries=entries,
            node_certificates=certs,
            leases=leases,
            checkpoint=cp,
            control_keyids=[self.key.keyid],
            exported_unix_ms=now,
            manifest=sign_manifest(manifest, self.key),
        )
