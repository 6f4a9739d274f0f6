"""Per-task bundles and consistency with a previous checkpoint, attacked as a crafter would.

A per-task bundle holds one task's receipts out of chains shared with other
tasks; its signed manifest lists exactly which (node, seq) belong, so the
verifier can prove completeness without the other tasks' receipts. Crafted
variants go through the real `tether verify` process: exit 1, a named check,
no traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from tether.core.receipts import ControlReceipt, ReceiptKind
from tether.core.states import State
from tether.core.timeouts import EndReason
from tether.crypto.manifest import ExportManifest, decode_manifest, sign_manifest
from tether.crypto.merkle import MerkleTree, leaf_hash
from tether.crypto.note import CheckpointBody, sign_checkpoint
from tether.crypto.receipts import parse_receipt, sign_control_receipt
from tether.crypto.signing import Envelope
from tether.verify import Bundle, Entry, decode_bundle, encode_bundle, verify_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key
from tether.verify.bundle import BundleWriter


def _builder() -> BundleBuilder:
    """node-a runs t1 and t2 interleaved (t1's seqs 1, 2, 5, 8, 9), node-b runs t3."""
    b = BundleBuilder(seed="per-task")
    t1 = b.lease("t1", "node-a", "agent-1", issued=T0)
    t2 = b.lease("t2", "node-a", "agent-2", issued=T0)
    b.receipt(ReceiptKind.LEASE_GRANTED, t1, T0 + 1)
    b.receipt(ReceiptKind.TASK_STARTED, t1, T0 + 2)
    b.receipt(ReceiptKind.LEASE_GRANTED, t2, T0 + 3)
    b.task("t3", "node-b", "agent-3", tool_calls=1, start=T0 + 4)
    b.receipt(ReceiptKind.TASK_STARTED, t2, T0 + 5)
    b.receipt(ReceiptKind.TOOL_CALL, t1, T0 + 6, tool="http.get", status="ok")
    b.receipt(ReceiptKind.TOOL_CALL, t2, T0 + 7, tool="http.get", status="ok")
    b.foreign_leaf(b"another tenant's leaf")
    b.receipt(ReceiptKind.TASK_FINISHED, t2, T0 + 8, final_state=4)
    b.receipt(ReceiptKind.TOOL_CALL, t1, T0 + 9, tool="http.get", status="ok")
    b.receipt(ReceiptKind.TASK_FINISHED, t1, T0 + 10, final_state=4)
    return b


def _facts(e: Entry) -> tuple[str, int, str]:
    r = parse_receipt(e.envelope)[1]
    return r.node_id, r.seq, r.task_id


@pytest.fixture(scope="module")
def built() -> tuple[BundleBuilder, Bundle]:
    b = _builder()
    return b, b.build(tasks=("t1",))


def _failed(b: BundleBuilder, bundle: Bundle, **kw: object) -> set[str]:
    return verify_bundle(bundle, [b.control.public], threads=1, **kw).checks_failed()  # type: ignore[arg-type]


def _manifest(bundle: Bundle) -> ExportManifest:
    assert bundle.manifest is not None
    return decode_manifest(bundle.manifest.payload)


def _resign(b: BundleBuilder, bundle: Bundle, m: ExportManifest) -> Bundle:
    return dataclasses.replace(bundle, manifest=sign_manifest(m, b.control))


def test_per_task_bundle_holds_only_the_task_and_verifies(
    built: tuple[BundleBuilder, Bundle],
) -> None:
    """A per-task bundle holds t1's receipts only (seqs with holes where t2's are), t1's
    lease only, a manifest listing exactly those seqs, and verifies through the file."""
    b, bundle = built
    assert [_facts(e) for e in bundle.entries] == [
        ("node-a", 1, "t1"),
        ("node-a", 2, "t1"),
        ("node-a", 5, "t1"),
        ("node-a", 8, "t1"),
        ("node-a", 9, "t1"),
    ]
    assert len(bundle.leases) == 1
    m = _manifest(bundle)
    assert m.task_ids == ("t1",)
    assert [(n.node_id, n.seqs, n.last_seq) for n in m.nodes] == [("node-a", (1, 2, 5, 8, 9), 9)]
    report = verify_bundle(encode_bundle(bundle), [b.control.public], threads=1)
    assert report.ok, report.failures
    assert report.exported_tasks == ["t1"]
    assert [t.task_id for t in report.tasks] == ["t1"]


def test_whole_chain_bundles_are_unchanged(built: tuple[BundleBuilder, Bundle]) -> None:
    """Without tasks the builder still writes whole chains, and a gap there is chain.gap."""
    b, _ = built
    whole = b.build()
    assert not _manifest(whole).task_ids
    assert _failed(b, whole) == set()
    assert "chain.gap" in _failed(b, dataclasses.replace(whole, entries=whole.entries[1:]))


def test_per_task_manifest_must_list_seqs_of_exported_tasks(
    built: tuple[BundleBuilder, Bundle],
) -> None:
    """A signed per-task manifest whose node task is not an exported task, whose seqs do
    not end at last_seq, or a whole-chain manifest listing seqs, is refused."""
    b, bundle = built
    m = _manifest(bundle)
    n = m.nodes[0]
    for bad in (
        dataclasses.replace(n, task_ids=("t1", "t2")),
        dataclasses.replace(n, seqs=(1, 2, 5, 8)),
        dataclasses.replace(n, seqs=(2, 1, 5, 8, 9)),
    ):
        assert _failed(b, _resign(b, bundle, dataclasses.replace(m, nodes=(bad,)))) >= {"manifest"}
    whole = dataclasses.replace(m, task_ids=())
    assert "manifest" in _failed(b, _resign(b, bundle, whole))


def test_prev_links_are_checked_where_seqs_are_consecutive(
    built: tuple[BundleBuilder, Bundle],
) -> None:
    """In a per-task bundle two consecutive seqs of a node still have their prev link
    checked: a receipt re-signed by the node with a wrong prev fails chain.prev."""
    b, bundle = built
    from tether.crypto.receipts import sign_receipt

    r = parse_receipt(bundle.entries[1].envelope)[1]
    forged = sign_receipt(dataclasses.replace(r, prev="00" * 32), b.node("node-a").key)
    ledger = list(b.ledger)
    i = ledger.index(bundle.entries[1].envelope)
    ledger[i] = forged
    b2 = dataclasses.replace(b, ledger=ledger)
    b2.control = b.control
    assert "chain.prev" in _failed(b2, b2.build(tasks=("t1",)))


# --- crafted per-task bundles through the real CLI ----------------------------------


def _slipped(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """t2's receipt seq 3, with its true inclusion proof, inserted in ledger order."""
    tree = MerkleTree([leaf_hash(x) for x in b.ledger])
    whole = b.build()
    other = next(e for e in whole.entries if _facts(e) == ("node-a", 3, "t2"))
    entry = Entry.of(
        other.envelope, other.leaf_index, other.leaf_index, tree.size,
        tree.inclusion_proof(other.leaf_index),
    )  # fmt: skip
    entries = sorted([*bundle.entries, entry], key=lambda e: e.leaf_index)
    return dataclasses.replace(bundle, entries=entries)


def _omitted_from_manifest(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """The manifest (re-signed by the control key) leaves out seq 5, which the bundle holds."""
    m = _manifest(bundle)
    n = dataclasses.replace(m.nodes[0], seqs=(1, 2, 8, 9))
    return _resign(b, bundle, dataclasses.replace(m, nodes=(n,)))


def _dropped(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """The bundle leaves out seq 5, which the signed manifest lists."""
    return dataclasses.replace(bundle, entries=[e for e in bundle.entries if _facts(e)[1] != 5])


def _unsigned(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """The manifest is signed by a key that is not the control plane's."""
    return dataclasses.replace(
        bundle, manifest=sign_manifest(_manifest(bundle), seeded_key("not-the-control-key"))
    )


def _wrong_proof(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """One entry's inclusion proof has a sibling hash replaced."""
    e = bundle.entries[2]
    proof = list(e.proof)
    proof[0] = hashlib.sha256(b"wrong").digest()
    bad = Entry.of(e.envelope, e.leaf_index, e.proof_index, e.proof_size, proof)
    return dataclasses.replace(bundle, entries=[*bundle.entries[:2], bad, *bundle.entries[3:]])


def _foreign_lease(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """t2's genuine control-signed lease added to t1's per-task bundle."""
    mine = set(bundle.leases)
    return dataclasses.replace(
        bundle, leases=[*bundle.leases, *(e for e in b.build().leases if e not in mine)]
    )


def _foreign_control_receipt(b: BundleBuilder, bundle: Bundle) -> Bundle:
    """A genuine control receipt (t9 canceled while queued, signed by the control key) added
    to t1's per-task bundle: valid on its own, but no part of t1's export."""
    c = ControlReceipt(
        end_reason=EndReason.CANCELED,
        task_id="t9",
        attempt=0,
        fencing_token=0,
        state=int(State.CANCELED),
        time_unix_ms=T0 + 20,
        reason="canceled by an operator",
        clock="control-plane",
    )
    env = Envelope.from_json_bytes(sign_control_receipt(c, b.control))
    return dataclasses.replace(bundle, control_receipts=[*bundle.control_receipts, env])


@pytest.mark.parametrize(
    ("craft", "check", "needle"),
    [
        (_foreign_lease, "manifest", "lease of task 't2', but the bundle was exported for"),
        (
            _foreign_control_receipt,
            "manifest",
            "control receipt of task 't9', but the bundle was exported for",
        ),
        (_slipped, "manifest", "receipt of task 't2', but the bundle was exported for t1"),
        (_omitted_from_manifest, "manifest", "not in the export manifest's list"),
        (_dropped, "manifest", "listed in the export manifest are missing"),
        (_unsigned, "manifest", "signed by keyid"),
        (_wrong_proof, "inclusion", "node-a#5: inclusion"),
    ],
)
def test_crafted_per_task_bundles_fail_cleanly(
    built: tuple[BundleBuilder, Bundle], tmp_path: Path, craft: object, check: str, needle: str
) -> None:
    """`tether verify` rejects each crafted per-task bundle: exit 1, the check named, no
    traceback."""
    b, bundle = built
    path = tmp_path / "crafted.json"
    path.write_bytes(encode_bundle(craft(b, bundle)))  # type: ignore[operator]
    trust = tmp_path / "control.pub"
    trust.write_bytes(b.control.public.pem())
    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", "verify", str(path), "--trust", str(trust)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("INVALID: ")
    assert f": {check}: " in done.stdout
    assert needle in done.stdout
    assert "Traceback" not in done.stderr + done.stdout


# --- consistency with a previous checkpoint -----------------------------------------


def test_previous_checkpoint_consistent_and_forked(
    built: tuple[BundleBuilder, Bundle], tmp_path: Path
) -> None:
    """A real earlier checkpoint is proven a prefix of the bundle's (through the CLI); a
    forked one (same size, other root), a bundle without the proof, a proof from another
    size and a note by an untrusted key all fail `consistency`."""
    b, _ = built
    size = len(b.ledger)
    old = 7
    earlier = b.checkpoint_note(old)
    bundle = b.build(tasks=("t1",), previous_tree_size=old)
    assert _manifest(bundle).previous_tree_size == old
    report = verify_bundle(bundle, [b.control.public], threads=1, previous_checkpoint=earlier)
    assert report.ok, report.failures
    assert report.consistent_with == old
    # The same size as the bundle's needs no proof, only the same root.
    same = b.checkpoint_note(size)
    assert _failed(b, b.build(tasks=("t1",)), previous_checkpoint=same) == set()

    forked = sign_checkpoint(
        CheckpointBody(b.origin, old, hashlib.sha256(b"other history").digest()), b.control
    )
    forked_same = sign_checkpoint(
        CheckpointBody(b.origin, size, hashlib.sha256(b"other history").digest()), b.control
    )
    untrusted = sign_checkpoint(
        CheckpointBody(b.origin, old, MerkleTree([leaf_hash(x) for x in b.ledger]).root(old)),
        seeded_key("someone else"),
    )
    assert _failed(b, bundle, previous_checkpoint=forked) == {"consistency"}
    assert _failed(b, b.build(tasks=("t1",)), previous_checkpoint=forked_same) == {"consistency"}
    assert _failed(b, b.build(tasks=("t1",)), previous_checkpoint=earlier) == {"consistency"}
    assert _failed(b, b.build(previous_tree_size=old - 1), previous_checkpoint=earlier) == {
        "consistency"
    }
    assert _failed(b, bundle, previous_checkpoint=untrusted) == {"consistency"}

    trust = tmp_path / "control.pub"
    trust.write_bytes(b.control.public.pem())
    (tmp_path / "bundle.json").write_bytes(encode_bundle(bundle))
    for note, code, needle in (
        (earlier, 0, f"consistent with the previous checkpoint at size {old}"),
        (forked, 1, "the log forked or was rewritten"),
    ):
        (tmp_path / "old.note").write_text(note)
        done = subprocess.run(
            [
                sys.executable, "-m", "tether.cli", "verify", str(tmp_path / "bundle.json"),
                "--trust", str(trust), "--previous-checkpoint", str(tmp_path / "old.note"),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == code, done.stdout + done.stderr
        assert needle in done.stdout
        assert "Traceback" not in done.stderr


def test_manifest_consistency_fields_are_authenticated(
    built: tuple[BundleBuilder, Bundle],
) -> None:
    """The consistency proof travels inside the signed manifest: flipping a bit of it
    breaks the signature, so no byte of it goes unauthenticated."""
    b, _ = built
    bundle = b.build(tasks=("t1",), previous_tree_size=7)
    assert bundle.manifest is not None
    payload = bytearray(bundle.manifest.payload)
    payload[-5] ^= 1
    env = dataclasses.replace(bundle.manifest, payload=bytes(payload))
    assert "manifest" in _failed(b, dataclasses.replace(bundle, manifest=env))


def test_streamed_writer_writes_the_canonical_encoding(built: tuple[BundleBuilder, Bundle]) -> None:
    """Pages written one by one with BundleWriter are byte for byte the canonical file,
    which decodes strictly; sections out of file order are refused."""
    b, _ = built
    whole = b.build()
    out = io.BytesIO()
    w = BundleWriter(out)
    for i in range(0, len(whole.entries), 3):
        w.entries(whole.entries[i : i + 3])
    w.node_certificates(whole.node_certificates[:1])
    w.node_certificates(whole.node_certificates[1:])
    w.leases([])
    w.leases(whole.leases)
    w.finish(dataclasses.replace(whole, entries=[], node_certificates=[], leases=[]))
    assert out.getvalue() == encode_bundle(whole)
    assert decode_bundle(out.getvalue()) == whole
    w2 = BundleWriter(io.BytesIO())
    w2.leases(whole.leases)
    with pytest.raises(ValueError, match="entries after leases"):
        w2.entries(whole.entries)
