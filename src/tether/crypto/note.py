"""C2SP signed-note and tlog-checkpoint, with Ed25519 signatures.

A checkpoint is the text "ORIGIN\\nSIZE\\nBASE64(ROOT)\\n" followed by a blank line
and one or more signature lines "— NAME BASE64(keyhash4 || sig)". keyhash4 is the
first 4 bytes of SHA-256(NAME || "\\n" || 0x01 || raw Ed25519 public key) and sig
is the Ed25519 signature over the body bytes. Using the ecosystem's format lets
the tools and witnesses that read Go's checksum database read our ledger heads.

Opening a note follows c2sp.org/signed-note strictly, like Go's
`golang.org/x/mod/sumdb/note`: a known key is a (name, key hash) pair; lines by
unknown keys are ignored (witness cosignatures), but every line by a known key
must verify, or the whole note is rejected; at least one must. Stricter than
Go in two ways: a second line by the same known key is verified too (Go skips
it unverified), and base64 must be canonical. A Tether checkpoint is signed by
the control key under the log's own name, its origin, and under no other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tether.core.errors import VerificationError
from tether.crypto.signing import SigningKey, VerifyKey

SIG_PREFIX = "\u2014 "  # em dash + space
ED25519_ALG = b"\x01"
MAX_SIGNATURES = 100  # as Go's note.Open; the spec asks verifiers to accept at least 16
MAX_NOTE_BYTES = 1 << 20

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # ASCII controls other than newline


def key_hash(name: str, public_raw: bytes) -> bytes:
    """The 4-byte key hash (C2SP key ID) that a signature line carries."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_ALG + public_raw).digest()[:4]


def valid_name(name: str) -> bool:
    """C2SP key names: non-empty UTF-8 with no Unicode space and no "+"."""
    if not name or "+" in name or any(c.isspace() for c in name):
        return False
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return _CONTROL.search(name) is None


def _check_name(name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"invalid signer name {name!r}")


def _b64(text: str) -> bytes | None:
    """Canonical standard base64, or None."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    return raw if binascii.b2a_base64(raw, newline=False).decode() == text else None


@dataclass(frozen=True)
class NoteVerifier:
    """A known note key: its name and Ed25519 public key (C2SP's (key name, key ID))."""

    name: str
    key: VerifyKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def key_hash(self) -> bytes:
        return key_hash(self.name, self.key.raw)

    @property
    def ident(self) -> str:
        """ "name+hexhash", as Go's errors and `tether verify` name a note key."""
        return f"{self.name}+{self.key_hash.hex()}"

    def vkey(self) -> str:
        """The verifier key "name+hexhash+base64(0x01||key)" that note tools read."""
        raw = ED25519_ALG + self.key.raw
        return f"{self.ident}+{base64.b64encode(raw).decode()}"

    @classmethod
    def parse(cls, vkey: str) -> NoteVerifier:
        """Parses a verifier key "name+hexhash+base64(0x01||key)" strictly.

        Raises:
            ValueError: malformed, not Ed25519, or a hash that does not match.
        """
        name, _, rest = vkey.partition("+")
        hexhash, _, b64 = rest.partition("+")
        raw = _b64(b64)
        if (
            not valid_name(name)
            or re.fullmatch(r"[0-9a-f]{8}", hexhash) is None
            or raw is None
            or len(raw) != 33
            or raw[:1] != ED25519_ALG
        ):
            raise ValueError(f"malformed Ed25519 verifier key {vkey[:80]!r}")
        try:
            v = cls(name, VerifyKey.from_raw(raw[1:]))
        except VerificationError as err:
            raise ValueError(f"malformed verifier key: {err.message}") from err
        if v.key_hash.hex() != hexhash:
            raise ValueError(f"verifier key {v.ident} does not match its hash {hexhash}")
        return v


def verifier_key(name: str, key: VerifyKey) -> str:
    """The standard verifier-key string "name+hexhash+base64(0x01||key)"."""
    return NoteVerifier(name, key).vkey()


def sign_note(body: str, name: str, key: SigningKey) -> str:
    """Returns the signed note: body, blank line, one signature line by `key`."""
    _check_name(name)
    if not body.endswith("\n") or _CONTROL.search(body):
        raise ValueError("note body must end with a newline and hold no control characters")
    sig = key.sign(body.encode())
    line = base64.b64encode(key_hash(name, key.public.raw) + sig).decode()
    return f"{body}\n{SIG_PREFIX}{name} {line}\n"


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key hash, signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes

    @property
    def ident(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}"


@dataclass(frozen=True)
class SignedNote:
    """A parsed, not yet verified note: body text and its signature lines."""

    body: str
    signatures: tuple[NoteSignature, ...]


def parse_note(text: str) -> SignedNote:
    """Splits a signed note strictly (c2sp.org/signed-note); does not check signatures.

    Raises:
        VerificationError: the text is not a well-formed signed note.
    """
    try:
        size = len(text.encode())
    except UnicodeEncodeError as err:
        raise VerificationError("note is not valid UTF-8") from err
    if size > MAX_NOTE_BYTES:
        raise VerificationError(f"note is larger than {MAX_NOTE_BYTES} bytes")
    if _CONTROL.search(text):
        raise VerificationError("note contains control characters")
    cut = text.rfind("\n\n")
    if cut < 0:
        raise VerificationError("note has no signature block")
    body, block = text[: cut + 1], text[cut + 2 :]
    if not block.endswith("\n"):
        raise VerificationError("note's signature block must end with a newline")
    sigs: list[NoteSignature] = []
    for line in block[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise VerificationError(f"malformed signature line {line[:40]!r}")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        raw = _b64(b64)
        if not valid_name(name) or raw is None or len(raw) < 5:
            raise VerificationError(f"malformed signature line {line[:40]!r}")
        sigs.append(NoteSignature(name, raw[:4], raw[4:]))
        if len(sigs) > MAX_SIGNATURES:
            raise VerificationError(f"note carries more than {MAX_SIGNATURES} signatures")
    return SignedNote(body, tuple(sigs))


@dataclass(frozen=True)
class OpenedNote:
    """A verified note: its body, the lines known keys verified, and the ignored ones."""

    body: str
    verified: tuple[NoteSignature, ...]
    unknown: tuple[NoteSignature, ...]
    """Lines by keys the verifier does not know (witnesses, say): ignored, as the spec says."""


def open_note(text: str, verifiers: Sequence[NoteVerifier]) -> OpenedNote:
    """Verifies a signed note with known (name, key) pairs.

    Raises:
        VerificationError: malformed; a line by a known key that does not
            verify; two different known keys with one name and hash; or no
            line by a known key.
    """
    note = parse_note(text)
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        old = known.setdefault((v.name, v.key_hash), v)
        if old.key.raw != v.key.raw:
            raise VerificationError(f"ambiguous key {v.ident}: two known keys share it")
    message = note.body.encode()
    verified: list[NoteSignature] = []
    unknown: list[NoteSignature] = []
    for sig in note.signatures:
        by = known.get((sig.name, sig.key_hash))
        if by is None:
            unknown.append(sig)
        elif by.key.verify(sig.signature, message):
            verified.append(sig)
        else:
            raise VerificationError(f"invalid signature for known key {sig.ident}")
    if not verified:
        got = ", ".join(dict.fromkeys(s.ident for s in note.signatures))
        want = ", ".join(sorted(v.ident for v in known.values())) or "(none)"
        raise VerificationError(
            f"note has no signature by a trusted key: signed by {got}, expected one of {want}"
        )
    return OpenedNote(note.body, tuple(verified), tuple(unknown))


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
        raise VerificationError(f"checkpoint size {size_s[:24]!r} is not a decimal number")
    if len(size_s) > 19 or int(size_s) >= 1 << 63:
        raise VerificationError("checkpoint size out of range")
    root = _b64(root_s)
    if root is None or len(root) != 32:
        raise VerificationError("checkpoint root is not a canonical 32-byte hash")
    return CheckpointBody(origin, int(size_s), root, tuple(ext))


def sign_checkpoint(cp: CheckpointBody, key: SigningKey, name: str | None = None) -> str:
    """Signs a checkpoint; the signer name defaults to the origin, as logs do."""
    return sign_note(cp.text(), name or cp.origin, key)


def open_checkpoint(
    text: str, keys: Sequence[VerifyKey], origin: str | None = None
) -> tuple[CheckpointBody, OpenedNote]:
    """Opens a checkpoint signed by a trusted key under the log's name, its origin.

    A signature by a trusted key under any other name is a line by an unknown
    key (ignored); so is one by an unknown key under the origin's name.

    Raises:
        VerificationError: malformed, another origin than `origin` (if given),
            an origin that cannot be a key name, or not signed as above.
    """
    body = parse_checkpoint(parse_note(text).body)
    if origin is not None and body.origin != origin:
        raise VerificationError(f"checkpoint is for log {body.origin!r}, expected {origin!r}")
    if not valid_name(body.origin):
        raise VerificationError(f"checkpoint origin {body.origin[:60]!r} cannot name a key")
    opened = open_note(text, [NoteVerifier(body.origin, k) for k in keys])
    return body, opened


def verify_checkpoint(
    text: str, keys: Sequence[VerifyKey], origin: str | None = None
) -> CheckpointBody:
    """Opens a signed checkpoint with trusted keys and parses its body.

    Raises:
        VerificationError: malformed, or not signed by a trusted key under its origin.
    """
    return open_checkpoint(text, keys, origin)[0]
