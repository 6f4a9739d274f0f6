"""The export manifest: a bundle whose chain was cut at the end, or whose manifest is bad, fails."""

from __future__ import annotations

import dataclasses

import pytest

from tether.core.errors import VerificationError
from tether.core.receipts import ReceiptKind
from tether.crypto.manifest import ExportManifest, sign_manifest, verify_manifest
from tether.crypto.signing import Envelope
from tether.verify import Bundle, decode_bundle, encode_bundle, verify_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key


def _open_chain() -> tuple[BundleBuilder, Bundle]:
    """A node whose chain ends in a lease_lost receipt: no task_finished to miss."""
    b = BundleBuilder(seed="manifest")
    b.task("t1", "n", "a", tool_calls=1)
    lease = b.task("t2", "n", "a", tool_calls=1, start=T0 + 100, finish=False)
    b.receipt(ReceiptKind.LEASE_LOST, lease, T0 + 200, reason="lapsed")
    return b, b.build()


def _checks(b: BundleBuilder, bundle: Bundle) -> list[tuple[str, str]]:
    report = verify_bundle(bundle, [b.control.public], allow_open=True, threads=1)
    return [(f.check, f.ref) for f in report.failures]


def _manifest(b: BundleBuilder, bundle: Bundle) -> ExportManifest:
    assert bundle.manifest is not None
    return verify_manifest(bundle.manifest, {b.control.keyid: b.control.public})


def test_valid_manifest_round_trips() -> None:
    """The manifest survives the file format and lists each node's last seq and tasks."""
    b, bundle = _open_chain()
    assert _checks(b, bundle) == []
    again = decode_bundle(encode_bundle(bundle))
    assert again == bundle
    m = _manifest(b, bundle)
    assert [(n.node_id, n.last_seq, n.task_ids) for n in m.nodes] == [("n", 10, ("t1", "t2"))]


def test_deleting_the_last_receipt_is_caught() -> None:
    """Cutting the tail of a chain (one or more receipts) fails `manifest`, naming the seqs."""
    b, bundle = _open_chain()
    assert _checks(b, dataclasses.replace(bundle, entries=bundle.entries[:-1])) == [
        ("manifest", "n#10")
    ]
    assert ("manifest", "n#6-10") in _checks(
        b, dataclasses.replace(bundle, entries=bundle.entries[:5])
    )


def test_missing_unsigned_or_foreign_manifest_fails() -> None:
    """No manifest, one signed by an unknown key, or one of another bundle: each fails."""
    b, bundle = _open_chain()
    assert _checks(b, dataclasses.replace(bundle, manifest=None)) == [("manifest", "manifest")]
    m = _manifest(b, bundle)
    forged = sign_manifest(m, seeded_key("mallory"))
    assert _checks(b, dataclasses.replace(bundle, manifest=forged)) == [("manifest", "manifest")]
    assert bundle.manifest is not None
    retyped = Envelope(bundle.manifest.payload, "application/json", bundle.manifest.signatures)
    assert _checks(b, dataclasses.replace(bundle, manifest=retyped)) == [("manifest", "manifest")]
    other = dataclasses.replace(m, tree_size=m.tree_size + 1)
    resigned = sign_manifest(other, b.control)
    assert ("manifest", "manifest") in _checks(b, dataclasses.replace(bundle, manifest=resigned))


def test_manifest_disagreeing_with_entries_fails() -> None:
    """A manifest with another last seq, digest, task set or node list fails `manifest`."""
    b, bundle = _open_chain()
    m = _manifest(b, bundle)
    node = m.nodes[0]
    variants = [
        dataclasses.replace(node, last_seq=node.last_seq + 1),
        dataclasses.replace(node, last_envelope_sha256="00" * 32),
        dataclasses.replace(node, task_ids=("t1",)),
    ]
    for v in variants:
        env = sign_manifest(dataclasses.replace(m, nodes=(v,)), b.control)
        assert "manifest" in {c for c, _ in _checks(b, dataclasses.replace(bundle, manifest=env))}
    extra = dataclasses.replace(node, node_id="zz")
    env = sign_manifest(dataclasses.replace(m, nodes=(node, extra)), b.control)
    assert ("manifest", "zz#1-10") in _checks(b, dataclasses.replace(bundle, manifest=env))
    env = sign_manifest(dataclasses.replace(m, nodes=()), b.control)
    assert ("manifest", "n") in _checks(b, dataclasses.replace(bundle, manifest=env))


def test_reregistered_node_keeps_old_receipts_valid() -> None:
    """Receipts signed under an earlier certificate of the same key verify with both exported."""
    from tether.crypto.certs import issue_cert

    b, bundle = _open_chain()
    n = b.nodes["n"]
    # Issued 10 s after the first receipts: beyond the 5 s clock-skew bound.
    _, later = issue_cert(b.control, "n", n.key.public.raw, T0 + 10_000)
    only_later = dataclasses.replace(bundle, node_certificates=[later])
    assert ("certificate", "n#1") in _checks(b, only_later)
    both = dataclasses.replace(bundle, node_certificates=[n.cert, later])
    assert _checks(b, both) == []


def test_control_receipt_digests_are_strictly_decoded() -> None:
    """Control receipt digests must be sorted, distinct hex SHA-256: anything else is refused."""
    b, bundle = _open_chain()
    m = _manifest(b, bundle)
    key = {b.control.keyid: b.control.public}
    good = dataclasses.replace(m, control_receipts=("aa" * 32, "bb" * 32))
    assert verify_manifest(sign_manifest(good, b.control), key) == good
    for bad in (("bb" * 32, "aa" * 32), ("aa" * 32, "aa" * 32), ("xyz",)):
        env = sign_manifest(dataclasses.replace(m, control_receipts=bad), b.control)
        with pytest.raises(VerificationError, match="control receipt digests"):
            verify_manifest(env, key)
