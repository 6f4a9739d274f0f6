"""Ed25519 keys and DSSE envelopes: the one signing module.

DSSE signs PAE(payload_type, payload) over the exact payload bytes that travel,
so verification never depends on re-encoding anything. A keyid is the hex
SHA-256 of the raw 32-byte public key; it is a hint, never a reason to trust.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

from tether.core.errors import ConfigError, VerificationError

LEASE_PAYLOAD_TYPE = "application/vnd.tether.lease.v1+protobuf"
NODE_CERT_PAYLOAD_TYPE = "application/vnd.tether.node-certificate.v1+protobuf"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MANIFEST_PAYLOAD_TYPE = "application/vnd.tether.export-manifest.v1+protobuf"


def keyid_of(public_raw: bytes) -> str:
    """Returns the keyid (hex SHA-256) of a raw Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope; `signatures` holds (keyid, sig) pairs."""

    payload: bytes
    payload_type: str
    signatures: tuple[tuple[str, bytes], ...]

    def to_json_bytes(self) -> bytes:
        """The standard DSSE JSON form, compact; these bytes are what we store.

        Exactly `json.dumps(doc, separators=(",", ":"))` of the DSSE document, put
        together from its parts: base64 needs no escaping and the two strings are
        escaped by `json.dumps` itself (cached), so a lease costs no encoder run.
        """
        sigs = b",".join(
            b'{"keyid":%s,"sig":"%s"}' % (_json_str(k), base64.b64encode(s))
            for k, s in self.signatures
        )
        return b'{"payload":"%s","payloadType":%s,"signatures":[%s]}' % (
            base64.b64encode(self.payload),
            _json_str(self.payload_type),
            sigs,
        )

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Envelope:
        """Parses a DSSE JSON envelope.

        Raises:
            VerificationError: the bytes are not a well-formed DSSE envelope.
        """
        try:
            doc = json.loads(data)
            payload = base64.b64decode(doc["payload"], validate=True)
            ptype = doc["payloadType"]
            sigs = tuple(
                (str(s["keyid"]), base64.b64decode(s["sig"], validate=True))
                for s in doc["signatures"]
            )
        except (ValueError, KeyError, TypeError) as err:
            raise VerificationError(f"malformed DSSE envelope: {err}") from err
        if not isinstance(ptype, str) or not sigs:
            raise VerificationError("malformed DSSE envelope: no payloadType or no signature")
        return cls(payload=payload, payload_type=ptype, signatures=sigs)


@functools.lru_cache(maxsize=256)
def _json_str(value: str) -> bytes:
    """A JSON string literal as `json.dumps` writes it (payload types and keyids repeat)."""
    return json.dumps(value).encode()


class SigningKey:
    """An Ed25519 private key with its public half and keyid.

    Signs with libsodium (PyNaCl): Ed25519 signatures are deterministic, so they
    are the bytes OpenSSL would make, at about 60% of its CPU, and the call runs
    without the GIL (a grant signed on the store's thread leaves the event loop free).
    """

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = VerifyKey(private.public_key())
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self._sodium = crypto_sign_seed_keypair(seed)[1]

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        """Raw Ed25519 signature over `message`."""
        return crypto_sign(message, self._sodium)[:64]

    def sign_envelope(self, payload_type: str, payload: bytes) -> Envelope:
        """Signs `payload` as a DSSE envelope."""
        signature = self.sign(pae(payload_type, payload))
        return Envelope(payload, payload_type, ((self.keyid, signature),))

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, private_path: Path, public_path: Path | None = None) -> None:
        """Writes the private key (mode 0600, created atomically) and the public key."""
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_pem())
        if public_path is not None:
            public_path.write_bytes(self.public.pem())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Loads a PEM PKCS8 Ed25519 private key.

        Raises:
            ConfigError: unreadable, not Ed25519, or readable by group/others.
        """
        try:
            mode = path.stat().st_mode & 0o077
            data = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read key {path}: {err.strerror}") from err
        if mode:
            raise ConfigError(f"key {path} is readable by group or others; chmod 600 it")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as err:
            raise ConfigError(f"key {path} is not a PEM private key") from err
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"key {path} is not an Ed25519 key")
        return cls(key)


class VerifyKey:
    """An Ed25519 public key."""

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.keyid = keyid_of(self.raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        """Raises VerificationError unless `raw` is a 32-byte Ed25519 key."""
        if len(raw) != 32:
            raise VerificationError(f"public key must be 32 bytes, got {len(raw)}")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def from_pem(cls, data: bytes) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as err:
            raise ConfigError("not a PEM public key") from err
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("not an Ed25519 public key")
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> VerifyKey:
        try:
            return cls.from_pem(path.read_bytes())
        except OSError as err:
            raise ConfigError(f"cannot read public key {path}: {err.strerror}") from err

    def pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's signature over `message`.

        Checked by libsodium (PyNaCl), not OpenSSL: on the same core it
        verifies about 1.8 times as fast (docs/performance.md), and it is at
        least as strict. Both check the cofactorless equation and refuse a
        non-canonical S; libsodium also refuses small-order or non-canonical
        public keys and a small-order R, so every signature it accepts OpenSSL
        accepts too, and signatures by honestly made keys verify alike.
        """
        if len(signature) != 64:  # libsodium reads the first 64 bytes as the signature
            return False
        try:
            crypto_sign_open(signature + message, self.raw)
        except BadSignatureError:
            return False
        return True


def verify_envelope(env: Envelope, keys: dict[str, VerifyKey], payload_type: str) -> VerifyKey:
    """Checks that a trusted key signed `env` with the expected payload type.

    Returns the key that verified. Keyids only pick candidates; the signature
    decides.

    Raises:
        VerificationError: wrong payload type, or no valid signature by a trusted key.
    """
    if env.payload_type != payload_type:
        raise VerificationError(f"payload type is {env.payload_type!r}, expected {payload_type!r}")
    message = pae(env.payload_type, env.payload)
    for keyid, sig in env.signatures:
        key = keys.get(keyid)
        if key is not None and key.verify(sig, message):
            return key
    for key in keys.values():  # a wrong keyid hint must not hide a valid signature
        if any(key.verify(sig, message) for _, sig in env.signatures):
            return key
    raise VerificationError("no valid signature by a trusted key")
