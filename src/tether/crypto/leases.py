"""Signed leases: `tether.core.leases.Lease` <-> DSSE envelope of a `tether.v1.Lease`.

The control plane signs the protobuf bytes once; holders and verifiers check
the signature over those exact bytes before decoding anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from tether.core.errors import VerificationError
from tether.core.leases import Lease, check_lease_times
from tether.crypto.signing import (
    LEASE_PAYLOAD_TYPE,
    Envelope,
    SigningKey,
    VerifyKey,
    verify_envelope,
)
from tether.v1 import receipt_pb2


def encode_lease(lease: Lease) -> bytes:
    """The `tether.v1.Lease` protobuf bytes of a lease (the signed payload)."""
    return _encode(
        lease_id=lease.lease_id,
        task_id=lease.task_id,
        attempt=lease.attempt,
        node_id=lease.node_id,
        agent_id=lease.agent_id,
        fencing_token=lease.fencing_token,
        issued_unix_ms=lease.issued_unix_ms,
        expires_unix_ms=lease.expires_unix_ms,
        policy_digest=lease.policy_digest,
        queue=lease.queue,
        tools=lease.tools,
        attempt_deadline_unix_ms=lease.attempt_deadline_unix_ms,
        task_deadline_unix_ms=lease.task_deadline_unix_ms,
    )


def _encode(
    *,
    lease_id: str,
    task_id: str,
    attempt: int,
    node_id: str,
    agent_id: str,
    fencing_token: int,
    issued_unix_ms: int,
    expires_unix_ms: int,
    policy_digest: str,
    queue: str,
    tools: Sequence[str],
    attempt_deadline_unix_ms: int,
    task_deadline_unix_ms: int,
) -> bytes:
    """The one encoding of a lease's signed payload (deterministic protobuf)."""
    return receipt_pb2.Lease(
        lease_id=lease_id,
        task_id=task_id,
        attempt=attempt,
        node_id=node_id,
        agent_id=agent_id,
        fencing_token=fencing_token,
        issued_unix_ms=issued_unix_ms,
        expires_unix_ms=expires_unix_ms,
        policy_digest=policy_digest,
        queue=queue,
        tools=tools,
        attempt_deadline_unix_ms=attempt_deadline_unix_ms,
        task_deadline_unix_ms=task_deadline_unix_ms,
    ).SerializeToString(deterministic=True)


def decode_lease(payload: bytes) -> Lease:
    """Parses lease payload bytes (call only after the signature checked).

    Raises:
        VerificationError: not a valid Lease message.
    """
    msg = receipt_pb2.Lease()
    try:
        msg.ParseFromString(payload)
        return Lease(
            lease_id=msg.lease_id,
            task_id=msg.task_id,
            attempt=msg.attempt,
            node_id=msg.node_id,
            agent_id=msg.agent_id,
            fencing_token=msg.fencing_token,
            issued_unix_ms=msg.issued_unix_ms,
            expires_unix_ms=msg.expires_unix_ms,
            policy_digest=msg.policy_digest,
            queue=msg.queue,
            tools=tuple(msg.tools),
            attempt_deadline_unix_ms=msg.attempt_deadline_unix_ms,
            task_deadline_unix_ms=msg.task_deadline_unix_ms,
        )
    except (DecodeError, ValueError) as err:
        raise VerificationError(f"malformed lease payload: {err}") from err


def sign_lease(lease: Lease, key: SigningKey) -> Envelope:
    """Signs a lease as a DSSE envelope with payload type LEASE_PAYLOAD_TYPE."""
    return key.sign_envelope(LEASE_PAYLOAD_TYPE, encode_lease(lease))


def sign_lease_fields(
    key: SigningKey,
    *,
    lease_id: str,
    task_id: str,
    attempt: int,
    node_id: str,
    agent_id: str,
    fencing_token: int,
    issued_unix_ms: int,
    expires_unix_ms: int,
    policy_digest: str,
    queue: str,
    tools: Sequence[str],
    attempt_deadline_unix_ms: int,
    task_deadline_unix_ms: int,
) -> Envelope:
    """`sign_lease(Lease(...), key)` from the lease's fields, with the same checks and the
    same bytes, without building the `Lease` record first (the control plane signs one
    per grant on the store's thread).

    Raises:
        ValueError: as `Lease` does (no positive fencing token, or no expiry after issue).
    """
    check_lease_times(fencing_token, issued_unix_ms, expires_unix_ms)
    payload = _encode(
        lease_id=lease_id,
        task_id=task_id,
        attempt=attempt,
        node_id=node_id,
        agent_id=agent_id,
        fencing_token=fencing_token,
        issued_unix_ms=issued_unix_ms,
        expires_unix_ms=expires_unix_ms,
        policy_digest=policy_digest,
        queue=queue,
        tools=tools,
        attempt_deadline_unix_ms=attempt_deadline_unix_ms,
        task_deadline_unix_ms=task_deadline_unix_ms,
    )
    return key.sign_envelope(LEASE_PAYLOAD_TYPE, payload)


def verify_lease(envelope: Envelope, trusted_keys: dict[str, VerifyKey]) -> Lease:
    """Checks the control plane's signature, then decodes the lease.

    Raises:
        VerificationError: wrong payload type, no valid trusted signature, or a
            malformed payload.
    """
    verify_envelope(envelope, trusted_keys, LEASE_PAYLOAD_TYPE)
    return decode_lease(envelope.payload)
