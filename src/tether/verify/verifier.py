"""Offline bundle verification: a pure function of a bundle and trusted keys.

Every check has a stable name (see `CHECKS`) so tools and tests can tell what
failed. All failures are collected, not only the first, and reported in
bundle order. The verifier rejects by default: no trusted key, no checkpoint,
no certificate, no lease or no final receipt is a failure, never a pass.

Speed: a 100,000-receipt bundle is dominated by Ed25519 verification, which
does NOT release the GIL (cryptography 42+, measured: two threads verify no
faster than one), so large bundles have their receipt signatures checked in
a pool of worker processes, one per core, fed in chunks while the main
thread parses; small bundles are checked inline, where a pool's start-up
would cost more than it saves. Inclusion proofs share the work of their
common upper nodes through a memo of authenticated subtree hashes.
"""

from __future__ import annotations

import binascii
import gc
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tether.core.errors import VerificationError
from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.certs import NodeCertificate, verify_cert
from tether.crypto.leases import verify_lease
from tether.crypto.manifest import ExportManifest, verify_manifest
from tether.crypto.note import CheckpointBody, verify_checkpoint
from tether.crypto.receipts import parse_statement
from tether.crypto.signing import INTOTO_PAYLOAD_TYPE, Envelope, VerifyKey, pae
from tether.verify.bundle import Bundle, BundleFormatError, decode_bundle

CHECKS: dict[str, str] = {
    "bundle.format": "the file is a well-formed version-1 bundle",
    "checkpoint": "the checkpoint note is signed by a trusted control key and matches its fields",
    "manifest": "the export manifest is signed by a trusted control key, names the bundle's "
    "checkpoint, and for every node gives the bundle's last seq, that envelope's digest and "
    "the task ids (so no receipt was cut from the end of a chain)",
    "certificate": "every node certificate is signed by a trusted control key; each receipt "
    "has a certificate for its node, valid at the receipt's time",
    "lease.signature": "every lease is signed by a trusted control key",
    "envelope.format": "each entry is a canonical compact DSSE JSON envelope of an in-toto payload",
    "signature": "each receipt is signed by the certified key of the node it names",
    "receipt.format": "each payload is a valid Tether receipt statement",
    "inclusion": "each entry's inclusion proof leads to the checkpoint's root",
    "bundle.order": "entries are in strictly increasing ledger order",
    "chain.gap": "each node's receipts hold every seq from 1 to the last",
    "chain.fork": "no seq appears twice with different bytes",
    "chain.duplicate": "no envelope appears twice",
    "chain.order": "bundle order agrees with each node's seq order",
    "chain.prev": "each receipt's prev is the digest of its node's previous envelope",
    "lease.missing": "each receipt has a signed lease with its task and fencing token",
    "lease.executor": "each receipt's node, agent and attempt are the lease holder's",
    "lease.window": "each action happened inside a window of its lease",
    "task.final": "each task has exactly one task_finished receipt",
}
_RANK = {name: i for i, name in enumerate(CHECKS)}

# Kinds that need not lie inside the lease window: the node learns of a lost
# lease after the fact.
_WINDOW_EXEMPT = frozenset({ReceiptKind.LEASE_LOST})
_SIG_CHUNK = 1024  # signatures per job sent to a worker process
_POOL_MIN_ENTRIES = 4096  # below this a pool's start-up (~0.1 s) costs more than it saves


@dataclass(frozen=True)
class Failure:
    """One thing that is wrong: which check, where (receipt ref), and why."""

    check: str
    ref: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "ref": self.ref, "why": self.why}

    def __str__(self) -> str:
        return f"{self.ref}: {self.check}: {self.why}"


@dataclass(frozen=True)
class Event:
    """One receipt as a line of a task's timeline."""

    time_unix_ms: int
    ref: str
    kind: str
    detail: str


@dataclass
class TaskReport:
    """A task's receipts in time order and its final state, if any."""

    task_id: str
    events: list[Event] = field(default_factory=list)
    final_state: str = ""


@dataclass
class Report:
    """The verifier's verdict: valid when `failures` is empty."""

    failures: list[Failure]
    entries: int = 0
    nodes: int = 0
    tasks: list[TaskReport] = field(default_factory=list)
    origin: str = ""
    tree_size: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def checks_failed(self) -> set[str]:
        """Names of the checks that failed."""
        return {f.check for f in self.failures}

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (the CLI's --json)."""
        return {
            "valid": self.ok,
            "entries": self.entries,
            "nodes": self.nodes,
            "tasks": [
                {
                    "task_id": t.task_id,
                    "final_state": t.final_state,
                    "events": [
                        {
                            "time_unix_ms": e.time_unix_ms,
                            "ref": e.ref,
                            "kind": e.kind,
                            "detail": e.detail,
                        }
                        for e in t.events
                    ],
                }
                for t in self.tasks
            ],
            "checkpoint": {"origin": self.origin, "tree_size": self.tree_size},
            "failures": [f.to_dict() for f in self.failures],
            "seconds": round(self.seconds, 3),
        }


def _ref(r: Receipt) -> str:
    return f"{r.node_id}#{r.seq}"


@dataclass
class _Item:
    """A parsed entry."""

    index: int
    receipt: Receipt
    envelope: bytes
    digest: str


class _Inclusion:
    """Checks inclusion proofs against one root, memoizing authenticated subtrees.

    Keys are leaf ranges (lo, hi); values are the subtree hash and the rest of
    the audit path above it. Once a proof verified, every node on its path and
    every sibling in it is authenticated, and the path above a node is fixed by
    the tree; so a later proof stops hashing when it meets a known node, and its
    remaining hashes must equal the known path (one tuple comparison), which
    keeps every byte of every proof checked.
    """

    def __init__(self, size: int, root: bytes) -> None:
        self.size = size
        self.memo: dict[tuple[int, int], tuple[bytes, tuple[str, ...]]] = {(0, size): (root, ())}

    def check(self, leaf: bytes, index: int, proof: tuple[str, ...]) -> str:
        """Returns "" when the proof (canonical base64 hashes) holds, else why not."""
        size = self.size
        if not 0 <= index < size:
            return f"leaf index {index} is outside the tree of size {size}"
        memo = self.memo
        known = memo.get((index, index + 1))
        if known is not None:
            return "" if known == (leaf, proof) else "proof disagrees with the checkpoint's tree"
        fn, sn, k = index, size - 1, 0
        lo, hi = index, index + 1
        r = leaf
        learned: list[tuple[tuple[int, int], tuple[bytes, tuple[str, ...]]]] = [
            ((lo, hi), (leaf, proof))
        ]
        sha = hashlib.sha256
        a2b, b2a = binascii.a2b_base64, binascii.b2a_base64
        for j, p64 in enumerate(proof):
            if sn == 0:
                return "proof is too long"
            p = a2b(p64)
            rest = proof[j + 1 :]
            sib = (p, (b2a(r, newline=False).decode(), *rest))
            if fn & 1 or fn == sn:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
                    k += 1
                learned.append(((lo - (1 << k), lo), sib))
                r = sha(b"\x01" + p + r).digest()
                lo -= 1 << k
            else:
                nhi = min(hi + (1 << k), size)
                learned.append(((hi, nhi), sib))
                r = sha(b"\x01" + r + p).digest()
                hi = nhi
            fn >>= 1
            sn >>= 1
            k += 1
            known = memo.get((lo, hi))
            if known is not None:
                if known != (r, rest):
                    return "proof does not lead to the checkpoint root"
                memo.update(learned)
                return ""
            learned.append(((lo, hi), (r, rest)))
        if sn != 0:
            return "proof is too short"
        # Only a one-leaf tree ends here without meeting the root's memo entry.
        if (lo, hi) != (0, size) or r != memo[(0, size)][0]:
            return "proof does not lead to the checkpoint root"
        memo.update(learned)
        return ""


_WORKER_KEYS: dict[bytes, VerifyKey] = {}


def _verify_chunk(jobs: list[tuple[int, bytes, bytes, bytes]]) -> list[int]:
    """Returns the entry indexes whose signature fails (runs in a worker process).

    Jobs carry raw public keys (picklable); each worker caches the parsed keys.
    """
    bad = []
    for i, raw, sig, msg in jobs:
        key = _WORKER_KEYS.get(raw)
        if key is None:
            key = _WORKER_KEYS[raw] = VerifyKey.from_raw(raw)
        if not key.verify(sig, msg):
            bad.append(i)
    return bad


class _Inline(Executor):
    """Runs jobs at submit time: the executor for small bundles or one core."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # pragma: no cover - _verify_chunk does not raise
            fut.set_exception(err)
        return fut


_CANONICAL_ONE_SIG = re.compile(
    rb'\{"payload":"([A-Za-z0-9+/=]*)","payloadType":"application/vnd\.in-toto\+json",'
    rb'"signatures":\[\{"keyid":"([0-9a-f]{64})","sig":"([A-Za-z0-9+/=]*)"\}\]\}'
)


def _parse_envelope(data: bytes) -> Envelope:
    """Envelope.from_json_bytes plus the canonical-form and payload-type checks."""
    m = _CANONICAL_ONE_SIG.fullmatch(data)
    if m is not None:  # the common case, without a JSON parse and re-encode
        try:
            payload = binascii.a2b_base64(m[1], strict_mode=True)
            sig = binascii.a2b_base64(m[3], strict_mode=True)
        except binascii.Error as err:
            raise VerificationError(f"malformed DSSE envelope: {err}") from err
        if (
            binascii.b2a_base64(payload, newline=False) != m[1]
            or binascii.b2a_base64(sig, newline=False) != m[3]
        ):
            raise VerificationError("envelope is not in canonical compact DSSE JSON form")
        return Envelope(payload, INTOTO_PAYLOAD_TYPE, ((m[2].decode(), sig),))
    env = Envelope.from_json_bytes(data)
    if env.to_json_bytes() != data:
        raise VerificationError("envelope is not in canonical compact DSSE JSON form")
    if env.payload_type != INTOTO_PAYLOAD_TYPE:
        raise VerificationError(f"payload type {env.payload_type!r} is not in-toto")
    return env


def verify_bundle(
    bundle: Bundle | bytes,
    trusted: Sequence[VerifyKey],
    *,
    allow_open: bool = False,
    threads: int | None = None,
) -> Report:
    """Verifies a bundle offline against trusted control-plane keys.

    Args:
        bundle: a parsed bundle or the bundle file's bytes.
        trusted: control-plane public keys; certificates, leases and the
            checkpoint must be signed by one of them.
        allow_open: accept tasks without a task_finished receipt (still running).
        threads: signature-checking worker processes (default: CPU count, at
            most 4, for bundles of 4,096 entries or more; 1 checks inline).

    Raises:
        ValueError: no trusted key was given (rejecting by default).
    """
    if not trusted:
        raise ValueError("at least one trusted control-plane key is required")
    started = time.perf_counter()
    # Millions of small, acyclic objects: cyclic GC passes would only cost time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _verify(bundle, trusted, allow_open, threads, started)
    finally:
        if gc_was_enabled:
            gc.enable()


def _verify(
    bundle: Bundle | bytes,
    trusted: Sequence[VerifyKey],
    allow_open: bool,
    threads: int | None,
    started: float,
) -> Report:
    if isinstance(bundle, bytes | bytearray):
        try:
            bundle = decode_bundle(bytes(bundle))
        except BundleFormatError as err:
            return Report([Failure("bundle.format", "bundle", err.message)])
    if not bundle.entries:
        # Reject by default: "nothing to check" must never read as "valid".
        return Report([Failure("bundle.format", "bundle", "bundle holds no receipts")])
    v = _Verifier(bundle, {k.keyid: k for k in trusted}, allow_open)
    workers = threads or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(bundle.entries) < _POOL_MIN_ENTRIES:
        v.run(_Inline())
    else:
        # spawn, not fork: the caller may hold threads (gRPC, pytest) that fork would copy.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            v.run(pool)
    report = v.report()
    report.seconds = time.perf_counter() - started
    return report


class _Verifier:
    def __init__(self, bundle: Bundle, keys: dict[str, VerifyKey], allow_open: bool) -> None:
        self.b = bundle
        self.keys = keys
        self.allow_open = allow_open
        self.failures: list[tuple[int, Failure]] = []  # (sort position, failure)
        self.items: list[_Item] = []
        self.checkpoint: CheckpointBody | None = None

    def fail(self, pos: int, check: str, ref: str, why: str) -> None:
        self.failures.append((pos, Failure(check, ref, why)))

    # -- top-level objects --------------------------------------------------

    def _checkpoint(self) -> _Inclusion | None:
        cp = self.b.checkpoint
        if cp is None:
            self.fail(-3, "checkpoint", "checkpoint", "bundle has no checkpoint")
            return None
        try:
            body = verify_checkpoint(cp.note, list(self.keys.values()))
        except VerificationError as err:
            self.fail(-3, "checkpoint", "checkpoint", err.message)
            return None
        self.checkpoint = body
        bad = [
            name
            for name, a, b in (
                ("origin", cp.origin, body.origin),
                ("tree_size", cp.tree_size, body.tree_size),
                ("root_hash", cp.root_hash, body.root_hash),
            )
            if a != b
        ]
        if bad:
            self.fail(
                -3, "checkpoint", "checkpoint", f"{', '.join(bad)} differ from the signed note"
            )
            return None
        return _Inclusion(body.tree_size, body.root_hash)

    def _certificates(self) -> dict[str, list[NodeCertificate]]:
        certs: dict[str, list[NodeCertificate]] = defaultdict(list)
        for i, env in enumerate(self.b.node_certificates):
            try:
                cert = verify_cert(env, self.keys)
            except VerificationError as err:
                self.fail(-2, "certificate", f"certificate[{i}]", err.message)
                continue
            certs[cert.node_id].append(cert)
        return certs

    def _leases(self) -> dict[tuple[str, int], list[Lease]]:
        leases: dict[tuple[str, int], list[Lease]] = defaultdict(list)
        for i, env in enumerate(self.b.leases):
            try:
                lease = verify_lease(env, self.keys)
            except VerificationError as err:
                self.fail(-1, "lease.signature", f"lease[{i}]", err.message)
                continue
            leases[(lease.task_id, lease.fencing_token)].append(lease)
        return leases

    # -- entries --------------------------------------------------------------

    def run(self, pool: Executor) -> None:
        inclusion = self._checkpoint()
        certs = self._certificates()
        by_keyid: dict[str, list[NodeCertificate]] = defaultdict(list)
        for cs in certs.values():
            for c in cs:
                by_keyid[c.keyid].append(c)
        sig_jobs: list[tuple[int, bytes, bytes, bytes]] = []
        futures: list[Future[list[int]]] = []
        cert_keys: dict[bytes, VerifyKey] = {}
        refs: dict[int, str] = {}
        last_leaf = -1
        for i, e in enumerate(self.b.entries):
            ref = f"entry[{i}]"
            if e.leaf_index <= last_leaf:
                self.fail(i, "bundle.order", ref, f"leaf index {e.leaf_index} after {last_leaf}")
            last_leaf = max(last_leaf, e.leaf_index)
            try:
                env = _parse_envelope(e.envelope)
            except VerificationError as err:
                self.fail(i, "envelope.format", ref, err.message)
                env = None
            # Verify before parsing: the keyid hint picks the certified key, whose
            # signature over the raw payload is checked whatever the payload says.
            cert = None
            cands: list[NodeCertificate] = []
            if env is not None:
                cands = next((by_keyid[k] for k, _ in env.signatures if k in by_keyid), [])
                cert = cands[0] if cands else None
                if cert is not None:
                    if cert.public_key not in cert_keys:  # parsed once: a bad key fails here
                        cert_keys[cert.public_key] = VerifyKey.from_raw(cert.public_key)
                    sig = next(s for k, s in env.signatures if k == cert.keyid)
                    sig_jobs.append((i, cert.public_key, sig, pae(env.payload_type, env.payload)))
            r = None
            if env is not None:
                try:
                    r = parse_statement(env.payload)
                except VerificationError as err:
                    self.fail(i, "receipt.format", ref, err.message)
            if r is not None:
                ref = _ref(r)
            refs[i] = ref
            if inclusion is not None:
                if e.proof_index != e.leaf_index or e.proof_size != inclusion.size:
                    self.fail(i, "inclusion", ref, "proof is not for this leaf and checkpoint")
                else:
                    why = inclusion.check(
                        hashlib.sha256(b"\x00" + e.envelope).digest(), e.leaf_index, e.proof_b64
                    )
                    if why:
                        self.fail(i, "inclusion", ref, why)
            if env is None:
                continue
            if cert is None:
                if r is not None and not certs.get(r.node_id):
                    self.fail(i, "certificate", ref, f"no valid certificate for node {r.node_id!r}")
                else:
                    self.fail(i, "signature", ref, "no signature by a certified node key")
            if r is None:
                continue
            self.items.append(_Item(i, r, e.envelope, hashlib.sha256(e.envelope).hexdigest()))
            if cert is not None:
                mine = [c for c in cands if c.node_id == r.node_id]
                if not mine:
                    self.fail(i, "signature", ref, f"signed with the key of node {cert.node_id!r}")
                elif not any(c.valid_at(r.time_unix_ms) for c in mine):
                    self.fail(
                        i, "certificate", ref, "receipt time is outside the certificate's validity"
                    )
            if len(sig_jobs) >= _SIG_CHUNK:
                futures.append(pool.submit(_verify_chunk, sig_jobs))
                sig_jobs = []
        if sig_jobs:
            futures.append(pool.submit(_verify_chunk, sig_jobs))
        leases = self._leases()  # here, while the workers still check receipt signatures
        self._chains()
        self._manifest()
        self._tasks(leases)
        for fut in futures:
            for i in fut.result():
                self.fail(i, "signature", refs[i], "signature does not verify with the node's key")

    def _chains(self) -> None:
        by_node: dict[str, list[_Item]] = defaultdict(list)
        for it in self.items:
            by_node[it.receipt.node_id].append(it)
        for node, items in by_node.items():
            seen: dict[int, _Item] = {}
            top = 0
            for it in items:
                seq, ref = it.receipt.seq, _ref(it.receipt)
                old = seen.get(seq)
                if old is not None:
                    if old.envelope == it.envelope:
                        self.fail(it.index, "chain.duplicate", ref, "envelope appears twice")
                    else:
                        self.fail(
                            it.index, "chain.fork", ref, "two different envelopes for one seq"
                        )
                    continue
                if seq < top:
                    self.fail(it.index, "chain.order", ref, f"seq {seq} comes after seq {top}")
                seen[seq] = it
                top = max(top, seq)
            missing = [s for s in range(1, top + 1) if s not in seen]
            for lo, hi in _ranges(missing):
                where = f"{node}#{lo}" if lo == hi else f"{node}#{lo}-{hi}"
                pos = seen[hi + 1].index if hi + 1 in seen else (items[-1].index if items else 0)
                self.fail(pos, "chain.gap", where, "missing from the bundle")
            for seq, it in seen.items():
                before = seen.get(seq - 1)
                if before is not None and it.receipt.prev != before.digest:
                    self.fail(
                        it.index,
                        "chain.prev",
                        _ref(it.receipt),
                        "prev is not the digest of the previous envelope",
                    )

    def _manifest(self) -> None:
        """Compares the signed export manifest with what the bundle holds."""
        env = self.b.manifest
        if env is None:
            self.fail(-3, "manifest", "manifest", "bundle has no export manifest")
            return
        try:
            m: ExportManifest = verify_manifest(env, self.keys)
        except VerificationError as err:
            self.fail(-3, "manifest", "manifest", err.message)
            return
        cp = self.b.checkpoint
        if cp is not None and (m.origin, m.tree_size, m.root_hash) != (
            cp.origin,
            cp.tree_size,
            cp.root_hash,
        ):
            self.fail(-3, "manifest", "manifest", "manifest is for another checkpoint")
        by_node: dict[str, list[_Item]] = defaultdict(list)
        for it in self.items:
            by_node[it.receipt.node_id].append(it)
        listed = {n.node_id: n for n in m.nodes}
        for node in sorted(set(by_node) - set(listed)):
            pos = by_node[node][-1].index
            self.fail(pos, "manifest", node, "node's receipts are not in the export manifest")
        end = len(self.b.entries)
        for node_id, n in listed.items():
            items = by_node.get(node_id)
            if not items:
                self.fail(
                    end,
                    "manifest",
                    f"{node_id}#1-{n.last_seq}",
                    "manifest lists the node but the bundle holds none of its receipts",
                )
                continue
            last = max(items, key=lambda it: it.receipt.seq)
            top = last.receipt.seq
            if top < n.last_seq:
                where = (
                    f"{node_id}#{n.last_seq}"
                    if top + 1 == n.last_seq
                    else (f"{node_id}#{top + 1}-{n.last_seq}")
                )
                self.fail(
                    last.index,
                    "manifest",
                    where,
                    f"missing from the end of the chain (the manifest says it ends at seq "
                    f"{n.last_seq}, the bundle at {top})",
                )
            elif top > n.last_seq:
                self.fail(
                    last.index,
                    "manifest",
                    _ref(last.receipt),
                    f"the manifest says the chain ends at seq {n.last_seq}",
                )
            elif last.digest != n.last_envelope_sha256:
                self.fail(
                    last.index,
                    "manifest",
                    _ref(last.receipt),
                    "last envelope's digest differs from the manifest's",
                )
            tasks = {it.receipt.task_id for it in items}
            if tasks != set(n.task_ids):
                diff = sorted(tasks.symmetric_difference(n.task_ids))
                self.fail(
                    last.index,
                    "manifest",
                    f"{node_id}",
                    f"task ids differ from the manifest's: {', '.join(diff)}",
                )

    def _tasks(self, leases: dict[tuple[str, int], list[Lease]]) -> None:
        by_task: dict[str, list[_Item]] = defaultdict(list)
        for it in self.items:
            r = it.receipt
            by_task[r.task_id].append(it)
            ref = _ref(r)
            grants = leases.get((r.task_id, r.fencing_token))
            if not grants:
                self.fail(
                    it.index,
                    "lease.missing",
                    ref,
                    f"no signed lease for task {r.task_id!r} token {r.fencing_token}",
                )
                continue
            holder = grants[0]
            if (r.node_id, r.agent_id, r.attempt) != (
                holder.node_id,
                holder.agent_id,
                holder.attempt,
            ):
                self.fail(
                    it.index,
                    "lease.executor",
                    ref,
                    f"executor {r.node_id}/{r.agent_id} attempt {r.attempt} is not the "
                    f"lease holder {holder.node_id}/{holder.agent_id} "
                    f"attempt {holder.attempt}",
                )
            if r.kind in _WINDOW_EXEMPT:
                continue
            t = r.time_unix_ms
            if not any(g.issued_unix_ms <= t < g.expires_unix_ms for g in grants):
                last = max(g.expires_unix_ms for g in grants)
                self.fail(
                    it.index,
                    "lease.window",
                    ref,
                    f"time {t} is outside every window of its lease (last expiry {last})",
                )
        for task, items in by_task.items():
            finals = [it for it in items if it.receipt.kind == ReceiptKind.TASK_FINISHED]
            if len(finals) > 1:
                for it in finals[1:]:
                    self.fail(
                        it.index,
                        "task.final",
                        _ref(it.receipt),
                        f"task {task!r} has {len(finals)} task_finished receipts",
                    )
            elif not finals and not self.allow_open:
                self.fail(
                    items[-1].index,
                    "task.final",
                    f"task:{task}",
                    "task has no task_finished receipt",
                )

    def report(self) -> Report:
        self.failures.sort(key=lambda pf: (pf[0], _RANK[pf[1].check]))
        tasks: dict[str, TaskReport] = {}
        for it in sorted(self.items, key=lambda x: (x.receipt.time_unix_ms, x.index)):
            r = it.receipt
            tr = tasks.setdefault(r.task_id, TaskReport(r.task_id))
            tr.events.append(Event(r.time_unix_ms, _ref(r), r.kind.name.lower(), _detail(r)))
            if r.kind == ReceiptKind.TASK_FINISHED:
                tr.final_state = _STATE_NAMES.get(r.final_state, str(r.final_state))
        return Report(
            failures=[f for _, f in self.failures],
            entries=len(self.b.entries),
            nodes=len({it.receipt.node_id for it in self.items}),
            tasks=sorted(tasks.values(), key=lambda t: t.task_id),
            origin=self.checkpoint.origin if self.checkpoint else "",
            tree_size=self.checkpoint.tree_size if self.checkpoint else 0,
        )


_STATE_NAMES = {4: "succeeded", 5: "failed", 6: "expired", 7: "canceled"}


def _detail(r: Receipt) -> str:
    parts = [f"attempt={r.attempt}", f"token={r.fencing_token}", f"agent={r.agent_id}"]
    if r.tool:
        parts.append(f"tool={r.tool}")
    if r.status:
        parts.append(f"status={r.status}")
    if r.cost_micros:
        parts.append(f"cost_micros={r.cost_micros}")
    if r.artifact_name:
        parts.append(f"artifact={r.artifact_name} ({r.artifact_size} B)")
    if r.memory_key:
        parts.append(f"memory={r.memory_key}")
    if r.reason:
        parts.append(f"reason={json.dumps(r.reason)}")
    if r.kind == ReceiptKind.TASK_FINISHED:
        parts.append(f"final={_STATE_NAMES.get(r.final_state, r.final_state)}")
    return " ".join(parts)


def _ranges(nums: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in nums:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out
