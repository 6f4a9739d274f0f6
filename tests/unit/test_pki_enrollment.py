"""The trust domain's PKI and the enrolment proof of possession, as pure functions."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from tether.core.errors import ConfigError, VerificationError
from tether.crypto.enrollment import (
    check_challenge,
    make_challenge,
    make_statement,
    verify_statement,
)
from tether.crypto.pki import (
    CertificateAuthority,
    Role,
    TrustBundle,
    cert_pem,
    generate_tls_key,
    identity_from_pem,
    spki_der,
    trust_domain_of,
)
from tether.crypto.signing import SigningKey

NOW = 1_800_000_000_000


def test_statement_proves_possession_of_the_named_key() -> None:
    """A statement signed by the node's key verifies and answers its challenge."""
    control, node = SigningKey.generate(), SigningKey.generate()
    challenge = make_challenge(control, "n1", NOW)
    digest = check_challenge(challenge, {control.keyid: control.public}, "n1", NOW + 1000)
    tls = spki_der(generate_tls_key().public_key())
    st = verify_statement(make_statement(node, "n1", tls, challenge), "n1")
    assert (st.public_key, st.tls_public_key, st.challenge_sha256) == (node.public.raw, tls, digest)


def test_statement_naming_a_key_it_was_not_signed_by_is_refused() -> None:
    """Knowing a node's public key is not enough: a statement signed by another key fails."""
    control, victim, attacker = (SigningKey.generate() for _ in range(3))
    challenge = make_challenge(control, "n1", NOW)
    forged = make_statement(attacker, "n1", b"tls", challenge)
    doc = forged.payload.replace(
        base64.b64encode(attacker.public.raw),
        base64.b64encode(victim.public.raw),
    )
    tampered = dataclasses.replace(forged, payload=doc)
    with pytest.raises(VerificationError):
        verify_statement(tampered, "n1")


def test_statement_for_another_node_is_refused() -> None:
    """A statement names one node id; presenting it for another fails."""
    control, node = SigningKey.generate(), SigningKey.generate()
    st = make_statement(node, "n1", b"tls", make_challenge(control, "n1", NOW))
    with pytest.raises(VerificationError, match="another node"):
        verify_statement(st, "n2")


@pytest.mark.parametrize(
    ("node", "now", "match"),
    [("n2", NOW, "another node"), ("n1", NOW + 6 * 60_000, "stale"), ("n1", NOW - 5000, "stale")],
)
def test_challenge_bound_to_node_and_fresh_by_the_control_clock(
    node: str, now: int, match: str
) -> None:
    """A challenge is refused for another node, after five minutes, or from the future."""
    control = SigningKey.generate()
    challenge = make_challenge(control, "n1", NOW)
    with pytest.raises(VerificationError, match=match):
        check_challenge(challenge, {control.keyid: control.public}, node, now)


def test_challenge_not_signed_by_the_control_plane_is_refused() -> None:
    """A node cannot mint its own challenge."""
    control, other = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(VerificationError):
        check_challenge(
            make_challenge(other, "n1", NOW), {control.keyid: control.public}, "n1", NOW
        )


def test_identities_read_from_certificates() -> None:
    """Node and operator certificates name their SPIFFE identity, role and node key."""
    ca = CertificateAuthority.create("td.example")
    assert trust_domain_of(ca.cert) == "td.example"
    node = ca.issue_node("n1", "ab" * 32, generate_tls_key().public_key(), NOW)
    ident = identity_from_pem(cert_pem(node), "td.example")
    assert (ident.kind, ident.name, ident.node_keyid) == ("node", "n1", "ab" * 32)
    op = ca.issue_operator("alice", Role.AUDITOR, generate_tls_key().public_key())
    ident = identity_from_pem(cert_pem(op), "td.example")
    assert (ident.kind, ident.name, ident.role) == ("operator", "alice", Role.AUDITOR)


def test_certificate_of_another_trust_domain_is_refused() -> None:
    """A certificate naming another trust domain is no identity here."""
    other = CertificateAuthority.create("other.example")
    op = other.issue_operator("mallory", Role.ADMIN, generate_tls_key().public_key())
    with pytest.raises(VerificationError, match="trust domain"):
        identity_from_pem(cert_pem(op), "td.example")


def test_trust_bundle_holds_several_cas_and_keys() -> None:
    """A trust bundle round-trips several CA certificates and control keys (rotation overlap)."""
    cas = [CertificateAuthority.create("td.example") for _ in range(2)]
    keys = [SigningKey.generate().public for _ in range(2)]
    bundle = TrustBundle.parse(TrustBundle(tuple(c.cert for c in cas), tuple(keys)).to_pem())
    assert len(bundle.ca_certs) == 2
    assert set(bundle.control_keys_by_id()) == {k.keyid for k in keys}


def test_empty_trust_bundle_is_refused(tmp_path: Path) -> None:
    """Reject by default: a bundle with no CA or no control key is a configuration error."""
    path = tmp_path / "trust.pem"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="no CA certificate"):
        TrustBundle.load(path)
