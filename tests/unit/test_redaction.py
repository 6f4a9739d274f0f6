"""Redaction catches every encoded form of a secret, in every JSON-like position."""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

import pytest

from tether.sidecar.redaction import REDACTED, Redactor

SECRET = b"s3cr3t/T0ken+value=="


def _forms() -> list[str]:
    b64 = base64.b64encode(SECRET).decode()
    return [
        SECRET.decode(),
        b64,
        b64.rstrip("="),
        base64.urlsafe_b64encode(SECRET).decode(),
        base64.urlsafe_b64encode(SECRET).decode().rstrip("="),
        quote(SECRET, safe=""),
        quote(SECRET),
        quote_plus(SECRET),
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(SECRET, safe="")),
        SECRET.hex(),
        SECRET.hex().upper(),
    ]


@pytest.mark.parametrize("form", _forms())
def test_each_form_is_redacted_in_text(form: str) -> None:
    """Raw, base64 (std/url-safe, padded or not), URL-encoded and hex forms are replaced."""
    redactor = Redactor([SECRET])
    out = redactor.redact(f"prefix {form} suffix")
    assert form not in out
    assert REDACTED in out


@pytest.mark.parametrize("prefix", [b"", b"u", b"us", b"user:", b"ab:", b"x:"])
@pytest.mark.parametrize("suffix", [b"", b"!", b"!!", b"!!!"])
def test_secret_inside_larger_base64_blob(prefix: bytes, suffix: bytes) -> None:
    """A secret embedded at any byte alignment in a base64 blob (e.g. Basic auth) is caught."""
    redactor = Redactor([SECRET])
    blob = base64.b64encode(prefix + SECRET + suffix).decode()
    out = redactor.redact_text(blob)
    assert REDACTED in out
    # What is left visible is only the encoded prefix/suffix plus partial edge characters.
    leftover = len(out.replace(REDACTED, ""))
    assert leftover <= 4 * (-(-len(prefix) // 3)) + 4 * (-(-len(suffix) // 3)) + 4


def test_nested_structures_keys_bytes_and_numbers() -> None:
    """Dict keys and values, lists, bytes and numbers holding a secret are all redacted."""
    redactor = Redactor([SECRET, b"987654321"])
    doc = {
        "headers": {"authorization": f"Bearer {SECRET.decode()}"},
        SECRET.decode(): [SECRET, {"n": 987654321}, ("x", SECRET.hex())],
        "json": json.dumps({"k": SECRET.decode()}),
        "ok": True,
        "none": None,
        "count": 3,
    }
    out = redactor.redact(doc)
    assert not redactor.contains_secret(out)
    assert out["ok"] is True
    assert out["count"] == 3
    assert out["none"] is None
    assert out[REDACTED][1] == {"n": REDACTED}
    assert out[REDACTED][0] == REDACTED.encode()


def test_json_escaped_secret_is_caught() -> None:
    """A secret with characters JSON escapes is caught in its escaped form too."""
    secret = 'pa"ss\\wörd-123'.encode()
    redactor = Redactor([secret])
    dumped = json.dumps({"v": secret.decode()})
    assert REDACTED in redactor.redact_text(dumped)
    assert not redactor.contains_secret(dumped.replace(dumped, redactor.redact_text(dumped)))


def test_no_secrets_is_identity() -> None:
    """With no secrets the input object itself comes back untouched."""
    redactor = Redactor([])
    doc = {"a": [1, 2, "three"]}
    assert redactor.redact(doc) is doc
    assert not redactor
    assert redactor.with_secrets([b""]) is redactor
    assert "s3cr3t" not in repr(Redactor([SECRET]))
