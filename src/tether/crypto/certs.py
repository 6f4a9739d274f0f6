"""Node certificates: the control plane's signed binding of a node id to its key."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tether.core.errors import VerificationError
from tether.crypto.signing import (
    NODE_CERT_PAYLOAD_TYPE,
    Envelope,
    SigningKey,
    VerifyKey,
    keyid_of,
    verify_envelope,
)
from tether.v1 import receipt_pb2

DEFAULT_CERT_VALIDITY_MS = 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class NodeCertificate:
    """A node's enrolment (fields mirror `tether.v1.NodeCertificate`)."""

    node_id: str
    public_key: bytes
    issued_unix_ms: int
    expires_unix_ms: int
    issuer_keyid: str

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise ValueError("a node public key is 32 raw Ed25519 bytes")
        if self.expires_unix_ms <= self.issued_unix_ms:
            raise ValueError("a certificate must expire after it is issued")

    @property
    def keyid(self) -> str:
        return keyid_of(self.public_key)

    def valid_at(self, now_ms: int) -> bool:
        """True inside [issued, expires)."""
        return self.issued_unix_ms <= now_ms < self.expires_unix_ms


def encode_cert(cert: NodeCertificate) -> bytes:
    """The `tether.v1.NodeCertificate` protobuf bytes (the signed payload)."""
    return receipt_pb2.NodeCertificate(
        node_id=cert.node_id,
        public_key=cert.public_key,
        keyid=cert.keyid,
        issued_unix_ms=cert.issued_unix_ms,
        expires_unix_ms=cert.expires_unix_ms,
        issuer_keyid=cert.issuer_keyid,
    ).SerializeToString(deterministic=True)


def issue_cert(
    key: SigningKey,
    node_id: str,
    public_key: bytes,
    now_ms: int,
    validity_ms: int = DEFAULT_CERT_VALIDITY_MS,
) -> tuple[NodeCertificate, Envelope]:
    """Signs a certificate for a node key valid from now for `validity_ms`."""
    cert = NodeCertificate(node_id, public_key, now_ms, now_ms + validity_ms, key.keyid)
    return cert, key.sign_envelope(NODE_CERT_PAYLOAD_TYPE, encode_cert(cert))


def verify_cert(envelope: Envelope, trusted_keys: dict[str, VerifyKey]) -> NodeCertificate:
    """Checks the control plane's signature, then decodes the certificate.

    Raises:
        VerificationError: bad signature or payload type, malformed payload, or a
            keyid that does not match the key.
    """
    verify_envelope(envelope, trusted_keys, NODE_CERT_PAYLOAD_TYPE)
    return decode_cert(envelope.payload)


def decode_cert(payload: bytes) -> NodeCertificate:
    """Parses certificate payload bytes (call only after the signature checked).

    Raises:
        VerificationError: not a valid NodeCertificate, or a keyid that does
            not match its key.
    """
    msg = receipt_pb2.NodeCertificate()
    try:
        msg.ParseFromString(payload)
        cert = NodeCertificate(
            node_id=msg.node_id,
            public_key=bytes(msg.public_key),
            issued_unix_ms=msg.issued_unix_ms,
            expires_unix_ms=msg.expires_unix_ms,
            issuer_keyid=msg.issuer_keyid,
        )
    except (DecodeError, ValueError) as err:
        raise VerificationError(f"malformed node certificate: {err}") from err
    if msg.keyid != cert.keyid:
        raise VerificationError(f"certificate keyid {msg.keyid} does not match its key")
    return cert
