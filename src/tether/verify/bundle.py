"""The bundle file: proto3 JSON of `tether.v1.Bundle`, read and written without protobuf.

A 100,000-receipt bundle is a few hundred MB of JSON; parsing it with
`json.loads` and plain dicts is several times faster than protobuf's JSON
parser, and keeps the verifier's hot path free of message objects. The reader
is strict (unknown fields, wrong types and non-canonical base64 are refused)
and accepts both the lowerCamelCase and the proto field names, as proto3 JSON
parsers must.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tether.core.errors import VerificationError
from tether.crypto.signing import Envelope

BUNDLE_VERSION = 1


class BundleFormatError(VerificationError):
    """The bundle file is not a well-formed version-1 bundle."""

    reason = "BUNDLE_FORMAT"


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


# --- reading -----------------------------------------------------------------


def _b64(v: Any, what: str) -> bytes:
    if type(v) is not str:
        raise BundleFormatError(f"{what}: expected a base64 string")
    try:
        return binascii.a2b_base64(v, strict_mode=True)
    except binascii.Error:
        pass
    try:  # proto3 JSON also allows URL-safe base64 and omitted padding
        raw = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))
    except (binascii.Error, ValueError) as err:
        raise BundleFormatError(f"{what}: not base64") from err
    return raw


def _uint(v: Any, what: str) -> int:
    if type(v) is str and v.isascii() and v.isdigit():
        v = int(v)
    if type(v) is not int or not 0 <= v < 1 << 64:
        raise BundleFormatError(f"{what}: expected an unsigned integer")
    return v


def _int(v: Any, what: str) -> int:
    if type(v) is str and v.isascii() and v.lstrip("-").isdigit():
        v = int(v)
    if type(v) is not int or not -(1 << 63) <= v < 1 << 63:
        raise BundleFormatError(f"{what}: expected an integer")
    return v


def _obj(v: Any, what: str, names: Iterable[str]) -> dict[str, Any]:
    """Normalizes an object's keys to proto field names, refusing unknown ones."""
    if not isinstance(v, dict):
        raise BundleFormatError(f"{what}: expected an object")
    allowed = {}
    for n in names:
        head, *rest = n.split("_")
        allowed[n] = n
        allowed[head + "".join(p.capitalize() for p in rest)] = n
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
        if not ok:  # not canonical: decode each to say what is wrong, then re-encode
            hashes = [_e64(_b64(h, what + ".proof.hashes")) for h in hashes]
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


def decode_bundle(data: bytes) -> Bundle:
    """Parses a bundle file strictly.

    Raises:
        BundleFormatError: not JSON, unknown fields, wrong types, or a version
            other than 1.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleFormatError(f"bundle is not JSON: {err}") from err
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
        cp = CheckpointInfo(
            origin=origin,
            tree_size=_uint(c.get("tree_size", 0), "checkpoint.tree_size"),
            root_hash=_b64(c.get("root_hash", ""), "checkpoint.root_hash"),
            timestamp_unix_ms=_int(c.get("timestamp_unix_ms", 0), "checkpoint.timestamp"),
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
    )


# --- writing -----------------------------------------------------------------


def _e64(b: bytes) -> str:
    return binascii.b2a_base64(b, newline=False).decode()


def _envelope_json(env: Envelope) -> dict[str, Any]:
    return {
        "payload": _e64(env.payload),
        "payloadType": env.payload_type,
        "signatures": [{"keyid": k, "sig": _e64(s)} for k, s in env.signatures],
    }


def bundle_to_dict(b: Bundle) -> dict[str, Any]:
    """The proto3 JSON object of a bundle (lowerCamelCase, 64-bit ints as strings)."""
    doc: dict[str, Any] = {
        "version": b.version,
        "entries": [
            {
                "envelope": _e64(e.envelope),
                "leafIndex": str(e.leaf_index),
                "proof": {
                    "leafIndex": str(e.proof_index),
                    "treeSize": str(e.proof_size),
                    "hashes": list(e.proof_b64),
                },
            }
            for e in b.entries
        ],
        "nodeCertificates": [_envelope_json(e) for e in b.node_certificates],
        "leases": [_envelope_json(e) for e in b.leases],
        "controlKeyids": list(b.control_keyids),
        "exportedUnixMs": str(b.exported_unix_ms),
    }
    if b.checkpoint is not None:
        c = b.checkpoint
        doc["checkpoint"] = {
            "origin": c.origin,
            "treeSize": str(c.tree_size),
            "rootHash": _e64(c.root_hash),
            "timestampUnixMs": str(c.timestamp_unix_ms),
            "note": c.note,
        }
    if b.manifest is not None:
        doc["manifest"] = _envelope_json(b.manifest)
    return doc


def encode_bundle(b: Bundle, indent: int | None = None) -> bytes:
    """The bundle file bytes (proto3 JSON)."""
    seps = (",", ":") if indent is None else (",", ": ")
    return json.dumps(bundle_to_dict(b), indent=indent, separators=seps).encode() + b"\n"


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
        entries=[
            Entry.of(
                bytes(e.envelope),
                e.leaf_index,
                e.proof.leaf_index,
                e.proof.tree_size,
                (bytes(h) for h in e.proof.hashes),
            )
            for e in msg.entries
        ],
        node_certificates=[from_proto(e) for e in msg.node_certificates],
        leases=[from_proto(e) for e in msg.leases],
        checkpoint=cp,
        control_keyids=list(msg.control_keyids),
        exported_unix_ms=msg.exported_unix_ms,
        manifest=from_proto(msg.manifest) if msg.HasField("manifest") else None,
    )


def bundle_to_proto(b: Bundle) -> Any:
    """The `tether.v1.Bundle` message of a bundle."""
    from tether.crypto.envelopes import to_proto
    from tether.v1 import receipt_pb2

    msg = receipt_pb2.Bundle(
        version=b.version,
        entries=[
            receipt_pb2.BundleEntry(
                envelope=e.envelope,
                leaf_index=e.leaf_index,
                proof=receipt_pb2.InclusionProof(
                    leaf_index=e.proof_index, tree_size=e.proof_size, hashes=list(e.proof)
                ),
            )
            for e in b.entries
        ],
        node_certificates=[to_proto(e) for e in b.node_certificates],
        leases=[to_proto(e) for e in b.leases],
        control_keyids=list(b.control_keyids),
        exported_unix_ms=b.exported_unix_ms,
    )
    if b.checkpoint is not None:
        msg.checkpoint.CopyFrom(checkpoint_to_proto(b.checkpoint))
    if b.manifest is not None:
        msg.manifest.CopyFrom(to_proto(b.manifest))
    return msg


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
