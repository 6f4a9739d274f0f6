"""Export manifests: the control plane's signed statement of where each chain in a bundle ends.

Hash chains show a receipt missing from the middle of a node's chain, but not
receipts cut from its end: the shortened chain is still a valid chain. The
manifest closes that hole. At export the control plane signs, for every node
in the bundle, the last seq and the SHA-256 of that envelope, plus the task ids
covered, bound to the bundle's checkpoint (origin, tree size, root). The
payload is a `tether.v1.ExportManifest` message in a DSSE envelope
(`MANIFEST_PAYLOAD_TYPE`). No grpc here: only the generated message class.

A per-task export (`task_ids` set) holds only those tasks' receipts, so its
chains have holes by design; there the manifest lists every (node, seq) the
bundle holds, which is what proves it complete without disclosing the receipts
of other tasks in between. A manifest may also carry a consistency proof from
a tree size the auditor saw before (`previous_tree_size`).

The manifest also lists the digest of every control receipt the bundle
carries (`control_receipt_digest`): a control receipt is the only record of
how a lease ended without its holder, so dropping one would make an ended
task look merely open (`--allow-open`). A per-task manifest with no nodes is
the signed statement that its tasks have no node receipts at all.
"""

from __future__ import annotations

import hashlib
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
    """One node's receipts in a bundle: 1..last_seq, or exactly `seqs` in a per-task export."""

    node_id: str
    last_seq: int
    last_envelope_sha256: str
    task_ids: tuple[str, ...]
    seqs: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExportManifest:
    """What a bundle holds (fields mirror `tether.v1.ExportManifest`)."""

    origin: str
    tree_size: int
    root_hash: bytes
    exported_unix_ms: int
    nodes: tuple[ManifestNode, ...]
    version: int = MANIFEST_VERSION
    task_ids: tuple[str, ...] = ()
    """Set for a per-task export: the exported tasks (sorted, distinct)."""
    previous_tree_size: int = 0
    consistency_proof: tuple[bytes, ...] = ()
    control_receipts: tuple[str, ...] = ()
    """Sorted, distinct `control_receipt_digest`s of the bundle's control receipts."""

    @property
    def per_task(self) -> bool:
        """True for a per-task export (exact seqs listed), False for whole chains."""
        return bool(self.task_ids)


def control_receipt_digest(envelope: Envelope) -> str:
    """Hex SHA-256 of a control receipt's signed payload: how the manifest names it.

    The payload, not the envelope's JSON, so the name does not depend on how
    the envelope was serialized.
    """
    return hashlib.sha256(envelope.payload).hexdigest()


class ManifestAccumulator:
    """Builds a manifest from a bundle's receipts as they stream by, one at a time.

    Keeps per node only its last seq, that digest and its task ids (and, for a
    per-task export, its seqs, which the manifest lists), never the envelopes.
    """

    def __init__(self, task_ids: Iterable[str] = ()) -> None:
        self.task_ids = tuple(sorted(set(task_ids)))
        self._last: dict[str, tuple[int, str]] = {}
        self._tasks: dict[str, set[str]] = {}
        self._seqs: dict[str, list[int]] = {}

    def add(self, node_id: str, seq: int, task_id: str, digest: str) -> None:
        """Records one receipt of the bundle (any order)."""
        if seq > self._last.get(node_id, (0, ""))[0]:
            self._last[node_id] = (seq, digest)
        self._tasks.setdefault(node_id, set()).add(task_id)
        if self.task_ids:
            self._seqs.setdefault(node_id, []).append(seq)

    def manifest(
        self,
        origin: str,
        tree_size: int,
        root_hash: bytes,
        exported_unix_ms: int,
        previous_tree_size: int = 0,
        consistency_proof: Iterable[bytes] = (),
        control_receipts: Iterable[Envelope] = (),
    ) -> ExportManifest:
        """The manifest of every receipt added so far (and of the bundle's control receipts)."""
        last, tasks = self._last, self._tasks
        nodes = tuple(
            ManifestNode(
                n,
                last[n][0],
                last[n][1],
                tuple(sorted(tasks[n])),
                tuple(sorted(set(self._seqs.get(n, ())))),
            )
            for n in sorted(last)
        )
        return ExportManifest(
            origin,
            tree_size,
            root_hash,
            exported_unix_ms,
            nodes,
            task_ids=self.task_ids,
            previous_tree_size=previous_tree_size,
            consistency_proof=tuple(consistency_proof),
            control_receipts=tuple(sorted({control_receipt_digest(e) for e in control_receipts})),
        )


def manifest_for(
    origin: str,
    tree_size: int,
    root_hash: bytes,
    exported_unix_ms: int,
    receipts: Iterable[tuple[str, int, str, str]],
    *,
    task_ids: Iterable[str] = (),
    previous_tree_size: int = 0,
    consistency_proof: Iterable[bytes] = (),
    control_receipts: Iterable[Envelope] = (),
) -> ExportManifest:
    """Builds the manifest of (node_id, seq, task_id, envelope sha256) rows of a bundle.

    `task_ids` makes it a per-task manifest (each node's seqs listed);
    `control_receipts` are the bundle's control receipt envelopes.
    """
    acc = ManifestAccumulator(task_ids)
    for node, seq, task, digest in receipts:
        acc.add(node, seq, task, digest)
    return acc.manifest(
        origin,
        tree_size,
        root_hash,
        exported_unix_ms,
        previous_tree_size,
        consistency_proof,
        control_receipts,
    )


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
                seqs=list(n.seqs),
            )
            for n in m.nodes
        ],
        task_ids=list(m.task_ids),
        previous_tree_size=m.previous_tree_size,
        consistency_proof=list(m.consistency_proof),
        control_receipt_sha256=list(m.control_receipts),
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
        VerificationError: malformed payload, an unknown version, nodes that
            are unsorted, repeated or invalid, seqs in a whole-chain manifest or
            missing, unsorted or not ending at last_seq in a per-task one, a
            node's task outside the exported tasks, or a consistency proof that
            does not fit its sizes, or control receipt digests that are
            unsorted, repeated or not hex SHA-256.
    """
    msg = receipt_pb2.ExportManifest()
    try:
        msg.ParseFromString(payload)
    except DecodeError as err:
        raise VerificationError(f"malformed export manifest: {err}") from err
    if msg.version != MANIFEST_VERSION:
        raise VerificationError(f"unsupported export manifest version {msg.version}")
    nodes = tuple(
        ManifestNode(
            n.node_id, n.last_seq, n.last_envelope_sha256, tuple(n.task_ids), tuple(n.seqs)
        )
        for n in msg.nodes
    )
    ids = [n.node_id for n in nodes]
    if ids != sorted(set(ids)):
        raise VerificationError("export manifest nodes are not sorted and distinct")
    exported = tuple(msg.task_ids)
    if list(exported) != sorted(set(exported)) or any(not t for t in exported):
        raise VerificationError("export manifest task ids are not sorted, distinct and non-empty")
    for n in nodes:
        if not n.node_id or n.last_seq < 1 or not is_hex_digest(n.last_envelope_sha256):
            raise VerificationError(f"export manifest entry for node {n.node_id!r} is invalid")
        if list(n.task_ids) != sorted(set(n.task_ids)):
            raise VerificationError(f"export manifest task ids of {n.node_id!r} are not sorted")
        if not exported:
            if n.seqs:
                raise VerificationError(
                    f"export manifest lists seqs of {n.node_id!r} in a whole-chain export"
                )
            continue
        if not n.seqs or n.seqs[-1] != n.last_seq or n.seqs[0] < 1:
            raise VerificationError(
                f"export manifest seqs of {n.node_id!r} must be given and end at last_seq"
            )
        if any(a >= b for a, b in zip(n.seqs, n.seqs[1:], strict=False)):
            raise VerificationError(
                f"export manifest seqs of {n.node_id!r} are not strictly ascending"
            )
        outside = set(n.task_ids).difference(exported)
        if outside:
            raise VerificationError(
                f"export manifest gives node {n.node_id!r} task {sorted(outside)[0]!r}, "
                "which is not one of the exported tasks"
            )
    proof = tuple(bytes(h) for h in msg.consistency_proof)
    if msg.previous_tree_size > msg.tree_size:
        raise VerificationError("export manifest previous_tree_size is beyond its tree_size")
    if proof and msg.previous_tree_size in (0, msg.tree_size):
        raise VerificationError("export manifest carries a consistency proof from no size")
    if any(len(h) != 32 for h in proof) or len(proof) > 128:
        raise VerificationError("export manifest consistency proof is malformed")
    ctl = tuple(msg.control_receipt_sha256)
    if list(ctl) != sorted(set(ctl)) or not all(is_hex_digest(d) for d in ctl):
        raise VerificationError(
            "export manifest control receipt digests are not sorted, distinct hex SHA-256"
        )
    return ExportManifest(
        msg.origin,
        msg.tree_size,
        bytes(msg.root_hash),
        msg.exported_unix_ms,
        nodes,
        task_ids=exported,
        previous_tree_size=msg.previous_tree_size,
        consistency_proof=proof,
        control_receipts=ctl,
    )
