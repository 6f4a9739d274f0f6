"""Redaction of secrets from everything a tool call returns.

A secret can come back from a tool raw or re-encoded: base64 (standard or
URL-safe, padded or not, and at any of the three byte alignments, so a secret
inside a larger blob such as an HTTP Basic `user:secret` header is caught),
URL-encoded (`quote`, `quote_plus`, lower-case escapes), hex, or JSON-escaped.
Every such form is replaced by `[REDACTED]`. Base64 fragments at an unaligned
offset cover only the characters fully determined by the secret, so at most a
few bits at each edge stay visible.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
_MIN_FRAGMENT = 6
_ESCAPE_RE = re.compile(r"%[0-9A-F]{2}")


def _b64_fragments(secret: bytes) -> set[str]:
    """Base64 text that any blob containing `secret` must contain, per alignment."""
    out: set[str] = set()
    full = base64.b64encode(secret).decode()
    out.add(full)
    if len(full.rstrip("=")) >= _MIN_FRAGMENT:
        out.add(full.rstrip("="))
    n = len(secret)
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + secret + b"\0\0").decode()
        start = -(-8 * k // 6)  # first char whose 6 bits all come from the secret
        stop = (8 * k + 8 * n) // 6  # one past the last such char
        fragment = encoded[start:stop]
        if len(fragment) >= _MIN_FRAGMENT:
            out.add(fragment)
    found: set[str] = set()
    for form in out:
        if form:
            found.add(form)
            found.add(form.translate(str.maketrans("+/", "-_")))
    return found


def secret_forms(secret: bytes) -> set[bytes]:
    """Every encoded form of `secret` that the redactor looks for."""
    forms: set[bytes] = {secret}
    forms.update(f.encode() for f in _b64_fragments(secret))
    for text in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        forms.add(text.encode())
        forms.add(_ESCAPE_RE.sub(lambda m: m.group(0).lower(), text).encode())
    forms.add(secret.hex().encode())
    forms.add(secret.hex().upper().encode())
    try:
        as_text = secret.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        forms.add(json.dumps(as_text)[1:-1].encode())
        forms.add(json.dumps(as_text, ensure_ascii=False)[1:-1].encode("utf-8"))
    forms.discard(b"")
    return forms


class Redactor:
    """Replaces every known form of every secret with `[REDACTED]`.

    Immutable: `with_secrets` returns a new redactor. With no secrets every
    method returns its input unchanged without scanning.
    """

    def __init__(self, secrets: Iterable[bytes] = ()) -> None:
        self._secrets: frozenset[bytes] = frozenset(bytes(s) for s in secrets if s)
        forms: set[bytes] = set()
        for secret in self._secrets:
            forms.update(secret_forms(secret))
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._bytes_re: re.Pattern[bytes] | None = None
        self._text_re: re.Pattern[str] | None = None
        if ordered:
            self._bytes_re = re.compile(b"|".join(re.escape(f) for f in ordered))
            texts = sorted(
                {f.decode("utf-8", "surrogateescape") for f in ordered},
                key=lambda t: (-len(t), t),
            )
            self._text_re = re.compile("|".join(re.escape(t) for t in texts))

    def __repr__(self) -> str:
        return f"Redactor(<{len(self._secrets)} secrets>)"

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def with_secrets(self, secrets: Iterable[bytes]) -> Redactor:
        """A redactor covering this one's secrets and `secrets`."""
        extra = {bytes(s) for s in secrets if s}
        if extra <= self._secrets:
            return self
        return Redactor(self._secrets | extra)

    def redact_text(self, value: str) -> str:
        """Redacts a string."""
        if self._text_re is None:
            return value
        return self._text_re.sub(REDACTED, value)

    def redact_bytes(self, value: bytes) -> bytes:
        """Redacts a byte string."""
        if self._bytes_re is None:
            return value
        return self._bytes_re.sub(REDACTED.encode(), value)

    def redact(self, value: Any) -> Any:
        """Redacts str, bytes and JSON-like structures (dict keys and values, lists).

        Numbers whose decimal form contains a secret become the `[REDACTED]` string.
        """
        if self._text_re is None:
            return value
        return self._walk(value)

    def contains_secret(self, value: Any) -> bool:
        """True when `value` holds any form of any secret (for tests and leak scans)."""
        return bool(self._secrets) and self.redact(value) != value

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return self.redact_bytes(bytes(value))
        if isinstance(value, Mapping):
            return {self._walk(k): self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            shown = repr(value)
            return REDACTED if self.redact_text(shown) != shown else value
        return value
