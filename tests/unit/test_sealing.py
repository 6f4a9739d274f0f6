"""Vault envelope encryption: round trip, tamper detection, KEK rotation, KEK files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tether.core.errors import ConfigError, VerificationError
from tether.crypto.sealing import (
    SealedSecret,
    Sealer,
    add_kek,
    generate_kek_file,
    load_keks,
    sealer_from_file,
)

SECRET = b"sk-live-0123456789abcdef"


def _sealer() -> Sealer:
    return Sealer({"k1": os.urandom(32)}, "k1")


def test_round_trip_and_no_plaintext_in_blob() -> None:
    """A sealed secret opens to its value and its stored form never holds the plaintext."""
    sealer = _sealer()
    sealed = sealer.seal("api", 3, SECRET)
    assert sealer.open(sealed) == SECRET
    blob = sealed.to_bytes()
    assert SECRET not in blob
    assert SECRET.hex().encode() not in blob
    assert "sk-live" not in repr(sealed)
    assert sealer.open(SealedSecret.from_bytes(blob)) == SECRET
    assert sealer.seal("api", 3, SECRET).ciphertext != sealed.ciphertext  # fresh DEK + nonce


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_dek"])
def test_any_flipped_byte_fails_verification(field: str) -> None:
    """Flipping any single byte of the ciphertext or wrapped DEK is a VerificationError."""
    sealer = _sealer()
    sealed = sealer.seal("api", 1, SECRET)
    data = getattr(sealed, field)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(VerificationError):
            sealer.open(dataclasses.replace(sealed, **{field: bytes(bad)}))


def test_name_and_version_are_bound() -> None:
    """A ciphertext moved to another name or version does not open (AAD binding)."""
    sealer = _sealer()
    sealed = sealer.seal("api", 1, SECRET)
    with pytest.raises(VerificationError):
        sealer.open(dataclasses.replace(sealed, name="other"))
    with pytest.raises(VerificationError):
        sealer.open(dataclasses.replace(sealed, version=2))
    with pytest.raises(VerificationError):
        SealedSecret.from_bytes(b"{not json")


def test_rewrap_rotates_kek_without_touching_ciphertext() -> None:
    """Re-wrapping moves the DEK to the active KEK; the ciphertext is byte-identical."""
    k1, k2 = os.urandom(32), os.urandom(32)
    old = Sealer({"k1": k1}, "k1")
    sealed = old.seal("api", 1, SECRET)
    both = Sealer({"k1": k1, "k2": k2}, "k2")
    assert both.needs_rewrap(sealed)
    rotated = both.rewrap(sealed)
    assert rotated.kek_id == "k2"
    assert rotated.ciphertext == sealed.ciphertext
    assert rotated.wrapped_dek != sealed.wrapped_dek
    assert both.rewrap(rotated) is rotated
    only_new = Sealer({"k2": k2}, "k2")
    assert only_new.open(rotated) == SECRET
    with pytest.raises(ConfigError, match="not loaded"):
        only_new.open(sealed)
    with pytest.raises(VerificationError):
        only_new.open(dataclasses.replace(rotated, kek_id="k2", wrapped_dek=sealed.wrapped_dek))


def test_kek_file_generate_add_and_permissions(tmp_path: Path) -> None:
    """KEK files are created 0600, the last key is active, and open modes are refused."""
    path = tmp_path / "kek"
    first = generate_kek_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    sealed = sealer_from_file(path).seal("db", 1, SECRET)
    second = add_kek(path)
    keks, active = load_keks(path)
    assert set(keks) == {first, second}
    assert active == second
    sealer = sealer_from_file(path)
    assert sealer.open(sealer.rewrap(sealed)) == SECRET
    with pytest.raises(ConfigError):
        generate_kek_file(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):
        load_keks(path)


def test_bad_kek_material_is_refused(tmp_path: Path) -> None:
    """Short keys, malformed lines and unknown active ids are configuration errors."""
    with pytest.raises(ConfigError):
        Sealer({"k1": b"short"}, "k1")
    with pytest.raises(ConfigError):
        Sealer({"k1": os.urandom(32)}, "k2")
    path = tmp_path / "kek"
    path.write_text("k1:not-base64!!\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="line 1"):
        load_keks(path)
