"""The receipt ledger: per-node chains checked on ingest, one RFC 6962 Merkle tree.

Ingest verifies each envelope with a key the node was certified for (its
current one, or an earlier one for receipts spooled before a re-key) and requires
seq == last + 1 and prev == digest(last). An identical resend of a stored
(node, seq) is de-duplicated (replays after a reconnect are normal); the same
seq with different bytes is a fork and a gap is a lost receipt: both are
refused loudly, never papered over. A batch is appended in one transaction and
acknowledged only after it commits; a keyed tool call's outcome riding with its
receipt completes the call's STARTED record in that same transaction. Large
batches are signature-checked in worker processes (Ed25519 holds the GIL), the
next batch of a stream while the current one commits. Checkpoints (C2SP signed notes) are signed
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
import multiprocessing
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from tether.control.leader import Leadership
from tether.core.clock import Clock, SystemClock
from tether.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    NotOwner,
    StorageError,
    Unavailable,
    VerificationError,
)
from tether.core.receipts import ReceiptKind
from tether.crypto.certs import verify_cert
from tether.crypto.leases import decode_lease
from tether.crypto.manifest import ManifestAccumulator, sign_manifest
from tether.crypto.merkle import (
    consistency_ranges,
    frontier_extend,
    frontier_root,
    inclusion_ranges,
    leaf_hash,
    perfect_hash,
    perfect_parts,
    range_hash,
    stored_of,
)
from tether.crypto.note import CheckpointBody, sign_checkpoint
from tether.crypto.receipts import envelope_digest, parse_statement
from tether.crypto.signing import Envelope, SigningKey, VerifyKey, pae
from tether.store.base import (
    LedgerFrontier,
    LedgerHead,
    LedgerLeaf,
    Store,
    StoredCheckpoint,
    ToolCallPhase,
    ToolCallWrite,
)
from tether.store.common import CONTROL_ENDED_OUTCOMES
from tether.verify.bundle import Bundle, CheckpointInfo, Entry
from tether.verify.verifier import parse_canonical_envelope

log = logging.getLogger("tether.control.ledger")

DEFAULT_ORIGIN = "tether.local/ledger"
MAX_BATCH = 1000
# Batches this large are signature-checked in worker processes; smaller ones
# inline, where a process round trip would cost more latency than it saves.
POOL_MIN_BATCH = 64
# Exports read this many ledger rows per store query, and send entries in pages
# of about this many bytes (well under the 8 MiB gRPC message limit).
EXPORT_PAGE_ROWS = 512
EXPORT_PAGE_BYTES = 1 << 20


class _Checked(NamedTuple):
    """What the append needs of one verified receipt (small, so it pickles fast)."""

    seq: int
    envelope: bytes
    task_id: str
    prev: str
    fencing_token: int
    final: bool = False
    """A task_finished receipt: the holder's own end of its lease."""
    tool_call: ToolCallWrite | None = None
    """The keyed call's outcome that rode with this tool_call receipt."""


class _Refused(NamedTuple):
    """A batch's first bad receipt (exceptions do not cross process boundaries intact)."""

    message: str
    metadata: dict[str, str]

    def error(self) -> VerificationError:
        return VerificationError(self.message, metadata=self.metadata or None)


def _check_batch(
    public_keys: tuple[bytes, ...], node_id: str, batch: Sequence[tuple[int, bytes]]
) -> list[tuple[str, str, int, bool]] | _Refused:
    """Checks each envelope's signature by a key of the node and its receipt (runs in a worker).

    `public_keys`: every key the node was certified for (a chain switches keys
    where the node was re-keyed). Returns each receipt's (task_id, prev), or
    the first bad one, which is what `ingest` reports. The envelopes are not
    sent back: the caller has them.
    """
    keys: dict[str, VerifyKey] = {}
    for raw in public_keys:
        key = _KEYS.get(raw)
        if key is None:
            if len(_KEYS) > 1024:
                _KEYS.clear()
            key = _KEYS[raw] = VerifyKey.from_raw(raw)
        keys[key.keyid] = key
    out: list[tuple[str, str, int, bool]] = []
    for seq, data in batch:
        try:  # what verify_receipt does, with the verifier's faster envelope parser
            env = parse_canonical_envelope(data)
            r = parse_statement(env.payload)
            msg = pae(env.payload_type, env.payload)
            if not any(k in keys and keys[k].verify(s, msg) for k, s in env.signatures):
                raise VerificationError(f"receipt {r.node_id}/{r.seq} is not signed by node key")
        except VerificationError as err:
            return _Refused(f"node {node_id} seq {seq}: {err.message}", {})
        if r.node_id != node_id or r.seq != seq:
            return _Refused(
                f"envelope for seq {seq} is receipt {r.node_id}/{r.seq}", {"seq": str(seq)}
            )
        out.append((r.task_id, r.prev, r.fencing_token, r.kind is ReceiptKind.TASK_FINISHED))
    return out


_KEYS: dict[bytes, VerifyKey] = {}  # parsed node keys, per process


def _carried_outcome(node_id: str, seq: int, envelope: bytes, result: bytes) -> ToolCallWrite:
    """The tool-call record a receipt's carried outcome completes (the receipt is verified).

    Everything but the result comes from the signed receipt; the result must be
    the one whose digest the receipt signs.

    Raises:
        InvalidArgument: the receipt is not a keyed tool call that ran, or the
            result is not the one its result_sha256 names.
    """
    r = parse_statement(parse_canonical_envelope(envelope).payload)
    field = "receipts.tool_call_result"
    if r.kind is not ReceiptKind.TOOL_CALL or not r.idempotency_key or r.status == "replayed":
        raise InvalidArgument(
            field,
            f"node {node_id} seq {seq}: only the tool_call receipt of a keyed call that ran "
            "may carry its outcome",
        )
    if hashlib.sha256(result).hexdigest() != r.result_sha256:
        raise InvalidArgument(
            field,
            f"node {node_id} seq {seq}: the carried outcome is not the result the receipt "
            "signs (result_sha256)",
        )
    return ToolCallWrite(
        task_id=r.task_id,
        fencing_token=r.fencing_token,
        node_id=node_id,
        idempotency_key=r.idempotency_key,
        tool=r.tool,
        arguments_sha256=r.arguments_sha256,
        phase=ToolCallPhase.COMPLETED,
        result=result,
        status=r.status,
        cost_micros=r.cost_micros,
    )


def _with_outcomes(
    node_id: str, checked: list[_Checked], results: Mapping[int, bytes] | None
) -> list[_Checked]:
    """`checked` with the outcomes that rode with their receipts (`_carried_outcome`)."""
    if not results:
        return checked
    out = []
    for c in checked:
        result = results.get(c.seq)
        if result is not None:
            c = c._replace(tool_call=_carried_outcome(node_id, c.seq, c.envelope, result))
        out.append(c)
    return out


def _warm() -> None:
    """A no-op job: done once a worker process has started."""


_NO_HEAD = LedgerHead(0, "", -1)

# A ledger stored before frontiers were kept is caught up this many leaves at a time.
_FRONTIER_CHUNK = 10_000

# A batch whose node head moved underneath (another replica appended) is
# re-checked against the stored head this many times in all.
_APPEND_TRIES = 5


class Ledger:
    """Append-only, verified receipt ledger over the control plane's store.

    Several replicas may share one store: the store serializes leaf index
    assignment and re-checks the node's head inside the append transaction,
    and each replica's view of the tree catches up from the store before it
    signs a checkpoint or answers a proof.

    Constant memory: the ledger holds only the tree's frontier (one hash per
    set bit of its size), which the store keeps current with every append;
    proofs read the O(log n) stored subtree hashes they need on demand
    (`tether.crypto.merkle`, "a tree kept in a database").
    """

    def __init__(
        self,
        store: Store,
        key: SigningKey,
        clock: Clock | None = None,
        origin: str = DEFAULT_ORIGIN,
        workers: int | None = None,
    ) -> None:
        """`workers`: signature-checking processes for large batches (default: CPU count)."""
        self.store = store
        self.key = key
        self.clock: Clock = clock or SystemClock()
        self.origin = origin
        self._lock = asyncio.Lock()  # guards the tree, heads cache and latest checkpoint
        self._size = 0
        self._frontier: tuple[bytes, ...] = ()
        self._heads: dict[str, LedgerHead] = {}
        self._latest: CheckpointInfo | None = None
        self._recorded_certs: set[str] = set()
        self._node_key_cache: dict[str, tuple[bytes, ...]] = {}  # node -> (current, *earlier)
        self._lease_holders: dict[tuple[str, int], str] = {}  # (task, token) -> node
        self._workers = workers if workers is not None else (os.cpu_count() or 1)
        self._executor: ProcessPoolExecutor | None = None
        self._ready: list[Future[None]] = []

    async def open(self) -> None:
        """Loads the stored frontier (O(log n)) and the latest checkpoint.

        A ledger stored before the frontier was kept is caught up once here,
        reading its leaf hashes in bounded chunks.
        """
        async with self._lock:
            await self._catch_up()

    @property
    def size(self) -> int:
        return self._size

    async def _load_checkpoint(self) -> None:
        """Adopts the store's latest checkpoint if it is newer (another replica signed it)."""
        cp = await self.store.latest_checkpoint()
        if cp is None or cp.tree_size > self._size:
            return
        if self._latest is None or cp.tree_size > self._latest.tree_size:
            self._latest = CheckpointInfo(
                self.origin, cp.tree_size, cp.root_hash, cp.timestamp_unix_ms, cp.note
            )

    async def _catch_up(self) -> None:
        """Adopts the stored frontier, which covers what other writers appended (under the lock)."""
        f = await self.store.ledger_frontier()
        while f.tree_size < f.leaves:  # stored before frontiers were kept: advance it
            chunk = await self.store.ledger_leaf_hashes(f.tree_size, _FRONTIER_CHUNK)
            hashes, done = frontier_extend(f.tree_size, f.hashes, chunk)
            size = f.tree_size + len(chunk)
            await self.store.ledger_advance_frontier(
                f.tree_size, LedgerFrontier(size, tuple(hashes), size), done
            )
            f = await self.store.ledger_frontier()  # ours, or another replica's progress
        if f.tree_size > self._size:
            self._size, self._frontier = f.tree_size, f.hashes
        await self._load_checkpoint()

    async def _proof(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The hashes of leaf ranges (proof order), from O(log n) stored subtree hashes."""
        return (await self._proofs([ranges]))[0]

    async def _proofs(self, many: Sequence[Sequence[tuple[int, int]]]) -> list[list[bytes]]:
        """`_proof` of several range lists, reading the stored hashes they need at once."""
        parts = {r: perfect_parts(*r) for ranges in many for r in ranges}
        want: dict[int, set[int]] = {}
        for height, index in {p for ps in parts.values() for p in ps}:
            base, first, count = stored_of(height, index)
            want.setdefault(base, set()).update(range(first, first + count))
        got: dict[tuple[int, int], bytes] = {}
        for base, indexes in want.items():
            found = await self.store.ledger_nodes(base, sorted(indexes))
            if len(found) != len(indexes):
                missing = min(indexes - set(found))
                raise StorageError(f"ledger subtree {base}/{missing} is missing from the store")
            got.update(((base, i), h) for i, h in found.items())
        memo: dict[tuple[int, int], bytes] = {}

        def subtree(height: int, index: int) -> bytes:
            h = memo.get((height, index))
            if h is None:
                base, first, count = stored_of(height, index)
                h = perfect_hash([got[(base, i)] for i in range(first, first + count)])
                memo[(height, index)] = h
            return h

        return [[range_hash([subtree(*p) for p in parts[r]]) for r in ranges] for ranges in many]

    async def _with_proofs(self, page: list[Entry], size: int) -> list[Entry]:
        """The page's entries with their inclusion proofs in a tree of `size` (one read pass)."""
        proofs = await self._proofs([inclusion_ranges(e.leaf_index, size) for e in page])
        return [
            Entry.of(e.envelope, e.leaf_index, e.leaf_index, size, proof)
            for e, proof in zip(page, proofs, strict=True)
        ]

    async def record_certificate(self, node_id: str, certificate: Envelope | bytes) -> None:
        """Keeps a certificate issued to `node_id` (idempotent), for later exports."""
        data = certificate if isinstance(certificate, bytes) else certificate.to_json_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._recorded_certs:
            return
        await self.store.put_node_certificate(node_id, digest, data, self.clock.now_ms())
        self._recorded_certs.add(digest)

    async def _certificates(self, node_id: str) -> list[Envelope]:
        """Every certificate the node had, oldest first (the current one included)."""
        datas = await self.store.node_certificates(node_id)
        rec = await self.store.get_node(node_id)
        if rec is not None and rec.certificate not in datas:
            datas.append(rec.certificate)
        return [Envelope.from_json_bytes(d) for d in datas]

    async def _node_keys(self, node_id: str, current: bytes) -> tuple[bytes, ...]:
        """The node's current key, then every earlier key a certificate of ours bound to it.

        Receipts spooled before an operator re-keyed the node are signed by its
        earlier key and must still be ingested. Only certificates that verify
        under this control plane's key count. Cached per node until its
        current key changes (a re-key, here or on another replica).
        """
        cached = self._node_key_cache.get(node_id)
        if cached is not None and cached[0] == current:
            return cached
        keys = [current]
        trusted = {self.key.keyid: self.key.public}
        for env in await self._certificates(node_id):
            try:
                cert = verify_cert(env, trusted)
            except VerificationError as err:  # e.g. issued under a rotated-out control key
                log.debug("node certificate skipped: %s", err.message, extra={"node_id": node_id})
                continue
            if cert.node_id == node_id and cert.public_key not in keys:
                keys.append(cert.public_key)
        self._node_key_cache[node_id] = got = tuple(keys)
        return got

    async def _head(self, node_id: str) -> tuple[LedgerHead, bool]:
        """The node's head and whether it came from the cache (maybe stale: replicas)."""
        head = self._heads.get(node_id)
        if head is not None:
            return head, True
        head = await self.store.ledger_head(node_id) or _NO_HEAD
        self._heads[node_id] = head
        return head, False

    async def ingest(
        self,
        node_id: str,
        batch: Sequence[tuple[int, bytes]],
        results: Mapping[int, bytes] | None = None,
    ) -> tuple[int, int]:
        """Verifies and appends one batch of a node's envelopes (in seq order).

        Returns (acked_seq, ledger_index of that receipt): every receipt of the
        node up to acked_seq is durable when this returns.

        `results`: {seq: redacted result} of keyed tool calls whose outcome rode
        with their tool_call receipt; the append completes each call's STARTED
        record in the same transaction (see `_carried_outcome`).

        Raises:
            NotFound: the node is not enrolled.
            VerificationError: a bad signature, or a receipt naming another node or seq.
            AlreadyExists: a fork (a stored seq with different bytes).
            InvalidArgument: a gap or a broken prev link, or an oversized batch.
            Unavailable: other writers kept appending for this node (retry).
        """
        return await self._commit(node_id, await self._verify(node_id, batch, results))

    async def ingest_stream(
        self,
        batches: AsyncIterator[tuple[str, Sequence[tuple[int, bytes]], Mapping[int, bytes]]],
    ) -> AsyncIterator[tuple[int, int]]:
        """`ingest` for a stream of (node_id, batch, results): yields each batch's ack in order.

        Pipelined: the next batch is read and its signatures are checked (in
        the worker processes) while this one is appended and committed. Each
        ack still comes only after its batch committed, and an error in a
        later batch (or in reading it) is raised only after the earlier ones
        were acknowledged, exactly as with one `ingest` after another.
        """

        async def verify_next() -> tuple[str, list[_Checked]] | None:
            try:
                node_id, batch, results = await anext(batches)
            except StopAsyncIteration:
                return None
            return node_id, await self._verify(node_id, batch, results)

        pending = asyncio.ensure_future(verify_next())
        try:
            while True:
                verified = await pending
                if verified is None:
                    return
                pending = asyncio.ensure_future(verify_next())
                yield await self._commit(*verified)
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def _verify(
        self,
        node_id: str,
        batch: Sequence[tuple[int, bytes]],
        results: Mapping[int, bytes] | None = None,
    ) -> list[_Checked]:
        """The checks of one batch that need no chain state: node, signatures, receipts."""
        if not batch:
            raise InvalidArgument("receipts", "batch is empty")
        if len(batch) > MAX_BATCH:
            raise InvalidArgument("receipts", f"at most {MAX_BATCH} receipts per batch")
        rec = await self.store.get_node(node_id)
        if rec is None:
            raise NotFound(f"node {node_id!r} is not enrolled")
        await self.record_certificate(node_id, rec.certificate)
        keys = await self._node_keys(node_id, rec.public_key)
        batch = list(batch)
        workers = self._workers
        pool = self._pool() if len(batch) >= POOL_MIN_BATCH and workers > 1 else None
        if pool is None:
            got = _check_batch(keys, node_id, batch)
            if isinstance(got, _Refused):
                raise got.error()
            checked = [_Checked(s, d, *facts) for (s, d), facts in zip(batch, got, strict=True)]
            await self._check_leases(node_id, checked)
            return _with_outcomes(node_id, checked, results)
        # Ed25519 holds the GIL: check in worker processes, split so each core
        # takes a part, while the event loop serves other calls (or commits).
        loop = asyncio.get_running_loop()
        step = -(-len(batch) // workers)
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(pool, _check_batch, keys, node_id, batch[i : i + step])
                for i in range(0, len(batch), step)
            )
        )
        facts: list[tuple[str, str, int, bool]] = []
        for got in parts:  # in batch order: the first bad receipt is the one reported
            if isinstance(got, _Refused):
                raise got.error()
            facts += got
        checked = [_Checked(s, d, *f) for (s, d), f in zip(batch, facts, strict=True)]
        await self._check_leases(node_id, checked)
        return _with_outcomes(node_id, checked, results)

    async def _check_leases(self, node_id: str, checked: Sequence[_Checked]) -> None:
        """Each receipt must be about a lease the control plane granted to `node_id`.

        A node may only speak for tasks it held: receipts naming another node's
        task (or a made-up one) would put that task's export beyond verification
        for good, since the ledger is append-only.

        Raises:
            NotOwner: a receipt names a (task, fencing token) never leased to the node.
        """
        for c in checked:
            key = (c.task_id, c.fencing_token)
            holder = self._lease_holders.get(key)
            if holder is None:
                raw = await self.store.lease_envelope(c.task_id, c.fencing_token)
                holder = (
                    ""
                    if raw is None
                    else decode_lease(Envelope.from_json_bytes(raw).payload).node_id
                )
                if holder:
                    if len(self._lease_holders) > 100_000:
                        self._lease_holders.clear()
                    self._lease_holders[key] = holder
            if holder != node_id:
                raise NotOwner(
                    f"node {node_id} seq {c.seq}: the receipt names task {c.task_id} with "
                    f"fencing token {c.fencing_token}, which was never leased to this node",
                    metadata={"seq": str(c.seq)},
                )
            if c.final:
                await self._check_holder_end(node_id, c)

    @staticmethod
    def _second_end(node_id: str, c: _Checked) -> InvalidArgument:
        return InvalidArgument(
            "receipts",
            f"node {node_id} seq {c.seq}: a second task_finished for task {c.task_id} under "
            f"fencing token {c.fencing_token}, a lease its holder already ended",
        )

    async def _check_one_end(self, node_id: str, c: _Checked, new: Sequence[_Checked]) -> None:
        """One task_finished per lease: neither the ledger nor the rest of the batch being
        appended (`new`) holds another for its (task, token).

        A second end (a hostile node, or a sidecar that signed its end twice) would
        give the lease two ends on the append-only ledger and the task's export
        would never verify again. Checked in the append (one at a time), so an end
        in the batch committing meanwhile is seen; identical resends were already
        de-duplicated.

        Raises:
            InvalidArgument: another task_finished for the lease is stored or in `new`.
        """
        if any(x.final and (x.task_id, x.fencing_token) == (c.task_id, c.fencing_token)
               for x in new):  # fmt: skip
            raise self._second_end(node_id, c)
        after = -1
        while True:
            page = await self.store.ledger_export_page([c.task_id], after, 1 << 62, 1000)
            for entry in page:
                r = parse_statement(parse_canonical_envelope(entry.envelope).payload)
                if r.kind is ReceiptKind.TASK_FINISHED and r.fencing_token == c.fencing_token:
                    raise self._second_end(node_id, c)
            if len(page) < 1000:
                return
            after = page[-1].leaf_index

    async def _check_holder_end(self, node_id: str, c: _Checked) -> None:
        """A task_finished receipt only for a lease its holder's own transition ended.

        An honest sidecar signs it after the control plane applied the final
        transition. Under a lease the control plane ended itself (canceled, lapsed,
        timed out) it can only come from a stale or hostile holder, and would give
        that lease two ends on the append-only ledger: the task's export would never
        verify again.

        Raises:
            NotOwner: the lease under the receipt's token was ended by the control
                plane.
        """
        outcomes = [
            h.outcome
            for h in await self.store.lease_history(c.task_id)
            if h.fencing_token == c.fencing_token
        ]
        if outcomes and outcomes[-1] in CONTROL_ENDED_OUTCOMES:
            raise NotOwner(
                f"node {node_id} seq {c.seq}: task_finished for task {c.task_id} under "
                f"fencing token {c.fencing_token}, a lease the control plane ended "
                f"({outcomes[-1]}); the holder never finished it",
                metadata={"seq": str(c.seq)},
            )

    def _pool(self) -> ProcessPoolExecutor | None:
        """The signature-checking processes, or None while they start (check inline then).

        Started on the first large batch, so a control plane that only sees
        small batches never runs them; their start-up (imports, about 0.3 s)
        does not stall the batches that come meanwhile.
        """
        if self._executor is None:
            # spawn, not fork: this process runs gRPC threads that fork would copy.
            ctx = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(max_workers=self._workers, mp_context=ctx)
            self._ready = [self._executor.submit(_warm) for _ in range(self._workers)]
        if not all(f.done() for f in self._ready):
            return None
        return self._executor

    def close(self) -> None:
        """Stops the signature-checking processes, if any were started."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _commit(self, node_id: str, parsed: list[_Checked]) -> tuple[int, int]:
        """Appends a verified batch against the node's chain, in one transaction."""
        async with self._lock:
            for _ in range(_APPEND_TRIES):
                acked = await self._append(node_id, parsed)
                if acked is not None:
                    return acked
                # Another writer appended for this node: judge the batch again.
                self._heads.pop(node_id, None)
        raise Unavailable(f"ledger: node {node_id} chain kept moving during the append; retry")

    async def _append(self, node_id: str, parsed: list[_Checked]) -> tuple[int, int] | None:
        """One try of `ingest`; None if the stored head moved or the cached one may be stale."""
        head, cached = await self._head(node_id)
        dup_seqs = [c.seq for c in parsed if c.seq <= head.seq]
        old = await self.store.ledger_envelopes(node_id, dup_seqs) if dup_seqs else {}
        last_seq, last_digest = head.seq, head.digest
        new: list[LedgerLeaf] = []
        ends: list[_Checked] = []  # the task_finished receipts among `new`
        ack_index = head.leaf_index
        for r in parsed:
            seq, data = r.seq, r.envelope
            if seq <= last_seq:
                have = old.get(seq)
                if have is None:  # repeated inside this batch
                    have = next(((x.envelope, -1) for x in new if x.seq == seq), (b"", -1))
                if have[0] != data:
                    log.error(
                        "receipt fork refused",
                        extra={"node_id": node_id, "seq": seq, "task_id": r.task_id},
                    )
                    raise AlreadyExists(
                        f"fork: node {node_id} seq {seq} is already stored with different bytes",
                        metadata={"node_id": node_id, "seq": str(seq)},
                    )
                continue  # identical resend: de-duplicated
            if cached and (seq != last_seq + 1 or r.prev != last_digest):
                return None  # another replica may have appended: judge on the stored head
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
            if r.final:
                await self._check_one_end(node_id, r, ends)
                ends.append(r)
            digest = envelope_digest(data)
            new.append(LedgerLeaf(seq, r.task_id, data, leaf_hash(data), digest, r.tool_call))
            last_seq, last_digest = seq, digest
        if new:
            expect = None if head.leaf_index < 0 else head
            indexes = await self.store.ledger_append(node_id, expect, new, self.clock.now_ms())
            if indexes is None:
                return None
            if indexes[0] == self._size:  # the same extension the store just made
                hashes, _ = frontier_extend(
                    self._size, self._frontier, [leaf.leaf_hash for leaf in new]
                )
                self._size, self._frontier = self._size + len(new), tuple(hashes)
            else:  # other replicas appended in between: load theirs and ours
                await self._catch_up()
            ack_index = indexes[-1]
            self._heads[node_id] = LedgerHead(last_seq, last_digest, ack_index)
        max_seq = max(c.seq for c in parsed)
        if max_seq != last_seq or not new:
            # The ack names the highest seq of the batch, all of it durable.
            got = await self.store.ledger_envelopes(node_id, [max_seq])
            ack_index = got[max_seq][1] if max_seq in got else ack_index
        return max_seq, ack_index

    async def checkpoint(self, fresh: bool = False) -> CheckpointInfo:
        """The latest signed checkpoint; signs a new one if asked or if there is none.

        Leaves and checkpoints other replicas stored are loaded first, so the
        checkpoint covers every leaf committed before the call.
        """
        async with self._lock:
            await self._catch_up()
            cp = self._latest
            if cp is not None and (not fresh or cp.tree_size == self._size):
                return cp
            return await self._sign()

    async def _sign(self) -> CheckpointInfo:
        size = self._size
        root = frontier_root(self._frontier)
        now = self.clock.now_ms()
        note = sign_checkpoint(CheckpointBody(self.origin, size, root), self.key)
        await self.store.put_checkpoint(StoredCheckpoint(size, root, now, note))
        self._latest = cp = CheckpointInfo(self.origin, size, root, now, note)
        return cp

    async def run_checkpointer(
        self, stop: asyncio.Event, interval_s: float = 10.0, leader: Leadership | None = None
    ) -> None:
        """Signs a checkpoint every `interval_s` while the tree grew, until `stop`.

        The tree includes what other replicas appended; one a replica already
        signed for the same size is reused. A failed signing is logged and
        retried at the next tick, never fatal. With `leader`, only the replica
        leading the "checkpointer" job signs on schedule.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return
            if leader is not None and not leader.is_leader():
                continue
            try:
                async with self._lock:
                    await self._catch_up()
                    latest = self._latest
                    if latest is not None and latest.tree_size == self._size:
                        continue
                    if leader is not None and not leader.is_leader():
                        continue  # the term ran out while catching up
                    cp = await self._sign()
            except Exception as err:
                log.error("scheduled checkpoint failed: %r", err)
                continue
            log.info(
                "checkpoint signed",
                extra={
                    "tree_size": cp.tree_size,
                    # Taken right after the term check, before signing (no await between).
                    "signed_unix_ms": cp.timestamp_unix_ms,
                    "replica": leader.holder if leader else "",
                    "epoch": leader.epoch if leader else 0,
                },
            )

    async def inclusion_proof(self, leaf_index: int, tree_size: int = 0) -> tuple[int, list[bytes]]:
        """(tree size, audit path) for a leaf; size 0 means the latest checkpoint's.

        Raises:
            InvalidArgument: the index or size is out of range.
        """
        if tree_size == 0 or tree_size > self._size:
            async with self._lock:
                await self._catch_up()
        size = tree_size or (self._latest.tree_size if self._latest else self._size)
        if not 0 <= leaf_index < size <= self._size:
            raise InvalidArgument("leaf_index", f"{leaf_index} is not in a tree of size {size}")
        return size, await self._proof(inclusion_ranges(leaf_index, size))

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between two tree sizes.

        Raises:
            InvalidArgument: sizes out of order or beyond the tree.
        """
        if second > self._size:
            async with self._lock:
                await self._catch_up()
        if not 0 < first <= second <= self._size:
            raise InvalidArgument("first_size", f"need 0 < {first} <= {second} <= {self._size}")
        return await self._proof(consistency_ranges(first, second))

    async def export_stream(
        self,
        task_ids: Sequence[str] = (),
        since_unix_ms: int = 0,
        previous_tree_size: int = 0,
    ) -> AsyncIterator[ExportPart]:
        """A self-contained bundle as pages in file order, read from the store page by page.

        Selection: with `task_ids`, a per-task export holding those tasks'
        receipts and no other (the signed manifest lists exactly which (node,
        seq) they are); else whole node chains (seq 1 to the last receipt
        stored since `since_unix_ms`, or everything). Every entry carries its
        inclusion proof against a checkpoint signed first, whose tree size
        bounds every read, so receipts appended meanwhile are simply not in
        this export. Memory holds one page plus the manifest's facts (per node
        its last seq and task ids; in a per-task export, its seqs).
        `previous_tree_size` puts a consistency proof from that size into the
        manifest.

        Raises:
            InvalidArgument: `previous_tree_size` is beyond the tree.
        """
        cp = await self.checkpoint(fresh=True)  # caught up: covers every leaf read below
        size = cp.tree_size
        if previous_tree_size > size:
            raise InvalidArgument(
                "previous_tree_size",
                f"{previous_tree_size} is beyond the ledger's tree size {size}",
            )
        consistency = (
            await self._proof(consistency_ranges(previous_tree_size, size))
            if 0 < previous_tree_size < size
            else []
        )
        tasks = sorted(set(task_ids))
        heads = None if tasks else await self.store.ledger_export_heads(since_unix_ms, size)
        acc = ManifestAccumulator(tasks)
        nodes: set[str] = set()
        with_receipts: set[str] = set()
        after = -1
        while heads is None or heads:
            rows = await self.store.ledger_export_page(tasks, after, size, EXPORT_PAGE_ROWS)
            if not rows:
                break
            after = rows[-1].leaf_index
            page: list[Entry] = []
            page_bytes = 0
            for e in rows:
                if heads is not None and e.seq > heads.get(e.node_id, 0):
                    continue  # a node outside the selection, or past its selected head
                acc.add(e.node_id, e.seq, e.task_id, envelope_digest(e.envelope))
                nodes.add(e.node_id)
                with_receipts.add(e.task_id)
                i = e.leaf_index
                page.append(Entry.of(e.envelope, i, i, size, []))
                page_bytes += len(e.envelope) + 1024
                if page_bytes >= EXPORT_PAGE_BYTES:
                    yield ExportPart(entries=await self._with_proofs(page, size))
                    page, page_bytes = [], 0
            if page:
                yield ExportPart(entries=await self._with_proofs(page, size))
        for node in sorted(nodes):
            yield ExportPart(node_certificates=await self._certificates(node))
        # A per-task export carries its tasks' leases even without node receipts:
        # a lease that lapsed before its holder signed anything is named by a
        # control receipt, which needs the lease. Whole chains: tasks is empty.
        for task in sorted(with_receipts | set(tasks)):
            history = await self.store.lease_history(task)
            for k in range(0, len(history), EXPORT_PAGE_ROWS):
                yield ExportPart(
                    leases=[
                        Envelope.from_json_bytes(h.envelope)
                        for h in history[k : k + EXPORT_PAGE_ROWS]
                    ]
                )
        # Control receipts (how leases and tasks ended without a node) are few per
        # task: they travel in the trailer.
        ends: list[Envelope] = []
        for task in sorted(with_receipts | set(tasks)):
            ends += [Envelope.from_json_bytes(d) for d in await self.store.control_receipts(task)]
        now = self.clock.now_ms()
        manifest = acc.manifest(
            cp.origin, size, cp.root_hash, now, previous_tree_size, consistency, ends
        )
        yield ExportPart(
            trailer=Bundle(
                entries=[],
                node_certificates=[],
                leases=[],
                checkpoint=cp,
                control_keyids=[self.key.keyid],
                exported_unix_ms=now,
                manifest=sign_manifest(manifest, self.key),
                control_receipts=ends,
            )
        )

    async def export(
        self,
        task_ids: Sequence[str] = (),
        since_unix_ms: int = 0,
        previous_tree_size: int = 0,
    ) -> Bundle:
        """`export_stream` gathered into one bundle in memory (small exports and tests)."""
        entries: list[Entry] = []
        certs: list[Envelope] = []
        leases: list[Envelope] = []
        trailer: Bundle | None = None
        async for part in self.export_stream(task_ids, since_unix_ms, previous_tree_size):
            entries += part.entries
            certs += part.node_certificates
            leases += part.leases
            trailer = part.trailer or trailer
        assert trailer is not None  # export_stream always ends with one
        trailer.entries, trailer.node_certificates, trailer.leases = entries, certs, leases
        return trailer


@dataclass(frozen=True)
class ExportPart:
    """One page of an export, in file order; exactly one of the fields is set."""

    entries: list[Entry] = field(default_factory=list)
    node_certificates: list[Envelope] = field(default_factory=list)
    leases: list[Envelope] = field(default_factory=list)
    trailer: Bundle | None = None
    """The last part: the bundle without its entries, certificates and leases."""
