"""Offline bundle verification: a pure function of a bundle and trusted keys.

Every check has a stable name (see `CHECKS`) so tools and tests can tell what
failed. All failures are collected, not only the first, and reported in
bundle order. The verifier rejects by default: no trusted key, no checkpoint,
no certificate, no lease or no final receipt is a failure, never a pass.

Strict and bounded: every byte of a bundle is either authenticated (by a
signature, a hash chain or an inclusion proof, or by equality with something
that is) or rejected: keyids must name the key whose signature verifies,
base64 and decimals must be canonical, signed protobuf payloads must be their
message's canonical encoding, and the bundle's own fields must equal what the
signed manifest and checkpoint say. Input size and JSON nesting are capped
(`Limits`), and work follows the input's size, never a number it claims.

Time is compared like with like. Lease windows and certificate validity are
stamped and signed by the control plane; a receipt's time is stamped by its
node's clock. So a receipt time outside its window by at most the clock-skew
bound (`max_clock_skew_ms`, default 5 s) is a warning, not a failure; beyond
it, a failure. The lease window a receipt names (control-stamped) must equal
a signed one exactly.

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
import bisect
import collections
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import mmap
import multiprocessing
import operator
import os
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pybase64

from tether.core.errors import VerificationError
from tether.core.leases import Lease
from tether.core.receipts import ControlReceipt, Receipt, ReceiptKind
from tether.core.states import TERMINAL, State, state_name
from tether.crypto.certs import NodeCertificate, decode_cert, encode_cert
from tether.crypto.leases import decode_lease, encode_lease
from tether.crypto.manifest import (
    ExportManifest,
    control_receipt_digest,
    decode_manifest,
    encode_manifest,
)
from tether.crypto.merkle import verify_consistency
from tether.crypto.note import CheckpointBody, key_hash, open_checkpoint
from tether.crypto.receipts import (
    FAST_STATEMENT_DEPTH,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    control_statement_bytes,
    parse_canonical_statement,
    parse_control_statement,
    receipt_from_predicate,
    subject_for,
)
from tether.crypto.signing import (
    INTOTO_PAYLOAD_TYPE,
    LEASE_PAYLOAD_TYPE,
    MANIFEST_PAYLOAD_TYPE,
    NODE_CERT_PAYLOAD_TYPE,
    Envelope,
    VerifyKey,
    pae,
)
from tether.verify import strictjson
from tether.verify.bundle import Bundle, BundleFormatError, Limits, decode_bundle

CHECKS: dict[str, str] = {
    "bundle.format": "the file is a well-formed version-1 bundle",
    "checkpoint": "the checkpoint note is signed by a trusted control key and matches its fields",
    "consistency": "the bundle's checkpoint extends the previous checkpoint the verifier was "
    "given (--previous-checkpoint), by the consistency proof in the signed manifest",
    "manifest": "the export manifest is signed by a trusted control key, names the bundle's "
    "checkpoint and export time, and for every node gives the bundle's last seq, that "
    "envelope's digest and the task ids (so no receipt was cut from the end of a chain); "
    "in a per-task export, exactly the seqs the bundle holds, all of the exported tasks, "
    "and leases and control receipts of the exported tasks only; and exactly the control "
    "receipts the bundle carries (none dropped, none added)",
    "control.keyids": "the bundle's controlKeyids are sorted, distinct ids of trusted keys "
    "that signed something in it",
    "certificate": "every node certificate is signed by a trusted control key; each receipt "
    "has a certificate for its node, valid at the receipt's time (within the clock-skew bound)",
    "lease.signature": "every lease is signed by a trusted control key",
    "control.receipt": "every control receipt (a lapse, release or cancel) is signed by a "
    "trusted control key, is a valid control receipt statement in its canonical encoding, "
    "and the lease it ends is a signed lease with that holder",
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
    "lease.window": "each receipt names a window its signed lease has, and its time lies "
    "inside a window of the lease (within the clock-skew bound)",
    "lease.closed": "each lease of a task ends exactly once: by its holder's task_finished "
    "receipt or by a control receipt (lapse, release, cancel); only --allow-open leaves the "
    "task's last lease open",
    "task.final": "each task has exactly one final record, under its last fencing token: its "
    "holder's task_finished receipt (succeeded or failed) or a control receipt that leaves it "
    "expired or canceled; only --allow-open accepts a task without one",
}
_RANK = {name: i for i, name in enumerate(CHECKS)}

# Kinds that need not lie inside the lease window: the node learns of a lost
# lease after the fact.
_WINDOW_EXEMPT = frozenset({ReceiptKind.LEASE_LOST})
DEFAULT_MAX_CLOCK_SKEW_MS = 5_000
_LIST_CHUNK = 1024  # parsed entries per job sent to a worker process
_POOL_MIN_ENTRIES = 4096  # below this a pool's start-up (~0.1 s) costs more than it saves
_POOL_MIN_BYTES = 8 << 20  # the same for a bundle file's entries (about 3,000 typical ones)
_IN_FLIGHT = 12  # chunks submitted ahead of the one being collected (a few per worker)
_IN_FLIGHT_RAW = 6  # copies of raw chunks (up to `_RAW_CHUNK` each) submitted ahead


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
    limits: list[str] = field(default_factory=list)
    """The time limits its signed leases name, one line per attempt and the deadline."""


@dataclass
class Report:
    """The verifier's verdict: valid when `failures` is empty.

    `warnings` name what holds but is worth knowing (node clocks skewed within
    the bound, checkpoint lines by unknown cosigners); they never make a bundle
    invalid.
    """

    failures: list[Failure]
    entries: int = 0
    nodes: int = 0
    origin: str = ""
    tree_size: int = 0
    seconds: float = 0.0
    warnings: list[Failure] = field(default_factory=list)
    max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS
    exported_tasks: list[str] = field(default_factory=list)
    """A per-task export's tasks (from its verified manifest); empty for whole chains."""
    consistent_with: int = 0
    """The previous checkpoint's tree size, when its consistency with this one was proven."""
    _tasks: list[TaskReport] | None = field(default=None, init=False, repr=False, compare=False)
    _task_source: tuple[int, Callable[[], list[TaskReport]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def tasks(self) -> list[TaskReport]:
        """Each task's receipts in time order and its final state, sorted by task id.

        Built on first use: a verdict or a summary does not need it, and for a
        large bundle it is a tenth of a second of work after the checks.
        """
        if self._tasks is None:
            source, self._task_source = self._task_source, None
            self._tasks = source[1]() if source is not None else []
        return self._tasks

    @tasks.setter
    def tasks(self, tasks: list[TaskReport]) -> None:
        self._tasks, self._task_source = tasks, None

    @property
    def task_count(self) -> int:
        """How many tasks `tasks` lists, without building it."""
        if self._tasks is None and self._task_source is not None:
            return self._task_source[0]
        return len(self.tasks)

    def tasks_from(self, count: int, build: Callable[[], list[TaskReport]]) -> None:
        """Sets `tasks` to what `build` returns (`count` of them), built on first use."""
        self._tasks, self._task_source = None, (count, build)

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
                    "limits": list(t.limits),
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
            "warnings": [w.to_dict() for w in self.warnings],
            "max_clock_skew_ms": self.max_clock_skew_ms,
            "seconds": round(self.seconds, 3),
            "exported_tasks": list(self.exported_tasks),
            "consistent_with_tree_size": self.consistent_with,
        }


class _Item(NamedTuple):
    """What the sequential checks and the report need of one parsed entry.

    Built in the worker processes and sent back instead of the receipt, as a
    plain tuple (`_Item._make` in the main process): a plain tuple pickles in a
    third of a named tuple's time, and a fraction of a dataclass's.
    """

    pos: int  # the entry's sort position (see `_SHIFT`)
    node_id: str
    seq: int
    prev: bytes  # the receipt's prev as raw sha256 bytes (b"" for seq 1)
    task_id: str
    kind: int
    time_unix_ms: int
    fencing_token: int
    agent_id: str
    attempt: int
    final_state: int
    digest: bytes  # sha256 of the envelope bytes (raw: half the bytes to send back)
    detail: str  # the timeline line
    lease_id: str  # the lease window the receipt names (control-stamped, copied by the node)
    lease_issued: int
    lease_expires: int

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

    def forget_before(self, index: int) -> None:
        """Drops the subtrees wholly left of leaf `index`.

        A proof only meets nodes over its own leaf, so when leaves come in
        order (a chunk at a time) these are never met again; if one does come
        later, its proof just hashes further up (the memo saves work, it never
        decides).
        """
        self.memo = {k: v for k, v in self.memo.items() if k[1] > index}

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


# Base64 of the entries and payloads (two thirds of a bundle's bytes) through
# pybase64's SIMD codec, about five times as fast as binascii's. Canonical form
# is checked the same way whatever the decoder: the bytes must re-encode to
# exactly the text, so only canonical base64 is ever accepted.
_b64decode = pybase64.b64decode
_b64encode = pybase64.b64encode

# The base64 texts are matched as "anything up to the next quote" (a regex
# character class costs several times a scan for one byte); the codec then
# takes only canonical base64, and `_B64_TEXT` sorts out what it refuses.
_CANONICAL_ONE_SIG = re.compile(
    rb'\{"payload":"([^"]*)","payloadType":"application/vnd\.in-toto\+json",'
    rb'"signatures":\[\{"keyid":"([0-9a-f]{64})","sig":"([^"]*)"\}\]\}'
)
_B64_TEXT = re.compile(rb"[A-Za-z0-9+/=]*")


def _one_signature(data: bytes) -> tuple[bytes, str, bytes] | None:
    """(payload, keyid, signature) of a canonical one-signature in-toto envelope, else None.

    The common case of `parse_canonical_envelope`, without building an Envelope;
    None for anything else (which that function then accepts or names).
    """
    m = _CANONICAL_ONE_SIG.fullmatch(data)
    if m is None:
        return None
    try:  # a valid envelope, with the fast base64 codec (see `_b64decode`)
        payload = _b64decode(m[1], validate=True)
        sig = _b64decode(m[3], validate=True)
    except ValueError:  # binascii.Error
        return None
    if _b64encode(payload) != m[1] or _b64encode(sig) != m[3]:
        return None
    return payload, m[2].decode(), sig


def parse_canonical_envelope(data: bytes) -> Envelope:
    """Envelope.from_json_bytes plus the canonical-form and payload-type checks.

    Accepts exactly what `tether.crypto.receipts.parse_receipt` accepts for the
    envelope, about twice as fast for the common one-signature form.

    Raises:
        VerificationError: malformed, not canonical, or not an in-toto payload.
    """
    parts = _one_signature(data)
    if parts is not None:  # the common case, without a JSON parse and re-encode
        payload, keyid, sig = parts
        return Envelope(payload, INTOTO_PAYLOAD_TYPE, ((keyid, sig),))
    m = _CANONICAL_ONE_SIG.fullmatch(data)
    if m is not None and (_B64_TEXT.fullmatch(m[1]) is None or _B64_TEXT.fullmatch(m[3]) is None):
        m = None  # not base64 letters at all: the general parser below says why
    if m is not None:
        # Not canonical base64: the standard codec says why, in its own words.
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


class _Windows:
    """Half-open time windows [lo, hi): how far a time lies from the nearest, in O(log n).

    Renewals and re-registrations give one lease or node key several windows;
    duplicates collapse, and a lookup never scans them all, so a bundle cannot
    make the checks quadratic by repeating windows.
    """

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        ordered = sorted(set(spans))
        self.starts = [lo for lo, _ in ordered]
        self.reach = list(itertools.accumulate((hi for _, hi in ordered), max))

    def distance(self, t: int) -> int:
        """0 inside a window, else milliseconds to the nearest one."""
        i = bisect.bisect_right(self.starts, t)
        best = 1 << 64
        if i:
            reach = self.reach[i - 1]
            if t < reach:
                return 0
            best = t - reach + 1
        if i < len(self.starts):
            best = min(best, self.starts[i] - t)
        return best


# Signature checks are a pure function of (key, signature, message), so their
# results are memoized per process (bounded, messages up to 16 KiB): verifying
# bundles that share envelopes (successive exports, a bundle and its variants)
# costs one Ed25519 check per distinct signature.
_MEMO_MAX_MESSAGE = 16 << 10


@functools.lru_cache(maxsize=256)
def _verify_key(raw: bytes) -> VerifyKey:
    return VerifyKey.from_raw(raw)


@functools.lru_cache(maxsize=2048)
def _verified_memo(raw: bytes, sig: bytes, message: bytes) -> bool:
    return _verify_key(raw).verify(sig, message)


def _verified_once(raw: bytes, sig: bytes, message: bytes) -> bool:
    """`_verified` without the memo."""
    return _verify_key(raw).verify(sig, message)


def _verified(raw: bytes, sig: bytes, message: bytes) -> bool:
    """True when `sig` is the Ed25519 signature of the 32-byte key `raw` over `message`."""
    if len(message) > _MEMO_MAX_MESSAGE:
        return _verify_key(raw).verify(sig, message)
    return _verified_memo(raw, sig, message)


def _short(keyid: str) -> str:
    """A keyid as diagnostics show it: its first 16 hex digits."""
    return keyid[:16] if re.fullmatch(r"[0-9a-f]{64}", keyid) else repr(keyid[:70])


_STATEMENT_KEYS = frozenset({"_type", "subject", "predicateType", "predicate"})


def _statement(payload: bytes, max_depth: int) -> Receipt:
    """Parses an in-toto Statement of a Tether receipt, strictly and within `max_depth`.

    The canonical form (nearly every statement) takes the one-regex grammar of
    `parse_canonical_statement`; anything else `strict_statement`, which
    accepts the same receipts and names what is wrong.

    Raises:
        VerificationError: not a valid Tether receipt statement.
    """
    if max_depth >= FAST_STATEMENT_DEPTH:
        r = parse_canonical_statement(payload)
        if r is not None:
            return r
    return strict_statement(payload, max_depth)


def strict_statement(payload: bytes, max_depth: int) -> Receipt:
    """Parses a receipt statement with the strict JSON parser (any JSON form).

    What `tether.crypto.receipts.parse_statement` checks, on strict JSON: a
    repeated key (which JSON readers resolve differently) is refused.

    Raises:
        VerificationError: not a valid Tether receipt statement.
    """
    try:
        doc = strictjson.loads(payload, max_depth)
    except strictjson.StrictJSONError as err:
        raise VerificationError(f"statement: {err.message}") from err
    if type(doc) is not dict or doc.keys() != _STATEMENT_KEYS:
        raise VerificationError(
            "statement must hold exactly _type, subject, predicateType, predicate"
        )
    if doc["_type"] != STATEMENT_TYPE:
        raise VerificationError("statement _type is not in-toto Statement v1")
    if doc["predicateType"] != PREDICATE_TYPE:
        raise VerificationError("statement predicateType is not a Tether receipt")
    r = receipt_from_predicate(doc["predicate"])
    if doc["subject"] != [subject_for(r)]:
        raise VerificationError("statement subject does not match the receipt")
    return r


# (node_id, raw public key, issued_unix_ms, expires_unix_ms) of a verified certificate
_Cert = tuple[str, bytes, int, int]
# (envelope, leaf_index, proof leaf_index, proof tree_size, proof hashes as base64)
_EntryFacts = tuple[bytes, int, int, int, tuple[str, ...]]
# (position, check, ref or "" for "entry[i]", why)
_Fail = tuple[int, str, str, str]
# (check, node_id, milliseconds outside, receipt ref): a node-stamped time off by clock skew
_Skew = tuple[str, str, int, str]
# (leaf indexes, parsed items, failures, skews) of one chunk of entries
_ChunkResult = tuple[list[int], list[tuple[Any, ...]], list[_Fail], list[_Skew]]


@dataclass(frozen=True)
class _Context:
    """What a worker needs to check entries on its own (small, picklable)."""

    token: bytes  # one verification run; workers rebuild their state when it changes
    certs: dict[str, tuple[_Cert, ...]]  # keyid -> the verified certificates with that key
    node_keyids: dict[str, tuple[str, ...]]  # node -> keyids of its certified keys
    tree_size: int
    root: bytes | None  # None: the checkpoint failed, so inclusion is not checked
    skew_ms: int
    max_depth: int
    details: bool = True  # write each receipt's timeline line (`_detail`)


class _Irregular(Exception):
    """A raw chunk is not in the compact form this package writes (use the full parser)."""


# One entry exactly as `encode_bundle` writes it; anything else takes the full parser.
_RAW_ENTRY = re.compile(  # the envelope's base64 is checked by the codec (see `_b64decode`)
    rb'\{"envelope":"([^"]*)","leafIndex":"(0|[1-9][0-9]{0,19})",'
    rb'"proof":\{"leafIndex":"(0|[1-9][0-9]{0,19})","treeSize":"(0|[1-9][0-9]{0,19})",'
    rb'"hashes":\[([^\]]*)\]\}\}'
)
# Proof hashes as written: "H","H",... where each H is the canonical base64 of 32
# bytes: 42 letters, one whose low bits are zero, and "=". Checked by two C-speed
# translations instead of a regex (whose character classes cost far more).
_B64_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_HASH_SHAPE = bytes(  # letters -> "x"; quotes, commas and "=" kept; anything else -> "!"
    0x78 if c in _B64_LETTERS else c if c in b'",=' else 0x21 for c in range(256)
)
_HASH_LAST_LETTERS = b"AEIMQUYcgkosw048"  # the 43rd letter of 32 bytes' base64


def _canonical_hashes(text: bytes) -> bool:
    """True when `text` is `"H","H",...`, each H the canonical base64 of a 32-byte hash."""
    n, extra = divmod(len(text) + 1, 47)
    return (
        extra == 0
        and text.translate(_HASH_SHAPE) == b'"' + b'","'.join([b"x" * 43 + b"="] * n) + b'"'
        and not text[43::47].translate(None, _HASH_LAST_LETTERS)
    )


_RAW_HEAD = b'{"version":1,"entries":['
_RAW_TAIL = b']}}],"nodeCertificates":['
_RAW_SEP = b'}},{"envelope":"'
# Bytes of entries per job: large while much is left (each job costs a worker a few
# ms of hand-over), smaller towards the end so the workers finish together.
_RAW_CHUNK = 1 << 22  # about 1,600 typical entries
_RAW_CHUNK_MIN = 1 << 19
_U64 = 1 << 64


def _raw_entries(chunk: bytes) -> list[_EntryFacts]:
    """Parses compact entries separated by commas, as `bundle._entries` would.

    Raises:
        _Irregular: anything the strict fast grammar does not cover (then the
            full parser decides, and names what is wrong).
    """
    out: list[_EntryFacts] = []
    match = _RAW_ENTRY.match
    a2b, b2a = _b64decode, _b64encode
    pos, n = 0, len(chunk)
    while True:
        m = match(chunk, pos)
        if m is None:
            raise _Irregular
        try:
            envelope = a2b(m[1], validate=True)
        except ValueError as err:  # binascii.Error
            raise _Irregular from err
        if b2a(envelope) != m[1]:
            raise _Irregular  # not canonical base64
        leaf, pidx, psize = int(m[2]), int(m[3]), int(m[4])
        if leaf >= _U64 or pidx >= _U64 or psize >= _U64:
            raise _Irregular
        h = m[5]
        if not h:
            proof: tuple[str, ...] = ()
        elif _canonical_hashes(h):
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


_RAW_LEASES = b'],"leases":['
_RAW_AFTER_LEASES = b'],"controlKeyids":['
_RAW_LEASE = re.compile(
    rb'\{"payload":"([A-Za-z0-9+/]*={0,2})","payloadType":"'
    + re.escape(LEASE_PAYLOAD_TYPE.encode())
    + rb'","signatures":\[(\{"keyid":"[0-9a-f]{64}","sig":"[A-Za-z0-9+/]*={0,2}"\}'
    + rb'(?:,\{"keyid":"[0-9a-f]{64}","sig":"[A-Za-z0-9+/]*={0,2}"\})*)\]\}'
)
_RAW_LEASE_SIG = re.compile(rb'"keyid":"([0-9a-f]{64})","sig":"([A-Za-z0-9+/]*={0,2})"')


class _RawSplit(NamedTuple):
    """A compact bundle cut where the workers and the main process take their parts."""

    header: Bundle  # the bundle without entries and, when `leases` is set, without leases
    spans: list[tuple[int, int]]  # byte spans of the entry chunks
    leases: tuple[int, int] | None  # the byte span of the leases' envelopes, or None


def _raw_leases(text: bytes) -> list[Envelope] | None:
    """The lease envelopes of a compact bundle's leases member, or None if not canonical.

    Accepts exactly what `encode_bundle` writes for leases (compact envelopes
    of the lease payload type, hex keyids, canonical base64), so these bytes
    are the canonical encoding of what it returns; None sends the bundle to the
    general parser, which decides and names what is wrong.
    """
    out: list[Envelope] = []
    match = _RAW_LEASE.match
    pos, n = 0, len(text)
    while pos < n:
        m = match(text, pos)
        if m is None:
            return None
        sigs: list[tuple[str, bytes]] = []
        try:
            payload = _b64decode(m[1], validate=True)
            if _b64encode(payload) != m[1]:
                return None  # not canonical base64
            for keyid, text64 in _RAW_LEASE_SIG.findall(m[2]):
                sig = _b64decode(text64, validate=True)
                if _b64encode(sig) != text64:
                    return None
                sigs.append((keyid.decode(), sig))
        except ValueError:  # binascii.Error
            return None
        out.append(Envelope(payload, LEASE_PAYLOAD_TYPE, tuple(sigs)))
        pos = m.end()
        if pos < n:
            if text[pos] != 0x2C:  # ","
                return None
            pos += 1
            if pos == n:
                return None  # a trailing comma
    return out


def _split_raw(data: BundleBytes, limits: Limits) -> _RawSplit | None:
    """The bundle without entries, and where its entries and leases lie, for compact bundles.

    Only the bundle's small remainder is decoded here; the entries (nearly all
    of the file) are parsed by the workers, each on its own chunk, with the
    strict grammar of `_RAW_ENTRY`, and the leases by the main process while
    the workers run (`_raw_leases`). None means: not the compact form (or a
    chunk will not parse), so decode the whole file the general way.
    """
    if data[: len(_RAW_HEAD)] != _RAW_HEAD:
        return None
    end = data.rfind(_RAW_TAIL)
    start = len(_RAW_HEAD)
    if end < start:
        return None
    tail = data[end + 4 :]
    # A second "entries" member: leave it to the full parser, which refuses it.
    if b'"entries"' in tail:
        return None
    # The leases (most of the rest) are cut out of what is decoded here: the header
    # holds an empty leases member, and the span between is parsed later.
    leases = None
    i = tail.find(_RAW_LEASES)
    j = tail.rfind(_RAW_AFTER_LEASES)
    if i >= 0 and i + len(_RAW_LEASES) <= j:
        at = end + 4 + i + len(_RAW_LEASES)
        leases = (at, at + j - i - len(_RAW_LEASES))
        tail = tail[: i + len(_RAW_LEASES)] + tail[j:]
    try:
        header = decode_bundle(_RAW_HEAD + b"]" + tail, limits)
    except BundleFormatError:
        return None
    stop = end + 3
    spans: list[tuple[int, int]] = []
    a = start
    while a < stop:
        size = max(_RAW_CHUNK_MIN, min(_RAW_CHUNK, (stop - a) // 8))
        j = data.find(_RAW_SEP, a + size, stop) if a + size < stop else -1
        if j < 0:
            spans.append((a, stop))
            break
        spans.append((a, j + 2))
        a = j + 3
    return _RawSplit(header, spans, leases)


class _Checker:
    """The per-entry checks: envelope, signature, statement, certificate, inclusion.

    Runs in the worker processes (or inline), so the main process never parses
    an envelope; what it returns is what the sequential checks need.
    """

    def __init__(self, ctx: _Context, *, memo: bool = True) -> None:
        self.ctx = ctx
        self.inclusion = _Inclusion(ctx.tree_size, ctx.root) if ctx.root is not None else None
        self.validity: dict[tuple[str, str], _Windows] = {}  # (keyid, node) -> cert windows
        self.shared: dict[str, str] = {}  # this chunk's names, each kept once
        # A worker process lives for one run, where every signature is another: there
        # the memo (see `_verified`) would only cost its lookups.
        self.verified = _verified if memo else _verified_once

    def run(self, base: int, src: bytes | list[_EntryFacts]) -> _ChunkResult:
        entries = _raw_entries(src) if isinstance(src, bytes) else src
        self.shared = {}
        if entries and self.inclusion is not None:
            self.inclusion.forget_before(entries[0][1])
        leaves: list[int] = []
        items: list[tuple[Any, ...]] = []
        fails: list[_Fail] = []
        skews: list[_Skew] = []
        for rel, e in enumerate(entries):
            leaves.append(e[1])
            self._entry(base | rel, e, items, fails, skews)
        return leaves, items, fails, skews

    def _windows(self, keyid: str, node: str, cands: tuple[_Cert, ...]) -> _Windows | None:
        w = self.validity.get((keyid, node))
        if w is None:
            spans = [(c[2], c[3]) for c in cands if c[0] == node]
            if not spans:
                return None
            w = self.validity[(keyid, node)] = _Windows(spans)
        return w

    def _entry(
        self,
        pos: int,
        e: _EntryFacts,
        items: list[tuple[Any, ...]],
        fails: list[_Fail],
        skews: list[_Skew],
    ) -> None:
        envelope, leaf_index, proof_index, proof_size, proof = e
        ref = ""  # the main process writes "entry[i]"
        parts = _one_signature(envelope)
        if parts is None:  # not the common form: the general parser accepts or names it
            try:
                env = parse_canonical_envelope(envelope)
            except VerificationError as err:
                fails.append((pos, "envelope.format", ref, err.message))
            else:
                if len(env.signatures) == 1:
                    (keyid, sig), payload = env.signatures[0], env.payload
                    parts = payload, keyid, sig
                else:
                    why = (
                        f"a receipt envelope carries one signature, this one {len(env.signatures)}"
                    )
                    fails.append((pos, "envelope.format", ref, why))
        # Verify before parsing: the keyid names the certified key, whose
        # signature over the raw payload is checked whatever the payload says.
        cands: tuple[_Cert, ...] = ()
        keyid = ""
        sig_ok = True
        r = None
        if parts is not None:
            payload, keyid, sig = parts
            cands = self.ctx.certs.get(keyid, ())
            if cands:
                sig_ok = self.verified(cands[0][1], sig, pae(INTOTO_PAYLOAD_TYPE, payload))
            try:
                r = _statement(payload, self.ctx.max_depth)
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
        if parts is not None:
            if not cands:
                if r is not None and r.node_id not in self.ctx.node_keyids:
                    why = f"no valid certificate for node {r.node_id!r}"
                    fails.append((pos, "certificate", ref, why))
                else:
                    want = self.ctx.node_keyids.get(r.node_id, ()) if r is not None else ()
                    why = (
                        f"signed by keyid {_short(keyid)}, expected one of "
                        f"{', '.join(_short(k) for k in want) or 'the certified node keys'}"
                    )
                    fails.append((pos, "signature", ref, why))
            if r is not None:
                share = self.shared.setdefault  # one object per repeated name: pickled once
                items.append(
                    (  # an _Item's fields
                        pos,
                        share(r.node_id, r.node_id),
                        r.seq,
                        bytes.fromhex(r.prev),  # validated: "" or 64 lowercase hex digits
                        share(r.task_id, r.task_id),
                        int(r.kind),
                        r.time_unix_ms,
                        r.fencing_token,
                        share(r.agent_id, r.agent_id),
                        r.attempt,
                        r.final_state,
                        hashlib.sha256(envelope).digest(),
                        _detail(r) if self.ctx.details else "",
                        share(r.lease_id, r.lease_id),
                        r.lease_issued_unix_ms,
                        r.lease_expires_unix_ms,
                    )
                )
                if cands:
                    windows = self._windows(keyid, r.node_id, cands)
                    if windows is None:
                        why = (
                            f"signed with the key of node {cands[0][0]!r}, not of "
                            f"{r.node_id!r} (keyid {_short(keyid)})"
                        )
                        fails.append((pos, "signature", ref, why))
                    else:
                        off = windows.distance(r.time_unix_ms)
                        if off > self.ctx.skew_ms:
                            why = (
                                f"receipt time is {off} ms outside the node certificate's "
                                f"validity (clock-skew bound {self.ctx.skew_ms} ms)"
                            )
                            fails.append((pos, "certificate", ref, why))
                        elif off:
                            skews.append(("certificate", r.node_id, off, ref))
        if not sig_ok:
            why = f"signature by keyid {_short(keyid)} does not verify with the node's key"
            fails.append((pos, "signature", ref, why))


_WORKER: list[_Checker] = []  # this worker process's checker for the current run
# The bundle's bytes, set in the main process before it forks its workers: they
# inherit the buffer (or the file's map) and read their chunks from it, so no
# chunk is copied, pickled and piped to them.
_SHARED: list[BundleBytes] = []
# A job's entries: raw bytes, a byte span of the inherited `_SHARED` buffer, or parsed entries.
_Src = bytes | tuple[int, int] | list[_EntryFacts]


def _check_job(ctx: _Context, base: int, src: _Src) -> _ChunkResult | None:
    """Checks one chunk of entries in a worker process; None if a raw chunk is irregular.

    The checker (memo of authenticated subtrees, certificate windows) is kept
    between the chunks of one run.
    """
    if not _WORKER or _WORKER[0].ctx.token != ctx.token:
        _WORKER[:] = [_Checker(ctx, memo=False)]
    if isinstance(src, tuple):
        src = bytes(_SHARED[0][src[0] : src[1]])
    try:
        return _WORKER[0].run(base, src)
    except _Irregular:
        return None


def _can_fork() -> bool:
    """True when worker processes may be forked: this process runs one thread and no gRPC.

    A fork copies only the calling thread, so a lock another thread held stays
    held in the child; and gRPC's core runs threads Python does not see. The
    `tether verify` command has neither, and forked workers start without
    importing anything (spawned ones import the verifier again, ~0.2 s each).
    """
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
        and "grpc" not in sys.modules
    )


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


BundleBytes = bytes | bytearray | mmap.mmap
"""A bundle file's bytes: read into memory, or a read-only map of the file (`mmap`)."""


def verify_bundle(
    bundle: Bundle | BundleBytes,
    trusted: Sequence[VerifyKey],
    *,
    allow_open: bool = False,
    threads: int | None = None,
    max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
    limits: Limits | None = None,
    previous_checkpoint: str | None = None,
    details: bool = True,
) -> Report:
    """Verifies a bundle offline against trusted control-plane keys.

    Args:
        bundle: a parsed bundle or the bundle file's bytes; a read-only `mmap`
            of the file keeps the verifier's own memory to a few chunks of it
            plus what it learns per receipt (the file stays in the page cache).
        trusted: control-plane public keys; certificates, leases, the manifest
            and the checkpoint must be signed by one of them.
        allow_open: accept tasks without a task_finished receipt (still running).
        threads: worker processes that parse and check the entries (default:
            CPU count, at most 4, for bundles of 4,096 entries or about 8 MiB
            of entries or more; 1 checks inline; 2 or more always use a pool).
        max_clock_skew_ms: how far a node-stamped receipt time may lie outside
            the control-stamped lease window or certificate validity before it
            fails (inside the bound it is a warning).
        limits: input size and JSON nesting caps (file bytes only).
        previous_checkpoint: a signed checkpoint note the auditor saw before;
            the bundle's checkpoint must be consistent with it (the same tree
            grown by appends only), proven by the manifest's consistency proof.
        details: False leaves each timeline event's `detail` empty (the verdict,
            failures and everything else are the same): for callers that show
            no timeline, it saves writing a line per receipt.

    Raises:
        ValueError: no trusted key was given (rejecting by default), or a
            negative clock-skew bound.
    """
    if not trusted:
        raise ValueError("at least one trusted control-plane key is required")
    if max_clock_skew_ms < 0:
        raise ValueError("max_clock_skew_ms must not be negative")
    started = time.perf_counter()
    # Millions of small, acyclic objects: cyclic GC passes would only cost time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with contextlib.ExitStack() as stack:
            report = _verify(
                bundle,
                trusted,
                allow_open,
                threads,
                max_clock_skew_ms,
                limits or Limits(),
                stack,
                previous_checkpoint,
                details,
            )
    finally:
        if gc_was_enabled:
            gc.enable()
    report.max_clock_skew_ms = max_clock_skew_ms
    report.seconds = time.perf_counter() - started
    return report


def _verify(
    bundle: Bundle | BundleBytes,
    trusted: Sequence[VerifyKey],
    allow_open: bool,
    threads: int | None,
    skew_ms: int,
    limits: Limits,
    stack: contextlib.ExitStack,
    previous_checkpoint: str | None = None,
    details: bool = True,
) -> Report:
    keys = {k.keyid: k for k in trusted}
    workers = threads or min(4, os.cpu_count() or 1)
    pool: list[Executor] = []

    shared = False  # the workers were forked with the bundle's bytes in `_SHARED`

    def executor(big: bool) -> Executor:
        nonlocal shared
        if not pool:
            if workers <= 1 or (threads is None and not big):
                pool.append(_Inline())
            else:
                # Fork only where it is safe (`_can_fork`); else spawn, as a caller
                # holding threads (gRPC, pytest) needs.
                method = "fork" if _can_fork() else "spawn"
                if method == "fork" and isinstance(bundle, bytes | bytearray | mmap.mmap):
                    _SHARED[:] = [bundle]
                    stack.callback(_SHARED.clear)
                    shared = True
                ctx = multiprocessing.get_context(method)
                p = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
                p.submit(_warm)  # start the processes now; they import while we read
                pool.append(p)
        return pool[0]

    def verifier(b: Bundle) -> _Verifier:
        return _Verifier(
            b, keys, allow_open, skew_ms, limits.max_depth, previous_checkpoint, details
        )

    if isinstance(bundle, bytes | bytearray | mmap.mmap):
        data = bundle  # a mapped file stays mapped: only chunks of it are copied, a few at a time
        if len(data) > limits.max_bytes:
            why = f"bundle is {len(data)} bytes, over the {limits.max_bytes}-byte limit"
            return Report([Failure("bundle.format", "bundle", why)])
        # No scan of the whole file for control bytes here: the compact path below
        # admits none (its entries match a printable grammar and the rest is strict
        # JSON), and anything else comes to the full scan before the general decode,
        # which names the first one, as ever.
        if data[: len(_RAW_HEAD)] == _RAW_HEAD and len(data) >= _POOL_MIN_BYTES:
            executor(True)
        raw = _split_raw(data, limits)
        if raw is not None:
            header, spans, lease_span = raw
            big = spans[-1][1] - spans[0][0] >= _POOL_MIN_BYTES
            v = verifier(header)
            if lease_span is not None:
                v.raw_leases = bytes(data[lease_span[0] : lease_span[1]])
            ex = executor(big)
            # Spans of the inherited buffer cost nothing to queue: all go at once, so
            # the workers never wait while this process checks the leases.
            chunks: Iterable[_Src] = spans
            in_flight = len(spans)
            if not shared or isinstance(ex, _Inline):
                chunks = (bytes(data[a:b]) for a, b in spans)
                in_flight = _IN_FLIGHT_RAW
            if v.run(ex, chunks, in_flight):
                return v.report()
        at = strictjson.control_byte(data)
        if at >= 0:
            why = f"not a bundle: control byte 0x{data[at]:02x} at offset {at}"
            return Report([Failure("bundle.format", "bundle", why)])
        try:
            bundle = decode_bundle(bytes(data), limits)
        except BundleFormatError as err:
            return Report([Failure("bundle.format", "bundle", err.message)])
    # A bundle without entries is refused in `_Verifier.run` unless a signed
    # per-task manifest says its tasks have no node receipts.
    facts = [
        (e.envelope, e.leaf_index, e.proof_index, e.proof_size, e.proof_b64) for e in bundle.entries
    ]
    chunks = (facts[i : i + _LIST_CHUNK] for i in range(0, len(facts), _LIST_CHUNK))
    v = verifier(bundle)
    v.run(executor(len(facts) >= _POOL_MIN_ENTRIES), chunks)
    return v.report()


@dataclass
class _LeaseFacts:
    """The signed leases of one (task, fencing token): holder, windows, exact windows named."""

    holder: Lease
    windows: _Windows
    named: frozenset[tuple[str, int, int]]  # (lease_id, issued, expires) of each grant/renewal


class _Verifier:
    def __init__(
        self,
        bundle: Bundle,
        keys: dict[str, VerifyKey],
        allow_open: bool,
        skew_ms: int,
        max_depth: int,
        previous_checkpoint: str | None = None,
        details: bool = True,
    ) -> None:
        self.b = bundle  # its entries may be left out (they come in chunks to `run`)
        # A compact bundle's leases as they are in the file, parsed in `run` (then
        # `b.leases` is empty until then).
        self.raw_leases: bytes | None = None
        self.previous_checkpoint = previous_checkpoint
        self.details = details
        self.consistent_with = 0
        self.keys = keys
        self.allow_open = allow_open
        self.skew_ms = skew_ms
        self.max_depth = max_depth
        self.failures: list[tuple[int, Failure]] = []  # (sort position, failure)
        self.warnings: list[Failure] = []
        self.skews: dict[tuple[str, str], list[Any]] = {}  # (check, node) -> [n, max, ref]
        # The items grouped as they arrive (in bundle order), while the workers still check.
        self.by_node: dict[str, list[_Item]] = defaultdict(list)
        self.by_task: dict[str, list[_Item]] = defaultdict(list)
        # Per node, checked as the items arrive (see `_chained`): the first item of
        # each seq, the highest seq, and the task ids of all its items.
        self.seqs: dict[str, dict[int, _Item]] = defaultdict(dict)
        self.tops: dict[str, int] = defaultdict(int)
        self.node_tasks: dict[str, set[str]] = defaultdict(set)
        # Task stories (see `_story`), told as each task's task_finished arrives; a later
        # receipt of the task drops its story, to be told again at the end.
        self.ctl_by_task: dict[str, list[tuple[int, ControlReceipt]]] = {}
        self.tokens: dict[str, set[int]] = defaultdict(set)  # task -> its leases' tokens
        self.stories: dict[str, list[tuple[int, Failure]]] = {}
        self.entries = 0
        self.checkpoint: CheckpointBody | None = None
        self.signers: set[str] = set()  # keyids of trusted keys that signed something here
        self.manifest: ExportManifest | None = None
        self.controls: list[tuple[int, ControlReceipt]] = []  # (index, verified control receipt)
        # task -> {attempt: (first grant's issue time, attempt timeout due, task deadline)}
        self.attempts: dict[str, dict[int, tuple[int, int, int]]] = defaultdict(dict)

    def fail(self, pos: int, check: str, ref: str, why: str) -> None:
        self.failures.append((pos, Failure(check, ref, why)))

    def skew(self, check: str, node: str, off: int, ref: str) -> None:
        s = self.skews.setdefault((check, node), [0, 0, ref])
        s[0] += 1
        s[1] = max(s[1], off)

    # -- top-level objects --------------------------------------------------

    def _signed(self, env: Envelope, payload_type: str) -> bytes:
        """Checks a control-plane envelope strictly; returns the payload.

        Every signature must name a trusted key by its keyid and verify with
        it: a keyid that names another key (or none) is a byte nobody
        authenticated, so it fails even when the signature itself is good.

        Raises:
            VerificationError: wrong payload type, or a signature not as above.
        """
        if env.payload_type != payload_type:
            raise VerificationError(
                f"payload type is {env.payload_type[:80]!r}, expected {payload_type!r}"
            )
        if not env.signatures:
            raise VerificationError("envelope carries no signature")
        if len(env.signatures) > len(self.keys):
            raise VerificationError(
                f"{len(env.signatures)} signatures, more than the {len(self.keys)} trusted keys"
            )
        message = pae(env.payload_type, env.payload)
        seen: set[str] = set()
        for keyid, sig in env.signatures:
            key = self.keys.get(keyid)
            if key is None:
                actual = [k for k in self.keys.values() if _verified(k.raw, sig, message)]
                hint = (
                    f" (the signature is by trusted key {_short(actual[0].keyid)})"
                    if actual
                    else ""
                )
                expected = ", ".join(sorted(_short(k) for k in self.keys))
                raise VerificationError(
                    f"signed by keyid {_short(keyid)}, expected one of {expected}{hint}"
                )
            if keyid in seen:
                raise VerificationError(f"keyid {_short(keyid)} signs twice")
            seen.add(keyid)
            if not _verified(key.raw, sig, message):
                raise VerificationError(
                    f"signature by keyid {_short(keyid)} does not verify with that trusted key"
                )
        self.signers |= seen
        return env.payload

    def _checkpoint(self) -> tuple[int, bytes] | None:
        cp = self.b.checkpoint
        if cp is None:
            self.fail(-3, "checkpoint", "checkpoint", "bundle has no checkpoint")
            return None
        try:
            body, opened = open_checkpoint(cp.note, list(self.keys.values()))
        except VerificationError as err:
            self.fail(-3, "checkpoint", "checkpoint", err.message)
            return None
        self.checkpoint = body
        for sig in opened.verified:
            self.signers |= {
                k.keyid for k in self.keys.values() if key_hash(sig.name, k.raw) == sig.key_hash
            }
        if opened.unknown:
            names = ", ".join(dict.fromkeys(s.ident for s in opened.unknown))
            self.warnings.append(
                Failure(
                    "checkpoint",
                    "checkpoint",
                    f"{len(opened.unknown)} signature line(s) by keys not trusted here "
                    f"(ignored, as C2SP signed-note requires): {names}",
                )
            )
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
                payload = self._signed(env, NODE_CERT_PAYLOAD_TYPE)
                cert = decode_cert(payload)
                if encode_cert(cert) != payload:
                    raise VerificationError("payload is not the certificate's canonical encoding")
                signer = env.signatures[0][0]
                if cert.issuer_keyid != signer:
                    raise VerificationError(
                        f"names issuer {_short(cert.issuer_keyid)} but is signed by "
                        f"{_short(signer)}"
                    )
            except VerificationError as err:
                self.fail(-2, "certificate", f"certificate[{i}]", err.message)
                continue
            certs[cert.node_id].append(cert)
        return certs

    def _leases(self) -> dict[tuple[str, int], _LeaseFacts]:
        grants: dict[tuple[str, int], list[Lease]] = defaultdict(list)
        for i, env in enumerate(self.b.leases):
            try:
                payload = self._signed(env, LEASE_PAYLOAD_TYPE)
                lease = decode_lease(payload)
                if encode_lease(lease) != payload:
                    raise VerificationError("payload is not the lease's canonical encoding")
            except VerificationError as err:
                self.fail(-1, "lease.signature", f"lease[{i}]", err.message)
                continue
            grants[(lease.task_id, lease.fencing_token)].append(lease)
            seen = self.attempts[lease.task_id].get(lease.attempt)
            if seen is None or lease.issued_unix_ms < seen[0]:
                self.attempts[lease.task_id][lease.attempt] = (
                    lease.issued_unix_ms,
                    lease.attempt_deadline_unix_ms,
                    lease.task_deadline_unix_ms,
                )
        return {
            key: _LeaseFacts(
                holder=ls[0],
                windows=_Windows((g.issued_unix_ms, g.expires_unix_ms) for g in ls),
                named=frozenset((g.lease_id, g.issued_unix_ms, g.expires_unix_ms) for g in ls),
            )
            for key, ls in grants.items()
        }

    def _controls(self) -> list[tuple[int, ControlReceipt]]:
        """The control receipts that verify: trusted signature, strict statement, canonical."""
        out: list[tuple[int, ControlReceipt]] = []
        for i, env in enumerate(self.b.control_receipts):
            try:
                payload = self._signed(env, INTOTO_PAYLOAD_TYPE)
                try:
                    doc = strictjson.loads(payload, self.max_depth)
                except strictjson.StrictJSONError as err:
                    raise VerificationError(f"statement: {err.message}") from err
                c = parse_control_statement(doc)
                if control_statement_bytes(c) != payload:
                    raise VerificationError(
                        "payload is not the control receipt's canonical encoding"
                    )
            except VerificationError as err:
                self.fail(-1, "control.receipt", f"control[{i}]", err.message)
                continue
            out.append((i, c))
        return out

    # -- entries --------------------------------------------------------------

    def run(self, pool: Executor, chunks: Iterable[_Src], in_flight: int = _IN_FLIGHT) -> bool:
        """Runs every check; False if a raw chunk was irregular (then start over).

        The workers get every chunk at once; the main process checks the
        leases meanwhile, then takes the chunks' facts in bundle order.
        """
        tree = self._checkpoint()
        by_keyid: dict[str, list[_Cert]] = defaultdict(list)
        node_keyids: dict[str, set[str]] = defaultdict(set)
        for node, cs in self._certificates().items():
            for c in cs:
                by_keyid[c.keyid].append(
                    (c.node_id, c.public_key, c.issued_unix_ms, c.expires_unix_ms)
                )
                node_keyids[node].add(c.keyid)
        ctx = _Context(
            token=os.urandom(16),
            certs={k: tuple(dict.fromkeys(v)) for k, v in by_keyid.items()},
            node_keyids={n: tuple(sorted(ks)) for n, ks in node_keyids.items()},
            tree_size=tree[0] if tree else 0,
            root=tree[1] if tree else None,
            skew_ms=self.skew_ms,
            max_depth=self.max_depth,
            details=self.details,
        )
        # A bounded window of chunks in flight: each is a copy of part of the file
        # (or parsed entries), so submitting all at once would hold the input twice.
        jobs = enumerate(chunks)
        futures: collections.deque[Future[_ChunkResult | None]] = collections.deque()

        def top_up() -> None:
            while len(futures) < in_flight:
                job = next(jobs, None)
                if job is None:
                    return
                futures.append(pool.submit(_check_job, ctx, job[0] << _SHIFT, job[1]))

        top_up()
        if self.raw_leases is not None:  # here, while the workers check the entries
            envelopes = _raw_leases(self.raw_leases)
            if envelopes is None:
                for f in futures:
                    f.cancel()
                return False
            self.b.leases = envelopes
        leases = self._leases()
        # What does not depend on the entries, while the workers still check them.
        self._load_manifest()
        self.controls = self._controls()
        self._story_setup(leases)
        bases: list[int] = []
        total = 0
        last_leaf = -1
        k = -1
        while futures:
            k += 1
            res = futures.popleft().result()
            if res is None:
                for f in futures:
                    f.cancel()
                return False
            top_up()
            leaves, raw_items, fails, skews = res
            items = list(map(_Item._make, raw_items))
            bases.append(total)
            base = k << _SHIFT
            for rel, leaf in enumerate(leaves):
                if leaf <= last_leaf:
                    why = f"leaf index {leaf} after {last_leaf}"
                    self.fail(base | rel, "bundle.order", f"entry[{total + rel}]", why)
                else:
                    last_leaf = leaf
            total += len(leaves)
            self._leased(items, leases)
            for pos, check, ref, why in fails:
                self.fail(pos, check, ref or f"entry[{bases[pos >> _SHIFT] + (pos & _MASK)}]", why)
            for check, node, off, ref in skews:
                self.skew(check, node, off, ref)
        self.entries = total
        m = self.manifest
        if not total and (m is None or not m.per_task or m.nodes):
            # Reject by default: "nothing to check" must never read as "valid".
            self.failures = [(-4, Failure("bundle.format", "bundle", "bundle holds no receipts"))]
            self.controls = []
            return True
        self._gaps()
        self._manifest()
        self._consistency()
        self._scope()
        self._tasks()
        self._control_keyids()
        if not total:
            self._unrun()
        return True

    def _unrun(self) -> None:
        """A per-task export whose signed manifest lists no node receipts at all.

        The manifest proves the tasks ran nothing under a lease; each still needs
        a signed record of its end (a control receipt: canceled while queued,
        expired before any lease), else the bundle holds nothing signed about
        it and is refused, even with --allow-open.
        """
        assert self.manifest is not None
        ended = {c.task_id for _, c in self.controls if c.state in _FINAL_STATES}
        for task in self.manifest.task_ids:
            if task not in ended:
                self.fail(
                    -4,
                    "bundle.format",
                    f"task:{task}",
                    f"task {task!r} has no receipts: nothing was run under a lease, and no "
                    "control receipt records its end, so there is nothing signed to verify",
                )

    def _chained(self, it: _Item) -> None:
        """Forks, duplicates, order and prev links: one item, as it arrives in bundle order.

        Together with `_gaps` this is the `chain.*` family, per node. Each seq
        keeps its first item; a later one with the same seq is a duplicate (the
        same bytes) or a fork. A prev link is checked once both seqs are here,
        whichever came first, so an item's checks never wait for the last chunk.
        """
        node, seq = it.node_id, it.seq
        seen = self.seqs[node]
        old = seen.get(seq)
        if old is not None:
            if old.digest == it.digest:
                self.fail(it.pos, "chain.duplicate", it.ref, "envelope appears twice")
            else:
                self.fail(it.pos, "chain.fork", it.ref, "two different envelopes for one seq")
            return
        top = self.tops[node]
        if seq < top:
            self.fail(it.pos, "chain.order", it.ref, f"seq {seq} comes after seq {top}")
        else:
            self.tops[node] = seq
        seen[seq] = it
        prev = seen.get(seq - 1)
        if prev is not None and it.prev != prev.digest:
            self.fail(it.pos, "chain.prev", it.ref, _BAD_PREV)
        after = seen.get(seq + 1)
        if after is not None and after.prev != it.digest:
            self.fail(after.pos, "chain.prev", after.ref, _BAD_PREV)

    def _gaps(self) -> None:
        """Each node's seqs run from 1 to its last, without a hole (`chain.gap`).

        Work follows the entries: gaps come from the sorted seqs present,
        never from counting up to a seq a receipt claims. A per-task export
        (a verified per-task manifest) has holes by design: there the
        manifest's exact list of seqs replaces the gap check (`_manifest`),
        and prev links are checked where two seqs are consecutive.
        """
        if self.manifest is not None and self.manifest.per_task:
            return
        for node, seen in self.seqs.items():
            # n distinct seqs, each from 1 to the highest, n: exactly 1..n, no hole.
            if len(seen) == self.tops[node] and min(seen) >= 1:
                continue
            before = 0
            for seq in sorted(seen):
                if seq > before + 1:
                    lo, hi = before + 1, seq - 1
                    where = f"{node}#{lo}" if lo == hi else f"{node}#{lo}-{hi}"
                    self.fail(seen[seq].pos, "chain.gap", where, "missing from the bundle")
                before = seq

    def _load_manifest(self) -> None:
        """Verifies the signed export manifest (compared with the entries in `_manifest`)."""
        env = self.b.manifest
        if env is None:
            self.fail(-3, "manifest", "manifest", "bundle has no export manifest")
            return
        try:
            payload = self._signed(env, MANIFEST_PAYLOAD_TYPE)
            m = decode_manifest(payload)
            if encode_manifest(m) != payload:
                raise VerificationError("payload is not the manifest's canonical encoding")
        except VerificationError as err:
            self.fail(-3, "manifest", "manifest", err.message)
            return
        self.manifest = m

    def _manifest(self) -> None:
        """Compares the signed export manifest with what the bundle holds."""
        m = self.manifest
        if m is None:
            return
        cp = self.b.checkpoint
        if cp is not None and (m.origin, m.tree_size, m.root_hash) != (
            cp.origin,
            cp.tree_size,
            cp.root_hash,
        ):
            self.fail(-3, "manifest", "manifest", "manifest is for another checkpoint")
        if m.exported_unix_ms != self.b.exported_unix_ms:
            self.fail(
                -3,
                "manifest",
                "manifest",
                f"the bundle's exportedUnixMs {self.b.exported_unix_ms} is not the "
                f"manifest's {m.exported_unix_ms}",
            )
        self._manifest_controls(m)
        by_node = self.by_node
        listed = {n.node_id: n for n in m.nodes}
        for node in sorted(set(by_node) - set(listed)):
            pos = by_node[node][-1].pos
            self.fail(pos, "manifest", node, "node's receipts are not in the export manifest")
        if m.per_task:
            self._per_task(m, by_node)
        for node_id, n in listed.items():
            items = by_node.get(node_id)
            if not items:
                self.fail(
                    _END,
                    "manifest",
                    f"{node_id}#1-{n.last_seq}" if not m.per_task else _seq_ranges(node_id, n.seqs),
                    "manifest lists the node but the bundle holds none of its receipts",
                )
                continue
            top = self.tops[node_id]
            last = self.seqs[node_id][top]  # the first item of the highest seq
            if top < n.last_seq:
                if not m.per_task:  # (a per-task export names each missing seq in _per_task)
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
            elif last.digest.hex() != n.last_envelope_sha256:
                self.fail(
                    last.pos,
                    "manifest",
                    last.ref,
                    "last envelope's digest differs from the manifest's",
                )
            tasks = self.node_tasks[node_id]
            if tasks != set(n.task_ids):
                diff = sorted(tasks.symmetric_difference(n.task_ids))
                self.fail(
                    last.pos,
                    "manifest",
                    f"{node_id}",
                    f"task ids differ from the manifest's: {', '.join(diff)}",
                )

    def _manifest_controls(self, m: ExportManifest) -> None:
        """The bundle's control receipts are exactly those the manifest lists.

        A dropped one could turn an ended lease into an open one (`--allow-open`),
        an added one could end a task the control plane did not end.
        """
        listed = set(m.control_receipts)
        seen: set[str] = set()
        for i, env in enumerate(self.b.control_receipts):
            d = control_receipt_digest(env)
            if d not in listed:
                self.fail(
                    -3,
                    "manifest",
                    f"control[{i}]",
                    "control receipt is not in the export manifest's list (not one the "
                    "bundle was exported with)",
                )
            elif d in seen:
                self.fail(-3, "manifest", f"control[{i}]", "control receipt appears twice")
            seen.add(d)
        missing = sorted(listed - seen)
        if missing:
            self.fail(
                -3,
                "manifest",
                "manifest",
                f"{len(missing)} control receipt(s) listed in the export manifest are missing "
                f"from the bundle (first sha256 {missing[0][:16]}…)",
            )

    def _per_task(self, m: ExportManifest, by_node: dict[str, list[_Item]]) -> None:
        """A per-task export holds the listed (node, seq) pairs, all of the exported tasks."""
        exported = set(m.task_ids)
        names = ", ".join(m.task_ids[:3]) + (", …" if len(m.task_ids) > 3 else "")
        for n in m.nodes:
            items = by_node.get(n.node_id, [])
            have = {it.seq: it for it in items}
            want = set(n.seqs)
            for seq in sorted(set(have) - want):
                it = have[seq]
                self.fail(
                    it.pos,
                    "manifest",
                    it.ref,
                    "receipt is not in the export manifest's list (not one the bundle was "
                    "exported with)",
                )
            missing = sorted(want - set(have))
            if missing and items:
                self.fail(
                    max(items, key=lambda it: it.seq).pos,
                    "manifest",
                    _seq_ranges(n.node_id, missing),
                    f"{len(missing)} receipt(s) listed in the export manifest are missing "
                    "from the bundle",
                )
        for items in by_node.values():
            for it in items:
                if it.task_id not in exported:
                    self.fail(
                        it.pos,
                        "manifest",
                        it.ref,
                        f"receipt of task {it.task_id!r}, but the bundle was exported for {names}",
                    )

    def _scope(self) -> None:
        """A per-task export's leases and control receipts are of the exported tasks only.

        Signed by the control key, a foreign task's lease or control receipt would
        still verify on its own, and slip a story the manifest does not cover into
        the verdict (or leak it from another export).
        """
        m = self.manifest
        if m is None or not m.per_task:
            return
        exported = set(m.task_ids)
        for task in sorted(set(self.attempts) - exported):
            self.fail(
                -1,
                "manifest",
                f"task:{task}",
                f"lease of task {task!r}, but the bundle was exported for its tasks only "
                f"({len(exported)} listed in the manifest)",
            )
        for i, c in self.controls:
            if c.task_id not in exported:
                self.fail(
                    -1,
                    "manifest",
                    f"control[{i}]",
                    f"control receipt of task {c.task_id!r}, but the bundle was exported for "
                    f"its tasks only ({len(exported)} listed in the manifest)",
                )

    def _consistency(self) -> None:
        """The bundle's checkpoint extends the previous one the auditor saw (RFC 9162 §2.1.4)."""
        text = self.previous_checkpoint
        if text is None:
            return
        ref = "previous checkpoint"
        try:
            prev, _ = open_checkpoint(text, list(self.keys.values()))
        except VerificationError as err:
            self.fail(-3, "consistency", ref, f"the previous checkpoint does not verify: {err}")
            return
        cp, m = self.checkpoint, self.manifest
        if cp is None:
            self.fail(-3, "consistency", ref, "the bundle has no verified checkpoint to compare")
            return
        if prev.origin != cp.origin:
            self.fail(
                -3,
                "consistency",
                ref,
                f"the previous checkpoint is of log {prev.origin!r}, the bundle's of {cp.origin!r}",
            )
            return
        why = ""
        if prev.tree_size > cp.tree_size:
            why = (
                f"the previous checkpoint (tree size {prev.tree_size}) is newer than the "
                f"bundle's ({cp.tree_size})"
            )
        elif prev.tree_size == cp.tree_size:
            if prev.root_hash != cp.root_hash:
                why = (
                    f"two different roots for tree size {cp.tree_size}: the log forked or was "
                    "rewritten"
                )
        elif m is None:
            why = "the bundle has no verified manifest to carry a consistency proof"
        elif m.previous_tree_size != prev.tree_size:
            why = (
                f"the bundle carries a consistency proof from tree size "
                f"{m.previous_tree_size or 'none'}, not from the previous checkpoint's "
                f"{prev.tree_size} (export it with --previous-checkpoint)"
            )
        elif not verify_consistency(
            prev.tree_size, cp.tree_size, prev.root_hash, cp.root_hash, m.consistency_proof
        ):
            why = (
                f"the consistency proof does not show the tree of size {prev.tree_size} is a "
                f"prefix of the bundle's tree of size {cp.tree_size}: the log forked or was "
                "rewritten"
            )
        if why:
            self.fail(-3, "consistency", ref, why)
        else:
            self.consistent_with = prev.tree_size

    def _control_keyids(self) -> None:
        """controlKeyids must be sorted, distinct ids of trusted keys that signed here."""
        ids = list(self.b.control_keyids)
        why = ""
        if not ids:
            why = "no controlKeyids: the bundle must name the control keys that signed it"
        elif ids != sorted(set(ids)):
            why = "controlKeyids are not sorted and distinct"
        else:
            stray = [k for k in ids if k not in self.signers]
            if stray:
                why = (
                    f"controlKeyids name {_short(stray[0])}, which signed nothing in the "
                    f"bundle; the signers are "
                    f"{', '.join(sorted(_short(k) for k in self.signers)) or 'none'}"
                )
        if why:
            self.fail(-3, "control.keyids", "bundle", why)

    def _leased(self, items: list[_Item], leases: dict[tuple[str, int], _LeaseFacts]) -> None:
        """Each receipt against its signed lease; run on each chunk's items as they arrive.

        Nothing here depends on another entry, so the main process does it while
        the workers check the next chunks, instead of after the last one.
        """
        by_node, by_task, node_tasks = self.by_node, self.by_task, self.node_tasks
        chained, stories = self._chained, self.stories
        finished: list[str] = []
        for it in items:
            by_node[it.node_id].append(it)
            by_task[it.task_id].append(it)
            node_tasks[it.node_id].add(it.task_id)
            chained(it)
            if it.task_id in stories:  # told too early: tell it again at the end
                del stories[it.task_id]
            if it.kind == _TASK_FINISHED:
                finished.append(it.task_id)
            facts = leases.get((it.task_id, it.fencing_token))
            if facts is None:
                self.fail(
                    it.pos,
                    "lease.missing",
                    it.ref,
                    f"no signed lease for task {it.task_id!r} token {it.fencing_token}",
                )
                continue
            holder = facts.holder
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
            # Control-stamped against control-signed: the window the receipt names
            # must be one the control plane signed, to the millisecond.
            if (it.lease_id, it.lease_issued, it.lease_expires) not in facts.named:
                self.fail(
                    it.pos,
                    "lease.window",
                    it.ref,
                    f"names lease {it.lease_id!r} window [{it.lease_issued}, "
                    f"{it.lease_expires}), which no signed lease of the task has",
                )
            if it.kind in _WINDOW_EXEMPT:
                continue
            # Node-stamped against control-stamped: within the clock-skew bound.
            off = facts.windows.distance(it.time_unix_ms)
            if off > self.skew_ms:
                self.fail(
                    it.pos,
                    "lease.window",
                    it.ref,
                    f"time {it.time_unix_ms} is {off} ms outside every window of its lease "
                    f"(clock-skew bound {self.skew_ms} ms)",
                )
            elif off:
                self.skew("lease.window", it.node_id, off, it.ref)
        # A task's story, told as soon as its task_finished is here (while the workers
        # still check later chunks), and again at the end if more of it comes.
        story = self._story
        for task in finished:
            stories[task] = story(task)

    def _tasks(self) -> None:
        by_task = self.by_task
        stories = self.stories
        for task in dict.fromkeys([*by_task, *self.ctl_by_task]):
            told = stories.get(task)
            self.failures += told if told is not None else self._story(task)
        if self.manifest is not None and not self.allow_open:
            ended = {c.task_id for _, c in self.controls}
            for task in self.manifest.task_ids:
                if task not in by_task and task not in ended:
                    self.fail(
                        _END,
                        "task.final",
                        f"task:{task}",
                        "exported task has no receipts (so no final record)",
                    )

    def _story_setup(self, leases: dict[tuple[str, int], _LeaseFacts]) -> None:
        """What each task's story needs besides its receipts: its control receipts and leases.

        Also checks that each control receipt ends a signed lease of its holder.
        """
        ctl_by_task: dict[str, list[tuple[int, ControlReceipt]]] = defaultdict(list)
        for i, c in self.controls:
            ctl_by_task[c.task_id].append((i, c))
            if not c.lease_id:
                continue
            facts = leases.get((c.task_id, c.fencing_token))
            if facts is None or (c.lease_id, c.node_id, c.agent_id, c.attempt) != (
                facts.holder.lease_id,
                facts.holder.node_id,
                facts.holder.agent_id,
                facts.holder.attempt,
            ):
                self.fail(
                    -1,
                    "control.receipt",
                    f"control[{i}]",
                    f"ends lease {c.lease_id!r} of task {c.task_id!r} (token {c.fencing_token}, "
                    f"holder {c.node_id}/{c.agent_id}), which no signed lease matches",
                )
        self.ctl_by_task = ctl_by_task
        for task, token in leases:
            self.tokens[task].add(token)

    def _story(self, task: str) -> list[tuple[int, Failure]]:
        """Each lease of the task ends once and it has one final record (see `lease.closed`).

        A node's task_finished ends its lease and the task; a control receipt
        ends the lease it names (lapse, release, cancel) and, when it leaves
        the task expired or canceled, the task. Told from the receipts of the
        task that have arrived: `run` tells it again at the end if another
        receipt of the task came after.
        """
        out: list[tuple[int, Failure]] = []

        def fail(pos: int, check: str, ref: str, why: str) -> None:
            out.append((pos, Failure(check, ref, why)))

        items = self.by_task.get(task, [])
        ctls = self.ctl_by_task.get(task, [])
        pos = items[-1].pos if items else _END
        ref = f"task:{task}"
        # A holder's task_finished ends its lease; it ends the task unless the
        # retry policy retried the failure (final_state queued).
        node_ends = [it for it in items if it.kind == _TASK_FINISHED]
        node_finals = [it for it in node_ends if it.final_state in _FINAL_STATES]
        leased = self.tokens.get(task, set())
        last = max(
            [*leased, *(it.fencing_token for it in items), *(c.fencing_token for _, c in ctls)],
            default=0,
        )
        top = max(leased, default=0)  # the task's last signed lease: --allow-open's
        ends: dict[int, list[str]] = defaultdict(list)
        for it in node_ends:
            ends[it.fencing_token].append(it.ref)
        for i, c in ctls:
            if c.lease_id:
                ends[c.fencing_token].append(f"control[{i}]")
        for token in sorted(leased | set(ends)):
            got = ends.get(token, [])
            if len(got) > 1:
                fail(
                    pos,
                    "lease.closed",
                    ref,
                    f"lease token {token} ends {len(got)} times ({', '.join(got)})",
                )
            elif not got and token in leased and not (self.allow_open and token == top):
                fail(
                    pos,
                    "lease.closed",
                    ref,
                    f"lease token {token} has no end on record: no task_finished receipt of "
                    "its holder and no control receipt (lapse, release or cancel)",
                )
        finals: list[tuple[int, str, int, int]] = [  # (pos, ref, token, state)
            (it.pos, it.ref, it.fencing_token, it.final_state) for it in node_finals
        ]
        finals += [
            (_END, f"control[{i}]", c.fencing_token, c.state)
            for i, c in ctls
            if c.state in _FINAL_STATES
        ]
        if len(finals) > 1:
            for fpos, fref, _, _ in finals[1:]:
                fail(
                    fpos,
                    "task.final",
                    fref,
                    f"task {task!r} has {len(finals)} final records "
                    f"({', '.join(f[1] for f in finals)})",
                )
        elif not finals:
            if not self.allow_open:
                fail(
                    pos,
                    "task.final",
                    ref,
                    "task has no final record: no task_finished receipt and no control "
                    "receipt that ends it (expired, canceled)",
                )
        else:
            fpos, fref, ftoken, fstate = finals[0]
            if ftoken < last:
                fail(
                    fpos,
                    "task.final",
                    fref,
                    f"task {task!r} ends under fencing token {ftoken}, but a lease or "
                    f"receipt of it has the later token {last}",
                )
            if node_finals and fstate not in _NODE_FINAL_STATES:
                fail(
                    fpos,
                    "task.final",
                    fref,
                    f"a node reports only succeeded or failed; "
                    f"{state_name(fstate, str(fstate))} is the control plane's to record",
                )
        return out

    def report(self) -> Report:
        self.failures.sort(key=lambda pf: (pf[0], _RANK[pf[1].check]))
        warnings = list(self.warnings)
        for (check, node), (n, worst, ref) in sorted(self.skews.items()):
            what = "lease windows" if check == "lease.window" else "node certificate's validity"
            warnings.append(
                Failure(
                    check,
                    ref,
                    f"{n} receipt time(s) of node {node} lie up to {worst} ms outside their "
                    f"{what}: accepted as clock skew, within the {self.skew_ms} ms bound",
                )
            )
        report = Report(
            failures=[f for _, f in self.failures],
            entries=self.entries,
            nodes=len(self.by_node),
            origin=self.checkpoint.origin if self.checkpoint else "",
            exported_tasks=list(self.manifest.task_ids) if self.manifest else [],
            consistent_with=self.consistent_with,
            tree_size=self.checkpoint.tree_size if self.checkpoint else 0,
            warnings=warnings,
        )
        by_task, controls = self.by_task, self.controls
        count = len(by_task) + len({c.task_id for _, c in controls} - by_task.keys())
        report.tasks_from(count, functools.partial(_task_reports, by_task, controls, self.attempts))
        return report


def _task_reports(
    by_task: dict[str, list[_Item]],
    controls: list[tuple[int, ControlReceipt]],
    attempts: dict[str, dict[int, tuple[int, int, int]]],
) -> list[TaskReport]:
    """Each task's receipts and control receipts in time order, its final state and limits."""
    tasks: dict[str, TaskReport] = {}
    by_time = operator.itemgetter(6, 0)  # (time_unix_ms, pos) of an _Item
    for task_id, items in by_task.items():
        report = tasks[task_id] = TaskReport(task_id)
        events = report.events
        for it in sorted(items, key=by_time):
            events.append(Event(it.time_unix_ms, it.ref, _KIND_NAMES[it.kind], it.detail))
            if it.kind == _TASK_FINISHED:
                report.final_state = state_name(it.final_state, str(it.final_state))
    controlled: set[str] = set()  # tasks whose events are no longer in time order
    for i, c in controls:
        tr = tasks.get(c.task_id)
        if tr is None:
            tr = tasks[c.task_id] = TaskReport(c.task_id)
        tr.events.append(
            Event(c.time_unix_ms, f"control[{i}]", c.end_reason.label, _control_detail(c))
        )
        controlled.add(c.task_id)
        if c.state in _FINAL_STATES:
            tr.final_state = state_name(c.state)
    for tr in tasks.values():
        if tr.task_id in controlled:
            tr.events.sort(key=lambda e: e.time_unix_ms)  # stable: bundle order on ties
        tr.limits = _limit_lines(attempts.get(tr.task_id, {}))
    return sorted(tasks.values(), key=lambda t: t.task_id)


def _seq_ranges(node: str, seqs: Sequence[int], most: int = 4) -> str:
    """`node#3-5,9` for sorted seqs: the first few runs, then how many more."""
    runs: list[list[int]] = []
    for q in seqs:
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
    more = f",… ({len(runs) - most} more runs)" if len(runs) > most else ""
    return f"{node}#{text}{more}"


_BAD_PREV = "prev is not the digest of the previous envelope"
_KIND_NAMES = {int(k): k.name.lower() for k in ReceiptKind}
_TASK_FINISHED = int(ReceiptKind.TASK_FINISHED)
_FINAL_STATES = frozenset(int(s) for s in TERMINAL)
_NODE_FINAL_STATES = frozenset({int(State.SUCCEEDED), int(State.FAILED)})


def _limit_lines(attempts: dict[int, tuple[int, int, int]]) -> list[str]:
    """The signed leases' limits: the task deadline, then each attempt's grant and timeout.

    The gap between grants shows the retry delays the control plane kept.
    """
    deadlines = {d for _, _, d in attempts.values() if d}
    lines = [f"deadline={_iso(d)}" for d in sorted(deadlines)]
    previous = 0
    for n in sorted(attempts):
        issued, due, _ = attempts[n]
        line = f"attempt {n} granted={_iso(issued)}"
        if previous:
            line += f" (+{issued - previous} ms after attempt {n - 1}'s grant)"
        if due:
            line += f" attempt_timeout_due={_iso(due)}"
        lines.append(line)
        previous = issued
    return lines if deadlines or any(due for _, due, _ in attempts.values()) else []


def _iso(unix_ms: int) -> str:
    secs, ms = divmod(unix_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def _control_detail(c: ControlReceipt) -> str:
    parts = [f"by=control clock={c.clock or '?'} attempt={c.attempt} token={c.fencing_token}"]
    if c.lease_id:
        parts.append(f"holder={c.node_id}/{c.agent_id}")
    parts.append(f"state={state_name(c.state)}")
    if c.reason:
        parts.append(f"reason={json.dumps(c.reason)}")
    return " ".join(parts)


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
