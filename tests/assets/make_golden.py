"""Writes the golden bundles in tests/assets/bundles/ (run from the repo root).

    .venv/bin/python tests/assets/make_golden.py

Keys come from fixed seeds and Ed25519 signatures are deterministic, so the
output is byte-for-byte reproducible; tests/integration/test_verify_golden.py
checks that it still is, which pins the receipt and bundle formats. expected.json
maps each file to the exit code and failing check `tether verify` must report.

Files: valid*.json verify (valid-per-task.json is a per-task export: one task's
receipts out of a chain shared with another task); tampered-*.json are a valid
bundle edited the way an attacker would (cut, swap, re-sign, slip in another
task's receipt); crafted-*.json attack the verifier itself
(seq bombs, deep nesting, duplicate keys, unauthenticated bytes, loose notes).
Bundles are in their canonical (compact) encoding, the only one `tether verify`
accepts, except where the encoding is the attack.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from pathlib import Path

from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto.manifest import sign_manifest, verify_manifest
from tether.crypto.note import SIG_PREFIX, CheckpointBody, sign_note
from tether.crypto.receipts import (
    ReceiptChain,
    envelope_digest,
    parse_receipt,
    sign_receipt,
    statement_bytes,
)
from tether.crypto.signing import INTOTO_PAYLOAD_TYPE, Envelope
from tether.verify import Bundle, encode_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key

OUT = Path(__file__).parent / "bundles"


def _valid() -> BundleBuilder:
    b = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    b.task("task-1", "node-a", "agent-1", tool_calls=2, start=T0)
    b.foreign_leaf(b"a receipt of another task, not exported")
    b.task("task-2", "node-b", "agent-2", tool_calls=1, start=T0 + 1_000)
    return b


def build_all() -> dict[str, bytes]:
    """Every golden file's name and bytes."""
    b = _valid()
    valid = b.build()
    files: dict[str, bytes] = {
        "control.pub": b.control.public.pem(),
        "valid.json": encode_bundle(valid),
    }

    def put(name: str, bundle: Bundle) -> None:
        files[name] = encode_bundle(bundle)

    entries = list(valid.entries)
    flipped = bytearray(entries[3].envelope)
    flipped[40] ^= 0x01  # inside the base64 payload
    put(
        "tampered-byte-flip.json",
        dataclasses.replace(
            valid,
            entries=[
                *entries[:3],
                dataclasses.replace(entries[3], envelope=bytes(flipped)),
                *entries[4:],
            ],
        ),
    )
    put("tampered-deleted.json", dataclasses.replace(valid, entries=entries[:2] + entries[3:]))
    put(
        "tampered-swapped.json",
        dataclasses.replace(valid, entries=[*entries[:3], entries[4], entries[3], *entries[5:]]),
    )
    _, r = parse_receipt(entries[1].envelope)
    forged = sign_receipt(r, seeded_key("golden/mallory"))
    put(
        "tampered-resigned.json",
        dataclasses.replace(
            valid,
            entries=[entries[0], dataclasses.replace(entries[1], envelope=forged), *entries[2:]],
        ),
    )
    assert valid.checkpoint is not None
    put(
        "tampered-wrong-root.json",
        dataclasses.replace(
            valid, checkpoint=dataclasses.replace(valid.checkpoint, root_hash=bytes(32))
        ),
    )

    # The last receipt of node-a's chain (task-1's task_finished) cut off.
    last_a = max(
        i for i, e in enumerate(entries) if parse_receipt(e.envelope)[1].node_id == "node-a"
    )
    put(
        "tampered-deleted-last.json",
        dataclasses.replace(valid, entries=entries[:last_a] + entries[last_a + 1 :]),
    )
    put("tampered-no-manifest.json", dataclasses.replace(valid, manifest=None))
    assert valid.manifest is not None
    manifest = verify_manifest(valid.manifest, {b.control.keyid: b.control.public})
    put(
        "tampered-manifest-resigned.json",
        dataclasses.replace(valid, manifest=sign_manifest(manifest, seeded_key("golden/mallory"))),
    )

    late = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    lease = late.lease("task-late", "node-a", "agent-1", issued=T0, ttl_ms=30_000)
    late.receipt(ReceiptKind.LEASE_GRANTED, lease, T0)
    late.receipt(ReceiptKind.TOOL_CALL, lease, T0 + 45_000, tool="http.get", status="ok")
    late.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 20_000, final_state=4)
    put("tampered-after-lease.json", late.build())

    files.update(_per_task())
    files.update(_crafted(b, valid))

    expected = {
        "valid.json": [0, ""],
        "valid-skewed.json": [0, ""],
        "tampered-byte-flip.json": [1, "signature"],
        "tampered-deleted.json": [1, "chain.gap"],
        "tampered-deleted-last.json": [1, "manifest"],
        "tampered-no-manifest.json": [1, "manifest"],
        "tampered-manifest-resigned.json": [1, "manifest"],
        "tampered-swapped.json": [1, "chain.order"],
        "tampered-resigned.json": [1, "signature"],
        "tampered-wrong-root.json": [1, "checkpoint"],
        "tampered-after-lease.json": [1, "lease.window"],
        "valid-per-task.json": [0, ""],
        "tampered-per-task-slipped.json": [1, "manifest"],
        "tampered-per-task-dropped.json": [1, "manifest"],
        "tampered-per-task-unlisted.json": [1, "manifest"],
        "crafted-seq-bomb.json": [1, "chain.gap"],
        "crafted-deep-nesting.json": [1, "bundle.format"],
        "crafted-deep-statement.json": [1, "receipt.format"],
        "crafted-duplicate-entries.json": [1, "bundle.format"],
        "crafted-duplicate-key-statement.json": [1, "receipt.format"],
        "crafted-zeros.json": [1, "bundle.format"],
        "crafted-whitespace.json": [1, "bundle.format"],
        "crafted-noncanonical-hash.json": [1, "bundle.format"],
        "crafted-checkpoint-time.json": [1, "bundle.format"],
        "crafted-lease-keyid.json": [1, "lease.signature"],
        "crafted-control-keyids.json": [1, "control.keyids"],
        "crafted-exported-time.json": [1, "manifest"],
        "crafted-note-bad-then-good.json": [1, "checkpoint"],
        "crafted-note-other-name.json": [1, "checkpoint"],
    }
    assert set(expected) | {"control.pub", "expected.json"} == set(files) | {"expected.json"}
    files["expected.json"] = (json.dumps(expected, indent=1, sort_keys=True) + "\n").encode()
    return files


def _per_task() -> dict[str, bytes]:
    """A per-task export of task-1 from node-a, whose chain interleaves it with task-2's
    receipts (seqs 1, 2, 4, 6 of 7), and per-task bundles edited as an attacker would."""
    b = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    one = b.lease("task-1", "node-a", "agent-1", issued=T0)
    two = b.lease("task-2", "node-a", "agent-2", issued=T0)
    b.receipt(ReceiptKind.LEASE_GRANTED, one, T0 + 1)
    b.receipt(ReceiptKind.TASK_STARTED, one, T0 + 2)
    b.receipt(ReceiptKind.LEASE_GRANTED, two, T0 + 3)
    b.receipt(ReceiptKind.TOOL_CALL, one, T0 + 4, tool="http.get", status="ok")
    b.receipt(ReceiptKind.TASK_STARTED, two, T0 + 5)
    b.receipt(ReceiptKind.TASK_FINISHED, one, T0 + 6, final_state=4)
    b.receipt(ReceiptKind.TASK_FINISHED, two, T0 + 7, final_state=4)
    valid = b.build(tasks=("task-1",))
    whole = b.build()
    other = whole.entries[2]  # task-2's lease_granted, with its true inclusion proof
    assert parse_receipt(other.envelope)[1].task_id == "task-2"
    assert valid.manifest is not None
    manifest = verify_manifest(valid.manifest, {b.control.keyid: b.control.public})
    unlisted = dataclasses.replace(
        manifest, nodes=(dataclasses.replace(manifest.nodes[0], seqs=(1, 2, 6)),)
    )
    out = {
        "valid-per-task.json": valid,
        "tampered-per-task-slipped.json": dataclasses.replace(
            valid, entries=sorted([*valid.entries, other], key=lambda e: e.leaf_index)
        ),
        "tampered-per-task-dropped.json": dataclasses.replace(
            valid, entries=[valid.entries[0], *valid.entries[2:]]
        ),
        "tampered-per-task-unlisted.json": dataclasses.replace(
            valid, manifest=sign_manifest(unlisted, b.control)
        ),
    }
    return {name: encode_bundle(bundle) for name, bundle in out.items()}


def _raw_receipt(b: BundleBuilder, node_id: str, statement: bytes) -> bytes:
    """Signs arbitrary statement bytes as the node's next receipt and appends it to the ledger."""
    n = b.node(node_id)
    data = n.key.sign_envelope(INTOTO_PAYLOAD_TYPE, statement).to_json_bytes()
    n.chain = ReceiptChain(node_id, n.key, n.chain.last_seq + 1, envelope_digest(data))
    b.exported.append(len(b.ledger))
    b.ledger.append(data)
    return data


def _next(b: BundleBuilder, node_id: str, lease: Lease, kind: ReceiptKind, t: int) -> Receipt:
    """The node's next receipt (seq and prev filled in) under `lease`."""
    chain = b.node(node_id).chain
    return Receipt(
        kind=kind,
        node_id=node_id,
        task_id=lease.task_id,
        attempt=lease.attempt,
        fencing_token=lease.fencing_token,
        agent_id=lease.agent_id,
        lease_id=lease.lease_id,
        lease_issued_unix_ms=lease.issued_unix_ms,
        lease_expires_unix_ms=lease.expires_unix_ms,
        time_unix_ms=t,
        policy_digest=lease.policy_digest,
        seq=chain.last_seq + 1,
        prev=chain.last_digest,
        final_state=4 if kind == ReceiptKind.TASK_FINISHED else 0,
    )


def _crafted(b: BundleBuilder, valid: Bundle) -> dict[str, bytes]:
    """Bundles that attack the verifier rather than the evidence (issue 13)."""
    out: dict[str, bytes] = {}
    compact = encode_bundle(valid)
    mallory = seeded_key("golden/mallory")

    # A node whose clock runs 3 s behind the control plane's: valid, with warnings.
    skewed = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    lease = skewed.lease("task-skewed", "node-a", "agent-1", issued=T0, ttl_ms=30_000)
    for i, kind in enumerate(
        (ReceiptKind.LEASE_GRANTED, ReceiptKind.TASK_STARTED, ReceiptKind.TASK_FINISHED)
    ):
        extra = {"final_state": 4} if kind == ReceiptKind.TASK_FINISHED else {}
        skewed.receipt(kind, lease, T0 - 3_000 + 5 * i, **extra)  # type: ignore[arg-type]
    out["valid-skewed.json"] = encode_bundle(skewed.build())

    # Receipts (signed by nobody the bundle certifies) claiming seq 16,000,000 and 2^62.
    bomb = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    bomb.task("task-1", "node-a", "agent-1", tool_calls=2, start=T0)
    bombed = bomb.build()
    lease = bomb.lease("task-1", "node-a", "agent-1", issued=T0)
    extra_entries = []
    for i, (node, seq) in enumerate((("node-a", 16_000_000), ("node-x", 1 << 62))):
        chain = ReceiptChain(node, mallory, seq - 1, "00" * 32)
        env = chain.sign(
            dataclasses.replace(
                _next(bomb, "node-a", lease, ReceiptKind.TOOL_CALL, T0 + 10),
                node_id=node,
                seq=0,
                prev="",
            )
        )
        extra_entries.append(
            dataclasses.replace(bombed.entries[-1], envelope=env, leaf_index=1000 + i)
        )
    out["crafted-seq-bomb.json"] = encode_bundle(
        dataclasses.replace(bombed, entries=[*bombed.entries, *extra_entries])
    )

    depth = 50_000
    out["crafted-deep-nesting.json"] = (
        b'{"version":1,"entries":' + b"[" * depth + b"]" * depth + b"}\n"
    )

    # A receipt, signed by its node, whose statement nests 50,000 deep.
    deep = b.node("node-a").key.sign_envelope(
        INTOTO_PAYLOAD_TYPE, b'{"_type":' + b"[" * depth + b"]" * depth + b"}"
    )
    last = dataclasses.replace(valid.entries[-1], envelope=deep.to_json_bytes())
    out["crafted-deep-statement.json"] = encode_bundle(
        dataclasses.replace(valid, entries=[*valid.entries[:-1], last])
    )

    # A second "entries" member: JSON readers keep the last (10 receipts), the old
    # fast path read the first (11).
    ten = encode_bundle(dataclasses.replace(valid, entries=valid.entries[:10]))
    entries_10 = ten[ten.index(b'"entries":') : ten.index(b',"nodeCertificates"')]
    out["crafted-duplicate-entries.json"] = compact[:-2] + b"," + entries_10 + b"}\n"

    # A receipt whose statement names two task ids (one for first-wins readers).
    dup = BundleBuilder(seed="golden", origin="tether.golden/ledger")
    lease = dup.task("task-1", "node-a", "agent-1", tool_calls=1, start=T0, finish=False)
    r = _next(dup, "node-a", lease, ReceiptKind.TASK_FINISHED, T0 + 40)
    stmt = statement_bytes(r).replace(b'"taskId":"task-1"', b'"taskId":"task-9","taskId":"task-1"')
    _raw_receipt(dup, "node-a", stmt)
    out["crafted-duplicate-key-statement.json"] = encode_bundle(dup.build())

    out["crafted-zeros.json"] = bytes(4096)
    out["crafted-whitespace.json"] = compact.replace(b'"entries":', b'"entries": ', 1)

    # A proof hash whose last base64 character differs only in its unused low bits.
    h = valid.entries[0].proof_b64[0]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    loose = h[:42] + alphabet[alphabet.index(h[42]) | 1] + "="
    assert loose != h
    assert base64.b64decode(loose) == base64.b64decode(h)
    out["crafted-noncanonical-hash.json"] = compact.replace(h.encode(), loose.encode(), 1)

    assert valid.checkpoint is not None
    out["crafted-checkpoint-time.json"] = compact.replace(
        b'"note":', b'"timestampUnixMs":"1700000000000","note":', 1
    )

    # A lease envelope whose keyid names another key; its signature is still good.
    lease_env = valid.leases[0]
    wrong = Envelope(
        lease_env.payload, lease_env.payload_type, ((mallory.keyid, lease_env.signatures[0][1]),)
    )
    out["crafted-lease-keyid.json"] = encode_bundle(
        dataclasses.replace(valid, leases=[wrong, *valid.leases[1:]])
    )
    out["crafted-control-keyids.json"] = encode_bundle(
        dataclasses.replace(valid, control_keyids=[mallory.keyid])
    )
    out["crafted-exported-time.json"] = encode_bundle(
        dataclasses.replace(valid, exported_unix_ms=valid.exported_unix_ms + 1)
    )

    # Checkpoint notes looser readers accept: a bad line by the right key name and
    # key ID before a good one; the control key signing under another name.
    cp = valid.checkpoint
    body = CheckpointBody(cp.origin, cp.tree_size, cp.root_hash).text()
    good = cp.note[len(body) + 1 :]
    name, b64 = good[len(SIG_PREFIX) : -1].split(" ")
    raw = bytearray(base64.b64decode(b64))
    raw[10] ^= 1
    bad = f"{SIG_PREFIX}{name} {base64.b64encode(bytes(raw)).decode()}\n"
    out["crafted-note-bad-then-good.json"] = encode_bundle(
        dataclasses.replace(valid, checkpoint=dataclasses.replace(cp, note=f"{body}\n{bad}{good}"))
    )
    other = sign_note(body, "attacker.example/log", b.control)
    out["crafted-note-other-name.json"] = encode_bundle(
        dataclasses.replace(valid, checkpoint=dataclasses.replace(cp, note=other))
    )
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in build_all().items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(build_all())} files to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
