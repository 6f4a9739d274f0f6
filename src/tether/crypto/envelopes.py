"""Conversions between `signing.Envelope` and the wire `tether.v1.Envelope`.

Both carry the same payload bytes; nothing is re-encoded, so signatures hold.
"""

from __future__ import annotations

from typing import Any

from tether.core.errors import VerificationError
from tether.crypto.signing import Envelope
from tether.v1 import receipt_pb2


def to_proto(env: Envelope) -> receipt_pb2.Envelope:
    """The wire form of an envelope."""
    return receipt_pb2.Envelope(**proto_fields(env))


def proto_fields(env: Envelope) -> dict[str, Any]:
    """The wire form's fields, for building it inside a larger message: a message given
    to a constructor is copied, a dict of fields is built in place."""
    return {
        "payload": env.payload,
        "payload_type": env.payload_type,
        "signatures": [{"keyid": k, "sig": s} for k, s in env.signatures],
    }


def from_proto(msg: receipt_pb2.Envelope) -> Envelope:
    """An envelope from its wire form.

    Raises:
        VerificationError: no payload type or no signature.
    """
    if not msg.payload_type or not msg.signatures:
        raise VerificationError("envelope has no payload type or no signature")
    return Envelope(
        payload=bytes(msg.payload),
        payload_type=msg.payload_type,
        signatures=tuple((s.keyid, bytes(s.sig)) for s in msg.signatures),
    )


def json_to_proto(data: bytes) -> receipt_pb2.Envelope:
    """The wire form of stored DSSE JSON envelope bytes."""
    return to_proto(Envelope.from_json_bytes(data))
