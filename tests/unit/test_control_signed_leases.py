"""Signed leases and node certificates: sign bytes, verify bytes, decode only after."""

from __future__ import annotations

import dataclasses

import pytest

from tether.core.errors import VerificationError
from tether.core.leases import Lease
from tether.crypto import envelopes
from tether.crypto.certs import issue_cert, verify_cert
from tether.crypto.leases import sign_lease, sign_lease_fields, verify_lease
from tether.crypto.signing import LEASE_PAYLOAD_TYPE, Envelope, SigningKey

LEASE = Lease(
    lease_id="l1",
    task_id="t1",
    attempt=1,
    node_id="n1",
    agent_id="a1",
    fencing_token=3,
    issued_unix_ms=1000,
    expires_unix_ms=31000,
    policy_digest="ab" * 32,
    queue="q",
    tools=("http.get", "search"),
)


def test_lease_round_trips_through_a_signed_envelope() -> None:
    """A signed lease verifies with the control key and decodes to the same facts."""
    key = SigningKey.generate()
    env = sign_lease(LEASE, key)
    assert env.payload_type == LEASE_PAYLOAD_TYPE
    assert verify_lease(env, {key.keyid: key.public}) == LEASE


@pytest.mark.parametrize(
    "lease",
    [
        LEASE,
        dataclasses.replace(LEASE, tools=(), attempt_deadline_unix_ms=9, task_deadline_unix_ms=7),
    ],
)
def test_lease_signed_from_its_fields_is_the_same_envelope(lease: Lease) -> None:
    """sign_lease_fields makes byte for byte the envelope sign_lease makes of the record,
    and refuses what the record refuses (no positive token, no expiry after issue)."""
    key = SigningKey.generate()
    fields = {f.name: getattr(lease, f.name) for f in dataclasses.fields(lease)}
    env = sign_lease_fields(key, **fields)
    assert env == sign_lease(lease, key)
    assert env.to_json_bytes() == sign_lease(lease, key).to_json_bytes()
    for bad, why in (
        ({"fencing_token": 0}, "positive fencing token"),
        ({"expires_unix_ms": lease.issued_unix_ms}, "expire after"),
    ):
        with pytest.raises(ValueError, match=why):
            sign_lease_fields(key, **{**fields, **bad})


def test_lease_survives_the_wire_envelope_and_json_forms() -> None:
    """Proto and DSSE JSON conversions keep the signed bytes, so the lease still verifies."""
    key = SigningKey.generate()
    env = sign_lease(LEASE, key)
    wire = envelopes.to_proto(env)
    assert envelopes.from_proto(wire) == env
    assert envelopes.from_proto(envelopes.json_to_proto(env.to_json_bytes())) == env


def test_tampered_or_foreign_lease_is_refused() -> None:
    """A flipped payload byte or another key's signature is refused before decoding."""
    key, other = SigningKey.generate(), SigningKey.generate()
    env = sign_lease(LEASE, key)
    bad = bytearray(env.payload)
    bad[-1] ^= 1
    with pytest.raises(VerificationError):
        verify_lease(dataclasses.replace(env, payload=bytes(bad)), {key.keyid: key.public})
    with pytest.raises(VerificationError):
        verify_lease(env, {other.keyid: other.public})
    with pytest.raises(VerificationError):
        verify_lease(Envelope(env.payload, "text/plain", env.signatures), {key.keyid: key.public})


def test_node_certificate_binds_node_to_key() -> None:
    """A node certificate verifies and names the node, its key and the issuer."""
    key, node = SigningKey.generate(), SigningKey.generate()
    cert, env = issue_cert(key, "node-1", node.public.raw, 1000)
    got = verify_cert(env, {key.keyid: key.public})
    assert got == cert
    assert got.keyid == node.keyid
    assert got.issuer_keyid == key.keyid
    assert got.valid_at(1000)
    assert not got.valid_at(cert.expires_unix_ms)
