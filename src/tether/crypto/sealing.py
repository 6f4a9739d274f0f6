"""Envelope encryption for the credential vault (AES-256-GCM, DEK wrapped under a KEK).

Each secret version is sealed under its own random 256-bit data-encryption key
(DEK) with AAD binding (name, version), so a ciphertext cannot be replayed as
another secret or version. The DEK is wrapped under a key-encryption key (KEK)
named by `kek_id`, with AAD binding (kek_id, name, version). Rotating the KEK
re-wraps only the 60-byte DEK blobs (`Sealer.rewrap`), never the ciphertexts,
so `tether secrets rotate-kek` runs without downtime: both KEKs stay loadable
until every row is re-wrapped.

KEK file: one `kek_id:base64(32 bytes)` per line, `#` comments allowed, mode
0600 enforced; the LAST key in the file is the active one (new seals use it).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tether.core.errors import ConfigError, VerificationError

ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
_KEK_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _lp(*parts: bytes) -> bytes:
    """Unambiguous length-prefixed concatenation (no field can bleed into another)."""
    return b"".join(b"%d:%s;" % (len(p), p) for p in parts)


def _secret_aad(name: str, version: int) -> bytes:
    return _lp(b"tether.secret.v1", name.encode(), str(version).encode())


def _dek_aad(kek_id: str, name: str, version: int) -> bytes:
    return _lp(b"tether.dek.v1", kek_id.encode(), name.encode(), str(version).encode())


@dataclass(frozen=True)
class SealedSecret:
    """One sealed secret version: no plaintext, no DEK in the clear.

    `wrapped_dek` and `ciphertext` are each nonce (12 bytes) || AES-GCM output.
    """

    name: str
    version: int
    kek_id: str
    wrapped_dek: bytes
    ciphertext: bytes
    algorithm: str = ALGORITHM

    def __repr__(self) -> str:
        return (
            f"SealedSecret(name={self.name!r}, version={self.version}, kek_id={self.kek_id!r}, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )

    def to_bytes(self) -> bytes:
        """A compact JSON encoding for storage in one column."""
        return json.dumps(
            {
                "alg": self.algorithm,
                "name": self.name,
                "version": self.version,
                "kek_id": self.kek_id,
                "wrapped_dek": base64.b64encode(self.wrapped_dek).decode(),
                "ciphertext": base64.b64encode(self.ciphertext).decode(),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedSecret:
        """Parses `to_bytes` output.

        Raises:
            VerificationError: the blob is malformed.
        """
        try:
            doc = json.loads(data)
            sealed = cls(
                name=str(doc["name"]),
                version=int(doc["version"]),
                kek_id=str(doc["kek_id"]),
                wrapped_dek=base64.b64decode(doc["wrapped_dek"], validate=True),
                ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
                algorithm=str(doc["alg"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as err:
            raise VerificationError("sealed secret: malformed blob") from err
        return sealed


class Sealer:
    """Seals and opens vault entries with a set of KEKs, one of them active."""

    def __init__(self, keks: Mapping[str, bytes], active: str) -> None:
        """Creates a sealer.

        Raises:
            ConfigError: a KEK is not 32 bytes, an id is invalid, or `active` is unknown.
        """
        for kek_id, key in keks.items():
            if not _KEK_ID_RE.match(kek_id):
                raise ConfigError(f"KEK id {kek_id!r} is invalid")
            if len(key) != KEY_BYTES:
                raise ConfigError(f"KEK {kek_id!r} must be {KEY_BYTES} bytes")
        if active not in keks:
            raise ConfigError(f"active KEK {active!r} is not loaded")
        self._keks = {k: AESGCM(v) for k, v in keks.items()}
        self.active = active

    @property
    def kek_ids(self) -> tuple[str, ...]:
        """Ids of every loaded KEK."""
        return tuple(self._keks)

    def seal(self, name: str, version: int, value: bytes) -> SealedSecret:
        """Seals `value` under a fresh DEK, wrapped by the active KEK."""
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = nonce + AESGCM(dek).encrypt(nonce, bytes(value), _secret_aad(name, version))
        return SealedSecret(
            name=name,
            version=version,
            kek_id=self.active,
            wrapped_dek=self._wrap(dek, self.active, name, version),
            ciphertext=ciphertext,
        )

    def open(self, sealed: SealedSecret) -> bytes:
        """Returns the plaintext.

        Raises:
            ConfigError: the KEK that wrapped the DEK is not loaded.
            VerificationError: any byte of the blob, its name, version or kek id was
                changed (AES-GCM authentication fails; no partial plaintext).
        """
        dek = self._unwrap(sealed)
        if sealed.algorithm != ALGORITHM or len(sealed.ciphertext) < NONCE_BYTES + 16:
            raise VerificationError(f"sealed secret {sealed.name!r}: malformed ciphertext")
        nonce, body = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
        try:
            return AESGCM(dek).decrypt(nonce, body, _secret_aad(sealed.name, sealed.version))
        except InvalidTag:
            raise VerificationError(
                f"sealed secret {sealed.name!r} v{sealed.version}: ciphertext failed authentication"
            ) from None

    def needs_rewrap(self, sealed: SealedSecret) -> bool:
        """True when the DEK is wrapped under a KEK other than the active one."""
        return sealed.kek_id != self.active

    def rewrap(self, sealed: SealedSecret) -> SealedSecret:
        """Re-wraps the DEK under the active KEK; the ciphertext is untouched.

        Raises:
            ConfigError: the old KEK is not loaded.
            VerificationError: the wrapped DEK fails authentication.
        """
        if not self.needs_rewrap(sealed):
            return sealed
        dek = self._unwrap(sealed)
        return SealedSecret(
            name=sealed.name,
            version=sealed.version,
            kek_id=self.active,
            wrapped_dek=self._wrap(dek, self.active, sealed.name, sealed.version),
            ciphertext=sealed.ciphertext,
            algorithm=sealed.algorithm,
        )

    def _wrap(self, dek: bytes, kek_id: str, name: str, version: int) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._keks[kek_id].encrypt(nonce, dek, _dek_aad(kek_id, name, version))

    def _unwrap(self, sealed: SealedSecret) -> bytes:
        kek = self._keks.get(sealed.kek_id)
        if kek is None:
            raise ConfigError(
                f"sealed secret {sealed.name!r} v{sealed.version}: KEK {sealed.kek_id!r} "
                "is not loaded"
            )
        if len(sealed.wrapped_dek) != NONCE_BYTES + KEY_BYTES + 16:
            raise VerificationError(f"sealed secret {sealed.name!r}: malformed wrapped DEK")
        nonce, body = sealed.wrapped_dek[:NONCE_BYTES], sealed.wrapped_dek[NONCE_BYTES:]
        try:
            return kek.decrypt(nonce, body, _dek_aad(sealed.kek_id, sealed.name, sealed.version))
        except InvalidTag:
            raise VerificationError(
                f"sealed secret {sealed.name!r} v{sealed.version}: wrapped DEK failed "
                "authentication"
            ) from None


# --------------------------------------------------------------------------- KEK files


def new_kek_id() -> str:
    """A fresh random KEK id."""
    return "kek-" + secrets.token_hex(8)


def load_keks(path: str | Path) -> tuple[dict[str, bytes], str]:
    """Reads a KEK file; returns (keks, active id = the last one).

    Raises:
        ConfigError: the file is missing, readable by group/others, or malformed.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"KEK file {p}: cannot read: {err.__class__.__name__}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"KEK file {p}: mode {stat.S_IMODE(mode):04o} is too open (chmod 600 {p})"
        )
    keks: dict[str, bytes] = {}
    active = ""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kek_id, sep, b64 = line.partition(":")
        try:
            key = base64.b64decode(b64.strip(), validate=True) if sep else b""
        except binascii.Error:
            key = b""
        if not _KEK_ID_RE.match(kek_id) or len(key) != KEY_BYTES:
            raise ConfigError(f"KEK file {p}: line {lineno} is not 'kek_id:base64(32 bytes)'")
        if kek_id in keks:
            raise ConfigError(f"KEK file {p}: line {lineno} repeats KEK id {kek_id!r}")
        keks[kek_id] = key
        active = kek_id
    if not keks:
        raise ConfigError(f"KEK file {p}: holds no key")
    return keks, active


def generate_kek_file(path: str | Path, kek_id: str | None = None) -> str:
    """Creates a new KEK file (mode 0600, refuses to overwrite); returns the KEK id.

    Raises:
        ConfigError: the file already exists or cannot be created.
    """
    kek_id = kek_id or new_kek_id()
    line = _kek_line(kek_id)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise ConfigError(f"KEK file {path}: cannot create: {err.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("# Tether key-encryption keys; the last one is active. Keep mode 0600.\n")
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return kek_id


def add_kek(path: str | Path, kek_id: str | None = None) -> str:
    """Appends a fresh KEK to an existing file, making it the active one; returns its id.

    Old KEKs stay in the file so sealed entries still open until re-wrapped.

    Raises:
        ConfigError: the file is unreadable, too open, malformed, or has the id already.
    """
    keks, _ = load_keks(path)
    kek_id = kek_id or new_kek_id()
    if kek_id in keks:
        raise ConfigError(f"KEK file {path}: KEK id {kek_id!r} exists already")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="ascii") as f:
        f.write(_kek_line(kek_id))
        f.flush()
        os.fsync(f.fileno())
    return kek_id


def sealer_from_file(path: str | Path) -> Sealer:
    """A Sealer over every KEK in the file, the last one active."""
    keks, active = load_keks(path)
    return Sealer(keks, active)


def _kek_line(kek_id: str) -> str:
    if not _KEK_ID_RE.match(kek_id):
        raise ConfigError(f"KEK id {kek_id!r} is invalid")
    return f"{kek_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}\n"
