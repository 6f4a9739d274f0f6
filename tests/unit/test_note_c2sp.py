"""C2SP signed notes and tlog checkpoints against Go's published sumdb test vectors.

The vectors are from golang.org/x/mod: sumdb/note/note_test.go (the
PeterNeumann and EnochRoot keys, TestSign, TestOpen) and sumdb/tlog/note_test.go
(TestParseTree). Each signature below verifies with its published key; where
Tether is stricter than Go (a second line by a known key must verify too,
base64 must be canonical, a checkpoint is signed under its origin only), the
test says so.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.core.errors import VerificationError
from tether.crypto import note
from tether.crypto.note import NoteVerifier
from tether.crypto.signing import SigningKey
from tether.verify.builder import seeded_key

PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngot"
    "pRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWL"
    "ox33WWd1RvMc+QQ=\n"
)
PETER = NoteVerifier.parse(PETER_VKEY)
ENOCH = NoteVerifier.parse(ENOCH_VKEY)


def _peter_signer() -> SigningKey:
    """The signing key of Go's PeterNeumann skey ("PRIVATE+KEY+name+hash+base64(0x01||seed)")."""
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[:1] == b"\x01"
    return SigningKey(Ed25519PrivateKey.from_private_bytes(raw[1:]))


def _idents(sigs: tuple[note.NoteSignature, ...]) -> list[str]:
    return [s.ident for s in sigs]


def test_go_verifier_keys_parse_and_round_trip() -> None:
    """Go's published verifier keys parse, carry their key hashes, and print back unchanged."""
    assert PETER.name == "PeterNeumann"
    assert PETER.key_hash.hex() == "c74f20a3"
    assert ENOCH.key_hash.hex() == "af0cfe78"
    assert PETER.vkey() == PETER_VKEY
    assert ENOCH.vkey() == ENOCH_VKEY
    assert note.verifier_key("PeterNeumann", PETER.key) == PETER_VKEY
    assert _peter_signer().public.raw == PETER.key.raw


def test_mangled_verifier_keys_are_refused() -> None:
    """Every proper substring and every one-character change of a verifier key is refused."""
    bad = [
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ]
    b = PETER_VKEY
    bad += [
        b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1) if (i, j) != (0, len(b))
    ]
    bad += [b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :] for i in range(len(b))]
    for k in bad:
        with pytest.raises(ValueError, match="verifier key"):
            NoteVerifier.parse(k)


def test_signing_reproduces_go_output() -> None:
    """Signing Go's text with Go's PeterNeumann key gives Go's note byte for byte."""
    signed = note.sign_note(TEXT, "PeterNeumann", _peter_signer())
    assert signed == TEXT + "\n" + PETER_SIG
    for bad_name in ("a+b", "bad name", ""):
        with pytest.raises(ValueError, match="invalid signer name"):
            note.sign_note(TEXT, bad_name, _peter_signer())
    with pytest.raises(ValueError, match="must end with a newline"):
        note.sign_note("abc", "PeterNeumann", _peter_signer())


def test_open_one_known_one_unknown_and_both_known() -> None:
    """A line by an unknown key is kept as unknown; with both keys known both verify."""
    opened = note.open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [PETER])
    assert opened.body == TEXT
    assert _idents(opened.verified) == ["PeterNeumann+c74f20a3"]
    assert _idents(opened.unknown) == ["EnochRoot+af0cfe78"]
    both = note.open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [PETER, ENOCH])
    assert _idents(both.verified) == ["PeterNeumann+c74f20a3", "EnochRoot+af0cfe78"]
    assert both.unknown == ()


def test_open_without_a_known_signer_fails_naming_both_sides() -> None:
    """No verifiable signature is an error that names the signers found and expected."""
    with pytest.raises(VerificationError, match="signed by PeterNeumann\\+c74f20a3, EnochRoot"):
        note.open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])
    misnamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    with pytest.raises(VerificationError, match="expected one of PeterNeumann\\+c74f20a3"):
        note.open_note(TEXT + "\n" + misnamed, [PETER])
    wrong_hash = PETER_SIG.replace("x08g", "xxxx")
    with pytest.raises(VerificationError, match="no signature by a trusted key"):
        note.open_note(TEXT + "\n" + wrong_hash, [PETER])


def test_open_refuses_an_invalid_signature_by_a_known_key() -> None:
    """Go's "invalid signature" vector (ABCD spliced into the signature) is refused."""
    spliced = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(VerificationError, match="invalid signature for known key PeterNeumann"):
        note.open_note(TEXT + "\n" + spliced, [PETER])


def test_open_duplicated_lines_as_go_does() -> None:
    """Go's duplicated-lines vector opens: repeated good lines verify, unknown ones stay aside."""
    enoch_abcd = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    text = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd
    opened = note.open_note(text, [PETER])
    assert set(_idents(opened.verified)) == {"PeterNeumann+c74f20a3"}
    assert set(_idents(opened.unknown)) == {"EnochRoot+af0cfe78"}


def test_a_bad_line_by_a_known_key_rejects_the_note_wherever_it_is() -> None:
    """A bad line by a known key fails the note before a good one (as Go) or after (stricter)."""
    raw = bytearray(base64.b64decode(PETER_SIG.split(" ")[2]))
    raw[20] ^= 1
    bad = f"\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"
    for sigs in (bad + PETER_SIG, PETER_SIG + bad):
        with pytest.raises(VerificationError, match="invalid signature"):
            note.open_note(TEXT + "\n" + sigs, [PETER])


def test_too_many_signatures_and_malformed_notes_are_refused() -> None:
    """Go's malformed-note vectors, 101 signature lines, and non-canonical base64 are refused."""
    bad_msgs = [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZ"
        "SNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * 101,
        TEXT + "\n" + PETER_SIG.replace("AM=", "AN="),  # the same bytes, non-canonical text
        TEXT + "\n" + PETER_SIG.replace("\n", "\r\n"),
        "\ud800" + TEXT + "\n" + PETER_SIG,  # not encodable as UTF-8 ("\xff" in Go's bytes)
    ]
    for msg in bad_msgs:
        with pytest.raises(VerificationError):
            note.open_note(msg, [PETER])
    assert note.open_note(TEXT + "\n" + PETER_SIG * 100, [PETER]).body == TEXT


@dataclass(frozen=True)
class _SameHash(NoteVerifier):
    """A known key claiming another's key hash: a 2^32-work collision, faked for the test."""

    claimed: bytes = b""

    @property
    def key_hash(self) -> bytes:
        return self.claimed


def test_two_known_keys_with_one_name_and_hash_are_ambiguous() -> None:
    """Two different known keys under one (name, key hash) are refused, as Go's VerifierList."""
    collider = _SameHash("PeterNeumann", seeded_key("collider").public, PETER.key_hash)
    with pytest.raises(VerificationError, match="ambiguous key PeterNeumann\\+c74f20a3"):
        note.open_note(TEXT + "\n" + PETER_SIG, [PETER, collider])
    assert note.open_note(TEXT + "\n" + PETER_SIG, [PETER, PETER]).body == TEXT


def test_go_tlog_tree_body_parses_and_its_broken_variants_do_not() -> None:
    """Go's tlog tree vector parses to size 123456789012 and RecordHash("hello world")."""
    text = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"
    body = note.parse_checkpoint(text)
    assert body.origin == "go.sum database tree"
    assert body.tree_size == 123456789012
    assert body.root_hash == hashlib.sha256(b"\x00hello world").digest()
    assert body.text() == text
    for bad in (
        "go.sum database tree\n0xabcdef\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBTOOBIG=\n",
        "go.sum database tree\n0123\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        text + "JOE",  # no final newline
        text + "\n",  # an empty extension line
    ):
        with pytest.raises(VerificationError):
            note.parse_checkpoint(bad)
    assert note.parse_checkpoint(text + "JOE\n").extensions == ("JOE",)


def test_checkpoint_is_signed_under_its_origin_only() -> None:
    """A checkpoint signed by the trusted key under another name than its origin is refused."""
    key = seeded_key("c2sp/log")
    cp = note.CheckpointBody("example.com/log", 5, hashlib.sha256(b"root").digest())
    good = note.sign_checkpoint(cp, key)
    assert note.verify_checkpoint(good, [key.public]) == cp
    assert note.verify_checkpoint(good, [key.public], origin="example.com/log") == cp
    with pytest.raises(VerificationError, match=re.escape("expected 'other.example/log'")):
        note.verify_checkpoint(good, [key.public], origin="other.example/log")
    renamed = note.sign_checkpoint(cp, key, name="attacker.example/log")
    with pytest.raises(VerificationError, match=re.escape("expected one of example.com/log+")):
        note.verify_checkpoint(renamed, [key.public])
    cosigned = good + renamed[len(cp.text()) + 1 :]
    body, opened = note.open_checkpoint(cosigned, [key.public])
    assert body == cp
    assert [s.name for s in opened.unknown] == ["attacker.example/log"]
