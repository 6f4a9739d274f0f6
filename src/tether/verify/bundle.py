"""The bundle file: proto3 JSON of `tether.v1.Bundle`, read and written without protobuf.

A 100,000-receipt bundle is a few hundred MB of JSON; parsing it with
`json.loads` and plain dicts is several times faster than protobuf's JSON
parser, and keeps the verifier's hot path free of message objects. The reader
is strict and bounded (see `Limits` and `tether.verify.strictjson`): unknown
or repeated fields, wrong types, non-canonical base64 or decimals, and a
checkpoint time (which nothing signs) are refused, so every byte of a bundle
is either authenticated by a signature or hash, or rejected. It accepts both
the lowerCamelCase and the proto field names, as proto3 JSON parsers must.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import io
import json
import mmap
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pybase64

from tether.core.errors import VerificationError
from tether.crypto.signing import Envelope
from tether.verify import strictjson

BUNDLE_VERSION = 1


class BundleFormatError(VerificationError):
    """The bundle file is not a well-formed version-1 bundle."""

    reason = "BUNDLE_FORMAT"


class BundleTooLarge(VerificationError):
    """The input is larger than the verifier was allowed to read (`Limits.max_bytes`)."""

    reason = "BUNDLE_TOO_LARGE"


@dataclass(frozen=True)
class Limits:
    """Bounds on what the verifier reads, so its work and memory follow its input's size."""

    max_bytes: int = 1 << 30
    """Largest bundle accepted (1 GiB, about 400,000 receipts); `tether verify --max-bytes`."""
    max_depth: int = 16
    """Deepest JSON nesting accepted, in the file and in each receipt statement (real
    bundles nest 5 deep); `tether verify --max-depth`."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if not 1 <= self.max_depth <= 512:
            raise ValueError("max_depth must be between 1 and 512")


@dataclass(frozen=True)
class Entry:
    """One exported receipt: exact envelope bytes, ledger index, inclusion proof.

    Proof hashes are kept as their canonical base64 text (44 characters each),
    as they appear in the file: the verifier compares most of them without
    decoding, and decodes only the few it hashes.
    """

    envelope: bytes
    leaf_index: int
    proof_index: int
    proof_size: int
    proof_b64: tuple[str, ...]

    @classmethod
    def of(
        cls,
        envelope: bytes,
        leaf_index: int,
        proof_index: int,
        proof_size: int,
        proof: Iterable[bytes],
    ) -> Entry:
        """An entry from raw proof hashes."""
        return cls(envelope, leaf_index, proof_index, proof_size, tuple(_e64(h) for h in proof))

    @property
    def proof(self) -> tuple[bytes, ...]:
        """The proof hashes as bytes."""
        return tuple(binascii.a2b_base64(h) for h in self.proof_b64)


@dataclass(frozen=True)
class CheckpointInfo:
    """The bundle's checkpoint message; only `note` is signed, the rest must match it."""

    origin: str
    tree_size: int
    root_hash: bytes
    timestamp_unix_ms: int
    note: str


@dataclass
class Bundle:
    """A parsed bundle (see receipt.proto `Bundle`)."""

    entries: list[Entry]
    node_certificates: list[Envelope]
    leases: list[Envelope]
    checkpoint: CheckpointInfo | None
    control_keyids: list[str] = field(default_factory=list)
    exported_unix_ms: int = 0
    manifest: Envelope | None = None
    """The control plane's signed ExportManifest (see `tether.crypto.manifest`)."""
    version: int = BUNDLE_VERSION
    control_receipts: list[Envelope] = field(default_factory=list)
    """Control-signed receipts of lapses, releases and cancels (`ControlReceipt`)."""


# --- reading -----------------------------------------------------------------


def _b64(v: Any, what: str) -> bytes:
    """Decodes canonical standard base64 only (RFC 4648 §4, padded, zero trailing bits).

    proto3 JSON readers also take URL-safe or unpadded base64; this one does
    not, so that one byte string has exactly one text and no character of it
    goes unauthenticated.
    """
    if type(v) is not str:
        raise BundleFormatError(f"{what}: expected a base64 string")
    try:  # the fast codec first; the standard one decides (and names) anything else
        raw = pybase64.b64decode(v, validate=True)
        if pybase64.b64encode_as_string(raw) == v:
            return raw
    except ValueError:  # binascii.Error, or not ASCII
        pass
    try:
        raw = binascii.a2b_base64(v, strict_mode=True)
    except binascii.Error as err:
        raise BundleFormatError(f"{what}: not standard base64") from err
    if binascii.b2a_base64(raw, newline=False).decode() != v:
        raise BundleFormatError(f"{what}: base64 is not canonical")
    return raw


_DECIMAL = re.compile(r"0|-?[1-9][0-9]*")


def _decimal(v: Any, what: str) -> int:
    """An integer given as a JSON number or a decimal string, without leading zeros."""
    if type(v) is str:
        if len(v) > 20 or _DECIMAL.fullmatch(v) is None:
            raise BundleFormatError(f"{what}: not a canonical decimal integer")
        return int(v)
    if type(v) is not int:
        raise BundleFormatError(f"{what}: expected an integer")
    return v


def _uint(v: Any, what: str) -> int:
    n = _decimal(v, what)
    if not 0 <= n < 1 << 64:
        raise BundleFormatError(f"{what}: expected an unsigned 64-bit integer")
    return n


def _int(v: Any, what: str) -> int:
    n = _decimal(v, what)
    if not -(1 << 63) <= n < 1 << 63:
        raise BundleFormatError(f"{what}: expected a signed 64-bit integer")
    return n


@functools.lru_cache(maxsize=64)
def _json_names(names: tuple[str, ...]) -> dict[str, str]:
    """Each proto field name and its lowerCamelCase JSON name -> the field name."""
    allowed = {}
    for n in names:
        head, *rest = n.split("_")
        allowed[n] = n
        allowed[head + "".join(p.capitalize() for p in rest)] = n
    return allowed


def _obj(v: Any, what: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Normalizes an object's keys to proto field names, refusing unknown ones."""
    if not isinstance(v, dict):
        raise BundleFormatError(f"{what}: expected an object")
    allowed = _json_names(names)  # built once per message type, not per object
    out: dict[str, Any] = {}
    for k, x in v.items():
        name = allowed.get(k)
        if name is None:
            raise BundleFormatError(f"{what}: unknown field {k!r}")
        if name in out:
            raise BundleFormatError(f"{what}: field {name!r} given twice")
        if x is not None:
            out[name] = x
    return out


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise BundleFormatError(f"{what}: expected a list")
    return v


def _envelope(v: Any, what: str) -> Envelope:
    d = _obj(v, what, ("payload", "payload_type", "signatures"))
    sigs = []
    for i, s in enumerate(_list(d.get("signatures", []), what)):
        sd = _obj(s, f"{what}.signatures[{i}]", ("keyid", "sig"))
        keyid = sd.get("keyid", "")
        if type(keyid) is not str:
            raise BundleFormatError(f"{what}: keyid must be a string")
        sigs.append((keyid, _b64(sd.get("sig", ""), f"{what}.sig")))
    ptype = d.get("payload_type", "")
    if type(ptype) is not str or not ptype or not sigs:
        raise BundleFormatError(f"{what}: envelope needs a payload type and a signature")
    return Envelope(_b64(d.get("payload", ""), f"{what}.payload"), ptype, tuple(sigs))


_ENTRY_FIELDS = ("envelope", "leaf_index", "proof")
_PROOF_FIELDS = ("leaf_index", "tree_size", "hashes")


# Canonical base64 of 32-byte hashes: 42 free characters, one whose low four
# bits are zero, and one "=" (so text and bytes map one to one).
_HASHES_B64 = re.compile(r"(?:[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=)*")


def _entries(items: list[Any]) -> list[Entry]:
    out: list[Entry] = []
    fast_entry = {"envelope", "leafIndex", "proof"}
    fast_proof = {"leafIndex", "treeSize", "hashes"}
    for i, raw in enumerate(items):
        what = f"entries[{i}]"
        # Fast path for the canonical camelCase form this package writes.
        if isinstance(raw, dict) and raw.keys() <= fast_entry:
            d = raw
            p = d.get("proof") or {}
            if not (isinstance(p, dict) and p.keys() <= fast_proof):
                p = _obj(p, what + ".proof", _PROOF_FIELDS)
                p = {
                    "leafIndex": p.get("leaf_index", 0),
                    "treeSize": p.get("tree_size", 0),
                    "hashes": p.get("hashes"),
                }
            leaf_index, pidx, psize, hashes = (
                d.get("leafIndex", 0),
                p.get("leafIndex", 0),
                p.get("treeSize", 0),
                p.get("hashes") or [],
            )
            env = d.get("envelope", "")
        else:
            d = _obj(raw, what, _ENTRY_FIELDS)
            p = _obj(d.get("proof", {}), what + ".proof", _PROOF_FIELDS)
            leaf_index, pidx, psize, hashes = (
                d.get("leaf_index", 0),
                p.get("leaf_index", 0),
                p.get("tree_size", 0),
                p.get("hashes") or [],
            )
            env = d.get("envelope", "")
        hashes = _list(hashes, what + ".proof.hashes")
        try:
            ok = _HASHES_B64.fullmatch("".join(hashes)) is not None
        except TypeError:
            ok = False
        if not ok:  # say which one is wrong: not base64, not canonical, or not 32 bytes
            for j, h in enumerate(hashes):
                if len(_b64(h, f"{what}.proof.hashes[{j}]")) != 32:
                    raise BundleFormatError(f"{what}.proof.hashes[{j}]: not a 32-byte hash")
        out.append(
            Entry(
                envelope=_b64(env, what + ".envelope"),
                leaf_index=_uint(leaf_index, what + ".leaf_index"),
                proof_index=_uint(pidx, what + ".proof.leaf_index"),
                proof_size=_uint(psize, what + ".proof.tree_size"),
                proof_b64=tuple(hashes),
            )
        )
    return out


def read_bundle(stream: IO[bytes], limits: Limits | None = None) -> bytes:
    """Reads a bundle from a file or pipe, stopping early at anything that is not JSON.

    Binary garbage (a file of zeros, an image) is refused at its first block,
    and nothing past `limits.max_bytes` is read.

    Raises:
        BundleFormatError: the input cannot be a bundle (it does not start with
            "{", or holds a byte JSON never holds).
        BundleTooLarge: more than `limits.max_bytes` bytes.
    """
    return b"".join(_checked_blocks(stream, limits or Limits()))


def spool_bundle(stream: IO[bytes], limits: Limits | None = None) -> Any:
    """`read_bundle` for a pipe of any size: the blocks go to an unlinked temporary file
    that is then mapped, so the process holds a block at a time, not the whole bundle
    (twice, with the join), whatever `--max-bytes` allows. Same refusals.

    Raises:
        OSError: the temporary file cannot be written (no space in $TMPDIR).
        BundleFormatError, BundleTooLarge: as `read_bundle`.
    """
    with tempfile.TemporaryFile(prefix="tether-verify-") as spool:
        for block in _checked_blocks(stream, limits or Limits()):
            spool.write(block)
        spool.flush()
        if spool.tell() == 0:
            return b""
        return mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ)


def _checked_blocks(stream: IO[bytes], limits: Limits) -> Iterator[bytes]:
    """The stream's blocks, each checked as it is read (see `read_bundle`)."""
    total = 0
    started = False  # the first byte after leading whitespace was seen
    while True:
        block = stream.read(min(1 << 20, limits.max_bytes + 1 - total))
        if not block:
            return
        if not started:
            head = block.lstrip(b" \t\n\r")
            if head:
                started = True
                if head[:1] != b"{":
                    raise BundleFormatError("not a bundle: a bundle file is a JSON object")
        at = strictjson.control_byte(block)
        if at >= 0:
            raise BundleFormatError(
                f"not a bundle: control byte 0x{block[at]:02x} at offset {total + at}"
            )
        total += len(block)
        if total > limits.max_bytes:
            raise BundleTooLarge(
                f"bundle is larger than {limits.max_bytes} bytes (the --max-bytes limit)"
            )
        yield block


_LEADING_WS = re.compile(rb"[ \t\n\r]*")


def open_bundle(path: str | os.PathLike[str], limits: Limits | None = None) -> Any:
    """A bundle file as bytes for `verify_bundle`: a read-only map of a regular file.

    Mapped, a file of any size costs the verifier's process only the chunks it
    is parsing (the page cache holds the rest, shared and reclaimable), not a
    copy of the whole. Anything else (a pipe, an empty file) is read with
    `read_bundle`. The refusals are `read_bundle`'s, but for control bytes in
    a mapped file: `verify_bundle` names the first one itself (without a pass
    over the whole file before its workers start, see `_verify`).

    Raises:
        OSError: the file cannot be opened or mapped.
        BundleFormatError: the input cannot be a bundle.
        BundleTooLarge: more than `limits.max_bytes` bytes.
    """
    limits = limits or Limits()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return read_bundle(f, limits)
        if st.st_size > limits.max_bytes:
            raise BundleTooLarge(
                f"bundle is larger than {limits.max_bytes} bytes (the --max-bytes limit)"
            )
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    start = _LEADING_WS.match(data)
    at = start.end() if start is not None else 0
    if at < len(data) and data[at : at + 1] != b"{":
        raise BundleFormatError("not a bundle: a bundle file is a JSON object")
    return data


def decode_bundle(data: bytes, limits: Limits | None = None, *, canonical: bool = True) -> Bundle:
    """Parses a bundle file strictly and within `limits`.

    With `canonical` (the default, and what the verifier uses) the file must
    be byte for byte what `encode_bundle` writes for its content: compact,
    lowerCamelCase, fields in order, 64-bit integers as strings, non-ASCII
    escaped, one final newline. So a bundle has exactly one encoding, and no
    byte of it (not even a space) goes unauthenticated. `canonical=False`
    also reads what other proto3 JSON writers emit (proto field names,
    numbers for 64-bit integers, any whitespace), for tools, not for verdicts.

    Raises:
        BundleFormatError: not strict JSON (see `tether.verify.strictjson`),
            unknown or repeated fields, wrong types, non-canonical encodings,
            a checkpoint time, a version other than 1, over the limits, or
            (with `canonical`) not the canonical encoding.
    """
    bundle = _decode(data, limits or Limits())
    if canonical:
        again = encode_bundle(bundle)
        if again != data:
            at = _first_difference(again, data)
            raise BundleFormatError(
                f"bundle is not in its canonical encoding (as `tether receipts export` "
                f"writes it): first difference at byte {at}"
            )
    return bundle


def _first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte where `a` and `b` differ (they do), by bisection."""
    va, vb = memoryview(a), memoryview(b)
    lo, hi = 0, min(len(a), len(b))
    if va[:hi] == vb[:hi]:
        return hi
    while hi - lo > 1:  # va[:lo] == vb[:lo] and va[:hi] != vb[:hi]
        mid = (lo + hi) // 2
        if va[:mid] == vb[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _decode(data: bytes, limits: Limits) -> Bundle:
    if len(data) > limits.max_bytes:
        raise BundleFormatError(f"bundle is larger than {limits.max_bytes} bytes")
    try:
        doc = strictjson.loads(data, limits.max_depth)
    except strictjson.StrictJSONError as err:
        raise BundleFormatError(f"bundle is not strict JSON: {err.message}") from err
    d = _obj(
        doc,
        "bundle",
        (
            "version",
            "entries",
            "node_certificates",
            "leases",
            "checkpoint",
            "control_keyids",
            "exported_unix_ms",
            "manifest",
            "control_receipts",
        ),
    )
    version = _uint(d.get("version", 0), "version")
    if version != BUNDLE_VERSION:
        raise BundleFormatError(f"unsupported bundle version {version}")
    cp = None
    if "checkpoint" in d:
        c = _obj(
            d["checkpoint"],
            "checkpoint",
            ("origin", "tree_size", "root_hash", "timestamp_unix_ms", "note"),
        )
        origin, note = c.get("origin", ""), c.get("note", "")
        if type(origin) is not str or type(note) is not str:
            raise BundleFormatError("checkpoint: origin and note must be strings")
        if _int(c.get("timestamp_unix_ms", 0), "checkpoint.timestamp_unix_ms") != 0:
            # The note does not sign a time, so a bundle must not claim one.
            raise BundleFormatError(
                "checkpoint.timestampUnixMs is signed by nothing; a bundle must not carry it"
            )
        cp = CheckpointInfo(
            origin=origin,
            tree_size=_uint(c.get("tree_size", 0), "checkpoint.tree_size"),
            root_hash=_b64(c.get("root_hash", ""), "checkpoint.root_hash"),
            timestamp_unix_ms=0,
            note=note,
        )
    keyids = _list(d.get("control_keyids", []), "control_keyids")
    if any(type(k) is not str for k in keyids):
        raise BundleFormatError("control_keyids must be strings")
    return Bundle(
        version=version,
        entries=_entries(_list(d.get("entries", []), "entries")),
        node_certificates=[
            _envelope(e, f"node_certificates[{i}]")
            for i, e in enumerate(_list(d.get("node_certificates", []), "node_certificates"))
        ],
        leases=[
            _envelope(e, f"leases[{i}]") for i, e in enumerate(_list(d.get("leases", []), "leases"))
        ],
        checkpoint=cp,
        control_keyids=list(keyids),
        exported_unix_ms=_int(d.get("exported_unix_ms", 0), "exported_unix_ms"),
        manifest=_envelope(d["manifest"], "manifest") if "manifest" in d else None,
        control_receipts=[
            _envelope(e, f"control_receipts[{i}]")
            for i, e in enumerate(_list(d.get("control_receipts", []), "control_receipts"))
        ],
    )


# --- writing -----------------------------------------------------------------


def _e64(b: bytes) -> str:
    return pybase64.b64encode_as_string(b)


def _envelope_json(env: Envelope) -> dict[str, Any]:
    return {
        "payload": _e64(env.payload),
        "payloadType": env.payload_type,
        "signatures": [{"keyid": k, "sig": _e64(s)} for k, s in env.signatures],
    }


def _entry_json(e: Entry) -> dict[str, Any]:
    return {
        "envelope": _e64(e.envelope),
        "leafIndex": str(e.leaf_index),
        "proof": {
            "leafIndex": str(e.proof_index),
            "treeSize": str(e.proof_size),
            "hashes": list(e.proof_b64),
        },
    }


def _tail_json(b: Bundle) -> dict[str, Any]:
    """The members after `leases`, in file order."""
    doc: dict[str, Any] = {
        "controlKeyids": list(b.control_keyids),
        "exportedUnixMs": str(b.exported_unix_ms),
    }
    if b.checkpoint is not None:
        c = b.checkpoint  # without its time: the note does not sign one (see decode_bundle)
        doc["checkpoint"] = {
            "origin": c.origin,
            "treeSize": str(c.tree_size),
            "rootHash": _e64(c.root_hash),
            "note": c.note,
        }
    if b.manifest is not None:
        doc["manifest"] = _envelope_json(b.manifest)
    if b.control_receipts:  # omitted when empty, as proto3 JSON omits empty lists
        doc["controlReceipts"] = [_envelope_json(e) for e in b.control_receipts]
    return doc


def bundle_to_dict(b: Bundle) -> dict[str, Any]:
    """The proto3 JSON object of a bundle (lowerCamelCase, 64-bit ints as strings)."""
    return {
        "version": b.version,
        "entries": [_entry_json(e) for e in b.entries],
        "nodeCertificates": [_envelope_json(e) for e in b.node_certificates],
        "leases": [_envelope_json(e) for e in b.leases],
        **_tail_json(b),
    }


def _compact(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


class BundleWriter:
    """Writes a bundle's canonical file form piece by piece, in bounded memory.

    Entries, then certificates, then leases, then the rest (`finish`): the
    order of the file. The bytes are exactly `encode_bundle`'s for the same
    bundle (it is built on this writer), so a streamed export is the one
    canonical encoding `tether verify` accepts. Only the current page is held.
    """

    _SECTIONS = ("entries", "nodeCertificates", "leases")

    def __init__(self, out: IO[bytes], version: int = BUNDLE_VERSION) -> None:
        self.out = out
        self.version = version
        self.counts = {name: 0 for name in self._SECTIONS}
        self._section = -1
        self.bytes_written = 0
        self._write(b'{"version":' + _compact(version))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes_written += len(data)

    def _enter(self, index: int) -> None:
        if index < self._section:
            raise ValueError(
                f"bundle {self._SECTIONS[index]} after {self._SECTIONS[self._section]}"
            )
        while self._section < index:
            if self._section >= 0:
                self._write(b"]")
            self._section += 1
            self._write(b',"' + self._SECTIONS[self._section].encode() + b'":[')

    def _items(self, index: int, docs: Iterable[dict[str, Any]]) -> None:
        self._enter(index)
        name = self._SECTIONS[index]
        parts = []
        n = self.counts[name]
        for d in docs:
            parts.append(_compact(d) if n == 0 else b"," + _compact(d))
            n += 1
        self.counts[name] = n
        self._write(b"".join(parts))

    def entries(self, entries: Iterable[Entry]) -> None:
        """Appends entries (ledger order)."""
        self._items(0, (_entry_json(e) for e in entries))

    def node_certificates(self, envelopes: Iterable[Envelope]) -> None:
        """Appends node certificates (after every entry)."""
        self._items(1, (_envelope_json(e) for e in envelopes))

    def leases(self, envelopes: Iterable[Envelope]) -> None:
        """Appends leases (after every certificate)."""
        self._items(2, (_envelope_json(e) for e in envelopes))

    def finish(self, rest: Bundle) -> None:
        """Writes the members after `leases` from `rest` (its lists are ignored) and closes."""
        if rest.version != self.version:
            raise ValueError(f"bundle version {rest.version}, the writer began {self.version}")
        self._enter(2)
        self._write(b"]")
        tail = _compact(_tail_json(rest))
        self._write(b"," + tail[1:] + b"\n")  # the tail object's members, then the bundle's "}"


def encode_bundle(b: Bundle, indent: int | None = None) -> bytes:
    """The bundle file bytes (proto3 JSON); canonical (compact) unless `indent`."""
    if indent is not None:
        return json.dumps(bundle_to_dict(b), indent=indent, separators=(",", ": ")).encode() + b"\n"
    out = io.BytesIO()
    w = BundleWriter(out, b.version)
    w.entries(b.entries)
    w.node_certificates(b.node_certificates)
    w.leases(b.leases)
    w.finish(b)
    return out.getvalue()


# --- protobuf bridge (for the control plane's ExportBundle) -------------------


def bundle_from_proto(msg: Any) -> Bundle:
    """Converts a `tether.v1.Bundle` message without re-encoding any signed bytes."""
    from tether.crypto.envelopes import from_proto

    cp = None
    if msg.HasField("checkpoint"):
        c = msg.checkpoint
        cp = CheckpointInfo(c.origin, c.tree_size, bytes(c.root_hash), c.timestamp_unix_ms, c.note)
    return Bundle(
        version=msg.version,
        entries=entries_from_proto(msg.entries),
        node_certificates=[from_proto(e) for e in msg.node_certificates],
        leases=[from_proto(e) for e in msg.leases],
        checkpoint=cp,
        control_keyids=list(msg.control_keyids),
        exported_unix_ms=msg.exported_unix_ms,
        manifest=from_proto(msg.manifest) if msg.HasField("manifest") else None,
        control_receipts=[from_proto(e) for e in msg.control_receipts],
    )


def bundle_to_proto(b: Bundle) -> Any:
    """The `tether.v1.Bundle` message of a bundle."""
    from tether.crypto.envelopes import to_proto
    from tether.v1 import receipt_pb2

    msg = receipt_pb2.Bundle(
        version=b.version,
        entries=entries_to_proto(b.entries),
        node_certificates=[to_proto(e) for e in b.node_certificates],
        leases=[to_proto(e) for e in b.leases],
        control_keyids=list(b.control_keyids),
        exported_unix_ms=b.exported_unix_ms,
        control_receipts=[to_proto(e) for e in b.control_receipts],
    )
    if b.checkpoint is not None:
        # A bundle carries no checkpoint time: nothing signs it (see decode_bundle).
        msg.checkpoint.CopyFrom(
            checkpoint_to_proto(dataclasses.replace(b.checkpoint, timestamp_unix_ms=0))
        )
    if b.manifest is not None:
        msg.manifest.CopyFrom(to_proto(b.manifest))
    return msg


def entries_to_proto(entries: Iterable[Entry]) -> list[Any]:
    """The `tether.v1.BundleEntry` messages of entries."""
    from tether.v1 import receipt_pb2

    return [
        receipt_pb2.BundleEntry(
            envelope=e.envelope,
            leaf_index=e.leaf_index,
            proof=receipt_pb2.InclusionProof(
                leaf_index=e.proof_index, tree_size=e.proof_size, hashes=list(e.proof)
            ),
        )
        for e in entries
    ]


def entries_from_proto(msgs: Iterable[Any]) -> list[Entry]:
    """Entries from `tether.v1.BundleEntry` messages (bytes as they came)."""
    return [
        Entry.of(
            bytes(e.envelope),
            e.leaf_index,
            e.proof.leaf_index,
            e.proof.tree_size,
            (bytes(h) for h in e.proof.hashes),
        )
        for e in msgs
    ]


def checkpoint_to_proto(c: CheckpointInfo) -> Any:
    """The `tether.v1.Checkpoint` message of a checkpoint."""
    from tether.v1 import receipt_pb2

    return receipt_pb2.Checkpoint(
        origin=c.origin,
        tree_size=c.tree_size,
        root_hash=c.root_hash,
        timestamp_unix_ms=c.timestamp_unix_ms,
        note=c.note,
    )
