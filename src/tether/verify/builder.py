"""Builds real, valid bundles from real keys: for tests, golden assets and benchmarks.

Everything is signed for real (control key, node keys, leases, certificates,
receipts, checkpoint); keys can be derived from a seed so golden files are
reproducible byte for byte (Ed25519 signatures are deterministic).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.core.errors import VerificationError
from tether.core.leases import Lease
from tether.core.receipts import ControlReceipt, Receipt, ReceiptKind
from tether.core.states import State
from tether.core.timeouts import EndReason
from tether.crypto.certs import issue_cert
from tether.crypto.leases import decode_lease, sign_lease
from tether.crypto.manifest import manifest_for, sign_manifest
from tether.crypto.merkle import MerkleTree, leaf_hash
from tether.crypto.note import CheckpointBody, sign_checkpoint
from tether.crypto.receipts import (
    ReceiptChain,
    envelope_digest,
    parse_control_statement,
    parse_receipt,
    sign_control_receipt,
)
from tether.crypto.signing import Envelope, SigningKey
from tether.verify.bundle import Bundle, CheckpointInfo, Entry

T0 = 1_700_000_000_000
DAY_MS = 86_400_000


def seeded_key(seed: str) -> SigningKey:
    """A deterministic Ed25519 key (tests and golden assets only)."""
    return SigningKey(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest()))


@dataclass
class _Node:
    key: SigningKey
    chain: ReceiptChain
    cert: Envelope


def _lenient_facts(envelope: bytes) -> tuple[str, int, str]:
    """(node, seq, task) of a receipt the strict parser refuses, read as a lax reader would
    (last key wins), so crafted bundles can still carry a manifest."""
    pred = json.loads(Envelope.from_json_bytes(envelope).payload).get("predicate", {})
    return str(pred.get("nodeId", "")), int(pred.get("seq", 0)), str(pred.get("taskId", ""))


@dataclass
class BundleBuilder:
    """Accumulates a ledger (in append order) and exports a bundle of it."""

    seed: str = "tether-test"
    origin: str = "tether.test/ledger"
    control: SigningKey = field(init=False)
    nodes: dict[str, _Node] = field(default_factory=dict)
    leases: list[Envelope] = field(default_factory=list)
    ledger: list[bytes] = field(default_factory=list)
    exported: list[int] = field(default_factory=list)
    control_receipts: list[Envelope] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.control = seeded_key(f"{self.seed}/control")

    def node(self, node_id: str) -> _Node:
        """The node's key, chain and certificate (created on first use)."""
        n = self.nodes.get(node_id)
        if n is None:
            key = seeded_key(f"{self.seed}/node/{node_id}")
            _, cert = issue_cert(self.control, node_id, key.public.raw, T0 - DAY_MS, 30 * DAY_MS)
            n = self.nodes[node_id] = _Node(key, ReceiptChain(node_id, key), cert)
        return n

    def lease(
        self,
        task_id: str,
        node_id: str,
        agent_id: str,
        *,
        attempt: int = 1,
        token: int = 1,
        issued: int = T0,
        ttl_ms: int = 30_000,
        lease_id: str = "",
    ) -> Lease:
        """Signs a lease (or a renewal: same id and token, later window) and records it."""
        lease = Lease(
            lease_id=lease_id or f"lease-{task_id}-{token}",
            task_id=task_id,
            attempt=attempt,
            node_id=node_id,
            agent_id=agent_id,
            fencing_token=token,
            issued_unix_ms=issued,
            expires_unix_ms=issued + ttl_ms,
            policy_digest="ab" * 32,
            queue="default",
            tools=("http.get",),
        )
        self.leases.append(sign_lease(lease, self.control))
        return lease

    def receipt(
        self, kind: ReceiptKind, lease: Lease, time_ms: int, *, export: bool = True, **extra: object
    ) -> bytes:
        """Signs the next receipt of the lease holder's node and appends it to the ledger."""
        n = self.node(lease.node_id)
        fields: dict[str, object] = {
            "kind": kind,
            "node_id": lease.node_id,
            "task_id": lease.task_id,
            "attempt": lease.attempt,
            "fencing_token": lease.fencing_token,
            "agent_id": lease.agent_id,
            "lease_id": lease.lease_id,
            "lease_issued_unix_ms": lease.issued_unix_ms,
            "lease_expires_unix_ms": lease.expires_unix_ms,
            "time_unix_ms": time_ms,
            "policy_digest": lease.policy_digest,
        }
        fields.update(extra)
        data = n.chain.sign(Receipt(**fields))  # type: ignore[arg-type]
        if export:
            self.exported.append(len(self.ledger))
        self.ledger.append(data)
        return data

    def control_receipt(
        self,
        end_reason: EndReason,
        time_ms: int,
        state: State,
        *,
        lease: Lease | None = None,
        task_id: str = "",
        token: int = 0,
        reason: str = "",
    ) -> ControlReceipt:
        """Signs a control receipt (the end of `lease`, or of a task with none live)."""
        c = ControlReceipt(
            end_reason=end_reason,
            task_id=lease.task_id if lease is not None else task_id,
            attempt=lease.attempt if lease is not None else 0,
            fencing_token=lease.fencing_token if lease is not None else token,
            state=int(state),
            time_unix_ms=time_ms,
            reason=reason,
            lease_id=lease.lease_id if lease is not None else "",
            node_id=lease.node_id if lease is not None else "",
            agent_id=lease.agent_id if lease is not None else "",
            clock="control-plane",
        )
        data = sign_control_receipt(c, self.control)
        self.control_receipts.append(Envelope.from_json_bytes(data))
        return c

    def foreign_leaf(self, data: bytes) -> None:
        """Appends a leaf that is in the ledger but not in the bundle (another tenant's)."""
        self.ledger.append(data)

    def task(
        self,
        task_id: str,
        node_id: str = "node-a",
        agent_id: str = "agent-1",
        *,
        tool_calls: int = 3,
        start: int = T0,
        token: int = 1,
        attempt: int = 1,
        finish: bool = True,
    ) -> Lease:
        """A typical task run: granted, started, tool calls, an artifact, finished."""
        lease = self.lease(task_id, node_id, agent_id, token=token, attempt=attempt, issued=start)
        t = start
        self.receipt(ReceiptKind.LEASE_GRANTED, lease, t)
        self.receipt(ReceiptKind.TASK_STARTED, lease, t + 1)
        for i in range(tool_calls):
            self.receipt(
                ReceiptKind.TOOL_CALL,
                lease,
                t + 10 + i,
                tool="http.get",
                arguments_sha256=hashlib.sha256(f"args{i}".encode()).hexdigest(),
                result_sha256=hashlib.sha256(f"result{i}".encode()).hexdigest(),
                duration_ms=3,
                cost_micros=1500,
                status="ok",
                idempotency_key=f"k{i}",
            )
        self.receipt(
            ReceiptKind.ARTIFACT,
            lease,
            t + 20 + tool_calls,
            artifact_name="report.txt",
            artifact_size=11,
            artifact_sha256=hashlib.sha256(b"hello world").hexdigest(),
        )
        if finish:
            self.receipt(
                ReceiptKind.TASK_FINISHED,
                lease,
                t + 30 + tool_calls,
                final_state=4,
                result_sha256=hashlib.sha256(b"done").hexdigest(),
            )
        return lease

    def build(
        self,
        exported_unix_ms: int | None = None,
        *,
        tasks: tuple[str, ...] = (),
        previous_tree_size: int = 0,
    ) -> Bundle:
        """Signs a checkpoint over the whole ledger and exports the chosen entries.

        `tasks` makes a per-task export instead: every receipt of those tasks in
        the ledger and nothing else, their leases, and a per-task manifest.
        `previous_tree_size` puts a consistency proof from that size into the
        manifest.
        """
        tree = MerkleTree([leaf_hash(x) for x in self.ledger])
        root = tree.root()
        body = CheckpointBody(self.origin, tree.size, root)
        ts = exported_unix_ms if exported_unix_ms is not None else T0 + DAY_MS
        # A bundle carries no checkpoint time (the note does not sign one).
        cp = CheckpointInfo(self.origin, tree.size, root, 0, sign_checkpoint(body, self.control))
        chosen = self.exported
        if tasks:
            chosen = [i for i, data in enumerate(self.ledger) if _task_of(data) in tasks]
        entries = [
            Entry.of(self.ledger[i], i, i, tree.size, tree.inclusion_proof(i)) for i in chosen
        ]
        rows = []
        for e in entries:
            try:
                _, r = parse_receipt(e.envelope)
                node, seq, task = r.node_id, r.seq, r.task_id
            except VerificationError:  # a deliberately malformed receipt (golden files)
                node, seq, task = _lenient_facts(e.envelope)
            rows.append((node, seq, task, envelope_digest(e.envelope)))
        proof = (
            tree.consistency_proof(previous_tree_size) if 0 < previous_tree_size < tree.size else []
        )
        leases = list(self.leases)
        ends = list(self.control_receipts)
        if tasks:  # as the control plane exports: the chosen tasks' leases and ends only
            leases = [env for env in leases if decode_lease(env.payload).task_id in tasks]
            ends = [env for env in ends if _control_task(env) in tasks]
        manifest = manifest_for(
            self.origin,
            tree.size,
            root,
            ts,
            rows,
            task_ids=tasks,
            previous_tree_size=previous_tree_size,
            consistency_proof=proof,
            control_receipts=ends,
        )
        return Bundle(
            entries=entries,
            node_certificates=[n.cert for n in self.nodes.values()],
            leases=leases,
            checkpoint=cp,
            control_keyids=[self.control.keyid],
            exported_unix_ms=ts,
            manifest=sign_manifest(manifest, self.control),
            control_receipts=ends,
        )

    def checkpoint_note(self, size: int | None = None) -> str:
        """A checkpoint note over the first `size` leaves (default: all), control-signed."""
        tree = MerkleTree([leaf_hash(x) for x in self.ledger])
        n = tree.size if size is None else size
        return sign_checkpoint(CheckpointBody(self.origin, n, tree.root(n)), self.control)


def _control_task(env: Envelope) -> str:
    """The task a control receipt ends."""
    return parse_control_statement(json.loads(env.payload)).task_id


def _task_of(envelope: bytes) -> str:
    """The task a ledger leaf is about ("" for a leaf that is no receipt at all)."""
    try:
        return parse_receipt(envelope)[1].task_id
    except VerificationError:
        try:
            return _lenient_facts(envelope)[2]
        except (VerificationError, ValueError):
            return ""
