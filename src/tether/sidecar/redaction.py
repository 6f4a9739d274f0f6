"""Redaction of secrets from everything a tool call returns.

A secret can come back from a tool raw or re-encoded: base64 (standard or
URL-safe, padded or not, and at any of the three byte alignments, so a secret
inside a larger blob such as an HTTP Basic `user:secret` header is caught),
URL-encoded (`quote`, `quote_plus`, lower-case escapes), hex, or JSON-escaped.
Every such form is replaced by `[REDACTED]`. Base64 fragments at an unaligned
offset cover only the characters fully determined by the secret, so at most a
few bits at each edge stay visible.

Set-up and scanning stay linear in the size of the secrets, so a large secret
(the vault allows 64 KiB) cannot stall the event loop: the forms are searched
for literally with `str.find` / `bytes.find` (linear-time two-way search),
never compiled into one regular expression (which took seconds for 64 KiB).
"""

from __future__ import annotations

import base64
import heapq
import json
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

REDACTED = "[REDACTED]"
_MIN_FRAGMENT = 6
_URL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
# `str.translate` tables over latin-1 text giving `urllib.parse.quote(s, safe="")`, with
# upper- and lower-case escapes: C speed, where quote() loops in Python once per byte.
_QUOTE_UPPER = [chr(b) if b in _URL_SAFE else f"%{b:02X}" for b in range(256)]
_QUOTE_LOWER = [chr(b) if b in _URL_SAFE else f"%{b:02x}" for b in range(256)]


def _url_forms(secret: bytes) -> set[str]:
    """`quote(s, safe="")`, `quote(s)` and `quote_plus(s)`, with upper- and lower-case escapes."""
    latin = secret.decode("latin-1")
    out: set[str] = set()
    for table, slash, space in ((_QUOTE_UPPER, "%2F", "%20"), (_QUOTE_LOWER, "%2f", "%20")):
        text = latin.translate(table)
        out.update((text, text.replace(slash, "/"), text.replace(space, "+")))
    return out


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
    forms.update(text.encode("ascii") for text in _url_forms(secret))
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


S = TypeVar("S", str, bytes)


class _Matcher(Generic[S]):
    """Replaces every occurrence of any of its forms in one left-to-right pass.

    The earliest occurrence of any form is replaced (the longest form when
    several start there) and the scan resumes after it: what `re.sub` does with
    the forms as one alternation, longest first, but without compiling one (a
    pattern of a 64 KiB secret's forms takes seconds to compile). Each form is
    found with `find` (linear-time search); a heap keeps each form's next
    occurrence, searched again only when a replacement passed over it.
    """

    def __init__(self, forms: Iterable[S], replacement: S) -> None:
        self._forms: tuple[S, ...] = tuple(forms)
        self._replacement: S = replacement

    def sub(self, value: S) -> S:
        """`value` with every occurrence replaced."""
        heap: list[tuple[int, int, S]] = []  # (next occurrence, -length, form)
        for form in self._forms:
            at = value.find(form)
            if at >= 0:
                heap.append((at, -len(form), form))
        if not heap:
            return value
        heapq.heapify(heap)
        pieces: list[S] = []
        pos = 0
        while heap:
            at, neg_len, form = heap[0]
            if at < pos:  # passed over by the last replacement: look again from here
                again = value.find(form, pos)
                if again < 0:
                    heapq.heappop(heap)
                else:
                    heapq.heapreplace(heap, (again, neg_len, form))
                continue
            pieces.append(value[pos:at])
            pieces.append(self._replacement)
            pos = at - neg_len
        pieces.append(value[pos:])
        return value[:0].join(pieces)


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
        self._bytes: _Matcher[bytes] | None = None
        self._text: _Matcher[str] | None = None
        if forms:
            self._bytes = _Matcher(forms, REDACTED.encode())
            texts = {f.decode("utf-8", "surrogateescape") for f in forms}
            self._text = _Matcher(texts, REDACTED)

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
        if self._text is None:
            return value
        return self._text.sub(value)

    def redact_bytes(self, value: bytes) -> bytes:
        """Redacts a byte string."""
        if self._bytes is None:
            return value
        return self._bytes.sub(value)

    def redact(self, value: Any) -> Any:
        """Redacts str, bytes and JSON-like structures (dict keys and values, lists).

        Numbers whose decimal form contains a secret become the `[REDACTED]` string.
        """
        if self._text is None:
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
