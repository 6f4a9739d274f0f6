"""Task stories: control receipts end lapsed, released and canceled leases and tasks, so
strict verification passes exactly when every task's story is complete."""

from __future__ import annotations

import dataclasses

from tether.core.receipts import ControlReceipt, ReceiptKind
from tether.core.states import State
from tether.core.timeouts import EndReason
from tether.crypto.receipts import sign_control_receipt
from tether.crypto.signing import Envelope
from tether.verify import Bundle, decode_bundle, encode_bundle, verify_bundle
from tether.verify.builder import T0, BundleBuilder, seeded_key
from tether.verify.bundle import bundle_from_proto, bundle_to_proto

TTL = 30_000


def _failed(b: BundleBuilder, bundle: Bundle | None = None, **kw: bool) -> set[tuple[str, str]]:
    report = verify_bundle(bundle or b.build(), [b.control.public], threads=1, **kw)
    return {(f.check, f.ref) for f in report.failures}


def _lapsed_then_succeeded(*, lapse_receipt: bool = True) -> BundleBuilder:
    b = BundleBuilder(seed="stories")
    first = b.lease("t", "n1", "a", token=1, issued=T0)
    b.receipt(ReceiptKind.LEASE_GRANTED, first, T0)
    b.receipt(ReceiptKind.LEASE_LOST, first, T0 + TTL, reason="lapsed")
    if lapse_receipt:
        b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + TTL + 5, State.QUEUED, lease=first)
    b.task("t", "n2", "a", tool_calls=1, token=2, attempt=2, start=T0 + TTL + 100)
    return b


def test_expired_task_verifies_strictly_with_its_control_receipt() -> None:
    """A task whose every attempt lapsed ends with a control receipt (expired): strict
    verification passes and the report names the final state and the reason."""
    b = BundleBuilder(seed="expired")
    lease = b.task("t", "n", "a", tool_calls=1, finish=False)
    assert ("task.final", "task:t") in _failed(b)
    b.control_receipt(
        EndReason.HEARTBEAT_TIMEOUT, T0 + TTL + 7, State.EXPIRED, lease=lease, reason="gone"
    )
    report = verify_bundle(encode_bundle(b.build()), [b.control.public])
    assert report.ok, report.failures
    (task,) = report.tasks
    assert task.final_state == "expired"
    assert task.events[-1].kind == "heartbeat_timeout"
    assert task.events[-1].ref == "control[0]"
    assert 'reason="gone"' in task.events[-1].detail


def test_running_task_fails_strict_and_passes_allow_open() -> None:
    """A task whose lease is still open fails strict verification (task.final, lease.closed);
    --allow-open accepts it."""
    b = BundleBuilder(seed="running")
    b.task("t", "n", "a", tool_calls=1, finish=False)
    assert _failed(b) == {("lease.closed", "task:t"), ("task.final", "task:t")}
    assert _failed(b, allow_open=True) == set()


def test_requeued_story_needs_its_lapse_receipt() -> None:
    """Lapse, re-queue, success: valid with the control receipt of the lapse; without it the
    first lease has no end, which --allow-open does not excuse (it is not the last lease)."""
    assert _failed(_lapsed_then_succeeded()) == set()
    cut = _lapsed_then_succeeded(lapse_receipt=False)
    assert _failed(cut) == {("lease.closed", "task:t")}
    assert _failed(cut, allow_open=True) == {("lease.closed", "task:t")}


def test_canceled_stories_verify() -> None:
    """A task canceled while running (its lease ends with it) and one canceled while queued
    after a lapse (the lapse ends the lease, the cancel ends the task) both verify."""
    b = BundleBuilder(seed="canceled")
    running = b.task("r", "n", "a", tool_calls=1, finish=False)
    b.control_receipt(EndReason.CANCELED, T0 + 100, State.CANCELED, lease=running, reason="op")
    queued = b.task("q", "n", "a", tool_calls=0, finish=False, start=T0 + 200)
    b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + TTL + 300, State.QUEUED, lease=queued)
    b.control_receipt(EndReason.CANCELED, T0 + TTL + 400, State.CANCELED, task_id="q", token=1)
    report = verify_bundle(b.build(), [b.control.public], threads=1)
    assert report.ok, report.failures
    assert {t.task_id: t.final_state for t in report.tasks} == {"q": "canceled", "r": "canceled"}


def test_two_ends_and_two_finals_are_refused() -> None:
    """A node's task_finished and a control receipt ending the same lease: two ends of one
    lease and two final records; a node may not report a final state only the control
    plane decides."""
    b = BundleBuilder(seed="twice")
    lease = b.task("t", "n", "a", tool_calls=1)
    b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + TTL, State.EXPIRED, lease=lease)
    assert _failed(b) == {("lease.closed", "task:t"), ("task.final", "control[0]")}
    c = BundleBuilder(seed="node-cancel")
    lease = c.task("t", "n", "a", tool_calls=1, finish=False)
    c.receipt(ReceiptKind.TASK_FINISHED, lease, T0 + 50, final_state=int(State.CANCELED))
    assert _failed(c) == {("task.final", "n#5")}


def test_final_must_be_under_the_last_token() -> None:
    """An expiry recorded for token 1 while a later lease (token 2) exists is not the end."""
    b = BundleBuilder(seed="early-final")
    first = b.task("t", "n", "a", tool_calls=0, finish=False)
    b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + TTL, State.EXPIRED, lease=first)
    second = b.lease("t", "n", "a", token=2, attempt=2, issued=T0 + TTL + 10)
    b.receipt(ReceiptKind.LEASE_GRANTED, second, T0 + TTL + 10)
    assert ("task.final", "control[0]") in _failed(b, allow_open=True)


def test_forged_and_mismatched_control_receipts_are_refused() -> None:
    """A control receipt signed by another key, one naming a holder no signed lease has, and
    one edited after signing each fail control.receipt (and then the task has no final)."""
    b = BundleBuilder(seed="forged")
    lease = b.task("t", "n", "a", tool_calls=1, finish=False)
    end = ControlReceipt(
        end_reason=EndReason.HEARTBEAT_TIMEOUT,
        task_id="t",
        attempt=1,
        fencing_token=1,
        state=int(State.EXPIRED),
        time_unix_ms=T0 + TTL,
        lease_id=lease.lease_id,
        node_id="n",
        agent_id="a",
    )
    mallory = seeded_key("mallory")
    b.control_receipts.append(Envelope.from_json_bytes(sign_control_receipt(end, mallory)))
    got = _failed(b)
    assert ("control.receipt", "control[0]") in got
    assert ("task.final", "task:t") in got

    b.control_receipts.clear()
    other = dataclasses.replace(end, node_id="mallory-node")
    b.control_receipts.append(Envelope.from_json_bytes(sign_control_receipt(other, b.control)))
    assert ("control.receipt", "control[0]") in _failed(b)

    b.control_receipts.clear()
    b.control_receipt(EndReason.HEARTBEAT_TIMEOUT, T0 + TTL, State.EXPIRED, lease=lease)
    good = b.build()
    env = good.control_receipts[0]
    edited = Envelope(
        env.payload.replace(b"EXPIRED", b"CANCELED"), env.payload_type, env.signatures
    )
    bad = dataclasses.replace(good, control_receipts=[edited])
    assert ("control.receipt", "control[0]") in _failed(b, bad)
    dup = dataclasses.replace(good, control_receipts=[env, env])
    assert ("lease.closed", "task:t") in _failed(b, dup)


def test_control_receipts_round_trip_file_and_proto() -> None:
    """The bundle's controlReceipts survive the file format and the protobuf bridge; a bundle
    without any writes no field (older bundles keep their bytes)."""
    b = BundleBuilder(seed="trip")
    lease = b.task("t", "n", "a", tool_calls=0, finish=False)
    assert b"controlReceipts" not in encode_bundle(b.build())
    b.control_receipt(EndReason.RELEASED, T0 + 5, State.EXPIRED, lease=lease)
    bundle = b.build()
    data = encode_bundle(bundle)
    assert b'"controlReceipts":[' in data
    assert decode_bundle(data) == bundle
    assert bundle_from_proto(bundle_to_proto(bundle)) == bundle
    assert verify_bundle(data, [b.control.public]).ok
