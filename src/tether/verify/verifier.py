"""Offline bundle verification: a pure function of a bundle and trusted keys.

Every check has a stable name (see `CHECKS`) so tools and tests can tell what
failed. All failures are collected, not only the first, and reported in
bundle order. The verifier rejects by default: no trusted key, no checkpoint,
no certificate, no lease or no final receipt is a failure, never a pass.

Speed: a 100,000-receipt bundle is dominated by Ed25519 verification, which
does NOT release the GIL (cryptography 42+, measured: two threads verify no
faster than one), so large bundles are checked by a pool of worker
processes, one per core: they get raw chunks of the file (split at entry
boundaries, never decoded in the main process), parse each entry and do all
its own checks (envelope, signature, statement, certificate, inclusion), and
return compact facts; the main process does only the sequential checks. Small
bundles are checked inline, where a pool's start-up would cost more than it
saves. Inclusion proofs share the work of their common upper nodes through a
memo of authenticated subtree hashes.
"""

from __future__ import annotations

import binascii
import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tether.core.errors import VerificationError
from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.core.states import state_name
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
_LIST_CHUNK = 1024  # parsed entries per job sent to a worker process
_POOL_MIN_ENTRIES = 4096  # below this a pool's start-up (~0.1 s) costs more than it saves
_POOL_MIN_BYTES = 8 << 20  # the same for a bundle file's entries (about 3,000 typical ones)


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


class _Item(NamedTuple):
    """What the sequential checks and the report need of one parsed entry.

    Built in the worker processes and sent back instead of the receipt: a flat
    tuple pickles in a fraction of a dataclass's time.
    """

    pos: int  # the entry's sort position (see `_SHIFT`)
    node_id: str
    seq: int
    prev: str
    task_id: str
    kind: int
    time_unix_ms: int
    fencing_token: int
    agent_id: str
    attempt: int
    final_state: int
    digest: str  # hex sha256 of the envelope bytes
    detail: str  # the timeline line

    @property
    def ref(self) -> str:
        return f"{self.node_id}#{self.seq}"


# An entry's sort position is (chunk number << _SHIFT) | index in the chunk, so
# workers can number entries before the main process knows how many earlier
# chunks hold; positions sort like bundle indexes.
_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_END = 1 << 62  # "after the last entry"


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


_CANONICAL_ONE_SIG = re.compile(
    rb'\{"payload":"([A-Za-z0-9+/=]*)","payloadType":"application/vnd\.in-toto\+json",'
    rb'"signatures":\[\{"keyid":"([0-9a-f]{64})","sig":"([A-Za-z0-9+/=]*)"\}\]\}'
)


def parse_canonical_envelope(data: bytes) -> Envelope:
    """Envelope.from_json_bytes plus the canonical-form and payload-type checks.

    Accepts exactly what `tether.crypto.receipts.parse_receipt` accepts for the
    envelope, about twice as fast for the common one-signature form.

    Raises:
        VerificationError: malformed, not canonical, or not an in-toto payload.
    """
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


# (node_id, raw public key, issued_unix_ms, expires_unix_ms) of a verified certificate
_Cert = tuple[str, bytes, int, int]
# (envelope, leaf_index, proof leaf_index, proof tree_size, proof hashes as base64)
_EntryFacts = tuple[bytes, int, int, int, tuple[str, ...]]
# (position, check, ref or "" for "entry[i]", why)
_Fail = tuple[int, str, str, str]
# (leaf indexes, parsed items, failures) of one chunk of entries
_ChunkResult = tuple[list[int], list[_Item], list[_Fail]]


@dataclass(frozen=True)
class _Context:
    """What a worker needs to check entries on its own (small, picklable)."""

    token: bytes  # one verification run; workers rebuild their state when it changes
    certs: dict[str, tuple[_Cert, ...]]  # keyid -> the verified certificates with that key
    certified: frozenset[str]  # nodes with at least one verified certificate
    tree_size: int
    root: bytes | None  # None: the checkpoint failed, so inclusion is not checked


class _Irregular(Exception):
    """A raw chunk is not in the compact form this package writes (use the full parser)."""


# One entry exactly as `encode_bundle` writes it; anything else takes the full parser.
_RAW_ENTRY = re.compile(
    rb'\{"envelope":"([A-Za-z0-9+/]*={0,2})","leafIndex":"([0-9]{1,20})",'
    rb'"proof":\{"leafIndex":"([0-9]{1,20})","treeSize":"([0-9]{1,20})",'
    rb'"hashes":\[([^\]]*)\]\}\}'
)
_H = rb'"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="'  # canonical base64 of 32 bytes
_RAW_HASHES = re.compile(_H + rb"(?:," + _H + rb")*")
_RAW_HEAD = b'{"version":1,"entries":['
_RAW_TAIL = b']}}],"nodeCertificates":['
_RAW_SEP = b'}},{"envelope":"'
_RAW_CHUNK = 1 << 21  # bytes of entries per job (about 800 typical entries)
_U64 = 1 << 64


def _raw_entries(chunk: bytes) -> list[_EntryFacts]:
    """Parses compact entries separated by commas, as `bundle._entries` would.

    Raises:
        _Irregular: anything the strict fast grammar does not cover.
    """
    out: list[_EntryFacts] = []
    match = _RAW_ENTRY.match
    a2b = binascii.a2b_base64
    pos, n = 0, len(chunk)
    while True:
        m = match(chunk, pos)
        if m is None:
            raise _Irregular
        try:
            envelope = a2b(m[1], strict_mode=True)
        except binascii.Error as err:
            raise _Irregular from err
        leaf, pidx, psize = int(m[2]), int(m[3]), int(m[4])
        if leaf >= _U64 or pidx >= _U64 or psize >= _U64:
            raise _Irregular
        h = m[5]
        if not h:
            proof: tuple[str, ...] = ()
        elif _RAW_HASHES.fullmatch(h) is not None:
            proof = tuple(h[1:-1].decode().split('","'))
        else:
            raise _Irregular
        out.append((envelope, leaf, pidx, psize, proof))
        pos = m.end()
        if pos == n:
            return out
        if chunk[pos] != 0x2C:  # ","
            raise _Irregular
        pos += 1


def _split_raw(data: bytes) -> tuple[Bundle, list[tuple[int, int]]] | None:
    """(the bundle without entries, byte spans of entry chunks) for compact bundles.

    Only the bundle's small remainder is decoded here; the entries (nearly all
    of the file) are parsed by the workers, each on its own chunk, with the
    strict grammar of `_RAW_ENTRY`. None means: not the compact form (or a
    chunk will not parse), so decode the whole file the general way.
    """
    if not data.startswith(_RAW_HEAD):
        return None
    end = data.rfind(_RAW_TAIL)
    start = len(_RAW_HEAD)
    if end < start:
        return None
    tail = data[end + 4 :]
    # A second "entries" member would win in json.loads: leave that to the full parser.
    if b'"entries"' in tail:
        return None
    try:
        header = decode_bundle(_RAW_HEAD + b"]" + tail)
    except BundleFormatError:
        return None
    stop = end + 3
    spans: list[tuple[int, int]] = []
    a = start
    while a < stop:
        j = data.find(_RAW_SEP, a + _RAW_CHUNK, stop) if a + _RAW_CHUNK < stop else -1
        if j < 0:
            spans.append((a, stop))
            break
        spans.append((a, j + 2))
        a = j + 3
    return header, spans


class _Checker:
    """The per-entry checks: envelope, signature, statement, certificate, inclusion.

    Runs in the worker processes (or inline), so the main process never parses
    an envelope; what it returns is what the sequential checks need.
    """

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.keys: dict[bytes, VerifyKey] = {}
        self.inclusion = _Inclusion(ctx.tree_size, ctx.root) if ctx.root is not None else None

    def run(self, base: int, src: bytes | list[_EntryFacts]) -> _ChunkResult:
        entries = _raw_entries(src) if isinstance(src, bytes) else src
        leaves: list[int] = []
        items: list[_Item] = []
        fails: list[_Fail] = []
        for rel, e in enumerate(entries):
            leaves.append(e[1])
            self._entry(base | rel, e, items, fails)
        return leaves, items, fails

    def _entry(self, pos: int, e: _EntryFacts, items: list[_Item], fails: list[_Fail]) -> None:
        envelope, leaf_index, proof_index, proof_size, proof = e
        ref = ""  # the main process writes "entry[i]"
        try:
            env: Envelope | None = parse_canonical_envelope(envelope)
        except VerificationError as err:
            fails.append((pos, "envelope.format", ref, err.message))
            env = None
        # Verify before parsing: the keyid hint picks the certified key, whose
        # signature over the raw payload is checked whatever the payload says.
        cands: tuple[_Cert, ...] = ()
        sig_ok = True
        r = None
        if env is not None:
            certs = self.ctx.certs
            for k, s in env.signatures:
                found = certs.get(k)
                if found:
                    cands = found
                    raw = found[0][1]
                    key = self.keys.get(raw)
                    if key is None:
                        key = self.keys[raw] = VerifyKey.from_raw(raw)
                    sig_ok = key.verify(s, pae(env.payload_type, env.payload))
                    break
            try:
                r = parse_statement(env.payload)
            except VerificationError as err:
                fails.append((pos, "receipt.format", ref, err.message))
        if r is not None:
            ref = f"{r.node_id}#{r.seq}"
        inclusion = self.inclusion
        if inclusion is not None:
            if proof_index != leaf_index or proof_size != inclusion.size:
                fails.append((pos, "inclusion", ref, "proof is not for this leaf and checkpoint"))
            else:
                why = inclusion.check(
                    hashlib.sha256(b"\x00" + envelope).digest(), leaf_index, proof
                )
                if why:
                    fails.append((pos, "inclusion", ref, why))
        if env is not None:
            if not cands:
                if r is not None and r.node_id not in self.ctx.certified:
                    why = f"no valid certificate for node {r.node_id!r}"
                    fails.append((pos, "certificate", ref, why))
                else:
                    fails.append((pos, "signature", ref, "no signature by a certified node key"))
            if r is not None:
                items.append(
                    _Item(
                        pos,
                        r.node_id,
                        r.seq,
                        r.prev,
                        r.task_id,
                        int(r.kind),
                        r.time_unix_ms,
                        r.fencing_token,
                        r.agent_id,
                        r.attempt,
                        r.final_state,
                        hashlib.sha256(envelope).hexdigest(),
                        _detail(r),
                    )
                )
                if cands:
                    mine = [c for c in cands if c[0] == r.node_id]
                    t = r.time_unix_ms
                    if not mine:
                        why = f"signed with the key of node {cands[0][0]!r}"
                        fails.append((pos, "signature", ref, why))
                    elif not any(c[2] <= t < c[3] for c in mine):
                        why = "receipt time is outside the certificate's validity"
                        fails.append((pos, "certificate", ref, why))
        if not sig_ok:
            fails.append((pos, "signature", ref, "signature does not verify with the node's key"))


_WORKER: list[_Checker] = []  # this worker process's checker for the current run


def _check_job(ctx: _Context, base: int, src: bytes | list[_EntryFacts]) -> _ChunkResult | None:
    """Checks one chunk of entries in a worker process; None if a raw chunk is irregular.

    The checker (parsed keys, memo of authenticated subtrees) is kept between
    the chunks of one run.
    """
    if not _WORKER or _WORKER[0].ctx.token != ctx.token:
        _WORKER[:] = [_Checker(ctx)]
    try:
        return _WORKER[0].run(base, src)
    except _Irregular:
        return None


def _warm() -> None:
    """A no-op job: starts the pool's processes while the main process reads the bundle."""


class _Inline(Executor):
    """Runs jobs at submit time: the executor for small bundles or one core."""

    def __init__(self) -> None:
        self.checker: _Checker | None = None

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            if fn is _check_job:  # one checker for the run, in this process
                ctx, base, src = args
                if self.checker is None or self.checker.ctx.token != ctx.token:
                    self.checker = _Checker(ctx)
                try:
                    fut.set_result(self.checker.run(base, src))
                except _Irregular:
                    fut.set_result(None)
            else:
                fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # pragma: no cover - the jobs do not raise
            fut.set_exception(err)
        return fut


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
        threads: worker processes that parse and check the entries (default:
            CPU count, at most 4, for bundles of 4,096 entries or about 8 MiB
            of entries or more; 1 checks inline; 2 or more always use a pool).

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
        with contextlib.ExitStack() as stack:
            report = _verify(bundle, trusted, allow_open, threads, stack)
    finally:
        if gc_was_enabled:
            gc.enable()
    report.seconds = time.perf_counter() - started
    return report


def _verify(
    bundle: Bundle | bytes,
    trusted: Sequence[VerifyKey],
    allow_open: bool,
    threads: int | None,
    stack: contextlib.ExitStack,
) -> Report:
    keys = {k.keyid: k for k in trusted}
    workers = threads or min(4, os.cpu_count() or 1)
    pool: list[Executor] = []

    def executor(big: bool) -> Executor:
        if not pool:
            if workers <= 1 or (threads is None and not big):
                pool.append(_Inline())
            else:
                # spawn, not fork: the caller may hold threads (gRPC, pytest) that fork would copy.
                ctx = multiprocessing.get_context("spawn")
                p = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
                p.submit(_warm)  # start the processes now; they import while we read
                pool.append(p)
        return pool[0]

    if isinstance(bundle, bytes | bytearray):
        data = bytes(bundle)
        if data.startswith(_RAW_HEAD) and len(data) >= _POOL_MIN_BYTES:
            executor(True)
        raw = _split_raw(data)
        if raw is not None:
            header, spans = raw
            big = spans[-1][1] - spans[0][0] >= _POOL_MIN_BYTES
            v = _Verifier(header, keys, allow_open)
            if v.run(executor(big), (data[a:b] for a, b in spans)):
                return v.report()
        try:
            bundle = decode_bundle(data)
        except BundleFormatError as err:
            return Report([Failure("bundle.format", "bundle", err.message)])
    if not bundle.entries:
        # Reject by default: "nothing to check" must never read as "valid".
        return Report([Failure("bundle.format", "bundle", "bundle holds no receipts")])
    facts = [
        (e.envelope, e.leaf_index, e.proof_index, e.proof_size, e.proof_b64) for e in bundle.entries
    ]
    chunks = (facts[i : i + _LIST_CHUNK] for i in range(0, len(facts), _LIST_CHUNK))
    v = _Verifier(bundle, keys, allow_open)
    v.run(executor(len(facts) >= _POOL_MIN_ENTRIES), chunks)
    return v.report()


class _Verifier:
    def __init__(self, bundle: Bundle, keys: dict[str, VerifyKey], allow_open: bool) -> None:
        self.b = bundle  # its entries may be left out (they come in chunks to `run`)
        self.keys = keys
        self.allow_open = allow_open
        self.failures: list[tuple[int, Failure]] = []  # (sort position, failure)
        self.items: list[_Item] = []
        self.entries = 0
        self.checkpoint: CheckpointBody | None = None

    def fail(self, pos: int, check: str, ref: str, why: str) -> None:
        self.failures.append((pos, Failure(check, ref, why)))

    # -- top-level objects --------------------------------------------------

    def _checkpoint(self) -> tuple[int, bytes] | None:
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
        return body.tree_size, body.root_hash

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

    def run(self, pool: Executor, chunks: Iterable[bytes | list[_EntryFacts]]) -> bool:
        """Runs every check; False if a raw chunk was irregular (then start over).

        The workers get every chunk at once; the main process checks the
        leases meanwhile, then takes the chunks' facts in bundle order.
        """
        tree = self._checkpoint()
        by_keyid: dict[str, list[_Cert]] = defaultdict(list)
        certified = set()
        for node, cs in self._certificates().items():
            certified.add(node)
            for c in cs:
                by_keyid[c.keyid].append(
                    (c.node_id, c.public_key, c.issued_unix_ms, c.expires_unix_ms)
                )
        ctx = _Context(
            token=os.urandom(16),
            certs={k: tuple(v) for k, v in by_keyid.items()},
            certified=frozenset(certified),
            tree_size=tree[0] if tree else 0,
            root=tree[1] if tree else None,
        )
        futures = [pool.submit(_check_job, ctx, k << _SHIFT, src) for k, src in enumerate(chunks)]
        leases = self._leases()  # here, while the workers check the entries
        bases: list[int] = []
        total = 0
        last_leaf = -1
        for k, fut in enumerate(futures):
            res = fut.result()
            if res is None:
                for f in futures:
                    f.cancel()
                return False
            leaves, items, fails = res
            bases.append(total)
            base = k << _SHIFT
            for rel, leaf in enumerate(leaves):
                if leaf <= last_leaf:
                    why = f"leaf index {leaf} after {last_leaf}"
                    self.fail(base | rel, "bundle.order", f"entry[{total + rel}]", why)
                else:
                    last_leaf = leaf
            total += len(leaves)
            self.items += items
            for pos, check, ref, why in fails:
                self.fail(pos, check, ref or f"entry[{bases[pos >> _SHIFT] + (pos & _MASK)}]", why)
        self.entries = total
        if not total:
            # Reject by default: "nothing to check" must never read as "valid".
            self.failures = [(-4, Failure("bundle.format", "bundle", "bundle holds no receipts"))]
            return True
        self._chains()
        self._manifest()
        self._tasks(leases)
        return True

    def _chains(self) -> None:
        by_node: dict[str, list[_Item]] = defaultdict(list)
        for it in self.items:
            by_node[it.node_id].append(it)
        for node, items in by_node.items():
            seen: dict[int, _Item] = {}
            top = 0
            for it in items:
                seq, ref = it.seq, it.ref
                old = seen.get(seq)
                if old is not None:
                    if old.digest == it.digest:
                        self.fail(it.pos, "chain.duplicate", ref, "envelope appears twice")
                    else:
                        self.fail(it.pos, "chain.fork", ref, "two different envelopes for one seq")
                    continue
                if seq < top:
                    self.fail(it.pos, "chain.order", ref, f"seq {seq} comes after seq {top}")
                seen[seq] = it
                top = max(top, seq)
            missing = [s for s in range(1, top + 1) if s not in seen]
            for lo, hi in _ranges(missing):
                where = f"{node}#{lo}" if lo == hi else f"{node}#{lo}-{hi}"
                pos = seen[hi + 1].pos if hi + 1 in seen else (items[-1].pos if items else 0)
                self.fail(pos, "chain.gap", where, "missing from the bundle")
            for seq, it in seen.items():
                before = seen.get(seq - 1)
                if before is not None and it.prev != before.digest:
                    self.fail(
                        it.pos,
                        "chain.prev",
                        it.ref,
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
            by_node[it.node_id].append(it)
        listed = {n.node_id: n for n in m.nodes}
        for node in sorted(set(by_node) - set(listed)):
            pos = by_node[node][-1].pos
            self.fail(pos, "manifest", node, "node's receipts are not in the export manifest")
        for node_id, n in listed.items():
            items = by_node.get(node_id)
            if not items:
                self.fail(
                    _END,
                    "manifest",
                    f"{node_id}#1-{n.last_seq}",
                    "manifest lists the node but the bundle holds none of its receipts",
                )
                continue
            last = max(items, key=lambda it: it.seq)
            top = last.seq
            if top < n.last_seq:
                where = (
                    f"{node_id}#{n.last_seq}"
                    if top + 1 == n.last_seq
                    else (f"{node_id}#{top + 1}-{n.last_seq}")
                )
                self.fail(
                    last.pos,
                    "manifest",
                    where,
                    f"missing from the end of the chain (the manifest says it ends at seq "
                    f"{n.last_seq}, the bundle at {top})",
                )
            elif top > n.last_seq:
                self.fail(
                    last.pos,
                    "manifest",
                    last.ref,
                    f"the manifest says the chain ends at seq {n.last_seq}",
                )
            elif last.digest != n.last_envelope_sha256:
                self.fail(
                    last.pos,
                    "manifest",
                    last.ref,
                    "last envelope's digest differs from the manifest's",
                )
            tasks = {it.task_id for it in items}
            if tasks != set(n.task_ids):
                diff = sorted(tasks.symmetric_difference(n.task_ids))
                self.fail(
                    last.pos,
                    "manifest",
                    f"{node_id}",
                    f"task ids differ from the manifest's: {', '.join(diff)}",
                )

    def _tasks(self, leases: dict[tuple[str, int], list[Lease]]) -> None:
        by_task: dict[str, list[_Item]] = defaultdict(list)
        for it in self.items:
            by_task[it.task_id].append(it)
            grants = leases.get((it.task_id, it.fencing_token))
            if not grants:
                self.fail(
                    it.pos,
                    "lease.missing",
                    it.ref,
                    f"no signed lease for task {it.task_id!r} token {it.fencing_token}",
                )
                continue
            holder = grants[0]
            if (it.node_id, it.agent_id, it.attempt) != (
                holder.node_id,
                holder.agent_id,
                holder.attempt,
            ):
                self.fail(
                    it.pos,
                    "lease.executor",
                    it.ref,
                    f"executor {it.node_id}/{it.agent_id} attempt {it.attempt} is not the "
                    f"lease holder {holder.node_id}/{holder.agent_id} "
                    f"attempt {holder.attempt}",
                )
            if it.kind in _WINDOW_EXEMPT:
                continue
            t = it.time_unix_ms
            if not any(g.issued_unix_ms <= t < g.expires_unix_ms for g in grants):
                last = max(g.expires_unix_ms for g in grants)
                self.fail(
                    it.pos,
                    "lease.window",
                    it.ref,
                    f"time {t} is outside every window of its lease (last expiry {last})",
                )
        for task, items in by_task.items():
            finals = [it for it in items if it.kind == _TASK_FINISHED]
            if len(finals) > 1:
                for it in finals[1:]:
                    self.fail(
                        it.pos,
                        "task.final",
                        it.ref,
                        f"task {task!r} has {len(finals)} task_finished receipts",
                    )
            elif not finals and not self.allow_open:
                self.fail(
                    items[-1].pos,
                    "task.final",
                    f"task:{task}",
                    "task has no task_finished receipt",
                )

    def report(self) -> Report:
        self.failures.sort(key=lambda pf: (pf[0], _RANK[pf[1].check]))
        tasks: dict[str, TaskReport] = {}
        for it in sorted(self.items, key=lambda x: (x.time_unix_ms, x.pos)):
            tr = tasks.get(it.task_id)
            if tr is None:
                tr = tasks[it.task_id] = TaskReport(it.task_id)
            tr.events.append(Event(it.time_unix_ms, it.ref, _KIND_NAMES[it.kind], it.detail))
            if it.kind == _TASK_FINISHED:
                tr.final_state = state_name(it.final_state, str(it.final_state))
        return Report(
            failures=[f for _, f in self.failures],
            entries=self.entries,
            nodes=len({it.node_id for it in self.items}),
            tasks=sorted(tasks.values(), key=lambda t: t.task_id),
            origin=self.checkpoint.origin if self.checkpoint else "",
            tree_size=self.checkpoint.tree_size if self.checkpoint else 0,
        )


_KIND_NAMES = {int(k): k.name.lower() for k in ReceiptKind}
_TASK_FINISHED = int(ReceiptKind.TASK_FINISHED)


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
        parts.append(f"final={state_name(r.final_state, str(r.final_state))}")
    return " ".join(parts)


def _ranges(nums: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in nums:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out
