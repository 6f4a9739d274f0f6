"""Property tests: a secret embedded anywhere, in any encoding the redactor knows, is removed."""

from __future__ import annotations

import base64
import urllib.parse

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.sidecar.redaction import Redactor

secrets_ = st.binary(min_size=8, max_size=48).filter(lambda b: len(set(b)) > 3)
filler = st.binary(max_size=64)
text_filler = st.text(max_size=64)


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret,
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        urllib.parse.quote(secret, safe="").encode(),
        secret.hex().encode(),
    ]


@settings(max_examples=200, deadline=None)
@given(secret=secrets_, before=filler, after=filler, form=st.integers(0, 4))
def test_secret_in_any_known_form_is_removed_from_bytes(
    secret: bytes, before: bytes, after: bytes, form: int
) -> None:
    """Raw, base64 (std/url-safe), URL-encoded and hex forms are gone after redaction."""
    encoded = _forms(secret)[form]
    out = Redactor([secret]).redact_bytes(before + encoded + after)
    assert secret not in out
    assert encoded not in out


@settings(max_examples=200, deadline=None)
@given(secret=secrets_, prefix=filler, suffix=filler)
def test_secret_inside_a_larger_base64_blob_is_removed(
    secret: bytes, prefix: bytes, suffix: bytes
) -> None:
    """A secret base64-encoded with other bytes (any alignment) leaves no trace of the blob."""
    blob = base64.b64encode(prefix + secret + suffix)
    out = Redactor([secret]).redact_bytes(b"Authorization: Basic " + blob)
    assert blob not in out
    decoded_core = base64.b64encode(secret)[4:-4]
    assert not decoded_core or decoded_core not in out


@settings(max_examples=100, deadline=None)
@given(secret=st.text(min_size=8, max_size=32).filter(lambda t: len(set(t)) > 3), doc=text_filler)
def test_secret_in_nested_json_keys_and_values_is_removed(secret: str, doc: str) -> None:
    """Secrets in dict keys, values and lists of a JSON-like result are all redacted."""
    value = {"a": [doc + secret], secret: {"nested": secret + doc}, "n": 1}
    out = Redactor([secret.encode()]).redact(value)
    assert not any(secret in s for s in _strings(out))


def _strings(obj: object) -> list[str]:
    """Every string (keys included) inside a JSON-like value."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _strings(v)]
    return []
