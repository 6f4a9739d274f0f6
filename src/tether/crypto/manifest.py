"""Export manifests: the control plane's signed statement of where each chain in a bundle ends.

Hash chains show a receipt missing from the middle of a node's chain, but not
receipts cut from its end: the shortened chain is still a valid chain. The
manifest closes that hole. At export the control plane signs, for every node
in the bundle, the last seq and the SHA-256 of that envelope, plus the task ids
covered, bound to the bundle's checkpoint (origin, tree size, root). The
payload is a `tether.v1.ExportManifest` message in a DSSE envelope
(`MANIFEST_PAYLOAD_TYPE`). No grpc here: only the generated message class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tether.core.errors import VerificationError
from tether.crypto.receipts import is_hex_digest
from tether.crypto.signing import (
    MANIFEST_PAYLOAD_TYPE,
    Envelope,
    SigningKey,
    VerifyKey,
    verify_envelope,
)
from tether.v1 import receipt_pb2

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestNode:
    """One node's chain in a bundle: seq 1..last_seq, ending with that envelope."""

    node_id: str
    last_seq: int
    last_envelope_sha256: str
    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class ExportManifest:
    """What a bundle holds (fields mirror `tether.v1.ExportManifest`)."""

    origin: str
    tree_size: int
    root_hash: bytes
    exported_unix_ms: int
    nodes: tuple[ManifestNode, ...]
    version: int = MANIFEST_VERSION


def manifest_for(
    origin: str,
    tree_size: int,
    root_hash: bytes,
    exported_unix_ms: int,
    receipts: Iterable[tuple[str, int, str, str]],
) -> ExportManifest:
    """Builds the manifest of (node_id, seq, task_id, envelope sha256) rows of a bundle."""
    last: dict[str, tuple[int, str]] = {}
    tasks: dict[str, set[str]] = {}
    for node, seq, task, digest in receipts:
        if seq > last.get(node, (0, ""))[0]:
            last[node] = (seq, digest)
        tasks.setdefault(node, set()).add(task)
    nodes = tuple(
        ManifestNode(n, last[n][0], last[n][1], tuple(sorted(tasks[n]))) for n in sorted(last)
    )
    return ExportManifest(origin, tree_size, root_hash, exported_unix_ms, nodes)


def encode_manifest(m: ExportManifest) -> bytes:
    """The `tether.v1.ExportManifest` protobuf bytes (the signed payload)."""
    return receipt_pb2.ExportManifest(
        version=m.version,
        origin=m.origin,
        tree_size=m.tree_size,
        root_hash=m.root_hash,
        exported_unix_ms=m.exported_unix_ms,
        nodes=[
            receipt_pb2.ExportManifestNode(
                node_id=n.node_id,
                last_seq=n.last_seq,
                last_envelope_sha256=n.last_envelope_sha256,
                task_ids=list(n.task_ids),
            )
            for n in m.nodes
        ],
    ).SerializeToString(deterministic=True)


def sign_manifest(m: ExportManifest, key: SigningKey) -> Envelope:
    """Signs a manifest with the control-plane key."""
    return key.sign_envelope(MANIFEST_PAYLOAD_TYPE, encode_manifest(m))


def verify_manifest(envelope: Envelope, trusted_keys: dict[str, VerifyKey]) -> ExportManifest:
    """Checks the control plane's signature, then decodes the manifest strictly.

    Raises:
        VerificationError: bad signature or payload type, malformed payload, an
            unknown version, or nodes that are unsorted, repeated or invalid.
    """
    verify_envelope(envelope, trusted_keys, MANIFEST_PAYLOAD_TYPE)
    return decode_manifest(envelope.payload)


def decode_manifest(payload: bytes) -> ExportManifest:
    """Parses manifest payload bytes strictly (call only after the signature checked).

    Raises:
        VerificationError: malformed payload, an unknown version, or nodes
            that are unsorted, repeated or invalid.
    """
    msg = receipt_pb2.ExportManifest()
    try:
        msg.ParseFromString(payload)
    except DecodeError as err:
        raise VerificationError(f"malformed export manifest: {err}") from err
    if msg.version != MANIFEST_VERSION:
        raise VerificationError(f"unsupported export manifest version {msg.version}")
    nodes = tuple(
        ManifestNode(n.node_id, n.last_seq, n.last_envelope_sha256, tuple(n.task_ids))
        for n in msg.nodes
    )
    ids = [n.node_id for n in nodes]
    if ids != sorted(set(ids)):
        raise VerificationError("export manifest nodes are not sorted and distinct")
    for n in nodes:
        if not n.node_id or n.last_seq < 1 or not is_hex_digest(n.last_envelope_sha256):
            raise VerificationError(f"export manifest entry for node {n.node_id!r} is invalid")
        if list(n.task_ids) != sorted(set(n.task_ids)):
            raise VerificationError(f"export manifest task ids of {n.node_id!r} are not sorted")
    return ExportManifest(
        msg.origin, msg.tree_size, bytes(msg.root_hash), msg.exported_unix_ms, nodes
    )
