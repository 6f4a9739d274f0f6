"""C2SP signed-note and tlog-checkpoint, with Ed25519 signatures.

A checkpoint is the text "ORIGIN\\nSIZE\\nBASE64(ROOT)\\n" followed by a blank line
and one or more signature lines "— NAME BASE64(keyhash4 || sig)". keyhash4 is the
first 4 bytes of SHA-256(NAME || "\\n" || 0x01 || raw Ed25519 public key) and sig
is the Ed25519 signature over the body bytes. Using the ecosystem's format lets
the tools and witnesses that read Go's checksum database read our ledger heads.
Verification rejects by default: a note with no valid signature by a trusted
key is an error, whatever else it says.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from tether.core.errors import VerificationError
from tether.crypto.signing import SigningKey, VerifyKey

SIG_PREFIX = "\u2014 "  # em dash + space
ED25519_ALG = b"\x01"
MAX_SIGNATURES = 100


def key_hash(name: str, public_raw: bytes) -> bytes:
    """The 4-byte key hash that a signature line carries as a hint."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_ALG + public_raw).digest()[:4]


def verifier_key(name: str, key: VerifyKey) -> str:
    """The standard verifier-key string "name+hexhash+base64(0x01||key)"."""
    raw = ED25519_ALG + key.raw
    return f"{name}+{key_hash(name, key.raw).hex()}+{base64.b64encode(raw).decode()}"


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise ValueError(f"invalid signer name {name!r}")


def sign_note(body: str, name: str, key: SigningKey) -> str:
    """Returns the signed note: body, blank line, one signature line by `key`."""
    _check_name(name)
    if not body.endswith("\n"):
        raise ValueError("note body must end with a newline")
    sig = key.sign(body.encode())
    line = base64.b64encode(key_hash(name, key.public.raw) + sig).decode()
    return f"{body}\n{SIG_PREFIX}{name} {line}\n"


@dataclass(frozen=True)
class SignedNote:
    """A parsed note: body text and its signature lines (name, keyhash, sig)."""

    body: str
    signatures: tuple[tuple[str, bytes, bytes], ...]


def parse_note(text: str) -> SignedNote:
    """Splits a signed note strictly; does not check signatures.

    Raises:
        VerificationError: the text is not a well-formed signed note.
    """
    if "\r" in text or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise VerificationError("note contains control characters")
    cut = text.rfind("\n\n")
    if cut < 0 or not text.endswith("\n"):
        raise VerificationError("note has no signature block")
    body, block = text[: cut + 1], text[cut + 2 :]
    if not body.strip("\n"):
        raise VerificationError("note body is empty")
    sigs: list[tuple[str, bytes, bytes]] = []
    for line in block[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise VerificationError(f"malformed signature line {line[:40]!r}")
        parts = line[len(SIG_PREFIX) :].split(" ")
        if len(parts) != 2 or not parts[0] or "+" in parts[0]:
            raise VerificationError(f"malformed signature line {line[:40]!r}")
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except binascii.Error as err:
            raise VerificationError("signature line is not base64") from err
        if len(raw) < 5:
            raise VerificationError("signature line is too short")
        sigs.append((parts[0], raw[:4], raw[4:]))
    if not sigs or len(sigs) > MAX_SIGNATURES:
        raise VerificationError("note must carry between 1 and 100 signatures")
    return SignedNote(body, tuple(sigs))


def open_note(text: str, keys: Sequence[VerifyKey]) -> tuple[str, list[str]]:
    """Verifies a signed note and returns (body, names of the trusted signers).

    A signature line counts when its key hash matches (name, key) for a trusted
    key and the Ed25519 signature over the body verifies. Unknown signers are
    ignored, as the spec says; but at least one trusted signature is required.

    Raises:
        VerificationError: malformed, or no valid signature by a trusted key.
    """
    note = parse_note(text)
    message = note.body.encode()
    names: list[str] = []
    for name, khash, sig in note.signatures:
        for key in keys:
            if key_hash(name, key.raw) == khash and key.verify(sig, message):
                names.append(name)
                break
    if not names:
        raise VerificationError("note has no valid signature by a trusted key")
    return note.body, names


@dataclass(frozen=True)
class CheckpointBody:
    """The tlog-checkpoint fields: origin line, tree size, root hash, extensions."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The checkpoint body as signed."""
        lines = [self.origin, str(self.tree_size), base64.b64encode(self.root_hash).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"


def parse_checkpoint(body: str) -> CheckpointBody:
    """Parses a checkpoint body strictly (decimal size without leading zeros, 32-byte root).

    Raises:
        VerificationError: the body is not a tlog-checkpoint.
    """
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise VerificationError("checkpoint body needs origin, size and root lines")
    origin, size_s, root_s, *ext = lines[:-1]
    if not origin or any(not x for x in ext):
        raise VerificationError("checkpoint has an empty line")
    if not size_s.isdigit() or not size_s.isascii() or (size_s != "0" and size_s[0] == "0"):
        raise VerificationError(f"checkpoint size {size_s!r} is not a decimal number")
    try:
        root = base64.b64decode(root_s, validate=True)
    except binascii.Error as err:
        raise VerificationError("checkpoint root is not base64") from err
    if len(root) != 32 or base64.b64encode(root).decode() != root_s:
        raise VerificationError("checkpoint root is not a canonical 32-byte hash")
    size = int(size_s)
    if size >= 1 << 63:
        raise VerificationError("checkpoint size out of range")
    return CheckpointBody(origin, size, root, tuple(ext))


def sign_checkpoint(cp: CheckpointBody, key: SigningKey, name: str | None = None) -> str:
    """Signs a checkpoint; the signer name defaults to the origin, as logs do."""
    return sign_note(cp.text(), name or cp.origin, key)


def verify_checkpoint(text: str, keys: Sequence[VerifyKey]) -> CheckpointBody:
    """Opens a signed checkpoint note with trusted keys and parses its body.

    Raises:
        VerificationError: malformed, or not signed by a trusted key.
    """
    body, _ = open_note(text, keys)
    return parse_checkpoint(body)
