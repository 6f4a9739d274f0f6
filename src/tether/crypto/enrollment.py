"""Enrolment with proof of possession: a server challenge and a node's signed statement.

1. The control plane hands out a *challenge*: a DSSE envelope it signs over
   {node_id, issued_unix_ms, nonce}. It is stateless, so any replica holding the
   control key can check it, and it ages out by the control plane's clock only
   (a node's skewed clock plays no part).
2. The node answers with a *statement*: a DSSE envelope signed by its Ed25519
   key over {node_id, public_key, tls_public_key, challenge_sha256}. Only the
   holder of the private key can make it, it binds the TLS key the certificate
   will carry, and it is bound to one fresh challenge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from tether.core.errors import VerificationError
from tether.crypto.signing import Envelope, SigningKey, VerifyKey, verify_envelope

CHALLENGE_PAYLOAD_TYPE = "application/vnd.tether.enrollment-challenge.v1+json"
STATEMENT_PAYLOAD_TYPE = "application/vnd.tether.enrollment-statement.v1+json"
CHALLENGE_MAX_AGE_MS = 5 * 60 * 1000


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _load(payload: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise VerificationError(f"{what} payload is not JSON") from err
    if not isinstance(doc, dict):
        raise VerificationError(f"{what} payload is not a JSON object")
    return doc


def make_challenge(control_key: SigningKey, node_id: str, now_ms: int) -> Envelope:
    """A fresh challenge for `node_id`, signed by the control plane."""
    doc = {"node_id": node_id, "issued_unix_ms": now_ms, "nonce": secrets.token_hex(16)}
    return control_key.sign_envelope(CHALLENGE_PAYLOAD_TYPE, _json(doc))


def check_challenge(
    env: Envelope,
    control_keys: dict[str, VerifyKey],
    node_id: str,
    now_ms: int,
    max_age_ms: int = CHALLENGE_MAX_AGE_MS,
) -> str:
    """Checks a challenge this control plane issued; returns its payload's SHA-256.

    Raises:
        VerificationError: not signed by a control key, for another node, or too old.
    """
    verify_envelope(env, control_keys, CHALLENGE_PAYLOAD_TYPE)
    doc = _load(env.payload, "challenge")
    if doc.get("node_id") != node_id:
        raise VerificationError("the enrolment challenge was issued for another node")
    issued = doc.get("issued_unix_ms")
    if not isinstance(issued, int) or not (now_ms - max_age_ms <= issued <= now_ms + 1000):
        raise VerificationError(
            "the enrolment challenge is stale; ask for a new one (GetEnrollmentChallenge)"
        )
    return hashlib.sha256(env.payload).hexdigest()


@dataclass(frozen=True)
class Statement:
    """What a verified enrolment statement says."""

    node_id: str
    public_key: bytes
    tls_public_key: bytes
    challenge_sha256: str


def make_statement(
    node_key: SigningKey, node_id: str, tls_public_key: bytes, challenge: Envelope
) -> Envelope:
    """The node's statement, signed by its own key, answering `challenge`."""
    doc = {
        "node_id": node_id,
        "public_key": base64.b64encode(node_key.public.raw).decode(),
        "tls_public_key": base64.b64encode(tls_public_key).decode(),
        "challenge_sha256": hashlib.sha256(challenge.payload).hexdigest(),
    }
    return node_key.sign_envelope(STATEMENT_PAYLOAD_TYPE, _json(doc))


def verify_statement(env: Envelope, node_id: str) -> Statement:
    """Checks that the key named in the statement signed it (proof of possession).

    Raises:
        VerificationError: malformed, for another node, or not signed by its key.
    """
    if env.payload_type != STATEMENT_PAYLOAD_TYPE:
        raise VerificationError(f"statement payload type is {env.payload_type!r}")
    doc = _load(env.payload, "statement")
    try:
        public = base64.b64decode(str(doc["public_key"]), validate=True)
        tls = base64.b64decode(str(doc["tls_public_key"]), validate=True)
        challenge = str(doc["challenge_sha256"])
        named = str(doc["node_id"])
    except (KeyError, ValueError) as err:
        raise VerificationError(f"statement is missing or mangles a field: {err}") from err
    if named != node_id:
        raise VerificationError("the enrolment statement names another node")
    key = VerifyKey.from_raw(public)
    verify_envelope(env, {key.keyid: key}, STATEMENT_PAYLOAD_TYPE)
    return Statement(named, public, tls, challenge)
