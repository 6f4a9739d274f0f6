"""The offline verifier: a valid bundle passes, and every tampering is caught and named."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import pytest

from tether.core.receipts import ReceiptKind
from tether.core.states import State
from tether.core.timeouts import EndReason
from tether.crypto.note import CheckpointBody, sign_checkpoint
from tether.crypto.receipts import parse_receipt, sign_receipt
from tether.crypto.signing import INTOTO_PAYLOAD_TYPE, Envelope, SigningKey
from tether.verify import (
    Bundle,
    CheckpointInfo,
    Entry,
    Report,
    decode_bundle,
    encode_bundle,
    verifier,
    verify_bundle,
)
from tether.verify.builder import T0, BundleBuilder, seeded_key


def _builder() -> BundleBuilder:
    """Two nodes, a lapsed first attempt, a renewal and foreign leaves in the ledger."""
    b = BundleBuilder(seed="unit")
    lost = b.lease("t1", "node-a", "agent-1", token=1, issued=T0)
    b.receipt(ReceiptKind.LEASE_GRANTED, lost, T0)
    b.receipt(ReceiptKind.TASK_STARTED, lost, T0 + 5)
    b.foreign_leaf(b"another tenant's leaf")
    b.receipt(ReceiptKind.LEASE_LOST, lost, T0 + 40_000, reason="renewal refused")
    b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + 30_500, State.QUEUED, lease=lost)
    b.task("t2", "node-a", "agent-1", tool_calls=2, start=T0 + 50_000)
    renewed = b.task(
        "t1", "node-b", "agent-2", tool_calls=2, attempt=2, token=2, start=T0 + 60_000, finish=False
    )
    b.lease(
        "t1", "node-b", "agent-2", attempt=2, token=2, issued=T0 + 80_000, lease_id=renewed.lease_id
    )
    late = dataclasses.replace(renewed, issued_unix_ms=T0 + 80_000, expires_unix_ms=T0 + 110_000)
    b.foreign_leaf(b"x")
    b.receipt(ReceiptKind.MEMORY_WRITE, late, T0 + 95_000, memory_key="task:notes")
    b.receipt(ReceiptKind.TASK_FINISHED, late, T0 + 96_000, final_state=5, reason="gave up")
    return b


@pytest.fixture(scope="module")
def built() -> tuple[BundleBuilder, Bundle]:
    b = _builder()
    return b, b.build()


def _verify(b: BundleBuilder, bundle: Bundle, **kw: bool) -> set[str]:
    report = verify_bundle(bundle, [b.control.public], threads=1, **kw)
    return report.checks_failed()


def _with_entries(bundle: Bundle, entries: list[Entry]) -> Bundle:
    return dataclasses.replace(bundle, entries=entries)


def test_valid_bundle_passes(built: tuple[BundleBuilder, Bundle]) -> None:
    """A real bundle verifies, through the file format too, with a timeline per task."""
    b, bundle = built
    data = encode_bundle(bundle)
    report = verify_bundle(data, [b.control.public])
    assert report.ok, report.failures
    assert report.entries == len(bundle.entries)
    assert report.nodes == 2
    assert [t.task_id for t in report.tasks] == ["t1", "t2"]
    assert report.tasks[0].final_state == "failed"
    assert decode_bundle(data) == bundle
    assert json.loads(json.dumps(report.to_dict()))["valid"] is True


def test_only_the_canonical_encoding_is_verified(built: tuple[BundleBuilder, Bundle]) -> None:
    """Other proto3 JSON spellings of a bundle fail bundle.format; tools may still read them."""
    from google.protobuf import json_format

    from tether.verify.bundle import bundle_from_proto, bundle_to_proto

    b, bundle = built
    msg = bundle_to_proto(bundle)
    assert bundle_from_proto(msg) == bundle
    for text in (
        json_format.MessageToJson(msg),
        json_format.MessageToJson(msg, preserving_proto_field_name=True),
        encode_bundle(bundle, indent=1).decode(),
    ):
        report = verify_bundle(text.encode(), [b.control.public])
        assert report.checks_failed() == {"bundle.format"}
        assert "canonical encoding" in report.failures[0].why
        assert decode_bundle(text.encode(), canonical=False) == bundle


def test_rejects_by_default(built: tuple[BundleBuilder, Bundle]) -> None:
    """No trusted key is a usage error; a wrong trusted key fails every signed object."""
    _b, bundle = built
    with pytest.raises(ValueError, match="trusted"):
        verify_bundle(bundle, [])
    checks = verify_bundle(bundle, [seeded_key("stranger").public]).checks_failed()
    assert {"checkpoint", "certificate", "lease.signature"} <= checks


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "JSON"),
        (b'{"version": 2}', "version"),
        (b'{"version": 1, "bogus": 1}', "unknown field"),
        (b'{"version": 1, "entries": [{"envelope": 5}]}', "base64"),
    ],
)
def test_malformed_files(data: bytes, why: str) -> None:
    """Unreadable bundles fail with bundle.format and say why."""
    report = verify_bundle(data, [seeded_key("k").public])
    assert [f.check for f in report.failures] == ["bundle.format"]
    assert why in report.failures[0].why


def _flip_cases(bundle: Bundle, per_envelope: int) -> list[tuple[int, int]]:
    rng = random.Random(6962)
    cases = []
    for i, e in enumerate(bundle.entries):
        n = len(e.envelope)
        positions = set(range(min(n, 12))) | set(range(max(0, n - 100), n))
        positions |= set(rng.sample(range(n), min(n, per_envelope)))
        cases += [(i, p) for p in sorted(positions)]
    return cases


def test_tamper_every_byte_flip(built: tuple[BundleBuilder, Bundle]) -> None:
    """Flipping any byte of any envelope is caught as inclusion plus format or signature."""
    b, bundle = built
    cases = _flip_cases(bundle, 40)
    assert len({i for i, _ in cases}) == len(bundle.entries)
    for i, pos in cases:
        e = bundle.entries[i]
        raw = bytearray(e.envelope)
        raw[pos] ^= 0x01
        entries = list(bundle.entries)
        entries[i] = dataclasses.replace(e, envelope=bytes(raw))
        checks = _verify(b, _with_entries(bundle, entries))
        assert "inclusion" in checks, (i, pos)
        assert checks & {"envelope.format", "receipt.format", "signature"}, (i, pos, checks)


def test_tamper_deletion(built: tuple[BundleBuilder, Bundle]) -> None:
    """Deleting any one receipt, the last of a chain included, is caught (gap or manifest)."""
    b, bundle = built
    receipts = [parse_receipt(e.envelope)[1] for e in bundle.entries]
    last_seq: dict[str, int] = {}
    for r in receipts:
        last_seq[r.node_id] = max(last_seq.get(r.node_id, 0), r.seq)
    for i, r in enumerate(receipts):
        cut = _with_entries(bundle, bundle.entries[:i] + bundle.entries[i + 1 :])
        checks = _verify(b, cut, allow_open=True)
        expected = "manifest" if r.seq == last_seq[r.node_id] else "chain.gap"
        assert expected in checks, (i, r.node_id, r.seq, checks)


def test_empty_bundle_is_rejected(built: tuple[BundleBuilder, Bundle]) -> None:
    """A bundle with every receipt removed is invalid, never "valid, nothing to check"."""
    b, bundle = built
    assert _verify(b, _with_entries(bundle, []), allow_open=True) == {"bundle.format"}


def test_tamper_adjacent_swap(built: tuple[BundleBuilder, Bundle]) -> None:
    """Swapping two adjacent receipts is caught as reordering (chain or ledger order)."""
    b, bundle = built
    nodes = [parse_receipt(e.envelope)[1].node_id for e in bundle.entries]
    for i in range(len(bundle.entries) - 1):
        entries = list(bundle.entries)
        entries[i], entries[i + 1] = entries[i + 1], entries[i]
        checks = _verify(b, _with_entries(bundle, entries))
        assert "bundle.order" in checks
        if nodes[i] == nodes[i + 1]:
            assert "chain.order" in checks


def test_tamper_resigned_with_unknown_key(built: tuple[BundleBuilder, Bundle]) -> None:
    """A receipt re-signed by an unknown key fails signature, even with the right keyid hint."""
    b, bundle = built
    stranger = SigningKey.generate()
    for i in (0, len(bundle.entries) // 2, len(bundle.entries) - 1):
        e = bundle.entries[i]
        env, r = parse_receipt(e.envelope)
        forged = sign_receipt(r, stranger)
        hinted = Envelope(
            env.payload,
            INTOTO_PAYLOAD_TYPE,
            (
                (
                    env.signatures[0][0],
                    stranger.sign_envelope(INTOTO_PAYLOAD_TYPE, env.payload).signatures[0][1],
                ),
            ),
        ).to_json_bytes()
        for data in (forged, hinted):
            entries = list(bundle.entries)
            entries[i] = dataclasses.replace(e, envelope=data)
            checks = _verify(b, _with_entries(bundle, entries))
            assert "signature" in checks


def test_tamper_checkpoint_wrong_root(built: tuple[BundleBuilder, Bundle]) -> None:
    """A wrong root fails the checkpoint check, or inclusion if the note is re-signed."""
    b, bundle = built
    cp = bundle.checkpoint
    assert cp is not None
    wrong = bytes(32)
    edited = dataclasses.replace(cp, root_hash=wrong)
    assert "checkpoint" in _verify(b, dataclasses.replace(bundle, checkpoint=edited))
    body = CheckpointBody(cp.origin, cp.tree_size, wrong)
    unsigned = dataclasses.replace(
        cp, root_hash=wrong, note=sign_checkpoint(body, SigningKey.generate())
    )
    assert "checkpoint" in _verify(b, dataclasses.replace(bundle, checkpoint=unsigned))
    resigned = CheckpointInfo(cp.origin, cp.tree_size, wrong, 0, sign_checkpoint(body, b.control))
    checks = _verify(b, dataclasses.replace(bundle, checkpoint=resigned))
    assert checks == {"inclusion", "manifest"}  # the manifest names the real root
    assert "checkpoint" in _verify(b, dataclasses.replace(bundle, checkpoint=None))


def test_receipt_after_lease_expired() -> None:
    """A receipt dated after its lease expired (beyond the skew bound) fails lease.window."""
    b = BundleBuilder(seed="late")
    lease = b.lease("t", "n", "a", issued=T0, ttl_ms=1000)
    b.receipt(ReceiptKind.LEASE_GRANTED, lease, T0)
    b.receipt(ReceiptKind.TOOL_CALL, lease, T0 + 1000, tool="x", status="ok")
    b.receipt(ReceiptKind.LEASE_LOST, lease, T0 + 50_000)
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 999, final_state=4)
    report = verify_bundle(b.build(), [b.control.public], max_clock_skew_ms=0)
    assert [(f.check, f.ref) for f in report.failures] == [("lease.window", "n#2")]
    lenient = verify_bundle(b.build(), [b.control.public])
    assert lenient.ok, lenient.failures
    assert [(w.check, w.ref) for w in lenient.warnings] == [("lease.window", "n#2")]


def test_lease_and_task_facts() -> None:
    """Missing leases, wrong executors, open tasks and double finals are each named."""
    b = BundleBuilder(seed="facts")
    lease = b.lease("t", "n", "a")
    b.receipt(ReceiptKind.TASK_STARTED, lease, T0 + 1)
    unleased = dataclasses.replace(lease, fencing_token=9)
    b.receipt(ReceiptKind.TOOL_CALL, unleased, T0 + 2)
    imposter = dataclasses.replace(lease, agent_id="mallory")
    b.receipt(ReceiptKind.TOOL_CALL, imposter, T0 + 3)
    b.task("open", "n", "a", start=T0 + 10, finish=False, token=1)
    report = verify_bundle(b.build(), [b.control.public])
    got = {(f.check, f.ref) for f in report.failures}
    assert got == {
        ("lease.missing", "n#2"),
        ("lease.executor", "n#3"),
        ("lease.closed", "task:t"),
        ("task.final", "task:t"),
        ("lease.closed", "task:open"),
        ("task.final", "task:open"),
    }
    assert verify_bundle(b.build(), [b.control.public], allow_open=True).checks_failed() == {
        "lease.missing",
        "lease.executor",
    }
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 20, final_state=4)
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 21, final_state=5)
    report = verify_bundle(b.build(), [b.control.public], allow_open=True)
    assert ("task.final", "n#11") in {(f.check, f.ref) for f in report.failures}


def test_fork_duplicate_and_prev() -> None:
    """Two envelopes for one seq are a fork; an identical repeat is a duplicate."""
    b = BundleBuilder(seed="fork")
    lease = b.task("t", "n", "a", tool_calls=1)
    bundle = b.build()
    node_key = b.nodes["n"].key
    _env, r = parse_receipt(bundle.entries[2].envelope)
    alt = sign_receipt(dataclasses.replace(r, tool="other"), node_key)
    extra = dataclasses.replace(bundle.entries[2], envelope=alt, leaf_index=10_000)
    assert "chain.fork" in _verify(b, _with_entries(bundle, [*bundle.entries, extra]))
    dup = dataclasses.replace(bundle.entries[2], leaf_index=10_000)
    assert "chain.duplicate" in _verify(b, _with_entries(bundle, [*bundle.entries, dup]))
    relinked = sign_receipt(dataclasses.replace(r, prev="00" * 32), node_key)
    entries = list(bundle.entries)
    entries[2] = dataclasses.replace(entries[2], envelope=relinked)
    assert {"chain.prev", "inclusion"} <= _verify(b, _with_entries(bundle, entries))
    assert lease.task_id == "t"


def test_prev_link_is_checked_whichever_seq_comes_first() -> None:
    """A bad prev fails chain.prev at the receipts whose links break, in either bundle order."""
    b = BundleBuilder(seed="prev-order")
    b.task("t", "n", "a", tool_calls=2)
    bundle = b.build()
    node_key = b.nodes["n"].key
    _env, r = parse_receipt(bundle.entries[2].envelope)
    entries = list(bundle.entries)
    entries[2] = dataclasses.replace(
        entries[2], envelope=sign_receipt(dataclasses.replace(r, prev="00" * 32), node_key)
    )
    swapped = list(entries)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    for order in (entries, swapped):
        report = verify_bundle(_with_entries(bundle, order), [b.control.public], threads=1)
        prevs = sorted(f.ref for f in report.failures if f.check == "chain.prev")
        # Its own prev is wrong, and re-signing changed its digest, the next one's prev.
        assert prevs == [f"n#{r.seq}", f"n#{r.seq + 1}"], report.failures


def test_a_task_told_early_is_told_again_when_more_of_it_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receipt of a finished task in a later chunk still counts (its story is told again)."""
    b = BundleBuilder(seed="late-story")
    lease = b.task("t", "n", "a", tool_calls=2)
    b.task("u", "n", "a", tool_calls=2)
    # After t's end, a receipt under a later fencing token that no lease of t has.
    b.receipt(ReceiptKind.TOOL_CALL, dataclasses.replace(lease, fencing_token=9), T0 + 50_000)
    bundle = b.build()
    whole = verify_bundle(bundle, [b.control.public], threads=1)
    monkeypatch.setattr(verifier, "_LIST_CHUNK", 2)
    chunked = verify_bundle(bundle, [b.control.public], threads=1)
    assert ("task.final", "n#6") in {(f.check, f.ref) for f in chunked.failures}
    assert chunked.failures == whole.failures


def test_details_false_leaves_only_the_timeline_lines_out(
    built: tuple[BundleBuilder, Bundle],
) -> None:
    """details=False: the same verdict, failures and events, each receipt's without its line."""
    b, bundle = built
    entries = list(bundle.entries)
    entries[3] = dataclasses.replace(entries[3], leaf_index=entries[3].leaf_index + 1)
    for sample in (bundle, _with_entries(bundle, entries)):
        full = verify_bundle(sample, [b.control.public], threads=1)
        bare = verify_bundle(sample, [b.control.public], threads=1, details=False)
        assert bare.failures == full.failures
        assert bare.task_count == full.task_count
        events = [e for t in full.tasks for e in t.events]
        assert any(e.detail for e in events)
        receipt_lines_out = [
            e if e.ref.startswith("control[") else dataclasses.replace(e, detail="") for e in events
        ]
        assert [e for t in bare.tasks for e in t.events] == receipt_lines_out


def test_the_task_report_is_built_when_first_used(built: tuple[BundleBuilder, Bundle]) -> None:
    """`Report.tasks` is built on first use; `task_count` counts the tasks without building it."""
    b, bundle = built
    report = verify_bundle(bundle, [b.control.public], threads=1)
    assert report.task_count == 2
    assert report._tasks is None
    assert [t.task_id for t in report.tasks] == ["t1", "t2"]
    assert report.task_count == len(report.tasks) == 2
    report.tasks = []
    assert report.task_count == 0
    assert Report([]).task_count == 0
    assert Report([]).tasks == []


def test_certificate_validity() -> None:
    """A receipt signed outside its node certificate's validity fails certificate."""
    b = BundleBuilder(seed="cert")
    lease = b.lease("t", "n", "a", issued=T0 + 40 * 86_400_000)
    b.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 40 * 86_400_000 + 1, final_state=4)
    assert _verify(b, b.build()) == {"certificate"}
    empty = dataclasses.replace(b.build(), node_certificates=[])
    assert _verify(b, empty) == {"certificate"}


def test_verify_imports_without_grpc() -> None:
    """tether.verify (and its CLI module) import without loading grpc."""
    code = (
        "import sys, tether.verify, tether.verify.cmd, tether.verify.builder; "
        "assert 'grpc' not in sys.modules, 'grpc imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
