"""Signed-note checkpoints and the receipt encoding (in-toto Statement in DSSE)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

import pytest

from tether.core.errors import VerificationError
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto import note
from tether.crypto.receipts import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ReceiptChain,
    envelope_digest,
    parse_receipt,
    parse_statement,
    receipt_from_predicate,
    statement_bytes,
    verify_receipt,
)
from tether.crypto.signing import Envelope, SigningKey
from tether.verify.builder import seeded_key

KEY = seeded_key("unit/control")
NODE = seeded_key("unit/node")


def _receipt(**kw: object) -> Receipt:
    fields: dict[str, object] = {
        "kind": ReceiptKind.TOOL_CALL,
        "node_id": "n1",
        "task_id": "t1",
        "attempt": 1,
        "fencing_token": 7,
        "agent_id": "a1",
        "lease_id": "L1",
        "lease_issued_unix_ms": 1000,
        "lease_expires_unix_ms": 31000,
        "time_unix_ms": 2000,
        "tool": "http.get",
        "cost_micros": 2**40,
        "status": "ok",
    }
    fields.update(kw)
    return Receipt(**fields)  # type: ignore[arg-type]


def test_note_round_trip_and_key_hash() -> None:
    """A signed checkpoint verifies with its key; the key hash follows C2SP signed-note."""
    body = note.CheckpointBody("example.com/log", 42, hashlib.sha256(b"r").digest())
    text = note.sign_checkpoint(body, KEY)
    assert text.startswith("example.com/log\n42\n")
    sig_line = text.splitlines()[-1]
    assert sig_line.startswith("\u2014 example.com/log ")
    raw = base64.b64decode(sig_line.split(" ")[2])
    expected = hashlib.sha256(b"example.com/log\n\x01" + KEY.public.raw).digest()[:4]
    assert raw[:4] == expected
    assert note.verify_checkpoint(text, [KEY.public]) == body
    assert note.verifier_key("example.com/log", KEY.public).startswith(
        f"example.com/log+{expected.hex()}+"
    )


def test_note_rejects_by_default() -> None:
    """Untrusted keys, edited bodies and malformed notes are refused."""
    body = note.CheckpointBody("o", 1, b"\x00" * 32)
    text = note.sign_checkpoint(body, KEY)
    with pytest.raises(VerificationError, match="trusted"):
        note.verify_checkpoint(text, [NODE.public])
    with pytest.raises(VerificationError, match="invalid signature"):
        note.verify_checkpoint(text.replace("\n1\n", "\n2\n", 1), [KEY.public])
    for bad in ("", "o\n1\n", text.replace("\u2014", "-"), text + "junk"):
        with pytest.raises(VerificationError):
            note.verify_checkpoint(bad, [KEY.public])
    for bad_body in ("o\n01\nAA==\n", "o\n1\nnotbase64\n", "o\n1\n"):
        with pytest.raises(VerificationError):
            note.parse_checkpoint(bad_body)


def test_note_ignores_unknown_cosigners() -> None:
    """A note with an extra signature by an unknown key still verifies with the trusted one."""
    body = note.CheckpointBody("o", 3, b"\x01" * 32).text()
    text = note.sign_note(body, "o", KEY)
    other = note.sign_note(body, "witness", NODE)
    both = text + other[len(body) + 1 :]
    opened = note.open_note(both, [note.NoteVerifier("o", KEY.public)])
    assert [s.name for s in opened.verified] == ["o"]
    assert [s.name for s in opened.unknown] == ["witness"]


def test_statement_shape() -> None:
    """The payload is an in-toto Statement v1 whose predicate is proto3 JSON of Receipt."""
    r = dataclasses.replace(_receipt(), seq=1)
    doc = json.loads(statement_bytes(r))
    assert doc["_type"] == STATEMENT_TYPE
    assert doc["predicateType"] == PREDICATE_TYPE
    assert doc["predicate"]["kind"] == "RECEIPT_KIND_TOOL_CALL"
    assert doc["predicate"]["costMicros"] == str(2**40)
    assert doc["subject"] == [
        {"name": "task:t1", "digest": {"sha256": hashlib.sha256(b"t1").hexdigest()}}
    ]
    art = dataclasses.replace(
        r, kind=ReceiptKind.ARTIFACT, artifact_name="a.txt", artifact_sha256="cd" * 32
    )
    assert json.loads(statement_bytes(art))["subject"] == [
        {"name": "a.txt", "digest": {"sha256": "cd" * 32}}
    ]


def test_chain_assigns_seq_and_prev_and_round_trips() -> None:
    """ReceiptChain numbers from 1 and links prev to the previous envelope's digest."""
    chain = ReceiptChain("n1", NODE)
    first = chain.sign(_receipt())
    second = chain.sign(_receipt(kind=ReceiptKind.TASK_FINISHED, final_state=4))
    env, r1 = parse_receipt(first)
    assert (r1.seq, r1.prev) == (1, "")
    r2 = verify_receipt(second, NODE.public)
    assert (r2.seq, r2.prev) == (2, envelope_digest(first))
    assert r1 == dataclasses.replace(_receipt(), seq=1)
    assert env.to_json_bytes() == first
    assert (chain.last_seq, chain.last_digest) == (2, envelope_digest(second))
    resumed = ReceiptChain("n1", NODE, chain.last_seq, chain.last_digest)
    assert parse_receipt(resumed.sign(_receipt()))[1].seq == 3
    with pytest.raises(ValueError, match="names node"):
        chain.sign(_receipt(node_id="other"))


def test_parse_is_strict() -> None:
    """Unknown versions, kinds, fields, bad subjects and non-canonical envelopes are refused."""
    good = json.loads(statement_bytes(dataclasses.replace(_receipt(), seq=1)))
    cases = {
        "version": dict(good["predicate"], version=2),
        "kind": dict(good["predicate"], kind="RECEIPT_KIND_NOPE"),
        "unspecified": dict(good["predicate"], kind=0),
        "unknown field": dict(good["predicate"], extra=1),
        "seq/prev": dict(good["predicate"], seq="2"),
        "type": dict(good["predicate"], attempt="one"),
        "final": dict(good["predicate"], finalState="TASK_STATE_RUNNING"),
    }
    for name, pred in cases.items():
        with pytest.raises(VerificationError):
            receipt_from_predicate(pred)
        assert name
    assert (
        receipt_from_predicate(
            {k if k != "nodeId" else "node_id": v for k, v in good["predicate"].items()}
        ).node_id
        == "n1"
    )
    bad_subject = dict(good, subject=[{"name": "task:x", "digest": {"sha256": "00"}}])
    with pytest.raises(VerificationError, match="subject"):
        parse_statement(json.dumps(bad_subject).encode())
    with pytest.raises(VerificationError, match="predicateType"):
        parse_statement(json.dumps(dict(good, predicateType="x")).encode())
    data = ReceiptChain("n1", NODE).sign(_receipt())
    with pytest.raises(VerificationError, match="canonical"):
        parse_receipt(json.dumps(json.loads(data), indent=1).encode())
    with pytest.raises(VerificationError, match="not signed"):
        verify_receipt(data, KEY.public)
    env = Envelope.from_json_bytes(data)
    other = SigningKey.generate().sign_envelope("text/plain", env.payload).to_json_bytes()
    with pytest.raises(VerificationError, match="in-toto"):
        parse_receipt(other)
